"""`lorabatch db`: the database schema's revision, and upgrading it (store.migrations, Alembic)."""

from __future__ import annotations

import click

from lorabatch.cli.common import context_of, echo_json
from lorabatch.schemas.errors import ServiceUnavailable
from lorabatch.schemas.settings import hide_password
from lorabatch.store import db, migrations


@click.group("db")
def db_group() -> None:
    """The database schema: which revision it is at, and upgrading it after installing a newer lorabatch."""


@db_group.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--check", is_flag=True, help="Exit 2 with the one-line reason unless the database is usable as it is.")
@click.pass_context
def current_command(click_ctx, as_json, check) -> None:
    """Print the database's schema revision and the one this lorabatch needs."""
    settings = context_of(click_ctx).settings
    engine = db.connect(settings)
    try:
        with engine.connect() as conn:
            rev = migrations.current(conn)
    finally:
        engine.dispose()
    head = migrations.head()
    problem = migrations.mismatch(rev)
    if check and problem:
        raise ServiceUnavailable(problem)
    if as_json:
        echo_json({"current": rev, "head": head, "up_to_date": rev == head})
        return
    click.echo(f"database {hide_password(db.database_url(settings))}: revision {rev or '(empty)'}; "
               f"this lorabatch needs {head}")
    if problem:
        click.echo(problem, err=True)


@db_group.command("upgrade")
@click.option("--to", "target", default="head", show_default=True, help="Revision to upgrade to.")
@click.pass_context
def upgrade_command(click_ctx, target) -> None:
    """Upgrade the database schema to this lorabatch's revision, in one transaction.

    Stop the workers first: a worker of the old version refuses to start against the upgraded schema,
    and one already running may fail on it.
    """
    settings = context_of(click_ctx).settings
    engine = db.connect(settings)
    try:
        before, after = migrations.upgrade(engine, target)
    finally:
        engine.dispose()
    where = hide_password(db.database_url(settings))
    if before == after:
        click.echo(f"database {where} is already at revision {after}")
    else:
        click.echo(f"database {where} upgraded from revision {before or '(empty)'} to {after}")
