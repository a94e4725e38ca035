"""Schema migrations (Alembic): the revision a database is at, and bringing it to this code's revision.

The migration environment lives in this package (env.py, versions/), loaded through Alembic's Python
API, so an installed lorabatch needs no alembic.ini. Revision 0001 is the round-1 schema. A database
made by round 1 (lorabatch's tables, no version table) counts as revision 0001.

`ensure_schema` runs on every new engine (store.db.make_engine):
- an empty database gets the current tables and is stamped at head;
- a database at head (or an unversioned round-1 one while head is 0001) goes on;
- one at an older revision is refused with one line naming `lorabatch db upgrade`;
- one at a revision this code does not know (a newer lorabatch wrote it) is refused too.
Creation and upgrades hold a PostgreSQL advisory lock (SQLite: BEGIN IMMEDIATE), so processes
starting together on an empty database all come up. The common case (a database at HEAD) reads one
row with plain SQLAlchemy: Alembic, slow to import, is loaded only to create, upgrade or complain.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from lorabatch.schemas.errors import ServiceUnavailable
from lorabatch.schemas.tables import SCHEMA_LOCK_KEY, Base

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

HEAD = "0003"
"""The newest revision in versions/, which the models in schemas/ match (tests check both)."""
HERE = Path(__file__).resolve().parent
VERSION_TABLE = "lb_schema_version"
"""Alembic's version table, named for lorabatch so it never collides with another application's
`alembic_version` in a shared database."""
ROUND1_REVISION = "0001"
MARKER_TABLE = "lb_jobs"
"""Present in every lorabatch database since round 1: its absence means an empty database."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config without a file: script_location is this package, the connection passed to env.py."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The revision this code's tables correspond to."""
    return HEAD


def _recorded(conn: Connection) -> str | None:
    """The revision in the version table, None without one."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def current(conn: Connection) -> str | None:
    """The database's revision: the version table's, ROUND1_REVISION for an unversioned round-1
    database, None for an empty one."""
    rev = _recorded(conn)
    if rev is None and inspect(conn).has_table(MARKER_TABLE):
        return ROUND1_REVISION
    return rev


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})


def _stamp(conn: Connection, revision: str) -> None:
    from alembic.runtime.migration import MigrationContext

    MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).stamp(script_directory(), revision)


def _known(revision: str) -> bool:
    try:
        return script_directory().get_revision(revision) is not None
    except Exception:  # noqa: BLE001  (alembic raises several kinds for an unknown id)
        return False


def mismatch(revision: str | None) -> str | None:
    """The one-line complaint for a database at `revision`, or None when this code can use it."""
    want = head()
    if revision is None or revision == want:
        return None
    if not _known(revision):
        return (f"the database schema is at revision {revision}, newer than this lorabatch knows (it needs {want}); "
                "upgrade lorabatch")
    return f"the database schema is at revision {revision}, this lorabatch needs {want}; run `lorabatch db upgrade`"


def ensure_schema(engine: Engine) -> None:
    """Create the schema in an empty database; refuse (ServiceUnavailable) one at another revision."""
    with engine.connect() as conn:  # the common case, read-only: a database already at head
        if _at_head(conn):
            return
    with engine.begin() as conn:
        _lock(conn)
        if _at_head(conn):  # another process finished while this one waited for the lock
            return
        if not inspect(conn).has_table(MARKER_TABLE):  # empty (a version row left behind by dropped tables is void)
            Base.metadata.create_all(conn)
            if inspect(conn).has_table(VERSION_TABLE):
                conn.execute(text(f"DELETE FROM {VERSION_TABLE}"))
            _stamp(conn, head())
            return
        rev = current(conn)
        if rev == ROUND1_REVISION == head():  # a round-1 database while head is still round 1's schema
            _upgrade(conn, "head")
            return
        problem = mismatch(rev)
        if problem:
            raise ServiceUnavailable(problem)


def _at_head(conn: Connection) -> bool:
    return _recorded(conn) == HEAD and inspect(conn).has_table(MARKER_TABLE)


def _upgrade(conn: Connection, target: str) -> None:
    from alembic import command

    command.upgrade(alembic_config(conn), target)


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str]:
    """Bring the database to `target` in one transaction (an empty one too); returns (before, after)."""
    with engine.begin() as conn:
        _lock(conn)
        before = current(conn)
        if before is not None and not _known(before):
            raise ServiceUnavailable(mismatch(before))
        _upgrade(conn, target)
        return before, current(conn)
