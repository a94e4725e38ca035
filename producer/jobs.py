"""Finding jobs (by id, unique id prefix or name), live workers as users see them, and deleting old jobs."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from lorabatch.schemas.errors import NotFound, UsageError
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.schemas.states import JobState, RequestState
from lorabatch.schemas.tables import Job, Outbox, Request, Worker, utcnow
from lorabatch.store import lifecycle

MAX_CANDIDATES_SHOWN = 10
DELETE_CHUNK = 500
"""Jobs deleted per statement by `delete_jobs_older_than`."""


def find_job(session: Session, ref: str) -> Job:
    """The job `ref` names: its id, a prefix of exactly one job's id, or the name of exactly one job.
    An ambiguous prefix or name is a usage error that lists the candidates."""
    job = session.get(Job, ref)
    if job is not None:
        return job
    pattern = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    stmt = (select(Job).where(or_(Job.id.like(pattern, escape="\\"), Job.id.like("job-" + pattern, escape="\\"),
                                  Job.name == ref))
            .order_by(Job.created_at.desc()).limit(MAX_CANDIDATES_SHOWN + 1))
    found = list(session.execute(stmt).scalars())
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"no job with id {ref!r}, nor one whose id starts so or that is so named; list jobs with `lorabatch jobs`.")
    shown = ", ".join(f"{j.id} ({j.name or 'no name'}, {j.state})" for j in found[:MAX_CANDIDATES_SHOWN])
    more = " and more" if len(found) > MAX_CANDIDATES_SHOWN else ""
    raise UsageError(f"{ref!r} matches {len(found) if not more else 'over ' + str(MAX_CANDIDATES_SHOWN)} jobs: "
                     f"{shown}{more}; give more of the id.")


def live_workers(session: Session, *, lease_seconds: float) -> list[Worker]:
    """Workers whose last heartbeat is within the lease (lifecycle's rule, on the database's clock)."""
    return lifecycle.live_workers(session, lease=timedelta(seconds=lease_seconds))


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() + "Z" if t else None


def worker_record(w: Worker, *, now: datetime | None = None) -> dict:
    """What `lorabatch workers --json` prints for one worker."""
    now = now or utcnow()
    return {
        "id": w.id,
        "host": w.hostname,
        "pid": w.pid,
        "deployment": w.deployment,
        "base": w.base,
        "adapters": w.adapters or {},
        "tokens_per_second": w.tokens_per_second,
        "running": w.running,
        "held": w.held,
        "requests_held": (w.running or 0) + (w.held or 0),
        "started_at": _iso(w.started_at),
        "last_heartbeat": _iso(w.heartbeat_at),
        "seconds_since_heartbeat": round((now - w.heartbeat_at).total_seconds(), 1),
    }


def workers_for_job(session: Session, job: Job, *, lease_seconds: float) -> dict:
    """Live workers as `status` shows them: how many, the latest heartbeat, how many serve the job's
    base model (all live ones while the job has none pinned yet), and per adapter it names: the
    weights it is pinned to, how many of those workers serve exactly them, and what else they serve
    under that name (the weights changed since)."""
    workers = live_workers(session, lease_seconds=lease_seconds)
    workers.sort(key=lambda w: w.heartbeat_at, reverse=True)
    base = [w for w in workers if job.deployment is None or w.deployment == job.deployment]
    pins = dict(job.adapter_pins or {})
    if not pins or None in pins.values() and not JobState(job.state).is_final:
        # upgraded jobs have no pins; unpinned names: what their unfinished requests name
        for name in session.execute(select(Request.adapter).where(
                Request.job_id == job.id, Request.state.in_((RequestState.QUEUED.value, RequestState.RUNNING.value)))
                .distinct()).scalars():
            pins.setdefault(name, None)
    pins.pop(BASE_ADAPTER, None)
    adapters = {}
    for name, pin in sorted(pins.items()):
        served = [(w.adapters or {}).get(name) for w in base]
        adapters[name] = {
            "pinned": pin,
            "serving": sum(1 for sha in served if sha is not None and (pin is None or sha == pin)),
            "other_weights": sorted({sha for sha in served if sha is not None and pin is not None and sha != pin}),
        }
    return {
        "live": len(workers),
        "serving": len(base),
        "adapters": adapters,
        "parked": list(job.parked or []),
        "last_heartbeat": _iso(workers[0].heartbeat_at) if workers else None,
    }


def delete_jobs_older_than(session: Session, age: timedelta, *, dry_run: bool = False) -> list[str]:
    """Delete ended jobs (completed or cancelled) that finished more than `age` ago, with their
    requests. Returns their ids. Running or queued jobs are never deleted, however old."""
    cutoff = utcnow() - age
    ended = [JobState.COMPLETED.value, JobState.CANCELLED.value]
    ids = list(session.execute(
        select(Job.id).where(Job.state.in_(ended), Job.finished_at.is_not(None), Job.finished_at < cutoff)
    ).scalars())
    if dry_run:
        return ids
    for i in range(0, len(ids), DELETE_CHUNK):
        chunk = ids[i:i + DELETE_CHUNK]
        # Requests first: SQLite enforces no ON DELETE CASCADE unless asked per connection.
        session.execute(delete(Request).where(Request.job_id.in_(chunk)))
        session.execute(delete(Outbox).where(Outbox.job_id.in_(chunk)))
        session.execute(delete(Job).where(Job.id.in_(chunk)))
    return ids


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '45m', '90s' or '2w' as a timedelta; a usage error otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    value, unit = text[:-1], text[-1:].lower()
    if unit not in units or not value.isdigit():
        raise UsageError(f"--older-than {text!r} is not an age; write a number and a unit, e.g. 30d, 12h, 2w.")
    return timedelta(seconds=int(value) * units[unit])
