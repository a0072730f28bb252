"""Test session set-up: a throwaway embedded Postgres and BigQuery emulator, started once.

Everything goes to a temporary state directory on free ports, so tests never touch the demo's
data (`make run`) or a user's configured databases. Set SQP_TEST_PG_DSN to run against an
external Postgres instead (use a database that may be written to freely; its default time
zone is changed as below).

The test database's default time zone is set to TEST_DB_TIME_ZONE (west of UTC, a half-hour
offset, daylight saving), for an external database too: nothing the product reads or writes
may depend on the server's zone, so every integration test runs where that would show.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.demo.local_stack import free_port

TEST_DB_TIME_ZONE = "America/St_Johns"
STATE_DIR = Path(tempfile.mkdtemp(prefix="sqp-refresh-test-"))
for var in list(os.environ):
    if var.startswith("REFRESH_"):
        del os.environ[var]
# Sessions take the database's zone unless a test sets PGTZ itself.
os.environ.pop("PGTZ", None)
os.environ.update(
    {
        "REFRESH_STATE_DIR": str(STATE_DIR),
        "REFRESH_LOCAL_PG_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_REST_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_GRPC_PORT": str(free_port()),
        "REFRESH_LOCAL_PREFECT_PORT": str(free_port()),
        "PREFECT_HOME": str(STATE_DIR / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        # The API's default Host names plus the one Starlette's TestClient sends.
        "REFRESH_API_ALLOWED_HOSTS": "localhost,127.0.0.1,::1,testserver",
    }
)
# The session's emulator keeps Storage read sessions up to this cap (flows.demo.local_stack's
# BoundedReadSessions): the fault tests abandon many, and several sessions share the machine.
os.environ.setdefault("SQP_EMULATOR_SESSION_CAP_MB", "256")
if os.environ.get("SQP_TEST_PG_DSN"):
    os.environ["REFRESH_PG_DSN"] = os.environ["SQP_TEST_PG_DSN"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> Iterator[object]:
    from flows.core.settings import get_settings
    from flows.demo.local_stack import LocalStack

    s = LocalStack(get_settings(), throwaway=True)
    s.start()
    try:
        set_default_time_zone(get_settings().dsn(), TEST_DB_TIME_ZONE)
        yield s
    finally:
        s.stop()
        shutil.rmtree(STATE_DIR, ignore_errors=True)


def set_default_time_zone(dsn: str, zone: str) -> None:
    """The database's default `timezone` for every session opened from now on."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select current_database()").fetchone()
        assert row is not None
        conn.execute(
            sql.SQL("alter database {} set timezone = {}").format(sql.Identifier(row[0]), sql.Literal(zone))
        )
