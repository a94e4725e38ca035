"""Job and request state transitions. Nothing else changes a state column.

Every function takes the session explicitly and runs inside the caller's transaction, so a
transition, the job counters it moves and the messages it owes (the outbox) commit together or
not at all.

Exactly-once results rest on three rules:
- a request is claimed by one worker at a time, at the moment its engine admits it into a running
  batch: only a queued request of an open job of the worker's own deployment can be claimed;
- a result is recorded only by the worker that holds the claim; a worker that lost its claim (it
  was presumed dead and the request was put back) has its late result dropped;
- a request put back in the queue (handed back, or found under a dead worker) owes a message: the
  outbox row is written in the same transaction (see schemas.tables.Outbox).

One lock order everywhere: job rows first, in id order, then their requests in (job_id, idx) order.
On PostgreSQL two transactions that follow it cannot deadlock; SQLite takes one write lock anyway.
Leases compare times read from the database's clock, never two machines' clocks.

This module is over 300 lines on purpose: the design asks for one module that owns every job and
request transition, so that the lock order is written, and can be checked, in one place. The
outbox (store.outbox) and the clock (store.clock) live apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.orm import Session

from lorabatch.schemas.errors import NotFound, UsageError
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.schemas.states import JobState, RequestState
from lorabatch.schemas.tables import Job, Request, Worker, utcnow
from lorabatch.store.clock import db_now
from lorabatch.store.outbox import OPEN, SUSPECT_ALONE, SUSPECT_GROUP, owe_messages

Q, R, S, F, C = (RequestState.QUEUED, RequestState.RUNNING, RequestState.SUCCEEDED, RequestState.FAILED,
                 RequestState.CANCELLED)


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for one request it ran."""

    job_id: str
    idx: int
    output: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cancelled: bool = False
    """Stopped because its job was cancelled; `output` holds what was generated so far."""
    base_model: str | None = None
    adapter_sha256: str | None = None


# ---------------------------------------------------------------- jobs


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}; list jobs with `lorabatch jobs`.")
    return job


def create_job(session: Session, *, job_id: str, name: str | None = None, priority: int = 5,
               idempotency_key: str | None = None, source: str | None = None, schedule: str | None = None,
               deployment: str | None = None, content_hash: str | None = None,
               adapter_pins: Mapping[str, str | None] | None = None) -> Job:
    """A new job, hidden from workers until `open_job`: total 0 and no message owed, while its
    requests are inserted in short transactions (`add_requests`)."""
    job = Job(id=job_id, name=name, priority=priority, idempotency_key=idempotency_key, source=source,
              schedule=schedule, deployment=deployment, content_hash=content_hash,
              adapter_pins=dict(adapter_pins) if adapter_pins is not None else None, state=JobState.QUEUED.value,
              total=0, n_queued=0)
    session.add(job)
    session.flush()
    return job


def open_job(session: Session, job_id: str, total: int, *, adapter_pins: Mapping[str, str | None] | None = None
             ) -> None:
    """Every request is in: the job's `total` requests are queued and their messages owed (the
    caller publishes them after the commit; see store.outbox). `adapter_pins`: the weights (sha256)
    each adapter it names runs on, None where the first claim pins it."""
    job = _lock_jobs(session, [job_id])[job_id]
    job.total = job.n_queued = total
    if job.state == JobState.CANCELLING.value:  # cancelled while its requests were inserted: none may run
        cancel_job(session, job_id)
        return
    if adapter_pins is not None:
        job.adapter_pins = dict(adapter_pins)
    owe_messages(session, job_id, None)


def delete_job(session: Session, job_id: str, *, only_hidden: bool = False) -> bool:
    """A job and its requests, gone (a submit that failed before `open_job`). `only_hidden`: only if
    it is still hidden (total 0), so that a submit that opened it meanwhile keeps it. Returns whether
    it was deleted."""
    stmt = delete(Job).where(Job.id == job_id)
    if only_hidden:
        stmt = stmt.where(Job.total == 0)
    return bool(session.execute(stmt).rowcount)


def add_requests(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk-insert queued requests (dicts of Request columns)."""
    if rows:  # Core executemany: much faster than the ORM's bulk path for millions of rows
        session.execute(Request.__table__.insert(), list(rows))


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel everything not generating right now: queued requests, including those in messages a
    worker holds (they are not claimed yet). Requests generating are stopped by their worker at its
    next step (it polls for cancelled jobs) and recorded as cancelled. Idempotent."""
    job = _lock_jobs(session, [job_id])[job_id]
    if JobState(job.state).is_final:
        return job
    if job.total == 0:  # its submit is still inserting (counters not set yet): open_job cancels them all
        job.state = JobState.CANCELLING.value
        return job
    ids = session.execute(
        select(Request.idx).where(Request.job_id == job_id, Request.state == Q.value)
        .order_by(Request.idx).with_for_update()
    ).scalars().all()
    if ids:
        session.execute(update(Request).where(Request.job_id == job_id, Request.state == Q.value)
                        .values(state=C.value, finished_at=utcnow(), error="cancelled before it ran"))
    job.n_queued -= len(ids)
    job.n_cancelled += len(ids)
    job.state = JobState.CANCELLING.value
    _settle(job)
    return job


def retry_failed(session: Session, job_id: str) -> int:
    """A completed job's failed requests go back to the queue as a new attempt (their results and
    attempt counts cleared; succeeded and cancelled ones stay), the job reopens, and their messages
    are owed. Returns how many. A job still open or cancelled is refused."""
    job = _lock_jobs(session, [job_id])[job_id]
    if job.state != JobState.COMPLETED.value:
        hint = " (wait for it to end: lorabatch status JOB --watch)" if not JobState(job.state).is_final else ""
        raise UsageError(f"job {job.id} is {job.state}; only a completed job's failed requests can be retried{hint}.")
    idxs = session.execute(select(Request.idx).where(Request.job_id == job_id, Request.state == F.value)
                           .order_by(Request.idx).with_for_update()).scalars().all()
    if not idxs:
        return 0
    session.execute(update(Request).where(Request.job_id == job_id, Request.state == F.value)
                    .values(state=Q.value, output=None, error=None, finish_reason=None, prompt_tokens=None,
                            completion_tokens=None, worker_id=None, claimed_at=None, finished_at=None, attempts=0))
    job.n_failed -= len(idxs)
    job.n_queued += len(idxs)
    job.state, job.finished_at = JobState.RUNNING.value, None
    owe_messages(session, job_id, None)
    return len(idxs)


def forget_abandoned_submits(session: Session, *, older_than: timedelta) -> int:
    """Delete jobs whose submit died while inserting their requests (total still 0; no message was
    ever owed for them), with those requests. Returns how many."""
    ids = session.execute(select(Job.id).where(Job.total == 0, Job.created_at < utcnow() - older_than)).scalars().all()
    if ids:
        session.execute(delete(Job).where(Job.id.in_(ids)))
    return len(ids)


def cancelling_jobs(session: Session, job_ids: Iterable[str]) -> set[str]:
    """Which of these jobs are being (or were) cancelled: their running requests should stop."""
    ids = list(set(job_ids))
    if not ids:
        return set()
    states = (JobState.CANCELLING.value, JobState.CANCELLED.value)
    return set(session.execute(select(Job.id).where(Job.id.in_(ids), Job.state.in_(states))).scalars())


# ---------------------------------------------------------------- workers


def heartbeat(session: Session, *, worker_id: str, hostname: str, pid: int, deployment: str | None = None,
              running: int = 0, held: int = 0, tokens_per_second: float | None = None, base: str | None = None,
              adapters: Mapping[str, str | None] | None = None) -> None:
    """The worker is alive; with what it serves (base model key and identity, adapter name -> sha256),
    which producers and `status` read."""
    now = db_now(session)
    w = session.get(Worker, worker_id)
    if w is None:
        w = Worker(id=worker_id, hostname=hostname, pid=pid, started_at=now)
        session.add(w)
    w.heartbeat_at, w.deployment, w.running, w.held = now, deployment, running, held
    if tokens_per_second is not None:
        w.tokens_per_second = tokens_per_second
    if base is not None:
        w.base = base
    if adapters is not None and w.adapters != dict(adapters):
        w.adapters = dict(adapters)


def live_workers(session: Session, *, lease: timedelta, deployment: str | None = None) -> list[Worker]:
    """Workers whose last heartbeat (on the database's clock) is within `lease`."""
    stmt = select(Worker).where(Worker.heartbeat_at >= db_now(session) - lease)
    if deployment is not None:
        stmt = stmt.where(Worker.deployment == deployment)
    return list(session.execute(stmt.order_by(Worker.started_at)).scalars())


def forget_dead_workers(session: Session, *, host: str, alive: Callable[[int], bool]) -> list[str]:
    """Forget workers registered from `host` (see worker.upkeep.host_label) whose process is gone, so
    their requests count as orphaned at once rather than when their lease runs out. Returns their ids."""
    dead = [w for w in session.execute(select(Worker).where(Worker.hostname == host)).scalars() if not alive(w.pid)]
    for w in dead:
        session.delete(w)
    return [w.id for w in dead]


def forget_worker(session: Session, worker_id: str) -> int:
    """A worker that stops cleanly hands back what it still runs (with the messages owed) and leaves."""
    keys = session.execute(
        select(Request.job_id, Request.idx).where(Request.worker_id == worker_id, Request.state == R.value)
    ).all()
    n = release_requests(session, worker_id=worker_id, keys=[tuple(k) for k in keys])
    w = session.get(Worker, worker_id)
    if w is not None:
        session.delete(w)
    return n


# ---------------------------------------------------------------- claims and results


@dataclass
class Claim:
    """Requests a worker now holds, and those it failed for killing their workers too often."""

    requests: list[Request]
    gave_up: list[Request]


def claim_requests(session: Session, *, refs: Mapping[str, Iterable[int]], worker_id: str,
                   deployment: str | None, max_attempts: int, suspects: bool = False,
                   serves: Mapping[str, str | None] | None = None, claim_id: str | None = None) -> Claim:
    """Claim, for `worker_id`, those of the referenced requests ({job_id: idxs}) that are queued in an
    open job of base model `deployment` (a job with none yet is pinned to it here); the engine admits
    them right after. Each claim counts an attempt. A request that already started `max_attempts` times
    (its workers kept dying) ends as failed instead. Anything else is skipped: a duplicate message, a
    cancelled request; another base model's job (it came through the common queue) owes its messages
    again, to its own queue.

    `serves` (adapter name -> sha256 of the weights this worker serves; None: no check): a request
    naming an adapter runs only where the job's pin for it matches (an unpinned adapter is pinned to
    this worker's weights here). One this worker cannot run is parked (Job.parked): it stays queued
    with no message until a worker serving the pinned weights publishes it again (unpark_adapters) or
    `lorabatch retarget` moves it; never acknowledged and forgotten.

    `claim_id`: a token for this claim. Claiming is idempotent: if the COMMIT landed but the
    connection broke before the answer (the caller retries), the retry returns the rows this worker
    already holds under the same token instead of nothing.

    `suspects`: the references came in a suspect message (their worker died running them; they run
    apart from other work). Without it, requests that started before are skipped: an ordinary message
    that names one (the dead worker's message, redelivered) must not put it beside fresh work; the
    suspect message owed when it was put back runs it."""
    wanted = {job_id: sorted(set(idxs)) for job_id, idxs in refs.items() if idxs}
    if not wanted:
        return Claim([], [])
    jobs = _lock_jobs(session, wanted, missing_ok=True)
    open_jobs, elsewhere = set(), []
    for job_id in sorted(jobs):
        job = jobs[job_id]
        if job.state not in OPEN:
            continue
        if job.deployment is None and deployment is not None:
            job.deployment = deployment  # submitted where its base model was unknown (or upgraded): pinned now
        if job.deployment == deployment:
            open_jobs.add(job_id)
        else:
            elsewhere.append(job_id)
    rows = _locked_requests(session, {j: wanted[j] for j in sorted(jobs)}, state=(Q, R) if claim_id else Q)
    already = [r for r in rows if claim_id and r.state == R.value and r.worker_id == worker_id
               and r.claim_id == claim_id]
    rows = [r for r in rows if r.state == Q.value and r.job_id in open_jobs]
    if not suspects:
        rows = [r for r in rows if r.attempts == 0]
    if serves is not None:
        rows = _servable(jobs, rows, serves)
    for job_id in elsewhere:  # publishing skips what is no longer queued
        owe_messages(session, job_id, wanted[job_id])
    now = utcnow()
    claimed, gave_up = list(already), []
    for row in rows:
        job = jobs[row.job_id]
        job.n_queued -= 1
        if row.attempts >= max_attempts:
            row.state, row.finished_at, row.worker_id = F.value, now, None
            row.error = (f"its worker died {row.attempts} times while running it (killed, e.g. out of memory); "
                         "lower max_new_tokens or the batch size, or raise [worker] max_attempts")
            job.n_failed += 1
            gave_up.append(row)
        else:
            row.state, row.worker_id, row.claimed_at, row.attempts = R.value, worker_id, now, row.attempts + 1
            row.claim_id = claim_id
            job.n_running += 1
            claimed.append(row)
            if job.state == JobState.QUEUED.value:
                job.state, job.started_at = JobState.RUNNING.value, now
    for job in jobs.values():
        _settle(job)
    return Claim(claimed, gave_up)


def _servable(jobs: Mapping[str, Job], rows: Sequence[Request], serves: Mapping[str, str | None]) -> list[Request]:
    """The rows this worker may run: the base model's, and those whose adapter it serves with the weights
    the job is pinned to (an adapter not pinned yet is pinned to this worker's weights). The others'
    adapters are parked on their job."""
    ok = []
    for row in rows:
        if row.adapter == BASE_ADAPTER:
            ok.append(row)
            continue
        job, have = jobs[row.job_id], serves.get(row.adapter)
        pins = job.adapter_pins or {}
        if have is not None and pins.get(row.adapter) is None:
            job.adapter_pins = {**pins, row.adapter: have}  # a new dict: the JSON column sees the change
        if have is not None and (job.adapter_pins or {}).get(row.adapter) == have:
            ok.append(row)
        else:
            _park(job, row.adapter)
    return ok


def _park(job: Job, adapter: str) -> None:
    if adapter not in (job.parked or []):
        job.parked = sorted({*(job.parked or []), adapter})


def unpark_adapters(session: Session, *, deployment: str, serves: Mapping[str, str | None]) -> int:
    """Publish again the parked requests this worker can run: of open jobs of base model `deployment`,
    those of adapters it serves with the pinned weights (messages owed in the outbox, published after
    the commit). Every worker's reconcile round calls it, so a parked request waits only until a
    worker that can run it is live. Returns how many adapters were unparked."""
    candidates = [job_id for job_id, parked in session.execute(select(Job.id, Job.parked).where(
        Job.state.in_(OPEN), Job.deployment == deployment, Job.parked.is_not(None))) if parked]
    if not candidates:  # no job row locked unless one has something parked (claims lock them too)
        return 0
    n = 0
    for job in _lock_jobs(session, candidates, missing_ok=True).values():
        if job.state not in OPEN or not job.parked:
            continue
        pins = job.adapter_pins or {}
        ready = [a for a in job.parked if serves.get(a) is not None and pins.get(a) in (None, serves[a])]
        if ready:
            job.parked = sorted(set(job.parked) - set(ready))
            n += len(ready)
            _owe_adapters(session, job.id, ready)
    return n


def _owe_adapters(session: Session, job_id: str, adapters: Iterable[str]) -> None:
    idxs = session.execute(select(Request.idx).where(Request.job_id == job_id, Request.state == Q.value,
                                                     Request.adapter.in_(list(adapters)))
                           .order_by(Request.idx)).scalars().all()
    if idxs:
        owe_messages(session, job_id, list(idxs))


@dataclass(frozen=True)
class Retarget:
    adapter: str
    was: str | None
    now: str
    requests: int
    """Its requests not yet finished (queued or running), which run on the new weights from now on."""


def retarget_job(session: Session, job_id: str, targets: Mapping[str, str]) -> list[Retarget]:
    """Move a job's unfinished requests of each adapter in `targets` (name -> sha256 of the current
    weights) onto those weights: the pin changes, the change is recorded on the job (what it was, what
    it is now, when), the adapter is unparked and its queued requests' messages are owed. Results
    already recorded keep the sha256 that produced them; a request still running on the old weights
    is refused when it reports (record_outcomes) and runs again. Adapters already pinned there are
    left alone. A job that has ended is refused (UsageError)."""
    job = _lock_jobs(session, [job_id])[job_id]
    if JobState(job.state).is_final or job.state == JobState.CANCELLING.value:
        raise UsageError(f"job {job.id} is {job.state}: nothing left to move; a completed job's failed requests "
                         f"run again with: lorabatch retry {job.id}")
    pins, now = dict(job.adapter_pins or {}), utcnow()
    moved = []
    for adapter, sha in sorted(targets.items()):
        if pins.get(adapter) == sha:
            continue
        n = session.scalar(select(func.count()).select_from(Request).where(
            Request.job_id == job_id, Request.adapter == adapter, Request.state.in_((Q.value, R.value))))
        moved.append(Retarget(adapter, pins.get(adapter), sha, n or 0))
        pins[adapter] = sha
    if not moved:
        return []
    job.adapter_pins = pins
    job.retargets = [*(job.retargets or []), *({"adapter": m.adapter, "from": m.was, "to": m.now,
                                                "at": now.isoformat() + "Z", "requests": m.requests} for m in moved)]
    job.parked = sorted(set(job.parked or []) - {m.adapter for m in moved})
    _owe_adapters(session, job_id, [m.adapter for m in moved])
    return moved


def adapters_named(session: Session, job_id: str) -> list[str]:
    """The adapter names a job's unfinished requests use (for jobs that carry no pins: upgraded ones)."""
    return list(session.execute(select(Request.adapter).where(
        Request.job_id == job_id, Request.state.in_((Q.value, R.value))).distinct()).scalars())


def record_outcomes(session: Session, *, worker_id: str, outcomes: Sequence[Outcome]) -> int:
    """Store results for requests this worker holds. Returns how many were recorded; results for
    requests it no longer holds are dropped (it was presumed dead and another worker took over)."""
    by_key = {(o.job_id, o.idx): o for o in outcomes}
    if not by_key:
        return 0
    wanted = _by_job(by_key)
    jobs = _lock_jobs(session, wanted, missing_ok=True)
    rows = _locked_requests(session, {j: wanted[j] for j in sorted(jobs)}, state=R, worker_id=worker_id)
    rows, stale = _on_pinned_weights(jobs, rows, by_key)
    if stale:  # ran on other weights than its job is pinned to: never recorded as if it had not
        for row in stale:
            row.attempts = max(0, row.attempts - 1)
        _requeue(session, jobs, stale, suspect=0)
    now = utcnow()
    for row in rows:
        o, job = by_key[(row.job_id, row.idx)], jobs[row.job_id]
        error, output = o.error, o.output  # any text, NUL included: the column stores it exactly (schemas.exact_text)
        state = C if o.cancelled else F if error else S
        row.state, row.output, row.finish_reason, row.error = state.value, output, o.finish_reason, error
        row.prompt_tokens, row.completion_tokens, row.finished_at = o.prompt_tokens, o.completion_tokens, now
        row.base_model, row.adapter_sha256 = o.base_model, o.adapter_sha256
        job.n_running -= 1
        setattr(job, f"n_{state.value}", getattr(job, f"n_{state.value}") + 1)
        job.prompt_tokens += o.prompt_tokens or 0
        job.completion_tokens += o.completion_tokens or 0
    for job in jobs.values():
        _settle(job)
    return len(rows)


def _on_pinned_weights(jobs: Mapping[str, Job], rows: list[Request], by_key: Mapping[tuple[str, int], Outcome]
                       ) -> tuple[list[Request], list[Request]]:
    """Split rows into those whose outcome names the adapter weights their job is pinned to (or names
    none: a failure before any weights loaded, the base model), and those that ran on other weights
    (the file was replaced between the claim and the load). The latter go back to the queue, parked."""
    ok, stale = [], []
    for row in rows:
        sha = by_key[(row.job_id, row.idx)].adapter_sha256
        pin = (jobs[row.job_id].adapter_pins or {}).get(row.adapter)
        if sha is not None and pin is not None and sha != pin and row.adapter != BASE_ADAPTER:
            stale.append(row)
            _park(jobs[row.job_id], row.adapter)
        else:
            ok.append(row)
    return ok, stale


def release_requests(session: Session, *, worker_id: str, keys: Iterable[tuple[str, int]],
                     uncharge: bool = True) -> int:
    """Hand requests this worker holds back to the queue, with the messages owed (warm shutdown, an
    engine failure, preemption). `uncharge`: the attempt does not count (the request did no harm)."""
    wanted = _by_job(keys)
    if not wanted:
        return 0
    jobs = _lock_jobs(session, wanted, missing_ok=True)
    rows = _locked_requests(session, {j: wanted[j] for j in sorted(jobs)}, state=R, worker_id=worker_id)
    if uncharge:
        for row in rows:
            row.attempts = max(0, row.attempts - 1)
    return len(_requeue(session, jobs, rows, suspect=0))


def release_after_error(session: Session, *, worker_id: str, keys: Iterable[tuple[str, int]], error: str,
                        max_attempts: int) -> tuple[int, int]:
    """Requests this worker was running when its engine raised (a Python exception, not out of
    memory): any of them may be the cause, so the attempt counts and they go back as suspects, apart
    from other work: as a group, then each alone on its last attempt (as for a worker that died). One
    that raised running alone on its last attempt fails with the error; the others never fail for
    their neighbour (their attempts stop one short, so that they run alone next). Returns (requeued,
    failed)."""
    wanted = _by_job(keys)
    if not wanted:
        return 0, 0
    jobs = _lock_jobs(session, wanted, missing_ok=True)
    rows = _locked_requests(session, {j: wanted[j] for j in sorted(jobs)}, state=R, worker_id=worker_id)
    if len(rows) == 1 and rows[0].attempts >= max_attempts:
        row, job = rows[0], jobs[rows[0].job_id]
        row.state, row.finished_at, row.worker_id = F.value, utcnow(), None
        row.error = (f"the engine raised on this request {row.attempts} times (alone the last time): "
                     f"{error[:500]}")
        job.n_running -= 1
        job.n_failed += 1
        _settle(job)
        return 0, 1
    for row in rows:
        row.attempts = min(row.attempts, max_attempts - 1)
    last_try = [r for r in rows if r.attempts >= max_attempts - 1]
    group = [r for r in rows if r.attempts < max_attempts - 1]
    return len(_requeue(session, jobs, group, suspect=SUSPECT_GROUP)) + len(
        _requeue(session, jobs, last_try, suspect=SUSPECT_ALONE)), 0


def orphaned_requests(session: Session, *, lease: timedelta, max_attempts: int, alive: str | None = None) -> int:
    """Put back the requests running under workers that stopped sending heartbeats, with their
    messages (marked as suspects: one of them may be what killed the worker). `alive` is the caller's
    own worker id: a worker never presumes itself dead, however late its heartbeat. Returns how many."""
    live = select(Worker.id).where(Worker.heartbeat_at >= db_now(session) - lease)
    orphan = (Request.state == R.value) & (Request.worker_id.is_(None) | Request.worker_id.not_in(live))
    if alive:
        orphan &= Request.worker_id.is_distinct_from(alive)
    keys = session.execute(select(Request.job_id, Request.idx).where(orphan)).all()
    if not keys:
        return 0
    wanted = _by_job(keys)
    jobs = _lock_jobs(session, wanted, missing_ok=True)
    # Liveness again, now that the rows are locked: between the first read and the locks, another
    # reconcile may have put a request back and a live worker claimed it (PostgreSQL reads no locks).
    live_ids = set(session.execute(live).scalars())
    rows = [r for r in _locked_requests(session, {j: wanted[j] for j in sorted(jobs)}, state=R)
            if r.worker_id not in live_ids and (alive is None or r.worker_id != alive)]
    last_try = [r for r in rows if r.attempts >= max_attempts - 1]
    group = [r for r in rows if r.attempts < max_attempts - 1]
    return len(_requeue(session, jobs, group, suspect=SUSPECT_GROUP)) + len(
        _requeue(session, jobs, last_try, suspect=SUSPECT_ALONE))


def count_rows(session: Session, job_id: str) -> dict[str, int]:
    """Requests per state counted from the rows (the invariant check compares it with the counters)."""
    rows = session.execute(select(Request.state, func.count()).where(Request.job_id == job_id).group_by(Request.state))
    return {state: n for state, n in rows}


# ---------------------------------------------------------------- helpers


def _requeue(session: Session, jobs: dict[str, Job], rows: Sequence[Request], *, suspect: int) -> list[Request]:
    by_job: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        job = jobs[row.job_id]
        row.state, row.worker_id, row.claimed_at = Q.value, None, None
        job.n_running -= 1
        job.n_queued += 1
        by_job[row.job_id].append(row.idx)
    for job_id, idxs in by_job.items():
        if jobs[job_id].state == JobState.CANCELLING.value:
            cancel_job(session, job_id)  # nothing of a cancelling job may start again
        else:
            owe_messages(session, job_id, idxs, suspect=suspect)
    return [r for r in rows if r.state == Q.value]


def _by_job(keys: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """(job_id, idx) pairs -> {job_id: idxs}."""
    wanted: dict[str, list[int]] = defaultdict(list)
    for job_id, idx in keys:
        wanted[job_id].append(idx)
    return wanted


def _lock_jobs(session: Session, job_ids: Iterable[str], *, missing_ok: bool = False) -> dict[str, Job]:
    """Lock job rows in id order (the first half of the lock order)."""
    ids = sorted(set(job_ids))
    jobs = {j.id: j for j in session.execute(select(Job).where(Job.id.in_(ids)).order_by(Job.id).with_for_update()).scalars()}
    if not missing_ok and len(jobs) < len(ids):
        missing = next(i for i in ids if i not in jobs)
        raise NotFound(f"no job with id {missing!r}; list jobs with `lorabatch jobs`.")
    return jobs


def _locked_requests(session: Session, wanted: Mapping[str, list[int]], *,
                     state: RequestState | tuple[RequestState, ...], worker_id: str | None = None) -> list[Request]:
    """Lock the wanted requests that are in `state` (or one of several; and held by `worker_id`), in
    (job_id, idx) order."""
    states = [st.value for st in (state if isinstance(state, tuple) else (state,))]
    keys = [(job_id, idx) for job_id in sorted(wanted) for idx in wanted[job_id]]
    if not keys:
        return []
    rows: list[Request] = []
    for start in range(0, len(keys), 500):  # bounded IN lists
        part = keys[start : start + 500]
        stmt = select(Request).where(tuple_(Request.job_id, Request.idx).in_(part), Request.state.in_(states))
        if worker_id is not None:
            stmt = stmt.where(Request.worker_id == worker_id)
        rows += session.execute(stmt.order_by(Request.job_id, Request.idx).with_for_update()).scalars().all()
    return rows


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
