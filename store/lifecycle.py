"""Job and request state transitions. Nothing else changes a state column.

Every function takes the session explicitly and runs inside the caller's transaction, so a
transition and the job counters it moves commit together or not at all.

Exactly-once results rest on two rules:
- a request is claimed by one worker at a time: only a queued request, or a running one whose
  worker has stopped sending heartbeats, can be claimed;
- a result is recorded only by the worker that holds the claim. A worker that lost its claim
  (it was presumed dead, another took over) has its late result dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, literal, or_, select, update
from sqlalchemy.orm import Session

from lorabatch.schemas.errors import NotFound, UsageError
from lorabatch.schemas.states import JobState, RequestState
from lorabatch.schemas.tables import Job, Request, Worker, utcnow

Q, R, S, F, C = (RequestState.QUEUED, RequestState.RUNNING, RequestState.SUCCEEDED, RequestState.FAILED, RequestState.CANCELLED)


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for one request it ran."""

    idx: int
    output: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


# ---------------------------------------------------------------- jobs


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}; list jobs with `lorabatch jobs`.")
    return job


def create_job(session: Session, *, job_id: str, total: int, name: str | None = None, priority: int = 5,
               idempotency_key: str | None = None, source: str | None = None, schedule: str | None = None) -> Job:
    """A new job whose `total` requests are all queued (insert them with `add_requests`)."""
    job = Job(id=job_id, name=name, priority=priority, idempotency_key=idempotency_key, source=source,
              schedule=schedule, state=JobState.QUEUED.value, total=total, n_queued=total)
    session.add(job)
    session.flush()
    return job


def add_requests(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk-insert queued requests (dicts of Request columns)."""
    if rows:  # Core executemany: much faster than the ORM's bulk path for millions of rows
        session.execute(Request.__table__.insert(), list(rows))


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel what has not started; running requests finish and keep their results. Idempotent."""
    job = _lock_job(session, job_id)
    if JobState(job.state).is_final:
        return job
    n = session.execute(
        update(Request).where(Request.job_id == job_id, Request.state == Q.value)
        .values(state=C.value, finished_at=utcnow(), error="cancelled before it ran")
    ).rowcount
    job.n_queued -= n
    job.n_cancelled += n
    job.state = JobState.CANCELLING.value
    _settle(job)
    return job


# ---------------------------------------------------------------- workers


def heartbeat(session: Session, *, worker_id: str, hostname: str, pid: int, tokens_per_second: float | None = None) -> None:
    w = session.get(Worker, worker_id)
    if w is None:
        session.add(Worker(id=worker_id, hostname=hostname, pid=pid, tokens_per_second=tokens_per_second))
    else:
        w.heartbeat_at = utcnow()
        if tokens_per_second is not None:
            w.tokens_per_second = tokens_per_second


def forget_dead_workers(session: Session, *, host: str, alive: Callable[[int], bool]) -> list[str]:
    """Forget workers registered from `host` (see runner.host_label) whose process is gone, so their
    requests count as orphaned at once rather than when their lease runs out. Returns their ids."""
    dead = [w for w in session.execute(select(Worker).where(Worker.hostname == host)).scalars() if not alive(w.pid)]
    for w in dead:
        session.delete(w)
    return [w.id for w in dead]


def forget_worker(session: Session, worker_id: str) -> None:
    """A worker that stops cleanly hands back what it still holds and leaves."""
    rows = session.execute(
        select(Request).where(Request.worker_id == worker_id, Request.state == R.value).with_for_update()
    ).scalars().all()
    _requeue(session, rows)
    w = session.get(Worker, worker_id)
    if w is not None:
        session.delete(w)


def _live_workers(session: Session, lease: timedelta):
    """Workers whose heartbeat is recent. A claim by one of them is respected, even by itself: a
    duplicate message for requests this very worker is running must not run them a second time."""
    return select(Worker.id).where(Worker.heartbeat_at >= utcnow() - lease)


# ---------------------------------------------------------------- requests


@dataclass
class Claim:
    """Requests a worker now holds, and those it failed for dying too often."""

    requests: list[Request]
    gave_up: list[Request]


def claim_requests(session: Session, *, job_id: str, idxs: Iterable[int], worker_id: str,
                   lease: timedelta, max_attempts: int) -> Claim:
    """Claim the given requests of one job for `worker_id`.

    Claimable: queued, or running under a worker with no heartbeat within `lease` (it died).
    A request that already started `max_attempts` times (see `mark_started`) ends as failed
    instead: it keeps killing its worker. Requests in any other state are skipped: their
    message was a duplicate.
    """
    idxs = list(idxs)
    live = _live_workers(session, lease)
    rows = session.execute(
        select(Request)
        .where(
            Request.job_id == job_id,
            Request.idx.in_(idxs),
            or_(Request.state == Q.value,
                and_(Request.state == R.value, or_(Request.worker_id.is_(None), Request.worker_id.not_in(live)))),
        )
        .with_for_update()
    ).scalars().all()
    if not rows:
        return Claim([], [])
    job = _lock_job(session, job_id)
    now = utcnow()
    claimed, gave_up = [], []
    for row in rows:
        was_queued = row.state == Q.value
        if row.attempts >= max_attempts:
            row.state, row.finished_at, row.worker_id = F.value, now, None
            row.error = (f"its worker died {row.attempts} times while running it (killed, e.g. out of memory); "
                         "lower max_new_tokens or the batch size, or raise [worker] max_attempts")
            job.n_failed += 1
            gave_up.append(row)
        else:
            row.state, row.worker_id, row.claimed_at = R.value, worker_id, now
            job.n_running += 1
            claimed.append(row)
        if was_queued:
            job.n_queued -= 1
        else:
            job.n_running -= 1
    if claimed and job.state == JobState.QUEUED.value:
        job.state, job.started_at = JobState.RUNNING.value, now
    _settle(job)
    return Claim(claimed, gave_up)


def mark_started(session: Session, *, job_id: str, worker_id: str, idxs: Sequence[int]) -> None:
    """Count an attempt for requests the engine is about to run. Counted here, not at claim time,
    so requests that merely waited beside one that killed the worker are not charged for it."""
    session.execute(
        update(Request)
        .where(Request.job_id == job_id, Request.idx.in_(list(idxs)), Request.worker_id == worker_id,
               Request.state == R.value)
        .values(attempts=Request.attempts + 1)
    )


def record_outcomes(session: Session, *, job_id: str, worker_id: str, outcomes: Sequence[Outcome]) -> int:
    """Store results for requests this worker holds. Returns how many were recorded;
    results for requests it no longer holds are dropped (another worker took them over)."""
    by_idx = {o.idx: o for o in outcomes}
    rows = session.execute(
        select(Request)
        .where(Request.job_id == job_id, Request.idx.in_(list(by_idx)),
               Request.state == R.value, Request.worker_id == worker_id)
        .with_for_update()
    ).scalars().all()
    if not rows:
        return 0
    job = _lock_job(session, job_id)
    now = utcnow()
    for row in rows:
        o = by_idx[row.idx]
        row.state = (F if o.error else S).value
        row.output, row.finish_reason, row.error = o.output, o.finish_reason, o.error
        row.prompt_tokens, row.completion_tokens = o.prompt_tokens, o.completion_tokens
        row.finished_at = now
        job.n_running -= 1
        if o.error:
            job.n_failed += 1
        else:
            job.n_succeeded += 1
        job.prompt_tokens += o.prompt_tokens or 0
        job.completion_tokens += o.completion_tokens or 0
    _settle(job)
    return len(rows)


def release_requests(session: Session, *, job_id: str, worker_id: str, idxs: Iterable[int]) -> list[Request]:
    """Hand requests this worker holds back to the queue (warm shutdown)."""
    rows = session.execute(
        select(Request)
        .where(Request.job_id == job_id, Request.idx.in_(list(idxs)),
               Request.state == R.value, Request.worker_id == worker_id)
        .with_for_update()
    ).scalars().all()
    return _requeue(session, rows)


def orphaned_requests(session: Session, *, lease: timedelta, alive: str | None = None) -> list[Request]:
    """Requests running under workers that stopped sending heartbeats: put back to queued and returned.
    `alive` is the caller's own worker id: a worker never presumes itself dead, however late its heartbeat."""
    live = _live_workers(session, lease)
    if alive:
        live = live.union(select(literal(alive)))
    rows = session.execute(
        select(Request)
        .where(Request.state == R.value, or_(Request.worker_id.is_(None), Request.worker_id.not_in(live)))
        .with_for_update()
    ).scalars().all()
    return _requeue(session, rows)


def queued_requests(session: Session) -> list[tuple[str, int, str, int]]:
    """(job_id, idx, adapter, job priority) of every queued request of a job still open."""
    stmt = (
        select(Request.job_id, Request.idx, Request.adapter, Job.priority)
        .join(Job, Job.id == Request.job_id)
        .where(Request.state == Q.value, Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]))
        .order_by(Request.job_id, Request.idx)
    )
    return [tuple(r) for r in session.execute(stmt)]


def _requeue(session: Session, rows: Sequence[Request]) -> list[Request]:
    jobs: dict[str, Job] = {}
    for row in rows:
        job = jobs.get(row.job_id) or jobs.setdefault(row.job_id, _lock_job(session, row.job_id))
        row.state, row.worker_id, row.claimed_at = Q.value, None, None
        job.n_running -= 1
        job.n_queued += 1
    for job in jobs.values():
        if job.state == JobState.CANCELLING.value:
            # Nothing of a cancelling job may start again: what was handed back is cancelled now.
            cancel_job(session, job.id)
    return [r for r in rows if r.state == Q.value]


def _lock_job(session: Session, job_id: str) -> Job:
    job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
    if job is None:
        raise NotFound(f"no job with id {job_id!r}; list jobs with `lorabatch jobs`.")
    return job


def _settle(job: Job) -> None:
    """Move a job to its final state once none of its requests is queued or running."""
    if job.n_queued or job.n_running or JobState(job.state).is_final:
        return
    job.state = (JobState.CANCELLED if job.state == JobState.CANCELLING.value else JobState.COMPLETED).value
    job.finished_at = utcnow()


def check_priority(priority: int) -> int:
    if not 0 <= priority <= 9:
        raise UsageError(f"--priority {priority} is out of range; use 0 (lowest) to 9 (highest).")
    return priority
