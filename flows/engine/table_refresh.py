"""Refreshing one table: plan its slices, then estimate them (a dry run) or load them.

Plain functions, called by the Prefect flow and directly by tests. `refresh_table` runs the
steps over one `TableRefresh`: `plan_table` (the source's schema, the window, the slices to
read), then `estimate_table` (a dry run, or --explain) or `load_table` (each slice read and
applied atomically by flows.engine.slice_loader).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from uuid import UUID

import psycopg

from flows.control import checkpoints, rebuilds, retries, runs, tables
from flows.control.statuses import TableStatus
from flows.control.tables import TableOutcome
from flows.core import retry
from flows.core.db import connect, relation_columns
from flows.core.errors import BadSourceValueError, RefreshError, TerminalError, one_line
from flows.core.planning import Slice, plan_slices, plan_window, resumable
from flows.core.redact import error_text
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig, WriteStrategy, target_schema
from flows.core.type_mapping import ColumnMapping, map_schema
from flows.engine import change_detection, scale_out
from flows.engine.bigquery import BigQueryClients
from flows.engine.extract import (
    SourceColumn,
    cursor_range,
    describe,
    estimate_bytes,
    row_restriction,
    rows_per_day,
)
from flows.engine.load import days_in_slice, ensure_raw_table
from flows.engine.slice_loader import SliceLoader, record_failed_slice
from flows.engine.validation.after_refresh import validated_after_refresh
from flows.notify import webhook_events

log = logging.getLogger(__name__)

# Checkpoints older than this are not used to resume an interrupted attempt (of a daily run; a
# repeated backfill resumes its earlier attempts whatever their age: checkpoints.committed_by_same_backfill).
RESUME_MAX_AGE_HOURS = 24


@dataclass(frozen=True)
class RefreshOptions:
    start_date: date | None = None
    end_date: date | None = None
    full_refresh: bool = False
    dry_run: bool = False
    # Plan and fingerprint only (with dry_run): which slices are new, changed or unchanged.
    explain: bool = False
    # time.monotonic() after which no retry of the table starts (set per table by the flow)
    deadline: float | None = None

    @property
    def explicit_range(self) -> bool:
        return self.start_date is not None or self.end_date is not None


def checkpoint_key(settings: Settings, cfg: TableConfig) -> str:
    return cfg.table_name if cfg.mode is not Mode.SHADOW else f"shadow:{cfg.table_name}"


@dataclass
class TableRefresh:
    """One table's refresh: what every step reads, and the outcome the steps fill in."""

    settings: Settings
    clients: BigQueryClients
    cfg: TableConfig
    run_id: UUID
    options: RefreshOptions
    conn: psycopg.Connection  # autocommit, of this table's thread
    outcome: TableOutcome
    # time.monotonic() after which no retry of the table starts
    deadline: float

    @property
    def dry_run(self) -> bool:
        return self.options.dry_run or self.cfg.mode is Mode.DRY_RUN

    @property
    def control(self) -> str:
        return self.settings.control_schema

    @property
    def schema(self) -> str:
        return target_schema(self.settings, self.cfg)

    @property
    def key(self) -> str:
        return checkpoint_key(self.settings, self.cfg)


@dataclass
class TablePlan:
    """What `plan_table` decided: the source's columns as mapped, its cursor, the slices to read."""

    columns: list[ColumnMapping]
    cursor_src: SourceColumn | None
    cursor: ColumnMapping | None
    slices: list[Slice]
    # The change detection's decisions (None in a dry run without --explain), taken at detected_at.
    detection: change_detection.Detection | None
    detected_at: datetime


def refresh_table(
    settings: Settings,
    clients: BigQueryClients,
    cfg: TableConfig,
    run_id: UUID,
    options: RefreshOptions,
) -> TableOutcome:
    """Refresh one table; never raises for the table's own failures (they are in the outcome).

    The run must hold the refresh lock (runs.check_lock fences every slice commit). Transient
    failures are retried until `options.deadline` (time.monotonic(); default:
    REFRESH_TABLE_RETRY_BUDGET_S from now); then the table fails.
    """
    outcome = TableOutcome(
        cfg.table_name,
        TableStatus.RUNNING,
        cfg.mode.value,
        run_id=run_id,
        write_strategy=cfg.write_strategy.value,
    )
    started = time.monotonic()
    failure: BaseException | None = None
    count = retry.start_counting()
    conn = connect(settings, autocommit=True)
    ctx = TableRefresh(
        settings,
        clients,
        cfg,
        run_id,
        options,
        conn,
        outcome,
        deadline=options.deadline or time.monotonic() + settings.table_retry_budget_s,
    )
    dry_run = ctx.dry_run
    try:
        if not dry_run:
            runs.check_lock(conn, run_id, f"before refreshing {cfg.table_name}")
            tables.write_table_audit(conn, settings.control_schema, outcome)
        planned = plan_table(ctx)
        if dry_run:
            estimate_table(ctx, planned)
        else:
            load_table(ctx, planned)
        # The next due time is set by the run (flows.orchestration.run_plan.advance_due_times),
        # from its anchor.
        outcome.status = TableStatus.PLANNED if dry_run else TableStatus.SUCCESS
    except (RefreshError, psycopg.Error) as exc:
        failure = exc
        outcome.status = TableStatus.FAILED
        outcome.error = error_text(exc)
        outcome.retryable = retry.is_transient(exc)
        log.error("%s: refresh failed: %s", cfg.table_name, exc)
    finally:
        outcome.finished_at = datetime.now(UTC)
        outcome.duration_s = time.monotonic() - started
        if not dry_run:
            try:
                if conn.closed:
                    conn = connect(settings, autocommit=True)
                with conn.transaction():  # the table.failed event commits with its audit row
                    tables.write_table_audit(conn, settings.control_schema, outcome)
                    retries.add_table_retries(conn, settings.control_schema, run_id, cfg.table_name, count.n)
                    webhook_events.table_finished(conn, settings, outcome, failure)
            except psycopg.Error as exc:
                log.error("%s: could not write the table audit row: %s", cfg.table_name, exc)
        conn.close()
    return outcome


def plan_table(ctx: TableRefresh) -> TablePlan:
    """The source's schema and the slices to read: the window (from the cursor's range and the
    table's checkpoints), less what an interrupted attempt committed, less what the change
    detection finds unchanged (not in a dry run without --explain)."""
    cfg, options, outcome = ctx.cfg, ctx.options, ctx.outcome
    source = describe(ctx.clients, cfg.source_table)
    columns = map_schema(
        [(c.name, c.field_type, c.mode, c.precision, c.scale) for c in source.columns],
        cfg.table_name,
    )
    cursor_src = cursor = None
    window = None
    if cfg.write_strategy is WriteStrategy.SLICE_REPLACE:
        assert cfg.cursor_column is not None
        cursor_src = source.column(cfg.cursor_column)
        cursor = next(c for c in columns if c.source_name == cursor_src.name)
        lo, hi = cursor_range(ctx.clients, cfg, cursor_src)
        high_water = (
            None
            if options.full_refresh
            else checkpoints.high_water(ctx.conn, ctx.control, ctx.key, cfg.table_name)
        )
        try:
            window = plan_window(
                cfg, lo, hi, high_water, options.start_date, options.end_date, options.full_refresh
            )
        except ValueError as exc:
            raise TerminalError(f"{cfg.table_name}: {exc}") from exc
    slices = plan_slices(cfg, window)
    if not (options.full_refresh or ctx.dry_run):
        # Resume an interrupted attempt: a backfill only one of the same tables and range.
        committed = (
            checkpoints.committed_by_same_backfill(ctx.conn, ctx.control, ctx.key, cfg.table_name, ctx.run_id)
            if options.explicit_range
            else checkpoints.committed_since_last_success(
                ctx.conn, ctx.control, ctx.key, cfg.table_name, RESUME_MAX_AGE_HOURS
            )
        )
        slices, skipped = resumable(slices, committed)
        outcome.slices_skipped = skipped
        if skipped:
            log.info(
                "%s: resumed: %d slice(s) an interrupted attempt committed are not read again",
                cfg.table_name,
                skipped,
            )
    outcome.window = window
    outcome.slices_planned = len(slices)
    detection = None
    detected_at = datetime.now(UTC)
    if not ctx.dry_run or options.explain:
        bypass = change_detection.bypass_reason(
            cfg, full_refresh=options.full_refresh, explicit_range=options.explicit_range
        )
        # As a run would, also for --explain: a live table's new slices are fingerprinted too.
        validated = validated_after_refresh(cfg)
        detection = change_detection.detect(
            ctx.settings, ctx.clients, ctx.conn, cfg, source, ctx.schema, ctx.key, slices, bypass, validated
        )
        slices = detection.to_read
        outcome.plan_fingerprints = detection.plan_fingerprints()
    return TablePlan(columns, cursor_src, cursor, slices, detection, detected_at)


def estimate_table(ctx: TableRefresh, planned: TablePlan) -> None:
    """A dry run's plan: each slice's estimated rows and BigQuery bytes; with --explain, the
    change detection's decisions and what the run would change (`_predict_changes`)."""
    outcome, slices, cursor_src = ctx.outcome, planned.slices, planned.cursor_src
    if planned.detection is not None:
        outcome.plan = [d.to_dict() for d in planned.detection.decisions]
        _predict_changes(ctx, planned, planned.detection)
        return
    span = Slice(slices[0].start, slices[-1].end) if cursor_src and slices else None
    per_day = rows_per_day(ctx.clients, ctx.cfg, cursor_src, span) if slices else {}
    for s in slices:
        where = row_restriction(cursor_src, s) if cursor_src else ""
        rows = sum(
            n
            for d, n in per_day.items()
            if s.start is None or s.end is None or (d is not None and s.start <= d < s.end)
        )
        outcome.plan.append(
            {
                "slice": s.label,
                "estimated_rows": rows,
                "estimated_bytes": estimate_bytes(ctx.clients, ctx.cfg, where),
            }
        )


def load_table(ctx: TableRefresh, planned: TablePlan) -> None:
    """Every planned slice read and applied (each in its own transaction), counted in the
    outcome; then the slices earlier runs still owe dbt. A slice with bad data fails the table
    after the others loaded; any other failure for good stops it."""
    cfg, conn, outcome = ctx.cfg, ctx.conn, ctx.outcome
    detection = planned.detection
    assert detection is not None
    with conn.transaction():
        ensure_raw_table(
            conn, ctx.schema, cfg.table_name, planned.columns, planned.cursor.name if planned.cursor else None
        )
    change_detection.record(
        conn, ctx.control, ctx.run_id, cfg.table_name, ctx.key, detection, planned.detected_at
    )

    bad_slices: list[str] = []
    loaders = [
        SliceLoader(
            ctx.settings,
            ctx.clients,
            cfg,
            ctx.run_id,
            ctx.schema,
            ctx.key,
            planned.columns,
            planned.cursor,
            planned.cursor_src,
            p,
            datetime.now(UTC),
            detection,
        )
        for p in planned.slices
    ]
    # In order in this thread, or on Dask workers (flows.engine.scale_out) in completion order.
    with contextlib.closing(scale_out.run_slices(loaders, ctx.deadline)) as results:
        for loader, result in results:
            piece = loader.piece
            try:
                inserted, deleted, stats, days = result()
            except BadSourceValueError as exc:
                # Only this slice's data is bad: the other slices still load, the table ends failed.
                _record_failed(ctx, loader, exc)
                log.error("%s", exc)
                bad_slices.append(str(exc))
                continue
            except psycopg.Error as exc:
                # Refused by Postgres (read-only table, permissions, a constraint): not worth a retry.
                refused = TerminalError(
                    f"{cfg.table_name} slice {piece.label}: Postgres refused the slice, which was rolled "
                    f"back: {one_line(exc)}"
                )
                _record_failed(ctx, loader, refused)
                raise refused from exc
            except RefreshError as exc:
                _record_failed(ctx, loader, exc)
                raise
            outcome.slices_done += 1
            if piece.start is None:
                outcome.replaced_whole = True
            else:
                outcome.changed_slices.append(_dated(piece))
                if days is not None:
                    outcome.slice_days[_dated(piece)] = days
            outcome.rows_read += stats.rows
            outcome.bytes_read += stats.bytes
            outcome.rows_inserted += inserted
            outcome.rows_deleted += deleted
            runs.heartbeat(conn, ctx.control, ctx.run_id)
    _add_owed_slices(ctx)
    if bad_slices:
        raise BadSourceValueError(
            f"{len(bad_slices)} slice(s) not loaded, the others were: " + " | ".join(bad_slices)
        )


def _record_failed(ctx: TableRefresh, loader: SliceLoader, exc: BaseException) -> None:
    record_failed_slice(
        ctx.settings, ctx.run_id, ctx.cfg.table_name, loader.piece, loader.started_at, exc, loader.attempts
    )


def _add_owed_slices(ctx: TableRefresh) -> None:
    """Slices an earlier run applied without a successful dbt build after it (it failed, or the
    run died: also the slices a resumed attempt skips) are rebuilt by this run's dbt too; so is
    a whole table loaded so."""
    cfg, outcome = ctx.cfg, ctx.outcome
    if cfg.mode is not Mode.LIVE:
        return
    if cfg.write_strategy is WriteStrategy.SLICE_REPLACE:
        owed = rebuilds.slices_awaiting_dbt(
            ctx.conn, ctx.control, cfg.table_name, ctx.run_id, cfg.lookback_days
        )
        outcome.changed_slices.extend(s for s in owed if s not in outcome.changed_slices)
    elif not outcome.replaced_whole:
        outcome.replaced_whole = rebuilds.whole_table_awaiting_dbt(
            ctx.conn, ctx.control, cfg.table_name, ctx.run_id, cfg.lookback_days
        )


def _predict_changes(ctx: TableRefresh, planned: TablePlan, detection: change_detection.Detection) -> None:
    """For --explain, what a run would hand dbt (flows.orchestration.dbt_selection.rebuild_vars),
    without loading: the slices it would apply, each with the days its load would change, and the slices owed
    by earlier runs. A load deletes the slice's rows and inserts the source's, so it changes the
    days holding rows in the raw table or in BigQuery: the fingerprint query's days where it
    covered the slice, else one count per day of the others' span (as the dry run's plan)."""
    cfg, conn, outcome = ctx.cfg, ctx.conn, ctx.outcome
    cursor, cursor_src = planned.cursor, planned.cursor_src
    outcome.replaced_whole = any(d.read and d.piece.start is None for d in detection.decisions)
    read = [d.piece for d in detection.decisions if d.read and d.piece.start is not None]
    outcome.changed_slices.extend(_dated(p) for p in read)
    if cursor is not None and cursor_src is not None and read:
        unknown = [p for p in read if p.start not in detection.source_days]
        counted: dict[date | None, int] = {}
        if unknown:
            counted = rows_per_day(ctx.clients, cfg, cursor_src, Slice(unknown[0].start, unknown[-1].end))
        raw_exists = bool(relation_columns(conn, ctx.schema, cfg.table_name))
        for piece in read:
            assert piece.start is not None and piece.end is not None
            source = detection.source_days.get(piece.start)
            if source is None:
                source = [
                    d for d, n in counted.items() if d is not None and piece.start <= d < piece.end and n
                ]
            raw = days_in_slice(conn, ctx.schema, cfg.table_name, cursor, piece) if raw_exists else set()
            if raw is not None:
                outcome.slice_days[_dated(piece)] = sorted(raw.union(source))
    _add_owed_slices(ctx)


def _dated(piece: Slice) -> tuple[date, date]:
    assert piece.start is not None and piece.end is not None
    return piece.start, piece.end
