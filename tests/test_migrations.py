"""Schema migrations: a round-1 database upgraded with `lorabatch db upgrade` loses nothing, the head
revision matches the models, and a database at another revision is refused with one line.

Runs on SQLite, and on PostgreSQL too when LORABATCH_TEST_DATABASE_URL names one (`.ci/run` does).
"""

from __future__ import annotations

import os
from datetime import datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import MetaData, create_engine, inspect, select, text

import lorabatch.schemas.annotation_tables  # noqa: F401  (registers the annotation tables on Base)
from lorabatch.cli.db import db_group
from lorabatch.schemas.errors import ServiceUnavailable
from lorabatch.schemas.settings import Settings
from lorabatch.schemas.tables import Base
from lorabatch.store import db, migrations

ROUND1_TABLES = ["lb_jobs", "lb_requests", "lb_workers", "lb_annotation_cache", "lb_annotation_runs", "lb_schedules"]


def _urls() -> list:
    pg = os.environ.get("LORABATCH_TEST_DATABASE_URL")
    return ["sqlite", pytest.param(pg or "postgresql", marks=pytest.mark.skipif(
        not pg, reason="needs PostgreSQL (set LORABATCH_TEST_DATABASE_URL)"))]


@pytest.fixture(params=_urls())
def empty_url(request, tmp_path) -> str:
    """An empty database: a new SQLite file, or the test PostgreSQL with lorabatch's tables dropped."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    _drop_everything(request.param)
    yield request.param
    _drop_everything(request.param)


def _drop_everything(url: str) -> None:
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine, only=lambda name, _meta: name.startswith("lb_"))
    meta.drop_all(engine)
    engine.dispose()


def _round1(url: str, *, versioned: bool = False) -> None:
    """The round-1 schema (revision 0001), as round 1 left it: no version table unless `versioned`."""
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), migrations.ROUND1_REVISION)
        if not versioned:
            conn.execute(text(f"DROP TABLE {migrations.VERSION_TABLE}"))
    engine.dispose()


T0 = datetime(2026, 11, 1, 12, 30, 15)
ROWS = {
    "lb_jobs": [
        dict(id="job-a", name="nightly", state="completed", priority=7, idempotency_key="key-a", source="in.jsonl",
             schedule="daily", created_at=T0, started_at=T0, finished_at=T0, total=3, n_queued=0, n_running=0,
             n_succeeded=2, n_failed=1, n_cancelled=0, prompt_tokens=12_000_000_000, completion_tokens=40),
        dict(id="job-b", name=None, state="queued", priority=5, idempotency_key=None, source=None, schedule=None,
             created_at=T0, started_at=None, finished_at=None, total=1, n_queued=1, n_running=0, n_succeeded=0,
             n_failed=0, n_cancelled=0, prompt_tokens=0, completion_tokens=0),
    ],
    "lb_requests": [
        dict(job_id="job-a", idx=0, custom_id="r0", adapter="sql", prompt="Say hi", messages=None,
             params={"max_new_tokens": 8, "stop": ["\n"]}, state="succeeded", attempts=1, worker_id="w1",
             claimed_at=T0, finished_at=T0, output="héllo, wörld ✓", finish_reason="stop", prompt_tokens=3,
             completion_tokens=5, error=None),
        dict(job_id="job-a", idx=1, custom_id="r1", adapter="base", prompt=None,
             messages=[{"role": "user", "content": "hi"}], params={"temperature": 0.7, "seed": 3},
             state="succeeded", attempts=2, worker_id="w1", claimed_at=T0, finished_at=T0, output="x" * 5000,
             finish_reason="length", prompt_tokens=4, completion_tokens=35, error=None),
        dict(job_id="job-a", idx=2, custom_id="r2", adapter="gone", prompt="p", messages=None, params={},
             state="failed", attempts=1, worker_id=None, claimed_at=None, finished_at=T0, output=None,
             finish_reason=None, prompt_tokens=None, completion_tokens=None, error="AdapterError: no such adapter"),
        dict(job_id="job-b", idx=0, custom_id="q0", adapter="base", prompt="later", messages=None, params={},
             state="queued", attempts=0, worker_id=None, claimed_at=None, finished_at=None, output=None,
             finish_reason=None, prompt_tokens=None, completion_tokens=None, error=None),
    ],
    "lb_workers": [dict(id="w1", hostname="gpu-1", pid=4242, started_at=T0, heartbeat_at=T0, tokens_per_second=81.5)],
    "lb_annotation_cache": [dict(key="k" * 64, status="succeeded", output="label: yes", error=None, job_id="job-a",
                                 updated_at=T0)],
    "lb_annotation_runs": [dict(id="run-1", schedule="daily", slot=T0, spec={"datasets": ["a.csv"], "column": "y"},
                                detached=True, job_id="job-a", waits_on=["job-b"], rows=10, submitted=3, reused=7,
                                created_at=T0, submitted_at=T0, harvested_at=None, written_at=None, error=None)],
    "lb_schedules": [dict(name="daily", cron="0 3 * * *", timezone="Europe/Paris", spec={"datasets": ["a.csv"]},
                          enabled=True, created_at=T0, counts_from=T0, last_fired_at=T0)],
}


def _snapshot(url: str) -> dict[str, list[dict]]:
    """Every round-1 column of every row, read through reflection (what the database holds)."""
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine, only=ROUND1_TABLES)
    out = {}
    with engine.connect() as conn:
        for name in ROUND1_TABLES:
            table = meta.tables[name]
            cols = [table.c[k] for k in ROWS[name][0]]
            out[name] = [dict(r._mapping) for r in conn.execute(select(*cols).order_by(*table.primary_key.columns))]
    engine.dispose()
    return out


def _fill(url: str) -> None:
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine, only=ROUND1_TABLES)
    with engine.begin() as conn:
        for name in ROUND1_TABLES:
            conn.execute(meta.tables[name].insert(), ROWS[name])
    engine.dispose()


def _upgrade_cli(tmp_path, url: str) -> str:
    config = tmp_path / "lorabatch.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\ndatabase_url = "{url}"\n')
    r = CliRunner().invoke(db_group, ["upgrade"], obj={"config": str(config)}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_round1_database_upgraded_loses_nothing(empty_url, tmp_path):
    """A round-1 database (no version table) holding jobs, results and annotation rows, upgraded with
    `lorabatch db upgrade`: every round-1 value is still there, new NOT NULL columns are filled, and
    lorabatch then opens it."""
    _round1(empty_url)
    _fill(empty_url)
    before = _snapshot(empty_url)
    assert before == {name: sorted(rows, key=lambda r: tuple(r[c.name] for c in Base.metadata.tables[name].primary_key))
                      for name, rows in ROWS.items()}
    out = _upgrade_cli(tmp_path, empty_url)
    assert f"to {migrations.head()}" in out or f"already at revision {migrations.head()}" in out, out
    assert _snapshot(empty_url) == before
    engine = db.make_engine(Settings(database_url=empty_url))  # accepted: at head now
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        for table in Base.metadata.sorted_tables:
            for col in table.columns:
                if not col.nullable:
                    nulls = conn.scalar(select(col).where(col.is_(None)).limit(1).exists().select())
                    assert not nulls, f"{table.name}.{col.name} is NULL in an upgraded row"
    engine.dispose()
    assert "already at revision" in _upgrade_cli(tmp_path, empty_url)  # a second upgrade changes nothing


def test_head_revision_matches_the_models(empty_url):
    """The migrations, run from an empty database, give exactly the models' schema: a column added to
    schemas/tables.py without a revision fails here."""
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "head")
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": migrations.VERSION_TABLE})
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()


def test_empty_database_is_created_at_head(empty_url):
    engine = db.make_engine(Settings(database_url=empty_url))
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        assert set(ROUND1_TABLES) <= set(inspect(conn).get_table_names())
    engine.dispose()


def test_round1_database_is_revision_1(empty_url):
    """Tables without a version table read as revision 0001: accepted while that is head, else refused
    with the command to run."""
    _round1(empty_url)
    engine = db.connect(Settings(database_url=empty_url))
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.ROUND1_REVISION
    engine.dispose()
    if migrations.head() == migrations.ROUND1_REVISION:
        db.make_engine(Settings(database_url=empty_url)).dispose()
        return
    with pytest.raises(ServiceUnavailable) as e:
        db.make_engine(Settings(database_url=empty_url))
    assert str(e.value) == (f"the database schema is at revision 0001, this lorabatch needs {migrations.head()}; "
                            "run `lorabatch db upgrade`")


def test_database_from_a_newer_lorabatch_is_refused(empty_url):
    db.make_engine(Settings(database_url=empty_url)).dispose()
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = 'f00d'"))
    engine.dispose()
    with pytest.raises(ServiceUnavailable) as e:
        db.make_engine(Settings(database_url=empty_url))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("the database schema is at revision f00d") and str(e.value).endswith("upgrade lorabatch")


def test_tables_dropped_under_a_version_row_count_as_empty(empty_url):
    """Tables dropped by hand (as the test fixtures do) under a version row of any revision: the next
    process creates the schema again instead of refusing."""
    db.make_engine(Settings(database_url=empty_url)).dispose()
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = 'f00d'"))
    Base.metadata.drop_all(engine)
    engine.dispose()
    engine = db.make_engine(Settings(database_url=empty_url))
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
    engine.dispose()


def test_db_current_names_both_revisions_and_check_fails_on_an_old_one(empty_url, tmp_path):
    config = tmp_path / "lorabatch.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\ndatabase_url = "{empty_url}"\n')
    _round1(empty_url, versioned=True)
    r = CliRunner().invoke(db_group, ["current", "--json"], obj={"config": str(config)}, catch_exceptions=False)
    assert r.exit_code == 0 and '"current": "0001"' in r.output and f'"head": "{migrations.head()}"' in r.output
    if migrations.head() != migrations.ROUND1_REVISION:
        r = CliRunner().invoke(db_group, ["current", "--check"], obj={"config": str(config)})
        assert isinstance(r.exception, ServiceUnavailable) and "run `lorabatch db upgrade`" in str(r.exception)
    _upgrade_cli(tmp_path, empty_url)
    r = CliRunner().invoke(db_group, ["current", "--check"], obj={"config": str(config)}, catch_exceptions=False)
    assert r.exit_code == 0 and f"this lorabatch needs {migrations.head()}" in r.output
