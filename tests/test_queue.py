"""The database as the queue of record, against a real Redis and a real database (no worker process):
each case of issue #11 that can be shown without generating, plus the transitions' own rules."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import TimeoutError as PoolTimeout

from lorabatch.schemas.tables import Job, Outbox, Request, Worker
from lorabatch.store import lifecycle
from lorabatch.store.db import transaction
from lorabatch.store.reconcile import reconcile
from lorabatch.store.retry import classify
from tests.conftest import _redis_client, run_cli


def lines(n: int, adapters=("sft", "dpo")) -> list[dict]:
    return [{"custom_id": f"r{i}", "adapter": adapters[i % len(adapters)], "prompt": f"item {i}",
             "max_new_tokens": 4} for i in range(n)]


def submit(config_path: Path, path: Path, rows: list[dict], *args: str) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(config_path, "submit", str(path), "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["id"]


def messages_for(broker_url: str, job_id: str) -> int:
    """Messages in Redis that reference `job_id` (queue lists of every deployment and priority)."""
    client = _redis_client(broker_url)
    n = 0
    for key in client.keys("lorabatch*"):
        if client.type(key) == b"list":
            n += sum(job_id.encode() in raw for raw in client.lrange(key, 0, -1))
    return n


def do_reconcile(ctx, **kw):
    return reconcile(ctx.sessions, ctx.celery, lease_seconds=30, max_attempts=3, **kw)


def test_redis_restarted_empty_then_a_submit_still_refills_older_jobs(config_path, tmp_path, ctx, redis_flushed):
    """Case 1: job A queued, Redis loses everything, job B is submitted; the next reconcile round still
    sees the reset (a producer never writes the marker) and publishes A's requests again."""
    do_reconcile(ctx)  # a worker's first round marks this Redis
    a = submit(config_path, tmp_path / "a.jsonl", lines(20))
    assert messages_for(redis_flushed, a) == 2
    _redis_client(redis_flushed).flushdb()
    b = submit(config_path, tmp_path / "b.jsonl", lines(5))
    assert messages_for(redis_flushed, a) == 0 and messages_for(redis_flushed, b) == 2
    report = do_reconcile(ctx)
    assert report.redis_was_reset
    assert messages_for(redis_flushed, a) == 2
    assert not do_reconcile(ctx).redis_was_reset, "refilled once, then marked"


def test_commit_then_crash_before_publish_is_repaired(config_path, tmp_path, ctx, redis_flushed, monkeypatch):
    """Case 2: a submit that dies after its commit and before publishing leaves an outbox row; a
    reconcile round publishes it once it is older than the grace, and never before."""
    import lorabatch.producer.submit as submit_module

    def die(*a, **k):
        raise SystemExit("killed between commit and publish")

    do_reconcile(ctx)  # a worker's first round marks this Redis
    monkeypatch.setattr(submit_module, "publish_owed", die)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines(10)))
    with pytest.raises(SystemExit):
        submit_module.submit_file(ctx, str(path))
    with ctx.sessions() as s:
        job = s.execute(select(Job)).scalar_one()
        assert (job.state, job.n_queued) == ("queued", 10)
        assert s.scalar(select(func.count()).select_from(Outbox)) == 1
    assert messages_for(redis_flushed, job.id) == 0
    do_reconcile(ctx)  # the row is younger than the grace: left to its publisher
    assert messages_for(redis_flushed, job.id) == 0
    report = do_reconcile(ctx, grace_seconds=0.001)
    assert report.published == 2 and messages_for(redis_flushed, job.id) == 2
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Outbox)) == 0


def test_claims_only_queued_requests_of_own_deployment(config_path, tmp_path, ctx):
    """A claim skips another deployment's job, cancelled and already running requests, and counts attempts."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(6))
    with transaction(ctx.sessions) as s:
        other = lifecycle.claim_requests(s, refs={job_id: [0, 1]}, worker_id="w-other", deployment="elsewhere",
                                         max_attempts=3)
        mine = lifecycle.claim_requests(s, refs={job_id: [0, 1, 2]}, worker_id="w1",
                                        deployment=ctx.deployment.id, max_attempts=3)
        again = lifecycle.claim_requests(s, refs={job_id: [0, 1, 2, 3]}, worker_id="w2",
                                         deployment=ctx.deployment.id, max_attempts=3)
    assert other.requests == []
    assert [r.idx for r in mine.requests] == [0, 1, 2] and all(r.attempts == 1 for r in mine.requests)
    assert [r.idx for r in again.requests] == [3], "requests held by w1 are not claimed twice"
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.n_queued, job.n_running) == ("running", 2, 4)


def test_cancel_reaches_work_a_worker_holds_but_has_not_admitted(config_path, tmp_path, ctx):
    """Held references are still queued in SQL: cancel takes them; a later claim finds nothing."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(8))
    with transaction(ctx.sessions) as s:
        lifecycle.claim_requests(s, refs={job_id: [0, 1]}, worker_id="w1", deployment=ctx.deployment.id,
                                 max_attempts=3)
    r = run_cli(config_path, "cancel", job_id)
    assert r.returncode == 0, r.stderr
    with transaction(ctx.sessions) as s:
        late = lifecycle.claim_requests(s, refs={job_id: list(range(8))}, worker_id="w1",
                                        deployment=ctx.deployment.id, max_attempts=3)
        assert late.requests == []
        outcomes = [lifecycle.Outcome(job_id, i, "partial", "cancelled", 1, 1, cancelled=True) for i in (0, 1)]
        assert lifecycle.record_outcomes(s, worker_id="w1", outcomes=outcomes) == 2
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        assert job.state == "cancelled" and job.counts()["cancelled"] == 8
        assert lifecycle.count_rows(s, job_id) == {"cancelled": 8}


def test_an_output_with_a_nul_character_is_stored_exactly(config_path, tmp_path, ctx):
    """Case 3: a NUL in a generated output is stored and read back exactly (PostgreSQL's text refuses
    it raw); so is an output that happens to start with the encoding's marker."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(2))
    with transaction(ctx.sessions) as s:
        lifecycle.claim_requests(s, refs={job_id: [0, 1]}, worker_id="w1", deployment=ctx.deployment.id,
                                 max_attempts=3)
    with transaction(ctx.sessions) as s:
        lifecycle.record_outcomes(s, worker_id="w1", outcomes=[
            lifecycle.Outcome(job_id, 0, "bad\x00byte\x01\x1f", "stop", 2, 2),
            lifecycle.Outcome(job_id, 1, "\ufdd0\"fine\"", "stop", 2, 2)])
    with ctx.sessions() as s:
        rows = s.execute(select(Request).where(Request.job_id == job_id).order_by(Request.idx)).scalars().all()
    assert (rows[0].state, rows[0].output, rows[0].error) == ("succeeded", "bad\x00byte\x01\x1f", None)
    assert (rows[1].state, rows[1].output) == ("succeeded", "\ufdd0\"fine\"")


def test_nul_bytes_are_refused_at_submit_with_line_numbers(config_path, tmp_path, ctx):
    """Case 3: a prompt holding NUL (which PostgreSQL cannot store) is refused at submit, exit 2, nothing created."""
    rows = lines(3)
    rows[1]["prompt"] = "zero \u0000 byte"
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(config_path, "submit", str(path))
    assert r.returncode == 2
    assert "line 2" in r.stderr and "NUL" in r.stderr
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Request)) == 0


@pytest.mark.parametrize("error, kind", [
    (PoolTimeout("QueuePool limit of size 5 overflow 10 reached"), "busy"),
    (Exception("DeadlockDetected: deadlock detected"), None),  # not a DBAPIError: a bug, raised
])
def test_transient_errors_are_classified(error, kind):
    """Case 3 and 5: a pool timeout is transient (waited out), unknown errors are not."""
    assert classify(error) == kind


def test_deadlock_and_lock_errors_are_conflicts_not_outages():
    from sqlalchemy.exc import OperationalError

    class DeadlockDetected(Exception):
        pass

    assert classify(OperationalError("UPDATE ...", {}, DeadlockDetected("deadlock detected"))) == "conflict"
    assert classify(OperationalError("SELECT 1", {}, OSError("connection refused"))) == "unreachable"


def test_claim_record_cancel_requeue_in_parallel_never_deadlock(config_path, tmp_path, ctx):
    """Case 5: claim, record, cancel and requeue on the same jobs from several threads at once; one lock
    order everywhere, so PostgreSQL never reports a deadlock (SQLite serialises anyway)."""
    jobs = [submit(config_path, tmp_path / f"in{i}.jsonl", lines(40)) for i in range(3)]
    errors: list[BaseException] = []
    dep = ctx.deployment.id

    def worker(name: str) -> None:
        try:
            for round_ in range(6):
                refs = {j: list(range(round_ * 6, round_ * 6 + 6)) for j in reversed(jobs)}
                with transaction(ctx.sessions) as s:
                    claim = lifecycle.claim_requests(s, refs=refs, worker_id=name, deployment=dep, max_attempts=9)
                outcomes = [lifecycle.Outcome(r.job_id, r.idx, "x", "stop", 1, 1) for r in claim.requests]
                with transaction(ctx.sessions) as s:
                    lifecycle.record_outcomes(s, worker_id=name, outcomes=outcomes[::2])
                with transaction(ctx.sessions) as s:
                    lifecycle.release_requests(s, worker_id=name, keys=[(o.job_id, o.idx) for o in outcomes[1::2]])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def canceller() -> None:
        try:
            for j in jobs:
                with transaction(ctx.sessions) as s:
                    lifecycle.cancel_job(s, j)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)] + [threading.Thread(target=canceller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with ctx.sessions() as s:
        for j in jobs:
            job = s.get(Job, j)
            rows = lifecycle.count_rows(s, j)
            assert {k: v for k, v in job.counts().items() if v and k != "total"} == rows, (job.counts(), rows)


def test_leases_are_read_on_the_database_clock(config_path, tmp_path, ctx, monkeypatch):
    """Case 8: a worker whose own clock runs an hour ahead is neither presumed dead nor alive forever."""
    import lorabatch.schemas.tables as tables

    with transaction(ctx.sessions) as s:
        lifecycle.heartbeat(s, worker_id="w-skewed", hostname="h", pid=1, deployment="d")
    real = tables.utcnow
    monkeypatch.setattr(tables, "utcnow", lambda: real() + timedelta(hours=1))
    with ctx.sessions() as s:
        live = lifecycle.live_workers(s, lease=timedelta(seconds=30))
        beat = s.get(Worker, "w-skewed").heartbeat_at
        now = lifecycle.db_now(s)
    assert [w.id for w in live] == ["w-skewed"]
    assert abs((now - beat).total_seconds()) < 5


def test_submit_does_not_hold_the_write_lock_while_it_reads(config_path, tmp_path, ctx):
    """Case 7: while a large file is read and validated, other writers get the database in between."""
    import time

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines(20000)))
    waits: list[float] = []
    done = threading.Event()

    def heartbeats() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            with transaction(ctx.sessions) as s:
                lifecycle.heartbeat(s, worker_id="w-beat", hostname="h", pid=1)
            waits.append(time.monotonic() - t0)
            time.sleep(0.1)

    t = threading.Thread(target=heartbeats)
    t.start()
    try:
        r = run_cli(config_path, "submit", str(path), timeout=300)
    finally:
        done.set()
        t.join()
    assert r.returncode == 0, r.stderr
    print(f"\nheartbeats during a 20,000-line submit: {len(waits)}, longest wait {max(waits):.3f}s")
    assert len(waits) > 5


def test_a_result_the_database_refuses_fails_that_request_never_strands_it(config_path, tmp_path, ctx, database_url):
    """PostgreSQL refuses a value (here a provenance field too long for its column; the base model's, as an
    adapter sha256 other than the job's pin is refused before it reaches the database): the recorder records
    that request as failed with the reason, and its neighbour as it was; nothing stays running."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite stores any length: only PostgreSQL refuses this value")
    from lorabatch.worker.recorder import Recorder

    job_id = submit(config_path, tmp_path / "in.jsonl", lines(2))
    with transaction(ctx.sessions) as s:
        lifecycle.claim_requests(s, refs={job_id: [0, 1]}, worker_id="w1", deployment=ctx.deployment.id,
                                 max_attempts=3)
    recorder = Recorder(ctx.sessions, ctx.celery, worker_id="w1")
    recorder.put([lifecycle.Outcome(job_id, 0, "fine", "stop", 2, 2, base_model="x" * 400),
                  lifecycle.Outcome(job_id, 1, "fine too", "stop", 2, 2)])
    recorder.close(timeout=60)
    with ctx.sessions() as s:
        rows = s.execute(select(Request).where(Request.job_id == job_id).order_by(Request.idx)).scalars().all()
    assert rows[0].state == "failed" and "could not be stored" in rows[0].error
    assert (rows[1].state, rows[1].output) == ("succeeded", "fine too")
