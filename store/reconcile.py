"""Keeping Redis's work in step with the database, the queue of record.

A queued request of an open job needs a message in Redis. Three things can leave it without one,
and each is repaired here, by every worker's reconcile loop, without anyone running a command:

- a process died between committing a state change and publishing the messages it owed (a submit,
  a hand-back, an earlier reconcile): the outbox row it wrote in the same transaction is still
  there; rows older than `grace` are published again;
- its worker died while running it: the request is still `running` under a worker whose heartbeat
  stopped (on the database's clock); it is put back, with an outbox row;
- Redis lost its data (restarted without persistence, lost its last AOF writes, was flushed): its
  run_id no longer matches the marker that only this module writes (broker.EPOCH_KEY), and every
  queued request of every open job is published again.

Publishing a request twice is harmless: only one claim succeeds, the other message is acknowledged
with nothing to do. What duplicates cost is measured in the README (Recovery).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from itertools import groupby

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.schemas.tables import Job, Outbox
from lorabatch.store import broker, lifecycle, outbox
from lorabatch.store.clock import db_now
from lorabatch.store.db import transaction

PUBLISH_BATCH = 4096
"""References read per round while publishing one outbox row (a multiple of the message size)."""
OUTBOX_GRACE_SECONDS = 60.0
"""An outbox row older than this was left by a process that died before publishing it (a live
publisher refreshes its row's time every PUBLISH_BATCH references)."""


ABANDONED_SUBMIT = timedelta(hours=1)
"""A job still at total 0 this long after it was created is a submit that died inserting its requests."""


@dataclass
class ReconcileReport:
    orphans: int = 0
    """Running requests whose worker died, put back in the queue."""
    published: int = 0
    """Messages sent for outbox rows (this round's and ones left behind)."""
    redis_was_reset: bool = False


def reconcile(sessions: sessionmaker[Session], app: Celery, *, lease_seconds: float, max_attempts: int,
              worker_id: str | None = None, everything: bool = False,
              grace_seconds: float = OUTBOX_GRACE_SECONDS) -> ReconcileReport:
    """Requeue orphans, refill Redis if it lost its data (or `everything` is asked), publish what is owed."""
    report = ReconcileReport()
    with transaction(sessions) as session:
        report.orphans = lifecycle.orphaned_requests(session, lease=timedelta(seconds=lease_seconds),
                                                     max_attempts=max_attempts, alive=worker_id)
        owed = outbox.owed_ids(session)
        lifecycle.forget_abandoned_submits(session, older_than=ABANDONED_SUBMIT)
    run_id = broker.redis_was_reset(app)
    if run_id or everything:
        with transaction(sessions) as session:
            outbox.owe_all_queued(session)
            owed += outbox.owed_ids(session)
        report.redis_was_reset = run_id is not None
    # This round's rows, then any left behind by a process that died between commit and publish.
    report.published = publish_owed(sessions, app, ids=owed) if owed else 0
    report.published += publish_owed(sessions, app, older_than=timedelta(seconds=grace_seconds))
    if run_id:
        broker.mark_refilled(app, run_id)  # only after the refill: a crash before it refills again
    return report


def publish_owed(sessions: sessionmaker[Session], app: Celery, *, ids: list[int] | None = None,
                 older_than: timedelta | None = None) -> int:
    """Publish the messages of outbox rows (the given ones, or those older than `older_than`), then
    delete the rows. Returns messages sent. Publishing happens outside any transaction: on SQLite a
    long publish must not hold the write lock."""
    with transaction(sessions) as session:
        rows = [(r.id, r.job_id, r.idxs, r.suspect)
                for r in outbox.owed_messages(session, ids=ids, older_than=older_than)]
        jobs = {j.id: (j.deployment, j.priority) for j in session.query(Job).filter(Job.id.in_({r[1] for r in rows}))}
    sent = 0
    for row_id, job_id, idxs, suspect in rows:
        if job_id in jobs:
            deployment, priority = jobs[job_id]
            sent += _publish_row(sessions, app, row_id, job_id, idxs, suspect=suspect, deployment=deployment,
                                 priority=priority)
        with transaction(sessions) as session:
            outbox.settle_messages(session, [row_id])
    return sent


def _publish_row(sessions: sessionmaker[Session], app: Celery, row_id: int, job_id: str, idxs: list[int] | None, *,
                 suspect: int, deployment: str | None, priority: int) -> int:
    sent, after = 0, -1
    with sessions() as session:
        chunk = broker.chunk_size_for(session.get(Job, job_id).total) if idxs is None else broker.CHUNK_SIZE
    while True:
        with sessions() as session:  # a page per short transaction: on SQLite every transaction takes the write lock
            part = outbox.queued_refs(session, job_id, idxs, after=after, limit=PUBLISH_BATCH)
        if not part:
            return sent
        after = part[-1][2]
        for (was_run, adapter), group in groupby(sorted(part), key=lambda r: r[:2]):
            group_idxs = [idx for _, _, idx in group]
            if was_run and not suspect:  # owed as ordinary work (a refill, a hand-back): run alone, to be safe
                for idx in group_idxs:
                    sent += broker.enqueue(app, job_id, adapter, [idx], priority=priority, deployment=deployment,
                                           suspect=outbox.SUSPECT_ALONE)
            else:
                sent += broker.enqueue(app, job_id, adapter, group_idxs, priority=priority, deployment=deployment,
                                       suspect=suspect, chunk_size=chunk)
        if len(part) == PUBLISH_BATCH:
            with transaction(sessions) as s:  # still publishing: keep other publishers off this row
                s.execute(update(Outbox).where(Outbox.id == row_id).values(created_at=db_now(s)))
