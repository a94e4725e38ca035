"""Prometheus metrics: the worker's (worker.metrics) and the job counters from SQL (producer.metrics),
each served over HTTP with the names their module documents and values that add up."""

from __future__ import annotations

import re
import urllib.request
from datetime import timedelta
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from lorabatch.cli.metrics import metrics_command
from lorabatch.producer import metrics as producer_metrics
from lorabatch.schemas.errors import ConfigError
from lorabatch.schemas.settings import Settings
from lorabatch.schemas.tables import Job, Worker, utcnow
from lorabatch.store.context import Context
from lorabatch.worker import metrics as worker_metrics
from lorabatch.worker.metrics import WorkerMetrics


def documented(module) -> set[str]:
    """The metric names in the table of a module's docstring."""
    return set(re.findall(r"^\| (lorabatch_\w+) \|", module.__doc__, re.M))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from Prometheus' text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> set[str]:
    """Family names as documented: counters with their _total suffix."""
    return {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_worker_metrics_endpoint_serves_the_documented_names():
    m = WorkerMetrics()
    port = m.serve(0, addr="127.0.0.1")
    try:
        for rows in (8, 16, 32):
            m.record_step(rows, 32, 0.05)
        m.record_finished("succeeded", "sql", prompt_tokens=10, completion_tokens=20)
        m.record_finished("succeeded", "sql", prompt_tokens=5, completion_tokens=7)
        m.record_finished("failed", "base", prompt_tokens=None, completion_tokens=None)
        m.adapter_event("load")
        m.adapter_event("load")
        m.adapter_event("eviction")
        m.db_retry()
        m.set_held(12)
        text = scrape(port)
    finally:
        m.close()
    assert documented(worker_metrics) <= families(text), documented(worker_metrics) - families(text)
    got = samples(text)
    assert got[("lorabatch_generated_tokens_total", (("adapter", "sql"),))] == 27
    assert got[("lorabatch_prompt_tokens_total", (("adapter", "sql"),))] == 15
    assert got[("lorabatch_requests_finished_total", (("adapter", "sql"), ("state", "succeeded")))] == 2
    assert got[("lorabatch_requests_finished_total", (("adapter", "base"), ("state", "failed")))] == 1
    assert got[("lorabatch_decode_steps_total", ())] == 3
    assert got[("lorabatch_decode_step_seconds_count", ())] == 3
    assert got[("lorabatch_decode_step_seconds_sum", ())] == pytest.approx(0.15)
    assert got[("lorabatch_batch_rows", ())] == 32 and got[("lorabatch_batch_max_rows", ())] == 32
    assert got[("lorabatch_batch_fill_ratio_sum", ())] / got[("lorabatch_batch_fill_ratio_count", ())] == pytest.approx(7 / 12)
    assert got[("lorabatch_batch_fill_ratio_bucket", (("le", "0.25"),))] == 1
    assert got[("lorabatch_adapter_events_total", (("kind", "load"),))] == 2
    assert got[("lorabatch_adapter_events_total", (("kind", "eviction"),))] == 1
    assert got[("lorabatch_adapter_events_total", (("kind", "merge_switch"),))] == 0
    assert got[("lorabatch_db_retries_total", ())] == 1
    assert got[("lorabatch_requests_held", ())] == 12


def test_worker_metrics_refuse_unknown_adapter_events_and_busy_ports():
    m = WorkerMetrics()
    with pytest.raises(ValueError):
        m.adapter_event("exploded")
    port = m.serve(0, addr="127.0.0.1")
    try:
        with pytest.raises(ConfigError, match=f"cannot serve metrics on port {port}"):
            worker_metrics.from_settings(SimpleNamespace(worker=SimpleNamespace(metrics_port=port)))
    finally:
        m.close()
    assert getattr(Settings().worker, "metrics_port", None) is None  # off by default
    assert worker_metrics.from_settings(Settings())._server is None


@pytest.fixture()
def job_ctx(tmp_path):
    """A SQLite database holding two unfinished jobs, one finished, and one live and one dead worker."""
    ctx = Context(Settings(database_url=f"sqlite:///{tmp_path / 'm.db'}", state_dir=str(tmp_path / "state")))
    now = utcnow()
    with ctx.sessions() as s, s.begin():
        s.add_all([
            Job(id="job-a", name="nightly", state="running", priority=7, total=10, n_queued=6, n_running=2,
                n_succeeded=1, n_failed=1, n_cancelled=0),
            Job(id="job-b", state="queued", priority=7, total=4, n_queued=4, n_running=0, n_succeeded=0,
                n_failed=0, n_cancelled=0),
            Job(id="job-c", state="completed", priority=2, total=3, n_queued=0, n_running=0, n_succeeded=3,
                n_failed=0, n_cancelled=0),
            Worker(id="w-live", hostname="h", pid=1, heartbeat_at=now),
            Worker(id="w-dead", hostname="h", pid=2, heartbeat_at=now - timedelta(hours=1)),
        ])
    yield ctx
    ctx.close()


def check_job_samples(text: str) -> None:
    assert documented(producer_metrics) <= families(text), documented(producer_metrics) - families(text)
    got = samples(text)
    assert got[("lorabatch_sql_up", ())] == 1
    assert got[("lorabatch_jobs", (("state", "running"),))] == 1
    assert got[("lorabatch_jobs", (("state", "queued"),))] == 1
    assert got[("lorabatch_jobs", (("state", "completed"),))] == 1
    assert got[("lorabatch_jobs", (("state", "cancelled"),))] == 0
    assert got[("lorabatch_queue_depth", (("priority", "7"),))] == 10
    assert ("lorabatch_queue_depth", (("priority", "2"),)) not in got  # finished jobs queue nothing
    a = {"job": "job-a", "name": "nightly", "priority": "7"}
    assert got[("lorabatch_job_requests", tuple(sorted({**a, "state": "queued"}.items())))] == 6
    assert got[("lorabatch_job_requests", tuple(sorted({**a, "state": "running"}.items())))] == 2
    assert not any(labels and dict(labels).get("job") == "job-c" for _, labels in got)
    assert got[("lorabatch_workers_alive", ())] == 1


def test_job_metrics_endpoint_serves_the_documented_names(job_ctx):
    from prometheus_client import start_http_server

    server, _thread = start_http_server(0, addr="127.0.0.1", registry=producer_metrics.job_registry(job_ctx))
    try:
        check_job_samples(scrape(server.server_port))
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_command_prints_the_job_counters(job_ctx, tmp_path):
    config = tmp_path / "lorabatch.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\ndatabase_url = "{job_ctx.settings.database_url}"\n')
    r = CliRunner().invoke(metrics_command, [], obj={"config": str(config)}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    check_job_samples(r.output)


def test_job_metrics_say_when_the_database_is_down(job_ctx):
    """A scrape while the database is unreachable answers lorabatch_sql_up 0 instead of failing."""
    from prometheus_client import generate_latest
    from sqlalchemy.exc import OperationalError

    registry = producer_metrics.job_registry(job_ctx)

    def down(*_a, **_k):
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    job_ctx.sessions = down  # the cached property, replaced on the instance
    got = samples(generate_latest(registry).decode())
    assert got == {("lorabatch_sql_up", ()): 0}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_metrics_after_a_real_job(config_path, tmp_path, ctx, start_worker):
    """A real worker with [worker] metrics_port serves the documented names, and after a 6-request job
    over two adapters they add up; `lorabatch metrics` shows the job completed."""
    import json
    import time

    from tests.conftest import run_cli, tune_config, wait_for_job

    port = free_port()
    tune_config(config_path, "worker", metrics_port=port, max_batch_size=4)
    lines = [{"custom_id": f"r{i}", "adapter": ("sft", "base")[i % 2], "prompt": f"Count to {i}:", "max_new_tokens": 6}
             for i in range(6)]
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(line) + "\n" for line in lines))
    worker = start_worker()
    r = run_cli(config_path, "submit", str(infile), "--json")
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["id"]
    summary = wait_for_job(ctx, job_id, workers=[worker])
    assert summary["counts"]["succeeded"] == 6, summary

    deadline = time.monotonic() + 30  # outcomes are recorded (and counted) just after the job's counts move
    while True:
        text = scrape(port)
        got = samples(text)
        finished = sum(v for (name, _), v in got.items() if name == "lorabatch_requests_finished_total")
        if finished >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert documented(worker_metrics) <= families(text), documented(worker_metrics) - families(text)
    assert finished == 6, text
    assert sum(v for (name, labels), v in got.items()
               if name == "lorabatch_requests_finished_total" and ("state", "succeeded") in labels) == 6
    generated = sum(v for (name, _), v in got.items() if name == "lorabatch_generated_tokens_total")
    assert 6 <= generated <= 36
    assert sum(v for (name, _), v in got.items() if name == "lorabatch_prompt_tokens_total") > 0
    steps = got[("lorabatch_decode_steps_total", ())]
    assert 6 <= steps <= 36 and got[("lorabatch_decode_step_seconds_count", ())] == steps
    assert got[("lorabatch_batch_max_rows", ())] == 4
    assert got.get(("lorabatch_adapter_events_total", (("kind", "load"),)), 0) == 1, "sft was loaded once"
    assert 0 < got[("lorabatch_batch_fill_ratio_sum", ())] <= steps

    r = CliRunner().invoke(metrics_command, [], obj={"config": str(config_path)}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    jobs = samples(r.output)
    assert jobs[("lorabatch_jobs", (("state", "completed"),))] == 1
    assert jobs[("lorabatch_workers_alive", ())] == 1
