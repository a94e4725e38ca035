"""Runs: deciding which rows need an answer, recording a run, submitting its job, waiting for it.

Knows nothing about cron; `schedules.py` decides when a run starts.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.producer.annotation.cache import (
    OPEN_JOB_STATES,
    annotation_sessions,
    harvest_finished,
    keys_in_flight,
    lookup_cache,
)
from lorabatch.producer.annotation.rendering import Rendered, render_datasets
from lorabatch.producer.annotation.spec import RunSpec
from lorabatch.schemas.annotation_tables import AnnotationRun
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.tables import Job, Worker, utcnow
from lorabatch.store.context import Context
from lorabatch.store.db import transaction

STALLED_SUBMIT_SECONDS = 300
"""A detached run not submitted this long after it was created (its starter died) is submitted again."""


@dataclass
class Plan:
    rendered: Rendered
    to_submit: list[str]
    """Keys this run's job will answer."""
    waits_on: list[str]
    """Jobs of other runs already answering some of this run's keys."""
    reused: int
    """Distinct keys answered before."""


def plan_run(ctx: Context, spec: RunSpec, *, fresh: bool = False) -> Plan:
    """Read and render the datasets and decide which requests need a job.
    `fresh`: ask again for every row (the cache knows nothing of the weights: use it after
    retraining an adapter under the same name)."""
    rendered = render_datasets(ctx.settings, spec)
    sessions = annotation_sessions(ctx)
    if fresh:
        return Plan(rendered, list(rendered.lines), [], 0)
    harvest_finished(ctx)  # answers of ended jobs count as answered before
    cached = lookup_cache(sessions, rendered.lines)
    reused = sum(1 for c in cached.values() if c[1] == "succeeded")
    missing = [k for k in rendered.lines if cached.get(k, (None, None, None))[1] != "succeeded"]
    in_flight = keys_in_flight(sessions, missing)
    return Plan(rendered, [k for k in missing if k not in in_flight], sorted(set(in_flight.values())), reused)


def create_run(ctx: Context, spec: RunSpec, *, schedule: str | None = None, detached: bool = False,
               session: Session | None = None, slot=None) -> str:
    """Record a new run (in `session`'s transaction when given). Returns its id."""
    run = AnnotationRun(id="run-" + uuid.uuid4().hex[:16], schedule=schedule, slot=slot, spec=spec.to_dict(),
                        detached=detached, waits_on=[])
    if session is not None:
        session.add(run)
        session.flush()
    else:
        with transaction(annotation_sessions(ctx)) as s:
            s.add(run)
    return run.id


def submit_run(ctx: Context, run_id: str, *, plan: Plan | None = None) -> Plan:
    """Create the run's job for the rows that need an answer (none when every row has one).

    Submitting twice is harmless: the job's idempotency key is the run's id. A UsageError
    (no file matches, a bad file) is recorded on the run, which then is not retried, and raised.
    """
    from lorabatch.producer.submit import submit_file

    sessions = annotation_sessions(ctx)
    with sessions() as s:
        run = s.get(AnnotationRun, run_id)
    spec = RunSpec.from_dict(run.spec)
    job_id = None
    try:
        plan = plan or plan_run(ctx, spec)
        if plan.to_submit:
            with tempfile.TemporaryDirectory(prefix="lorabatch-annotate-") as tmp:
                path = Path(tmp) / "requests.jsonl"
                with path.open("w", encoding="utf-8") as fh:
                    fh.writelines(plan.rendered.lines[k] + "\n" for k in plan.to_submit)
                job_id = submit_file(ctx, str(path), name=_job_name(spec, run.schedule, plan), priority=spec.priority,
                                     idempotency_key=f"annotation-run:{run_id}", schedule=run.schedule).job_id
    except UsageError as e:
        with transaction(sessions) as s:
            s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id).values(error=str(e))
                      .execution_options(synchronize_session=False))
        raise
    rows = sum(len(r) for r in plan.rendered.rows)
    with transaction(sessions) as s:
        s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id)
                  .values(job_id=job_id, waits_on=plan.waits_on, rows=rows, submitted=len(plan.to_submit),
                          reused=plan.reused, submitted_at=utcnow())
                  .execution_options(synchronize_session=False))
    return plan


def _job_name(spec: RunSpec, schedule: str | None, plan: Plan) -> str:
    if spec.name:
        return spec.name
    if schedule:
        return f"schedule {schedule}"
    files = plan.rendered.files
    more = f" +{len(files) - 1}" if len(files) > 1 else ""
    return f"annotate {files[0].file.input.name}{more}"


def get_run(ctx: Context, run_id: str) -> AnnotationRun:
    with annotation_sessions(ctx)() as s:
        return s.get(AnnotationRun, run_id)


def run_jobs(run: AnnotationRun) -> list[str]:
    return [j for j in [run.job_id, *(run.waits_on or [])] if j]


def jobs_ended(sessions: sessionmaker[Session], job_ids: Sequence[str]) -> bool:
    if not job_ids:
        return True
    with sessions() as s:
        open_count = s.scalar(select(func.count()).select_from(Job)
                              .where(Job.id.in_(list(job_ids)), Job.state.in_(OPEN_JOB_STATES)))
    return not open_count


def live_workers(ctx: Context) -> int:
    """Workers whose heartbeat is within the lease."""
    since = utcnow() - timedelta(seconds=ctx.settings.worker.lease_seconds)
    with ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Worker).where(Worker.heartbeat_at >= since)) or 0


def wait_for_jobs(ctx: Context, job_ids: Sequence[str], *, poll: float = 0.5, timeout: float | None = None) -> bool:
    """Block until the jobs end (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout if timeout is not None else None
    while not jobs_ended(ctx.sessions, job_ids):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


# ---------------------------------------------------------------- detached runs (the beat's side)


def stalled_runs(ctx: Context) -> list[str]:
    """Schedule firings whose beat died between claiming the slot and submitting the run. (A run
    started by hand that failed to submit told its user so; it is not retried behind their back.)"""
    cutoff = utcnow() - timedelta(seconds=STALLED_SUBMIT_SECONDS)
    with annotation_sessions(ctx)() as s:
        return list(s.scalars(select(AnnotationRun.id).where(
            AnnotationRun.slot.is_not(None), AnnotationRun.submitted_at.is_(None),
            AnnotationRun.error.is_(None), AnnotationRun.created_at < cutoff)))
