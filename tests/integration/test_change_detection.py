"""Change detection against the emulator and real Postgres.

A restated week (same row count), a week with rows deleted and a new week are read; every
other slice of the lookback window is skipped as `unchanged`; raw equals the source after
(exact validation). `change_detection: off` and `--full-refresh` read every slice; `--explain`
names the right slices and writes nothing. Own dataset and schemas (`fp_*`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.control import registry
from flows.core.db import migrate
from flows.core.errors import SourceError
from flows.core.settings import Settings, get_settings
from flows.core.table_config import ChangeDetection, TableConfig
from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
from flows.engine import change_detection, table_refresh
from flows.engine.bigquery import BigQueryClients, make_clients
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.engine.validation import source_match
from flows.orchestration import dbt_selection
from flows.orchestration.explain import explain, render
from flows.orchestration.run_params import RunParams
from tests.integration.test_dry_run import snapshot
from tests.integration.test_extraction_engine import locked_run

SPEC = SampleSpec(sqp_rows=6_000, weeks=12, asins=20, daily_rows=0)
TABLE = "search_query_performance"
# SQP weeks start on Sundays; each lies in the ISO week (slice) starting the Monday before.
RESTATED, DELETED, NEW = date(2026, 11, 1), date(2026, 11, 8), date(2026, 11, 29)
LOOKBACK = 35  # from the high-water mark 2026-11-23: the five slices from 2026-10-19


def slice_of(sunday: date) -> str:
    start = sunday - timedelta(days=6)
    return f"{start}..{start + timedelta(days=7)}"


@dataclass
class Env:
    settings: Settings
    clients: BigQueryClients

    def pg(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.dsn(), autocommit=True)

    def bq(self, statement: str) -> Any:
        return list(self.clients.rest.query(statement).result())

    @property
    def source(self) -> str:
        return f"`{self.clients.project}.{self.clients.dataset}.{SQP_TABLE}`"

    def cfg(self) -> TableConfig:
        with self.pg() as conn:
            return registry.get(conn, self.settings.control_schema, TABLE)

    def run(self, **options: Any) -> tuple[TableOutcome, dict[str, tuple[str, int, str | None]]]:
        """Refresh the table; its outcome and slice audit rows {slice: (status, rows_read, reason)}."""
        with locked_run(self.settings) as run_id:
            outcome = refresh_table(
                self.settings, self.clients, self.cfg(), run_id, RefreshOptions(**options)
            )
        assert outcome.status == "success", outcome.error
        return outcome, self.slice_audit(run_id)

    def slice_audit(self, run_id: UUID) -> dict[str, tuple[str, int, str | None]]:
        with self.pg() as conn:
            rows = conn.execute(
                "select slice_start, slice_end, status, rows_read, change_reason "
                "from fp_control.slice_refreshes where run_id = %s",
                (run_id,),
            ).fetchall()
        return {
            f"{a.astimezone(UTC).date()}..{b.astimezone(UTC).date()}": (status, n, reason)
            for a, b, status, n, reason in rows
        }

    def source_rows(self, sundays: list[date]) -> int:
        days = ", ".join(f"timestamp '{d} 00:00:00+00'" for d in sundays)
        return int(self.bq(f"select count(*) from {self.source} where `Date` in ({days})")[0][0])

    def assert_raw_equals_source(self) -> None:
        with self.pg() as conn:
            results = source_match.validate_table(self.clients, conn, self.cfg(), "fp_raw")
        assert results and all(r.passed for r in results), [r.details() for r in results if not r.passed]


@pytest.fixture(scope="module")
def env(stack: object) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    mp.setenv("REFRESH_BQ_DATASET", "fp_source")
    mp.setenv("REFRESH_RAW_SCHEMA", "fp_raw")
    mp.setenv("REFRESH_CONTROL_SCHEMA", "fp_control")
    settings = get_settings()
    migrate(settings)
    clients = make_clients(settings)
    generate(clients, SPEC)
    e = Env(settings, clients)
    cfg = TableConfig(
        table_name=TABLE,
        source_table=SQP_TABLE,
        cursor_column="Date",
        slice_size="week",
        lookback_days=LOOKBACK,
        custom_params={"key_columns": ["Date", "ASIN", "Search Query"]},
    )
    with e.pg() as conn:
        conn.execute("drop schema if exists fp_raw cascade")
        conn.execute("truncate fp_control.checkpoints, fp_control.refresh_config cascade")
        registry.sync_from_file(conn, settings.control_schema, [cfg])
    try:
        yield e
    finally:
        clients.close()
        mp.undo()


def _checkpoints(env: Env) -> dict[str, tuple[int, int | None, Any]]:
    with env.pg() as conn:
        rows = conn.execute(
            "select slice_start, rows_loaded, source_rows, source_checksum from fp_control.checkpoints "
            "where table_name = %s",
            (TABLE,),
        ).fetchall()
    return {str(a.astimezone(UTC).date()): (n, rows_fp, checksum) for a, n, rows_fp, checksum in rows}


def test_only_new_and_changed_slices_are_read(env: Env) -> None:
    first, audit = env.run(full_refresh=True)
    assert first.slices_done == 12 and {s for s, *_ in audit.values()} == {"success"}
    # Every checkpoint holds the fingerprint of what it loaded.
    assert all(n == rows and checksum is not None for n, rows, checksum in _checkpoints(env).values())
    env.assert_raw_equals_source()

    quiet, audit = env.run()
    # The lookback: six ISO weeks from the one holding 2026-11-22 minus 35 days.
    assert len(audit) == 6 and {slice_of(RESTATED), slice_of(DELETED)} <= set(audit)
    assert {s for s, *_ in audit.values()} == {"unchanged"}
    assert quiet.rows_read == 0 and quiet.slices_done == 0
    print(f"rows read: full load {first.rows_read}, quiet re-run {quiet.rows_read}")

    # A restated week (same row count), rows deleted in another, a new week.
    restated_rows = env.source_rows([RESTATED])
    env.bq(
        f"update {env.source} set `ASIN Click Count` = `ASIN Click Count` + 1 "
        f"where `Date` = timestamp '{RESTATED} 00:00:00+00' and `ASIN` = 'B000000003'"
    )
    assert env.source_rows([RESTATED]) == restated_rows
    env.bq(
        f"delete from {env.source} where `Date` = timestamp '{DELETED} 00:00:00+00' and `ASIN` = 'B000000004'"
    )
    env.bq(
        f"insert into {env.source} select * replace (timestamp_add(`Date`, interval 7 day) as `Date`) "
        f"from {env.source} where `Date` = timestamp '{NEW - timedelta(days=7)} 00:00:00+00'"
    )

    changed, audit = env.run()
    read = {s for s, (status, *_) in audit.items() if status == "success"}
    assert read == {slice_of(RESTATED), slice_of(DELETED), slice_of(NEW)}
    assert len(audit) == 6
    assert {s for s, (status, *_) in audit.items() if status == "unchanged"} == set(audit) - read
    assert (
        audit[slice_of(RESTATED)][2]
        == f"changed: fingerprint differs: checksum differs ({restated_rows} rows)"
    )
    deleted_rows = env.source_rows([DELETED])
    assert (
        audit[slice_of(DELETED)][2] == f"changed: fingerprint differs: rows {restated_rows}->{deleted_rows}"
    )
    assert audit[slice_of(NEW)][2] == "new: no checkpoint"
    assert all(n == 0 for status, n, _ in audit.values() if status == "unchanged")
    assert changed.rows_read == env.source_rows([RESTATED, DELETED, NEW])
    assert sum(n for _, n, _ in audit.values()) == changed.rows_read
    env.assert_raw_equals_source()

    again, audit = env.run()
    assert again.rows_read == 0 and {s for s, *_ in audit.values()} == {"unchanged"}
    with env.pg() as conn:
        cost = conn.execute(
            "select fingerprint_bytes, slices_unchanged from fp_control.table_refreshes "
            "where table_name = %s order by started_at desc limit 1",
            (TABLE,),
        ).fetchone()
        # Slices found equal carry the fingerprint query's start (BigQuery's clock) as `as_of`.
        confirmed = conn.execute(
            "select count(*) from fp_control.checkpoints where table_name = %s and source_as_of is not null",
            (TABLE,),
        ).fetchone()
    assert confirmed is not None and confirmed[0] >= len(audit)
    # BigQuery's dry-run estimate of the fingerprint query; the emulator reports 0.
    assert cost is not None and cost[0] is not None and cost[0] >= 0 and cost[1] == len(audit)
    print(f"rows read after the changes {changed.rows_read}; fingerprint bytes (dry run) {cost[0]}")


def test_a_dry_run_checks_the_query_without_running_it(env: Env) -> None:
    """BigQuery plans a dry run without reading; the emulator ran a SELECT's dry run in full
    (as long as the query itself) until dry runs got `limit 0` against it."""
    # Fails only when it runs: its dry run passes.
    assert env.clients.dry_run_bytes(f"select error('it ran') as x from {env.source}", "probe") == 0
    with pytest.raises(Exception, match="it ran"):
        env.bq(f"select error('it ran') as x from {env.source}")
    # A query BigQuery would reject still fails its dry run, named.
    with pytest.raises(SourceError, match=r"probe at BigQuery .*no_such_column"):
        env.clients.dry_run_bytes(f"select no_such_column from {env.source}", "probe")


def test_off_and_full_refresh_read_every_slice(env: Env) -> None:
    with env.pg() as conn:
        registry.update(conn, "fp_control", TABLE, {"change_detection": "off"})
    try:
        off, audit = env.run()
        assert len(audit) == 6 and {s for s, *_ in audit.values()} == {"success"}
        print(f"rows read with change_detection off: {off.rows_read}")
        # A load without detection leaves its checkpoint without fingerprint (read next time).
        window = sorted(audit)
        assert all(_checkpoints(env)[w.split("..")[0]][1] is None for w in window)
    finally:
        with env.pg() as conn:
            registry.update(conn, "fp_control", TABLE, {"change_detection": ChangeDetection.CHECKSUM.value})
    # Turned on again: every slice loaded while off is read once (no fingerprint to compare).
    _, audit = env.run()
    assert {s for s, (status, *_) in audit.items() if status == "success"} == set(window)
    assert all(_checkpoints(env)[w.split("..")[0]][1] is not None for w in window)

    full, audit = env.run(full_refresh=True)
    assert full.slices_done == 13 and {s for s, *_ in audit.values()} == {"success"}
    assert full.rows_read == int(env.bq(f"select count(*) from {env.source}")[0][0])


def test_explain_names_the_slices_and_writes_nothing(env: Env) -> None:
    env.run()  # settle: every slice checkpointed with its fingerprint
    env.bq(
        f"update {env.source} set `Search Query` = concat(`Search Query`, '!') "
        f"where `Date` = timestamp '{DELETED} 00:00:00+00' and `ASIN` = 'B000000005'"
    )
    with env.pg() as conn:
        before = snapshot(conn)
    ex = explain(env.settings, env.clients, RunParams(tables=[TABLE]), datetime.now(UTC))
    with env.pg() as conn:
        assert snapshot(conn) == before
    plan = {p["slice"]: (p["change"], p["reason"]) for p in ex.tables[0].plan}
    assert plan[slice_of(DELETED)] == (
        "changed",
        f"fingerprint differs: checksum differs ({env.source_rows([DELETED])} rows)",
    )
    assert {s for s, (c, _) in plan.items() if c == "unchanged"} == set(plan) - {slice_of(DELETED)}
    assert ex.dbt_select == f"source:sqp.{TABLE}+"
    assert "search_query_performance" in ex.dbt_models
    lines = render(ex)
    assert any(slice_of(DELETED) in line and "changed" in line for line in lines)
    # The days its load will change: the slice's rows, in Postgres and in BigQuery, all lie on
    # its Sunday (not every day of its ISO week).
    [outcome] = ex.tables
    deleted_slice = (DELETED - timedelta(days=6), DELETED + timedelta(days=1))
    assert outcome.slice_days[deleted_slice] == [DELETED]
    print("\n".join(lines))

    # The command: the same report.
    res = CliRunner().invoke(app, ["run", "--explain", "--tables", TABLE, "--no-stack"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == lines
    with env.pg() as conn:
        assert snapshot(conn) == before

    full = explain(env.settings, env.clients, RunParams(tables=[TABLE], full_refresh=True), datetime.now(UTC))
    assert {p["change"] for p in full.tables[0].plan} == {"reload"} and len(full.tables[0].plan) == 13
    assert full.periods_from == "everything"

    # The run then hands dbt exactly the days and slices explained (here with the slices that
    # earlier tests applied without a dbt build: owed, every day of each).
    ran, _ = env.run()
    assert ex.dbt_vars is not None and dbt_selection.rebuild_vars([ran], False) == ex.dbt_vars
    assert sorted(ran.changed_slices) == sorted(outcome.changed_slices)

    # Detection off: no fingerprint query, every slice read; its days come from one count per
    # day in BigQuery (and the raw table's): each ISO-week slice's rows lie on its Sunday.
    with env.pg() as conn:
        registry.update(conn, "fp_control", TABLE, {"change_detection": "off"})
    try:
        off = explain(env.settings, env.clients, RunParams(tables=[TABLE]), datetime.now(UTC))
    finally:
        with env.pg() as conn:
            registry.update(conn, "fp_control", TABLE, {"change_detection": ChangeDetection.CHECKSUM.value})
    [read_all] = off.tables
    assert {p["change"] for p in read_all.plan} == {"reload"}
    assert len(read_all.slice_days) == len(read_all.plan) == 6
    assert all(days == [start + timedelta(days=6)] for (start, _), days in read_all.slice_days.items())


def test_a_row_changed_between_fingerprint_and_read_is_not_claimed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint stores the fingerprint of the rows loaded, not the one taken before."""
    env.run()
    env.bq(
        f"update {env.source} set `ASIN Click Count` = `ASIN Click Count` + 2 "
        f"where `Date` = timestamp '{RESTATED} 00:00:00+00' and `ASIN` = 'B000000006'"
    )
    real = change_detection.detect

    def detect_then_restate(*args: Any, **kwargs: Any) -> change_detection.Detection:
        det = real(*args, **kwargs)
        # After the fingerprint query, before the read: the same week changes again.
        env.bq(
            f"update {env.source} set `ASIN Click Count` = `ASIN Click Count` + 5 "
            f"where `Date` = timestamp '{RESTATED} 00:00:00+00' and `ASIN` = 'B000000006'"
        )
        return det

    monkeypatch.setattr(table_refresh.change_detection, "detect", detect_then_restate)
    _, audit = env.run()
    monkeypatch.undo()
    assert {s for s, (status, *_) in audit.items() if status == "success"} == {slice_of(RESTATED)}
    start = str(RESTATED - timedelta(days=6))
    with env.pg() as conn:
        loaded = change_detection.loaded_fingerprint(conn, "fp_raw", TABLE, _detection(env), _slice(RESTATED))
    _, rows, checksum = _checkpoints(env)[start]
    assert (rows, int(checksum)) == (loaded.rows, loaded.checksum)
    # The source now equals what was loaded: the next run skips the week, and raw is exact.
    _, audit = env.run()
    assert audit[slice_of(RESTATED)][0] == "unchanged"
    env.assert_raw_equals_source()


def test_a_dropped_raw_table_is_read_whole(env: Env) -> None:
    env.run()
    with env.pg() as conn:
        conn.execute("drop table fp_raw.search_query_performance")
    _, audit = env.run()
    assert len(audit) == 6 and {s for s, *_ in audit.values()} == {"success"}
    assert {reason for *_, reason in audit.values()} == {"reload: the raw table does not exist"}


def _slice(sunday: date) -> Any:
    from flows.core.planning import Slice

    start = sunday - timedelta(days=6)
    return Slice(start, start + timedelta(days=7))


def _detection(env: Env) -> change_detection.Detection:
    from flows.engine.extract import describe

    source = describe(env.clients, SQP_TABLE)
    with env.pg() as conn:
        return change_detection.detect(
            env.settings, env.clients, conn, env.cfg(), source, "fp_raw", TABLE, [], None
        )
