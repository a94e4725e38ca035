"""Transitions around ordinary events (issue 19), against a real Redis and a real database, no worker
process: a submit killed mid-insert then retried with its idempotency key, a cancel while a submit
inserts, an orphan check racing a live claim, outputs with NUL and control characters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from lorabatch.schemas.tables import Job, Outbox, Request, Worker
from lorabatch.store import lifecycle
from lorabatch.store.db import transaction
from tests.conftest import run_cli
from tests.test_queue import lines, submit


def _claim(ctx, job_id: str, idxs: list[int], worker_id: str):
    with ctx.sessions() as s:
        deployment = s.get(Job, job_id).deployment
    with transaction(ctx.sessions) as s:
        return lifecycle.claim_requests(s, refs={job_id: idxs}, worker_id=worker_id, deployment=deployment,
                                        max_attempts=3)


def test_orphan_check_rechecks_liveness_after_taking_its_locks(config_path, tmp_path, ctx, monkeypatch):
    """A request that a live worker claimed between the orphan query and its locks is left alone."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(4))
    _claim(ctx, job_id, [0, 1], "w-dead")  # no heartbeat: presumed dead
    real_lock = lifecycle._lock_jobs

    def lock_after_a_live_claim(session, job_ids, **kw):
        # What another reconcile and a live worker did meanwhile: request 0 was put back and claimed anew.
        lifecycle.heartbeat(session, worker_id="w-live", hostname="h", pid=1)
        session.query(Request).filter(Request.job_id == job_id, Request.idx == 0).update({"worker_id": "w-live"})
        session.flush()
        return real_lock(session, job_ids, **kw)

    monkeypatch.setattr(lifecycle, "_lock_jobs", lock_after_a_live_claim)
    with transaction(ctx.sessions) as s:
        n = lifecycle.orphaned_requests(s, lease=timedelta(seconds=30), max_attempts=3)
    monkeypatch.setattr(lifecycle, "_lock_jobs", real_lock)
    with ctx.sessions() as s:
        by_idx = {r.idx: r for r in s.execute(select(Request).where(Request.job_id == job_id)).scalars()}
        assert s.get(Worker, "w-live") is not None
    assert n == 1, "only the dead worker's request is put back"
    assert (by_idx[0].state, by_idx[0].worker_id) == ("running", "w-live")
    assert by_idx[1].state == "queued"


def test_cancel_while_the_submit_inserts(ctx):
    """A job cancelled while its submit still inserts never shows a negative queue and ends cancelled
    when the submit finishes, with nothing owed to Redis."""
    with transaction(ctx.sessions) as s:
        lifecycle.create_job(s, job_id="job-inserting", name="x")
        lifecycle.add_requests(s, [{"job_id": "job-inserting", "idx": i, "custom_id": f"r{i}", "adapter": "sft",
                                    "prompt": "p", "params": {}, "state": "queued", "attempts": 0} for i in range(3)])
    with transaction(ctx.sessions) as s:
        job = lifecycle.cancel_job(s, "job-inserting")
        assert job.n_queued >= 0 and job.state == "cancelling"
    with transaction(ctx.sessions) as s:
        lifecycle.add_requests(s, [{"job_id": "job-inserting", "idx": 3, "custom_id": "r3", "adapter": "sft",
                                    "prompt": "p", "params": {}, "state": "queued", "attempts": 0}])
    with transaction(ctx.sessions) as s:
        lifecycle.open_job(s, "job-inserting", 4)
    with ctx.sessions() as s:
        job = s.get(Job, "job-inserting")
        assert (job.state, job.n_queued, job.n_cancelled, job.total) == ("cancelled", 0, 4, 4)
        assert lifecycle.count_rows(s, "job-inserting") == {"cancelled": 4}
        assert s.scalar(select(func.count()).select_from(Outbox)) == 0


def test_same_idempotency_key_after_a_submit_killed_mid_insert(config_path, tmp_path, ctx, monkeypatch):
    """A submit SIGKILLed while inserting leaves a hidden job; submitting again with the same key
    replaces it with a complete job instead of returning the hidden empty one."""
    import lorabatch.producer.submit as submit_module

    n = 60_000
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines(n)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    proc = subprocess.Popen([sys.executable, "-m", "lorabatch.cli", "--config", str(config_path), "submit", str(path),
                             "--idempotency-key", "nightly-1"], env=env, cwd=config_path.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, "the submit ended before it could be killed"
        with ctx.sessions() as s:
            inserted = s.scalar(select(func.count()).select_from(Request))
        if inserted:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with ctx.sessions() as s:
        hidden = s.execute(select(Job)).scalar_one()
        assert hidden.total == 0 and s.scalar(select(func.count()).select_from(Request)) < n
    monkeypatch.setattr(submit_module, "INSERT_STALE_SECONDS", 1.0)
    again = submit_module.submit_file(ctx, str(path), idempotency_key="nightly-1")
    assert again.created and again.total == n and again.job_id != hidden.id
    with ctx.sessions() as s:
        assert s.get(Job, hidden.id) is None, "the hidden job went, with its requests"
        assert s.scalar(select(func.count()).select_from(Request)) == n
        assert s.get(Job, again.job_id).n_queued == n
    assert submit_module.submit_file(ctx, str(path), idempotency_key="nightly-1").job_id == again.job_id


def test_status_says_when_a_job_makes_no_progress(config_path, tmp_path, ctx, monkeypatch):
    """A job with queued requests, none running and none started or ended for a while: status says
    "no progress for ..." instead of an ETA; before that, it does not."""
    import lorabatch.producer.status as status

    job_id = submit(config_path, tmp_path / "in.jsonl", lines(6))
    _claim(ctx, job_id, [0, 1], "w1")
    with transaction(ctx.sessions) as s:
        lifecycle.record_outcomes(s, worker_id="w1", outcomes=[lifecycle.Outcome(job_id, i, "ok", "stop", 1, 1)
                                                              for i in (0, 1)])
    fresh = status.format_summary(status.read_summary(ctx.sessions, job_id, lease_seconds=30))
    assert "no progress" not in fresh
    monkeypatch.setattr(status, "NO_PROGRESS_SECONDS", 1.0)
    time.sleep(1.5)
    summary = status.read_summary(ctx.sessions, job_id, lease_seconds=30)
    text = status.format_summary(summary)
    assert "no progress for 1s; 4 queued, none running" in text, text
    assert "ETA" not in text and summary["eta_seconds"] is None
