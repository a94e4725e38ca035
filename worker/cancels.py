"""Asking the database, at most every CANCEL_POLL_SECONDS, which of the jobs a worker runs were cancelled.

It does not know the engine: the engine loop passes the keys of its running rows and stops those
whose job is named.

During a database outage a poll makes one try and gives up (the rows run on; a cancel is noticed
once the database answers), then waits longer before the next try, up to CANCEL_POLL_MAX_SECONDS:
the engine thread never blocks here, so SIGTERM's wind-down always runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.store import lifecycle
from lorabatch.store.retry import with_db_retry

log = logging.getLogger("lorabatch.worker")

CANCEL_POLL_SECONDS = 0.5
"""How often the engine loop asks the database whether a job it runs was cancelled."""
CANCEL_POLL_MAX_SECONDS = 10.0
"""The longest wait between polls while the database does not answer."""


class CancelPoll:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._last_cancel_poll = 0.0
        self._interval = CANCEL_POLL_SECONDS

    def cancelled(self, keys: list[Hashable]) -> set[str]:
        """Jobs among those of `keys` ((job_id, idx) pairs) that are being cancelled; empty when not due
        or when the database did not answer."""
        now = time.monotonic()
        if not keys or now - self._last_cancel_poll < self._interval:
            return set()
        self._last_cancel_poll = now
        try:
            found = with_db_retry(self.sessions, lambda s: lifecycle.cancelling_jobs(s, (k[0] for k in keys)),
                                  what="checking for cancelled jobs", give_up=lambda: True)
        except SQLAlchemyError as e:
            self._interval = min(self._interval * 2, CANCEL_POLL_MAX_SECONDS)
            log.warning("could not check for cancelled jobs (%s); next try in %.1fs", type(e).__name__, self._interval)
            return set()
        self._interval = CANCEL_POLL_SECONDS
        return found
