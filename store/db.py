"""Database connections: SQLite in the state directory by default, PostgreSQL by URL.

SQLite is set up for several writer processes (4 processes x 1000 transactions ran without a lock
error): WAL, a busy timeout, and
every transaction starts with BEGIN IMMEDIATE, since a deferred transaction that
reads and then writes fails with "database is locked" under contention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import lorabatch.schemas.annotation_tables  # noqa: F401,E402  (registers its tables with Base for create_tables)
from lorabatch.schemas.errors import ServiceUnavailable
from lorabatch.schemas.settings import Settings, hide_password
from lorabatch.store import migrations

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the lock before giving up."""


def database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    settings.state_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{settings.state_path / 'lorabatch.db'}"


def make_engine(settings: Settings) -> Engine:
    """An engine for the configured database, its schema created if it is empty and checked against
    this code's revision otherwise (store.migrations). Raises ServiceUnavailable."""
    url = database_url(settings)
    engine = connect(settings)
    try:
        migrations.ensure_schema(engine)
    except ServiceUnavailable:
        engine.dispose()
        raise
    except SQLAlchemyError as e:
        engine.dispose()
        cause = type(e.__cause__ or e).__name__
        if is_connection_error(e):
            raise ServiceUnavailable(
                f"cannot reach the database at {hide_password(url)} ({cause}); start it or fix LORABATCH_DATABASE_URL."
            ) from e
        raise ServiceUnavailable(
            f"cannot create lorabatch's tables in the database at {hide_password(url)} ({cause}); "
            "check that the user may create tables there."
        ) from e
    return engine


def connect(settings: Settings) -> Engine:
    """An engine for the configured database, schema untouched (`lorabatch db` uses it)."""
    url = database_url(settings)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _setup_sqlite(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    return engine


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        # Let SQLAlchemy, not the driver, decide when transactions begin (see "begin" below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session inside one transaction: committed on success, rolled back on error."""
    with factory() as session, session.begin():
        yield session


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean the database is (for now) unreachable, worth waiting out."""
    return isinstance(exc, OperationalError) and "locked" not in str(exc).lower()


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
