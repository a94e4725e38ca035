"""lorabatch end to end (submit -> Redis -> worker process -> SQL) against the engine alone.

Same prompts as bench/engine_bench.py, but as users send them: native JSONL lines, greedy, up to
64 new tokens, eos honoured (so the engine-alone figure here also honours eos, and both produce the
same tokens). Also: 200 jobs of 2 requests each against one job of 400.

Each part runs on embedded defaults (embedded Redis, SQLite) in a fresh temporary state directory,
with one real `lorabatch worker` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorabatch.schemas.settings import BASE_ADAPTER

WORKER_READY_SECONDS = 180


@dataclass
class Timed:
    way: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class Deployment:
    """A config, an embedded Redis, SQLite and one worker process over the models in `root`."""

    def __init__(self, root: Path, tmp: Path, *, max_batch_size: int, max_batch_tokens: int):
        from lorabatch.cli.init import render_config
        from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
        from lorabatch.schemas.settings import load_settings
        from lorabatch.store.context import Context

        self.cfg = tmp / "lorabatch.toml"
        text = render_config(base=str(root / DEMO_MODEL_DIR), adapters={n: str(root / p) for n, p in DEMO_ADAPTERS.items()})
        text = text.replace("max_batch_size = 32", f"max_batch_size = {max_batch_size}")
        text = text.replace("max_batch_tokens = 16384", f"max_batch_tokens = {max_batch_tokens}")
        self.cfg.write_text(text + f'\n[service]\nstate_dir = "{tmp / "state"}"\n')
        self.settings = load_settings(self.cfg, environ={})
        self.ctx = Context(self.settings)
        self.log = (tmp / "worker.log").open("ab")
        self.start_worker()

    def start_worker(self) -> None:
        """Start one `lorabatch worker` process and wait until it has registered in the database."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
        self.worker = subprocess.Popen([sys.executable, "-m", "lorabatch.cli", "--config", str(self.cfg),
                                        "worker", "--loglevel", "warning"], stdout=self.log, stderr=subprocess.STDOUT,
                                       env=env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from sqlalchemy import func, select

        from lorabatch.schemas.tables import Worker

        deadline = time.monotonic() + WORKER_READY_SECONDS
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError("the benchmark worker exited; see its log")
            with self.ctx.sessions() as s:
                if s.scalar(select(func.count()).select_from(Worker).where(Worker.pid == self.worker.pid)):
                    return
            time.sleep(0.2)
        raise RuntimeError("the benchmark worker did not start")

    def submit(self, path: Path) -> str:
        from lorabatch.producer.submit import submit_file

        return submit_file(self.ctx, str(path)).job_id

    def wait(self, job_ids: list[str]) -> int:
        """Wait until every job ends; returns their completion tokens."""
        from sqlalchemy import select

        from lorabatch.schemas.tables import Job

        while True:
            with self.ctx.sessions() as s:
                jobs = s.execute(select(Job).where(Job.id.in_(job_ids))).scalars().all()
            if all(j.state in ("completed", "cancelled") for j in jobs):
                failed = sum(j.n_failed for j in jobs)
                if failed:
                    raise RuntimeError(f"{failed} requests failed in the benchmark")
                return sum(j.completion_tokens for j in jobs)
            time.sleep(0.2)

    def close(self) -> None:
        from lorabatch.store import broker

        self.worker.terminate()
        self.worker.wait(60)
        self.log.close()
        self.ctx.close()
        broker.stop_embedded_redis(self.settings.state_path)


def write_lines(path: Path, requests, *, prefix: str = "r") -> Path:
    with path.open("w") as f:
        for i, r in enumerate(requests):
            f.write(json.dumps({"custom_id": f"{prefix}{i}", "adapter": r.adapter, "prompt": r.prompt,
                                "max_new_tokens": r.params.max_new_tokens}) + "\n")
    return path


def bench_end_to_end(root: Path, requests, *, max_batch_size: int, max_batch_tokens: int,
                     rounds: int = 1) -> list[Timed]:
    """The engine alone (in this process) and lorabatch end to end, on the same requests, eos honoured.
    Every way runs `rounds` times, interleaved, and the best round counts (this machine is shared)."""
    from dataclasses import replace

    from bench.engine_bench import engine_for

    requests = [replace(r, params=replace(r.params, ignore_eos=False)) for r in requests]
    engine = engine_for(root, adapters=True, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
    engine.weights = "auto"
    engine.generate(requests[:10])  # warm-up
    best: dict[str, Timed] = {}

    def keep(t: Timed) -> None:
        print(f"  {t.way}: {t.tokens_per_s:.0f} tokens/s ({t.seconds:.1f} s)", file=sys.stderr, flush=True)
        if t.way not in best or t.tokens_per_s > best[t.way].tokens_per_s:
            best[t.way] = t

    with tempfile.TemporaryDirectory(prefix="lorabatch-bench-") as tmp:
        tmp = Path(tmp)
        dep = Deployment(root, tmp, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
        try:
            dep.wait([dep.submit(write_lines(tmp / "warm.jsonl", requests[:10], prefix="w"))])
            many = (requests * 2)[:400]
            for round_ in range(rounds):
                start = time.perf_counter()
                results = engine.generate(requests)
                keep(Timed("engine alone (auto, eos honoured)", sum(r.completion_tokens for r in results),
                           time.perf_counter() - start))
                start = time.perf_counter()
                tokens = dep.wait([dep.submit(write_lines(tmp / f"all{round_}.jsonl", requests))])
                keep(Timed("lorabatch end to end (submit, Redis, worker, SQL)", tokens, time.perf_counter() - start))
                start = time.perf_counter()
                tokens = dep.wait([dep.submit(write_lines(tmp / f"one400-{round_}.jsonl", many))])
                keep(Timed("end to end, 1 job of 400", tokens, time.perf_counter() - start))
                start = time.perf_counter()
                ids = [dep.submit(write_lines(tmp / f"small{round_}-{j}.jsonl", many[2 * j: 2 * j + 2],
                                              prefix=f"s{j}-")) for j in range(200)]
                tokens = dep.wait(ids)
                keep(Timed("end to end, 200 jobs of 2", tokens, time.perf_counter() - start))
        finally:
            dep.close()
    return list(best.values())


def print_e2e(shape: str, timed: list[Timed]) -> None:
    by = {t.way: t for t in timed}
    alone = timed[0].tokens_per_s
    print(f"\n## end to end, {shape}")
    print("| way | tokens | seconds | tokens/s | ratio |")
    print("|---|---|---|---|---|")
    one400 = by["end to end, 1 job of 400"].tokens_per_s
    for t in timed:
        if t.way.startswith("lorabatch end"):
            ratio = f"{t.tokens_per_s / alone:.2f} x engine alone"
        elif t.way.endswith("200 jobs of 2"):
            ratio = f"{t.tokens_per_s / one400:.2f} x 1 job of 400"
        else:
            ratio = ""
        print(f"| {t.way} | {t.tokens} | {t.seconds:.1f} | {t.tokens_per_s:.0f} | {ratio} |")


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.engine_bench import SHAPES, build_shape, load_model, make_workload
    from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR

    ap = argparse.ArgumentParser(description="lorabatch end to end against the engine alone, on one model shape")
    ap.add_argument("shape", nargs="?", default="demo", choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=1, help="runs of each way, interleaved; the best counts")
    args = ap.parse_args()
    cache = Path(os.environ.get("LORABATCH_BENCH_MODELS", Path(__file__).resolve().parent / "out" / "models"))
    root = build_shape(cache, args.shape)
    _, tok = load_model(root / DEMO_MODEL_DIR)
    reqs = make_workload(tok, n=256, adapters=[BASE_ADAPTER, *DEMO_ADAPTERS])
    print_e2e(args.shape, bench_end_to_end(root, reqs, max_batch_size=32, max_batch_tokens=16384, rounds=args.rounds))
