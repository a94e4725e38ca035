"""Alembic's environment for lorabatch's tables (loaded by store.migrations, not by an alembic.ini).

The caller passes an open connection (inside its transaction) as config.attributes["connection"].
For writing a new revision by hand, `alembic -x url=sqlite:///scratch.db revision --autogenerate`
with a scratch alembic.ini pointing script_location here also works: then env.py opens the URL itself.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import lorabatch.schemas.annotation_tables  # noqa: F401  (registers the annotation tables on Base)
from lorabatch.schemas.tables import Base

config = context.config
target_metadata = Base.metadata
VERSION_TABLE = config.get_main_option("version_table") or "lb_schema_version"


def _run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
