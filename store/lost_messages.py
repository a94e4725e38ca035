"""Replacing messages lost while Redis stays up: a queued request with no message in flight.

Redis can lose a message without restarting: a queue key deleted, a key evicted (a shared Redis
without `noeviction`), a task acknowledged on an exception; and a SIGKILLed worker's delivered
messages wait out the visibility timeout (300 s by default). Reset detection (store.reconcile) sees
none of these. So every reconcile round, one worker at a time (a Redis lock, SWEEP_KEY) compares the
queued requests of open jobs with what is in flight (store.inflight) and owed (the outbox); the
requests missing from both twice, CONFIRM_SECONDS apart (a message between a queue list and the
unacked hash, or published between the two reads, shows up the second time), get new messages.

Bound: a request waits without a message at most about reconcile_seconds (the next sweep) +
HELD_TTL_BEATS x heartbeat_seconds (a dead worker's report expires) + CONFIRM_SECONDS + the time to
publish (3 s allowed): 15 + 15 + 2 + 3 = 35 s with the defaults (`bound_seconds`; README: "The
queue of record").

Skipped on purpose: jobs not open or still hidden (total 0), requests of parked adapters (they wait
without a message until a worker that serves their weights publishes them: lifecycle.unpark_adapters).

Failure windows: dying between owing (outbox row committed) and publishing leaves the outbox row,
which a later round publishes; a message published twice is harmless (one claim wins).
"""

from __future__ import annotations

import time
from collections import defaultdict

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.schemas.states import RequestState
from lorabatch.schemas.tables import Job, Outbox, Request
from lorabatch.store import broker, inflight, outbox
from lorabatch.store.db import transaction
from lorabatch.store.reconcile import publish_owed

SWEEP_KEY = "lorabatch:sweep"
CONFIRM_SECONDS = 2.0
WINDOW = 65536
"""The sweep reads a job's queued requests this many idx at a time, each window in its own short
transaction (SQLite: each holds the write lock), as runs of consecutive idx computed in the
database: one row per run, not per request (a fresh 1M-request job is one row)."""


def bound_seconds(*, reconcile_seconds: float, heartbeat_seconds: float) -> float:
    """How long a queued request may go without a message in flight before it gets one (about)."""
    return reconcile_seconds + inflight.held_ttl(heartbeat_seconds) + CONFIRM_SECONDS + 3.0


def replace_lost_messages(sessions: sessionmaker[Session], app: Celery, *, worker_id: str, reconcile_seconds: float,
                          heartbeat_seconds: float) -> int:
    """One sweep, unless another worker's is under way. Returns how many requests got new messages."""
    lock_ms = int(max(reconcile_seconds, CONFIRM_SECONDS + 1.0) * 1000)
    if not broker.redis_client(app).set(SWEEP_KEY, worker_id, nx=True, px=lock_ms):
        return 0
    first = unmessaged(sessions, app, heartbeat_seconds=heartbeat_seconds)
    if not first:
        return 0
    time.sleep(CONFIRM_SECONDS)
    second = unmessaged(sessions, app, heartbeat_seconds=heartbeat_seconds)
    lost = {job_id: sorted(idxs & second[job_id]) for job_id, idxs in first.items() if idxs & second.get(job_id, set())}
    if not lost:
        return 0
    with transaction(sessions) as session:
        for job_id, idxs in lost.items():
            outbox.owe_messages(session, job_id, idxs)
        owed = outbox.owed_ids(session)
    publish_owed(sessions, app, ids=owed)  # publishing skips what was claimed meanwhile
    return sum(len(i) for i in lost.values())


def unmessaged(sessions: sessionmaker[Session], app: Celery, *, heartbeat_seconds: float) -> dict[str, set[int]]:
    """{job_id: idxs} of queued requests of open jobs that no message in flight names and nothing owes."""
    with sessions() as session:
        jobs = session.execute(select(Job.id, Job.parked, Job.total).where(
            Job.state.in_(outbox.OPEN), Job.total > 0, Job.n_queued > 0)).all()
    if not jobs:
        return {}
    # Redis first, then the outbox and the queued rows: a message published in between is missed
    # here and seen by the confirming second read.
    covered = inflight.in_flight(app, heartbeat_seconds=heartbeat_seconds)
    with sessions() as session:
        owed: dict[str, set[int] | None] = defaultdict(set)
        for job_id, idxs in session.execute(select(Outbox.job_id, Outbox.idxs)):
            if idxs is None or owed.get(job_id, set()) is None:
                owed[job_id] = None  # all of the job's queued requests
            else:
                owed[job_id].update(idxs)
    missing: dict[str, set[int]] = {}
    for job_id, parked, total in jobs:
        if job_id in owed and owed[job_id] is None:
            continue
        skip = covered.get(job_id, set()) | (owed.get(job_id) or set())
        found: set[int] = set()
        for start in range(0, total, WINDOW):  # a job's idx are 0..total-1 (its lines, numbered at submit)
            with sessions() as session:
                for first, last in _queued_runs(session, job_id, parked, start, start + WINDOW):
                    found.update(range(first, last + 1))
        found -= skip
        if found:
            missing[job_id] = found
    return missing


def _queued_runs(session: Session, job_id: str, parked: list | None, start: int, stop: int) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive queued idx in [start, stop), adapters of `parked` left out:
    consecutive idx minus their row number is constant along a run (gaps and islands)."""
    where = [Request.job_id == job_id, Request.state == RequestState.QUEUED.value,
             Request.idx >= start, Request.idx < stop]
    if parked:
        where.append(Request.adapter.not_in(parked))
    rows = select(Request.idx, (Request.idx - func.row_number().over(order_by=Request.idx)).label("run")).where(*where)
    runs = rows.subquery()
    return [tuple(r) for r in session.connection().execute(
        select(func.min(runs.c.idx), func.max(runs.c.idx)).group_by(runs.c.run))]
