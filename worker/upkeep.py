"""A worker's background duties: heartbeats into SQL (and the references it holds into Redis:
store.inflight), and reconcile rounds that repair what crashes, Redis restarts and lost messages
leave behind (store.reconcile, store.lost_messages), including for other workers' deaths."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.schemas.settings import WorkerSettings
from lorabatch.store import inflight, lifecycle, outbox
from lorabatch.store.lost_messages import replace_lost_messages
from lorabatch.store.reconcile import publish_owed, reconcile
from lorabatch.store.retry import with_db_retry

log = logging.getLogger("lorabatch.worker")


class Upkeep:
    """Daemon threads: heartbeat (SQL) and held report (Redis) every `heartbeat_seconds`, reconcile every
    `reconcile_seconds`."""

    def __init__(self, sessions: sessionmaker[Session], app: Celery, settings: WorkerSettings, *, worker_id: str,
                 deployment: str, load: Callable[[], dict],
                 serves: Callable[[], Mapping[str, str | None]] | None = None) -> None:
        """`load()` returns what the heartbeat reports: running, held, tokens_per_second (and what it
        serves); `serves()` the adapters it serves (name -> sha256), to publish parked work it can run."""
        self.sessions, self.app, self.settings = sessions, app, settings
        self.worker_id, self.deployment, self.load, self.serves = worker_id, deployment, load, serves
        self.host = host_label()
        self._stopping = threading.Event()
        self.held: Callable[[], Mapping[str, list[int]]] | None = None
        """The references this worker's feed holds, reported to Redis every beat (store.inflight)."""

    def start(self) -> None:
        self.heartbeat()
        self.reconcile()
        self.report_held()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._reconcile_loop, "reconcile"),
                             (self._held_loop, "held")):
            threading.Thread(target=target, name=f"lorabatch-{name}", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def heartbeat(self) -> None:
        load = self.load()
        with_db_retry(self.sessions, lambda s: lifecycle.heartbeat(
            s, worker_id=self.worker_id, hostname=self.host or socket.gethostname(), pid=os.getpid(),
            deployment=self.deployment, **load), what="heartbeat", give_up=self._stopping.is_set)

    def reconcile(self) -> None:
        dead = self.host and with_db_retry(
            self.sessions, lambda s: lifecycle.forget_dead_workers(s, host=self.host, alive=pid_alive),
            what="looking for dead workers on this host")
        if dead:
            log.warning("worker(s) %s on this host are gone; their requests run again", ", ".join(dead))
        if self.serves is not None:
            self.unpark()
        report = reconcile(self.sessions, self.app, lease_seconds=self.settings.lease_seconds,
                           max_attempts=self.settings.max_attempts, worker_id=self.worker_id,
                           grace_seconds=self.settings.publish_grace_seconds)
        if report.orphans or report.redis_was_reset or report.published:
            log.warning("reconcile: %d orphaned request(s) requeued, %d message(s) published%s", report.orphans,
                        report.published, " (Redis had lost its data, or is new: refilled from the database)" if report.redis_was_reset else "")
        replaced = replace_lost_messages(self.sessions, self.app, worker_id=self.worker_id,
                                         reconcile_seconds=self.settings.reconcile_seconds,
                                         heartbeat_seconds=self.settings.heartbeat_seconds)
        if replaced:
            log.warning("reconcile: %d queued request(s) had no message in flight (lost from Redis, or held by "
                        "a dead worker): published again", replaced)

    def unpark(self) -> int:
        """Publish parked requests this worker can run (lifecycle.unpark_adapters). Dying between the
        commit and the publish leaves the outbox rows, which a later round publishes."""
        serves = dict(self.serves())

        def unpark(session) -> tuple[int, list[int]]:
            return (lifecycle.unpark_adapters(session, deployment=self.deployment, serves=serves),
                    outbox.owed_ids(session))

        n, owed = with_db_retry(self.sessions, unpark, what="publishing parked requests")
        if n:
            log.info("%d parked adapter(s) of jobs this worker can run: their requests are published again", n)
            publish_owed(self.sessions, self.app, ids=owed)
        return n

    def report_held(self) -> None:
        """Tell Redis what this worker holds (store.inflight). Its own thread, apart from the SQL
        heartbeat: a worker waiting out the database still vouches for its messages."""
        if self.held is None:
            return
        try:
            inflight.report_held(self.app, self.worker_id, self.held(), heartbeat_seconds=self.settings.heartbeat_seconds)
        except Exception as e:  # noqa: BLE001 - Redis down: its messages may be sent again (harmless)
            log.warning("could not report held messages to Redis (%s)", type(e).__name__)

    def _held_loop(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_seconds):
            self.report_held()

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception:  # noqa: BLE001 - try again next beat
                log.exception("heartbeat failed")

    def _reconcile_loop(self) -> None:
        while not self._stopping.wait(self.settings.reconcile_seconds):
            try:
                self.reconcile()
            except Exception as e:  # noqa: BLE001 - Redis or the database down: try again next round
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
