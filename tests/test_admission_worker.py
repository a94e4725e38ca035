"""A real worker claims only the rows its batch can run under max_batch_tokens (embedded Redis, SQLite, a worker
process): claimed rows are `running` in the database, out of other workers' and cancel's reach."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from lorabatch.schemas.tables import Request, utcnow
from tests.conftest import run_cli, tune_config, wait_for_job

pytestmark = pytest.mark.slow

RECORDING_LAG = timedelta(seconds=1)
NEW = 600
BUDGET = 1400


def test_worker_claims_only_what_fits_max_batch_tokens(config_path: Path, tmp_path: Path, ctx, start_worker):
    """max_batch_tokens 1400 and rows of about 700 tokens: never more than two rows `running`; the job completes."""
    tune_config(config_path, "worker", max_batch_size=32, max_batch_tokens=BUDGET)
    adapters = ["sft", "dpo", "base", "sft-ckpt39"]
    # About 100 prompt tokens (the demo tokenizer spends about five tokens on each of these words) + 600 new
    # ones: each row generates for seconds (about 2.5 s here; with 250 new tokens, 1.05 s, too close to
    # RECORDING_LAG: a CI run once saw no snapshot early enough), so rows claimed in excess would be seen
    # `running` long before they end.
    lines = [{"custom_id": f"r{i}", "adapter": adapters[i % 4], "max_new_tokens": NEW,
              "prompt": " ".join(f"w{chr(97 + i)}x{j}" for j in range(20))} for i in range(12)]
    job_id = submit(config_path, tmp_path, lines)

    seen: list[tuple[datetime, list[int]]] = []  # (when, the rows `running` then)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with ctx.sessions() as s:
                running = s.scalars(select(Request.idx).where(Request.job_id == job_id, Request.state == "running"))
                seen.append((utcnow(), list(running)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    w = start_worker()
    try:
        summary = wait_for_job(ctx, job_id, workers=[w], timeout=240)
    finally:
        done.set()
        watcher.join()
    with ctx.sessions() as s:
        ended = {r.idx: r for r in s.scalars(select(Request).where(Request.job_id == job_id))}
    assert summary["counts"]["succeeded"] == len(lines), [(r.idx, r.state, r.error) for r in ended.values()][:3]
    costs = sorted(r.prompt_tokens + NEW for r in ended.values())
    assert costs[0] + costs[1] + costs[2] > BUDGET >= costs[-1] + costs[-2], f"two rows must fit, never three: {costs}"
    assert max(len(running) for _, running in seen) <= 3
    # Results are written by the worker's recorder thread, a moment after the row ended: a row whose result
    # lands within RECORDING_LAG of the moment it was seen `running` had ended by then (or was about to).
    generating = [(when, [i for i in running if ended[i].finished_at > when + RECORDING_LAG]) for when, running in seen]
    assert max(len(rows) for _, rows in generating) == 2, [g for g in generating if len(g[1]) > 2][:3]


def test_rows_claimed_beyond_the_budget_go_back_uncharged_and_run_later(config_path: Path, tmp_path: Path, ctx,
                                                                        start_worker):
    """Rows of very different costs (the learned mean misjudges some): what does not fit after a claim goes back
    to the queue uncharged, comes round again, and the job completes with every request run exactly once."""
    tune_config(config_path, "worker", max_batch_size=32, max_batch_tokens=700)
    adapters = ["sft", "dpo", "base", "sft-ckpt39"]
    # About 100 prompt tokens each; outputs of 450 or 40 tokens: rows cost about 550 or 140 tokens.
    lines = [{"custom_id": f"r{i}", "adapter": adapters[i % 4], "max_new_tokens": 450 if i % 2 else 40,
              "prompt": " ".join(f"w{chr(97 + i)}x{j}" for j in range(20))} for i in range(14)]
    job_id = submit(config_path, tmp_path, lines)
    w = start_worker()
    summary = wait_for_job(ctx, job_id, workers=[w], timeout=300)
    with ctx.sessions() as s:
        ended = list(s.scalars(select(Request).where(Request.job_id == job_id)))
    assert summary["counts"]["succeeded"] == len(lines), [(r.idx, r.state, r.error) for r in ended][:3]
    assert [r.attempts for r in ended] == [1] * len(lines)  # handed back uncharged: one attempt each


def submit(config_path: Path, tmp_path: Path, lines: list[dict]) -> str:
    """Submit these native lines with `lorabatch submit`; the job's id."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = run_cli(config_path, "submit", str(path), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["id"]
