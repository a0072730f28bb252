"""Table and slice refreshes (`table_refreshes`, `slice_refreshes`) and the outcome of one table.

TableOutcome is both what the engine returns for a table and what its audit row records: it is
written when the table starts (status running) and again when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control.checkpoints import END_PARAM, START_PARAM, bound
from flows.control.fingerprints import PlanFingerprints
from flows.control.statuses import SliceStatus, TableStatus
from flows.core.db import qualified
from flows.core.planning import Window, to_ts
from flows.core.table_config import Mode


@dataclass
class TableOutcome:
    """One table's refresh in one run: its counters, window, error and (dry run) plan."""

    table_name: str
    status: TableStatus
    mode: str
    run_id: UUID | None = None
    write_strategy: str | None = None
    rows_read: int = 0
    rows_inserted: int = 0
    rows_deleted: int = 0
    bytes_read: int = 0
    slices_planned: int = 0
    slices_done: int = 0
    slices_skipped: int = 0
    # Measured on the monotonic clock by the engine; started_at/finished_at are wall clock.
    duration_s: float = 0.0
    window: Window | None = None
    error: str | None = None
    retryable: bool = False
    plan: list[dict[str, Any]] = field(default_factory=list)
    # Half-open cursor ranges of the slices this run applied, plus those earlier runs applied
    # without a successful dbt build since (flows.control.rebuilds): what dbt must rebuild
    # (flows.engine.periods). A full_replace table has none.
    changed_slices: list[tuple[date, date]] = field(default_factory=list)
    # A whole table (full_replace) this run loaded, or one an earlier run loaded without a
    # successful dbt build since: dbt rebuilds what is downstream of it. A whole table found
    # unchanged and owed nothing changes no model.
    replaced_whole: bool = False
    # The days each slice applied in this run changed (flows.engine.load.SliceResult.days), for those
    # known: dbt rebuilds the periods of these days only. A changed slice missing here (owed by
    # an earlier run, or its days unknown) counts as every day of its range.
    slice_days: dict[tuple[date, date], list[date]] = field(default_factory=dict)
    # BigQuery's fingerprints of the slices read, from change detection before the read: the
    # validation step's BigQuery side for those periods
    # (flows.engine.validation.after_refresh.validate_touched).
    plan_fingerprints: PlanFingerprints | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None

    @property
    def changed_live_data(self) -> bool:
        return self.status == TableStatus.SUCCESS and self.mode == Mode.LIVE.value

    @property
    def window_start(self) -> datetime | None:
        return None if self.window is None else to_ts(self.window.first)

    @property
    def window_end(self) -> datetime | None:
        return None if self.window is None else to_ts(self.window.last)

    @property
    def rows_per_second(self) -> float | None:
        d = ((self.finished_at or datetime.now(UTC)) - self.started_at).total_seconds()
        return round(self.rows_read / d, 1) if d > 0 and self.rows_read else None


def write_table_audit(conn: psycopg.Connection, schema: str, a: TableOutcome) -> None:
    """Insert or update the table's row of its run (by run_id and table name)."""
    if a.run_id is None:
        raise ValueError(f"{a.table_name}: a table outcome without a run cannot be recorded")
    conn.execute(
        sql.SQL(
            "insert into {t} (run_id, table_name, mode, status, write_strategy, window_start, "
            "window_end, slices_planned, slices_done, slices_skipped, rows_read, rows_inserted, "
            "rows_deleted, bytes_read, rows_per_second, started_at, finished_at, error) values "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "on conflict (run_id, table_name) do update set status = excluded.status, "
            "window_start = excluded.window_start, window_end = excluded.window_end, "
            "slices_planned = excluded.slices_planned, slices_done = excluded.slices_done, "
            "slices_skipped = excluded.slices_skipped, rows_read = excluded.rows_read, "
            "rows_inserted = excluded.rows_inserted, rows_deleted = excluded.rows_deleted, "
            "bytes_read = excluded.bytes_read, rows_per_second = excluded.rows_per_second, "
            "finished_at = excluded.finished_at, error = excluded.error"
        ).format(t=qualified(schema, "table_refreshes")),
        (
            a.run_id,
            a.table_name,
            a.mode,
            a.status,
            a.write_strategy,
            a.window_start,
            a.window_end,
            a.slices_planned,
            a.slices_done,
            a.slices_skipped,
            a.rows_read,
            a.rows_inserted,
            a.rows_deleted,
            a.bytes_read,
            a.rows_per_second,
            a.started_at,
            a.finished_at,
            a.error,
        ),
    )


def write_slice_audit(
    conn: psycopg.Connection,
    schema: str,
    *,
    run_id: UUID,
    table: str,
    slice_start: datetime | None,
    slice_end: datetime | None,
    status: SliceStatus,
    rows_read: int,
    rows_inserted: int,
    rows_deleted: int,
    bytes_read: int,
    started_at: datetime,
    error: str | None = None,
) -> None:
    conn.execute(
        sql.SQL(
            "insert into {s} (run_id, table_name, slice_start, slice_end, status, rows_read, "
            "rows_inserted, rows_deleted, bytes_read, started_at, error) values "
            "(%s, %s, {start}, {end}, %s, %s, %s, %s, %s, %s, %s)"
        ).format(s=qualified(schema, "slice_refreshes"), start=START_PARAM, end=END_PARAM),
        (
            run_id,
            table,
            slice_start,
            slice_end,
            status,
            rows_read,
            rows_inserted,
            rows_deleted,
            bytes_read,
            started_at,
            error,
        ),
    )


def touched_slices(
    conn: psycopg.Connection, schema: str, run_id: UUID, table: str
) -> list[tuple[date, date] | None]:
    """The slices (first day, end day exclusive; None: the whole table) this run committed
    for the table."""
    rows = conn.execute(
        sql.SQL(
            "select distinct {start}, {end} from {s} where run_id = %s and table_name = %s "
            "and status = 'success' order by 1"
        ).format(
            start=bound(sql.Identifier("slice_start")),
            end=bound(sql.Identifier("slice_end")),
            s=qualified(schema, "slice_refreshes"),
        ),
        (run_id, table),
    ).fetchall()
    return [None if a is None else (a.astimezone(UTC).date(), b.astimezone(UTC).date()) for a, b in rows]
