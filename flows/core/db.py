"""Postgres connections and the control-schema migrations (Alembic, run automatically)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import psycopg
from psycopg import sql

from flows.core.identifiers import validate_pg_identifier
from flows.core.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent.parent / "control" / "migrations"
# Advisory-lock keys (arbitrary constants, documented in docs/design.md).
MIGRATION_LOCK_KEY = 7_312_001
REFRESH_LOCK_KEY = 7_312_002
# Taken shared by each slice transaction around its lock check, exclusively by a run that
# takes over: see flows.control.runs.check_lock.
FENCE_LOCK_KEY = 7_312_004


# Every session the product opens reads and writes timestamps in UTC, whatever the server's
# default zone. Set after connecting: libpq sends a client's PGTZ after, and so over, a
# `-c TimeZone=` in the startup options.
SESSION_TIME_ZONE = "UTC"
_SET_TIME_ZONE = "select set_config('TimeZone', %s, false)"


def use_utc(conn: psycopg.Connection) -> None:
    """Put a new session in UTC (also a pool's `configure` callback)."""
    conn.execute(_SET_TIME_ZONE, (SESSION_TIME_ZONE,))
    if not conn.autocommit:
        conn.commit()


async def use_utc_async(conn: psycopg.AsyncConnection) -> None:
    await conn.execute(_SET_TIME_ZONE, (SESSION_TIME_ZONE,))
    if not conn.autocommit:
        await conn.commit()


def connect(settings: Settings, autocommit: bool = False) -> psycopg.Connection:
    return connect_dsn(settings.dsn(), autocommit=autocommit)


def connect_dsn(
    dsn: str, autocommit: bool = False, application_name: str = "sqp-refresh"
) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=autocommit, application_name=application_name)
    try:
        use_utc(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(settings: Settings, revision: str = "head") -> None:
    """Bring the control schema to the newest revision (or `revision`); safe to call from many
    processes."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.pool import NullPool

    engine = create_engine("postgresql+psycopg://", creator=lambda: connect(settings), poolclass=NullPool)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["schema"] = settings.control_schema
    try:
        with engine.begin() as conn:
            conn.execute(text("select pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.execute(text(f'create schema if not exists "{settings.control_schema}"'))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except DBAPIError as exc:
        # SQLAlchemy's wrapper repeats the message, the statement and a link: what Postgres
        # said is the psycopg error it wraps (the CLI turns that into one line).
        if isinstance(exc.orig, psycopg.Error):
            raise exc.orig.with_traceback(None) from None
        raise
    finally:
        engine.dispose()


@lru_cache(maxsize=256)
def qualified(schema: str, name: str) -> sql.Identifier:
    """`"schema"."name"`: a table of the control schema (or any schema-qualified relation),
    both parts validated as Postgres identifiers and quoted. The one way control code names
    a table."""
    validate_pg_identifier(schema, "schema name")
    validate_pg_identifier(name, "table name")
    return sql.Identifier(schema, name)


def relation_columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, str]:
    """Column name -> formatted type of an existing table ({} when it does not exist)."""
    rows = conn.execute(
        """
        select a.attname, format_type(a.atttypid, a.atttypmod)
        from pg_attribute a
        join pg_class c on c.oid = a.attrelid
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = %s and c.relname = %s and a.attnum > 0 and not a.attisdropped
        order by a.attnum
        """,
        (schema, table),
    ).fetchall()
    return {name: typ for name, typ in rows}
