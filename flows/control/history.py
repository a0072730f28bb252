"""Run history and per-table status: the reads behind `refresh status`, `refresh history` and the API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from flows.control.runs import RunStatus, lock_held_for
from flows.control.tables import TableStatus
from flows.errors import ConfigError


def _t(schema: str, name: str) -> sql.Composable:
    return sql.Identifier(schema, name)


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


def read_history(conn: psycopg.Connection, schema: str, q: HistoryQuery) -> HistoryPage:
    """One page of runs (or of one table's refreshes), newest first, with the total count."""
    if q.table:
        source = sql.SQL(
            "select t.run_id, r.flow_run_id, t.table_name, t.status, t.mode, t.started_at, "
            "t.finished_at, extract(epoch from t.finished_at - t.started_at) as duration_s, "
            "t.slices_done, t.rows_read, t.rows_inserted, t.rows_deleted, t.error as message "
            # left join: every refresh has its run (foreign key), and Postgres can then drop the
            # join from the count and page through the (table_name, started_at) index.
            "from {t} t left join {r} r using (run_id)"
        ).format(t=_t(schema, "table_refreshes"), r=_t(schema, "refresh_runs"))
        prefix = sql.SQL("t.")
    else:
        source = sql.SQL(
            "select r.run_id, r.flow_run_id, case when r.status = 'running' and not {held} "
            "then 'running (lock lost: no process holds the refresh lock for it)' "
            "else r.status end as status, r.trigger, r.started_at, r.finished_at, "
            "extract(epoch from r.finished_at - r.started_at) as duration_s, r.tables_planned, "
            "r.tables_failed, r.rows_read, r.rows_inserted, r.message from {r} r"
        ).format(r=_t(schema, "refresh_runs"), held=lock_held_for(sql.SQL("r.run_id")))
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
    filtered = source + (sql.SQL(" where ") + sql.SQL(" and ").join(where) if where else sql.SQL(""))
    total_row = conn.execute(sql.SQL("select count(*) from ({}) f").format(filtered), params).fetchone()
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            filtered + sql.SQL(" order by started_at desc limit %s offset %s"),
            [*params, q.page_size, (q.page - 1) * q.page_size],
        )
        rows = cur.fetchall()
    return HistoryPage(total=int(total_row[0]) if total_row else 0, rows=rows)


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
