"""Running a transaction until the database answers: the worker's way through outages."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.store.db import transaction

log = logging.getLogger("lorabatch.store")
T = TypeVar("T")

DB_RETRY_FIRST = 0.5
DB_RETRY_MAX = 10.0
"""Backoff bounds while the database is unreachable or busy."""

CONFLICTS = ("DeadlockDetected", "SerializationFailure", "LockNotAvailable", "database is locked")
"""Errors of two transactions colliding (not of an unreachable database): retried at once, quietly."""


def with_db_retry(sessions: sessionmaker[Session], fn: Callable[[Session], T], *, what: str,
                  give_up: Callable[[], bool] | None = None, on_retry: Callable[[], None] | None = None) -> T:
    """Run fn(session) in a transaction, retrying what is transient: an unreachable database (with
    backoff, for as long as it takes unless `give_up()` says stop, then the error is raised), a
    connection pool timeout, a deadlock or serialization failure. Anything else is raised at once."""
    delay = DB_RETRY_FIRST
    while True:
        try:
            with transaction(sessions) as session:
                return fn(session)
        except (DBAPIError, PoolTimeout) as e:
            kind = classify(e)
            if kind is None or (give_up is not None and give_up()):
                raise
            if on_retry is not None:
                on_retry()
            if kind == "conflict":
                log.info("transaction conflict while %s (%s); retrying", what, _name(e))
                time.sleep(0.05)
                continue
            log.warning("database %s while %s (%s); retrying in %.1fs", kind, what, _name(e), delay)
            time.sleep(delay)
            delay = min(delay * 2, DB_RETRY_MAX)


def classify(e: BaseException) -> str | None:
    """'conflict', 'unreachable', 'busy' (pool exhausted), or None when retrying cannot help."""
    if isinstance(e, PoolTimeout):
        return "busy"
    if not isinstance(e, DBAPIError):
        return None
    text = f"{_name(e)} {e}"
    if any(c in text for c in CONFLICTS):
        return "conflict"
    if getattr(e, "connection_invalidated", False) or isinstance(e, OperationalError):
        return "unreachable"
    return None


def _name(e: BaseException) -> str:
    return type(getattr(e, "orig", None) or e).__name__
