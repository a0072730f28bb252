"""Audit records: runs, per-table and per-slice results, and one-refresh-at-a-time locking."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from flows.db import FENCE_LOCK_KEY, REFRESH_LOCK_KEY, connect
from flows.errors import ConfigError, LockLostError, TerminalError
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
    held = False
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
                    f"another refresh is running{_describe_running(conn, settings.control_schema)}: "
                    "this run did nothing; start it again when that one ends (see `refresh status`)"
                )
        held = True
        yield conn
    finally:
        if held and not conn.broken:
            # Released before close returns: the server ends a closed session asynchronously,
            # and a run started right after this one must not find the lock still held.
            with contextlib.suppress(psycopg.Error):
                conn.execute("select pg_advisory_unlock(%s)", (REFRESH_LOCK_KEY,))
        conn.close()


def _describe_running(conn: psycopg.Connection, schema: str) -> str:
    try:
        row = conn.execute(
            sql.SQL(
                "select run_id, trigger, started_at, flow_run_id from {r} where status = 'running' "
                "order by started_at desc limit 1"
            ).format(r=_t(schema, "refresh_runs"))
        ).fetchone()
    except psycopg.Error:
        return ""
    if row is None:
        return " (advisory lock held)"
    return f" (run {row[0]}, {row[1]}, started {row[2]:%Y-%m-%d %H:%M:%S %Z}, flow run {row[3]})"


def _refresh_lock_row() -> sql.Composable:
    # Advisory locks on a bigint key show up in pg_locks as classid = high 32 bits,
    # objid = low 32 bits, objsubid = 1, scoped to the current database.
    return sql.SQL(
        "l.locktype = 'advisory' and l.granted "
        "and l.database = (select oid from pg_database where datname = current_database()) "
        "and l.classid = {hi} and l.objid = {lo} and l.objsubid = 1"
    ).format(hi=sql.Literal(REFRESH_LOCK_KEY >> 32), lo=sql.Literal(REFRESH_LOCK_KEY & 0xFFFFFFFF))


def _lock_held_elsewhere() -> sql.Composable:
    return sql.SQL("exists (select 1 from pg_locks l where {} and l.pid <> pg_backend_pid())").format(
        _refresh_lock_row()
    )


# The lock session of a run is named after it, so any session can tell whether the refresh lock
# is still held for that run: after a Postgres restart or failover it is held by nobody, or by
# a later run's session, never again by this run's.
LOCK_SESSION_PREFIX = "sqp-refresh lock "


def _lock_held_for(run_id: sql.Composable) -> sql.Composable:
    return sql.SQL(
        "exists (select 1 from pg_locks l join pg_stat_activity a on a.pid = l.pid "
        "where {row} and a.application_name = {prefix} || ({run_id})::text)"
    ).format(row=_refresh_lock_row(), prefix=sql.Literal(LOCK_SESSION_PREFIX), run_id=run_id)


def bind_lock(lock_conn: psycopg.Connection, run_id: UUID) -> None:
    """Name the lock session after the run: check_lock then recognises it."""
    lock_conn.execute("select set_config('application_name', %s, false)", (f"{LOCK_SESSION_PREFIX}{run_id}",))


def check_lock(conn: psycopg.Connection, run_id: UUID, doing: str) -> None:
    """The fence: raise LockLostError unless run_id's lock session still holds the refresh lock.

    Inside a slice transaction, call it last before the commit. It takes FENCE_LOCK_KEY shared
    until that commit, and a run taking over takes it exclusively (mark_abandoned) after it got
    the refresh lock: so a slice that passed the check has committed before the new run goes
    on, and any later check of the old run fails. No slice commits once its run lost the lock.
    """
    if not conn.autocommit:
        conn.execute("select pg_advisory_xact_lock_shared(%s)", (FENCE_LOCK_KEY,))
    row = conn.execute(sql.SQL("select {}").format(_lock_held_for(sql.Literal(str(run_id))))).fetchone()
    if not (row and row[0]):
        raise LockLostError(
            f"run {run_id} lost the refresh lock (Postgres restarted, failed over, or ended its "
            f"lock session), so another refresh may run now: stopped {doing} and wrote nothing "
            "more; run the refresh again: slices committed before are kept and it resumes after them"
        )


def refresh_running(conn: psycopg.Connection) -> bool:
    """True while another session holds the refresh lock (a refresh is in progress)."""
    row = conn.execute(sql.SQL("select {}").format(_lock_held_elsewhere())).fetchone()
    return bool(row and row[0])


def mark_abandoned(conn: psycopg.Connection, schema: str) -> int:
    """Runs left `running` by a process that died become `abandoned`; returns how many.

    A run is `running` only while its process holds the refresh lock, and the lock dies with
    the process's session. So when no other session holds the lock, every `running` row is
    left over from a dead process. The check and the update are one statement: a run that
    takes the lock meanwhile inserts its row after this statement's snapshot and is not
    touched. Safe to call from the lock holder (begin_run) and from housekeeping, which
    never takes the lock and so never makes a starting refresh fail as busy.
    """
    # The barrier of check_lock: a slice of a run that lost the lock and passed its check just
    # before commits before this; any later check fails, so no abandoned run commits again.
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (FENCE_LOCK_KEY,))
    cur = conn.execute(
        sql.SQL(
            "update {r} set status = 'abandoned', finished_at = now(), "
            "message = coalesce(message || '; ', '') || 'process ended without finishing (pid ' || "
            "coalesce(pid::text, '?') || ' on ' || coalesce(hostname, '?') || ')' "
            "where status = 'running' and not {held}"
        ).format(r=_t(schema, "refresh_runs"), held=_lock_held_elsewhere())
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
    """Insert the run's row; `conn` is the lock connection, which is bound to the run (fence)."""
    run_id = uuid4()
    bind_lock(conn, run_id)
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


RUN_STATUSES = ("running", "success", "warning", "failed", "abandoned")
TABLE_STATUSES = ("running", "success", "failed", "skipped", "planned")
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class HistoryQuery:
    """Filters for run history: whole runs, or one table's refreshes when `table` is set."""

    table: str | None = None
    status: str | None = None
    since: date | None = None
    until: date | None = None  # inclusive
    page: int = 1
    page_size: int = 20

    def __post_init__(self) -> None:
        allowed = TABLE_STATUSES if self.table else RUN_STATUSES
        if self.status is not None and self.status not in allowed:
            raise ConfigError(f"unknown status {self.status!r}: use one of {', '.join(allowed)}")
        if self.since and self.until and self.since > self.until:
            raise ConfigError(f"since {self.since} is after until {self.until}")
        if self.page < 1:
            raise ConfigError("page starts at 1")
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ConfigError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")


@dataclass
class HistoryPage:
    total: int
    rows: list[dict[str, Any]]
    # Where the next page starts (keyset), whatever way this page was asked for.
    next_cursor: str | None = None


@dataclass(frozen=True)
class HistoryCursor:
    """The last row of a page: the next one starts strictly after it in (started_at, run_id)
    order, so a page costs the same wherever it is and rows added meanwhile shift nothing."""

    started_at: datetime
    run_id: UUID

    def encode(self) -> str:
        raw = json.dumps([self.started_at.isoformat(), str(self.run_id)]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> HistoryCursor:
        try:
            started_at, run_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            at = datetime.fromisoformat(started_at)
            if at.tzinfo is None:
                raise ValueError("no time zone")
            return cls(at, UUID(run_id))
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                "cursor is not one this API gave out: pass next_cursor from the previous page unchanged"
            ) from exc


def _history_source(
    schema: str, q: HistoryQuery, after: HistoryCursor | None = None
) -> tuple[sql.Composed, list[Any]]:
    """The rows `q` filters (after `after` if given), unordered and unpaged; their parameters.
    One table's refreshes come without their run's flow_run_id: _fetch_page joins it to the
    page's rows only."""
    if q.table:
        source = sql.SQL(
            "select t.run_id, t.table_name, t.status, t.mode, t.started_at, "
            "t.finished_at, extract(epoch from t.finished_at - t.started_at) as duration_s, "
            "t.slices_done, t.rows_read, t.rows_inserted, t.rows_deleted, t.error as message "
            "from {t} t"
        ).format(t=_t(schema, "table_refreshes"))
        prefix = sql.SQL("t.")
    else:
        source = sql.SQL(
            "select r.run_id, r.flow_run_id, case when r.status = 'running' and not {held} "
            "then 'running (lock lost: no process holds the refresh lock for it)' "
            "else r.status end as status, r.trigger, r.started_at, r.finished_at, "
            "extract(epoch from r.finished_at - r.started_at) as duration_s, r.tables_planned, "
            "r.tables_failed, r.rows_read, r.rows_inserted, r.message from {r} r"
        ).format(r=_t(schema, "refresh_runs"), held=_lock_held_for(sql.SQL("r.run_id")))
        prefix = sql.SQL("r.")
    where: list[sql.Composable] = []
    params: list[Any] = []
    if q.table:
        where.append(sql.SQL("t.table_name = %s"))
        params.append(q.table)
    if q.status:
        where.append(prefix + sql.SQL("status = %s"))
        params.append(q.status)
    if q.since:
        where.append(prefix + sql.SQL("started_at >= %s"))
        params.append(datetime(q.since.year, q.since.month, q.since.day, tzinfo=UTC))
    if q.until:
        where.append(prefix + sql.SQL("started_at < %s"))
        params.append(datetime(q.until.year, q.until.month, q.until.day, tzinfo=UTC) + timedelta(days=1))
    if after:
        where.append(sql.SQL("({p}started_at, {p}run_id) < (%s, %s)").format(p=prefix))
        params += [after.started_at, after.run_id]
    filtered = source + (sql.SQL(" where ") + sql.SQL(" and ").join(where) if where else sql.SQL(""))
    return filtered, params


def _fetch_page(
    conn: psycopg.Connection,
    schema: str,
    q: HistoryQuery,
    filtered: sql.Composed,
    params: list[Any],
    offset: int = 0,
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to page_size rows, newest first, and the cursor after them if more follow."""
    page_size = q.page_size
    # run_id breaks ties between equal start times: the order is total, so pages are stable.
    newest_first = sql.SQL(" order by started_at desc, run_id desc")
    query = filtered + newest_first + sql.SQL(" limit %s offset %s")
    if q.table:
        # The run's flow_run_id joined after paging: an offset skips index entries, not joins.
        query = (
            sql.SQL("select p.*, r.flow_run_id from ({}) p left join {} r using (run_id)").format(
                query, _t(schema, "refresh_runs")
            )
            + newest_first
        )
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, [*params, page_size + 1, offset])
        rows = cur.fetchall()
    if len(rows) <= page_size:
        return rows, None
    rows = rows[:page_size]
    return rows, HistoryCursor(rows[-1]["started_at"], rows[-1]["run_id"]).encode()


def history(conn: psycopg.Connection, schema: str, q: HistoryQuery) -> HistoryPage:
    """One page of runs (or of one table's refreshes), newest first, with the total count."""
    filtered, params = _history_source(schema, q)
    total_row = conn.execute(sql.SQL("select count(*) from ({}) f").format(filtered), params).fetchone()
    rows, next_cursor = _fetch_page(conn, schema, q, filtered, params, (q.page - 1) * q.page_size)
    return HistoryPage(total=int(total_row[0]) if total_row else 0, rows=rows, next_cursor=next_cursor)


def history_after(
    conn: psycopg.Connection, schema: str, q: HistoryQuery, cursor: HistoryCursor
) -> tuple[list[dict[str, Any]], str | None]:
    """The page after `cursor` and the cursor after it: keyset paging, an index range scan
    with neither offset nor count, so every page costs what the first one does."""
    filtered, params = _history_source(schema, q, after=cursor)
    return _fetch_page(conn, schema, q, filtered, params)


def table_status(conn: psycopg.Connection, schema: str) -> list[dict[str, Any]]:
    """Per registered table: mode, next due time, latest refresh and latest success."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "select c.table_name, c.enabled, c.mode, c.priority, c.next_refresh_at, "
                "l.status as last_status, l.started_at as last_started_at, l.error as last_error, "
                "s.finished_at as last_success_at, s.rows_inserted as last_success_rows "
                "from {c} c "
                "left join lateral (select status, started_at, error from {t} t "
                "  where t.table_name = c.table_name order by started_at desc limit 1) l on true "
                "left join lateral (select finished_at, rows_inserted from {t} t "
                "  where t.table_name = c.table_name and t.status = 'success' "
                "  order by finished_at desc limit 1) s on true "
                "order by c.priority desc, c.table_name"
            ).format(c=_t(schema, "refresh_config"), t=_t(schema, "table_refreshes"))
        )
        return cur.fetchall()
