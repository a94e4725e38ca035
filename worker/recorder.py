"""Writing results to the database off the engine thread, many per transaction, as rows end.

The engine loop hands each finished row's outcome in as soon as its row ends; this thread records
whatever has arrived in one transaction (across jobs), so a long row never holds back the results of
its neighbours and the engine never waits for the database.

Failure windows:
- the worker dies with outcomes not yet recorded: their requests are still `running` under a dead
  worker; reconcile puts them back and they run again (at most once recorded: the claim decides);
- the database is unreachable: recording waits it out, the engine keeps generating (outcomes queue);
- a result the database refuses (a value it cannot store): that request is recorded as failed
  with the reason, its neighbours as they were;
- anything else goes wrong while recording (the database refuses every write for a while, a bug):
  the batch is tried again with backoff, RECORD_TRIES times; then its requests are handed back to
  the queue (run again, attempt uncharged), that too tried until it lands. A batch is never dropped:
  its rows would stay `running` under a live worker, which nothing recovers. Only a worker that is
  stopping gives up, CLOSE_GIVE_UP_SECONDS into its close: its rows then come back through reconcile
  like a dead worker's.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from celery import Celery
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.store import lifecycle, outbox
from lorabatch.store.reconcile import publish_owed
from lorabatch.store.retry import with_db_retry

log = logging.getLogger("lorabatch.worker")

MAX_PER_TRANSACTION = 512
RECORD_TRIES = 5
"""Tries (with backoff) to record one batch before its requests are handed back instead."""
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
CLOSE_GIVE_UP_SECONDS = 15.0
"""A stopping worker's recorder stops retrying this long after close() (the lease takes over)."""


class Recorder:
    """One thread; `put` and `hand_back` may be called from any thread."""

    def __init__(self, sessions: sessionmaker[Session], app: Celery, *, worker_id: str,
                 on_recorded: Callable[[list[lifecycle.Outcome]], None] | None = None,
                 on_retry: Callable[[], None] | None = None) -> None:
        self.sessions, self.app, self.worker_id = sessions, app, worker_id
        self.on_recorded, self.on_retry = on_recorded, on_retry
        self._inbox: queue.Queue = queue.Queue()
        self._give_up_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="lorabatch-recorder", daemon=True)
        self._thread.start()

    def put(self, outcomes: list[lifecycle.Outcome]) -> None:
        if outcomes:
            self._inbox.put(("record", outcomes))

    def hand_back(self, keys: list[tuple[str, int]]) -> None:
        """Requests this worker claimed but will not finish (preempted, shutdown): back to the queue."""
        if keys:
            self._inbox.put(("release", keys))

    def hand_back_after_error(self, keys: list[tuple[str, int]], error: str, *, max_attempts: int) -> None:
        """Requests running when the engine raised: back to the queue as suspects, the attempt
        counted (lifecycle.release_after_error)."""
        if keys:
            self._inbox.put(("raised", (keys, error, max_attempts)))

    def close(self, timeout: float | None = None) -> None:
        """Record everything handed in so far, then stop (giving up CLOSE_GIVE_UP_SECONDS from now)."""
        self._give_up_at = time.monotonic() + CLOSE_GIVE_UP_SECONDS
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def idle(self) -> bool:
        """Everything handed in so far is in the database (suspects wait for this: see worker.service)."""
        return self._inbox.unfinished_tasks == 0

    def _run(self) -> None:
        while True:
            kind, payload = self._inbox.get()
            if kind == "stop":
                self._inbox.task_done()
                return
            items = [(kind, payload)]
            if kind == "record":  # whatever else has arrived goes in the same transaction
                while sum(len(p) for _, p in items) < MAX_PER_TRANSACTION:
                    try:
                        nxt = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    items.append(nxt)
                    if nxt[0] != "record":
                        break
            try:
                outcomes = [o for k, p in items if k == "record" for o in p]
                if outcomes:
                    self._record_or_hand_back(outcomes)
                for k, p in items:
                    if k == "release":
                        self._surely(lambda p=p: self._release(p), what=f"handing back {len(p)} request(s)")
                    elif k == "raised":
                        self._surely(lambda p=p: self._release_after_error(*p),
                                     what=f"handing back {len(p[0])} request(s) the engine raised on")
                    elif k == "stop":
                        return
            finally:
                for _ in items:
                    self._inbox.task_done()

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() > self._give_up_at

    def _record_or_hand_back(self, outcomes: list[lifecycle.Outcome]) -> None:
        delay = RETRY_FIRST
        for attempt in range(1, RECORD_TRIES + 1):
            try:
                self._record(outcomes)
                return
            except Exception as e:  # noqa: BLE001 - never drop a batch: retry, then hand it back
                if self._giving_up():
                    break
                log.warning("recording %d result(s) failed (%s: %s); try %d of %d in %.1fs", len(outcomes),
                            type(e).__name__, str(e)[:200], attempt + 1, RECORD_TRIES, delay)
                if attempt < RECORD_TRIES:
                    time.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
        keys = [(o.job_id, o.idx) for o in outcomes]
        log.error("could not record %d result(s); handing their requests back to the queue", len(keys))
        self._surely(lambda: self._release(keys), what=f"handing back {len(keys)} request(s)")

    def _surely(self, fn: Callable[[], None], *, what: str) -> None:
        """fn() until it succeeds (backoff up to RETRY_MAX), unless the worker is stopping and past its
        give-up time: then the requests stay running under a worker that leaves, and reconcile puts
        them back once it is gone."""
        delay = RETRY_FIRST
        while True:
            try:
                fn()
                return
            except Exception as e:  # noqa: BLE001 - keep trying: the alternative strands the requests
                if self._giving_up():
                    log.error("%s failed (%s) while stopping; reconcile puts them back once this worker is gone",
                              what, type(e).__name__)
                    return
                log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, str(e)[:200], delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _record(self, outcomes: list[lifecycle.Outcome]) -> None:
        try:
            n = with_db_retry(self.sessions, lambda s: lifecycle.record_outcomes(
                s, worker_id=self.worker_id, outcomes=outcomes), what="recording results", on_retry=self.on_retry,
                give_up=self._giving_up)
        except DBAPIError:
            n = sum(self._record_alone(o) for o in outcomes)  # find the value the database refuses
        if n < len(outcomes):
            log.warning("%d result(s) dropped: another worker took those requests over", len(outcomes) - n)
        if self.on_recorded:
            self.on_recorded(outcomes)

    def _record_alone(self, o: lifecycle.Outcome) -> int:
        try:
            return with_db_retry(self.sessions, lambda s: lifecycle.record_outcomes(
                s, worker_id=self.worker_id, outcomes=[o]), what="recording a result", give_up=self._giving_up)
        except DBAPIError as e:
            log.warning("the database refused the result of request %s of %s: %s", o.idx, o.job_id, e.orig or e)
            error = f"the result could not be stored ({type(e.orig or e).__name__}); run the request again"
            failed = lifecycle.Outcome(o.job_id, o.idx, None, None, o.prompt_tokens, o.completion_tokens, error=error)
        try:
            return with_db_retry(self.sessions, lambda s: lifecycle.record_outcomes(
                s, worker_id=self.worker_id, outcomes=[failed]), what="recording a failure", give_up=self._giving_up)
        except DBAPIError:  # not even the failure: never leave it running under a live worker
            self._release([(o.job_id, o.idx)])
            return 0

    def _release_after_error(self, keys: list[tuple[str, int]], error: str, max_attempts: int) -> None:
        def release(session: Session) -> list[int]:
            requeued, failed = lifecycle.release_after_error(session, worker_id=self.worker_id, keys=keys,
                                                             error=error, max_attempts=max_attempts)
            if failed:
                log.warning("request %s of %s failed: the engine raised on it alone on its last attempt",
                            keys[0][1], keys[0][0])
            return outbox.owed_ids(session)

        owed = with_db_retry(self.sessions, release, what="handing back work", give_up=self._giving_up)
        publish_owed(self.sessions, self.app, ids=owed)  # if this fails, reconcile publishes them

    def _release(self, keys: list[tuple[str, int]]) -> None:
        def release(session: Session) -> list[int]:
            lifecycle.release_requests(session, worker_id=self.worker_id, keys=keys)
            return outbox.owed_ids(session)

        owed = with_db_retry(self.sessions, release, what="handing back work", give_up=self._giving_up)
        publish_owed(self.sessions, self.app, ids=owed)  # if this fails, reconcile publishes them
