"""`lorabatch retry JOB`: run a completed job's failed requests again, as a new attempt of the same job.

The transition is lifecycle.retry_failed (failed -> queued, results and attempts cleared, the job
reopened, messages owed in the outbox, one transaction); the messages are published after the
commit. If this process dies in between, the outbox row stays and a worker's reconcile round
publishes it: nothing is lost, and claims make sure nothing runs twice.
"""

from __future__ import annotations

from lorabatch.producer.jobs import find_job
from lorabatch.store import broker, lifecycle, outbox
from lorabatch.store.context import Context
from lorabatch.store.db import transaction
from lorabatch.store.reconcile import publish_owed


def retry_failed(ctx: Context, job_ref: str) -> tuple[str, int]:
    """Reopen the failed requests of `job_ref` and publish their messages. Returns (job id, how many)."""
    with ctx.sessions() as session:
        job_id = find_job(session, job_ref).id
    broker.check_broker(ctx.celery)
    with transaction(ctx.sessions) as session:
        n = lifecycle.retry_failed(session, job_id)
        owed = outbox.owed_ids(session) if n else []
    if owed:
        publish_owed(ctx.sessions, ctx.celery, ids=owed)
    return job_id, n
