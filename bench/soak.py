"""Chaos soak: several worker processes, a stream of submits and cancels, and faults injected at random,
then a check that every request ended exactly once.

    python bench/soak.py                      # 10 minutes, 3 workers, PostgreSQL + a Redis of its own
    python bench/soak.py --minutes 2 --database sqlite

Workers run the instant engine (`[worker] engine = "instant"`, each step 50 ms, rows living 1-8
steps), so the soak exercises what lorabatch itself does, not the model. Faults, one every few
seconds: a worker SIGKILLed (restarted a second later), a job cancelled, Redis killed and restarted
empty, PostgreSQL's connections to the soak database terminated (PostgreSQL only).

Checked every `--check-every` seconds and at the end: every job's counters equal its row counts, and
no queued request of an open job is without a message (in a Redis queue, unacknowledged in Redis, or
owed in the outbox) for longer than the bound (reconcile interval + publish grace + 5 s). At the end,
once faults stop: every request has exactly one final state (lost = 0) and no result was counted
twice (doubled = 0). The short version runs in the test suite (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere
ADAPTERS = ["sft", "dpo", "base"]
WORKER = {"engine": "instant", "instant_step_seconds": 0.05, "max_batch_size": 16, "lease_seconds": 5,
          "heartbeat_seconds": 0.5, "reconcile_seconds": 1, "visibility_timeout": 10, "publish_grace_seconds": 3,
          "max_attempts": 50, "shutdown_grace_seconds": 2}
BOUND_SECONDS = WORKER["reconcile_seconds"] + WORKER["publish_grace_seconds"] + 5


class RedisServer:
    """A Redis of the soak's own (no persistence), so that it can be killed and restarted empty."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir, self.proc = workdir, None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from lorabatch.store.broker import _redis_server_binary

        binary = shutil.which("redis-server") or _redis_server_binary()
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.answers():
            if time.monotonic() > deadline:
                raise RuntimeError("redis did not start")
            time.sleep(0.05)

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_config(tmp: Path, *, broker_url: str, database_url: str) -> Path:
    worker = "\n".join(f"{k} = {json.dumps(v)}" for k, v in WORKER.items())
    adapters = "\n".join(f'{a} = "adapters/{a}"' for a in ADAPTERS if a != "base")
    path = tmp / "lorabatch.toml"
    path.write_text(f'[model]\nbase = "instant/none"\n\n[adapters]\n{adapters}\n\n[worker]\n{worker}\n\n'
                    f'[service]\nstate_dir = "{tmp / "state"}"\nbroker_url = "{broker_url}"\n'
                    f'database_url = "{database_url}"\n')
    return path


class Workers:
    def __init__(self, config: Path, tmp: Path, n: int) -> None:
        self.config, self.tmp = config, tmp
        self.procs: list[subprocess.Popen] = [self._start(i) for i in range(n)]

    def _start(self, i: int) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
        log = open(self.tmp / f"worker-{i}.log", "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([sys.executable, "-m", "lorabatch.cli", "--config", str(self.config), "worker",
                                 "--loglevel", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def kill_one(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.procs))
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()
        time.sleep(1)
        self.procs[i] = self._start(i)

    def revive(self) -> None:
        """Workers that exited (an engine failure, a lost database at start) are restarted, as a supervisor would."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                self.procs[i] = self._start(i)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def referenced(redis_url: str) -> set[tuple[str, int]] | None:
    """(job_id, idx) of every request some message in Redis names: queued or unacknowledged."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        raws = []
        for key in client.keys("lorabatch*"):
            if client.type(key) == b"list":
                raws += client.lrange(key, 0, -1)
        raws += [json.loads(v)[0] if isinstance(json.loads(v), list) else v for v in client.hvals("unacked")]
    except redis.RedisError:
        return None  # Redis is down right now: this sample does not count
    refs = set()
    for raw in raws:
        message = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        refs |= {(args[0], idx) for idx in args[2]}
    return refs


class Checker:
    """Invariants, sampled: counters equal rows; no queued request without a message beyond the bound."""

    def __init__(self, ctx, redis_url: str) -> None:
        self.ctx, self.redis_url = ctx, redis_url
        self.unmessaged_since: dict[tuple[str, int], float] = {}
        self.longest_unmessaged = 0.0
        self.violations: list[str] = []

    def sample(self) -> None:
        from sqlalchemy import select

        from lorabatch.schemas.tables import Job, Outbox, Request

        covered = referenced(self.redis_url)
        if covered is None:
            self.unmessaged_since.clear()
            return
        with self.ctx.sessions() as s:
            queued = set(s.execute(select(Request.job_id, Request.idx).join(Job, Job.id == Request.job_id).where(
                Request.state == "queued", Job.state.in_(["queued", "running"]), Job.total > 0)).all())
            for job_id, idxs in s.execute(select(Outbox.job_id, Outbox.idxs)):
                covered |= {(j, i) for j, i in queued if j == job_id and (idxs is None or i in idxs)}
        now = time.monotonic()
        missing = {tuple(k) for k in queued} - covered
        self.unmessaged_since = {k: self.unmessaged_since.get(k, now) for k in missing}
        if self.unmessaged_since:
            self.longest_unmessaged = max(self.longest_unmessaged, now - min(self.unmessaged_since.values()))

    def counters(self) -> None:
        from sqlalchemy import select

        from lorabatch.schemas.tables import Job
        from lorabatch.store import lifecycle
        from lorabatch.store.db import transaction

        with self.ctx.sessions() as s:
            ids = s.execute(select(Job.id).where(Job.total > 0)).scalars().all()
        for job_id in ids:
            with transaction(self.ctx.sessions) as s:  # the job row locked: no transition moves it meanwhile
                job = s.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
                rows = lifecycle.count_rows(s, job_id)
                counts = {k: v for k, v in job.counts().items() if v and k != "total"}
                if counts != rows:
                    self.violations.append(f"{job_id}: counters {counts} != rows {rows}")


def run_soak(tmp: Path, *, seconds: float, workers: int, database_url: str, seed: int = 0,
             check_every: float = 60.0, log=print) -> dict:
    from sqlalchemy import select

    from lorabatch.producer.submit import submit_file
    from lorabatch.schemas.settings import load_settings
    from lorabatch.schemas.tables import Job, Request
    from lorabatch.store import lifecycle
    from lorabatch.store.context import Context
    from lorabatch.store.db import transaction

    rng = random.Random(seed)
    redis = RedisServer(tmp / "redis")
    redis.start()
    config = write_config(tmp, broker_url=redis.url, database_url=database_url)
    ctx = Context(load_settings(config, environ={}))
    ctx.engine  # noqa: B018 - schema created before the workers race for it
    pool = Workers(config, tmp, workers)
    checker = Checker(ctx, redis.url)
    events: Counter[str] = Counter()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(0.25):
            try:
                checker.sample()
            except Exception as e:  # noqa: BLE001 - the database was just cut: next sample
                log(f"  (sample skipped: {type(e).__name__})")

    threading.Thread(target=sampler, daemon=True).start()
    jobs: list[str] = []
    started = last_check = time.monotonic()
    next_fault = started + rng.uniform(2, 5)
    try:
        while time.monotonic() - started < seconds:
            n = rng.randint(5, 60)
            path = tmp / "in.jsonl"
            path.write_text("".join(json.dumps({"custom_id": f"r{i}", "adapter": rng.choice(ADAPTERS),
                                                "prompt": f"soak {len(jobs)} {i}", "max_new_tokens": 8}) + "\n"
                                    for i in range(n)))
            try:
                jobs.append(submit_file(ctx, str(path)).job_id)
                events["submit"] += 1
            except Exception as e:  # noqa: BLE001 - Redis or the database down at this moment: a user retries
                events["submit refused"] += 1
                log(f"  submit refused: {str(e)[:100]}")
            if time.monotonic() >= next_fault:
                fault = rng.choice(["kill worker", "kill worker", "cancel job", "redis restarted empty"]
                                   + (["database connections cut"] if database_url.startswith("postgresql") else []))
                events[fault] += 1
                if fault == "kill worker":
                    pool.kill_one(rng)
                elif fault == "cancel job":
                    with transaction(ctx.sessions) as s:
                        running = s.execute(select(Job.id).where(Job.id.in_(jobs[-20:]), Job.state.in_(
                            ["queued", "running"]))).scalars().all()
                        if running:
                            lifecycle.cancel_job(s, rng.choice(running))
                elif fault == "redis restarted empty":
                    redis.kill()
                    time.sleep(0.5)
                    redis.start()
                elif fault == "database connections cut":
                    _cut_connections(ctx)
                next_fault = time.monotonic() + rng.uniform(2, 6)
            pool.revive()
            if time.monotonic() - last_check >= check_every:
                checker.counters()
                last_check = time.monotonic()
                log(f"  {time.monotonic() - started:5.0f}s: {len(jobs)} jobs, events {dict(events)}, "
                    f"longest without a message {checker.longest_unmessaged:.1f}s, violations {len(checker.violations)}")
            time.sleep(rng.uniform(0.1, 0.6))
        # Faults stop: everything must end, each request once.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            pool.revive()
            with ctx.sessions() as s:
                open_jobs = s.scalar(select(Job.id).where(Job.id.in_(jobs), Job.state.not_in(["completed", "cancelled"])).limit(1))
            if open_jobs is None:
                break
            time.sleep(0.5)
        stop.set()
        checker.counters()
        with ctx.sessions() as s:
            rows = s.execute(select(Request.job_id, Request.state, Request.output, Request.worker_id)
                             .where(Request.job_id.in_(jobs))).all() if jobs else []
            finals = {"succeeded", "failed", "cancelled"}
            lost = sum(r.state not in finals for r in rows)
            counted = sum(j.n_succeeded + j.n_failed + j.n_cancelled
                          for j in s.execute(select(Job).where(Job.id.in_(jobs))).scalars()) if jobs else 0
            doubled = max(0, counted - sum(r.state in finals for r in rows))
            missing_output = sum(r.state == "succeeded" and (r.output is None or r.worker_id is None) for r in rows)
            by_state = Counter(r.state for r in rows)
    finally:
        stop.set()
        pool.stop()
        redis.kill()
        ctx.close()
    return {"seconds": round(seconds), "workers": workers, "database": database_url.split(":")[0],
            "events": dict(events), "jobs": len(jobs), "requests": len(rows), "by_state": dict(by_state),
            "lost": lost, "doubled": doubled, "succeeded_without_output": missing_output,
            "counter_violations": checker.violations[:5], "longest_without_message_s": round(checker.longest_unmessaged, 1),
            "bound_s": BOUND_SECONDS}


def _cut_connections(ctx) -> None:
    from sqlalchemy import text

    with ctx.engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        conn.commit()


def scratch_postgres(name: str = "lorabatch_soak") -> str:
    """A fresh database on the local PostgreSQL (trust auth), dropped and created again."""
    from sqlalchemy import create_engine, text

    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--database", default="postgresql", help="postgresql (a scratch database on 127.0.0.1) or sqlite")
    p.add_argument("--check-every", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorabatch-soak-") as d:
        tmp = Path(d)
        url = scratch_postgres() if args.database == "postgresql" else f"sqlite:///{tmp / 'soak.db'}"
        report = run_soak(tmp, seconds=args.minutes * 60, workers=args.workers, database_url=url, seed=args.seed,
                          check_every=args.check_every)
    print(json.dumps(report, indent=2))
    ok = report["lost"] == 0 and report["doubled"] == 0 and not report["counter_violations"] \
        and report["longest_without_message_s"] <= report["bound_s"]
    print("invariants held" if ok else "INVARIANTS BROKEN")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
