"""Tables for dataset annotation: the answer cache, annotation runs and schedules.

They live on the same `Base` as the job tables. `ensure_tables` creates them on an engine whose
schema was made before this module was imported (`db.make_engine` creates only the tables
registered at that moment).
"""

from __future__ import annotations

import weakref
from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Integer, String, Text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from lorabatch.schemas.exact_text import ExactText
from lorabatch.schemas.tables import Base, create_tables, utcnow


class AnnotationCache(Base):
    """The last outcome for one rendered request (adapter, prompt or messages, parameters).

    Keyed by content, so a rerun reuses earlier answers. Only `succeeded` entries are reused;
    a failed or cancelled one is retried on the next run and overwritten by its outcome.
    """

    __tablename__ = "lb_annotation_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[str | None] = mapped_column(ExactText)
    error: Mapped[str | None] = mapped_column(ExactText)
    job_id: Mapped[str | None] = mapped_column(String(40))
    updated_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)


class AnnotationRun(Base):
    """One annotation of a dataset: at most one job (only rows not answered before go in).

    A run whose starter does not wait for it (a schedule firing, `--no-wait`) is `detached`:
    `lorabatch beat` writes its output files once its jobs have ended.
    """

    __tablename__ = "lb_annotation_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    schedule: Mapped[str | None] = mapped_column(String(100), index=True)
    slot: Mapped[datetime | None] = mapped_column(DateTime())
    """The cron slot a schedule fired for; None for `run-now` and `annotate`."""
    spec: Mapped[dict] = mapped_column(JSON)
    """Everything needed to redo the run: datasets, template, adapter, params, output, column, priority."""
    detached: Mapped[bool] = mapped_column(Boolean, default=False)
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    """The job created for the rows that needed an answer; None when every row was answered before."""
    waits_on: Mapped[list] = mapped_column(JSON, default=list)
    """Jobs of other runs already working on some of this run's rows."""
    rows: Mapped[int] = mapped_column(Integer, default=0)
    submitted: Mapped[int] = mapped_column(Integer, default=0)
    reused: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime())
    harvested_at: Mapped[datetime | None] = mapped_column(DateTime())
    """When this run's job's results were copied into the cache."""
    written_at: Mapped[datetime | None] = mapped_column(DateTime())
    error: Mapped[str | None] = mapped_column(Text)
    """Why the run could not be submitted or written (then it is not retried)."""


class Schedule(Base):
    """A dataset annotated on a cron schedule by `lorabatch beat`."""

    __tablename__ = "lb_schedules"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    cron: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    """The cron expression is read in this zone."""
    spec: Mapped[dict] = mapped_column(JSON)
    """The annotation it runs: datasets, template (read at `schedule add`), adapter, params, output, column."""
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    counts_from: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    """Slots at or before this never fire: set when the schedule is added, replaced or enabled again,
    so none of these fires at once for a slot that passed before it."""
    last_fired_at: Mapped[datetime | None] = mapped_column(DateTime())
    """The last slot fired (naive UTC); claimed with a conditional UPDATE so only one beat fires it."""


ANNOTATION_TABLES = [AnnotationCache.__table__, AnnotationRun.__table__, Schedule.__table__]
_ready: weakref.WeakSet[Engine] = weakref.WeakSet()


def ensure_tables(engine: Engine) -> None:
    """Create the annotation tables on `engine` if they are missing (once per engine)."""
    if engine not in _ready:
        create_tables(engine, ANNOTATION_TABLES)
        _ready.add(engine)
