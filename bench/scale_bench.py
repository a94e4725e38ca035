"""Submitting a very large file: time, peak memory, Redis bytes per queued request, status latency, and
what one read of the lost-message sweep costs over the queued job.

    python bench/scale_bench.py [--lines 1000000] [--database postgresql]

Runs `lorabatch submit` as its own process on embedded defaults (embedded Redis, SQLite; or a scratch
PostgreSQL database, `lorabatch_scale` on 127.0.0.1) in a fresh temporary state directory, so nothing
else is touched. No worker runs; instead a thread of
this process writes a worker's heartbeat every 0.25 s, as a worker would, and the longest wait for
one (SQLite's write lock held by the submit) is reported: a gap near the lease would get a live
worker presumed dead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

ADAPTERS = ["sft", "sft-ckpt39", "dpo-ckpt3", "dpo", "base"]


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"row-{i}", "adapter": ADAPTERS[i % 5],
                                "prompt": f"Summarise item {i}: the quick brown fox jumps over the lazy dog.",
                                "max_new_tokens": 64}) + "\n")


def redis_used_memory(url: str) -> int:
    import redis

    client = redis.Redis(unix_socket_path=url[len("redis+socket://"):])
    return int(client.info("memory")["used_memory"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                    help="sqlite (embedded) or postgresql (a scratch database on 127.0.0.1, trust auth)")
    args = ap.parse_args()

    from lorabatch.producer.status import read_summary
    from lorabatch.schemas.settings import load_settings
    from lorabatch.store import broker, lost_messages
    from lorabatch.store.context import Context

    with tempfile.TemporaryDirectory(prefix="lorabatch-scale-") as tmp:
        tmp = Path(tmp)
        cfg = tmp / "lorabatch.toml"
        database = ""
        if args.database == "postgresql":
            from bench.soak import scratch_postgres

            database = f'database_url = "{scratch_postgres("lorabatch_scale")}"\n'
        cfg.write_text("[adapters]\n" + "".join(f'{a} = "adapters/{a}"\n' for a in ADAPTERS[:4])
                       + f'\n[service]\nstate_dir = "{tmp / "state"}"\n' + database)
        infile = tmp / "in.jsonl"
        t0 = time.perf_counter()
        write_input(infile, args.lines)
        print(f"wrote {args.lines} lines ({infile.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s")

        settings = load_settings(cfg, environ={})
        url = broker.ensure_embedded_redis(settings.state_path)
        before = redis_used_memory(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
        ctx = Context(settings)
        ctx.engine  # noqa: B018 - the schema exists before the heartbeats start
        beats: list[float] = []
        done = threading.Event()

        def heartbeats() -> None:
            from lorabatch.store import lifecycle
            from lorabatch.store.db import transaction

            while not done.wait(0.25):
                t = time.perf_counter()
                with transaction(ctx.sessions) as s:
                    lifecycle.heartbeat(s, worker_id="bench-beat", hostname="bench", pid=os.getpid())
                beats.append(time.perf_counter() - t)

        beater = threading.Thread(target=heartbeats)
        beater.start()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "lorabatch.cli", "--config", str(cfg), "submit",
                                 str(infile), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        beater.join()
        out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
        if status != 0:
            raise SystemExit(f"submit failed: {err}")
        job_id = json.loads(out)["id"]
        per_request = (redis_used_memory(url) - before) / args.lines

        read_summary(ctx.sessions, job_id)
        t0 = time.perf_counter()
        rounds = 200
        for _ in range(rounds):
            summary = read_summary(ctx.sessions, job_id)
        status_ms = (time.perf_counter() - t0) / rounds * 1000
        assert summary["counts"]["queued"] == args.lines
        # One read of the lost-message sweep (every reconcile round, one worker at a time): every
        # message in Redis and every queued row of the job, a page at a time. All have messages here.
        t0 = time.perf_counter()
        assert lost_messages.unmessaged(ctx.sessions, ctx.celery, heartbeat_seconds=5.0) == {}
        sweep_s = time.perf_counter() - t0
        ctx.close()
        broker.stop_embedded_redis(settings.state_path)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| lines | submit wall | lines/s | submit peak RSS | Redis bytes / queued request | status "
          "| heartbeats during submit | longest heartbeat wait | lost-message sweep, one read |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.lines:,} | {wall:.1f} s | {args.lines / wall:,.0f} | {usage.ru_maxrss / 1024:.0f} MB "
          f"| {per_request:.0f} | {status_ms:.2f} ms | {len(beats)} | {max(beats):.2f} s | {sweep_s:.2f} s |")


if __name__ == "__main__":
    main()
