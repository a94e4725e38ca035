"""Rebuilding Redis's work from the database, the source of truth.

Two things can strand a request: its worker died while running it (the request stays
`running` under a worker whose heartbeat stopped), or Redis lost its messages (a restart
without persistence). The first is found by heartbeat, the second by the epoch key that
lorabatch keeps in Redis. Enqueuing a request twice is harmless: only one claim succeeds.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.store import broker, lifecycle
from lorabatch.store.db import transaction


@dataclass
class ReconcileReport:
    orphans: int = 0
    """Running requests whose worker died, put back in the queue."""
    enqueued: int = 0
    """Requests whose references were sent to Redis again."""
    redis_was_reset: bool = False


def reconcile(sessions: sessionmaker[Session], app: Celery, *, lease_seconds: float, everything: bool = False,
              worker_id: str | None = None) -> ReconcileReport:
    """Requeue orphans; re-enqueue every queued request when Redis lost its data or `everything` is asked."""
    report = ReconcileReport()
    lost = broker.epoch_missing(app)
    with transaction(sessions) as session:
        orphans = lifecycle.orphaned_requests(session, lease=timedelta(seconds=lease_seconds), alive=worker_id)
        report.orphans = len(orphans)
        if lost or everything:
            refs = lifecycle.queued_requests(session)  # includes the orphans just put back
        else:
            refs = [(r.job_id, r.idx, r.adapter, _priority(session, r.job_id)) for r in orphans]
    report.redis_was_reset = lost
    broker.mark_epoch(app)
    groups: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for job_id, idx, adapter, priority in refs:
        groups[(job_id, adapter, priority)].append(idx)
    for (job_id, adapter, priority), idxs in groups.items():
        broker.enqueue(app, job_id, adapter, idxs, priority=priority)
    report.enqueued = len(refs)
    return report


def _priority(session: Session, job_id: str) -> int:
    return lifecycle.get_job(session, job_id).priority
