"""Audit records: runs, per-table and per-slice results, and one-refresh-at-a-time locking."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg import sql

from flows.db import REFRESH_LOCK_KEY, connect
from flows.errors import TerminalError
from flows.settings import Settings


class RefreshBusyError(TerminalError):
    """Another refresh holds the lock."""


def _t(schema: str, name: str) -> sql.Composable:
    return sql.Identifier(schema, name)


@contextlib.contextmanager
def refresh_lock(settings: Settings, wait_s: float = 0.0) -> Iterator[psycopg.Connection]:
    """Hold the refresh advisory lock on a dedicated connection for the whole run.

    With wait_s > 0 a second run waits that long for the first one; otherwise it fails at once.
    The lock dies with the session, so a killed process never leaves it behind.
    """
    conn = connect(settings, autocommit=True)
    try:
        if wait_s > 0:
            conn.execute("select set_config('lock_timeout', %s, false)", (f"{int(wait_s * 1000)}ms",))
            try:
                conn.execute("select pg_advisory_lock(%s)", (REFRESH_LOCK_KEY,))
            except psycopg.errors.LockNotAvailable as exc:
                raise RefreshBusyError(f"another refresh still held the lock after {wait_s:.0f}s") from exc
        else:
            got = conn.execute("select pg_try_advisory_lock(%s)", (REFRESH_LOCK_KEY,)).fetchone()
            if not got or not got[0]:
                raise RefreshBusyError(
                    "another refresh is running (advisory lock held): wait for it, or see `refresh status`"
                )
        yield conn
    finally:
        conn.close()


def mark_abandoned(conn: psycopg.Connection, schema: str) -> int:
    """Runs left `running` whose process is gone become `abandoned`.

    Only called while holding the refresh lock, so no live run can be `running` at that point:
    every `running` row belongs to a process that died without finishing.
    """
    cur = conn.execute(
        sql.SQL(
            "update {r} set status = 'abandoned', finished_at = now(), "
            "message = coalesce(message, '') || 'process ended without finishing (pid ' || "
            "coalesce(pid::text, '?') || ' on ' || coalesce(hostname, '?') || ')' "
            "where status = 'running'"
        ).format(r=_t(schema, "refresh_runs"))
    )
    conn.execute(
        sql.SQL(
            "update {t} set status = 'failed', finished_at = now(), "
            "error = coalesce(error, 'run abandoned') where status = 'running' "
            "and run_id in (select run_id from {r} where status = 'abandoned')"
        ).format(t=_t(schema, "table_refreshes"), r=_t(schema, "refresh_runs"))
    )
    return cur.rowcount


@dataclass
class RunRecord:
    run_id: UUID
    started_at: datetime


def start_run(
    conn: psycopg.Connection, schema: str, *, flow_run_id: UUID | None, trigger: str, params: dict[str, Any]
) -> RunRecord:
    run_id = uuid4()
    row = conn.execute(
        sql.SQL(
            "insert into {r} (run_id, flow_run_id, status, trigger, params, pid, hostname) "
            "values (%s, %s, 'running', %s, %s, %s, %s) returning started_at"
        ).format(r=_t(schema, "refresh_runs")),
        (run_id, flow_run_id, trigger, json.dumps(params, default=str), os.getpid(), socket.gethostname()),
    ).fetchone()
    assert row is not None
    return RunRecord(run_id, row[0])


def heartbeat(conn: psycopg.Connection, schema: str, run_id: UUID) -> None:
    conn.execute(
        sql.SQL("update {r} set heartbeat_at = now() where run_id = %s").format(r=_t(schema, "refresh_runs")),
        (run_id,),
    )


def finish_run(
    conn: psycopg.Connection,
    schema: str,
    run_id: UUID,
    *,
    status: str,
    message: str,
    tables_planned: int,
    tables_succeeded: int,
    tables_failed: int,
    rows_read: int,
    rows_inserted: int,
    dbt_invocation_id: str | None,
) -> None:
    conn.execute(
        sql.SQL(
            "update {r} set status = %s, finished_at = now(), heartbeat_at = now(), message = %s, "
            "tables_planned = %s, tables_succeeded = %s, tables_failed = %s, rows_read = %s, "
            "rows_inserted = %s, dbt_invocation_id = %s where run_id = %s"
        ).format(r=_t(schema, "refresh_runs")),
        (
            status,
            message,
            tables_planned,
            tables_succeeded,
            tables_failed,
            rows_read,
            rows_inserted,
            dbt_invocation_id,
            run_id,
        ),
    )


@dataclass
class TableAudit:
    """Counters of one table refresh, written at start and at the end."""

    run_id: UUID
    table_name: str
    mode: str
    write_strategy: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: str = "running"
    window_start: datetime | None = None
    window_end: datetime | None = None
    slices_planned: int = 0
    slices_done: int = 0
    slices_skipped: int = 0
    rows_read: int = 0
    rows_inserted: int = 0
    rows_deleted: int = 0
    bytes_read: int = 0
    error: str | None = None
    finished_at: datetime | None = None

    @property
    def duration_s(self) -> float:
        end = self.finished_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()

    @property
    def rows_per_second(self) -> float | None:
        d = self.duration_s
        return round(self.rows_read / d, 1) if d > 0 and self.rows_read else None


def write_table_audit(conn: psycopg.Connection, schema: str, a: TableAudit) -> None:
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
        ).format(t=_t(schema, "table_refreshes")),
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
    slice_start: datetime,
    slice_end: datetime,
    status: str,
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
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(s=_t(schema, "slice_refreshes")),
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
