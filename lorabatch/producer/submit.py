"""Submitting a file: validate every line, then create the job and enqueue it.

Two passes over the file keep memory bounded whatever its size: the first validates and
collects problems (nothing is created if there is any), the second inserts the requests in
chunks inside one transaction. Only then are references enqueued, grouped by adapter.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from lorabatch import broker, lifecycle
from lorabatch.db import transaction
from lorabatch.errors import InvalidInput, UsageError
from lorabatch.producer.context import Context
from lorabatch.schemas.lines import LineError, RequestSpec, parse_line
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.schemas.tables import Job

INSERT_CHUNK = 2000
"""Rows per INSERT statement while creating a job."""
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
        total = validate_file(ctx, path, default_adapter=adapter)
        if idempotency_key:
            existing = _job_for_key(ctx, idempotency_key)
            if existing:
                return Submitted(existing.id, existing.total, created=False)
        app = ctx.celery
        broker.check_broker(app)
        job_id = "job-" + uuid.uuid4().hex[:16]
        try:
            with transaction(ctx.sessions) as session:
                lifecycle.create_job(session, job_id=job_id, total=total, name=name or Path(display).name,
                                     priority=priority, idempotency_key=idempotency_key, source=display,
                                     schedule=schedule)
                by_adapter = _insert_requests(session, job_id, path, ctx, default_adapter=adapter)
        except IntegrityError:
            existing = _job_for_key(ctx, idempotency_key) if idempotency_key else None
            if existing:  # another submit with the same key won the race
                return Submitted(existing.id, existing.total, created=False)
            raise
    messages = enqueue_job(ctx, job_id, by_adapter, priority=priority)
    return Submitted(job_id, total, created=True, messages=messages)


def enqueue_job(ctx: Context, job_id: str, by_adapter: dict[str, list[int]], *, priority: int) -> int:
    app = ctx.celery
    broker.mark_epoch(app)
    return sum(broker.enqueue(app, job_id, name, idxs, priority=priority) for name, idxs in by_adapter.items())


def validate_file(ctx: Context, path: Path, *, default_adapter: str | None) -> int:
    """Check every line; raise InvalidInput listing each bad line. Returns the number of requests."""
    limits = ctx.settings.limits
    size = path.stat().st_size
    if size == 0:
        raise InvalidInput(f"{path} is empty; give a file with one JSON request per line.")
    if size > limits.max_file_bytes:
        raise InvalidInput(
            f"{path} is {size} bytes, over the limit of {limits.max_file_bytes}; split it into smaller files "
            "or raise [limits] max_file_bytes."
        )
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    total = 0
    for line_no, spec_or_error in _parsed_lines(ctx, path, default_adapter=default_adapter):
        if isinstance(spec_or_error, str):
            problems.append((line_no, spec_or_error))
            continue
        total += 1
        if spec_or_error.custom_id in seen:
            problems.append((line_no, f"repeats custom_id {spec_or_error.custom_id!r}; give each line its own"))
        seen.add(spec_or_error.custom_id)
    if not problems and total == 0:
        raise InvalidInput(f"{path} has no requests, only blank lines; give one JSON request per line.")
    if total > limits.max_lines:
        raise InvalidInput(f"{path} has {total} requests, over the limit of {limits.max_lines}; split it or raise [limits] max_lines.")
    if problems:
        shown = "\n".join(f"  line {n}: {reason}" for n, reason in problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise InvalidInput(
            f"{path}: {len(problems)} invalid line(s); nothing was submitted. Fix them and submit again:\n{shown}{more}",
            problems,
        )
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


def _insert_requests(session, job_id: str, path: Path, ctx: Context, *, default_adapter: str | None) -> dict[str, list[int]]:
    by_adapter: dict[str, list[int]] = defaultdict(list)
    rows: list[dict] = []
    idx = 0
    for _, spec in _parsed_lines(ctx, path, default_adapter=default_adapter):
        assert isinstance(spec, RequestSpec), "validated in the first pass"
        rows.append({"job_id": job_id, "idx": idx, "custom_id": spec.custom_id, "adapter": spec.adapter,
                     "prompt": spec.prompt, "messages": spec.messages, "params": spec.params,
                     "state": "queued", "attempts": 0})
        by_adapter[spec.adapter].append(idx)
        idx += 1
        if len(rows) >= INSERT_CHUNK:
            lifecycle.add_requests(session, rows)
            rows = []
    lifecycle.add_requests(session, rows)
    return by_adapter


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
