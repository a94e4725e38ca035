"""The database's clock: leases, heartbeats and outbox ages are compared on it alone, never on two
machines' clocks."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session


def db_now(session: Session) -> datetime:
    """The database's clock, as naive UTC (leases and heartbeats are compared on it alone)."""
    if session.get_bind().dialect.name == "sqlite":
        value = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(value)
    return session.execute(text("SELECT now() AT TIME ZONE 'utc'")).scalar_one()
