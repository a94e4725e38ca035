"""Writing results to the database off the engine thread, many per transaction, as rows end.

The engine loop hands each finished row's outcome in as soon as its row ends; this thread records
whatever has arrived in one transaction (across jobs), so a long row never holds back the results of
its neighbours and the engine never waits for the database.

Failure windows:
- the worker dies with outcomes not yet recorded: their requests are still `running` under a dead
  worker; reconcile puts them back and they run again (at most once recorded: the claim decides);
- the database is unreachable: recording waits it out, the engine keeps generating (outcomes queue);
- a result the database refuses (a value it cannot store): that request is recorded as failed
  with the reason, its neighbours as they were.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from celery import Celery
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.store import lifecycle, outbox
from lorabatch.store.reconcile import publish_owed
from lorabatch.store.retry import with_db_retry

log = logging.getLogger("lorabatch.worker")

MAX_PER_TRANSACTION = 512


class Recorder:
    """One thread; `put` and `hand_back` may be called from any thread."""

    def __init__(self, sessions: sessionmaker[Session], app: Celery, *, worker_id: str,
                 on_recorded: Callable[[list[lifecycle.Outcome]], None] | None = None,
                 on_retry: Callable[[], None] | None = None) -> None:
        self.sessions, self.app, self.worker_id = sessions, app, worker_id
        self.on_recorded, self.on_retry = on_recorded, on_retry
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lorabatch-recorder", daemon=True)
        self._thread.start()

    def put(self, outcomes: list[lifecycle.Outcome]) -> None:
        if outcomes:
            self._inbox.put(("record", outcomes))

    def hand_back(self, keys: list[tuple[str, int]]) -> None:
        """Requests this worker claimed but will not finish (preempted, shutdown): back to the queue."""
        if keys:
            self._inbox.put(("release", keys))

    def close(self, timeout: float | None = None) -> None:
        """Record everything handed in so far, then stop."""
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
                    self._record(outcomes)
                for k, p in items:
                    if k == "release":
                        self._release(p)
                    elif k == "stop":
                        return
            except Exception:  # noqa: BLE001 - a bug here must not stop recording for good
                log.exception("recording failed; the requests stay running and come back through reconcile")
            finally:
                for _ in items:
                    self._inbox.task_done()

    def _record(self, outcomes: list[lifecycle.Outcome]) -> None:
        try:
            n = with_db_retry(self.sessions, lambda s: lifecycle.record_outcomes(
                s, worker_id=self.worker_id, outcomes=outcomes), what="recording results", on_retry=self.on_retry)
        except DBAPIError:
            n = sum(self._record_alone(o) for o in outcomes)  # find the value the database refuses
        if n < len(outcomes):
            log.warning("%d result(s) dropped: another worker took those requests over", len(outcomes) - n)
        if self.on_recorded:
            self.on_recorded(outcomes)

    def _record_alone(self, o: lifecycle.Outcome) -> int:
        try:
            return with_db_retry(self.sessions, lambda s: lifecycle.record_outcomes(
                s, worker_id=self.worker_id, outcomes=[o]), what="recording a result")
        except DBAPIError as e:
            log.warning("the database refused the result of request %s of %s: %s", o.idx, o.job_id, e.orig or e)
            error = f"the result could not be stored ({type(e.orig or e).__name__}); run the request again"
            failed = lifecycle.Outcome(o.job_id, o.idx, None, None, o.prompt_tokens, o.completion_tokens, error=error)
        try:
            return with_db_retry(self.sessions, lambda s: lifecycle.record_outcomes(
                s, worker_id=self.worker_id, outcomes=[failed]), what="recording a failure")
        except DBAPIError:  # not even the failure: never leave it running under a live worker
            self._release([(o.job_id, o.idx)])
            return 0

    def _release(self, keys: list[tuple[str, int]]) -> None:
        def release(session: Session) -> list[int]:
            lifecycle.release_requests(session, worker_id=self.worker_id, keys=keys)
            return outbox.owed_ids(session)

        owed = with_db_retry(self.sessions, release, what="handing back work")
        publish_owed(self.sessions, self.app, ids=owed)  # if this fails, reconcile publishes them
