"""Checkpoints (`checkpoints`): one row per committed slice, written in the slice's transaction.

A table's checkpoints give its high-water mark (where the next incremental run starts) and the
slices an interrupted attempt already committed (which a resumed attempt skips). Shadow tables
checkpoint under their own key (`shadow:<table>`). Full-replace tables checkpoint one slice, the
whole table: '-infinity'..'infinity' here and in `slice_refreshes` (no session time zone shifts
it, no source value equals it), None in Python (flows.core.planning.Slice); the high-water mark
ignores it. The helpers below are the one place that maps the two.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from uuid import UUID

import psycopg
from psycopg import sql

from flows.core.db import qualified

# A slice bound as a query parameter: a datetime, or None for the whole table's.
START_PARAM = sql.SQL("coalesce(%s::timestamptz, '-infinity')")
END_PARAM = sql.SQL("coalesce(%s::timestamptz, 'infinity')")


def bound(column: sql.Composable) -> sql.Composable:
    """A slice bound column as Python reads it: None for the whole table's."""
    return sql.SQL("case when isfinite({c}) then {c} end").format(c=column)


def dated(column: sql.Composable) -> sql.Composable:
    """Whether a slice start column is a dated slice's (not the whole table's)."""
    return sql.SQL("isfinite({})").format(column)


def record(
    conn: psycopg.Connection,
    schema: str,
    key: str,
    slice_start: datetime | None,
    slice_end: datetime | None,
    run_id: UUID,
    rows_loaded: int,
) -> None:
    """Insert or replace the slice's checkpoint; call inside the slice's transaction."""
    conn.execute(
        sql.SQL(
            "insert into {cp} (table_name, slice_start, slice_end, run_id, rows_loaded) "
            "values (%s, {start}, {end}, %s, %s) on conflict (table_name, slice_start) do update set "
            "slice_end = excluded.slice_end, run_id = excluded.run_id, "
            "rows_loaded = excluded.rows_loaded, committed_at = now()"
        ).format(cp=qualified(schema, "checkpoints"), start=START_PARAM, end=END_PARAM),
        (key, slice_start, slice_end, run_id, rows_loaded),
    )


def high_water(conn: psycopg.Connection, schema: str, key: str, table: str) -> date | None:
    """The newest slice end among slices last written by a run in which the table succeeded.

    Slices of an unfinished attempt do not count: they may have committed out of order (Dask,
    or a bad slice among good ones), so their newest end says nothing of the gaps below it.
    Those slices are skipped one by one instead (committed_since_last_success).
    """
    row = conn.execute(
        sql.SQL(
            "select max(c.slice_end) from {cp} c where c.table_name = %s and {dated} "
            "and exists (select 1 from {tr} t where t.run_id = c.run_id and t.table_name = %s "
            "and t.status = 'success')"
        ).format(
            cp=qualified(schema, "checkpoints"),
            dated=dated(sql.Identifier("c", "slice_start")),
            tr=qualified(schema, "table_refreshes"),
        ),
        (key, table),
    ).fetchone()
    return row[0].astimezone(UTC).date() if row and row[0] else None


def committed_since_last_success(
    conn: psycopg.Connection, schema: str, key: str, table: str, max_age_hours: int
) -> set[date]:
    """Dated slices an interrupted attempt already committed after the table's last success
    (a whole-table slice is always loaded again: it replaces the table in one transaction)."""
    rows = conn.execute(
        sql.SQL(
            "select c.slice_start from {cp} c where c.table_name = %s and {dated} "
            "and c.committed_at > now() - make_interval(hours => %s) "
            "and c.committed_at > coalesce((select max(finished_at) from {tr} "
            "  where table_name = %s and status = 'success'), '-infinity')"
        ).format(
            cp=qualified(schema, "checkpoints"),
            dated=dated(sql.Identifier("c", "slice_start")),
            tr=qualified(schema, "table_refreshes"),
        ),
        (key, max_age_hours, table),
    ).fetchall()
    return {r[0].astimezone(UTC).date() for r in rows}


def committed_by_same_backfill(
    conn: psycopg.Connection, schema: str, key: str, table: str, run_id: UUID
) -> set[date]:
    """Dated slices committed by earlier attempts of the backfill run `run_id` repeats (a
    whole-table slice is always loaded again, as above): runs with the
    same tables and date range (their recorded params; not dry runs), started before it and
    after the last of them in which the table succeeded. No age limit: the range was asked for
    again explicitly, and a year-long backfill must not start over because it died overnight."""
    runs = qualified(schema, "refresh_runs")
    rows = conn.execute(
        sql.SQL(
            "with cur as (select params, started_at from {r} where run_id = %(run)s), "
            "attempts as ("
            "  select r.run_id, r.started_at from {r} r, cur "
            "  where r.run_id <> %(run)s and r.started_at < cur.started_at "
            "  and r.params -> 'tables' = cur.params -> 'tables' "
            "  and r.params -> 'start_date' = cur.params -> 'start_date' "
            "  and r.params -> 'end_date' = cur.params -> 'end_date' "
            "  and coalesce(r.params ->> 'dry_run', 'false') = 'false' "
            "  and coalesce(r.params ->> 'full_refresh', 'false') = 'false'), "
            "done as ("
            "  select coalesce(max(a.started_at), '-infinity') as at from attempts a "
            "  join {tr} t on t.run_id = a.run_id and t.table_name = %(table)s and t.status = 'success') "
            "select c.slice_start from {cp} c join attempts a on a.run_id = c.run_id, done "
            "where c.table_name = %(key)s and a.started_at > done.at and {dated}"
        ).format(
            r=runs,
            tr=qualified(schema, "table_refreshes"),
            cp=qualified(schema, "checkpoints"),
            dated=dated(sql.Identifier("c", "slice_start")),
        ),
        {"run": run_id, "table": table, "key": key},
    ).fetchall()
    return {r[0].astimezone(UTC).date() for r in rows}


def expire(conn: psycopg.Connection, schema: str, retention_days: int) -> int:
    """Delete checkpoints committed more than `retention_days` ago; returns how many.

    The checkpoint with the newest slice end of each table is always kept: it is the table's
    high-water mark, and without it the next run would reload the whole table. Sliced and
    full-replace checkpoints are kept apart, as the high-water mark only reads sliced ones.
    """
    cur = conn.execute(
        sql.SQL(
            "delete from {cp} c where c.committed_at < now() - make_interval(days => %s) "
            "and (c.table_name, c.slice_start) not in ("
            "  select distinct on (table_name, {dated}) table_name, slice_start "
            "  from {cp} order by table_name, {dated}, slice_end desc, committed_at desc)"
        ).format(cp=qualified(schema, "checkpoints"), dated=dated(sql.Identifier("slice_start"))),
        (retention_days,),
    )
    return cur.rowcount
