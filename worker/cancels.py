"""Asking the database, at most every CANCEL_POLL_SECONDS, which of the jobs a worker runs were cancelled.

It does not know the engine: the engine loop passes the keys of its running rows and stops those
whose job is named.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

from sqlalchemy.orm import Session, sessionmaker

from lorabatch.store import lifecycle
from lorabatch.store.retry import with_db_retry

CANCEL_POLL_SECONDS = 0.5
"""How often the engine loop asks the database whether a job it runs was cancelled."""


class CancelPoll:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._last_cancel_poll = 0.0

    def cancelled(self, keys: list[Hashable]) -> set[str]:
        """Jobs among those of `keys` ((job_id, idx) pairs) that are being cancelled; empty when not due."""
        now = time.monotonic()
        if not keys or now - self._last_cancel_poll < CANCEL_POLL_SECONDS:
            return set()
        self._last_cancel_poll = now
        return with_db_retry(self.sessions, lambda s: lifecycle.cancelling_jobs(s, (k[0] for k in keys)),
                             what="checking for cancelled jobs")
