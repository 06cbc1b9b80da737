"""Shared fixtures: catalog databases (SQLite, PostgreSQL) and product stores (local, S3).

- ``catalog_url``: an empty catalog per test, parametrised over SQLite (a file
  in ``tmp_path``) and PostgreSQL (a schema of a database created for the test
  session on 127.0.0.1:5432, migrated once, emptied before each test; the
  database is dropped at the end). PostgreSQL tests are skipped, with the
  reason, only when no server answers. ``empty_database_url``: a database with
  no schema at all, for migration tests. ``postgres_schema_url``: a new empty
  PostgreSQL schema, for a test that runs a whole service on its own catalog.
- ``store_url`` / ``store_options``: a fresh product store root per test,
  parametrised over a local folder and a bucket of a moto S3 server that the
  session starts on 127.0.0.1 (free port, dummy credentials).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USERS = ("postgres", "root")
PG_ADMIN_DB = "test"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL database created for this session (dropped at the end)."""
    psycopg = pytest.importorskip("psycopg")
    admin = None
    errors = []
    user = ""
    for user in PG_USERS:
        try:
            admin = psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=PG_ADMIN_DB,
                                    autocommit=True, connect_timeout=3)
            break
        except psycopg.OperationalError as exc:
            errors.append(f"user {user}: {str(exc).strip().splitlines()[0]}")
    if admin is None:
        pytest.skip(f"no PostgreSQL server reachable on {PG_HOST}:{PG_PORT} "
                    f"(database {PG_ADMIN_DB!r}, trust auth): " + "; ".join(errors))
    name = f"sitiancal_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=name,
                             autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS btree_gist SCHEMA public")
        yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _new_schema(base_url: str) -> str:
    """Create an empty schema in the session database; return a URL whose search_path uses it."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base_url)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                         autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base_url}?options=-csearch_path%3D{schema},public"


@pytest.fixture(scope="session")
def _postgres_catalog(postgres_database: str) -> str:
    """A schema of the session database migrated once to the newest catalog revision."""
    from sitiancal.storage.catalog import upgrade

    url = _new_schema(postgres_database)
    upgrade(url)
    return url


def _truncate_all(url: str) -> None:
    """Empty every table of the URL's schema except Alembic's version table."""
    import psycopg
    from sqlalchemy.engine import make_url

    sa_url = make_url(url)
    schema = sa_url.query["options"].split("=", 1)[1].split(",")[0]
    with psycopg.connect(host=sa_url.host, port=sa_url.port, user=sa_url.username,
                         dbname=sa_url.database, autocommit=True) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s "
            "AND tablename != 'alembic_version'", (schema,))]
        if tables:
            names = ", ".join(f'"{schema}"."{t}"' for t in tables)
            conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """URL of an empty catalog at the newest schema revision, or one Catalog.open migrates.

    SQLite: a new file (migrated on first open). PostgreSQL: the session's
    migrated schema, emptied before the test (migrating a schema per test
    would cost ~0.5 s each).
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    url = request.getfixturevalue("_postgres_catalog")
    _truncate_all(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """URL of a database with nothing in it (a new SQLite file or a new PostgreSQL schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.sqlite'}"
    return _new_schema(request.getfixturevalue("postgres_database"))


@pytest.fixture
def postgres_schema_url(postgres_database: str) -> str:
    """URL of a new empty schema of the session database, for a test's own catalog.

    Tests that migrate a catalog must not use the database's ``public``
    schema: every schema's search path ends with it, so its tables (Alembic's
    version table first) would show through in the schemas of later tests.
    """
    return _new_schema(postgres_database)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1 (free port) for this session."""
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    """s3fs storage options for the moto server (dummy credentials)."""
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Root of an empty product store: a local folder, or s3://<new bucket>/prefix on moto."""
    if request.param == "local":
        return str(tmp_path / "store")
    import boto3

    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/sitiancal"


@pytest.fixture
def store_options(request: pytest.FixtureRequest, store_url: str) -> dict[str, Any]:
    """fsspec storage options that go with ``store_url``."""
    if store_url.startswith("s3://"):
        return s3_options(request.getfixturevalue("moto_endpoint"))
    return {}
