"""Messages owed to Redis: the outbox (schemas.tables.Outbox), written in the same transaction as
the state change that owes them, published after the commit (store.reconcile.publish_owed)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from lorabatch.schemas.states import JobState, RequestState
from lorabatch.schemas.tables import Job, Outbox, Request
from lorabatch.store.clock import db_now

OPEN = (JobState.QUEUED.value, JobState.RUNNING.value)
SUSPECT_GROUP, SUSPECT_ALONE = 1, 2
"""Outbox.suspect: requests whose worker died while running them run as a group apart from other
work (1), or alone on their last attempt (2)."""


def owe_messages(session: Session, job_id: str, idxs: list[int] | None, *, suspect: int = 0) -> None:
    """Record that these queued requests (None: all of the job's) need a message."""
    now = db_now(session)
    parts = [[idx] for idx in idxs] if suspect == SUSPECT_ALONE and idxs else [idxs]  # alone: one message each
    for part in parts:
        row = Outbox(job_id=job_id, idxs=part, suspect=suspect, created_at=now)
        session.add(row)
        session.info.setdefault("owed", []).append(row)


def owed_ids(session: Session) -> list[int]:
    """Ids of the outbox rows this transaction wrote: the caller publishes them after the commit
    (reconcile.publish_owed); if it dies first, reconcile publishes them."""
    rows = session.info.pop("owed", [])
    session.flush()
    return [r.id for r in rows]


def owed_messages(session: Session, *, older_than: timedelta | None = None, ids: Iterable[int] | None = None,
                  limit: int = 1000) -> list[Outbox]:
    """Outbox rows to publish: those given, or those older than `older_than` (left by a process that
    died between its commit and its publish). Locked, skipping rows another publisher holds."""
    stmt = select(Outbox).order_by(Outbox.id).limit(limit)
    if ids is not None:
        stmt = stmt.where(Outbox.id.in_(list(ids)))
    if older_than is not None:
        stmt = stmt.where(Outbox.created_at <= db_now(session) - older_than)
    return list(session.execute(stmt.with_for_update(skip_locked=True)).scalars())


def settle_messages(session: Session, ids: Iterable[int]) -> None:
    """The outbox rows' messages are in Redis: delete the rows."""
    ids = list(ids)
    if ids:
        session.execute(delete(Outbox).where(Outbox.id.in_(ids)))


def owe_all_queued(session: Session) -> int:
    """Redis lost its data: every open job with queued requests owes messages for all of them."""
    job_ids = session.execute(select(Job.id).where(Job.state.in_(OPEN), Job.n_queued > 0).order_by(Job.id)).scalars().all()
    for job_id in job_ids:
        owe_messages(session, job_id, None)
    return len(job_ids)


def queued_refs(session: Session, job_id: str, idxs: list[int] | None, *, after: int = -1,
                limit: int = 4096) -> list[tuple[bool, str, int]]:
    """(suspect, adapter, idx) of those requests that are still queued, the next `limit` after index
    `after` (a page: callers read a job of millions page by page, each in its own short transaction).
    A suspect started before (attempts > 0) and its worker died: whatever message owed it, it is
    published as a suspect, since ordinary claims skip it (lifecycle.claim_requests)."""
    stmt = select(Request.attempts > 0, Request.adapter, Request.idx).where(
        Request.job_id == job_id, Request.state == RequestState.QUEUED.value, Request.idx > after)
    if idxs is not None:
        stmt = stmt.where(Request.idx.in_(idxs))
    return [tuple(r) for r in session.execute(stmt.order_by(Request.idx).limit(limit))]
