"""Reads the CLI makes of the control schema beyond what the API shares with it
(flows.control.history read_history and table_status): whether the schema holds a table yet, and the live
progress of the refresh running now."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control.statuses import TableStatus
from flows.core.db import qualified


def has_table(conn: psycopg.Connection, schema: str, table: str) -> bool:
    """True once the control schema holds `table` (a database no refresh or migration has
    touched yet has none)."""
    row = conn.execute("select to_regclass(%s)", (qualified(schema, table).as_string(conn),)).fetchone()
    return row is not None and row[0] is not None


@dataclass(frozen=True)
class TableProgress:
    table_name: str
    status: str
    slices: int  # slices committed so far
    rows_inserted: int

    @property
    def running(self) -> bool:
        return self.status == TableStatus.RUNNING


@dataclass(frozen=True)
class RunProgress:
    run_id: UUID
    tables: list[TableProgress]  # by table name; empty while the run is still planning


def run_progress(conn: psycopg.Connection, schema: str, since: datetime) -> RunProgress | None:
    """The newest run still running that started at or after `since`, with each of its tables'
    slices and rows so far; None when there is none (yet)."""
    run = conn.execute(
        sql.SQL(
            "select run_id from {} where status = 'running' and started_at >= %s "
            "order by started_at desc limit 1"
        ).format(qualified(schema, "refresh_runs")),
        (since,),
    ).fetchone()
    if run is None:
        return None
    rows = conn.execute(
        sql.SQL(
            "select t.table_name, t.status, count(s.id), coalesce(sum(s.rows_inserted), 0) "
            "from {t} t left join {s} s on s.run_id = t.run_id and s.table_name = t.table_name "
            "where t.run_id = %s group by t.table_name, t.status order by t.table_name"
        ).format(t=qualified(schema, "table_refreshes"), s=qualified(schema, "slice_refreshes")),
        (run[0],),
    ).fetchall()
    return RunProgress(
        run_id=run[0],
        tables=[TableProgress(name, status, int(slices), int(rows)) for name, status, slices, rows in rows],
    )
