"""A small job submitted while a big one runs: how soon its results come, with continuous batching.

    python bench/latency_bench.py            # demo model, embedded Redis and SQLite, one worker

One worker (batches of 16) runs a big job (600 requests, 48 new tokens each, eos ignored). A few
seconds in, a small job of 8 requests (8 new tokens each) is submitted, once at the default priority
and once at priority 9 (first). Reported per small job: seconds from submit to its first result and to its
last, and for its requests the seconds from admission (claimed_at) to their result (finished_at)
against the worker's decode step time: with rows joining the running batch and results recorded as
each row ends, a request admitted mid-batch ends within about its own number of steps, not when the
batch it joined drains.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.e2e_bench import Deployment  # noqa: E402


def lines(n: int, *, prefix: str, max_new_tokens: int, ignore_eos: bool = False) -> list[dict]:
    adapters = ["sft", "sft-ckpt39", "dpo-ckpt3", "dpo", "base"]
    return [{"custom_id": f"{prefix}{i}", "adapter": adapters[i % 5], "prompt": f"Item {i}: a few words about {prefix}",
             "max_new_tokens": max_new_tokens} for i in range(n)]


def submit(dep: Deployment, tmp: Path, rows: list[dict], name: str, priority: int = 5) -> str:
    from lorabatch.producer.submit import submit_file

    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return submit_file(dep.ctx, str(path), priority=priority).job_id


def small_job_timings(dep: Deployment, job_id: str, submitted: float) -> dict:
    from sqlalchemy import select

    from lorabatch.schemas.tables import Request

    first = None
    while True:
        with dep.ctx.sessions() as s:
            rows = s.execute(select(Request).where(Request.job_id == job_id)).scalars().all()
        done = [r for r in rows if r.state == "succeeded"]
        if done and first is None:
            first = time.monotonic() - submitted
        if len(done) == len(rows):
            last = time.monotonic() - submitted
            break
        time.sleep(0.05)
    in_batch = [(r.finished_at - r.claimed_at).total_seconds() for r in rows]
    return {"first_result_s": round(first, 2), "all_results_s": round(last, 2),
            "admission_to_result_s_median": round(statistics.median(in_batch), 2),
            "admission_to_result_s_max": round(max(in_batch), 2),
            "new_tokens": max(r.completion_tokens for r in rows)}


def main() -> int:
    from lorabatch.demo.build import build_demo

    with tempfile.TemporaryDirectory(prefix="lorabatch-latency-") as d:
        tmp = Path(d)
        root = build_demo(tmp / "demo")
        dep = Deployment(root, tmp, max_batch_size=16, max_batch_tokens=16384)
        try:
            big_rows = lines(600, prefix="big", max_new_tokens=48)
            big = submit(dep, tmp, big_rows, "big")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4:
                time.sleep(0.1)
            report = {}
            for priority in (9, 5):  # urgent first, while the big job still has most of its work
                small = submit(dep, tmp, lines(8, prefix=f"small{priority}", max_new_tokens=8), f"small{priority}",
                               priority=priority)
                report[f"priority {priority}"] = small_job_timings(dep, small, time.monotonic())
            tokens = dep.wait([big])
            with dep.ctx.sessions() as s:
                from lorabatch.schemas.tables import Job

                job = s.get(Job, big)
                step = (job.finished_at - job.started_at).total_seconds() * 16 / max(tokens, 1)
            report["decode step (big job's wall time x 16 rows / its tokens)"] = f"{step * 1000:.0f} ms"
        finally:
            dep.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
