"""flows.control.status: the reads behind `refresh status` (does the control schema exist yet)
and `refresh run`'s live progress (each table's slices and rows of the run going on now)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import psycopg
import pytest
from psycopg import sql

from flows.control import runs, tables
from flows.control.outbox import DeliveryStatus
from flows.control.status import RunProgress, TableProgress, has_table, run_progress
from flows.control.statuses import SliceStatus, TableStatus
from flows.control.tables import TableOutcome
from flows.core.db import migrate
from flows.core.settings import Settings, get_settings

CONTROL = "cs_control"


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, stack: object) -> Iterator[Settings]:
    monkeypatch.setenv("REFRESH_CONTROL_SCHEMA", CONTROL)
    s = get_settings()
    with psycopg.connect(s.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(CONTROL)))
    yield s


def test_has_table_only_once_the_schema_is_migrated(settings: Settings) -> None:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        assert not has_table(conn, CONTROL, "refresh_runs")
        migrate(settings)
        assert has_table(conn, CONTROL, "refresh_runs")
        assert not has_table(conn, CONTROL, "no_such_table")


def test_run_progress_counts_each_tables_slices_and_rows_of_the_running_run(settings: Settings) -> None:
    migrate(settings)
    since = datetime.now(UTC) - timedelta(minutes=1)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        assert run_progress(conn, CONTROL, since) is None
        with runs.refresh_lock(settings, wait_s=30) as lock:
            run = runs.start_run(lock, CONTROL, flow_run_id=None, trigger="test", params={})
            assert run_progress(conn, CONTROL, since) == RunProgress(run.run_id, [])
            for table, status in (("b_table", "success"), ("a_table", "running")):
                tables.write_table_audit(
                    conn,
                    CONTROL,
                    TableOutcome(
                        run_id=run.run_id,
                        table_name=table,
                        mode="live",
                        write_strategy="slice_replace",
                        status=TableStatus(status),
                    ),
                )
            day = datetime(2026, 1, 5, tzinfo=UTC)
            for i, rows in enumerate((3, 4)):
                tables.write_slice_audit(
                    conn,
                    CONTROL,
                    run_id=run.run_id,
                    table="a_table",
                    slice_start=day + timedelta(days=7 * i),
                    slice_end=day + timedelta(days=7 * (i + 1)),
                    status="success",
                    rows_read=rows,
                    rows_inserted=rows,
                    rows_deleted=0,
                    bytes_read=0,
                    started_at=datetime.now(UTC),
                )
            progress = run_progress(conn, CONTROL, since)
            assert progress is not None
            assert progress.tables == [
                TableProgress("a_table", "running", 2, 7),
                TableProgress("b_table", "success", 0, 0),
            ]
            assert [t.running for t in progress.tables] == [True, False]
            # A run that started before the command is not the command's run.
            assert run_progress(conn, CONTROL, datetime.now(UTC) + timedelta(minutes=1)) is None
            runs.finish_run(
                conn,
                CONTROL,
                run.run_id,
                status="success",
                message="test",
                tables_planned=2,
                tables_succeeded=2,
                tables_failed=0,
                rows_read=7,
                rows_inserted=7,
                dbt_invocation_id=None,
            )
        assert run_progress(conn, CONTROL, since) is None


@pytest.mark.parametrize(
    ("table", "enum"),
    [
        ("refresh_runs", runs.RunStatus),
        ("table_refreshes", TableStatus),
        ("slice_refreshes", SliceStatus),
        ("webhook_deliveries", DeliveryStatus),
    ],
)
def test_each_status_enum_is_exactly_what_its_column_accepts(
    settings: Settings, table: str, enum: type[StrEnum]
) -> None:
    """One enum per kind of status: the values the code compares and writes are the ones the
    migrated schema's check constraint allows, no more, no fewer."""
    migrate(settings)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        defs = [
            d
            for (d,) in conn.execute(
                "select pg_get_constraintdef(c.oid) from pg_constraint c "
                "join pg_class t on t.oid = c.conrelid join pg_namespace n on n.oid = t.relnamespace "
                "where n.nspname = %s and t.relname = %s and c.contype = 'c' "
                "and pg_get_constraintdef(c.oid) like '%%(status%%'",
                (CONTROL, table),
            ).fetchall()
        ]
    assert len(defs) == 1, defs
    assert set(re.findall(r"'([^']+)'::text", defs[0])) == {s.value for s in enum}
