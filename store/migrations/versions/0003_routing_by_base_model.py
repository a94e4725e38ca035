"""Round 3: routing by base model, adapter pins per job, what each worker serves, idempotent claims.

- lb_jobs.deployment now holds the base model's key alone (store.deployment.base_key), not a digest
  of the whole adapter set. A key written by round 2 hashes every configured adapter and names a queue
  no worker consumes any more, so every job's key is cleared: NULL means "unpinned", and the first
  worker to claim one of its requests pins it to its own base model (lifecycle.claim_requests).
- lb_jobs.adapter_pins: adapter name -> sha256 of the weights the job runs on. Filled here from the
  job's own results where every result of that adapter names the same sha256 (round 2 recorded it);
  anything else is pinned at its first claim.
- lb_jobs.parked: adapters whose requests wait for a worker serving the pinned weights (no message in
  Redis meanwhile); lb_jobs.retargets: what `lorabatch retarget` moved, from what, to what, when.
- lb_requests.claim_id: which claim took the request, so a claim retried after an ambiguous COMMIT
  returns what it took instead of nothing.
- lb_workers.base and lb_workers.adapters: the base identity and the adapters (name -> sha256) each
  worker serves, written with its heartbeat; producers and `status` read them.
- Every open job with queued requests owes its messages again (an outbox row dated in the past, so
  the first worker's reconcile round publishes it at once): the messages already in Redis name
  queues of round 2's ids, or round 1's shape, which no worker of this version consumes.

Plain ADD COLUMN only (see 0002 for why no batch copy on SQLite).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

LONG_AGO = datetime(2000, 1, 1)
"""created_at of the outbox rows written here: older than any grace, published by the first round."""


def upgrade() -> None:
    op.add_column("lb_jobs", sa.Column("adapter_pins", sa.JSON(), nullable=True))
    op.add_column("lb_jobs", sa.Column("parked", sa.JSON(), nullable=True))
    op.add_column("lb_jobs", sa.Column("retargets", sa.JSON(), nullable=True))
    op.add_column("lb_requests", sa.Column("claim_id", sa.String(32), nullable=True))
    op.add_column("lb_workers", sa.Column("base", sa.String(300), nullable=True))
    op.add_column("lb_workers", sa.Column("adapters", sa.JSON(), nullable=True))

    conn = op.get_bind()
    jobs = sa.table("lb_jobs", sa.column("id", sa.String), sa.column("deployment", sa.String),
                    sa.column("adapter_pins", sa.JSON), sa.column("state", sa.String),
                    sa.column("n_queued", sa.Integer))
    requests = sa.table("lb_requests", sa.column("job_id", sa.String), sa.column("adapter", sa.String),
                        sa.column("adapter_sha256", sa.String))
    outbox = sa.table("lb_outbox", sa.column("job_id", sa.String), sa.column("idxs", sa.JSON),
                      sa.column("suspect", sa.Integer), sa.column("created_at", sa.DateTime))

    conn.execute(sa.update(jobs).values(deployment=None))

    pins: dict[str, dict[str, str]] = {}
    found = conn.execute(
        sa.select(requests.c.job_id, requests.c.adapter, sa.func.min(requests.c.adapter_sha256),
                  sa.func.max(requests.c.adapter_sha256))
        .where(requests.c.adapter_sha256.is_not(None)).group_by(requests.c.job_id, requests.c.adapter))
    for job_id, adapter, low, high in found:
        if low == high:  # one sha256 for all its results: the weights the job ran on
            pins.setdefault(job_id, {})[adapter] = low
    for job_id, pinned in pins.items():
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(adapter_pins=pinned))

    open_ids = conn.execute(sa.select(jobs.c.id).where(jobs.c.state.in_(("queued", "running")),
                                                       jobs.c.n_queued > 0)).scalars().all()
    if open_ids:
        conn.execute(outbox.insert(), [dict(job_id=j, idxs=None, suspect=0, created_at=LONG_AGO) for j in open_ids])


def downgrade() -> None:
    for column in ("adapters", "base"):
        op.drop_column("lb_workers", column)
    op.drop_column("lb_requests", "claim_id")
    for column in ("retargets", "parked", "adapter_pins"):
        op.drop_column("lb_jobs", column)
