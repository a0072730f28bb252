"""Nothing the product reads or writes depends on a session's time zone.

The test database's default zone is America/St_Johns (tests/conftest.py): west of UTC, a
half-hour offset, daylight saving. A whole-table (full_replace) table refreshes again and
again with change detection; timestamps at the edges of BigQuery's range round-trip exactly
through three runs, change detection and validation. Own dataset and schemas (`tz_*`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from google.cloud import bigquery

from flows.control import checkpoints, registry, runs
from flows.core.db import connect, migrate
from flows.core.settings import Settings, get_settings
from flows.core.table_config import TableConfig
from flows.demo.sample_data import PRODUCTS_TABLE, SampleSpec, products_insert_sql, products_schema
from flows.engine.bigquery import BigQueryClients
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.engine.transform import dbt_env
from flows.engine.validation import after_refresh, source_match
from tests.conftest import TEST_DB_TIME_ZONE
from tests.integration.conftest import migrated_with_dataset
from tests.integration.test_extraction_engine import locked_run

MIN_TS = datetime(1, 1, 1, tzinfo=UTC)
MAX_TS = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
# In St. John's the first is a BC local time, and the second's local date is still 9999-12-31.
EDGES = "edges"
EDGES_SCHEMA = [
    bigquery.SchemaField("id", "INT64"),
    bigquery.SchemaField("Day", "DATE"),
    bigquery.SchemaField("At", "TIMESTAMP"),
    bigquery.SchemaField("Note", "STRING"),
]
EDGES_INSERT = (
    "insert into {t} (id, `Day`, `At`, `Note`) values "
    "(1, date '2026-11-02', timestamp '0001-01-01 00:00:00+00', 'first instant'), "
    "(2, date '2026-11-03', timestamp '9999-12-31 23:59:59.999999+00', 'last instant'), "
    "(3, date '2026-11-10', timestamp '2026-03-08 05:30:00+00', 'St. John''s DST starts'), "
    "(4, date '2026-11-10', null, 'no time')"
)
EXPECTED_AT = {1: MIN_TS, 2: MAX_TS, 3: datetime(2026, 3, 8, 5, 30, tzinfo=UTC), 4: None}


@dataclass
class Env:
    settings: Settings
    clients: BigQueryClients

    def path(self, table: str) -> str:
        return f"`{self.clients.project}.{self.clients.dataset}.{table}`"

    def create_source(self, table: str, schema: list[bigquery.SchemaField], insert: str) -> None:
        table_id = f"{self.clients.project}.{self.clients.dataset}.{table}"
        self.clients.rest.delete_table(table_id, not_found_ok=True)
        self.clients.rest.create_table(bigquery.Table(table_id, schema=schema))
        self.clients.rest.query(insert.replace("{t}", self.path(table))).result()

    def refresh(self, cfg: TableConfig) -> TableOutcome:
        """A daily run's refresh of the table, then the validation the flow runs after it."""
        with locked_run(self.settings) as run_id:
            outcome = refresh_table(self.settings, self.clients, cfg, run_id, RefreshOptions())
            after = after_refresh.validate_touched(
                self.settings, self.clients, cfg, outcome.status, run_id, plan=outcome.plan_fingerprints
            )
        assert outcome.status == "success", outcome.error
        assert after.error is None and not after.failed, after.to_dict()
        return outcome

    def unchanged(self, outcome: TableOutcome) -> int:
        """The slices the run found unchanged (change detection) and did not read."""
        with connect(self.settings, autocommit=True) as conn:
            row = conn.execute(
                "select count(*) from tz_control.slice_refreshes where run_id = %s and table_name = %s "
                "and status = 'unchanged'",
                (outcome.run_id, outcome.table_name),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def validate(self, cfg: TableConfig) -> None:
        with connect(self.settings, autocommit=True) as conn:
            results = source_match.validate_table(self.clients, conn, cfg, self.settings.raw_schema)
        assert results and all(r.passed for r in results), [r.details() for r in results if not r.passed]


PRODUCTS = TableConfig(
    table_name=PRODUCTS_TABLE,
    source_table=PRODUCTS_TABLE,
    write_strategy="full_replace",
    custom_params={"key_columns": ["ASIN"]},
)
EDGES_WHOLE = TableConfig(
    table_name="edges_whole",
    source_table=EDGES,
    write_strategy="full_replace",
    custom_params={"key_columns": ["id"]},
)
EDGES_WEEKLY = TableConfig(
    table_name="edges_weekly",
    source_table=EDGES,
    cursor_column="Day",
    slice_size="week",
    lookback_days=14,
    custom_params={"key_columns": ["id"]},
)


@pytest.fixture(scope="module")
def env(stack: object) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    mp.setenv("REFRESH_BQ_DATASET", "tz_source")
    mp.setenv("REFRESH_RAW_SCHEMA", "tz_raw")
    mp.setenv("REFRESH_CONTROL_SCHEMA", "tz_control")
    settings, clients = migrated_with_dataset()
    e = Env(settings, clients)
    e.create_source(PRODUCTS_TABLE, products_schema(), products_insert_sql("{t}", SampleSpec(asins=12)))
    e.create_source(EDGES, EDGES_SCHEMA, EDGES_INSERT)
    with connect(settings, autocommit=True) as conn:
        conn.execute("drop schema if exists tz_raw cascade")
        conn.execute("truncate tz_control.checkpoints, tz_control.refresh_config cascade")
        registry.sync_from_file(conn, settings.control_schema, [PRODUCTS, EDGES_WHOLE, EDGES_WEEKLY])
    try:
        yield e
    finally:
        clients.close()
        mp.undo()


def test_the_test_database_is_not_in_utc(env: Env) -> None:
    with psycopg.connect(env.settings.dsn(), autocommit=True) as conn:
        assert conn.execute("show timezone").fetchone() == (TEST_DB_TIME_ZONE,)


def test_every_session_the_product_opens_is_in_utc(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client zone too (libpq's PGTZ), on top of the database's.
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")
    for autocommit in (False, True):
        with connect(env.settings, autocommit=autocommit) as conn:
            # Left as psycopg opens it: no transaction begun.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.execute("show timezone").fetchone() == ("UTC",)
    # dbt's sessions (dbt-postgres, libpq) take their zone from PGTZ.
    assert dbt_env(env.settings)["PGTZ"] == "UTC"


def test_a_whole_table_refreshes_again_and_again(env: Env) -> None:
    """The products table (full_replace): the second run, with change detection reading the
    first's whole-table checkpoint ('-infinity'..'infinity'), refreshes it again; a year-1 bound
    read west of UTC would fail with 'timestamp too small (before year 1)'."""
    first = env.refresh(PRODUCTS)
    assert first.slices_done == 1
    for _ in range(2):
        again = env.refresh(PRODUCTS)
        assert (again.slices_done, env.unchanged(again)) == (0, 1)
    env.validate(PRODUCTS)
    with connect(env.settings, autocommit=True) as conn:
        # No timestamp stands for the whole table's bounds.
        bounds = conn.execute(
            "select isfinite(slice_start), isfinite(slice_end) from tz_control.checkpoints "
            "where table_name = %s union all select isfinite(slice_start), isfinite(slice_end) "
            "from tz_control.slice_refreshes where table_name = %s",
            (PRODUCTS_TABLE, PRODUCTS_TABLE),
        ).fetchall()
    assert bounds and set(bounds) == {(False, False)}


def _raw_at(env: Env, table: str) -> dict[int, datetime | None]:
    with connect(env.settings, autocommit=True) as conn:
        rows = conn.execute(f'select id, "at" from tz_raw.{table}').fetchall()
    return dict(rows)


@pytest.mark.parametrize("cfg", [EDGES_WHOLE, EDGES_WEEKLY], ids=["whole", "weekly"])
def test_edge_timestamps_round_trip_through_three_runs(env: Env, cfg: TableConfig) -> None:
    env.refresh(cfg)
    assert _raw_at(env, cfg.table_name) == EXPECTED_AT
    env.validate(cfg)
    second = env.refresh(cfg)
    assert second.slices_done == 0 and env.unchanged(second) >= 1
    assert _raw_at(env, cfg.table_name) == EXPECTED_AT
    # A restated row: the third run reads its slice again, edges and all.
    env.clients.rest.query(f"update {env.path(EDGES)} set `Note` = concat(`Note`, '!') where id = 1").result()
    try:
        third = env.refresh(cfg)
        assert third.slices_done == 1
        assert _raw_at(env, cfg.table_name) == EXPECTED_AT
        env.validate(cfg)
    finally:
        env.create_source(EDGES, EDGES_SCHEMA, EDGES_INSERT)


def test_migration_moves_whole_table_slices_to_infinite_bounds(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control schemas written before migration 0010 kept a whole table's slice as
    0001-01-01 .. 9999-12-31; after it the product reads them as the whole table."""
    monkeypatch.setenv("REFRESH_CONTROL_SCHEMA", "tz_migrate")
    settings = get_settings()
    with connect(settings, autocommit=True) as conn:
        conn.execute("drop schema if exists tz_migrate cascade")
    migrate(settings, revision="0009")
    whole = (datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC))
    week = (datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 12, tzinfo=UTC))
    with connect(settings, autocommit=True) as conn:
        run = runs.start_run(conn, "tz_migrate", flow_run_id=None, trigger="test", params={})
        for table, (start, end) in (("full", whole), ("sliced", week)):
            checkpoints.record(conn, "tz_migrate", table, start, end, run.run_id, 1)
            conn.execute(
                "insert into tz_migrate.slice_refreshes (run_id, table_name, slice_start, slice_end, status, "
                "started_at) values (%s, %s, %s, %s, 'success', now())",
                (run.run_id, table, start, end),
            )
    migrate(settings)
    with connect(settings, autocommit=True) as conn:
        rows = conn.execute(
            "select 'checkpoints', table_name, slice_start::text, slice_end::text from tz_migrate.checkpoints "
            "union all select 'slice_refreshes', table_name, slice_start::text, slice_end::text "
            "from tz_migrate.slice_refreshes order by 1, 2"
        ).fetchall()
    dated = ("2026-01-05 00:00:00+00", "2026-01-12 00:00:00+00")
    assert rows == [
        ("checkpoints", "full", "-infinity", "infinity"),
        ("checkpoints", "sliced", *dated),
        ("slice_refreshes", "full", "-infinity", "infinity"),
        ("slice_refreshes", "sliced", *dated),
    ]
