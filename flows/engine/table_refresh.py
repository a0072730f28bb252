"""Refreshing one table: plan its slices, read each from BigQuery, apply it atomically.

Plain functions, called by the Prefect flow and directly by tests.
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
from flows.control.tables import SliceStatus, TableOutcome, TableStatus
from flows.core import retry
from flows.core.db import connect, relation_columns
from flows.core.errors import BadSourceValueError, RefreshError, TerminalError, one_line
from flows.core.planning import Slice, plan_slices, plan_window, resumable
from flows.core.redact import error_text
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig, WriteStrategy
from flows.core.type_mapping import ColumnMapping, map_schema
from flows.engine import change_detection, scale_out, validation
from flows.engine.bigquery import BigQueryClients
from flows.engine.extract import (
    ReadStats,
    SourceColumn,
    cursor_range,
    describe,
    estimate_bytes,
    read_slice,
    row_restriction,
    rows_per_day,
)
from flows.engine.load import apply_slice, days_in_slice, ensure_raw_table
from flows.notify import webhooks

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


def target_schema(settings: Settings, cfg: TableConfig) -> str:
    return f"{settings.raw_schema}_shadow" if cfg.mode is Mode.SHADOW else settings.raw_schema


def checkpoint_key(settings: Settings, cfg: TableConfig) -> str:
    return cfg.table_name if cfg.mode is not Mode.SHADOW else f"shadow:{cfg.table_name}"


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
    deadline = options.deadline or time.monotonic() + settings.table_retry_budget_s
    dry_run = options.dry_run or cfg.mode is Mode.DRY_RUN
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
    try:
        if not dry_run:
            runs.check_lock(conn, run_id, f"before refreshing {cfg.table_name}")
            tables.write_table_audit(conn, settings.control_schema, outcome)
        _refresh(settings, clients, cfg, run_id, options, dry_run, conn, outcome, deadline)
        # The next due time is set by the run (flows.orchestration.runbook.advance_due_times),
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
                    webhooks.table_finished(conn, settings, outcome, failure)
            except psycopg.Error as exc:
                log.error("%s: could not write the table audit row: %s", cfg.table_name, exc)
        conn.close()
    return outcome


def _refresh(
    settings: Settings,
    clients: BigQueryClients,
    cfg: TableConfig,
    run_id: UUID,
    options: RefreshOptions,
    dry_run: bool,
    conn: psycopg.Connection,
    outcome: TableOutcome,
    deadline: float,
) -> None:
    source = describe(clients, cfg.source_table)
    columns = map_schema(
        [(c.name, c.field_type, c.mode, c.precision, c.scale) for c in source.columns],
        cfg.table_name,
    )
    schema = target_schema(settings, cfg)
    key = checkpoint_key(settings, cfg)
    cursor_src = cursor_map = None
    window = None
    if cfg.write_strategy is WriteStrategy.SLICE_REPLACE:
        assert cfg.cursor_column is not None
        cursor_src = source.column(cfg.cursor_column)
        cursor_map = next(c for c in columns if c.source_name == cursor_src.name)
        lo, hi = cursor_range(clients, cfg, cursor_src)
        high_water = (
            None
            if options.full_refresh
            else checkpoints.high_water(conn, settings.control_schema, key, cfg.table_name)
        )
        try:
            window = plan_window(
                cfg, lo, hi, high_water, options.start_date, options.end_date, options.full_refresh
            )
        except ValueError as exc:
            raise TerminalError(f"{cfg.table_name}: {exc}") from exc
    slices = plan_slices(cfg, window)
    if not (options.full_refresh or dry_run):
        # Resume an interrupted attempt: a backfill only one of the same tables and range.
        committed = (
            checkpoints.committed_by_same_backfill(conn, settings.control_schema, key, cfg.table_name, run_id)
            if options.explicit_range
            else checkpoints.committed_since_last_success(
                conn, settings.control_schema, key, cfg.table_name, RESUME_MAX_AGE_HOURS
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
    if not dry_run or options.explain:
        bypass = change_detection.bypass_reason(
            cfg, full_refresh=options.full_refresh, explicit_range=options.explicit_range
        )
        # As a run would, also for --explain: a live table's new slices are fingerprinted too.
        validated = validation.validated_after_refresh(cfg)
        detection = change_detection.detect(
            settings, clients, conn, cfg, source, schema, key, slices, bypass, validated
        )
        slices = detection.to_read
        outcome.plan_fingerprints = detection.plan_fingerprints()

    if dry_run and detection is not None:
        outcome.plan = [d.to_dict() for d in detection.decisions]
        if options.explain:
            _predict_changes(
                settings, clients, conn, cfg, schema, cursor_map, cursor_src, detection, run_id, outcome
            )
        return
    if dry_run:
        span = Slice(slices[0].start, slices[-1].end) if cursor_src and slices else None
        per_day = rows_per_day(clients, cfg, cursor_src, span) if slices else {}
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
                    "estimated_bytes": estimate_bytes(clients, cfg, where),
                }
            )
        return

    with conn.transaction():
        ensure_raw_table(conn, schema, cfg.table_name, columns, cursor_map.name if cursor_map else None)
    assert detection is not None
    change_detection.record(
        conn, settings.control_schema, run_id, cfg.table_name, key, detection, detected_at
    )

    bad_slices: list[str] = []
    loaders = [
        _SliceLoader(
            settings,
            clients,
            cfg,
            run_id,
            schema,
            key,
            columns,
            cursor_map,
            cursor_src,
            p,
            datetime.now(UTC),
            detection,
        )
        for p in slices
    ]
    # In order in this thread, or on Dask workers (flows.engine.scale_out) in completion order.
    with contextlib.closing(scale_out.run_slices(loaders, deadline)) as results:
        for loader, result in results:
            piece = loader.piece
            try:
                inserted, deleted, stats, days = result()
            except BadSourceValueError as exc:
                # Only this slice's data is bad: the other slices still load, the table ends failed.
                _record_failed_slice(
                    settings, run_id, cfg.table_name, piece, loader.started_at, exc, loader.attempts
                )
                log.error("%s", exc)
                bad_slices.append(str(exc))
                continue
            except psycopg.Error as exc:
                # Refused by Postgres (read-only table, permissions, a constraint): not worth a retry.
                refused = TerminalError(
                    f"{cfg.table_name} slice {piece.label}: Postgres refused the slice, which was rolled "
                    f"back: {one_line(exc)}"
                )
                _record_failed_slice(
                    settings, run_id, cfg.table_name, piece, loader.started_at, refused, loader.attempts
                )
                raise refused from exc
            except RefreshError as exc:
                _record_failed_slice(
                    settings, run_id, cfg.table_name, piece, loader.started_at, exc, loader.attempts
                )
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
            runs.heartbeat(conn, settings.control_schema, run_id)
    _add_owed_slices(settings, conn, cfg, run_id, outcome)
    if bad_slices:
        raise BadSourceValueError(
            f"{len(bad_slices)} slice(s) not loaded, the others were: " + " | ".join(bad_slices)
        )


def _add_owed_slices(
    settings: Settings, conn: psycopg.Connection, cfg: TableConfig, run_id: UUID, outcome: TableOutcome
) -> None:
    """Slices an earlier run applied without a successful dbt build after it (it failed, or the
    run died: also the slices a resumed attempt skips) are rebuilt by this run's dbt too; so is
    a whole table loaded so."""
    if cfg.mode is not Mode.LIVE:
        return
    if cfg.write_strategy is WriteStrategy.SLICE_REPLACE:
        owed = rebuilds.slices_awaiting_dbt(
            conn, settings.control_schema, cfg.table_name, run_id, cfg.lookback_days
        )
        outcome.changed_slices.extend(s for s in owed if s not in outcome.changed_slices)
    elif not outcome.replaced_whole:
        outcome.replaced_whole = rebuilds.whole_table_awaiting_dbt(
            conn, settings.control_schema, cfg.table_name, run_id, cfg.lookback_days
        )


def _predict_changes(
    settings: Settings,
    clients: BigQueryClients,
    conn: psycopg.Connection,
    cfg: TableConfig,
    schema: str,
    cursor: ColumnMapping | None,
    cursor_src: SourceColumn | None,
    detection: change_detection.Detection,
    run_id: UUID,
    outcome: TableOutcome,
) -> None:
    """For --explain, what a run would hand dbt (flows.orchestration.runbook.rebuild_vars), without loading:
    the slices it would apply, each with the days its load would change, and the slices owed
    by earlier runs. A load deletes the slice's rows and inserts the source's, so it changes the
    days holding rows in the raw table or in BigQuery: the fingerprint query's days where it
    covered the slice, else one count per day of the others' span (as the dry run's plan)."""
    outcome.replaced_whole = any(d.read and d.piece.start is None for d in detection.decisions)
    read = [d.piece for d in detection.decisions if d.read and d.piece.start is not None]
    outcome.changed_slices.extend(_dated(p) for p in read)
    if cursor is not None and cursor_src is not None and read:
        unknown = [p for p in read if p.start not in detection.source_days]
        counted: dict[date | None, int] = {}
        if unknown:
            counted = rows_per_day(clients, cfg, cursor_src, Slice(unknown[0].start, unknown[-1].end))
        raw_exists = bool(relation_columns(conn, schema, cfg.table_name))
        for piece in read:
            assert piece.start is not None and piece.end is not None
            source = detection.source_days.get(piece.start)
            if source is None:
                source = [
                    d for d, n in counted.items() if d is not None and piece.start <= d < piece.end and n
                ]
            raw = days_in_slice(conn, schema, cfg.table_name, cursor, piece) if raw_exists else set()
            if raw is not None:
                outcome.slice_days[_dated(piece)] = sorted(raw.union(source))
    _add_owed_slices(settings, conn, cfg, run_id, outcome)


def _dated(piece: Slice) -> tuple[date, date]:
    assert piece.start is not None and piece.end is not None
    return piece.start, piece.end


@dataclass
class _SliceLoader:
    """One slice: read from BigQuery and apply atomically; `attempt` is safe to retry."""

    settings: Settings
    clients: BigQueryClients | None  # None on its way to a Dask worker (flows.engine.scale_out)
    cfg: TableConfig
    run_id: UUID
    schema: str
    key: str
    columns: list[ColumnMapping]
    cursor: ColumnMapping | None
    cursor_src: SourceColumn | None
    piece: Slice
    started_at: datetime
    detection: change_detection.Detection | None = None
    attempts: int = 0

    def run(self, deadline: float) -> tuple[int, int, ReadStats, list[date] | None]:
        """Every attempt of the slice, retried until `deadline` (time.monotonic())."""
        self.started_at = datetime.now(UTC)
        what = f"{self.cfg.table_name} slice {self.piece.label}"
        return retry.call(self.attempt, what, retry.SLICE, deadline=deadline)

    def attempt(self) -> tuple[int, int, ReadStats, list[date] | None]:
        """One attempt: rows inserted, rows deleted, the read's stats and the days it changed
        (SliceResult.days)."""
        assert self.clients is not None
        self.attempts += 1
        stats = ReadStats()
        where = row_restriction(self.cursor_src, self.piece) if self.cursor_src else ""

        def record(c: psycopg.Connection, inserted: int, deleted: int) -> None:
            if self.detection is not None:
                change_detection.store_loaded(
                    c,
                    self.settings.control_schema,
                    self.schema,
                    self.cfg.table_name,
                    self.key,
                    self.detection,
                    self.piece,
                )
            # Last before the commit: the fence (see runs.check_lock).
            runs.check_lock(
                c, self.run_id, f"before committing {self.cfg.table_name} slice {self.piece.label}"
            )
            tables.write_slice_audit(
                c,
                self.settings.control_schema,
                run_id=self.run_id,
                table=self.cfg.table_name,
                slice_start=self.piece.start_ts,
                slice_end=self.piece.end_ts,
                status=SliceStatus.SUCCESS,
                rows_read=stats.rows,
                rows_inserted=inserted,
                rows_deleted=deleted,
                bytes_read=stats.bytes,
                started_at=self.started_at,
            )
            if self.detection is not None:
                change_detection.note_read(
                    c,
                    self.settings.control_schema,
                    self.run_id,
                    self.cfg.table_name,
                    self.detection,
                    self.piece,
                )
            if self.attempts > 1:
                retries.set_slice_attempts(
                    c,
                    self.settings.control_schema,
                    self.run_id,
                    self.cfg.table_name,
                    self.piece.start_ts,
                    self.attempts,
                )

        # A fresh connection per attempt: a retry after a dropped connection starts clean.
        with connect(self.settings) as conn:
            # A safety net: a transaction left waiting (a client bug, a hung source) is ended by
            # the server instead of holding the slice's deleted rows.
            timeout_ms = int((self.settings.bq_stall_timeout_s + 30) * 1000)
            conn.execute(
                "select set_config('idle_in_transaction_session_timeout', %s, false)", (str(timeout_ms),)
            )
            conn.commit()
            res = apply_slice(
                conn,
                schema=self.schema,
                table=self.cfg.table_name,
                control_schema=self.settings.control_schema,
                columns=self.columns,
                cursor=self.cursor,
                piece=self.piece,
                batches=read_slice(self.clients, self.cfg, where, stats),
                run_id=self.run_id,
                in_transaction=record,
                checkpoint_key=self.key,
            )
        return res.rows_inserted, res.rows_deleted, stats, res.days


def _record_failed_slice(
    settings: Settings,
    run_id: UUID,
    table: str,
    piece: Slice,
    started: datetime,
    exc: BaseException,
    attempts: int,
) -> None:
    try:
        with connect(settings, autocommit=True) as c, c.transaction():
            tables.write_slice_audit(
                c,
                settings.control_schema,
                run_id=run_id,
                table=table,
                slice_start=piece.start_ts,
                slice_end=piece.end_ts,
                status=SliceStatus.FAILED,
                rows_read=0,
                rows_inserted=0,
                rows_deleted=0,
                bytes_read=0,
                started_at=started,
                error=error_text(exc),
            )
            retries.set_slice_attempts(c, settings.control_schema, run_id, table, piece.start_ts, attempts)
    except psycopg.Error as err:
        log.error("%s: could not record the failed slice: %s", table, err)
