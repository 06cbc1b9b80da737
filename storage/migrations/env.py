"""Alembic environment of the sitiancal catalog.

:class:`sitiancal.storage.catalog.Catalog` runs the migrations programmatically
and hands its own connection over in ``config.attributes["connection"]`` (the
connection already holds the migration lock: an advisory lock on PostgreSQL,
``BEGIN IMMEDIATE`` on SQLite). Run from the ``alembic`` command line
(``alembic -c storage/alembic.ini upgrade head``), the URL comes from
``sqlalchemy.url`` or ``SITIANCAL_DATABASE_URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from sitiancal.storage.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = os.environ.get("SITIANCAL_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url or SITIANCAL_DATABASE_URL")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the SQL of the migrations without a database connection."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the connection given by the catalog, or on a new one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
