"""Proofs for the extraction engine, against real Postgres and the BigQuery emulator.

- crash: SIGKILL the extracting process at random moments, then resume: every slice is either
  applied and checkpointed or untouched, and the final raw table equals the source exactly;
- late restatement: changes inside the lookback window are picked up, older ones only by a
  backfill;
- drift: a new column is added and filled; a retyped or dropped column fails only its table;
- round trip: every value of every type comes back as BigQuery returns it, through the
  Storage Read path and the REST fallback.

Each test uses its own BigQuery dataset and raw schema (REFRESH_BQ_DATASET / REFRESH_RAW_SCHEMA);
they share the control schema `xt_control` and name their tables `xt_...`, so they never touch
what the other integration tests read (`sqp`, `raw`, `refresh_control`).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from google.cloud import bigquery
from psycopg import sql

from flows.control import runs
from flows.core.db import relation_columns
from flows.core.settings import Settings
from flows.core.table_config import TableConfig
from flows.core.type_mapping import pg_column_name
from flows.engine.bigquery import BigQueryClients
from flows.engine.extract import ReadStats, read_rest, read_storage
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.orchestration import run_params, run_summary
from tests.integration.conftest import migrated_with_dataset

S = bigquery.SchemaField
CONTROL = "xt_control"


# --------------------------------------------------------------------------------------
# Helpers: one isolated engine per test
# --------------------------------------------------------------------------------------


@dataclass
class Engine:
    settings: Settings
    clients: BigQueryClients

    @property
    def raw(self) -> str:
        return self.settings.raw_schema

    def path(self, table: str) -> str:
        return f"`{self.clients.project}.{self.clients.dataset}.{table}`"

    def bq(self, query: str) -> list[dict[str, Any]]:
        return [dict(r.items()) for r in self.clients.rest.query(query).result()]

    def create_source(self, table: str, schema: list[bigquery.SchemaField], insert: str | None) -> None:
        """(Re)create a source table with an explicit schema and fill it with INSERT ... SELECT."""
        table_id = f"{self.clients.project}.{self.clients.dataset}.{table}"
        self.clients.rest.delete_table(table_id, not_found_ok=True)
        self.clients.rest.create_table(bigquery.Table(table_id, schema=schema))
        if insert:
            self.clients.rest.query(insert.replace("{t}", self.path(table))).result()

    def pg(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.dsn(), autocommit=True)

    def refresh(
        self, cfg: TableConfig, options: RefreshOptions | None = None, params: dict[str, Any] | None = None
    ) -> TableOutcome:
        with locked_run(self.settings, params) as run_id:
            return refresh_table(self.settings, self.clients, cfg, run_id, options or RefreshOptions())


@contextlib.contextmanager
def locked_run(settings: Settings, params: dict[str, Any] | None = None) -> Iterator[UUID]:
    """A run as the flow makes one: under the lock (held throughout: slices commit only under
    it), after marking dead runs abandoned, recording `params`; its row ends `success`."""
    with runs.refresh_lock(settings, wait_s=30) as conn:
        runs.mark_abandoned(conn, settings.control_schema)
        run = runs.start_run(
            conn, settings.control_schema, flow_run_id=None, trigger="test", params=params or {}
        )
        try:
            yield run.run_id
        finally:
            end_run(settings, run.run_id)


def end_run(settings: Settings, run_id: UUID) -> None:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        runs.finish_run(
            conn,
            settings.control_schema,
            run_id,
            status="success",
            message="test",
            tables_planned=0,
            tables_succeeded=0,
            tables_failed=0,
            rows_read=0,
            rows_inserted=0,
            dbt_invocation_id=None,
        )


@pytest.fixture
def engine(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, stack: object
) -> Iterator[Engine]:
    name = "xt_" + request.node.name.removeprefix("test_").split("_")[0]
    monkeypatch.setenv("REFRESH_BQ_DATASET", name)
    monkeypatch.setenv("REFRESH_RAW_SCHEMA", f"{name}_raw")
    monkeypatch.setenv("REFRESH_CONTROL_SCHEMA", CONTROL)
    # Every session of these tests (and of the crash test's child) runs in a zone that is not
    # UTC, so a loader that relied on the server's zone would shift timestamps.
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")
    settings, clients = migrated_with_dataset()
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(settings.raw_schema)))
        conn.execute(
            sql.SQL("delete from {} where table_name like %s").format(
                sql.Identifier(settings.control_schema, "checkpoints")
            ),
            (f"{name}%",),
        )
    try:
        yield Engine(settings, clients)
    finally:
        clients.close()


def table_cfg(name: str, source: str, **kw: Any) -> TableConfig:
    return TableConfig(table_name=name, source_table=source, **kw)


# --------------------------------------------------------------------------------------
# Checksums: the same figures computed by BigQuery SQL and by Postgres SQL
# --------------------------------------------------------------------------------------


def bq_checksums(e: Engine, table: str, key: str, schema: list[bigquery.SchemaField]) -> dict[str, Any]:
    parts = ["count(*) as n", f"count(distinct `{key}`) as keys"]
    for i, f in enumerate(schema):
        c = f"`{f.name}`"
        parts.append(f"countif({c} is null) as nulls_{i}")
        if f.field_type in ("INT64", "NUMERIC", "FLOAT64"):
            parts.append(f"sum({c}) as sum_{i}")
        elif f.field_type == "TIMESTAMP":
            parts.append(f"sum(unix_micros({c})) as sum_{i}")
        elif f.field_type == "DATE":
            parts.append(f"sum(unix_date({c})) as sum_{i}")
        elif f.field_type == "STRING":
            parts.append(f"to_hex(md5(string_agg(coalesce({c}, '∅'), '|' order by `{key}`))) as md5_{i}")
    row = e.bq(f"select {', '.join(parts)} from {e.path(table)}")[0]
    return {k: _num(v) for k, v in row.items()}


def pg_checksums(e: Engine, table: str, key: str, schema: list[bigquery.SchemaField]) -> dict[str, Any]:
    k = sql.Identifier(pg_column_name(key))
    parts: list[sql.Composable] = [
        sql.SQL("count(*) as n"),
        sql.SQL("count(distinct {}) as keys").format(k),
    ]
    for i, f in enumerate(schema):
        c = sql.Identifier(pg_column_name(f.name))
        parts.append(
            sql.SQL("count(*) filter (where {} is null) as {}").format(c, sql.Identifier(f"nulls_{i}"))
        )
        agg = {
            "INT64": "sum({c})",
            "NUMERIC": "sum({c})",
            "FLOAT64": "sum({c})",
            "TIMESTAMP": "sum((extract(epoch from {c}) * 1000000)::bigint)",
            "DATE": "sum({c} - date '1970-01-01')",
            "STRING": "md5(string_agg(coalesce({c}, '∅'), '|' order by {k}))",
        }.get(f.field_type)
        if agg:
            alias = f"md5_{i}" if f.field_type == "STRING" else f"sum_{i}"
            parts.append(sql.SQL(agg + " as {a}").format(c=c, k=k, a=sql.Identifier(alias)))
    with e.pg() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL("select {} from {}").format(sql.SQL(", ").join(parts), sql.Identifier(e.raw, table))
        )
        row = cur.fetchone()
    assert row is not None
    return {kk: _num(v) for kk, v in row.items()}


def _num(v: Any) -> Any:
    # BigQuery returns INT64 sums as int and NUMERIC sums as Decimal; Postgres sums as Decimal.
    if isinstance(v, int | Decimal):
        return Decimal(v).normalize()
    if isinstance(v, float):
        return Decimal(repr(v)).normalize()
    return v


def pg_rows(e: Engine, table: str, columns: list[str], key: str) -> list[dict[str, Any]]:
    with e.pg() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL("select {} from {} order by {}").format(
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.Identifier(e.raw, table),
                sql.Identifier(key),
            )
        )
        return list(cur.fetchall())


def checkpoint_starts(e: Engine, table: str) -> set[date]:
    with e.pg() as conn:
        rows = conn.execute(
            sql.SQL("select slice_start from {} where table_name = %s").format(
                sql.Identifier(e.settings.control_schema, "checkpoints")
            ),
            (table,),
        ).fetchall()
    return {r[0].astimezone(UTC).date() for r in rows}


# --------------------------------------------------------------------------------------
# 1. Crash test
# --------------------------------------------------------------------------------------

CRASH_DAYS = 120
CRASH_ROWS = 6_000
CRASH_SCHEMA = [
    S("Event Id", "INT64"),
    S("Event Time", "TIMESTAMP"),
    S("Customer Name", "STRING"),
    S("Amount", "NUMERIC"),
    S("Qty", "INT64"),
    S("Score", "FLOAT64"),
]
# Every value is a function of n; a few events sit exactly on a day boundary (half-open slices).
# Scores are multiples of 1/4, so float sums are exact in any order.
CRASH_INSERT = f"""
insert into {{t}} (`Event Id`, `Event Time`, `Customer Name`, `Amount`, `Qty`, `Score`)
select n,
  timestamp_add(timestamp '2026-01-05 00:00:00+00', interval day_secs + secs second),
  if(m7 = 0, null, concat(case w when 0 then 'Zoë' when 1 then '東京 café' when 2 then 'O''Brien, "Jr"'
    when 3 then 'line\\nbreak' else 'Ñandú 🦤' end, ' #', cast(n as string))),
  cast(n * 37 - 40000 as numeric) / 1000,
  if(m11 = 0, null, m13 * 3 - 10),
  cast(m13 as float64) / 4
from (
  select n, d * 86400 as day_secs, if(m97 = 0, 0, s0) as secs, m7, m11, m13, w from (
    select n, mod(n, {CRASH_DAYS}) as d, mod(n * 7919, 86400) as s0, mod(n, 97) as m97,
      mod(n, 7) as m7, mod(n, 11) as m11, mod(n, 13) as m13, mod(n, 5) as w
    from unnest(generate_array(0, {CRASH_ROWS - 1})) as n))
"""

# The child runs as the flow does: it takes the lock and starts its run, then refreshes.
CRASH_CHILD = """
import sys
from flows.control import runs
from flows.engine.bigquery import make_clients
from flows.engine.table_refresh import RefreshOptions, refresh_table
from flows.core.table_config import TableConfig
from flows.core.settings import get_settings
settings = get_settings()
clients = make_clients(settings)
cfg = TableConfig.model_validate_json(sys.argv[1])
with runs.refresh_lock(settings, wait_s=30) as conn:
    runs.mark_abandoned(conn, settings.control_schema)
    run = runs.start_run(conn, settings.control_schema, flow_run_id=None, trigger="test", params={})
    print("ready", run.run_id, flush=True)
    outcome = refresh_table(settings, clients, cfg, run.run_id, RefreshOptions())
    print(outcome.status, outcome.error, flush=True)
"""


def _scalar(conn: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _wait_for_sessions_to_end(conn: psycopg.Connection, timeout_s: float = 15.0) -> None:
    """After a SIGKILL the server ends the dead client's sessions; wait until it has."""
    deadline = time.monotonic() + timeout_s
    while _scalar(conn, "select count(*) from pg_stat_activity where application_name = 'sqp-refresh'"):
        assert time.monotonic() < deadline, "sessions of the killed process did not end"
        time.sleep(0.02)


def _checkpoints(conn: psycopg.Connection, table: str) -> int:
    return int(_scalar(conn, f"select count(*) from {CONTROL}.checkpoints where table_name = %s", (table,)))


def _rows_per_day(e: Engine, table: str) -> dict[date, int]:
    with e.pg() as conn:
        if _scalar(conn, "select to_regclass(%s)", (f"{e.raw}.{table}",)) is None:
            return {}
        rows = conn.execute(
            sql.SQL("select (event_time at time zone 'UTC')::date, count(*) from {} group by 1").format(
                sql.Identifier(e.raw, table)
            )
        ).fetchall()
    return dict(rows)


def test_crash_kill9_at_random_moments_then_resume_equals_source(engine: Engine) -> None:
    e = engine
    e.create_source("events", CRASH_SCHEMA, CRASH_INSERT)
    name = "xt_crash_events"
    cfg = table_cfg(name, "events", cursor_column="Event Time", slice_size="day", lookback_days=3)
    per_day = {
        r["d"]: r["n"]
        for r in e.bq(f"select date(`Event Time`) as d, count(*) as n from {e.path('events')} group by 1")
    }
    assert len(per_day) == CRASH_DAYS and sum(per_day.values()) == CRASH_ROWS

    rng = random.Random(20261128)
    trials: list[tuple[int, int]] = []  # (slices committed before the kill, by this attempt)
    run_ids: list[UUID] = []
    with e.pg() as watch:
        for trial in range(12):
            before = _checkpoints(watch, name)
            # a third of the kills aim before this attempt's first commit, the rest mid-way
            target = 0 if trial % 3 == 0 else rng.randint(1, 3)
            child = subprocess.Popen(
                [sys.executable, "-c", CRASH_CHILD, cfg.model_dump_json()],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert child.stdout is not None
            ready, run_id = child.stdout.readline().decode().split()
            assert ready == "ready"
            run_ids.append(UUID(run_id))
            deadline = time.monotonic() + 30
            while _checkpoints(watch, name) - before < target and child.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.12 if target == 0 else 0.05))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            assert child.returncode == -signal.SIGKILL, "the refresh finished before it was killed"
            _wait_for_sessions_to_end(watch)
            done = checkpoint_starts(e, name)
            trials.append((before, len(done) - before))
            # Atomicity: a checkpointed day holds exactly the source's rows, any other none.
            loaded = _rows_per_day(e, name)
            for day, n in per_day.items():
                assert loaded.get(day, 0) == (n if day in done else 0), (trial, day)
            assert set(loaded) <= done

    print("crash trials (committed before, committed by the killed attempt):", trials)
    assert sum(1 for _, new in trials if new == 0) >= 2, trials  # killed before its first commit
    assert sum(1 for _, new in trials if new > 0) >= 5, trials  # killed mid-way
    assert len(checkpoint_starts(e, name)) < CRASH_DAYS, "nothing was left to resume"

    # The next run finds the dead runs, marks them abandoned and resumes.
    outcome = e.refresh(cfg)
    assert outcome.status == "success", outcome.error
    assert outcome.slices_skipped > 0
    with e.pg() as conn:
        statuses = conn.execute(
            f"select distinct status from {CONTROL}.refresh_runs where run_id = any(%s)", (run_ids,)
        ).fetchall()
    assert statuses == [("abandoned",)]

    assert pg_checksums(e, name, "Event Id", CRASH_SCHEMA) == bq_checksums(
        e, "events", "Event Id", CRASH_SCHEMA
    )
    first = min(per_day)
    assert checkpoint_starts(e, name) == {first + timedelta(days=i) for i in range(CRASH_DAYS)}
    assert _rows_per_day(e, name) == per_day


# A backfill as `refresh backfill` runs it: its params recorded with the run, its range in the
# options. argv: the table config, then the run's params as JSON.
BACKFILL_CHILD = """
import json, sys
from datetime import date
from flows.control import runs
from flows.engine.bigquery import make_clients
from flows.engine.table_refresh import RefreshOptions, refresh_table
from flows.core.table_config import TableConfig
from flows.core.settings import get_settings
settings = get_settings()
clients = make_clients(settings)
cfg = TableConfig.model_validate_json(sys.argv[1])
params = json.loads(sys.argv[2])
options = RefreshOptions(date.fromisoformat(params["start_date"]), date.fromisoformat(params["end_date"]))
with runs.refresh_lock(settings, wait_s=30) as conn:
    runs.mark_abandoned(conn, settings.control_schema)
    run = runs.start_run(conn, settings.control_schema, flow_run_id=None, trigger="backfill", params=params)
    print("ready", run.run_id, flush=True)
    refresh_table(settings, clients, cfg, run.run_id, options)
"""


def _backfill_params(name: str, first: date, last: date) -> dict[str, Any]:
    return run_params.validate_params(
        [name], first, last, force=True, trigger="backfill", today=last
    ).to_json()


def test_backfill_killed_twice_then_run_again_skips_what_its_attempts_committed(engine: Engine) -> None:
    """A backfill killed mid-way, twice, then run again with the same tables and range reads
    only the slices its attempts did not commit, and says so (slices_skipped, the audit row);
    a different range starts fresh."""
    e = engine
    e.create_source("events", CRASH_SCHEMA, CRASH_INSERT)
    name = "xt_backfill_events"
    cfg = table_cfg(name, "events", cursor_column="Event Time", slice_size="day", lookback_days=3)
    first, last = date(2026, 1, 5), date(2026, 3, 5)
    days = (last - first).days + 1
    params = _backfill_params(name, first, last)
    with e.pg() as watch:
        for _attempt in range(2):
            before = _checkpoints(watch, name)
            child = subprocess.Popen(
                [sys.executable, "-c", BACKFILL_CHILD, cfg.model_dump_json(), json.dumps(params)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert child.stdout is not None
            assert child.stdout.readline().decode().startswith("ready")
            deadline = time.monotonic() + 60
            while _checkpoints(watch, name) - before < 3 and child.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            assert child.returncode == -signal.SIGKILL, "the backfill finished before it was killed"
            _wait_for_sessions_to_end(watch)
    committed = checkpoint_starts(e, name)
    assert 6 <= len(committed) < days, committed

    outcome = e.refresh(cfg, RefreshOptions(first, last), params)
    assert outcome.status == "success", outcome.error
    assert outcome.slices_skipped == len(committed)
    assert outcome.slices_done == days - len(committed)
    with e.pg() as conn:
        audited = _scalar(
            conn,
            f"select slices_skipped from {CONTROL}.table_refreshes where table_name = %s "
            "and status = 'success' order by started_at desc limit 1",
            (name,),
        )
    assert audited == len(committed)
    loaded = _rows_per_day(e, name)
    source = {
        r["d"]: r["n"]
        for r in e.bq(f"select date(`Event Time`) as d, count(*) as n from {e.path('events')} group by 1")
    }
    assert loaded == {d: n for d, n in source.items() if first <= d <= last}

    # The same backfill again after it succeeded, and another range: every slice is read.
    assert e.refresh(cfg, RefreshOptions(first, last), params).slices_skipped == 0
    other = RefreshOptions(first, last - timedelta(days=1))
    again = e.refresh(cfg, other, _backfill_params(name, first, last - timedelta(days=1)))
    assert again.slices_skipped == 0 and again.slices_done == days - 1


def test_a_repeated_backfill_loads_a_whole_table_again(engine: Engine) -> None:
    """A whole-table (full_replace) slice committed by an attempt of the same backfill that did
    not succeed is read again, not skipped (and its unbounded checkpoint does not break the
    resume rule)."""
    e = engine
    e.create_source("events", CRASH_SCHEMA, CRASH_INSERT)
    name = "xt_backfill_whole"
    cfg = table_cfg(name, "events", write_strategy="full_replace")
    first, last = date(2026, 1, 5), date(2026, 1, 20)
    params = _backfill_params(name, first, last)
    assert e.refresh(cfg, RefreshOptions(first, last), params).status == "success"
    with e.pg() as conn:  # as if that attempt had died after committing its slice
        conn.execute(
            sql.SQL("update {} set status = 'failed' where table_name = %s").format(
                sql.Identifier(e.settings.control_schema, "table_refreshes")
            ),
            (name,),
        )
    again = e.refresh(cfg, RefreshOptions(first, last), params)
    assert again.status == "success", again.error
    assert (again.slices_done, again.slices_skipped) == (1, 0)


# --------------------------------------------------------------------------------------
# 2. Late restatement
# --------------------------------------------------------------------------------------

LATE_SCHEMA = [S("Id", "INT64"), S("Day", "DATE"), S("Value", "NUMERIC"), S("Note", "STRING")]
LATE_INSERT = """
insert into {t} (`Id`, `Day`, `Value`, `Note`)
select n, date_add(date '2026-03-01', interval d day), cast(n as numeric) / 10, concat('v', cast(n as string))
from (select n, mod(n, 30) as d from unnest(generate_array(0, 599)) as n)
"""


def test_late_restatement_inside_lookback_then_backfill_outside(engine: Engine) -> None:
    e = engine
    e.create_source("late", LATE_SCHEMA, LATE_INSERT)
    name = "xt_late_daily"
    cfg = table_cfg(name, "late", cursor_column="Day", slice_size="day", lookback_days=7)
    first = e.refresh(cfg)
    assert first.status == "success", first.error
    assert first.slices_done == 30

    inside, outside = date(2026, 3, 28), date(2026, 3, 4)  # last day is 2026-03-30
    p = e.path("late")
    for day in (inside, outside):
        e.clients.rest.query(
            f"update {p} set `Value` = `Value` + 1000, `Note` = 'restated' where `Day` = date '{day}'"
        ).result()
    # a row withdrawn and a late row added inside the window
    e.clients.rest.query(f"delete from {p} where `Id` = 597").result()  # day 27 = 2026-03-28
    e.clients.rest.query(
        f"insert into {p} (`Id`, `Day`, `Value`, `Note`) select 10000, date '2026-03-29', numeric '7.7', 'late'"
    ).result()

    second = e.refresh(cfg)
    assert second.status == "success", second.error
    assert second.window is not None and second.window.first > outside >= date(2026, 3, 1)
    assert 0 < second.slices_done <= 8

    def notes_by_day() -> dict[date, set[str]]:
        out: dict[date, set[str]] = {}
        for r in pg_rows(e, name, ["id", "day", "note"], "id"):
            out.setdefault(r["day"], set()).add(r["note"] if r["note"] in ("restated", "late") else "old")
        return out

    seen = notes_by_day()
    assert seen[inside] == {"restated"}
    assert seen[outside] == {"old"}, "a row outside the lookback window changed without a backfill"
    assert seen[date(2026, 3, 29)] == {"old", "late"}
    ids = {r["id"] for r in pg_rows(e, name, ["id"], "id")}
    assert 597 not in ids and 10000 in ids

    backfill = e.refresh(cfg, RefreshOptions(start_date=outside, end_date=outside))
    assert backfill.status == "success", backfill.error
    assert backfill.slices_done == 1
    assert notes_by_day()[outside] == {"restated"}
    assert pg_checksums(e, name, "Id", LATE_SCHEMA) == bq_checksums(e, "late", "Id", LATE_SCHEMA)


# --------------------------------------------------------------------------------------
# 3. Schema drift
# --------------------------------------------------------------------------------------

DRIFT_SCHEMA = [S("Id", "INT64"), S("Day", "DATE"), S("Amount", "NUMERIC"), S("Label", "STRING")]
DRIFT_INSERT = """
insert into {t} (`Id`, `Day`, `Amount`, `Label`)
select n, date_add(date '2026-05-01', interval d day), cast(n as numeric) / 4, concat('l', cast(n as string))
from (select n, mod(n, 10) as d from unnest(generate_array(0, 199)) as n)
"""


def _recreate_with(e: Engine, table: str, schema: list[bigquery.SchemaField], select: str) -> None:
    """Recreate a source table under a new schema, keeping its rows (the emulator's ALTER TABLE
    changes the data but not the schema that tables.get reports)."""
    backup = f"{table}_backup"
    e.create_source(backup, DRIFT_SCHEMA, "insert into {t} select * from " + e.path(table))
    names = ", ".join(f"`{f.name}`" for f in schema)
    e.create_source(table, schema, f"insert into {{t}} ({names}) select {select} from {e.path(backup)}")
    e.clients.rest.delete_table(f"{e.clients.project}.{e.clients.dataset}.{backup}")


def test_drift_new_column_added_retyped_and_dropped_fail_only_their_table(engine: Engine) -> None:
    e = engine
    cfgs = {
        src: table_cfg(f"xt_drift_{src}", src, cursor_column="Day", slice_size="day", lookback_days=30)
        for src in ("grows", "retyped", "shrinks")
    }
    for src in cfgs:
        e.create_source(src, DRIFT_SCHEMA, DRIFT_INSERT)
        assert e.refresh(cfgs[src]).status == "success"

    _recreate_with(
        e,
        "grows",
        [*DRIFT_SCHEMA, S("Added Later", "STRING")],
        "`Id`, `Day`, `Amount`, `Label`, concat('new ', cast(`Id` as string))",
    )
    _recreate_with(
        e,
        "retyped",
        [S("Id", "INT64"), S("Day", "DATE"), S("Amount", "FLOAT64"), S("Label", "STRING")],
        "`Id`, `Day`, cast(`Amount` as float64), `Label`",
    )
    _recreate_with(e, "shrinks", DRIFT_SCHEMA[:3], "`Id`, `Day`, `Amount`")

    # one run, three tables: as the flow does it
    with locked_run(e.settings) as run_id:
        outcomes = {
            src: refresh_table(e.settings, e.clients, c, run_id, RefreshOptions()) for src, c in cfgs.items()
        }

    assert outcomes["grows"].status == "success", outcomes["grows"].error
    rows = pg_rows(e, "xt_drift_grows", ["id", "added_later"], "id")
    assert len(rows) == 200 and all(r["added_later"] == f"new {r['id']}" for r in rows)

    retyped = outcomes["retyped"]
    assert retyped.status == "failed" and not retyped.retryable
    assert retyped.error is not None
    assert "'amount' changed type" in retyped.error and "numeric(38,9)" in retyped.error
    assert "FLOAT64" in retyped.error and "xt_drift_retyped" in retyped.error

    shrinks = outcomes["shrinks"]
    assert shrinks.status == "failed" and shrinks.error is not None
    assert "'label' was dropped" in shrinks.error

    # the failed tables were not touched
    with e.pg() as conn:
        for t in ("xt_drift_retyped", "xt_drift_shrinks"):
            n = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(e.raw, t))).fetchone()
            assert n == (200,)
        err = conn.execute(
            f"select error from {CONTROL}.table_refreshes where run_id = %s and table_name = %s",
            (run_id, "xt_drift_retyped"),
        ).fetchone()
    assert err is not None and "'amount' changed type" in err[0]
    status, _ = run_summary.overall_status(list(outcomes.values()), None)
    assert status == "warning"


# --------------------------------------------------------------------------------------
# 4 + 5. Round trip of every type, through the Storage Read path and the REST fallback
# --------------------------------------------------------------------------------------

RT_SCHEMA = [
    S("Row Key", "INT64"),
    S("Event Date", "DATE"),
    S("Event Time (UTC)", "TIMESTAMP"),
    S("Naïve Name ü", "STRING"),
    S("2nd Query", "STRING"),
    S("Amount", "NUMERIC"),
    S("Is Prime", "BOOL"),
    S("Ratio", "FLOAT64"),
    S("Payload", "JSON"),
    S("Tags", "STRING", mode="REPEATED"),
    S("Detail", "RECORD", fields=[S("a", "INT64"), S("b", "STRING")]),
    S("Local Time", "DATETIME"),
    S("Raw Bytes", "BYTES"),
]
RT_PG_NAMES = [
    "row_key",
    "event_date",
    "event_time_utc",
    "na_ve_name",
    "c_2nd_query",
    "amount",
    "is_prime",
    "ratio",
    "payload",
    "tags",
    "detail",
    "local_time",
    "raw_bytes",
]
RT_PG_TYPES = [
    "bigint",
    "date",
    "timestamp with time zone",
    "text",
    "text",
    "numeric(38,9)",
    "boolean",
    "double precision",
    "jsonb",
    "jsonb",
    "jsonb",
    "timestamp without time zone",
    "bytea",
]


def _bq_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


RT_ROWS: list[dict[str, str]] = [
    {
        "Event Date": "date '2026-01-02'",
        "Event Time (UTC)": "timestamp '2026-01-02 03:04:05.123456+05:30'",
        "Naïve Name ü": _bq_str('héllo, "wörld"\n跑步 🏃 עברית e\u0301'),
        "2nd Query": _bq_str(""),
        "Amount": "numeric '12345678901234567890123456789.123456789'",
        "Is Prime": "true",
        "Ratio": "0.1",
        "Payload": """json '{"a": [1, 2, {"b": null}], "ü": "x", "big": 12345678901234567}'""",
        "Tags": "['a', 'b,c', '', 'd\"e']",
        "Detail": "struct(1 as a, 'x, \"y\"' as b)",
        "Local Time": "datetime '2026-01-02 03:04:05.000001'",
        "Raw Bytes": "b'abc'",
    },
    {
        "Event Date": "date '1970-01-01'",
        "Event Time (UTC)": "timestamp '2026-03-08 01:30:00 America/Los_Angeles'",
        "Naïve Name ü": _bq_str("\\.\nback\\slash;tab\there"),
        "2nd Query": _bq_str("\\N"),
        "Amount": "numeric '-99999999999999999999999999999.999999999'",
        "Is Prime": "false",
        "Ratio": "cast('nan' as float64)",
        "Payload": "json 'null'",
        "Tags": "cast([] as array<string>)",
        "Detail": "struct(cast(null as int64) as a, '' as b)",
        "Local Time": "datetime '1999-12-31 23:59:59'",
        "Raw Bytes": "from_base64('AAEC/w==')",
    },
    {
        "Event Date": "date '9999-12-31'",
        "Event Time (UTC)": "timestamp '2026-06-30 23:59:59.999999+14:00'",
        "Naïve Name ü": _bq_str("NULL"),
        "2nd Query": _bq_str("   "),
        "Amount": "numeric '0.000000001'",
        "Ratio": "cast('inf' as float64)",
        "Payload": """json '"just a string"'""",
        "Tags": "['only']",
        "Local Time": "datetime '2026-11-01 01:30:00'",
    },
    {
        "Event Time (UTC)": "timestamp '1900-01-01 00:00:00-03:00'",
        "Amount": "numeric '1'",
        "Ratio": "cast('-inf' as float64)",
        "Payload": "json '[1.5, -2, true]'",
    },
    {"Ratio": "-0.0", "Amount": "numeric '-0.5'"},
    {"Ratio": "5e-324"},
    {"Ratio": "1.7976931348623157e308"},
    {},  # every column NULL but the key
]


def _rt_insert() -> str:
    stmts = []
    for i, row in enumerate(RT_ROWS, start=1):
        cols = ["`Row Key`", *(f"`{c}`" for c in row)]
        stmts.append(f"insert into {{t}} ({', '.join(cols)}) select {', '.join([str(i), *row.values()])}")
    return ";\n".join(stmts)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, datetime) and isinstance(b, datetime):
        return a == b and (a.tzinfo is None) == (b.tzinfo is None)
    return type(a) is type(b) and a == b


# What Postgres must hold, spelled out, so the comparison with BigQuery cannot pass vacuously.
RT_EXPECTED = {
    (1, "amount"): Decimal("12345678901234567890123456789.123456789"),
    (2, "amount"): Decimal("-99999999999999999999999999999.999999999"),
    (3, "amount"): Decimal("0.000000001"),
    (1, "event_time_utc"): datetime(2026, 1, 1, 21, 34, 5, 123456, tzinfo=UTC),
    (2, "event_time_utc"): datetime(2026, 3, 8, 9, 30, tzinfo=UTC),
    (3, "event_time_utc"): datetime(2026, 6, 30, 9, 59, 59, 999999, tzinfo=UTC),
    (4, "event_time_utc"): datetime(1900, 1, 1, 3, 0, tzinfo=UTC),
    (1, "na_ve_name"): 'héllo, "wörld"\n跑步 🏃 עברית e\u0301',
    (2, "na_ve_name"): "\\.\nback\\slash;tab\there",
    (1, "c_2nd_query"): "",
    (2, "c_2nd_query"): "\\N",
    (8, "c_2nd_query"): None,
    (1, "payload"): {"a": [1, 2, {"b": None}], "ü": "x", "big": 12345678901234567},
    (1, "tags"): ["a", "b,c", "", 'd"e'],
    (4, "tags"): [],
    (1, "detail"): {"a": 1, "b": 'x, "y"'},
    (1, "local_time"): datetime(2026, 1, 2, 3, 4, 5, 1),
    (2, "raw_bytes"): b"\x00\x01\x02\xff",
    (3, "event_date"): date(9999, 12, 31),
    (6, "ratio"): 5e-324,
}


def _bq_rows_as_pg(e: Engine, table: str) -> list[dict[str, Any]]:
    rows = e.bq(f"select * from {e.path(table)} order by `Row Key`")
    return [{pg_column_name(k): v for k, v in r.items()} for r in rows]


def assert_round_trip(e: Engine, table: str) -> None:
    with e.pg() as conn:
        cols = relation_columns(conn, e.raw, table)
    assert [c for c in cols if not c.startswith("_")] == RT_PG_NAMES
    assert [cols[c] for c in RT_PG_NAMES] == RT_PG_TYPES
    want = _bq_rows_as_pg(e, "all_types")
    got = pg_rows(e, table, RT_PG_NAMES, "row_key")
    assert len(got) == len(want) == len(RT_ROWS)
    problems = [
        (w["row_key"], c, w[c], g[c])
        for w, g in zip(want, got, strict=True)
        for c in RT_PG_NAMES
        if not _same(w[c], g[c])
    ]
    assert not problems, problems
    by_key = {g["row_key"]: g for g in got}
    wrong = [(k, c, v, by_key[k][c]) for (k, c), v in RT_EXPECTED.items() if not _same(v, by_key[k][c])]
    assert not wrong, wrong
    assert math.isnan(by_key[2]["ratio"]) and by_key[3]["ratio"] == math.inf
    assert all(v is None for c, v in by_key[8].items() if c not in ("row_key", "tags"))
    # The instants above were compared in a session zone that is not UTC (PGTZ, see `engine`).
    with e.pg() as conn:
        assert _scalar(conn, "show timezone") == "Asia/Kolkata"


@pytest.fixture
def all_types(engine: Engine) -> Engine:
    engine.create_source("all_types", RT_SCHEMA, None)
    for stmt in _rt_insert().split(";\n"):
        engine.clients.rest.query(stmt.replace("{t}", engine.path("all_types"))).result()
    return engine


def test_roundtrip_every_type_exact_through_storage_read(all_types: Engine) -> None:
    e = all_types
    outcome = e.refresh(table_cfg("xt_roundtrip_storage", "all_types", write_strategy="full_replace"))
    assert outcome.status == "success", outcome.error
    assert outcome.rows_inserted == len(RT_ROWS)
    assert_round_trip(e, "xt_roundtrip_storage")


def test_rest_fallback_loads_the_same_rows_as_storage(all_types: Engine) -> None:
    e = all_types
    for name, api in (("xt_rest_storage", "storage"), ("xt_rest_rest", "rest")):
        cfg = table_cfg(name, "all_types", write_strategy="full_replace", custom_params={"read_api": api})
        outcome = e.refresh(cfg)
        assert outcome.status == "success", outcome.error
        assert_round_trip(e, name)
    cols = sql.SQL(", ").join(map(sql.Identifier, RT_PG_NAMES))
    a, b = sql.Identifier(e.raw, "xt_rest_storage"), sql.Identifier(e.raw, "xt_rest_rest")
    with e.pg() as conn:
        diff = conn.execute(
            sql.SQL(
                "select count(*) from ((select {c} from {a} except all select {c} from {b}) "
                "union all (select {c} from {b} except all select {c} from {a})) d"
            ).format(c=cols, a=a, b=b)
        ).fetchone()
    assert diff == (0,)

    # REST pages follow page tokens: small pages give the same rows, each once
    stats = ReadStats()
    pages = list(read_rest(e.clients, "all_types", "", stats, page_size=3))
    assert len(pages) >= 3 and stats.rows == len(RT_ROWS)
    keys = [k for p in pages for k in p.column("Row Key").to_pylist()]
    assert sorted(keys) == list(range(1, len(RT_ROWS) + 1))
    storage_keys = [
        k
        for b in read_storage(e.clients, "all_types", "", ReadStats())
        for k in b.column("Row Key").to_pylist()
    ]
    assert sorted(storage_keys) == sorted(keys)


def test_json_payloads_stay_json(all_types: Engine) -> None:
    """JSON scalars (a bare string, null) and nested values keep their JSON type in jsonb."""
    e = all_types
    e.refresh(table_cfg("xt_json_values", "all_types", write_strategy="full_replace"))
    with e.pg() as conn:
        kinds = dict(
            conn.execute(
                sql.SQL("select row_key, jsonb_typeof(payload) from {} order by 1").format(
                    sql.Identifier(e.raw, "xt_json_values")
                )
            ).fetchall()
        )
    assert kinds[1] == "object" and kinds[3] == "string" and kinds[4] == "array"
    assert kinds[2] in ("null", None)


# --------------------------------------------------------------------------------------
# 6. Two tables loading for the first time at once (the flow refreshes two tables in parallel)
# --------------------------------------------------------------------------------------


def test_parallel_first_loads_create_the_raw_schema_without_a_race(engine: Engine) -> None:
    """Two first loads start together: `create schema if not exists` alone races (a unique
    violation on pg_namespace failed one table of the flow's first run)."""
    import threading

    from flows.core.type_mapping import map_schema
    from flows.engine.load import ensure_raw_table

    fields: list[tuple[str, str, str, int | None, int | None]] = [
        ("Id", "INT64", "NULLABLE", None, None),
        ("Day", "DATE", "NULLABLE", None, None),
    ]
    columns = map_schema(fields, "t")
    errors: list[BaseException] = []

    def first_load(table: str, barrier: threading.Barrier) -> None:
        try:
            with psycopg.connect(engine.settings.dsn()) as conn, conn.transaction():
                barrier.wait()
                ensure_raw_table(conn, engine.raw, table, columns, "day")
        except BaseException as exc:
            errors.append(exc)

    for _ in range(25):
        with engine.pg() as conn:
            conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(engine.raw)))
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=first_load, args=(t, barrier)) for t in ("xt_parallel_a", "xt_parallel_b")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]


def test_days_a_slice_changed_come_from_the_rows_it_deleted_and_inserted(engine: Engine) -> None:
    """SliceResult.days: the UTC days of the cursor values deleted and inserted, per cursor type
    (the sessions run in Asia/Kolkata: a day taken in the session's zone would be off); none
    for a whole-table slice."""
    import pyarrow as pa

    from flows.core.planning import Slice
    from flows.core.type_mapping import ColumnMapping
    from flows.engine.load import apply_slice, ensure_raw_table

    e = engine
    piece = Slice(date(2026, 11, 30), date(2026, 12, 7))  # an ISO week across a month end
    late = datetime(2026, 12, 5, 23, 30, tzinfo=UTC)  # 2026-12-06 in Kolkata
    cases: list[tuple[str, str, pa.Array, pa.Array, list[date]]] = [
        (
            "DATE",
            "date",
            pa.array([date(2026, 11, 30), date(2026, 12, 1)]),
            pa.array([date(2026, 12, 6)]),
            [date(2026, 11, 30), date(2026, 12, 1), date(2026, 12, 6)],
        ),
        (
            "TIMESTAMP",
            "timestamp with time zone",
            pa.array([datetime(2026, 12, 6, tzinfo=UTC)] * 2, pa.timestamp("us", tz="UTC")),
            pa.array([late], pa.timestamp("us", tz="UTC")),
            [date(2026, 12, 5), date(2026, 12, 6)],
        ),
        (
            "DATETIME",
            "timestamp without time zone",
            pa.array([datetime(2026, 12, 2, 12)] * 2, pa.timestamp("us")),
            pa.array([datetime(2026, 12, 2, 23, 59)], pa.timestamp("us")),
            [date(2026, 12, 2)],
        ),
    ]
    for source_type, pg_type, old, new, want in cases:
        table = f"days_{source_type.lower()}"
        cols = [ColumnMapping("Id", "id", "INT64", "bigint"), ColumnMapping("C", "c", source_type, pg_type)]

        def apply(cursor_values: pa.Array, whole: bool = False) -> list[date] | None:
            ids = pa.array(range(len(cursor_values)), pa.int64())
            with psycopg.connect(e.settings.dsn()) as conn:
                return apply_slice(
                    conn,
                    schema=e.raw,
                    table=table,  # noqa: B023
                    control_schema=CONTROL,
                    columns=cols,  # noqa: B023
                    cursor=cols[1],  # noqa: B023
                    piece=Slice(None, None) if whole else piece,
                    batches=[pa.record_batch({"Id": ids, "C": cursor_values})],
                    run_id=UUID(int=1),
                    checkpoint_key=table,  # noqa: B023
                ).days

        with e.pg() as conn, conn.transaction():
            ensure_raw_table(conn, e.raw, table, cols, "c")
        apply(old)
        assert apply(new) == want, source_type
        assert apply(new, whole=True) is None


# --------------------------------------------------------------------------------------
# The refresh's steps, each a plain function over one context
# --------------------------------------------------------------------------------------


def test_steps_plan_then_estimate_a_dry_run_without_writing(engine: Engine) -> None:
    from flows.control.statuses import TableStatus
    from flows.engine.table_refresh import TableRefresh, estimate_table, plan_table

    e = engine
    e.create_source(
        "steps",
        [S("Id", "INT64"), S("Day", "DATE")],
        "insert into {t} (`Id`, `Day`) select n, date_add(date '2026-03-01', interval mod(n, 3) day) "
        "from unnest(generate_array(0, 29)) as n",
    )
    cfg = table_cfg("xt_steps_events", "steps", cursor_column="Day", slice_size="day")
    with e.pg() as conn:
        ctx = TableRefresh(
            e.settings,
            e.clients,
            cfg,
            uuid4(),
            RefreshOptions(dry_run=True),
            conn,
            TableOutcome(cfg.table_name, TableStatus.RUNNING, cfg.mode.value),
            deadline=time.monotonic() + 60,
        )
        planned = plan_table(ctx)
        # a first load: the source's whole range, one slice a day, no change detection in a dry run
        assert [str(s.start) for s in planned.slices] == ["2026-03-01", "2026-03-02", "2026-03-03"]
        assert planned.detection is None and planned.cursor is not None
        assert ctx.outcome.slices_planned == 3 and ctx.outcome.plan == []
        estimate_table(ctx, planned)
        assert [(p["slice"], p["estimated_rows"]) for p in ctx.outcome.plan] == [
            (s.label, 10) for s in planned.slices
        ]
        raw = conn.execute("select to_regnamespace(%s)", (e.raw,)).fetchone()
    assert raw == (None,)  # the plan and the estimate wrote nothing
