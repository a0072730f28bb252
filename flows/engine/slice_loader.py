"""One slice of a table: read from BigQuery and applied in one Postgres transaction, retried.

`SliceLoader` is the slice's job: it runs in the table's thread, or on a Dask worker
(flows.engine.scale_out), which is why it carries plain values and no connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from uuid import UUID

import psycopg

from flows.control import retries, runs, tables
from flows.control.statuses import SliceStatus
from flows.core import retry
from flows.core.db import connect
from flows.core.planning import Slice
from flows.core.redact import error_text
from flows.core.settings import Settings
from flows.core.table_config import TableConfig
from flows.core.type_mapping import ColumnMapping
from flows.engine import change_detection
from flows.engine.bigquery import BigQueryClients
from flows.engine.extract import ReadStats, SourceColumn, read_slice, row_restriction
from flows.engine.load import apply_slice

log = logging.getLogger(__name__)


@dataclass
class SliceLoader:
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


def record_failed_slice(
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
