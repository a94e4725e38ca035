"""The Celery task: thin glue between a queue message and the worker's feed.

One message names up to broker.CHUNK_SIZE requests of one job and adapter. The task hands the
message to the feed and returns once its engine loop has claimed (admitted) all of its requests, or
found them unclaimable; only then does Celery acknowledge the message (acks_late). It never claims,
generates or records itself, so nothing can escape it half done: a killed worker's unacknowledged
messages come back from Redis, its claimed requests through reconcile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery.exceptions import Reject

from lorabatch.store import broker

if TYPE_CHECKING:
    from celery import Celery

    from lorabatch.worker.service import WorkerService


def register(app: Celery, service: WorkerService) -> None:
    """Register the run task on `app`, bound to this process's service."""

    @app.task(name=broker.RUN_TASK, acks_late=True, reject_on_worker_lost=True)
    def run(job_id: str, adapter: str, idxs: list[int], suspect: int = 0, priority: int = 5) -> dict:
        if not service.hold(job_id, adapter, idxs, suspect, priority=priority):
            raise Reject("shutting down with the database unreachable: back to the queue", requeue=True)
        return {"admitted_or_skipped": len(idxs)}
