"""Submitting a file: validate every line, create the job, then publish its messages.

One pass over the file: the job row is created first, hidden from workers (total 0, no message
owed); each valid line is inserted as it is read, in short transactions; the first invalid line
stops the inserts, the rest of the file is still read to report every bad line, and the job is
deleted with what was inserted, so a bad file creates nothing. The last transaction sets the total
and owes the job's messages (the outbox); they are published after the commit.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from lorabatch.producer import inputs
from lorabatch.producer.prompt_check import PromptLengthCheck
from lorabatch.schemas.errors import InvalidInput, UsageError
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.schemas.tables import Job, Request
from lorabatch.store import broker, lifecycle, outbox
from lorabatch.store.context import Context
from lorabatch.store.deployment import Served, job_base_key, pins_at_submit
from lorabatch.store.db import transaction
from lorabatch.store.reconcile import publish_owed
from lorabatch.store.retry import with_db_retry

INSERT_CHUNK = 2000
"""Rows per INSERT statement while creating a job."""
ENQUEUE_BATCH = 4096
"""References read from the database per round while enqueuing (a multiple of the message size)."""


@dataclass
class Submitted:
    job_id: str
    total: int
    created: bool
    """False when an earlier job with the same idempotency key was returned instead."""
    messages: int = 0


def submit_file(ctx: Context, source: str, *, adapter: str | None = None, name: str | None = None,
                priority: int = 5, idempotency_key: str | None = None, schedule: str | None = None) -> Submitted:
    """Validate `source` (a path, or '-' for standard input) and create and enqueue a job from it."""
    lifecycle.check_priority(priority)
    if adapter is not None and adapter != BASE_ADAPTER and adapter not in ctx.settings.adapters:
        known = ", ".join(sorted(set(ctx.settings.adapters) | {BASE_ADAPTER}))
        raise UsageError(f"--adapter {adapter!r} is not configured; use one of: {known}.")
    with _opened(source) as (path, display):
        _check_size(ctx, path, display)
        content_hash = _content_hash(path, adapter)
        if idempotency_key and (existing := _complete_job_for_key(ctx, idempotency_key)):
            return _same_content(existing, content_hash, idempotency_key)
        broker.check_broker(ctx.celery)
        job_id = "job-" + uuid.uuid4().hex[:16]
        workers = _serving_workers(ctx)
        base = job_base_key(ctx.settings, workers)
        try:
            with transaction(ctx.sessions) as session:  # hidden until complete: total 0, no message owed
                lifecycle.create_job(session, job_id=job_id, name=name or Path(display).name, priority=priority,
                                     idempotency_key=idempotency_key, source=display, schedule=schedule,
                                     deployment=base, content_hash=content_hash)
        except IntegrityError:
            existing = _job_for_key(ctx, idempotency_key) if idempotency_key else None
            if existing:  # another submit with the same key won the race
                return _same_content(existing, content_hash, idempotency_key)
            raise
        try:
            total, named = _insert_valid_requests(ctx, job_id, path, display, default_adapter=adapter)
        except BaseException:
            with transaction(ctx.sessions) as session:  # no partial job: its requests go with it
                lifecycle.delete_job(session, job_id)
            raise
        with transaction(ctx.sessions) as session:
            # The weights each named adapter runs on; a producer without them asks what workers serve.
            lifecycle.open_job(session, job_id, total, adapter_pins=pins_at_submit(
                ctx.settings, named - {BASE_ADAPTER}, key=base, workers=workers))
            owed = outbox.owed_ids(session)
    # Committed, then published. If this process dies in between, the outbox row stays and a
    # worker's reconcile round publishes it ([worker] publish_grace_seconds later).
    messages = publish_owed(ctx.sessions, ctx.celery, ids=owed)
    return Submitted(job_id, total, created=True, messages=messages)


def _same_content(existing: Job, content_hash: str, key: str) -> Submitted:
    if existing.content_hash and existing.content_hash != content_hash:
        raise UsageError(f"idempotency key {key!r} was used by job {existing.id} for different content; "
                         "use a new key for new content.")
    return Submitted(existing.id, existing.total, created=False)


def _content_hash(path: Path, adapter: str | None) -> str:
    h = hashlib.sha256(f"adapter={adapter}\n".encode())
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                h.update(raw.rstrip(b"\r\n") + b"\n")
    return h.hexdigest()


def _check_size(ctx: Context, path: Path, display: str) -> None:
    limits = ctx.settings.limits
    size = path.stat().st_size
    if size == 0:
        raise InvalidInput(inputs.no_requests_message(display))
    if size > limits.max_file_bytes:
        raise InvalidInput(
            f"{path} is {size} bytes, over the limit of {limits.max_file_bytes}; split it into smaller files "
            "or raise [limits] max_file_bytes."
        )


def _serving_workers(ctx: Context) -> list[Served]:
    """What the live workers serve, as their heartbeats recorded it."""
    lease = timedelta(seconds=ctx.settings.worker.lease_seconds)
    with ctx.sessions() as session:
        return [Served(w.deployment, w.base, w.adapters or {}) for w in lifecycle.live_workers(session, lease=lease)]


def _insert_valid_requests(ctx: Context, job_id: str, path: Path, display: str, *, default_adapter: str | None
                           ) -> tuple[int, set[str]]:
    """One pass over the file: insert requests, INSERT_CHUNK rows per transaction, while every line so
    far is valid; after the first problem keep reading only to report every bad line, then raise
    InvalidInput (the caller deletes the job and what was inserted). Short transactions, so that on
    SQLite the workers' heartbeats, claims and records get the write lock in between; the job stays
    invisible to workers meanwhile (no message is owed until its total is set). Returns the count and the adapters named."""
    limits = ctx.settings.limits
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    too_long = PromptLengthCheck(ctx.settings)
    rows: list[dict] = []
    named: set[str] = set()
    total = 0
    for line_no, spec in inputs.iter_specs(ctx.settings, path, default_adapter=default_adapter):
        if isinstance(spec, str):
            problems.append((line_no, spec))
            continue
        if spec.custom_id in seen:
            problems.append((line_no, f"repeats custom_id {spec.custom_id!r}; give each line its own"))
        seen.add(spec.custom_id)
        if _has_nul([spec.custom_id, spec.prompt, spec.messages, spec.params]):
            problems.append((line_no, "contains a NUL character (\\u0000), which the database cannot store; remove it"))
        if problem := too_long(spec):
            problems.append((line_no, problem))
        if problems:
            continue
        if total >= limits.max_lines:
            raise InvalidInput(f"{path} has more than {limits.max_lines} requests; split it or raise [limits] max_lines.")
        rows.append({"job_id": job_id, "idx": total, "custom_id": spec.custom_id, "adapter": spec.adapter,
                     "prompt": spec.prompt, "messages": spec.messages, "params": spec.params,
                     "state": "queued", "attempts": 0})
        named.add(spec.adapter)
        total += 1
        if len(rows) >= INSERT_CHUNK:
            _insert(ctx, rows)
            rows = []
    if problems:
        raise InvalidInput(inputs.problem_message(display, problems, settings=ctx.settings), problems)
    if total == 0:
        raise InvalidInput(inputs.no_requests_message(display))
    _insert(ctx, rows)
    return total, named


def _insert(ctx: Context, rows: list[dict]) -> None:
    # Busy workers may hold SQLite's write lock past the busy timeout: a collision, retried.
    with_db_retry(ctx.sessions, lambda session: lifecycle.add_requests(session, rows), what="inserting requests")


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(v) for v in value)
    return False


INSERT_STALE_SECONDS = 30.0
"""A hidden job (total 0) whose requests have stopped arriving for this long lost its submit (killed
while inserting): a submit with the same idempotency key replaces it."""


def _complete_job_for_key(ctx: Context, key: str) -> Job | None:
    """The job an earlier submit with `key` created, once it is complete (None: none, make it).

    A hidden one (total 0: its submit is still inserting, or was killed doing so) is waited for while
    its requests keep arriving: if it opens, it is the answer. If none arrive for INSERT_STALE_SECONDS,
    its submit is presumed dead: the job is deleted with its requests (only if still hidden) and this
    submit makes the job. Were that submit alive after all, only slower, its next insert fails (its
    job is gone) and it reports the error; the job made here stands, under the same key. If this
    process dies between the delete and making its own job, the key is simply free again."""
    seen, since = None, time.monotonic()
    while True:
        with ctx.sessions() as session:
            job = session.execute(select(Job).where(Job.idempotency_key == key)).scalar_one_or_none()
            if job is None or job.total > 0:
                return job
            inserted = session.scalar(select(func.count()).select_from(Request).where(Request.job_id == job.id))
        if inserted != seen:
            seen, since = inserted, time.monotonic()
        elif time.monotonic() - since > INSERT_STALE_SECONDS:
            with transaction(ctx.sessions) as session:
                lifecycle.delete_job(session, job.id, only_hidden=True)
            continue  # gone (this submit makes the job), or opened meanwhile (the answer)
        time.sleep(0.5)


def _job_for_key(ctx: Context, key: str) -> Job | None:
    with ctx.sessions() as session:
        return session.execute(select(Job).where(Job.idempotency_key == key)).scalar_one_or_none()


class _opened:
    """A readable path for `source`; standard input is spooled to a temporary file (two passes need it)."""

    def __init__(self, source: str):
        self.source = source
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> tuple[Path, str]:
        if self.source == "-":
            self.tmp = tempfile.TemporaryDirectory(prefix="lorabatch-")
            path = Path(self.tmp.name) / "stdin.jsonl"
            with path.open("wb") as out:
                _copy(sys.stdin.buffer, out)
            return path, "<stdin>"
        inputs.check_input_path(self.source)
        return Path(self.source), self.source

    def __exit__(self, *exc) -> None:
        if self.tmp:
            self.tmp.cleanup()


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    shutil.copyfileobj(src, dst, length=1 << 20)
