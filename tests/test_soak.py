"""The chaos soak's short version (bench/soak.py runs the long one): real worker processes killed at
random, Redis restarted empty, flushed or its queue keys deleted, requests the engine raises on,
adapter edits with worker restarts, database connections cut (PostgreSQL), submits and cancels all
along, after an upgrade from a round-1 database with work queued; every request ends exactly once
and the invariants hold throughout."""

from __future__ import annotations

import json
import os

import pytest

from bench.soak import BOUND_SECONDS, RedisServer, referenced, run_soak

pytestmark = pytest.mark.slow


def test_references_in_redis_are_read_back(tmp_path, ctx):
    """The soak's sampler sees every reference a submit publishes (else 'no message' could not be measured)."""
    from bench.soak import write_config
    from lorabatch.producer.submit import submit_file
    from lorabatch.schemas.settings import load_settings
    from lorabatch.store.context import Context

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        config = write_config(tmp_path, broker_url=redis.url, database_url=ctx.settings.database_url)
        c = Context(load_settings(config, environ={}))
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps({"custom_id": f"r{i}", "adapter": "sft", "prompt": "x"}) + "\n"
                                for i in range(20)))
        job_id = submit_file(c, str(path)).job_id
        assert referenced(redis.url) == {(job_id, i) for i in range(20)}
        c.close()
    finally:
        redis.kill()


def test_short_chaos_soak(tmp_path, database_url):
    """45 s of chaos with three workers: nothing lost, nothing doubled, counters true, no request left
    without a message beyond the bound."""
    report = run_soak(tmp_path, seconds=45, workers=3, database_url=database_url, seed=int(os.environ.get("SOAK_SEED", 1)),
                      check_every=15)
    print("\n" + json.dumps(report, indent=1))
    assert report["requests"] > 100
    assert report["lost"] == 0 and report["doubled"] == 0 and report["succeeded_without_output"] == 0
    assert report["counter_violations"] == []
    assert report["longest_without_message_s"] <= BOUND_SECONDS
    assert report["round1_job"] == "completed", "the job queued before the upgrade ran"
    assert report["raised_failed_with_error"] == report["raised_on"], report
    assert not any("engine raised" in e for e in report["other_failures"].values()), report["other_failures"]
    faults = ("kill worker", "redis restarted empty", "redis flushed", "queue keys deleted", "engine raises",
              "adapters edited", "database connections cut")
    assert sum(report["events"].get(f, 0) for f in faults) >= 3
