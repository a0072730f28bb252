"""Fingerprints of a table: per day, its row count and the sum of its row numbers (normal_form).

Each engine hashes every row's normal form and sums the row numbers per day; only those
per-day aggregates travel, so nothing but a few numbers per day leaves either engine when the
two sides agree. Days are summed into periods (the table's slice size; one period for
full_replace tables) in Python, so the same fingerprints serve any period: validation compares
them per period, change detection per slice. The values (Fingerprint, PlanFingerprints) live
in flows.control.fingerprints, which stores them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import sql

from flows.control.fingerprints import EMPTY, Fingerprint
from flows.core.identifiers import bq_quote, bq_table_path
from flows.core.planning import Slice, align, to_ts
from flows.core.table_config import SliceSize, TableConfig, WriteStrategy
from flows.engine.bigquery import BigQueryClients, classify
from flows.engine.extract import SourceColumn, SourceTable, row_restriction
from flows.engine.normal_form import BQ_SUMS, Col, bq_row_hash, declared, pg_number, pg_row_hash


def _bq_day(col: SourceColumn) -> str:
    q = bq_quote(col.name)
    return q if col.field_type.upper() == "DATE" else f"date({q})"


def pg_day(col: Col) -> sql.Composable:
    """Postgres expression: the UTC day of the cursor column (a period's days are UTC days)."""
    q = sql.Identifier(col.name)
    if col.kind == "TIMESTAMP":
        return sql.SQL("({} at time zone 'UTC')::date").format(q)
    return sql.SQL("{}::date").format(q)


def _pg_bounds(col: Col, s: Slice) -> list[Any]:
    assert s.start is not None and s.end is not None
    if col.kind == "DATE":
        return [s.start, s.end]
    if col.kind == "TIMESTAMP":
        return [to_ts(s.start), to_ts(s.end)]
    return [to_ts(s.start).replace(tzinfo=None), to_ts(s.end).replace(tzinfo=None)]


def bq_fingerprint(n: Any, hi: Any, lo: Any) -> Fingerprint:
    """A BigQuery row (count, BQ_SUMS' two sums) as a fingerprint."""
    return Fingerprint(int(n), (int(hi or 0) << 32) + int(lo or 0))


@dataclass
class QueryStats:
    """BigQuery bytes processed by the fingerprint queries (what validation adds to a run), and
    BigQuery's start time of the first one (change detection's `source_as_of`)."""

    bytes: int = 0
    started_at: datetime | None = None


def signature(cols: list[Col], cursor: Col | None, size: SliceSize | None) -> str:
    """What a fingerprint was computed with: the row's normal form, the day column, the period."""
    text = "|".join([bq_row_hash(cols), cursor.source.name if cursor else "", size.value if size else ""])
    return hashlib.md5(text.encode()).hexdigest()


def cursor_of(cfg: TableConfig, source: SourceTable, cols: list[Col]) -> tuple[Col | None, SliceSize | None]:
    """The cursor column of a sliced table and its slice size; (None, None) for a whole table."""
    if cfg.write_strategy is not WriteStrategy.SLICE_REPLACE or not cfg.cursor_column:
        return None, None
    src = source.column(cfg.cursor_column)
    return next(c for c in cols if c.source.name == src.name), cfg.slice_size


def fingerprint_bq_sql(
    clients: BigQueryClients, source_table: str, cols: list[Col], cursor: Col | None, window: Slice | None
) -> str:
    """The query of `fingerprint_bq`: one row per day (d, n, hi, lo)."""
    path = bq_table_path(clients.project, clients.dataset, source_table)
    day = _bq_day(cursor.source) if cursor else "cast(null as date)"
    where = row_restriction(cursor.source, window) if cursor and window else ""
    # The emulator's SQL translation loses precedence inside nested calls, so each step is a
    # column of its own subquery (DuckDB computes the hash once for both sums).
    return (
        f"select d, count(*) as n, {BQ_SUMS} "
        f"from (select {day} as d, {bq_row_hash(cols)} as h from {path}"
        + (f" where {where}" if where else "")
        + ") group by d"
    )


def fingerprint_bq(
    clients: BigQueryClients,
    source_table: str,
    cols: list[Col],
    cursor: Col | None,
    window: Slice | None,
    stats: QueryStats | None = None,
    what: str = "validation checksums",
) -> dict[date | None, Fingerprint]:
    """Per-day (or one `None` key without a cursor) row count and checksum, inside BigQuery."""
    query = fingerprint_bq_sql(clients, source_table, cols, cursor, window)
    try:
        job = clients.rest.query(query, job_config=clients.query_config())
        rows = job.result()
        if stats is not None:
            stats.bytes += int(job.total_bytes_processed or 0)
            if stats.started_at is None:
                stats.started_at = job.started
        return {r[0]: bq_fingerprint(r[1], r[2], r[3]) for r in rows}
    except Exception as exc:
        raise classify(exc, f"{source_table}: {what}") from exc


def estimate_fingerprint_bytes(
    clients: BigQueryClients, source_table: str, cols: list[Col], cursor: Col | None, window: Slice | None
) -> int:
    """BigQuery's dry-run estimate of the bytes `fingerprint_bq` processes (bills)."""
    query = fingerprint_bq_sql(clients, source_table, cols, cursor, window)
    return clients.dry_run_bytes(query, f"{source_table}: dry-run estimate of the fingerprint query")


def fingerprint_pg(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    cols: list[Col],
    cursor: Col | None,
    window: Slice | None,
) -> dict[date | None, Fingerprint]:
    """The same per-day fingerprints of the raw table, inside Postgres.

    The hash appears once in the query: Postgres copies a subquery's expression into each
    place that uses it, so reading `h` twice would hash every row twice. One aggregate over
    the whole table, run by parallel workers when the planner chooses to.
    """
    day = pg_day(cursor) if cursor else sql.SQL("null::date")
    where, params = pg_where(cursor, window)
    h = pg_row_hash(declared(conn, schema, table, cols))
    query = sql.SQL("select {day}, count(*), sum({n}) from {t}{where} group by 1").format(
        day=day, n=pg_number(h), t=sql.Identifier(schema, table), where=where
    )
    return {d: Fingerprint(int(n), int(s or 0)) for d, n, s in conn.execute(query, params).fetchall()}


def pg_where(cursor: Col | None, window: Slice | None) -> tuple[sql.Composable, list[Any]]:
    """The WHERE clause and parameters that keep a window's rows (none for a whole table)."""
    if cursor is None or window is None or window.start is None:
        return sql.SQL(""), []
    return (
        sql.SQL(" where {c} >= %s and {c} < %s").format(c=sql.Identifier(cursor.name)),
        _pg_bounds(cursor, window),
    )


def by_period(days: dict[date | None, Fingerprint], size: SliceSize | None) -> dict[date | None, Fingerprint]:
    """Sum per-day fingerprints into periods keyed by their first day (None: whole table)."""
    out: dict[date | None, Fingerprint] = {}
    for d, fp in days.items():
        key = None if d is None or size is None else align(d, size)
        out[key] = out.get(key, EMPTY) + fp
    return out
