"""Run history and per-table status: the reads behind `refresh status`, `refresh history` and the API."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from flows.control.runs import RunStatus, lock_held_for
from flows.control.statuses import TableStatus
from flows.core.db import qualified
from flows.core.errors import ConfigError
from flows.core.identifiers import validate_pg_identifier

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
        if self.table is not None:
            # Registry names are Postgres identifiers; anything else (a NUL byte, which Postgres
            # refuses in text) is bad input, named, rather than a database error.
            validate_pg_identifier(self.table, "table name")
        allowed = [s.value for s in (TableStatus if self.table else RunStatus)]
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
        # Any text reaches here (a query parameter): every shape other than the one encode()
        # writes is refused by name, never left to fail deeper.
        try:
            value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
                raise ValueError("not [started_at, run_id]")
            at = datetime.fromisoformat(value[0])
            if at.tzinfo is None:
                raise ValueError("no time zone")
            return cls(at, UUID(value[1]))
        except (ValueError, RecursionError) as exc:
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
        ).format(t=qualified(schema, "table_refreshes"))
        prefix = sql.SQL("t.")
    else:
        source = sql.SQL(
            "select r.run_id, r.flow_run_id, case when r.status = 'running' and not {held} "
            "then 'running (lock lost: no process holds the refresh lock for it)' "
            "else r.status end as status, r.trigger, r.started_at, r.finished_at, "
            "extract(epoch from r.finished_at - r.started_at) as duration_s, r.tables_planned, "
            "r.tables_failed, r.rows_read, r.rows_inserted, r.message from {r} r"
        ).format(r=qualified(schema, "refresh_runs"), held=lock_held_for(sql.SQL("r.run_id")))
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


def _page_query(schema: str, q: HistoryQuery, filtered: sql.Composed) -> sql.Composed:
    """Up to page_size + 1 rows of `filtered`, newest first, from an offset (parameters: the
    filter's, then limit and offset)."""
    # run_id breaks ties between equal start times: the order is total, so pages are stable.
    newest_first = sql.SQL(" order by started_at desc, run_id desc")
    query = filtered + newest_first + sql.SQL(" limit %s offset %s")
    if q.table:
        # The run's flow_run_id joined after paging: an offset skips index entries, not joins.
        query = (
            sql.SQL("select p.*, r.flow_run_id from ({}) p left join {} r using (run_id)").format(
                query, qualified(schema, "refresh_runs")
            )
            + newest_first
        )
    return query


def _count_query(filtered: sql.Composed) -> sql.Composed:
    return sql.SQL("select count(*) from ({}) f").format(filtered)


def _cut(rows: list[dict[str, Any]], page_size: int) -> tuple[list[dict[str, Any]], str | None]:
    """The page (page_size + 1 rows were asked for) and the cursor after it if more follow."""
    if len(rows) <= page_size:
        return rows, None
    rows = rows[:page_size]
    return rows, HistoryCursor(rows[-1]["started_at"], rows[-1]["run_id"]).encode()


def _fetch_page(
    conn: psycopg.Connection,
    schema: str,
    q: HistoryQuery,
    filtered: sql.Composed,
    params: list[Any],
    offset: int = 0,
) -> tuple[list[dict[str, Any]], str | None]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_page_query(schema, q, filtered), [*params, q.page_size + 1, offset])
        return _cut(cur.fetchall(), q.page_size)


def read_history(conn: psycopg.Connection, schema: str, q: HistoryQuery) -> HistoryPage:
    """One page of runs (or of one table's refreshes), newest first, with the total count."""
    filtered, params = _history_source(schema, q)
    total_row = conn.execute(_count_query(filtered), params).fetchone()
    rows, next_cursor = _fetch_page(conn, schema, q, filtered, params, (q.page - 1) * q.page_size)
    return HistoryPage(total=int(total_row[0]) if total_row else 0, rows=rows, next_cursor=next_cursor)


def history_after(
    conn: psycopg.Connection, schema: str, q: HistoryQuery, cursor: HistoryCursor
) -> tuple[list[dict[str, Any]], str | None]:
    """The page after `cursor` and the cursor after it: keyset paging, an index range scan
    with neither offset nor count, so every page costs what the first one does."""
    filtered, params = _history_source(schema, q, after=cursor)
    return _fetch_page(conn, schema, q, filtered, params)


async def read_history_async(conn: psycopg.AsyncConnection[Any], schema: str, q: HistoryQuery) -> HistoryPage:
    """`read_history` on an async connection (the API's request path): the count and the page
    go to Postgres in one pipeline, one round trip."""
    filtered, params = _history_source(schema, q)
    offset = (q.page - 1) * q.page_size
    async with conn.cursor() as count_cur, conn.cursor(row_factory=dict_row) as cur:
        async with conn.pipeline():
            await count_cur.execute(_count_query(filtered), params)
            await cur.execute(_page_query(schema, q, filtered), [*params, q.page_size + 1, offset])
        total_row = await count_cur.fetchone()
        rows, next_cursor = _cut(await cur.fetchall(), q.page_size)
    return HistoryPage(total=int(total_row[0]) if total_row else 0, rows=rows, next_cursor=next_cursor)


async def history_after_async(
    conn: psycopg.AsyncConnection[Any], schema: str, q: HistoryQuery, cursor: HistoryCursor
) -> tuple[list[dict[str, Any]], str | None]:
    """`history_after` on an async connection."""
    filtered, params = _history_source(schema, q, after=cursor)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_page_query(schema, q, filtered), [*params, q.page_size + 1, 0])
        return _cut(await cur.fetchall(), q.page_size)


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
            ).format(c=qualified(schema, "refresh_config"), t=qualified(schema, "table_refreshes"))
        )
        return cur.fetchall()
