"""Chaos soak: several worker processes, a stream of submits and cancels, and faults injected at random,
then a check that every request ended exactly once.

    python bench/soak.py                      # 10 minutes, 3 workers, PostgreSQL + a Redis of its own
    python bench/soak.py --minutes 2 --database sqlite

Workers run the instant engine (`[worker] engine = "instant"`, each step 50 ms, rows living 1-8
steps), so the soak exercises what lorabatch itself does, not the model; they run as
tests/fault_worker.py, the real worker plus a hook: the engine raises on a prompt containing RAISE.
Before the soak, a round-1 database holding a queued job is upgraded (`lorabatch db upgrade`).
Faults, one every few seconds: a worker SIGKILLed (restarted a second later), a job cancelled, Redis
killed and restarted empty, Redis flushed (FLUSHDB), its queue keys deleted (Redis stays up), a job
with one request the engine raises on, `[adapters]` edited (an unrelated adapter added or removed)
and every worker restarted, PostgreSQL's connections to the soak database terminated (PostgreSQL
only).

Checked continuously: the longest time any queued request of an open job went without a message in
flight (store.lost_messages.unmessaged: in a queue list, unacknowledged by a live worker, or owed in
the outbox), measured per request from the last check that saw it covered to the first that saw it
covered again (an upper bound: checks run back to back, about every 0.3 s), against the bound
(BOUND_SECONDS). Every `--check-every` seconds and at the end: every job's counters equal its row
counts. At the end, once faults stop: every request has exactly one final state (lost = 0), no result
was counted twice (doubled = 0), the round-1 job completed, every request the engine raised on failed
with that error and no other request did. The short version runs in the test suite (tests/test_soak.py).
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
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere
ADAPTERS = ["sft", "dpo", "base"]
WORKER = {"engine": "instant", "instant_step_seconds": 0.05, "max_batch_size": 16, "lease_seconds": 5,
          "heartbeat_seconds": 0.5, "reconcile_seconds": 1, "visibility_timeout": 10, "publish_grace_seconds": 3,
          "max_attempts": 4, "shutdown_grace_seconds": 2}
BOUND_SECONDS = WORKER["reconcile_seconds"] + WORKER["publish_grace_seconds"] + 5
"""Outbox rows left by a dead publisher wait out the grace; lost messages wait at most
store.lost_messages.bound_seconds (7.5 s with these settings); a Redis restart the next round."""
RAISE = "RAISE"


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


def write_config(tmp: Path, *, broker_url: str, database_url: str, extra_adapter: bool = False) -> Path:
    """The soak's lorabatch.toml; its adapters have weight files (random bytes: the instant engine never
    loads them, but jobs pin them by sha256). `extra_adapter`: one more, that no job names."""
    names = [a for a in ADAPTERS if a != "base"] + (["extra"] if extra_adapter else [])
    for a in names:
        weights = tmp / "adapters" / a / "adapter_model.safetensors"
        if not weights.exists():
            weights.parent.mkdir(parents=True, exist_ok=True)
            weights.write_bytes(a.encode() * 64)
    worker = "\n".join(f"{k} = {json.dumps(v)}" for k, v in WORKER.items())
    adapters = "\n".join(f'{a} = "adapters/{a}"' for a in names)
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
        env["PYTHONPATH"] = str(REPO)
        log = open(self.tmp / f"worker-{i}.log", "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([sys.executable, "-m", "tests.fault_worker", "--config", str(self.config), "worker",
                                 "--loglevel", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_up(self, ctx, timeout: float = 120) -> None:
        """Until every worker process has sent a heartbeat (its row is in the database)."""
        from sqlalchemy import func, select

        from lorabatch.schemas.tables import Worker

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with ctx.sessions() as s:
                if s.scalar(select(func.count()).select_from(Worker).where(
                        Worker.pid.in_([p.pid for p in self.procs]))) == len(self.procs):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"workers not up after {timeout}s; see {self.tmp}/worker-*.log")

    def restart_all(self, ctx) -> None:
        """After a config edit, a rolling restart as an operator would do it: each worker in turn gets
        SIGTERM (it hands back what it holds), and its successor is started and up (its heartbeat is in
        the database) before the next one goes, so that live workers keep reconciling."""
        from sqlalchemy import select

        from lorabatch.schemas.tables import Worker

        for i, p in enumerate(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.procs[i] = self._start(i)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.procs[i].poll() is None:
                try:
                    with ctx.sessions() as s:
                        if s.scalar(select(Worker.id).where(Worker.pid == self.procs[i].pid).limit(1)):
                            break
                except Exception:  # noqa: BLE001 - the database was just cut: ask again
                    pass
                time.sleep(0.2)

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
    """Counters equal rows (every --check-every); the longest time a queued request went without a
    message in flight, measured per request between back-to-back checks (an upper bound), both in all
    and counting only the time some worker was up (no worker, no reconcile: the bound assumes one)."""

    def __init__(self, ctx, redis_url: str) -> None:
        self.ctx, self.redis_url = ctx, redis_url
        self.t0 = self.last_check_start = self.last_check_end = time.monotonic()
        self.open_since: dict[tuple[str, int], tuple[float, float]] = {}
        """Requests seen without a message: (start of the last check that did not see them so, the
        no-worker time counted until then)."""
        self.no_worker_time = 0.0
        self.longest_unmessaged = self.longest_with_a_worker = 0.0
        self.longest_request: tuple[str, int] | None = None
        self.longest_window: tuple[float, float] | None = None
        """(start, end) of the longest gap while a worker was up, in seconds since the checker started."""
        self.checks = 0
        self.violations: list[str] = []

    def sample(self) -> None:
        from sqlalchemy import func, select

        from lorabatch.schemas.tables import Worker
        from lorabatch.store.clock import db_now
        from lorabatch.store.lost_messages import unmessaged

        started = time.monotonic()
        # A check that fails (Redis down, connections cut) proves nothing: open gaps stay open, and a
        # request covered before the failure starts its gap at the last good check's start.
        missing = unmessaged(self.ctx.sessions, self.ctx.celery, heartbeat_seconds=WORKER["heartbeat_seconds"])
        with self.ctx.sessions() as s:
            live = s.scalar(select(func.count()).select_from(Worker).where(
                Worker.heartbeat_at >= db_now(s) - timedelta(seconds=3 * WORKER["heartbeat_seconds"])))
        now = time.monotonic()
        if not live:
            self.no_worker_time += now - self.last_check_end
        keys = {(job_id, idx) for job_id, idxs in missing.items() for idx in idxs}
        for key in set(self.open_since) - keys:  # covered again (or no longer queued)
            self._close(key, now)
        for key in keys - set(self.open_since):
            self.open_since[key] = (self.last_check_start, self.no_worker_time)
        self.last_check_start, self.last_check_end = started, now
        self.checks += 1

    def _close(self, key: tuple[str, int], now: float) -> None:
        since, no_worker_before = self.open_since.pop(key)
        self.longest_unmessaged = max(self.longest_unmessaged, now - since)
        with_a_worker = now - since - (self.no_worker_time - no_worker_before)
        if with_a_worker > self.longest_with_a_worker:
            self.longest_with_a_worker, self.longest_request = with_a_worker, key
            self.longest_window = (round(since - self.t0, 1), round(now - self.t0, 1))

    def finish(self) -> None:
        now = time.monotonic()
        for key in list(self.open_since):
            self._close(key, now)

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
    round1_job = upgrade_round1_database(config, database_url)
    ctx = Context(load_settings(config, environ={}))
    ctx.engine  # noqa: B018 - schema checked before the workers race for it
    pool = Workers(config, tmp, workers)
    pool.wait_up(ctx)  # faults start once every worker is up: the bound assumes live workers
    checker = Checker(ctx, redis.url)
    events: Counter[str] = Counter()
    stop = threading.Event()
    extra_adapter = False
    raised: set[tuple[str, int]] = set()

    def sampler() -> None:
        while not stop.is_set():
            try:
                checker.sample()
            except Exception as e:  # noqa: BLE001 - Redis down or the database cut: the gaps stay open
                log(f"  (check skipped: {type(e).__name__})")
                stop.wait(0.2)
            stop.wait(0.05)

    threading.Thread(target=sampler, daemon=True).start()
    jobs: list[str] = [round1_job]
    timeline: list[tuple[float, str]] = []
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
                fault = rng.choice(["kill worker", "kill worker", "cancel job", "redis restarted empty",
                                    "redis flushed", "queue keys deleted", "engine raises", "adapters edited"]
                                   + (["database connections cut"] if database_url.startswith("postgresql") else []))
                events[fault] += 1
                timeline.append((round(time.monotonic() - checker.t0, 1), fault))
                if fault == "kill worker":
                    pool.kill_one(rng)
                elif fault == "cancel job":
                    with transaction(ctx.sessions) as s:
                        spared = {round1_job} | {job_id for job_id, _ in raised}  # their checks need them to end
                        running = s.execute(select(Job.id).where(Job.id.in_(
                            [j for j in jobs[-20:] if j not in spared]), Job.state.in_(
                            ["queued", "running"]))).scalars().all()
                        if running:
                            lifecycle.cancel_job(s, rng.choice(running))
                elif fault == "redis restarted empty":
                    redis.kill()
                    time.sleep(0.5)
                    redis.start()
                elif fault == "redis flushed":
                    _redis(redis).flushdb()
                elif fault == "queue keys deleted":  # Redis stays up, its epoch key too: no reset is seen
                    client = _redis(redis)
                    if keys := [k for k in client.scan_iter(match="lorabatch*") if client.type(k) == b"list"]:
                        client.delete(*keys)
                elif fault == "engine raises":  # one request the engine raises on, among ordinary ones
                    path = tmp / "raise.jsonl"
                    bad = rng.randrange(8)
                    path.write_text("".join(json.dumps({
                        "custom_id": f"x{i}", "adapter": rng.choice(ADAPTERS), "max_new_tokens": 8,
                        "prompt": f"{RAISE} soak {len(jobs)}" if i == bad else f"soak {len(jobs)} {i}"}) + "\n"
                        for i in range(8)))
                    try:
                        jobs.append(submit_file(ctx, str(path)).job_id)
                        raised.add((jobs[-1], bad))
                    except Exception as e:  # noqa: BLE001 - Redis or the database down at this moment
                        log(f"  submit refused: {str(e)[:100]}")
                elif fault == "adapters edited":  # an unrelated adapter added or removed, workers restarted
                    extra_adapter = not extra_adapter
                    write_config(tmp, broker_url=redis.url, database_url=database_url, extra_adapter=extra_adapter)
                    pool.restart_all(ctx)
                elif fault == "database connections cut":
                    _cut_connections(ctx)
                next_fault = time.monotonic() + rng.uniform(2, 6)
            pool.revive()
            if time.monotonic() - last_check >= check_every:
                checker.counters()
                last_check = time.monotonic()
                log(f"  {time.monotonic() - started:5.0f}s: {len(jobs)} jobs, events {dict(events)}, "
                    f"longest without a message {checker.longest_with_a_worker:.1f}s, violations {len(checker.violations)}")
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
        time.sleep(0.5)
        checker.finish()
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
            failures = {(r.job_id, r.idx): r.error or "" for r in s.execute(
                select(Request.job_id, Request.idx, Request.error).where(Request.job_id.in_(jobs),
                                                                        Request.state == "failed"))}
            round1_state = s.get(Job, round1_job).state
    finally:
        stop.set()
        pool.stop()
        redis.kill()
        ctx.close()
    return {"seconds": round(seconds), "workers": workers, "database": database_url.split(":")[0],
            "events": dict(events), "jobs": len(jobs), "requests": len(rows), "by_state": dict(by_state),
            "lost": lost, "doubled": doubled, "succeeded_without_output": missing_output,
            "counter_violations": checker.violations[:5],
            "longest_without_message_s": round(checker.longest_with_a_worker, 1),
            "longest_without_message_any_worker_down_s": round(checker.longest_unmessaged, 1),
            "no_live_worker_s": round(checker.no_worker_time, 1),
            "longest_without_message_request": checker.longest_request, "checks": checker.checks,
            "longest_without_message_window": checker.longest_window,
            "faults_near_it": [f for f in timeline if checker.longest_window
                               and checker.longest_window[0] - 10 <= f[0] <= checker.longest_window[1]],
            "bound_s": BOUND_SECONDS, "round1_job": round1_state,
            "raised_on": len(raised), "raised_failed_with_error": sum(
                "engine raised on this request" in failures.get(k, "") for k in raised),
            "other_failures": {k[0] + "/" + str(k[1]): v[:80] for k, v in failures.items() if k not in raised}}


def _redis(server: RedisServer):
    import redis

    return redis.Redis(port=server.port, socket_timeout=5)


def upgrade_round1_database(config: Path, database_url: str) -> str:
    """A round-1 database (schema 0001, no version table) holding a queued job of 3 requests, upgraded
    with `lorabatch db upgrade` as the README says; returns the job's id (it must complete)."""
    from tests.test_routing_workers import round1_database_with_queued_job

    job_id = round1_database_with_queued_job(database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    r = subprocess.run([sys.executable, "-m", "lorabatch.cli", "--config", str(config), "db", "upgrade"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"db upgrade failed: {r.stderr}")
    return job_id


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
        and report["longest_without_message_s"] <= report["bound_s"] and report["round1_job"] == "completed" \
        and report["raised_failed_with_error"] == report["raised_on"] \
        and not any("engine raised" in e for e in report["other_failures"].values())
    print("invariants held" if ok else "INVARIANTS BROKEN")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
