"""The fault harness's shared parts: an isolated stack for `refresh run` subprocesses and the
checks that a run left the data exact.

Each fault module gets its own Postgres database on the session's server and its own BigQuery
dataset, so the runs it breaks (and the dbt schemas they build) never touch what other test
modules read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from flows.control import registry
from flows.core.db import migrate
from flows.core.settings import Settings, get_settings
from flows.core.table_config import target_schema
from flows.core.type_mapping import pg_column_name
from flows.demo.sample_data import SampleSpec, generate
from flows.engine.bigquery import BigQueryClients, make_clients
from flows.engine.validation import source_match

REFRESH = str(Path(sys.executable).parent / "refresh")
# Small but complete: every week type, NULLs, three tables (two sliced by week, one full).
SPEC = SampleSpec(sqp_rows=1_500, weeks=8, asins=10, daily_rows=600)


@dataclass
class FaultStack:
    name: str
    settings: Settings
    env: dict[str, str]

    def clients(self) -> BigQueryClients:
        return make_clients(self.settings)

    def pg(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.dsn(), autocommit=True)

    def cli(self, *args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
        """`refresh ...` in its own process group (a kill -9 takes its children too)."""
        return subprocess.Popen(
            [REFRESH, *args], env={**self.env, **(env or {})}, text=True, start_new_session=True, **kw
        )

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [REFRESH, *args], env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )

    def scalar(self, query: str, params: tuple[object, ...] = ()) -> Any:
        with self.pg() as conn:
            row = conn.execute(query, params).fetchone()
        return None if row is None else row[0]

    def control(self, table: str) -> sql.Composable:
        return sql.Identifier(self.settings.control_schema, table)


def fault_stack(name: str, spec: SampleSpec = SPEC) -> Iterator[FaultStack]:
    """A fresh database `name` and dataset `name`, the sample tables generated into it."""
    base = get_settings()
    with psycopg.connect(base.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    dsn = make_conninfo(base.dsn(), dbname=name)
    env = {
        **os.environ,
        "REFRESH_PG_DSN": dsn,
        "REFRESH_BQ_DATASET": name,
        "REFRESH_BQ_ENDPOINT": str(base.rest_endpoint),
        "REFRESH_BQ_STORAGE_ENDPOINT": str(base.storage_endpoint),
        "COLUMNS": "200",
        # `refresh run` reports to the session's Prefect server (PREFECT_API_URL); a test that
        # drops it starts Prefect's ephemeral server, which on a loaded machine needs long.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
        # the webhook receiver of the kill trials listens on 127.0.0.1
        "REFRESH_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    settings = get_settings(pg_dsn=dsn, bq_dataset=name, webhook_allow_private=True)
    migrate(settings)
    clients = make_clients(settings)
    try:
        generate(clients, spec, force=True)
    finally:
        clients.close()
    yield FaultStack(name, settings, env)
    with psycopg.connect(base.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def assert_exact(stack: FaultStack) -> dict[str, int]:
    """Postgres equals the source: flows.engine.validation's per-period row counts and per-column
    checksums of every live table, and no key twice. Returns the periods checked per table."""
    clients = stack.clients()
    try:
        results = source_match.validate(stack.settings, clients)
        with stack.pg() as conn:
            configs = {c.table_name: c for c in registry.load_all(conn, stack.settings.control_schema)}
            for table in results:
                cfg = configs[table]
                keys = [sql.Identifier(pg_column_name(k)) for k in source_match.key_columns(cfg)]
                dup = conn.execute(
                    sql.SQL(
                        "select count(*) from (select 1 from {} group by {} having count(*) > 1) d"
                    ).format(
                        sql.Identifier(target_schema(stack.settings, cfg), table), sql.SQL(", ").join(keys)
                    )
                ).fetchone()
                assert dup == (0,), f"{table}: {dup} keys appear more than once"
    finally:
        clients.close()
    bad = {t: [r.details() for r in rs if not r.passed] for t, rs in results.items()}
    assert not any(bad.values()), bad
    assert set(results) == {"search_query_performance", "daily_search_terms", "products"}, results
    return {t: len(rs) for t, rs in results.items()}


def runs_left_running(stack: FaultStack) -> list[UUID]:
    with stack.pg() as conn:
        rows = conn.execute(
            sql.SQL("select run_id from {} where status = 'running'").format(stack.control("refresh_runs"))
        ).fetchall()
    return [r[0] for r in rows]


def wait_for_sessions_to_end(stack: FaultStack, timeout_s: float = 15.0) -> None:
    """After a SIGKILL the server ends the dead client's sessions; wait until it has (the next
    run would otherwise find the refresh lock still held)."""
    deadline = time.monotonic() + timeout_s
    with stack.pg() as conn:
        while conn.execute(
            "select count(*) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
            (stack.name,),
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "sessions of the killed process did not end"
            time.sleep(0.02)
