"""Annotation schedules: cron expressions stored in the database, fired by `lorabatch beat`.

A schedule fires for a slot (a time its cron expression names) once the slot has passed, if
the slot is later than the last slot it fired for and than `counts_from` (when the schedule
was added, replaced or enabled again). Firing
claims the slot with a conditional UPDATE (`last_fired_at < slot`), in the same transaction
that records the run, so two beats never both fire one slot. A beat that was down fires only
the latest missed slot, once. The run is then submitted as a normal job tagged with the
schedule's name; the beat writes its output when the job ends (annotation.finish_detached_runs).

Time: `now` is naive UTC (as every stored timestamp) and always passed in, so tests can move
the clock. The cron expression is read in the schedule's time zone.

Paths: a schedule stores its datasets and output relative to the project folder (the folder of
lorabatch.toml) when they are inside it, and each firing resolves them against the project folder
of the beat that fires it: a schedule added on a laptop runs in a container that mounts the project
elsewhere. Paths outside the project stay absolute (`schedule add` warns), as older schedules' are.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePath
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select, update

from lorabatch.producer import annotation
from lorabatch.schemas.annotation_tables import AnnotationRun, Schedule
from lorabatch.schemas.errors import NotFound, UsageError
from lorabatch.schemas.settings import Settings
from lorabatch.schemas.tables import Job, utcnow
from lorabatch.store.context import Context
from lorabatch.store.db import transaction

log = logging.getLogger("lorabatch.beat")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEFAULT_TIMEZONE = "UTC"


def _croniter():
    try:
        from croniter import croniter
    except ImportError:
        raise UsageError("schedules need croniter; install it with: pip install 'lorabatch[annotate]'.") from None
    return croniter


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"time zone {name!r} is unknown; use an IANA name such as UTC or Europe/Paris.") from None


def check_cron(expr: str, tz: str = DEFAULT_TIMEZONE) -> None:
    """Raise UsageError unless `expr` is a five-field cron expression (or @daily, @hourly, ...)."""
    croniter = _croniter()
    _zone(tz)
    if not (expr.strip().startswith("@") or len(expr.split()) == 5) or not croniter.is_valid(expr):
        raise UsageError(f"--cron {expr!r} is not a cron expression; write five fields, "
                         "minute hour day month weekday, e.g. \"0 2 * * *\" for 02:00 every day.")


def _local(now: datetime, tz: str) -> datetime:
    return now.replace(tzinfo=timezone.utc).astimezone(_zone(tz))


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def latest_slot(expr: str, tz: str, now: datetime) -> datetime:
    """The latest time at or before `now` that `expr` names (naive UTC)."""
    croniter = _croniter()
    local = _local(now, tz)
    prev = croniter(expr, local).get_prev(datetime)
    after = croniter(expr, prev).get_next(datetime)  # get_prev skips `now` itself when now is a slot
    return _utc(after if after <= local else prev)


def next_slot(expr: str, tz: str, now: datetime) -> datetime:
    """The first time after `now` that `expr` names (naive UTC)."""
    return _utc(_croniter()(expr, _local(now, tz)).get_next(datetime))


def due_slot(schedule: Schedule, now: datetime) -> datetime | None:
    """The slot this schedule should fire for now, if any."""
    slot = latest_slot(schedule.cron, schedule.timezone, now)
    if slot <= schedule.counts_from or (schedule.last_fired_at and slot <= schedule.last_fired_at):
        return None
    return slot


# ---------------------------------------------------------------- paths


def project_relative(settings: Settings, spec: annotation.RunSpec) -> tuple[annotation.RunSpec, list[str]]:
    """`spec` with its absolute dataset and output paths made relative to the project folder where they
    lie inside it, and the paths left absolute because they lie outside (none without a project)."""
    project = settings.config_path.parent if settings.config_path else None
    outside: list[str] = []

    def stored(path: str) -> str:
        absolute = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
        if project is not None and PurePath(absolute).is_relative_to(project):
            return PurePath(absolute).relative_to(project).as_posix() or "."
        outside.append(absolute)
        return absolute

    datasets = [stored(d) for d in spec.datasets]
    output = stored(spec.output) if spec.output else None
    return dataclasses.replace(spec, datasets=datasets, output=output), outside


def resolved_spec(settings: Settings, stored: dict) -> annotation.RunSpec:
    """A stored schedule's spec with relative paths resolved against this process's project folder
    (without a lorabatch.toml, the current folder); absolute ones as they are."""
    spec = annotation.RunSpec.from_dict(stored)

    def resolved(path: str) -> str:
        if os.path.isabs(os.path.expanduser(path)):
            return path
        base = settings.config_path.parent if settings.config_path else Path.cwd()
        return str(base / path)

    return dataclasses.replace(spec, datasets=[resolved(d) for d in spec.datasets],
                               output=resolved(spec.output) if spec.output else None)


# ---------------------------------------------------------------- managing schedules


def add_schedule(ctx: Context, name: str, *, cron: str, tz: str, spec: annotation.RunSpec, replace: bool = False,
                 now: datetime | None = None) -> Schedule:
    """Store a schedule (validated by the caller's build_spec). `replace` overwrites one of that name;
    either way only slots after `now` fire."""
    if not NAME_RE.match(name):
        raise UsageError(f"schedule name {name!r} is not allowed; use letters, digits, '.', '_' or '-' (at most 100).")
    check_cron(cron, tz)
    with transaction(annotation.annotation_sessions(ctx)) as s:
        existing = s.get(Schedule, name, with_for_update=True)
        if existing is not None and not replace:
            raise UsageError(f"schedule {name!r} already exists; pass --replace to change it, or choose another name.")
        now = now or utcnow()
        if existing is None:
            existing = Schedule(name=name, created_at=now, enabled=True)
            s.add(existing)
        existing.cron, existing.timezone, existing.spec, existing.counts_from = cron, tz, spec.to_dict(), now
    return existing


def get_schedule(ctx: Context, name: str) -> Schedule:
    with annotation.annotation_sessions(ctx)() as s:
        schedule = s.get(Schedule, name)
    if schedule is None:
        raise NotFound(f"no schedule named {name!r}; list them with `lorabatch schedule list`.")
    return schedule


def remove_schedule(ctx: Context, name: str) -> None:
    """Delete a schedule. Its past jobs and runs stay."""
    get_schedule(ctx, name)
    with transaction(annotation.annotation_sessions(ctx)) as s:
        s.execute(Schedule.__table__.delete().where(Schedule.name == name))


def set_enabled(ctx: Context, name: str, *, enabled: bool, now: datetime | None = None) -> None:
    """Pause or resume a schedule. Slots that passed while it was paused do not fire."""
    sch = get_schedule(ctx, name)
    values: dict = {"enabled": enabled}
    if enabled and not sch.enabled:
        values["counts_from"] = now or utcnow()
    with transaction(annotation.annotation_sessions(ctx)) as s:
        s.execute(update(Schedule).where(Schedule.name == name).values(**values)
                  .execution_options(synchronize_session=False))


def list_schedules(ctx: Context, *, now: datetime | None = None) -> list[dict]:
    """Every schedule with its next slot and its latest run."""
    now = now or utcnow()
    out = []
    with annotation.annotation_sessions(ctx)() as s:
        for sch in s.scalars(select(Schedule).order_by(Schedule.name)):
            run = s.scalars(select(AnnotationRun).where(AnnotationRun.schedule == sch.name)
                            .order_by(AnnotationRun.created_at.desc()).limit(1)).first()
            job = s.get(Job, run.job_id) if run and run.job_id else None
            out.append({
                "name": sch.name, "cron": sch.cron, "timezone": sch.timezone, "enabled": sch.enabled,
                "datasets": sch.spec["datasets"], "adapter": sch.spec["adapter"], "output": sch.spec.get("output"),
                "column": sch.spec["column"], "template": sch.spec["template"].get("source"),
                "next_at": _iso(next_slot(sch.cron, sch.timezone, now)) if sch.enabled else None,
                "last_fired_at": _iso(sch.last_fired_at),
                "last_run": None if run is None else {
                    "id": run.id, "job": run.job_id, "job_state": job.state if job else None,
                    "rows": run.rows, "submitted": run.submitted, "reused": run.reused,
                    "written_at": _iso(run.written_at), "error": run.error,
                },
            })
    return out


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() + "Z" if moment else None


# ---------------------------------------------------------------- firing


def run_now(ctx: Context, name: str) -> tuple[str, annotation.Plan]:
    """Start a run of the schedule at once (the same path as a firing); does not move its slot."""
    sch = get_schedule(ctx, name)
    run_id = annotation.create_run(ctx, resolved_spec(ctx.settings, sch.spec), schedule=name, detached=True)
    return run_id, annotation.submit_run(ctx, run_id)


def claim_slot(session, name: str, slot: datetime) -> bool:
    """Mark `slot` fired for `name` unless it (or a later one) already was. True: this caller fires it."""
    result = session.execute(
        update(Schedule)
        .where(Schedule.name == name, Schedule.enabled.is_(True),
               (Schedule.last_fired_at.is_(None)) | (Schedule.last_fired_at < slot))
        .values(last_fired_at=slot)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _enabled(ctx: Context) -> list[Schedule]:
    # Read and close: on SQLite every transaction holds the write lock (BEGIN IMMEDIATE).
    with annotation.annotation_sessions(ctx)() as s:
        return list(s.scalars(select(Schedule).where(Schedule.enabled.is_(True)).order_by(Schedule.name)))


def fire_due(ctx: Context, *, now: datetime) -> list[str]:
    """Fire every schedule with a due slot that no other beat has claimed. Returns the runs started."""
    started = []
    for sch in _enabled(ctx):
        slot = due_slot(sch, now)
        if slot is None:
            continue
        with transaction(annotation.annotation_sessions(ctx)) as s:
            if not claim_slot(s, sch.name, slot):
                continue  # another beat fired it
            run_id = annotation.create_run(ctx, resolved_spec(ctx.settings, sch.spec), schedule=sch.name,
                                         detached=True, session=s, slot=slot)
        started.append(run_id)
        _submit_logged(ctx, run_id, f"schedule {sch.name} fired for {slot:%Y-%m-%d %H:%M} UTC")
    return started


def _submit_logged(ctx: Context, run_id: str, what: str) -> None:
    try:
        plan = annotation.submit_run(ctx, run_id)
    except UsageError as e:  # recorded on the run; shown by `schedule list`
        log.error("%s: run %s not started: %s", what, run_id, e)
        return
    run = annotation.get_run(ctx, run_id)
    log.info("%s: run %s, job %s: %d distinct requests submitted, %d answered before%s", what, run_id,
             run.job_id or "(none needed)", len(plan.to_submit), plan.reused,
             f", waiting on {', '.join(plan.waits_on)}" if plan.waits_on else "")


def beat_tick(ctx: Context, *, now: datetime) -> float | None:
    """One pass of the beat: fire due schedules, resubmit stalled runs, write finished runs.
    Returns seconds until the next slot of any enabled schedule (None: there is none).
    Each step's failure is logged and does not stop the others."""
    steps = (
        ("firing schedules", lambda: fire_due(ctx, now=now)),
        ("resubmitting stalled runs", lambda: [_submit_logged(ctx, r, "stalled run") for r in annotation.stalled_runs(ctx)]),
        ("writing finished runs", lambda: [_log_written(r, w) for r, w in annotation.finish_detached_runs(ctx)]),
    )
    for what, step in steps:
        try:
            step()
        except Exception:  # the beat's one boundary: the next tick tries again
            log.exception("beat: %s failed", what)
    try:
        slots = [next_slot(s.cron, s.timezone, now) for s in _enabled(ctx)]
    except Exception:
        log.exception("beat: reading schedules failed")
        return None
    return max(0.0, (min(slots) - now).total_seconds()) if slots else None


def _log_written(run_id: str, written: annotation.Written) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in written.counts.items() if v)
    log.info("run %s written: %s (%s)", run_id, ", ".join(map(str, written.outputs)), counts or "no rows")
