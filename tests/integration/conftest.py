from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from flows.core.settings import Settings, get_settings
from flows.demo.sample_data import DAILY_TABLE, PRODUCTS_TABLE, SQP_TABLE, SampleSpec, generate
from flows.engine.bigquery import BigQueryClients, make_clients

# A test that runs without the session's Prefect server (its own home, a bare environment) starts
# Prefect's ephemeral API server; on a busy 2-core machine it needs more than the default 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Small but complete: every week type, unicode queries, NULLs; fast on 2 cores.
SPEC = SampleSpec(sqp_rows=4_000, weeks=12, asins=20, daily_rows=1_500)


@pytest.fixture(scope="session", autouse=True)
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One standing Prefect server for the session, as a user's stack has one: in-process flows
    and every `refresh` subprocess report to it instead of each starting Prefect's ephemeral
    server (seconds per process). Tests that need a server of their own (deployments served
    by a worker, a scan of the server's database) start one; tests of the first-run path drop
    PREFECT_API_URL from their subprocess's environment."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.prefect_server import prefect_server

    # A run waiting for a deployment's concurrency slot asks again after 1 s, not 30 s.
    with prefect_server(
        tmp_path_factory.mktemp("prefect"), PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1"
    ) as url:
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def settings(stack: object) -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def clients(settings: Settings) -> Iterator[BigQueryClients]:
    c = make_clients(settings)
    yield c
    c.close()


@pytest.fixture(scope="session")
def refreshed(settings: Settings, clients: BigQueryClients) -> dict[str, Any]:
    """SPEC generated into the emulator and one forced daily refresh: the session's shared data.

    dbt writes to fixed schemas (staging, marts, summaries), so every module that checks dbt
    output reads this one build instead of building its own.
    """
    generated = generate(clients, SPEC)
    assert {g.table: g.rows for g in generated} == {
        SQP_TABLE: SPEC.sqp_rows,
        PRODUCTS_TABLE: SPEC.asins,
        DAILY_TABLE: SPEC.daily_rows,
    }
    from flows.orchestration.daily_refresh import daily_refresh

    return daily_refresh(force=True, trigger="test")  # type: ignore[no-any-return]


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        yield conn


def migrated_with_dataset() -> tuple[Settings, BigQueryClients]:
    """Settings from the environment as it stands (a module's own dataset and schemas), the
    control schema migrated and the BigQuery dataset created; the caller closes the clients."""
    from google.cloud import bigquery

    from flows.core.db import migrate

    settings = get_settings()
    migrate(settings)
    clients = make_clients(settings)
    ds = bigquery.Dataset(f"{clients.project}.{clients.dataset}")
    ds.location = settings.bq_location
    clients.rest.create_dataset(ds, exists_ok=True)
    return settings, clients


def bq_scalar(clients: BigQueryClients, sql: str) -> Any:
    return next(iter(clients.rest.query(sql).result()))[0]


def pg_scalar(conn: psycopg.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]
