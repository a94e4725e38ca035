"""Finishing a run: writing its output files from the cache once its jobs have ended."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update

from lorabatch.producer.annotation.cache import (
    annotation_sessions,
    harvest_finished,
    lookup_cache,
)
from lorabatch.producer.annotation.datasets import Cell, write_output
from lorabatch.producer.annotation.rendering import Rendered, render_datasets
from lorabatch.producer.annotation.runs import get_run, jobs_ended, run_jobs
from lorabatch.producer.annotation.spec import RunSpec
from lorabatch.schemas.annotation_tables import AnnotationRun
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.tables import utcnow
from lorabatch.store.context import Context
from lorabatch.store.db import transaction

PENDING_ERROR = "no answer yet: the row was added after the run started; the next run annotates it"


@dataclass
class Written:
    outputs: list[Path]
    counts: dict[str, int]
    """Rows by status: succeeded, failed, cancelled, invalid, pending."""


def write_run(ctx: Context, run_id: str, *, rendered: Rendered | None = None) -> Written:
    """Write the run's output files from the cache. Call once its jobs have ended.
    `rendered`: the rows as the run read them; None reads the datasets again."""
    sessions = annotation_sessions(ctx)
    run = get_run(ctx, run_id)
    harvest_finished(ctx)
    try:
        rendered = rendered or render_datasets(ctx.settings, RunSpec.from_dict(run.spec))
    except UsageError as e:
        with transaction(sessions) as s:
            s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id).values(error=str(e))
                      .execution_options(synchronize_session=False))
        raise
    cache = lookup_cache(sessions, [k for rows in rendered.rows for k, _ in rows])
    counts = dict.fromkeys(("succeeded", "failed", "cancelled", "invalid", "pending"), 0)
    outputs = []
    for loaded, rows in zip(rendered.files, rendered.rows):
        cells: list[Cell] = []
        for key, error in rows:
            if key is None:
                cell: Cell = (None, "invalid", error)
            elif key in cache:
                output, status, err = cache[key]
                cell = (output if status == "succeeded" else None, status, err)
            else:
                cell = (None, "pending", PENDING_ERROR)
            counts[cell[1]] = counts.get(cell[1], 0) + 1
            cells.append(cell)
        outputs.append(write_output(loaded, cells, column=run.spec["column"]))
    with transaction(sessions) as s:
        s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id, AnnotationRun.written_at.is_(None))
                  .values(written_at=utcnow()).execution_options(synchronize_session=False))
    return Written(outputs, counts)


# ---------------------------------------------------------------- detached runs (the beat's side)


def finish_detached_runs(ctx: Context) -> list[tuple[str, Written]]:
    """Write the outputs of detached runs whose jobs have ended. Returns (run id, what was written).
    Two beats may both write one run: the files are replaced atomically with the same content."""
    sessions = annotation_sessions(ctx)
    with sessions() as s:
        runs = s.scalars(select(AnnotationRun).where(
            AnnotationRun.detached.is_(True), AnnotationRun.submitted_at.is_not(None),
            AnnotationRun.written_at.is_(None), AnnotationRun.error.is_(None))).all()
    done = []
    for run in runs:
        if jobs_ended(sessions, run_jobs(run)):
            done.append((run.id, write_run(ctx, run.id)))
    return done
