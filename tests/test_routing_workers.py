"""Ordinary operations with real worker processes: an upgrade from a round-1 database with work queued,
`[adapters]` edited between worker restarts, an adapter retrained under the same name, and an adapter file
replaced in place while a worker runs. Nothing waits forever and no result names weights that did not
produce it.

Runs on SQLite and embedded Redis by default; on PostgreSQL and an external Redis with
LORABATCH_TEST_DATABASE_URL / LORABATCH_TEST_BROKER_URL.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
from sqlalchemy import MetaData, create_engine, select

from lorabatch.schemas.identity import adapter_sha256
from lorabatch.schemas.settings import load_settings
from lorabatch.schemas.tables import Job, Request, Worker
from lorabatch.store.context import Context
from tests.conftest import run_cli, tune_config, wait_for_job
from tests.test_migrations import _drop_everything, _round1
from tests.test_routing import job_row, lines, own_adapters, retrain, submit

pytestmark = pytest.mark.slow

FAST = {"engine": "instant", "lease_seconds": 5, "heartbeat_seconds": 0.5, "reconcile_seconds": 1,
        "publish_grace_seconds": 2, "max_batch_size": 8}


def fresh_ctx(config_path) -> Context:
    return Context(load_settings(config_path, environ={}))


def results(ctx: Context, job_id: str) -> list[Request]:
    with ctx.sessions() as s:
        return s.execute(select(Request).where(Request.job_id == job_id).order_by(Request.idx)).scalars().all()


T0 = datetime(2026, 11, 1, 12, 0, 0)


def round1_database_with_queued_job(url: str) -> str:
    """A round-1 database (no version table, round 1's columns) holding one queued job of 3 requests."""
    if not url.startswith("sqlite"):
        _drop_everything(url)
    _round1(url)
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine, only=["lb_jobs", "lb_requests"])
    with engine.begin() as conn:
        conn.execute(meta.tables["lb_jobs"].insert(), [dict(
            id="job-round1", name="before the upgrade", state="queued", priority=5, idempotency_key=None, source=None,
            schedule=None, created_at=T0, started_at=None, finished_at=None, total=3, n_queued=3, n_running=0,
            n_succeeded=0, n_failed=0, n_cancelled=0, prompt_tokens=0, completion_tokens=0)])
        conn.execute(meta.tables["lb_requests"].insert(), [dict(
            job_id="job-round1", idx=i, custom_id=f"q{i}", adapter=adapter, prompt=f"queued before the upgrade {i}",
            messages=None, params={"max_new_tokens": 4}, state="queued", attempts=0, worker_id=None, claimed_at=None,
            finished_at=None, output=None, finish_reason=None, prompt_tokens=None, completion_tokens=None, error=None)
            for i, adapter in enumerate(["sft", "base", "dpo"])])
    engine.dispose()
    return "job-round1"


def test_upgrade_from_round1_with_work_queued_runs_it(config_path, database_url, start_worker):
    """A round-1 database holding a queued job, `lorabatch db upgrade`, a worker started: the job runs to
    completion (nothing pinned it to a deployment; the first claim pins its base model and adapters),
    and status never claims a live worker serves it while none does."""
    tune_config(config_path, "worker", **FAST)
    job_id = round1_database_with_queued_job(database_url)
    r = run_cli(config_path, "db", "upgrade")
    assert r.returncode == 0, r.stderr
    r = run_cli(config_path, "status", job_id)
    assert r.returncode == 0 and "no live worker: the job waits until you start one" in r.stdout, r.stdout
    worker = start_worker()
    ctx = fresh_ctx(config_path)
    summary = wait_for_job(ctx, job_id, timeout=120, workers=[worker])
    assert summary["counts"]["succeeded"] == 3, summary
    job = job_row(ctx, job_id)
    assert job.deployment == ctx.deployment.id
    assert job.adapter_pins == {a: ctx.deployment.adapters[a] for a in ("sft", "dpo")}
    assert {r.adapter: r.adapter_sha256 for r in results(ctx, job_id)} == {
        "sft": ctx.deployment.adapters["sft"], "dpo": ctx.deployment.adapters["dpo"], "base": None}
    ctx.close()


def test_adapter_edits_between_worker_restarts_strand_nothing(config_path, tmp_path, start_worker):
    """A job of 20 queued, a fifth adapter added to lorabatch.toml, the worker started: the job runs. Then a
    job queued, its adapter retrained under the same name, the worker restarted: that adapter's requests
    wait (status names it and `retarget`), the others run; after `retarget` they run on the new weights,
    and the results say which weights produced each."""
    tune_config(config_path, "worker", **FAST)
    copies = own_adapters(config_path, tmp_path, names=("sft", "dpo", "sft-ckpt39"))
    first = submit(config_path, tmp_path / "a.jsonl", lines(20))
    tune_config(config_path, "adapters", extra=str(copies["sft-ckpt39"]))
    worker = start_worker()
    ctx = fresh_ctx(config_path)
    assert wait_for_job(ctx, first, timeout=120, workers=[worker])["counts"]["succeeded"] == 20
    worker.stop()

    old = adapter_sha256(copies["sft"])
    second = submit(config_path, tmp_path / "b.jsonl", lines(6))  # 0, 2, 4: sft; 1, 3, 5: dpo
    retrain(copies["sft"], copies["sft-ckpt39"])
    new = adapter_sha256(copies["sft"])
    worker = start_worker()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job_row(ctx, second).counts()["succeeded"] < 3:
        time.sleep(0.3)
    time.sleep(2)  # long enough for the sft requests to run, if anything let them
    assert [(r.idx, r.state) for r in results(ctx, second)] == [
        (0, "queued"), (1, "succeeded"), (2, "queued"), (3, "succeeded"), (4, "queued"), (5, "succeeded")]
    out = run_cli(config_path, "status", second).stdout
    assert "adapter 'sft' changed" in out and f"lorabatch retarget {second} --adapter sft" in out, out

    r = run_cli(config_path, "retarget", second)
    assert r.returncode == 0 and "3 unfinished requests" in r.stderr, r.stderr
    assert wait_for_job(ctx, second, timeout=60, workers=[worker])["counts"]["succeeded"] == 6
    shas = {r.idx: r.adapter_sha256 for r in results(ctx, second)}
    assert shas[0] == shas[2] == shas[4] == new and shas[1] == adapter_sha256(copies["dpo"])
    assert {r.adapter_sha256 for r in results(ctx, first) if r.adapter == "sft"} == {old}, "results keep their sha256"
    assert job_row(ctx, second).retargets[0]["from"] == old
    ctx.close()


def test_adapter_replaced_in_place_mid_run_is_seen_at_the_next_load(config_path, tmp_path, start_worker):
    """A real engine runs a job on an adapter; its file is rewritten in place; the next job (pinned to the
    new weights by its submit) runs on them: its results name the new sha256, the first job's the old,
    and the worker's record in SQL serves the new weights."""
    tune_config(config_path, "worker", heartbeat_seconds=0.5, reconcile_seconds=1, max_batch_size=8)
    copies = own_adapters(config_path, tmp_path, names=("sft", "dpo"))
    worker = start_worker()
    ctx = fresh_ctx(config_path)
    old = adapter_sha256(copies["sft"])
    first = submit(config_path, tmp_path / "a.jsonl", lines(2, adapters=("sft",)))
    wait_for_job(ctx, first, timeout=180, workers=[worker])
    retrain(copies["sft"], copies["dpo"])  # same path, same inode, new bytes
    new = adapter_sha256(copies["sft"])
    second = submit(config_path, tmp_path / "b.jsonl", lines(2, adapters=("sft",)))
    assert job_row(ctx, second).adapter_pins == {"sft": new}
    summary = wait_for_job(ctx, second, timeout=180, workers=[worker])
    assert summary["counts"]["succeeded"] == 2, summary
    assert {r.adapter_sha256 for r in results(ctx, first)} == {old}
    assert {r.adapter_sha256 for r in results(ctx, second)} == {new}
    with ctx.sessions() as s:
        (w,) = s.execute(select(Worker)).scalars().all()
        assert w.adapters["sft"] == new and w.base == ctx.deployment.base
    ctx.close()
