"""How long a worker crash or stop delays work, on the default worker settings.

`python bench/recovery_bench.py` (about 3 minutes on a 2-core CPU): the demo model, embedded Redis,
SQLite, real `lorabatch worker` processes, one job of 600 requests, default `[worker]` settings
(lease 30 s, heartbeat 5 s, reconcile every 15 s).

- SIGKILL: kill -9 the worker mid-job and start a replacement at once (what systemd's
  `Restart=always` or Docker's restart policy does). Prints when the requests the dead worker held
  were back in the queue and when the last of them finished, counted from the kill.
- SIGTERM: stop a worker mid-job. Prints how long it took to exit; what it held is handed back
  at once, so a replacement picks it up without waiting for any lease.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

N_REQUESTS = 600


def _held_by(dep, pid: int) -> tuple[str, list[int]]:
    """The worker id of process `pid` and the idxs it holds (state running)."""
    from sqlalchemy import select

    from lorabatch.schemas.tables import Request, Worker

    with dep.ctx.sessions() as s:
        worker_id = s.scalar(select(Worker.id).where(Worker.pid == pid))
        idxs = s.scalars(select(Request.idx).where(Request.worker_id == worker_id, Request.state == "running")).all()
    return worker_id, list(idxs)


def _states(dep, job_id: str, idxs: list[int]) -> list[tuple[str, str | None]]:
    from sqlalchemy import select

    from lorabatch.schemas.tables import Request

    with dep.ctx.sessions() as s:
        return list(s.execute(select(Request.state, Request.worker_id)
                              .where(Request.job_id == job_id, Request.idx.in_(idxs))))


def _succeeded(dep, job_id: str) -> int:
    from lorabatch.producer.status import read_summary

    return read_summary(dep.ctx.sessions, job_id)["counts"]["succeeded"]


def _start_job(dep, tmp: Path, requests, name: str) -> str:
    from bench.e2e_bench import write_lines

    job_id = dep.submit(write_lines(tmp / f"{name}.jsonl", requests, prefix=name))
    while _succeeded(dep, job_id) < len(requests) // 5:  # well under way
        time.sleep(0.05)
    return job_id


def bench_sigkill(dep, tmp: Path, requests) -> dict:
    job_id = _start_job(dep, tmp, requests, "kill")
    dead_id, held = _held_by(dep, dep.worker.pid)
    dep.worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    dep.worker.wait()
    dep.start_worker()
    ready = time.monotonic() - killed
    requeued = finished = None
    while finished is None:
        states = _states(dep, job_id, held)
        if requeued is None and all(w != dead_id for _, w in states):
            requeued = time.monotonic() - killed
        if all(st == "succeeded" for st, _ in states):
            finished = time.monotonic() - killed
        time.sleep(0.1)
    dep.wait([job_id])
    return {"held": len(held), "replacement_ready_s": ready, "requeued_s": requeued, "finished_s": finished,
            "job_done_s": time.monotonic() - killed}


def bench_sigterm(dep, tmp: Path, requests) -> dict:
    job_id = _start_job(dep, tmp, requests, "term")
    _, held = _held_by(dep, dep.worker.pid)
    t0 = time.monotonic()
    dep.worker.send_signal(signal.SIGTERM)
    dep.worker.wait(120)
    stopped = time.monotonic() - t0
    still_running = sum(st == "running" for st, _ in _states(dep, job_id, held))
    dep.start_worker()
    dep.wait([job_id])
    return {"held": len(held), "stopped_s": stopped, "left_running": still_running}


def main() -> int:
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.e2e_bench import Deployment
    from bench.engine_bench import build_shape, load_model, make_workload
    from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
    from lorabatch.schemas.settings import BASE_ADAPTER

    cache = Path(os.environ.get("LORABATCH_BENCH_MODELS", Path(__file__).resolve().parent / "out" / "models"))
    root = build_shape(cache, "demo")
    _, tok = load_model(root / DEMO_MODEL_DIR)
    requests = make_workload(tok, n=N_REQUESTS, adapters=[BASE_ADAPTER, *DEMO_ADAPTERS])
    with tempfile.TemporaryDirectory(prefix="lorabatch-bench-") as tmp:
        tmp = Path(tmp)
        dep = Deployment(root, tmp, max_batch_size=32, max_batch_tokens=16384)
        try:
            kill = bench_sigkill(dep, tmp, requests)
            term = bench_sigterm(dep, tmp, requests)
        finally:
            dep.close()
    print("\n## recovery, default worker settings (lease 30 s, heartbeat 5 s, reconcile 15 s), demo model")
    print("| event | requests the worker held | replacement ready | held requests back in queue | "
          "held requests finished | stop took |")
    print("|---|---|---|---|---|---|")
    print(f"| SIGKILL, replacement started at once | {kill['held']} | {kill['replacement_ready_s']:.1f} s | "
          f"{kill['requeued_s']:.1f} s | {kill['finished_s']:.1f} s | |")
    print(f"| SIGTERM | {term['held']} | | at once ({term['left_running']} left running) | | {term['stopped_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
