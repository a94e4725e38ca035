"""Job status: counts (kept on the job row, never counted), tokens, throughput, ETA, and the live bar."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.producer.inputs import plural
from lorabatch.producer.jobs import find_job, workers_for_job
from lorabatch.schemas.states import JobState
from lorabatch.schemas.tables import Job, Request, utcnow

WATCH_INTERVAL = 0.5
"""Seconds between refreshes of `status --watch`."""
NO_PROGRESS_SECONDS = 60.0
"""An open job with queued requests, none running, and no request started or ended for this long:
`status` says "no progress for ..." instead of an ETA (workers replace lost messages well within a
minute with the default settings, so this means nothing can run it: see the worker line)."""


def job_summary(job: Job, *, now: datetime | None = None) -> dict:
    """What `status --json` prints: id, state, counts, tokens, throughput and ETA."""
    counts = job.counts()
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    end = job.finished_at or now or utcnow()
    elapsed = (end - job.started_at).total_seconds() if job.started_at else 0.0
    tokens_per_s = job.completion_tokens / elapsed if elapsed > 0 else None
    ran = counts["succeeded"] + counts["failed"]
    remaining = counts["queued"] + counts["running"]
    eta = remaining * elapsed / ran if ran and remaining and not JobState(job.state).is_final else None
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "schedule": job.schedule,
        "priority": job.priority,
        "counts": counts,
        "done": done,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "tokens_per_second": round(tokens_per_s, 1) if tokens_per_s else None,
        "elapsed_seconds": round(elapsed, 1),
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "created_at": job.created_at.isoformat() + "Z",
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
    }


def read_summary(sessions: sessionmaker[Session], job_id: str, *, lease_seconds: float | None = None) -> dict:
    """The job's summary (`job_id` may be a unique id prefix or a name); with `lease_seconds`, plus
    `workers`: live workers, those serving the job's deployment, and the latest heartbeat."""
    with sessions() as session:
        job = find_job(session, job_id)
        summary = job_summary(job)
        if lease_seconds is not None:
            summary["workers"] = workers_for_job(session, job, lease_seconds=lease_seconds)
            summary["no_progress_seconds"] = no_progress_seconds(session, job)
            if summary["no_progress_seconds"] is not None:
                summary["eta_seconds"] = None  # an ETA from the past rate would be a promise nobody keeps
        return summary


def no_progress_seconds(session: Session, job: Job, *, now: datetime | None = None) -> float | None:
    """How long an open job with queued requests and none running has gone without a request starting
    or ending, once that is NO_PROGRESS_SECONDS or more; None otherwise. (Read from the requests' times
    only in that case: a job with running requests is generating.)"""
    if JobState(job.state).is_final or not job.n_queued or job.n_running or not job.total:
        return None
    started, finished = session.execute(select(func.max(Request.claimed_at), func.max(Request.finished_at))
                                        .where(Request.job_id == job.id)).one()
    last = max(t for t in (job.created_at, job.started_at, started, finished) if t is not None)
    idle = ((now or utcnow()) - last).total_seconds()
    return round(idle, 1) if idle >= NO_PROGRESS_SECONDS else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def worker_note(summary: dict) -> str | None:
    """One line on who runs the job, or why nothing (or not all of it) will: None when the job has ended.
    The advice fits what is running: a worker of another base model, or one that lacks an adapter or
    serves other weights under its name, each needs its own fix."""
    w = summary.get("workers")
    if w is None or JobState(summary["state"]).is_final:
        return None
    if not w["live"]:
        return "no live worker: the job waits until you start one: lorabatch worker"
    if not w["serving"]:
        return (f"no live worker serves this job's base model ({plural(w['live'], 'live worker')} "
                f"{'serves' if w['live'] == 1 else 'serve'} another); "
                "start one whose [model] base is the model this job was submitted with")
    problems = []
    for name, a in w.get("adapters", {}).items():
        if a["serving"]:
            continue
        if a["other_weights"]:
            problems.append(
                f"adapter {name!r} changed since this job was pinned to it (weights {a['pinned'][:12]}, live workers "
                f"serve {', '.join(s[:12] for s in a['other_weights'])}): its requests wait; to run them on the "
                f"current weights: lorabatch retarget {summary['id']} --adapter {name}")
        else:
            have = "these weights" if a["pinned"] else "it"
            problems.append(
                f"no live worker serves adapter {name!r} ({plural(w['serving'], 'live worker')} of this base model "
                f"lack {have} under [adapters]): its requests wait; add it to their lorabatch.toml and restart them")
    if problems:
        return "; ".join(problems)
    n = w["serving"]
    return f"{n} live worker{'s' if n != 1 else ''}, last heartbeat {w['last_heartbeat'][11:19]} UTC"


def list_jobs(sessions: sessionmaker[Session], *, state: str | None = None, limit: int = 100) -> list[dict]:
    with sessions() as session:
        # total 0: a submit still inserting its requests (or one killed doing so): not a job yet
        stmt = select(Job).where(Job.total > 0).order_by(Job.created_at.desc()).limit(limit)
        if state:
            stmt = stmt.where(Job.state == state)
        return [job_summary(j) for j in session.execute(stmt).scalars()]


def format_summary(s: dict) -> str:
    c = s["counts"]
    parts = [f"job {s['id']}  {s['state']}  {s['done']}/{c['total']} done"]
    parts.append("  ".join(f"{k} {c[k]}" for k in ("queued", "running", "succeeded", "failed", "cancelled")))
    tps = f"{s['tokens_per_second']} tokens/s" if s["tokens_per_second"] else "- tokens/s"
    eta = f"ETA {s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else ""
    if s.get("no_progress_seconds") is not None:
        eta = f"no progress for {_duration(s['no_progress_seconds'])}; {c['queued']} queued, none running"
    parts.append(f"tokens in {s['prompt_tokens']} out {s['completion_tokens']}  {tps}  {eta}".rstrip())
    if note := worker_note(s):
        parts.append(note)
    return "\n".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def watch(sessions: sessionmaker[Session], job_id: str, *, console: Console | None = None,
          timeout: float | None = None, alive: Callable[[], bool] | None = None,
          lease_seconds: float | None = None) -> dict:
    """Show a live progress bar until the job ends, `timeout` seconds pass or `alive()` turns false;
    return the last summary. The time shown is the job's (since it started running), not the watcher's."""
    console = console or Console(stderr=True)
    summary = read_summary(sessions, job_id, lease_seconds=lease_seconds)
    job_id = summary["id"]
    deadline = time.monotonic() + timeout if timeout else None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TextColumn("{task.fields[clock]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=summary["counts"]["total"], detail="", clock="")
        while True:
            c = summary["counts"]
            tps = f" {summary['tokens_per_second']:.0f} tok/s" if summary["tokens_per_second"] else ""
            eta = f" ETA {summary['eta_seconds']:.0f}s" if summary["eta_seconds"] is not None else ""
            if summary.get("no_progress_seconds") is not None:
                eta = f" no progress for {_duration(summary['no_progress_seconds'])}"
            failed = f" failed {c['failed']}" if c["failed"] else ""
            note = worker_note(summary) if not c["running"] else None
            workers = f" | {note}" if note and note.startswith(("no live", "adapter")) else ""
            detail = f"{summary['state']}{failed}{tps}{eta}{workers}"
            bar.update(task, completed=summary["done"], detail=detail, clock=_clock(summary["elapsed_seconds"]))
            if (JobState(summary["state"]).is_final or (deadline and time.monotonic() > deadline)
                    or (alive and not alive())):
                return summary
            time.sleep(WATCH_INTERVAL)
            summary = read_summary(sessions, job_id, lease_seconds=lease_seconds)
