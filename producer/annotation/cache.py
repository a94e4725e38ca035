"""Keys and the answer cache: what a request is known by, and the answers stored under it.

Keying by the rendered request rather than the raw row means a change to a column the template
does not use keeps the answer, and any change to what the model sees (template, field values,
adapter, parameters) asks again. The key knows adapters by name, not by weights: after retraining
one under the same name, `annotate --fresh` asks again for every row.

When a run's jobs end, their results are copied into the cache ("harvested"); the output files
are written from the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.producer.annotation.datasets import Cell
from lorabatch.schemas.annotation_tables import (
    AnnotationCache,
    AnnotationRun,
    ensure_tables,
)
from lorabatch.schemas.states import JobState
from lorabatch.schemas.tables import Job, Request, utcnow
from lorabatch.store.context import Context
from lorabatch.store.db import transaction

KEY_VERSION = "lorabatch-annotate-1"
"""Part of every cache key; bump it when rendering changes, so old answers are not reused."""
QUERY_CHUNK = 500
"""Keys per IN (...) query."""
OPEN_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.CANCELLING.value)
FINAL_JOB_STATES = (JobState.COMPLETED.value, JobState.CANCELLED.value)


def annotation_sessions(ctx: Context) -> sessionmaker[Session]:
    """The context's sessions, with the annotation tables made sure of."""
    ensure_tables(ctx.engine)
    return ctx.sessions


def request_key(body: Mapping[str, Any]) -> str:
    """The cache key of one validated request: what the model sees and how it generates."""
    payload = {"v": KEY_VERSION, **{k: body.get(k) for k in ("adapter", "prompt", "messages", "params")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _chunks(items: Sequence[str], size: int = QUERY_CHUNK) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def lookup_cache(sessions: sessionmaker[Session], keys: Iterable[str]) -> dict[str, Cell]:
    """Cached (answer, status, error) by key, for the keys that have an entry."""
    keys = list(dict.fromkeys(k for k in keys if k))
    found: dict[str, Cell] = {}
    with sessions() as s:
        for chunk in _chunks(keys):
            rows = s.execute(select(AnnotationCache.key, AnnotationCache.output, AnnotationCache.status,
                                    AnnotationCache.error).where(AnnotationCache.key.in_(chunk)))
            found.update({k: (o, st, e) for k, o, st, e in rows})
    return found


def _upsert_cache(session: Session, rows: list[dict]) -> None:
    """Insert or update entries; a success is never overwritten by a failure."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        stmt = insert(AnnotationCache)
        stmt = stmt.on_conflict_do_update(
            index_elements=[AnnotationCache.key],
            set_={c: stmt.excluded[c] for c in ("status", "output", "error", "job_id", "updated_at")},
            where=or_(AnnotationCache.status != "succeeded", stmt.excluded.status == "succeeded"),
        )
        session.execute(stmt, rows)
        return
    for row in rows:  # other databases: slower, same rule
        entry = session.get(AnnotationCache, row["key"], with_for_update=True)
        if entry is None:
            session.add(AnnotationCache(**row))
        elif entry.status != "succeeded" or row["status"] == "succeeded":
            for k, v in row.items():
                setattr(entry, k, v)


def harvest_finished(ctx: Context) -> int:
    """Copy the results of every ended annotation job not yet harvested into the cache. Idempotent,
    and safe to run from several processes at once. Returns the number of runs harvested."""
    sessions = annotation_sessions(ctx)
    with sessions() as s:
        todo = s.execute(
            select(AnnotationRun.id, AnnotationRun.job_id).join(Job, Job.id == AnnotationRun.job_id)
            .where(AnnotationRun.harvested_at.is_(None), Job.state.in_(FINAL_JOB_STATES))
        ).all()
    for run_id, job_id in todo:
        with transaction(sessions) as s:
            now = utcnow()
            stmt = (select(Request.custom_id, Request.state, Request.output, Request.error)
                    .where(Request.job_id == job_id).order_by(Request.idx))
            batch = []
            for key, state, output, error in s.execute(stmt):
                batch.append({"key": key, "status": state, "output": output, "error": error, "job_id": job_id,
                              "updated_at": now})
                if len(batch) >= QUERY_CHUNK:
                    _upsert_cache(s, batch)
                    batch = []
            _upsert_cache(s, batch)
            s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id).values(harvested_at=now)
                      .execution_options(synchronize_session=False))
    return len(todo)


def keys_in_flight(sessions: sessionmaker[Session], keys: Sequence[str]) -> dict[str, str]:
    """key -> job id, for keys that are requests of an annotation job that has not ended."""
    found: dict[str, str] = {}
    with sessions() as s:
        open_jobs = s.scalars(select(Job.id).join(AnnotationRun, AnnotationRun.job_id == Job.id)
                              .where(Job.state.in_(OPEN_JOB_STATES))).all()
        if not open_jobs:
            return found
        for chunk in _chunks(list(keys)):
            rows = s.execute(select(Request.custom_id, Request.job_id)
                             .where(Request.job_id.in_(open_jobs), Request.custom_id.in_(chunk)))
            found.update(dict(rows.all()))
    return found
