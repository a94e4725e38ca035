"""The round-1 schema (git commit ac3f2bd): jobs, requests, workers, and the annotation tables.

Written out by hand, not generated from the models, so later changes to the models cannot change it.
A round-1 database has these tables but no version table; some lack the annotation tables (round 1
created them on first use), so each table here is created only where it is missing.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _missing(name: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("lb_jobs"):
        op.create_table(
            "lb_jobs",
            sa.Column("id", sa.String(40), primary_key=True),
            sa.Column("name", sa.String(200), nullable=True),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("priority", sa.Integer(), nullable=False),
            sa.Column("idempotency_key", sa.String(200), nullable=True),
            sa.Column("source", sa.String(500), nullable=True),
            sa.Column("schedule", sa.String(100), nullable=True),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("started_at", sa.DateTime(), nullable=True),
            sa.Column("finished_at", sa.DateTime(), nullable=True),
            sa.Column("total", sa.Integer(), nullable=False),
            sa.Column("n_queued", sa.Integer(), nullable=False),
            sa.Column("n_running", sa.Integer(), nullable=False),
            sa.Column("n_succeeded", sa.Integer(), nullable=False),
            sa.Column("n_failed", sa.Integer(), nullable=False),
            sa.Column("n_cancelled", sa.Integer(), nullable=False),
            sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
            sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
            sa.UniqueConstraint("idempotency_key"),
        )
        op.create_index("ix_lb_jobs_state", "lb_jobs", ["state"])
        op.create_index("ix_lb_jobs_schedule", "lb_jobs", ["schedule"])

    if _missing("lb_requests"):
        op.create_table(
            "lb_requests",
            sa.Column("job_id", sa.String(40), sa.ForeignKey("lb_jobs.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("idx", sa.Integer(), primary_key=True),
            sa.Column("custom_id", sa.String(200), nullable=False),
            sa.Column("adapter", sa.String(64), nullable=False),
            sa.Column("prompt", sa.Text(), nullable=True),
            sa.Column("messages", sa.JSON(), nullable=True),
            sa.Column("params", sa.JSON(), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("worker_id", sa.String(80), nullable=True),
            sa.Column("claimed_at", sa.DateTime(), nullable=True),
            sa.Column("finished_at", sa.DateTime(), nullable=True),
            sa.Column("output", sa.Text(), nullable=True),
            sa.Column("finish_reason", sa.String(16), nullable=True),
            sa.Column("prompt_tokens", sa.Integer(), nullable=True),
            sa.Column("completion_tokens", sa.Integer(), nullable=True),
            sa.Column("error", sa.Text(), nullable=True),
            sa.UniqueConstraint("job_id", "custom_id", name="uq_lb_requests_custom_id"),
        )
        op.create_index("ix_lb_requests_state_claimed", "lb_requests", ["state", "claimed_at"])

    if _missing("lb_workers"):
        op.create_table(
            "lb_workers",
            sa.Column("id", sa.String(80), primary_key=True),
            sa.Column("hostname", sa.String(200), nullable=False),
            sa.Column("pid", sa.Integer(), nullable=False),
            sa.Column("started_at", sa.DateTime(), nullable=False),
            sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
            sa.Column("tokens_per_second", sa.Float(), nullable=True),
        )

    if _missing("lb_annotation_cache"):
        op.create_table(
            "lb_annotation_cache",
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("output", sa.Text(), nullable=True),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Column("job_id", sa.String(40), nullable=True),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
        )

    if _missing("lb_annotation_runs"):
        op.create_table(
            "lb_annotation_runs",
            sa.Column("id", sa.String(40), primary_key=True),
            sa.Column("schedule", sa.String(100), nullable=True),
            sa.Column("slot", sa.DateTime(), nullable=True),
            sa.Column("spec", sa.JSON(), nullable=False),
            sa.Column("detached", sa.Boolean(), nullable=False),
            sa.Column("job_id", sa.String(40), nullable=True),
            sa.Column("waits_on", sa.JSON(), nullable=False),
            sa.Column("rows", sa.Integer(), nullable=False),
            sa.Column("submitted", sa.Integer(), nullable=False),
            sa.Column("reused", sa.Integer(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("submitted_at", sa.DateTime(), nullable=True),
            sa.Column("harvested_at", sa.DateTime(), nullable=True),
            sa.Column("written_at", sa.DateTime(), nullable=True),
            sa.Column("error", sa.Text(), nullable=True),
        )
        op.create_index("ix_lb_annotation_runs_schedule", "lb_annotation_runs", ["schedule"])
        op.create_index("ix_lb_annotation_runs_job_id", "lb_annotation_runs", ["job_id"])

    if _missing("lb_schedules"):
        op.create_table(
            "lb_schedules",
            sa.Column("name", sa.String(100), primary_key=True),
            sa.Column("cron", sa.String(100), nullable=False),
            sa.Column("timezone", sa.String(64), nullable=False),
            sa.Column("spec", sa.JSON(), nullable=False),
            sa.Column("enabled", sa.Boolean(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("counts_from", sa.DateTime(), nullable=False),
            sa.Column("last_fired_at", sa.DateTime(), nullable=True),
        )


def downgrade() -> None:
    for name in ("lb_schedules", "lb_annotation_runs", "lb_annotation_cache", "lb_workers", "lb_requests", "lb_jobs"):
        op.drop_table(name)
