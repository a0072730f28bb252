"""Exact BigQuery-vs-Postgres validation against the emulator and real Postgres.

The SQP proof runs on SQP_VALIDATION_ROWS rows (default 100,000 so the suite stays quick on two
cores; `SQP_VALIDATION_ROWS=1000000` gives the 1M-row proof of the issue). Everything lives in
its own dataset, raw schema and control schema (`vd_*`), so no other test is disturbed, and
every Postgres session runs in a zone that is not UTC.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import psycopg
import pytest
from google.cloud import bigquery
from psycopg import sql

from flows.control import registry
from flows.core.db import migrate
from flows.core.planning import align
from flows.core.settings import Settings, get_settings
from flows.core.table_config import SliceSize, TableConfig
from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
from flows.engine.bigquery import BigQueryClients, make_clients
from flows.engine.table_refresh import RefreshOptions, refresh_table
from flows.engine.validation import source_match
from tests.integration.test_extraction_engine import locked_run

S = bigquery.SchemaField
ROWS = int(os.environ.get("SQP_VALIDATION_ROWS", "100000"))
SPEC = SampleSpec(sqp_rows=ROWS, weeks=13, asins=50, daily_rows=0)
SQP_KEY = ["Date", "ASIN", "Search Query"]


@dataclass
class Env:
    settings: Settings
    clients: BigQueryClients

    def pg(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.dsn(), autocommit=True)

    def load(self, cfg: TableConfig) -> None:
        with self.pg() as conn:
            registry.sync_from_file(conn, self.settings.control_schema, [cfg])
        with locked_run(self.settings) as run_id:
            outcome = refresh_table(
                self.settings, self.clients, cfg, run_id, RefreshOptions(full_refresh=True)
            )
        assert outcome.status == "success", outcome.error


@pytest.fixture(scope="module")
def env(stack: object) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    mp.setenv("REFRESH_BQ_DATASET", "vd_source")
    mp.setenv("REFRESH_RAW_SCHEMA", "vd_raw")
    mp.setenv("REFRESH_CONTROL_SCHEMA", "vd_control")
    mp.setenv("PGTZ", "America/St_Johns")  # a zone with a half-hour offset and DST
    settings = get_settings()
    migrate(settings)
    clients = make_clients(settings)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        conn.execute("drop schema if exists vd_raw cascade")
        conn.execute("truncate vd_control.checkpoints, vd_control.dq_results, vd_control.events cascade")
    try:
        yield Env(settings, clients)
    finally:
        clients.close()
        mp.undo()


def sqp_cfg() -> TableConfig:
    return TableConfig(
        table_name="search_query_performance",
        source_table=SQP_TABLE,
        cursor_column="Date",
        slice_size="week",
        custom_params={"key_columns": SQP_KEY},
    )


@pytest.fixture(scope="module")
def sqp(env: Env) -> Env:
    generate(env.clients, SPEC)
    env.load(sqp_cfg())
    return env


def _failed(results: list[source_match.PeriodResult]) -> list[source_match.PeriodResult]:
    return [r for r in results if not r.passed]


def _one_row(conn: psycopg.Connection, where: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    row = cur.execute(
        f"select ctid::text as ctid, * from vd_raw.search_query_performance where {where} "
        "order by date, asin, search_query limit 1"
    ).fetchone()
    assert row is not None
    return row


def _period(ts: Any) -> Any:
    """The validation period (ISO week, UTC) holding an SQP week (which starts on a Sunday)."""
    return align(ts.astimezone(UTC).date(), SliceSize.WEEK)


def _key(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": row["date"].astimezone(UTC).isoformat(),
        "asin": row["asin"],
        "search_query": row["search_query"],
    }


def test_sqp_identical_then_each_difference_found_with_key_and_column(sqp: Env) -> None:
    results = source_match.validate(sqp.settings, sqp.clients, ["search_query_performance"])
    periods = results["search_query_performance"]
    assert len(periods) == SPEC.weeks
    assert sum(r.bigquery.rows for r in periods) == ROWS
    assert not _failed(periods), [r.differences for r in _failed(periods)]

    with sqp.pg() as conn:
        weeks = [
            r[0]
            for r in conn.execute(
                "select distinct date from vd_raw.search_query_performance order by 1"
            ).fetchall()
        ]
        deleted = _one_row(conn, f"date = '{weeks[1].isoformat()}' and asin = 'B000000003'")
        conn.execute("delete from vd_raw.search_query_performance where ctid = %s::tid", (deleted["ctid"],))
        extra = _one_row(conn, f"date = '{weeks[2].isoformat()}' and asin = 'B000000004'")
        conn.execute(
            "insert into vd_raw.search_query_performance select * from vd_raw.search_query_performance "
            "where ctid = %s::tid",
            (extra["ctid"],),
        )
        conn.execute(
            "update vd_raw.search_query_performance set search_query = 'extra query' "
            "where ctid = (select max(ctid) from vd_raw.search_query_performance where date = %s "
            "and asin = %s and search_query = %s)",
            (extra["date"], extra["asin"], extra["search_query"]),
        )
        extra["search_query"] = "extra query"
        numeric = _one_row(conn, f"date = '{weeks[3].isoformat()}' and asin = 'B000000005'")
        conn.execute(
            "update vd_raw.search_query_performance set asin_impression_share = "
            "asin_impression_share + 0.000000001 where ctid = %s::tid",
            (numeric["ctid"],),
        )
        text = _one_row(conn, f"date = '{weeks[3].isoformat()}' and asin = 'B000000006'")
        conn.execute(
            "update vd_raw.search_query_performance set child_asin = overlay(child_asin placing 'X' "
            "from 3 for 1) where ctid = %s::tid",
            (text["ctid"],),
        )
        null = _one_row(conn, f"date = '{weeks[4].isoformat()}' and parent_asin is null")
        conn.execute(
            "update vd_raw.search_query_performance set parent_asin = '' where ctid = %s::tid",
            (null["ctid"],),
        )

    periods = source_match.validate(sqp.settings, sqp.clients, ["search_query_performance"])[
        "search_query_performance"
    ]
    failed = {r.period_start: r for r in _failed(periods)}
    expected = [_period(w) for w in weeks[1:5]]
    assert sorted(failed) == expected
    by_week = {_period(w): failed[_period(w)].differences for w in weeks[1:5]}
    d1, d2, d3, d4 = (by_week[_period(w)] for w in weeks[1:5])
    assert d1 is not None and d2 is not None and d3 is not None and d4 is not None
    assert d1.missing_in_postgres == [{"key": _key(deleted)}]
    assert d1.extra_in_postgres == [] and d1.different == []
    assert d2.extra_in_postgres == [{"key": _key(extra)}]
    assert d2.missing_in_postgres == [] and d2.different == []
    assert failed[_period(weeks[2])].postgres.rows == failed[_period(weeks[2])].bigquery.rows + 1
    assert sorted((d["key"]["asin"], d["columns"]) for d in d3.different) == [
        ("B000000005", ["asin_impression_share"]),
        ("B000000006", ["child_asin"]),
    ]
    num = next(d for d in d3.different if d["key"] == _key(numeric))
    assert num["postgres"]["asin_impression_share"][-1] != num["bigquery"]["asin_impression_share"][-1]
    assert d4.different == [
        {
            "key": _key(null),
            "columns": ["parent_asin"],
            "bigquery": {"parent_asin": None},
            "postgres": {"parent_asin": ""},
        }
    ]

    with sqp.pg() as conn:
        recorded = conn.execute(
            "select (period_start at time zone 'UTC')::date, status, details from vd_control.dq_results "
            "where checked_at = (select max(checked_at) from vd_control.dq_results) "
            "and status = 'fail' order by 1"
        ).fetchall()
        events = conn.execute(
            "select table_name, payload from vd_control.events where event = 'validation.failed'"
        ).fetchall()
    assert [r[0] for r in recorded] == expected
    assert recorded[0][2]["missing_in_postgres"] == [{"key": _key(deleted)}]
    assert events == [
        (
            "search_query_performance",
            {
                "table": "search_query_performance",
                "schema": "vd_raw",
                "periods_failed": [str(_period(w)) for w in weeks[1:5]],
                "periods_checked": SPEC.weeks,
                "rows_missing_in_postgres": 1,
                "rows_extra_in_postgres": 1,
                "rows_different": 3,
            },
        )
    ]


TYPES_SCHEMA = [
    S("id", "INT64"),
    S("day", "DATE"),
    S("label", "STRING"),
    S("amount", "NUMERIC"),
    S("ratio", "FLOAT64"),
    S("seen_at", "TIMESTAMP"),
    S("local_at", "DATETIME"),
    S("at_time", "TIME"),
    S("flag", "BOOL"),
    S("blob", "BYTES"),
]
TYPES_ROWS = """
insert into {t} (id, day, label, amount, ratio, seen_at, local_at, at_time, flag, blob) values
 (1, date '2026-01-05', 'plain', numeric '123456789.123456789', 1.1,
  timestamp '2026-03-29 01:30:00.123456+01', datetime '2026-03-29 02:30:00.5', time '23:59:59.999999',
  true, from_hex('00ff')),
 (2, date '2026-01-31', '', numeric '-0.000000001', 0.30000000000000004,
  timestamp '2026-10-25 02:30:00-09:30', datetime '1999-12-31 23:59:59', time '00:00:00', false, from_hex('')),
 (3, date '2026-02-01', null, null, null, null, null, null, null, null),
 (4, date '2026-02-28', '跑步鞋 ランニング 🏃 chaussures d''été, "quoted"\\n', numeric '0', -0.0,
  timestamp '1969-07-20 20:17:40Z', datetime '2026-01-01 00:00:00', time '12:00:00', true, from_hex('616263')),
 (5, date '2026-03-01', '~', numeric '99999999999999999999999999999.999999999', 1e-300,
  timestamp '2026-06-30 23:59:59.999999+14', null, null, false, null),
 (6, date '2026-03-02', '3:abc', numeric '1.5', 1.7976931348623157e308,
  timestamp '2026-01-01 00:00:00+00', null, null, null, from_hex('0a'))
"""


def test_identical_data_of_every_type_passes(env: Env) -> None:
    table_id = f"{env.clients.project}.vd_source.vd_types"
    ds = bigquery.Dataset(f"{env.clients.project}.vd_source")
    ds.location = env.settings.bq_location
    env.clients.rest.create_dataset(ds, exists_ok=True)
    env.clients.rest.delete_table(table_id, not_found_ok=True)
    env.clients.rest.create_table(bigquery.Table(table_id, schema=TYPES_SCHEMA))
    env.clients.rest.query(TYPES_ROWS.replace("{t}", f"`{table_id}`")).result()
    cfg = TableConfig(
        table_name="vd_types",
        source_table="vd_types",
        cursor_column="day",
        slice_size="month",
        custom_params={"key_columns": ["id"]},
    )
    env.load(cfg)
    periods = source_match.validate(env.settings, env.clients, ["vd_types"])["vd_types"]
    assert [str(r.period_start) for r in periods] == ["2026-01-01", "2026-02-01", "2026-03-01"]
    assert [r.bigquery.rows for r in periods] == [2, 2, 2]
    assert not _failed(periods), [r.differences for r in _failed(periods)]

    # And the same normal forms see a one-microsecond and a one-ulp change.
    with env.pg() as conn:
        conn.execute("update vd_raw.vd_types set seen_at = seen_at + interval '1 microsecond' where id = 1")
        conn.execute("update vd_raw.vd_types set ratio = 0.30000000000000004::float8 + 5e-17 where id = 2")
        conn.execute("update vd_raw.vd_types set label = '' where id = 3")
    periods = source_match.validate(env.settings, env.clients, ["vd_types"])["vd_types"]
    (jan, feb) = _failed(periods)
    assert jan.differences is not None and feb.differences is not None
    assert sorted((d["key"]["id"], d["columns"]) for d in jan.differences.different) == [
        ("1", ["seen_at"]),
        ("2", ["ratio"]),
    ]
    assert feb.differences.different[0]["columns"] == ["label"]


def test_a_table_wider_than_a_postgres_call_validates_and_names_the_column(env: Env) -> None:
    # 121 columns: more than the 100 arguments Postgres passes to one concat_ws, and a flat
    # row text for the emulator (it once failed on ~20 nested concat pieces).
    width = 120
    table_id = f"{env.clients.project}.vd_source.vd_wide"
    ds = bigquery.Dataset(f"{env.clients.project}.vd_source")
    ds.location = env.settings.bq_location
    env.clients.rest.create_dataset(ds, exists_ok=True)
    env.clients.rest.delete_table(table_id, not_found_ok=True)
    schema = [S("id", "INT64")] + [
        S(f"c{i}", "STRING" if i % 3 == 0 else "NUMERIC" if i % 3 == 1 else "INT64") for i in range(width)
    ]
    env.clients.rest.create_table(bigquery.Table(table_id, schema=schema))
    values = ", ".join(
        f"'v{i}'" if i % 3 == 0 else f"numeric '{i}.5'" if i % 3 == 1 else str(i) for i in range(width)
    )
    with_null = values.replace("'v0'", "null")
    env.clients.rest.query(f"insert into `{table_id}` values (1, {values}), (2, {with_null})").result()
    cfg = TableConfig(
        table_name="vd_wide",
        source_table="vd_wide",
        write_strategy="full_replace",
        custom_params={"key_columns": ["id"]},
    )
    env.load(cfg)
    (whole,) = source_match.validate(env.settings, env.clients, ["vd_wide"])["vd_wide"]
    assert whole.passed and whole.bigquery.rows == 2

    with env.pg() as conn:
        conn.execute("update vd_raw.vd_wide set c118 = c118 + 1 where id = 2")
    (whole,) = source_match.validate(env.settings, env.clients, ["vd_wide"])["vd_wide"]
    assert whole.differences is not None
    assert [(d["key"], d["columns"]) for d in whole.differences.different] == [({"id": "2"}, ["c118"])]


def test_unknown_table_and_unloaded_table_are_clear_errors(env: Env) -> None:
    from flows.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown table"):
        source_match.validate(env.settings, env.clients, ["nope"])
    with env.pg() as conn:
        registry.sync_from_file(
            conn,
            env.settings.control_schema,
            [TableConfig(table_name="vd_never", source_table="vd_types", write_strategy="full_replace")],
        )
    with pytest.raises(ConfigError, match="does not exist"):
        source_match.validate(env.settings, env.clients, ["vd_never"])
    with env.pg() as conn:
        conn.execute(sql.SQL("delete from vd_control.refresh_config where table_name = 'vd_never'"))


def test_cli_validate_data_exits_1_naming_the_differences(env: Env) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    # Runs after test_identical_data_of_every_type_passes changed three rows of vd_types.
    result = CliRunner().invoke(app, ["validate-data", "--tables", "vd_types", "--from", "2026-01-01"])
    assert result.exit_code == 1, result.output
    assert "2 period(s) differ between BigQuery and Postgres" in result.output
    bad = CliRunner().invoke(app, ["validate-data", "--from", "2026-02-01", "--to", "2026-01-01"])
    assert bad.exit_code == 1 and "--from 2026-02-01 is after --to 2026-01-01" in bad.output
