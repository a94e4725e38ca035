"""Job status: counts (kept on the job row, never counted), tokens, throughput, ETA, and the live bar."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lorabatch import lifecycle
from lorabatch.schemas.states import JobState
from lorabatch.schemas.tables import Job, utcnow

WATCH_INTERVAL = 0.5
"""Seconds between refreshes of `status --watch`."""


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


def read_summary(sessions: sessionmaker[Session], job_id: str) -> dict:
    with sessions() as session:
        return job_summary(lifecycle.get_job(session, job_id))


def list_jobs(sessions: sessionmaker[Session], *, state: str | None = None, limit: int = 100) -> list[dict]:
    with sessions() as session:
        stmt = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if state:
            stmt = stmt.where(Job.state == state)
        return [job_summary(j) for j in session.execute(stmt).scalars()]


def format_summary(s: dict) -> str:
    c = s["counts"]
    parts = [f"job {s['id']}  {s['state']}  {s['done']}/{c['total']} done"]
    parts.append("  ".join(f"{k} {c[k]}" for k in ("queued", "running", "succeeded", "failed", "cancelled")))
    tps = f"{s['tokens_per_second']} tokens/s" if s["tokens_per_second"] else "- tokens/s"
    eta = f"ETA {s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else ""
    parts.append(f"tokens in {s['prompt_tokens']} out {s['completion_tokens']}  {tps}  {eta}".rstrip())
    return "\n".join(parts)


def watch(sessions: sessionmaker[Session], job_id: str, *, console: Console | None = None,
          timeout: float | None = None, alive: Callable[[], bool] | None = None) -> dict:
    """Show a live progress bar until the job ends, `timeout` seconds pass or `alive()` turns false;
    return the last summary."""
    console = console or Console(stderr=True)
    summary = read_summary(sessions, job_id)
    deadline = time.monotonic() + timeout if timeout else None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=summary["counts"]["total"], detail="")
        while True:
            c = summary["counts"]
            tps = f" {summary['tokens_per_second']:.0f} tok/s" if summary["tokens_per_second"] else ""
            eta = f" ETA {summary['eta_seconds']:.0f}s" if summary["eta_seconds"] is not None else ""
            failed = f" failed {c['failed']}" if c["failed"] else ""
            detail = f"{summary['state']}{failed}{tps}{eta}"
            bar.update(task, completed=summary["done"], detail=detail)
            if (JobState(summary["state"]).is_final or (deadline and time.monotonic() > deadline)
                    or (alive and not alive())):
                return summary
            time.sleep(WATCH_INTERVAL)
            summary = read_summary(sessions, job_id)
