"""A worker process: the engine loaded once, a loop that batches across messages, heartbeats,
reconciliation, and a Celery worker (threads pool) feeding it.

Celery threads each hold one message and block in `WorkerService.generate`; the single engine
thread takes everything they hand in within a short gather window and runs it as one pool, so
requests of many jobs that name the same adapter share batches.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from celery.signals import worker_shutting_down

from lorabatch.schemas.settings import Settings
from lorabatch.store import lifecycle
from lorabatch.store.context import Context
from lorabatch.store.reconcile import reconcile
from lorabatch.store.retry import with_db_retry
from lorabatch.worker import tasks
from lorabatch.worker.tasks import ShuttingDown

log = logging.getLogger("lorabatch.worker")

POOL_BATCHES = 4
"""The engine takes at most this many batches' worth of rows per pool, so results flow back steadily."""
MAX_GATHER_SECONDS = 2.0
"""The longest a pool short of one batch waits for more work (each wait at most gather_seconds)."""


@dataclass
class _Pending:
    requests: list
    alone: bool
    future: Future = field(default_factory=Future)


class WorkerService:
    """Everything one worker process owns besides Celery: engine, engine thread, heartbeat, reconcile."""

    def __init__(self, settings: Settings, engine, *, context: Context | None = None):
        self.settings = settings
        self.context = context or Context(settings)
        self.sessions = self.context.sessions
        self.app = self.context.celery
        self.engine = engine
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.host = host_label()
        self._inbox: queue.Queue[_Pending] = queue.Queue()
        self._stopping = threading.Event()
        self.suspect_lock = threading.Lock()
        """Held while a group of suspect requests (see tasks.run_chunk) runs and is recorded."""
        self._threads: list[threading.Thread] = []
        self._tokens = 0
        self._started = time.monotonic()

    # ---- lifecycle

    def start(self) -> None:
        self._heartbeat()
        self._reconcile()
        for target, name in ((self._engine_loop, "engine"), (self._heartbeat_loop, "heartbeat"),
                             (self._reconcile_loop, "reconcile")):
            t = threading.Thread(target=target, name=f"lorabatch-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop taking work; pending requests are handed back by their tasks."""
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        try:
            with_db_retry(self.sessions, lambda s: lifecycle.forget_worker(s, self.worker_id), what="leaving")
        finally:
            self.context.close()

    # ---- generation

    def generate(self, requests: list, *, alone: bool = False) -> list:
        """Called from Celery threads: queue the requests for the engine thread and wait for results."""
        if self._stopping.is_set():
            raise ShuttingDown()
        pending = _Pending(requests, alone)
        self._inbox.put(pending)
        return pending.future.result()

    def _engine_loop(self) -> None:
        w = self.settings.worker
        max_rows = w.max_batch_size * POOL_BATCHES
        while True:
            try:
                first = self._inbox.get(timeout=0.2)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            if self._stopping.is_set():
                self._drain(first)
                continue
            pool = [first]
            rows = len(first.requests)
            # Wait for more work while it keeps arriving and the pool is short of a batch: offline
            # jobs gain more from full batches than they lose to a moment's wait.
            give_up = time.monotonic() + MAX_GATHER_SECONDS
            while rows < max_rows and not first.alone:
                short = rows < w.max_batch_size
                timeout = min(w.gather_seconds, give_up - time.monotonic()) if short else 0.0
                try:
                    item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item.alone:
                    self._inbox.put(item)  # runs later, in a pool of its own
                    break
                pool.append(item)
                rows += len(item.requests)
            self._run(pool)  # an `alone` item (suspects, see tasks.run_chunk) is a pool by itself

    def _run(self, pool: list[_Pending]) -> None:
        flat = [r for p in pool for r in p.requests]
        try:
            self._mark_started(flat)
            results = self.engine.generate(flat)
        except BaseException as e:  # handed to the task threads, which own error handling
            for p in pool:
                p.future.set_exception(e)
            return
        self._tokens += sum(r.completion_tokens for r in results)
        i = 0
        for p in pool:
            p.future.set_result(results[i : i + len(p.requests)])
            i += len(p.requests)

    def _mark_started(self, requests: list) -> None:
        by_job: dict[str, list[int]] = {}
        for r in requests:
            job_id, idx = r.key
            by_job.setdefault(job_id, []).append(idx)

        def mark(session) -> None:
            for job_id, idxs in by_job.items():
                lifecycle.mark_started(session, job_id=job_id, worker_id=self.worker_id, idxs=idxs)

        with_db_retry(self.sessions, mark, what="marking requests started")

    def _drain(self, first: _Pending) -> None:
        first.future.set_exception(ShuttingDown())
        while True:
            try:
                self._inbox.get_nowait().future.set_exception(ShuttingDown())
            except queue.Empty:
                return

    # ---- heartbeat and reconcile

    def _heartbeat(self) -> None:
        rate = self._tokens / max(1e-9, time.monotonic() - self._started)
        with_db_retry(self.sessions, lambda s: lifecycle.heartbeat(s, worker_id=self.worker_id, hostname=self.host or socket.gethostname(),
                                                          pid=os.getpid(), tokens_per_second=rate), what="heartbeat")

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.settings.worker.heartbeat_seconds):
            try:
                self._heartbeat()
            except Exception:
                log.exception("heartbeat failed")

    def _reconcile(self) -> None:
        dead = self.host and with_db_retry(
            self.sessions, lambda s: lifecycle.forget_dead_workers(s, host=self.host, alive=pid_alive),
            what="looking for dead workers on this host")
        if dead:
            log.warning("worker(s) %s on this host are gone; their requests run again", ", ".join(dead))
        report = reconcile(self.sessions, self.app, lease_seconds=self.settings.worker.lease_seconds,
                           worker_id=self.worker_id)
        if report.orphans or report.redis_was_reset:
            log.warning("reconcile: %d orphaned request(s) requeued, %d re-enqueued%s", report.orphans,
                        report.enqueued, " (Redis had lost its data)" if report.redis_was_reset else "")

    def _reconcile_loop(self) -> None:
        while not self._stopping.wait(self.settings.worker.reconcile_seconds):
            try:
                self._reconcile()
            except Exception as e:  # Redis or the database down: try again next round
                log.warning("reconcile failed: %s", e)


def host_label() -> str | None:
    """Where this process runs: host name, boot and pid namespace. Workers with the same label see
    the same process ids, so one can tell that another has died without waiting out its lease."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: no way to know that two processes share a pid namespace
        return None
    return f"{socket.gethostname()} boot={boot} {pidns}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def run_worker(settings: Settings, *, concurrency: int | None = None, weights: str | None = None,
               loglevel: str = "info") -> None:
    """Load the engine once, then consume until stopped (SIGTERM: finish or hand back, then exit)."""
    from lorabatch.worker.engine.engine import Engine

    if weights:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"weights": weights})})
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine.from_settings(settings)
    service = WorkerService(settings, engine)
    tasks.register(service.app, service)
    worker_shutting_down.connect(lambda **_: service.stop(), weak=False)
    service.start()
    log.info("worker %s ready: model %s, %d adapter(s) configured, weights=%s", service.worker_id,
             settings.model.base, len(settings.adapters), settings.worker.weights)
    try:
        service.app.Worker(
            pool="threads",
            concurrency=concurrency or settings.worker.concurrency,
            queues=["lorabatch"],
            loglevel=loglevel.upper(),
            hostname=f"{service.worker_id}@{socket.gethostname()}",
            without_mingle=True,
            without_gossip=True,
            optimization="fair",
        ).start()
    finally:
        service.close()
