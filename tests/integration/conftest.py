from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from flows.bigquery import BigQueryClients, make_clients
from flows.sample_data import SampleSpec
from flows.settings import Settings, get_settings

# Small but complete: every week type, unicode queries, NULLs; fast on 2 cores.
SPEC = SampleSpec(sqp_rows=4_000, weeks=12, asins=20, daily_rows=1_500)


@pytest.fixture(scope="session")
def settings(stack: object) -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def clients(settings: Settings) -> Iterator[BigQueryClients]:
    c = make_clients(settings)
    yield c
    c.close()


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        yield conn


def bq_scalar(clients: BigQueryClients, sql: str) -> Any:
    return next(iter(clients.rest.query(sql).result()))[0]


def pg_scalar(conn: psycopg.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]
