"""Refreshing one table: plan its slices, read each from BigQuery, apply it atomically.

Plain functions, called by the Prefect flow and directly by tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql

from flows import audit, webhooks
from flows.bigquery import BigQueryClients
from flows.control import retries
from flows.db import connect
from flows.errors import BadSourceValueError, RefreshError, TerminalError, TransientError
from flows.extract import (
    ReadStats,
    SourceColumn,
    cursor_range,
    describe,
    estimate_bytes,
    read_slice,
    row_restriction,
    rows_per_day,
)
from flows.load import apply_slice, ensure_raw_table
from flows.planning import Slice, Window, plan_slices, plan_window, resumable, to_ts
from flows.redact import error_text
from flows.registry import Mode, TableConfig, WriteStrategy
from flows.settings import Settings
from flows.type_mapping import ColumnMapping, map_schema

log = logging.getLogger(__name__)
T = TypeVar("T")

# Checkpoints older than this are not used to resume an interrupted attempt.
RESUME_MAX_AGE_HOURS = 24


@dataclass(frozen=True)
class RefreshOptions:
    start_date: date | None = None
    end_date: date | None = None
    full_refresh: bool = False
    dry_run: bool = False
    # time.monotonic() after which no retry of the table starts (set per table by the flow)
    deadline: float | None = None

    @property
    def explicit_range(self) -> bool:
        return self.start_date is not None or self.end_date is not None


@dataclass
class TableOutcome:
    table_name: str
    status: str  # success | failed | planned
    mode: str
    rows_read: int = 0
    rows_inserted: int = 0
    rows_deleted: int = 0
    slices_done: int = 0
    slices_skipped: int = 0
    duration_s: float = 0.0
    window: Window | None = None
    error: str | None = None
    retryable: bool = False
    plan: list[dict[str, Any]] = field(default_factory=list)

    @property
    def changed_live_data(self) -> bool:
        return self.status == "success" and self.mode == Mode.LIVE.value


def target_schema(settings: Settings, cfg: TableConfig) -> str:
    return f"{settings.raw_schema}_shadow" if cfg.mode is Mode.SHADOW else settings.raw_schema


def checkpoint_key(settings: Settings, cfg: TableConfig) -> str:
    return cfg.table_name if cfg.mode is not Mode.SHADOW else f"shadow:{cfg.table_name}"


def one_line(exc: BaseException) -> str:
    """An error in one line. A Postgres error's text adds CONTEXT lines that quote the row a
    COPY was at: only its primary message, so no row data reaches an audit row or a log."""
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    return str(primary or (str(exc).strip().splitlines() or [type(exc).__name__])[0])


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 4,
    base_delay_s: float = 2.0,
    on_retry: Callable[[BaseException], None] | None = None,
    deadline: float | None = None,
) -> T:
    """Run fn, retrying transient failures with exponential backoff (2, 4, 8 s ...).

    No retry starts after `deadline` (time.monotonic()): the table's retry budget.
    """
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (
            TransientError,
            psycopg.OperationalError,
            psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected,
        ) as exc:
            delay = base_delay_s * 2 ** (attempt - 1)
            if attempt == attempts or (deadline is not None and time.monotonic() + delay > deadline):
                raise TransientError(
                    f"{what}: still failing after {attempt} attempt(s) in "
                    f"{time.monotonic() - started:.0f}s: {one_line(exc)}"
                ) from exc
            log.warning(
                "%s: transient failure (%s), retry %d/%d in %.0fs",
                what,
                one_line(exc),
                attempt,
                attempts - 1,
                delay,
            )
            retries.bump(exc)
            if on_retry is not None:
                on_retry(exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _high_water(conn: psycopg.Connection, settings: Settings, key: str) -> date | None:
    row = conn.execute(
        sql.SQL("select max(slice_end) from {} where table_name = %s and slice_start > '0001-01-02'").format(
            sql.Identifier(settings.control_schema, "checkpoints")
        ),
        (key,),
    ).fetchone()
    return row[0].astimezone(UTC).date() if row and row[0] else None


def _committed_since_last_success(
    conn: psycopg.Connection, settings: Settings, key: str, table: str
) -> set[date]:
    """Slices an interrupted attempt already committed after the table's last success."""
    rows = conn.execute(
        sql.SQL(
            "select c.slice_start from {cp} c where c.table_name = %s "
            "and c.committed_at > now() - make_interval(hours => %s) "
            "and c.committed_at > coalesce((select max(finished_at) from {tr} "
            "  where table_name = %s and status = 'success'), '-infinity')"
        ).format(
            cp=sql.Identifier(settings.control_schema, "checkpoints"),
            tr=sql.Identifier(settings.control_schema, "table_refreshes"),
        ),
        (key, RESUME_MAX_AGE_HOURS, table),
    ).fetchall()
    return {r[0].astimezone(UTC).date() for r in rows}


def refresh_table(
    settings: Settings,
    clients: BigQueryClients,
    cfg: TableConfig,
    run_id: UUID,
    options: RefreshOptions,
) -> TableOutcome:
    """Refresh one table; never raises for the table's own failures (they are in the outcome).

    The run must hold the refresh lock (audit.check_lock fences every slice commit). Transient
    failures are retried until `options.deadline` (time.monotonic(); default:
    REFRESH_TABLE_RETRY_BUDGET_S from now); then the table fails.
    """
    deadline = options.deadline or time.monotonic() + settings.table_retry_budget_s
    dry_run = options.dry_run or cfg.mode is Mode.DRY_RUN
    outcome = TableOutcome(cfg.table_name, "running", cfg.mode.value)
    rec = audit.TableAudit(run_id, cfg.table_name, cfg.mode.value, cfg.write_strategy.value)
    started = time.monotonic()
    failure: BaseException | None = None
    count = retries.start_counting()
    conn = connect(settings, autocommit=True)
    try:
        if not dry_run:
            audit.check_lock(conn, run_id, f"before refreshing {cfg.table_name}")
            audit.write_table_audit(conn, settings.control_schema, rec)
        _refresh(settings, clients, cfg, run_id, options, dry_run, conn, rec, outcome, deadline)
        # The next due time is set by the run (flows.runbook.advance_due_times), from its anchor.
        rec.status = outcome.status = "planned" if dry_run else "success"
    except (RefreshError, psycopg.Error) as exc:
        failure = exc
        rec.status = outcome.status = "failed"
        rec.error = outcome.error = error_text(exc)
        outcome.retryable = isinstance(exc, TransientError | psycopg.OperationalError)
        log.error("%s: refresh failed: %s", cfg.table_name, exc)
    finally:
        rec.finished_at = datetime.now(UTC)
        outcome.duration_s = time.monotonic() - started
        outcome.rows_read, outcome.rows_inserted = rec.rows_read, rec.rows_inserted
        outcome.rows_deleted, outcome.slices_done = rec.rows_deleted, rec.slices_done
        outcome.slices_skipped = rec.slices_skipped
        if not dry_run:
            try:
                if conn.closed:
                    conn = connect(settings, autocommit=True)
                with conn.transaction():  # the table.failed event commits with its audit row
                    audit.write_table_audit(conn, settings.control_schema, rec)
                    retries.add_table_retries(conn, settings.control_schema, run_id, cfg.table_name, count.n)
                    webhooks.table_finished(conn, settings, rec, failure)
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
    rec: audit.TableAudit,
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
        high_water = None if options.full_refresh else _high_water(conn, settings, key)
        try:
            window = plan_window(
                cfg, lo, hi, high_water, options.start_date, options.end_date, options.full_refresh
            )
        except ValueError as exc:
            raise TerminalError(f"{cfg.table_name}: {exc}") from exc
    slices = plan_slices(cfg, window)
    if not (options.full_refresh or options.explicit_range or dry_run):
        slices, skipped = resumable(
            slices, _committed_since_last_success(conn, settings, key, cfg.table_name)
        )
        rec.slices_skipped = skipped
    outcome.window = window
    rec.slices_planned = len(slices)
    if window is not None:
        rec.window_start, rec.window_end = to_ts(window.first), to_ts(window.last)

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

    bad_slices: list[str] = []
    for piece in slices:
        slice_started = datetime.now(UTC)
        loader = _SliceLoader(
            settings, clients, cfg, run_id, schema, key, columns, cursor_map, cursor_src, piece, slice_started
        )
        try:
            inserted, deleted, stats = with_retries(
                loader.attempt, f"{cfg.table_name} slice {piece.label}", deadline=deadline
            )
        except BadSourceValueError as exc:
            # Only this slice's data is bad: the other slices still load, the table ends failed.
            _record_failed_slice(settings, run_id, cfg.table_name, piece, slice_started, exc, loader.attempts)
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
                settings, run_id, cfg.table_name, piece, slice_started, refused, loader.attempts
            )
            raise refused from exc
        except RefreshError as exc:
            _record_failed_slice(settings, run_id, cfg.table_name, piece, slice_started, exc, loader.attempts)
            raise
        rec.slices_done += 1
        rec.rows_read += stats.rows
        rec.bytes_read += stats.bytes
        rec.rows_inserted += inserted
        rec.rows_deleted += deleted
        audit.heartbeat(conn, settings.control_schema, run_id)
    if bad_slices:
        raise BadSourceValueError(
            f"{len(bad_slices)} slice(s) not loaded, the others were: " + " | ".join(bad_slices)
        )


@dataclass
class _SliceLoader:
    """One slice: read from BigQuery and apply atomically; `attempt` is safe to retry."""

    settings: Settings
    clients: BigQueryClients
    cfg: TableConfig
    run_id: UUID
    schema: str
    key: str
    columns: list[ColumnMapping]
    cursor: ColumnMapping | None
    cursor_src: SourceColumn | None
    piece: Slice
    started_at: datetime
    attempts: int = 0

    def attempt(self) -> tuple[int, int, ReadStats]:
        self.attempts += 1
        stats = ReadStats()
        where = row_restriction(self.cursor_src, self.piece) if self.cursor_src else ""

        def record(c: psycopg.Connection, inserted: int, deleted: int) -> None:
            # Last before the commit: the fence (see audit.check_lock).
            audit.check_lock(
                c, self.run_id, f"before committing {self.cfg.table_name} slice {self.piece.label}"
            )
            audit.write_slice_audit(
                c,
                self.settings.control_schema,
                run_id=self.run_id,
                table=self.cfg.table_name,
                slice_start=self.piece.start_ts,
                slice_end=self.piece.end_ts,
                status="success",
                rows_read=stats.rows,
                rows_inserted=inserted,
                rows_deleted=deleted,
                bytes_read=stats.bytes,
                started_at=self.started_at,
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
        return res.rows_inserted, res.rows_deleted, stats


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
            audit.write_slice_audit(
                c,
                settings.control_schema,
                run_id=run_id,
                table=table,
                slice_start=piece.start_ts,
                slice_end=piece.end_ts,
                status="failed",
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
