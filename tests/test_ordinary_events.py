"""Ordinary events of a deployment that must never strand work (issue 19): a database outage during
SIGTERM, a request that makes the engine raise, messages lost while Redis stays up, a database that
refuses writes for a while, outputs with NUL characters. Real worker processes, real Redis, real
databases; the instant engine where the model is beside the point."""

from __future__ import annotations

import signal
import time

import pytest

from tests.conftest import run_cli, tune_config, wait_for_job
from tests.test_faults import (FAST_RECOVERY, TcpCutter, assert_exactly_once, fault_worker, rows, submit_lines,
                               succeeded, tune_worker, wait_until, work)

pytestmark = pytest.mark.slow

INSTANT = {"engine": "instant", "instant_step_seconds": 0.05}


def test_sigterm_during_a_database_outage_exits(config_path, tmp_path, ctx, start_worker, database_url):
    """PostgreSQL cut off mid-job, then SIGTERM: the worker exits within a bounded time (its engine
    thread neither blocks in the cancel poll nor in a claim), and a second worker finishes the job."""
    if not database_url.startswith("postgresql"):
        pytest.skip("needs PostgreSQL over TCP (set LORABATCH_TEST_DATABASE_URL); SQLite has no network to lose")
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    cutter = TcpCutter((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=cutter.port).render_as_string(hide_password=False)
    tune_worker(config_path, **{**FAST_RECOVERY, **INSTANT, "lease_seconds": 10, "shutdown_grace_seconds": 1})
    n = 200
    try:
        job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
        tune_config(config_path, "service", database_url=proxied)
        w = start_worker()
        wait_until(lambda: succeeded(ctx, job_id) >= 10, what="progress before the outage", workers=[w])
        cutter.cut()
        time.sleep(3)  # the engine thread meets the outage (cancel polls, claims)
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        try:
            w.proc.wait(150)
        except Exception:  # noqa: BLE001 - report the hang with the log
            raise AssertionError(f"SIGTERM hung during the outage:\n{w.read_log()[-3000:]}") from None
        stopped = time.monotonic() - t0
        print(f"\nSIGTERM during a database outage: exited in {stopped:.1f}s")
    finally:
        cutter.close()
    tune_config(config_path, "service", database_url=database_url)
    w2 = start_worker()
    wait_for_job(ctx, job_id, workers=[w, w2], timeout=120)
    assert_exactly_once(ctx, job_id, n)


def test_outputs_with_nul_and_control_characters_come_back_exactly(config_path, tmp_path, ctx):
    """An engine output with NUL and other control characters is recorded as a success and returned
    exactly by `results` in jsonl, openai and csv (PostgreSQL's text refuses a raw NUL)."""
    import csv
    import io
    import json

    tune_worker(config_path, **FAST_RECOVERY, **INSTANT)
    outputs = ["a\x00b", "\x00", "tab\tcr\rlf\n\x01\x07\x1b[0m\x7f", "\ufdd0\"looks encoded\"", "plain"]
    lines = [{"custom_id": f"r{i}", "adapter": "base", "prompt": "ECHO:" + json.dumps(text), "max_new_tokens": 4}
             for i, text in enumerate(outputs)]
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", lines)
    w = fault_worker(config_path, tmp_path / "w.log")
    try:
        wait_for_job(ctx, job_id, workers=[w], timeout=120)
    finally:
        w.stop()
    assert [r.output for r in assert_exactly_once(ctx, job_id, len(outputs))] == outputs
    got = {}
    for fmt in ("jsonl", "openai", "csv"):
        out = tmp_path / f"out.{fmt}"
        r = run_cli(config_path, "results", job_id, "--format", fmt, "-o", str(out))
        assert r.returncode == 0, r.stderr
        text = out.open(newline="").read()
        if fmt == "csv":
            got[fmt] = [row["output"] for row in csv.DictReader(io.StringIO(text, newline=""))]
        elif fmt == "jsonl":
            got[fmt] = [json.loads(line)["output"] for line in text.splitlines()]
        else:
            got[fmt] = [json.loads(line)["response"]["body"]["choices"][0]["text"] for line in text.splitlines()]
    assert got == {"jsonl": outputs, "openai": outputs, "csv": outputs}


REFUSE = {
    "sqlite": ["CREATE TRIGGER lb_test_refuse BEFORE UPDATE ON lb_requests "
               "WHEN OLD.state = 'running' AND NEW.state <> 'running' "
               "BEGIN SELECT RAISE(ABORT, 'refusing writes for a while (test)'); END"],
    "postgresql": ["CREATE OR REPLACE FUNCTION lb_test_refuse() RETURNS trigger AS $$ BEGIN "
                   "RAISE EXCEPTION 'refusing writes for a while (test)'; END $$ LANGUAGE plpgsql",
                   "CREATE TRIGGER lb_test_refuse BEFORE UPDATE ON lb_requests FOR EACH ROW "
                   "WHEN (OLD.state = 'running' AND NEW.state <> 'running') EXECUTE FUNCTION lb_test_refuse()"],
}
ALLOW = {"sqlite": ["DROP TRIGGER lb_test_refuse"],
         "postgresql": ["DROP TRIGGER lb_test_refuse ON lb_requests", "DROP FUNCTION lb_test_refuse()"]}


def test_recorder_retries_a_database_that_refuses_writes_then_recovers(config_path, tmp_path, ctx, start_worker):
    """The database refuses every result (and every hand-back) for 8 s, then accepts them again: no
    batch is dropped, no request stays `running` under the live worker, the job ends exactly once."""
    from sqlalchemy import text

    tune_worker(config_path, **FAST_RECOVERY, **INSTANT)
    n = 120
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    w = start_worker()
    wait_until(lambda: succeeded(ctx, job_id) >= 8, what="first results", workers=[w])
    dialect = ctx.engine.dialect.name
    with ctx.engine.begin() as conn:
        for sql in REFUSE[dialect]:
            conn.execute(text(sql))
    time.sleep(8)
    refused_at = succeeded(ctx, job_id)
    with ctx.engine.begin() as conn:
        for sql in ALLOW[dialect]:
            conn.execute(text(sql))
    wait_for_job(ctx, job_id, workers=[w], timeout=90)
    assert_exactly_once(ctx, job_id, n)
    assert refused_at < n, "the refusal came while requests were still running"
    assert "recording" in w.read_log() and "failed" in w.read_log(), "the recorder met the refusal"
    assert w.proc.poll() is None


def test_a_request_that_makes_the_engine_raise_fails_alone(config_path, tmp_path, ctx):
    """A request on which the engine raises a Python exception counts an attempt each time: it ends
    failed with that exception after max_attempts (alone the last time); its neighbours succeed."""
    from lorabatch.producer.status import read_summary

    tune_worker(config_path, max_attempts=3, **FAST_RECOVERY, **INSTANT)
    lines = work(24, max_new_tokens=6)
    lines[5]["prompt"] = "RAISE: the engine raises on this one"
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", lines)
    workers = []
    deadline = time.monotonic() + 240
    try:
        while read_summary(ctx.sessions, job_id)["state"] != "completed":  # a supervisor restarting workers
            assert time.monotonic() < deadline, f"job did not end: {read_summary(ctx.sessions, job_id)['counts']}"
            if not workers or workers[-1].proc.poll() is not None:
                workers.append(fault_worker(config_path, tmp_path / f"w{len(workers)}.log"))
            time.sleep(0.3)
    finally:
        for w in workers:
            w.stop()
    rs = rows(ctx, job_id)
    assert rs[5].state == "failed" and "raised on this request 3 times" in rs[5].error, (rs[5].state, rs[5].error)
    assert "injected: the engine raises" in rs[5].error
    assert all(r.state == "succeeded" for r in rs if r.idx != 5), [(r.idx, r.state, r.attempts) for r in rs]
    assert all(r.attempts <= 3 for r in rs)
    print(f"\nengine raised on one request: {len(workers)} worker starts, attempts "
          f"{sorted(r.attempts for r in rs if r.attempts > 1)}")


def _queue_lists(client) -> list[bytes]:
    return [k for k in client.scan_iter(match="lorabatch*") if client.type(k) == b"list"]


def test_a_deleted_queue_key_is_replaced_by_the_workers(config_path, tmp_path, ctx, start_worker, redis_flushed):
    """The queue lists deleted mid-job while Redis stays up (its epoch key kept, so no reset is seen):
    the workers' own reconcile publishes the queued requests again within the bound; the job ends
    exactly once with nobody running `lorabatch reconcile`."""
    from lorabatch.store.lost_messages import bound_seconds
    from tests.conftest import _redis_client

    options = {**FAST_RECOVERY, **INSTANT, "max_batch_size": 4}
    tune_worker(config_path, **options)
    n = 400
    w = start_worker()
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    client = _redis_client(redis_flushed)
    wait_until(lambda: succeeded(ctx, job_id) >= 40, what="progress before the loss", workers=[w])
    deleted = _queue_lists(client)
    assert deleted, "the job's messages were waiting in a queue list"
    client.delete(*deleted)
    lost_at, left = time.monotonic(), n - succeeded(ctx, job_id)
    bound = bound_seconds(reconcile_seconds=options["reconcile_seconds"], heartbeat_seconds=options["heartbeat_seconds"])
    wait_until(lambda: _queue_lists(client), timeout=bound + 10, what="messages published again", workers=[w])
    republished = time.monotonic() - lost_at
    wait_for_job(ctx, job_id, workers=[w], timeout=120)
    assert_exactly_once(ctx, job_id, n)
    assert "had no message in flight" in w.read_log()
    print(f"\nqueue key deleted with {left} requests left: messages back after {republished:.1f}s "
          f"(bound {bound:.1f}s), job done {time.monotonic() - lost_at:.1f}s after the loss")
    assert republished <= bound + 5


def test_a_killed_workers_held_messages_come_back_before_the_visibility_timeout(config_path, tmp_path, ctx,
                                                                                start_worker):
    """A worker SIGKILLed mid-job holds unacknowledged messages that Redis would give out only after
    the visibility timeout (300 s here); the workers' reconcile publishes their requests again within
    the bound, and a restarted worker finishes the job exactly once, long before that."""
    options = {**FAST_RECOVERY, **INSTANT, "visibility_timeout": 300, "max_batch_size": 4}
    tune_worker(config_path, **options)
    n = 300
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    w = start_worker()
    wait_until(lambda: succeeded(ctx, job_id) >= 40, what="progress before the kill", workers=[w])
    w.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    w2 = start_worker()
    wait_for_job(ctx, job_id, workers=[w, w2], timeout=150)
    took = time.monotonic() - killed_at
    assert_exactly_once(ctx, job_id, n)
    print(f"\nworker SIGKILLed: job done {took:.1f}s later (visibility timeout 300 s)")
    assert took < 150
