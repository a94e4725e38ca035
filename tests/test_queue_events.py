"""Transitions around ordinary events (issue 19), against a real Redis and a real database, no worker
process: a submit killed mid-insert then retried with its idempotency key, a cancel while a submit
inserts, an orphan check racing a live claim, outputs with NUL and control characters. Then messages
lost while Redis stays up, with real workers and the instant engine: a message acknowledged on an
exception, keys evicted by a full Redis without noeviction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from lorabatch.schemas.tables import Job, Outbox, Request, Worker
from lorabatch.store import lifecycle
from lorabatch.store.db import transaction
from lorabatch.store.lost_messages import bound_seconds
from tests.conftest import run_cli, tune_config, wait_for_job
from tests.test_faults import (FAST_RECOVERY, assert_exactly_once, fault_worker, rows, submit_lines, succeeded,
                               tune_worker, wait_until, work)
from tests.test_ordinary_events import INSTANT
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


# ---------------------------------------------------------------- messages lost while Redis stays up


def _queue_lists(client) -> list[bytes]:
    return [k for k in client.scan_iter(match="lorabatch*") if client.type(k) == b"list"]


@pytest.mark.slow
def test_a_message_acknowledged_on_an_exception_is_replaced(config_path, tmp_path, ctx):
    """The task raises mid-job before its worker holds a message, so Celery acknowledges it (acks_late
    acks on an exception): its requests stay queued with no message anywhere; the worker's own sweep
    publishes them again within the bound, well before a visibility timeout would, and the job ends
    exactly once."""
    options = {**FAST_RECOVERY, **INSTANT, "max_batch_size": 4}
    tune_worker(config_path, **options)
    n, lost = 200, 120
    w = fault_worker(config_path, tmp_path / "w.log", env={"LORABATCH_TEST_TASK_RAISES": str(lost)})
    w.wait_ready()  # before the submit: its first reconcile would refill Redis, a second message per request
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    bound = bound_seconds(reconcile_seconds=options["reconcile_seconds"], heartbeat_seconds=options["heartbeat_seconds"])
    try:
        wait_until(lambda: "injected: the task raises on the message" in w.read_log(), what="the task raising",
                   workers=[w])
        raised_at = time.monotonic()
        wait_until(lambda: rows(ctx, job_id)[lost].state == "succeeded", timeout=bound + 10,
                   what="the acknowledged message's request run", workers=[w])
        replaced = time.monotonic() - raised_at
        wait_for_job(ctx, job_id, workers=[w], timeout=120)
    finally:
        w.stop()
    assert_exactly_once(ctx, job_id, n)
    log = w.read_log()
    assert "had no message in flight" in log, "the sweep, not a redelivery, brought it back"
    print(f"\ntask acknowledged on an exception: its request done {replaced:.1f}s later (bound {bound:.1f}s)")
    assert replaced <= bound + 5


@pytest.fixture()
def evicting_redis(tmp_path):
    """A Redis owned by the test that evicts at random when full (2 MB), no persistence, reporting
    every eviction on its keyspace-event channel; killed after the test."""
    import shutil

    import redis

    from lorabatch.store import broker
    from tests.test_faults import _free_port

    port = _free_port()
    binary = shutil.which("redis-server") or broker._redis_server_binary()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path), "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-random",
                             "--notify-keyspace-events", "Ee"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=5)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, timeout=10, what="the evicting Redis to start")
        yield f"redis://127.0.0.1:{port}/0", client
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_keys_evicted_by_a_full_redis_are_replaced(config_path, tmp_path, ctx, evicting_redis, start_worker):
    """A real Redis without noeviction (allkeys-random, 2 MB) filled by another tenant mid-job until it
    evicts one of lorabatch's queue lists (and whatever else it picks: bindings, the unacked index,
    held reports): the workers publish the lost requests again within the bound; the job ends exactly once."""
    url, client = evicting_redis
    tune_config(config_path, "service", broker_url=url)
    options = {**FAST_RECOVERY, **INSTANT, "max_batch_size": 4}
    tune_worker(config_path, **options)
    n = 200
    w = start_worker()  # ready before the submit: its first reconcile would refill Redis, a second message each
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    wait_until(lambda: succeeded(ctx, job_id) >= 40, what="progress before the evictions", workers=[w])
    events = client.pubsub()
    events.subscribe("__keyevent@0__:evicted")
    evicted: set[bytes] = set()
    lists = set(_queue_lists(client))
    assert lists, "the job's messages were waiting in a queue list"
    # Read from here on: random eviction may take the epoch key first, and the worker then refills
    # every queued request from SQL while the tenant is still writing (a second message each, so the
    # queue list evicted afterwards may cost nothing more). That refill is the repair too.
    seen = len(w.read_log())
    filled, deadline = 0, time.monotonic() + 30
    # Another tenant writes until a queue list holding lorabatch's messages was evicted (random
    # eviction: the lists are a few keys among a thousand, so it takes some megabytes).
    while not evicted & lists:
        assert time.monotonic() < deadline, f"no queue list evicted after {filled} filler keys: {sorted(evicted)[:20]}"
        with client.pipeline(transaction=False) as pipe:
            for i in range(filled, filled + 200):
                pipe.set(f"tenant:{i}", b"x" * 1024)
            pipe.execute()
        filled += 200
        while (event := events.get_message(timeout=0.01)) is not None:
            if event["type"] == "message":
                evicted.add(event["data"])
    events.close()
    lost_at, left = time.monotonic(), n - succeeded(ctx, job_id)
    ours = sorted(k.decode() for k in evicted if not k.startswith(b"tenant:"))
    for keys in iter(lambda: [k for k in client.scan_iter(match="tenant:*", count=1000)], []):
        client.delete(*keys)  # the tenant is done: memory is free again
    bound = bound_seconds(reconcile_seconds=options["reconcile_seconds"], heartbeat_seconds=options["heartbeat_seconds"])
    # The sweep, or the refill from SQL when the epoch key was among the evicted.
    wait_until(lambda: any(s in w.read_log()[seen:] for s in ("had no message in flight", "refilled from the database")),
               timeout=bound + 10, what="the lost requests published again", workers=[w])
    republished = time.monotonic() - lost_at
    wait_for_job(ctx, job_id, workers=[w], timeout=120)
    took = time.monotonic() - lost_at
    assert_exactly_once(ctx, job_id, n)
    print(f"\n{filled} filler keys of 1 KiB; lorabatch's keys evicted with {left} requests left: {ours}; "
          f"published again after {republished:.1f}s (bound {bound:.1f}s), job done {took:.1f}s after the loss")
    assert republished <= bound + 5
