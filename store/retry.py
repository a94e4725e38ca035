"""Running a transaction until the database answers: the worker's way through outages."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.store.db import transaction

log = logging.getLogger("lorabatch.store")
T = TypeVar("T")

DB_RETRY_FIRST = 0.5
DB_RETRY_MAX = 10.0
"""Backoff bounds while the database is unreachable. A worker waits it out forever, holding its
messages unacknowledged: giving up would lose the work or strand it as `running`."""


def with_db_retry(sessions: sessionmaker[Session], fn: Callable[[Session], T], *, what: str) -> T:
    """Run fn(session) in a transaction, retrying with backoff while the database is unreachable."""
    delay = DB_RETRY_FIRST
    while True:
        try:
            with transaction(sessions) as session:
                return fn(session)
        except (OperationalError, DBAPIError) as e:
            if not _is_transient(e):
                raise
            log.warning("database unreachable while %s (%s); retrying in %.1fs", what, type(e.orig or e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, DB_RETRY_MAX)


def _is_transient(e: DBAPIError) -> bool:
    return bool(getattr(e, "connection_invalidated", False)) or isinstance(e, OperationalError)
