"""Bisection: the rows behind a period whose fingerprints differ.

A period that differs is bisected by row-hash prefix (two hex digits per level, one GROUP BY
per side per level, restricted to the buckets that still differ) until each differing bucket
is small enough to fetch; the fetched rows are paired by the table's key columns
(`custom_params.key_columns` in the registry) into different values (with the columns that
differ), rows missing in Postgres and rows extra in Postgres.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from flows.control.fingerprints import EMPTY, Fingerprint
from flows.core.identifiers import bq_table_path
from flows.core.planning import Slice
from flows.core.table_config import TableConfig
from flows.engine.bigquery import BigQueryClients, classify
from flows.engine.extract import row_restriction
from flows.engine.fingerprinting import bq_fingerprint, pg_where
from flows.engine.normal_form import (
    BQ_SUMS,
    Col,
    bq_row_hash,
    bq_text,
    declared,
    pg_number,
    pg_row_hash,
    pg_text,
)

# A differing bucket is fetched row by row once neither side has more rows than this.
FETCH_ROWS = 2_000
# At most this many differing rows are reported per period (the counts are always exact).
MAX_REPORTED = 200
_HEX = re.compile(r"^[0-9a-f]{1,32}$")


@dataclass
class Differences:
    missing_in_postgres: list[dict[str, Any]] = field(default_factory=list)
    extra_in_postgres: list[dict[str, Any]] = field(default_factory=list)
    different: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing_in_postgres": self.missing_in_postgres,
            "extra_in_postgres": self.extra_in_postgres,
            "different": self.different,
            "truncated": self.truncated,
        }


def _bq_buckets(
    clients: BigQueryClients, path: str, cols: list[Col], where: str, k: int, prefixes: list[str]
) -> dict[str, Fingerprint]:
    within = _bq_prefix_filter(k - 2, prefixes)
    query = (
        f"select p, count(*), {BQ_SUMS} "
        f"from (select substr(h, 1, {k}) as p, h from (select {bq_row_hash(cols)} as h from {path}"
        + (f" where {where}" if where else "")
        + f"){within}) group by p"
    )
    rows = clients.rest.query(query, job_config=clients.query_config()).result()
    return {r[0]: bq_fingerprint(r[1], r[2], r[3]) for r in rows}


def _bq_prefix_filter(k: int, prefixes: list[str]) -> str:
    if not prefixes:
        return ""
    for p in prefixes:  # our own hex strings; checked before they go into SQL
        if not _HEX.match(p):
            raise ValueError(f"not a hash prefix: {p!r}")
    return f" where substr(h, 1, {k}) in (" + ", ".join(f"'{p}'" for p in prefixes) + ")"


def _pg_buckets(
    conn: psycopg.Connection,
    rel: sql.Composable,
    cols: list[Col],
    cursor: Col | None,
    window: Slice | None,
    k: int,
    prefixes: list[str],
) -> dict[str, Fingerprint]:
    where, params = pg_where(cursor, window)
    within = sql.SQL(" where substr(h, 1, %s) = any(%s)") if prefixes else sql.SQL("")
    # `offset 0` keeps the subquery whole, so each row is hashed once (see fingerprint_pg).
    query = sql.SQL(
        "select substr(h, 1, %s) as p, count(*), sum({n}) "
        "from (select {h} as h from {t}{where} offset 0) s{within} group by p"
    ).format(n=pg_number(sql.SQL("h")), h=pg_row_hash(cols), t=rel, where=where, within=within)
    args: list[Any] = [k, *params] + ([k - 2, prefixes] if prefixes else [])
    return {p: Fingerprint(int(n), int(x)) for p, n, x in conn.execute(query, args).fetchall()}


def _bq_rows(
    clients: BigQueryClients, path: str, cols: list[Col], where: str, k: int, prefixes: list[str]
) -> list[tuple[str, ...]]:
    texts = ", ".join(f"{bq_text(c)} as c{i}" for i, c in enumerate(cols))
    query = (
        f"select * from (select {bq_row_hash(cols)} as h, {texts} from {path}"
        + (f" where {where}" if where else "")
        + f"){_bq_prefix_filter(k, prefixes)}"
    )
    return [tuple(r.values()) for r in clients.rest.query(query, job_config=clients.query_config()).result()]


def _pg_rows(
    conn: psycopg.Connection,
    rel: sql.Composable,
    cols: list[Col],
    cursor: Col | None,
    window: Slice | None,
    k: int,
    prefixes: list[str],
) -> list[tuple[str, ...]]:
    where, params = pg_where(cursor, window)
    texts = sql.SQL(", ").join(
        sql.SQL("{} as {}").format(pg_text(c), sql.Identifier(f"c{i}")) for i, c in enumerate(cols)
    )
    query = sql.SQL(
        "select * from (select {h} as h, {texts} from {t}{where} offset 0) s where substr(h, 1, %s) = any(%s)"
    ).format(h=pg_row_hash(cols), texts=texts, t=rel, where=where)
    return [tuple(r) for r in conn.execute(query, [*params, k, prefixes]).fetchall()]


def _display(col: Col, text: str | None) -> Any:
    """A normal-form value made readable for the report (timestamps back to ISO)."""
    if text is None:
        return None
    if col.kind in ("TIMESTAMP", "DATETIME"):
        return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(text))).isoformat()
    return text


def _pair(
    cols: list[Col], key_idx: list[int], bq_only: list[tuple[str, ...]], pg_only: list[tuple[str, ...]]
) -> Differences:
    diff = Differences()

    def key(row: tuple[str, ...]) -> dict[str, Any]:
        idx = key_idx or range(len(cols))
        return {cols[i].name: _display(cols[i], row[i + 1]) for i in idx}

    pg_by_key: dict[tuple[Any, ...], list[tuple[str, ...]]] = {}
    if key_idx:
        for row in pg_only:
            pg_by_key.setdefault(tuple(row[i + 1] for i in key_idx), []).append(row)
    for row in bq_only:
        match = pg_by_key.get(tuple(row[i + 1] for i in key_idx)) if key_idx else None
        if match:
            other = match.pop()
            changed = [i for i in range(len(cols)) if row[i + 1] != other[i + 1]]
            diff.different.append(
                {
                    "key": key(row),
                    "columns": [cols[i].name for i in changed],
                    "bigquery": {cols[i].name: _display(cols[i], row[i + 1]) for i in changed},
                    "postgres": {cols[i].name: _display(cols[i], other[i + 1]) for i in changed},
                }
            )
        else:
            diff.missing_in_postgres.append({"key": key(row)})
    leftover = [r for rows in pg_by_key.values() for r in rows] if key_idx else pg_only
    diff.extra_in_postgres.extend({"key": key(r)} for r in leftover)
    return diff


def bisect(
    clients: BigQueryClients,
    conn: psycopg.Connection,
    cfg: TableConfig,
    schema: str,
    cols: list[Col],
    cursor: Col | None,
    period: Slice | None,
    key_columns: list[str],
) -> Differences:
    """Rows that differ in one period: hash-prefix buckets, narrowed until small, then fetched."""
    path = bq_table_path(clients.project, clients.dataset, cfg.source_table)
    rel = sql.Identifier(schema, cfg.table_name)
    where = row_restriction(cursor.source, period) if cursor and period and period.start else ""
    key_idx = [i for i, c in enumerate(cols) if c.source.name in key_columns or c.name in key_columns]
    pg_cols = declared(conn, schema, cfg.table_name, cols)
    fetch: list[str] = []
    prefixes: list[str] = []
    k = 2
    try:
        while True:
            bq = _bq_buckets(clients, path, cols, where, k, prefixes)
            pg = _pg_buckets(conn, rel, pg_cols, cursor, period, k, prefixes)
            differing = sorted(p for p in set(bq) | set(pg) if bq.get(p, EMPTY) != pg.get(p, EMPTY))
            small = [p for p in differing if max(bq.get(p, EMPTY).rows, pg.get(p, EMPTY).rows) <= FETCH_ROWS]
            fetch += small
            prefixes = [p for p in differing if p not in small]
            if not prefixes or k >= 16:
                fetch += prefixes  # k = 16: identical 64-bit prefixes, duplicates; fetch anyway
                break
            k += 2
        by_len: dict[int, list[str]] = {}
        for p in fetch:
            by_len.setdefault(len(p), []).append(p)
        bq_rows: list[tuple[str, ...]] = []
        pg_rows: list[tuple[str, ...]] = []
        for n, ps in by_len.items():
            bq_rows += _bq_rows(clients, path, cols, where, n, ps)
            pg_rows += _pg_rows(conn, rel, pg_cols, cursor, period, n, ps)
    except psycopg.Error:
        raise  # Postgres errors go up as they are; only BigQuery's are classified
    except Exception as exc:
        raise classify(exc, f"{cfg.table_name}: bisecting a differing period") from exc
    bq_count, pg_count = Counter(bq_rows), Counter(pg_rows)
    bq_only = list((bq_count - pg_count).elements())
    pg_only = list((pg_count - bq_count).elements())
    truncated = len(bq_only) + len(pg_only) > 2 * MAX_REPORTED
    diff = _pair(cols, key_idx, sorted(bq_only)[: 2 * MAX_REPORTED], sorted(pg_only)[: 2 * MAX_REPORTED])
    diff.truncated = truncated
    return diff
