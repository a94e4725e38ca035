"""Database tables (SQLAlchemy 2). The database is the source of truth for jobs and requests.

A request's primary key is (job_id, idx), idx being its line number in the input (0-based).
Queue messages carry only these references, so anything lost from Redis can be rebuilt here.
Job rows keep running counts per request state, updated in the same transaction as the
requests they count, so `status` never counts rows.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from lorabatch.schemas.exact_text import ExactText
from lorabatch.schemas.states import JobState, RequestState


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every timestamp is stored and compared as UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


SCHEMA_LOCK_KEY = 0x6C6F7261  # "lora": the PostgreSQL advisory lock that serialises schema creation


def create_tables(engine: Engine, tables: list[Table] | None = None) -> None:
    """Create the missing tables (all of Base's, or `tables`) in one transaction.

    On PostgreSQL, two processes creating the same table at once collide in its catalog
    (UniqueViolation on pg_type), so each holds an advisory lock for the transaction: the
    second waits for the first to commit, then finds the tables there.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        Base.metadata.create_all(conn, tables=tables)


class Job(Base):
    __tablename__ = "lb_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value, index=True)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    source: Mapped[str | None] = mapped_column(String(500))
    schedule: Mapped[str | None] = mapped_column(String(100), index=True)
    """Name of the schedule that created this job, if any."""
    deployment: Mapped[str | None] = mapped_column(String(32), index=True)
    """The key of the base model the job runs on (store.deployment.base_key; None: pinned by the first
    worker that claims one of its requests). Only a worker of that base model claims its requests."""
    adapter_pins: Mapped[dict | None] = mapped_column(JSON)
    """Adapter name -> sha256 of the weights this job's requests run on (None: pinned at the first claim
    of a request naming it). Only a worker serving those exact weights claims them."""
    parked: Mapped[list | None] = mapped_column(JSON)
    """Adapters whose queued requests wait, without a message, for a live worker serving the pinned
    weights; a worker that serves them (or `lorabatch retarget`) publishes them again."""
    retargets: Mapped[list | None] = mapped_column(JSON)
    """What `lorabatch retarget` moved: [{adapter, from, to, at, requests}], oldest first."""
    content_hash: Mapped[str | None] = mapped_column(String(64))
    """sha256 of the submitted requests, so a reused idempotency key with other content is refused."""
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime())

    total: Mapped[int] = mapped_column(Integer, default=0)
    n_queued: Mapped[int] = mapped_column(Integer, default=0)
    n_running: Mapped[int] = mapped_column(Integer, default=0)
    n_succeeded: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_cancelled: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)

    def counts(self) -> dict[str, int]:
        """Requests per state, plus `total`."""
        out = {s.value: getattr(self, f"n_{s.value}") for s in RequestState}
        out["total"] = self.total
        return out


class Request(Base):
    __tablename__ = "lb_requests"
    __table_args__ = (
        UniqueConstraint("job_id", "custom_id", name="uq_lb_requests_custom_id"),
        Index("ix_lb_requests_state_claimed", "state", "claimed_at"),
    )

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("lb_jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(200))
    adapter: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list | None] = mapped_column(JSON)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    """max_new_tokens, temperature, top_p, top_k, seed, stop."""

    state: Mapped[str] = mapped_column(String(16), default=RequestState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(80))
    claim_id: Mapped[str | None] = mapped_column(String(32))
    """The claim that took it (with worker_id): a claim retried after an ambiguous commit finds its own."""
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime())

    output: Mapped[str | None] = mapped_column(ExactText)
    """What the model generated, exactly: NUL characters included (schemas.exact_text)."""
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(ExactText)
    base_model: Mapped[str | None] = mapped_column(String(300))
    """Provenance of the result: the base model the worker served..."""
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    """...and the sha256 of the adapter weights it applied (None for the base model)."""


class Outbox(Base):
    """Messages owed to Redis, written in the same transaction as the state change that owes them.

    A state change that must be followed by a publish (a job created, requests handed back or found
    orphaned) inserts a row here before it commits; whoever committed publishes and deletes the row.
    If it dies in between, the row stays and any worker's reconcile round publishes it. So a commit
    followed by a crash never leaves queued requests without a message.
    """

    __tablename__ = "lb_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("lb_jobs.id", ondelete="CASCADE"), index=True)
    idxs: Mapped[list | None] = mapped_column(JSON)
    """The request indexes to publish; None: every queued request of the job."""
    suspect: Mapped[int] = mapped_column(Integer, default=0)
    """0: ordinary work; 1: requests whose worker died while running them (run apart, as a group);
    2: their last attempt (run alone)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)


class Worker(Base):
    """One row per running worker process; its heartbeat tells whether its claims are still alive."""

    __tablename__ = "lb_workers"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    deployment: Mapped[str | None] = mapped_column(String(32))
    """The key of the base model this worker serves (store.deployment.base_key)."""
    base: Mapped[str | None] = mapped_column(String(300))
    """The base model's identity (store.deployment.base_identity)."""
    adapters: Mapped[dict | None] = mapped_column(JSON)
    """Adapter name -> sha256 of the weights it serves (None: configured but unreadable there)."""
    running: Mapped[int] = mapped_column(Integer, default=0)
    """Requests generating in its batch at the last heartbeat."""
    held: Mapped[int] = mapped_column(Integer, default=0)
    """Requests in the messages it holds, not yet claimed (available to cancel, not to other workers)."""
