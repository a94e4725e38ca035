"""Submitting a file: validate every line, then create the job and enqueue it.

One pass over the file, inside one transaction: each valid line is inserted in chunks as it
is read; the first invalid line stops the inserts, the rest of the file is still read to report
every bad line, and the transaction rolls back, so a bad file creates nothing. Only after the
commit are references enqueued, grouped by adapter and streamed back from the database.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from lorabatch.producer.prompt_check import PromptLengthCheck
from lorabatch.schemas.errors import InvalidInput, UsageError
from lorabatch.schemas.lines import LineError, RequestSpec, parse_line
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.schemas.tables import Job, Request
from lorabatch.store import broker, lifecycle
from lorabatch.store.context import Context
from lorabatch.store.db import transaction

INSERT_CHUNK = 2000
"""Rows per INSERT statement while creating a job."""
ENQUEUE_BATCH = 4096
"""References read from the database per round while enqueuing (a multiple of the message size)."""
MAX_PROBLEMS_SHOWN = 20


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
        _check_size(ctx, path)
        if idempotency_key and (existing := _job_for_key(ctx, idempotency_key)):
            return Submitted(existing.id, existing.total, created=False)
        broker.check_broker(ctx.celery)
        job_id = "job-" + uuid.uuid4().hex[:16]
        try:
            with transaction(ctx.sessions) as session:
                job = lifecycle.create_job(session, job_id=job_id, total=0, name=name or Path(display).name,
                                           priority=priority, idempotency_key=idempotency_key, source=display,
                                           schedule=schedule)
                total = _insert_valid_requests(session, job_id, path, ctx, default_adapter=adapter)
                job.total = job.n_queued = total
        except IntegrityError:
            existing = _job_for_key(ctx, idempotency_key) if idempotency_key else None
            if existing:  # another submit with the same key won the race
                return Submitted(existing.id, existing.total, created=False)
            raise
    messages = enqueue_job(ctx, job_id, priority=priority, chunk_size=broker.chunk_size_for(total))
    return Submitted(job_id, total, created=True, messages=messages)


def enqueue_job(ctx: Context, job_id: str, *, priority: int, chunk_size: int = broker.CHUNK_SIZE) -> int:
    """Send references to a committed job's requests, grouped by adapter, streamed from the database.
    Only after the commit: a worker must never receive a reference to a row it cannot see yet."""
    app = ctx.celery
    broker.mark_epoch(app)
    sent = 0
    with ctx.sessions() as session:
        stmt = (select(Request.adapter, Request.idx).where(Request.job_id == job_id)
                .order_by(Request.adapter, Request.idx).execution_options(yield_per=ENQUEUE_BATCH))
        for adapter, group in groupby(session.execute(stmt), key=lambda r: r[0]):
            idxs: list[int] = []
            for _, idx in group:
                idxs.append(idx)
                if len(idxs) >= ENQUEUE_BATCH:
                    sent += broker.enqueue(app, job_id, adapter, idxs, priority=priority, chunk_size=chunk_size)
                    idxs = []
            sent += broker.enqueue(app, job_id, adapter, idxs, priority=priority, chunk_size=chunk_size)
    return sent


def _check_size(ctx: Context, path: Path) -> None:
    limits = ctx.settings.limits
    size = path.stat().st_size
    if size == 0:
        raise InvalidInput(f"{path} is empty; give a file with one JSON request per line.")
    if size > limits.max_file_bytes:
        raise InvalidInput(
            f"{path} is {size} bytes, over the limit of {limits.max_file_bytes}; split it into smaller files "
            "or raise [limits] max_file_bytes."
        )


def _insert_valid_requests(session, job_id: str, path: Path, ctx: Context, *, default_adapter: str | None) -> int:
    """One pass over the file: insert requests while every line so far is valid; after the first
    problem keep reading only to report every bad line, then raise InvalidInput (the caller's
    transaction rolls back, so nothing is created). Returns the number of requests."""
    limits = ctx.settings.limits
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    too_long = PromptLengthCheck(ctx.settings)
    rows: list[dict] = []
    total = 0
    for line_no, spec in _parsed_lines(ctx, path, default_adapter=default_adapter):
        if isinstance(spec, str):
            problems.append((line_no, spec))
            continue
        if spec.custom_id in seen:
            problems.append((line_no, f"repeats custom_id {spec.custom_id!r}; give each line its own"))
        seen.add(spec.custom_id)
        if problem := too_long(spec):
            problems.append((line_no, problem))
        if problems:
            continue
        if total >= limits.max_lines:
            raise InvalidInput(f"{path} has more than {limits.max_lines} requests; split it or raise [limits] max_lines.")
        rows.append({"job_id": job_id, "idx": total, "custom_id": spec.custom_id, "adapter": spec.adapter,
                     "prompt": spec.prompt, "messages": spec.messages, "params": spec.params,
                     "state": "queued", "attempts": 0})
        total += 1
        if len(rows) >= INSERT_CHUNK:
            lifecycle.add_requests(session, rows)
            rows = []
    if problems:
        shown = "\n".join(f"  line {n}: {reason}" for n, reason in problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise InvalidInput(
            f"{path}: {len(problems)} invalid line(s); nothing was submitted. Fix them and submit again:\n{shown}{more}",
            problems,
        )
    if total == 0:
        raise InvalidInput(f"{path} has no requests, only blank lines; give one JSON request per line.")
    lifecycle.add_requests(session, rows)
    return total


def _parsed_lines(ctx: Context, path: Path, *, default_adapter: str | None) -> Iterator[tuple[int, RequestSpec | str]]:
    adapters = frozenset(ctx.settings.adapters)
    limits = ctx.settings.limits
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line_no, parse_line(raw, line_no=line_no, adapters=adapters, limits=limits, default_adapter=default_adapter)
            except LineError as e:
                yield line_no, str(e)


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
        path = Path(self.source)
        if not path.is_file():
            raise UsageError(f"input file {self.source} does not exist; give the path of a JSONL file, or - for standard input.")
        return path, str(path)

    def __exit__(self, *exc) -> None:
        if self.tmp:
            self.tmp.cleanup()


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    shutil.copyfileobj(src, dst, length=1 << 20)
