"""How many requests per second one database can feed: claims and records through real worker processes.

    python bench/db_scale.py                     # PostgreSQL on 127.0.0.1, 1, 2, 4 and 8 workers
    python bench/db_scale.py --workers 1 2 --requests 5000 --database sqlite

The workers run the instant engine (`[worker] engine = "instant"`, no sleep), so every request costs
only what lorabatch does around generation: a message through Redis, a claim, a record, a heartbeat's
share. A GPU worker that makes R requests/s needs the database to sustain R; the figure per worker
count says how many such workers one database feeds. Each run: one job of `--requests` requests over
three adapters, submitted once all workers are up; timed from the submit's return to the job's end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.soak import RedisServer, Workers, scratch_postgres, write_config  # noqa: E402


def drain_duplicates(ctx, redis_url: str, job_id: str, requests: int) -> dict:
    """Publish every reference of the finished job again (what a Redis refill does to work that had
    its messages after all) and time how fast the workers drain them: each claims nothing."""
    import redis

    from lorabatch.store import broker

    t0 = time.monotonic()
    for adapter in ("sft", "dpo", "base"):
        idxs = [i for i in range(requests) if ("sft", "dpo", "base")[i % 3] == adapter]
        broker.enqueue(ctx.celery, job_id, adapter, idxs, priority=5, deployment=ctx.deployment.id)
    published = time.monotonic() - t0
    client = redis.Redis.from_url(redis_url)
    while any(client.llen(k) for k in client.keys("lorabatch*") if client.type(k) == b"list") or client.hlen("unacked"):
        time.sleep(0.05)
    drained = time.monotonic() - t0
    return {"duplicate_refs": requests, "duplicates_publish_s": round(published, 2),
            "duplicates_drain_s": round(drained, 2), "duplicate_refs_per_s": round(requests / drained)}


def run(tmp: Path, *, workers: int, requests: int, database_url: str, duplicates: bool = False) -> dict:
    from sqlalchemy import func, select

    import bench.soak as soak
    from lorabatch.producer.submit import submit_file
    from lorabatch.schemas.settings import load_settings
    from lorabatch.schemas.tables import Job, Worker
    from lorabatch.store.context import Context

    soak.WORKER.update(instant_step_seconds=0.0, max_batch_size=32)
    redis = RedisServer(tmp / "redis")
    redis.start()
    config = write_config(tmp, broker_url=redis.url, database_url=database_url)
    ctx = Context(load_settings(config, environ={}))
    ctx.engine  # noqa: B018 - the schema exists before the workers start
    pool = Workers(config, tmp, workers)
    try:
        deadline = time.monotonic() + 120
        while True:
            with ctx.sessions() as s:
                if s.scalar(select(func.count()).select_from(Worker)) >= workers:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start")
            time.sleep(0.2)
        path = tmp / "in.jsonl"
        path.write_text("".join(json.dumps({"custom_id": f"r{i}", "adapter": ("sft", "dpo", "base")[i % 3],
                                            "prompt": f"request {i}", "max_new_tokens": 4}) + "\n"
                                for i in range(requests)))
        job_id = submit_file(ctx, str(path)).job_id
        cpu0 = database_cpu_seconds()
        t0 = time.monotonic()
        while True:
            with ctx.sessions() as s:
                job = s.get(Job, job_id)
                if job.state == "completed":
                    break
            time.sleep(0.1)
        seconds = time.monotonic() - t0
        db_ms = (database_cpu_seconds() - cpu0) * 1000 / requests
        out = {"workers": workers, "requests": requests, "seconds": round(seconds, 2),
               "requests_per_s": round(requests / seconds), "succeeded": job.n_succeeded,
               "postgres_cpu_ms_per_request": round(db_ms, 2)}
        if duplicates:
            out.update(drain_duplicates(ctx, redis.url, job_id, requests))
        return out
    finally:
        pool.stop()
        redis.kill()
        ctx.close()


def database_cpu_seconds() -> float:
    """CPU seconds used so far by this machine's PostgreSQL processes (0 when there are none)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            if "postgres" in fields[0]:
                utime, stime = fields[1].split()[11:13]
                total += (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--duplicates", action="store_true", help="also time draining a second copy of every message")
    p.add_argument("--database", default="postgresql", help="postgresql (scratch database on 127.0.0.1) or sqlite")
    args = p.parse_args(argv)
    rows = []
    for n in args.workers:
        with tempfile.TemporaryDirectory(prefix="lorabatch-dbscale-") as d:
            url = scratch_postgres("lorabatch_dbscale") if args.database == "postgresql" else f"sqlite:///{d}/db.sqlite"
            rows.append(run(Path(d), workers=n, requests=args.requests, database_url=url, duplicates=args.duplicates))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| worker processes | requests | seconds | requests/s | PostgreSQL CPU per request |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['requests']} | {r['seconds']} | {r['requests_per_s']} "
              f"| {r['postgres_cpu_ms_per_request']} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
