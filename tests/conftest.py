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

import contextlib
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


# The slowest modules, slowest first (`--durations`). `make test` deals whole modules to its
# workers in collection order (`--dist loadfile --no-loadscope-reorder`): these go out first,
# so no worker is left with a long module at the end while the other is idle.
SLOW_MODULES = (
    "integration/test_dbt_stage_exit.py",
    "integration/test_concurrent_starts.py",
    "integration/api/test_api.py",
    "integration/test_faults.py",
    "integration/test_orchestration.py",
    "integration/test_extraction_engine.py",
    "integration/test_cli_first_run.py",
    "integration/api/test_trigger_deployment.py",
    "integration/test_work_pool.py",
    "integration/api/test_api_fuzz.py",
)


def slow_rank(path: str) -> int:
    """Where a test file goes in the run: the slow modules first, in SLOW_MODULES's order."""
    for rank, module in enumerate(SLOW_MODULES):
        if path.endswith("/tests/" + module):
            return rank
    return len(SLOW_MODULES)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    # sort is stable: the tests of a module, and the other modules, keep their order.
    items.sort(key=lambda item: slow_rank(str(item.fspath)))


def pytest_configure(config: pytest.Config) -> None:
    # Each xdist worker starts a stack of its own; an external database would be shared by all.
    workers = getattr(config.option, "numprocesses", None)
    if os.environ.get("SQP_TEST_PG_DSN") and workers not in (None, 0, 1):
        raise pytest.UsageError(
            "SQP_TEST_PG_DSN is one database for the whole session: run the tests in one process "
            "(`make test TEST_WORKERS=0`, or pytest without -n)"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    # A process that started no stack (xdist's controller, a unit-test run) leaves no empty dir.
    with contextlib.suppress(OSError):
        STATE_DIR.rmdir()


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
