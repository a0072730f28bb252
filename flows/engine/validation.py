"""Exact BigQuery-vs-Postgres validation: per-period row counts and order-independent checksums.

Each engine computes, for every row, one text made of the row's columns in a normal form, hashes
it (md5), and sums the hashes per day as integers; only those per-day aggregates travel, so
nothing but a few numbers per day leaves either engine when the two sides agree. Days are
summed into periods (the table's slice size; one period for full_replace tables) in Python,
so the same fingerprints serve any period: `fingerprint_bq` / `fingerprint_pg` are the
reusable part (change detection reuses them per slice).

Normal form per BigQuery type (docs/operations.md has the table):
  STRING            the value itself
  INT64             decimal digits
  NUMERIC/BIGNUMERIC fixed scale: 9 (NUMERIC) / 38 (BIGNUMERIC) decimals, or the declared scale
  FLOAT64           17 significant digits in C `%.16e` form ('1.1000000000000001e+00'):
                    round-trippable, and both engines print it with the C library (BigQuery
                    FORMAT, Postgres to_char ... EEEE); 'nan', 'inf', '-inf' spelled out
  TIMESTAMP         microseconds since the epoch (UTC), DATETIME likewise read as UTC
  DATE              ISO 'YYYY-MM-DD';  TIME: microseconds since midnight
  BOOL              'true' / 'false';  BYTES: lowercase hex
  JSON, RECORD, ARRAY, GEOGRAPHY, INTERVAL, RANGE
                    NULL or not only: no text form is canonical on both engines (key order,
                    number spelling); they are listed as `unchecked_columns` in each result.
A non-NULL STRING is length-prefixed (`<chars>:<text>`), NULL is `~` (which no other normal
form is, so NULL and '' differ), fields are joined with ','; the other normal forms cannot
contain ',' so they need no prefix. The row hash is the md5 of that one text (one md5 call per
row); its first 60 bits (15 hex digits) are the row's number and the checksum is their sum:
Postgres sums them directly (its sum of bigint is exact), BigQuery as two INT64 sums of 28 and
32 bits (no overflow below 2^31 rows per day), combined as hi * 2^32 + lo. docs/benchmarks.md
("Exact validation vs count(*)") has what each choice costs.

A period that differs is bisected by row-hash prefix (two hex digits per level, one GROUP BY
per side per level, restricted to the buckets that still differ) until each differing bucket
is small enough to fetch; the fetched rows are paired by the table's key columns
(`custom_params.key_columns` in the registry) into different values (with the columns that
differ), rows missing in Postgres and rows extra in Postgres.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control import dq, fingerprints, registry, tables
from flows.core.db import connect, relation_columns
from flows.core.errors import ConfigError, RefreshError
from flows.core.identifiers import bq_quote, bq_table_path
from flows.core.planning import Slice, align, next_boundary, to_ts
from flows.core.redact import error_text
from flows.core.settings import Settings
from flows.core.table_config import Mode, SliceSize, TableConfig, WriteStrategy
from flows.core.type_mapping import pg_column_name
from flows.engine.bigquery import BigQueryClients, classify
from flows.engine.extract import SourceColumn, SourceTable, describe, row_restriction

CHECK_NAME = "source_match"
NULL_MARK = "~"
# A differing bucket is fetched row by row once neither side has more rows than this.
FETCH_ROWS = 2_000
# At most this many differing rows are reported per period (the counts are always exact).
MAX_REPORTED = 200
_HEX = re.compile(r"^[0-9a-f]{1,32}$")
_UNCHECKED = {"JSON", "RECORD", "STRUCT", "GEOGRAPHY", "INTERVAL", "RANGE"}
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class Col:
    """A source column, its raw-table name and how it is normalised."""

    source: SourceColumn
    name: str
    # The local emulator (DuckDB) formats NUMERIC through a double in FORMAT('%f'); its CAST to
    # STRING already gives the declared scale, so it uses that (Settings.uses_emulator).
    emulator: bool = False
    # The scale declared by the Postgres column's type (numeric(p, s)), when known: a value of
    # such a column is printed at that scale already, with no round() to pay per value.
    pg_scale: int | None = None

    @property
    def kind(self) -> str:
        if (self.source.mode or "NULLABLE").upper() == "REPEATED":
            return "UNCHECKED"
        t = self.source.field_type.upper()
        aliases = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "DECIMAL": "NUMERIC"}
        t = aliases.get(t, t)
        if t == "BIGDECIMAL":
            t = "BIGNUMERIC"
        return "UNCHECKED" if t in _UNCHECKED else t

    @property
    def scale(self) -> int:
        if self.source.scale is not None:
            return int(self.source.scale)
        return 38 if self.kind == "BIGNUMERIC" else 9


def columns_of(source: SourceTable, emulator: bool) -> list[Col]:
    return [Col(c, pg_column_name(c.name), emulator) for c in source.columns]


_NUMERIC_TYPE = re.compile(r"^numeric\(\d+,(\d+)\)$")


def declared(conn: psycopg.Connection, schema: str, table: str, cols: list[Col]) -> list[Col]:
    """`cols` with the scale each NUMERIC column's Postgres type declares (see Col.pg_scale)."""
    types = relation_columns(conn, schema, table)
    out = []
    for c in cols:
        m = _NUMERIC_TYPE.match(types.get(c.name, ""))
        out.append(replace(c, pg_scale=int(m.group(1))) if m else c)
    return out


# --- normal forms ---------------------------------------------------------------------------


def bq_text(col: Col) -> str:
    """BigQuery expression: the column's normal text, NULL when the value is NULL."""
    q = bq_quote(col.source.name)
    k = col.kind
    if k == "STRING":
        return q
    if k in ("INT64", "BOOL"):
        return f"cast({q} as string)"
    if k in ("NUMERIC", "BIGNUMERIC"):
        if not col.emulator:
            return f"format('%.{col.scale}f', {q})"
        if k == "NUMERIC" and col.scale <= 9:
            # DuckDB prints a DECIMAL(38, s) digit by digit in 128-bit arithmetic (~250 ns a
            # value, most of the emulator's checksum time); a value below 10^(18-s) fits
            # DECIMAL(18, s), printed from 64 bits with the same text.
            bound = 10 ** (18 - col.scale)
            return (
                f"if({q} > -{bound} and {q} < {bound}, "
                f"cast(cast({q} as numeric(18, {col.scale})) as string), cast({q} as string))"
            )
        return f"cast({q} as string)"
    if k == "FLOAT64":
        return (
            f"case when is_nan({q}) then 'nan' when is_inf({q}) and {q} > 0 then 'inf' "
            f"when is_inf({q}) then '-inf' else format('%.16e', {q}) end"
        )
    if k == "TIMESTAMP":
        return f"cast(unix_micros({q}) as string)"
    if k == "DATETIME":
        return f"cast(unix_micros(timestamp({q})) as string)"
    if k == "DATE":
        return f"cast({q} as string)"
    if k == "TIME":
        return f"cast(time_diff({q}, time '00:00:00', microsecond) as string)"
    if k == "BYTES":
        return f"to_hex({q})"
    return f"if({q} is null, null, '*')"


def pg_text(col: Col) -> sql.Composable:
    """Postgres expression: the same normal text for the raw table's column."""
    q = sql.Identifier(col.name)
    k = col.kind
    if k == "STRING":
        return q
    if k == "INT64":
        return sql.SQL("{}::text").format(q)
    if k == "BOOL":
        return sql.SQL("case when {q} then 'true' when not {q} then 'false' end").format(q=q)
    if k in ("NUMERIC", "BIGNUMERIC"):
        if col.pg_scale == col.scale:
            return sql.SQL("{}::text").format(q)  # the column's type already fixes the scale
        return sql.SQL("round({q}, {s})::text").format(q=q, s=sql.Literal(col.scale))
    if k == "FLOAT64":
        return sql.SQL(
            "case when {q} = 'NaN'::float8 then 'nan' when {q} = 'Infinity'::float8 then 'inf' "
            "when {q} = '-Infinity'::float8 then '-inf' "
            "else ltrim(to_char({q}, '9.9999999999999999EEEE')) end"
        ).format(q=q)
    if k in ("TIMESTAMP", "DATETIME", "TIME"):
        return sql.SQL("(extract(epoch from {})*1000000)::bigint::text").format(q)
    if k == "DATE":
        return sql.SQL("to_char({}, 'YYYY-MM-DD')").format(q)
    if k == "BYTES":
        return sql.SQL("encode({}, 'hex')").format(q)
    return sql.SQL("case when {} is null then null else '*' end").format(q)


# Only a STRING's text can hold ',' or be '~', so only strings carry a length prefix; the
# other normal forms are digits, signs, '.', 'e', hex or fixed words, and each is computed once.
def _bq_field(col: Col) -> str:
    t = bq_text(col)
    if col.kind == "STRING":
        return f"coalesce(concat(cast(length({t}) as string), ':', {t}), '{NULL_MARK}')"
    return f"coalesce({t}, '{NULL_MARK}')"


def _pg_field(col: Col) -> sql.Composable:
    t = pg_text(col)
    if col.kind == "STRING":
        return sql.SQL("coalesce(length({t})::text || ':' || {t}, {null})").format(
            t=t, null=sql.Literal(NULL_MARK)
        )
    return sql.SQL("coalesce({t}, {null})").format(t=t, null=sql.Literal(NULL_MARK))


def bq_row_hash(cols: list[Col]) -> str:
    # array_to_string, not concat: the emulator translates concat into one nested CAST per
    # piece, which wide tables do not survive; an array literal stays flat.
    return "to_hex(md5(array_to_string([" + ", ".join(_bq_field(c) for c in cols) + "], ',')))"


# Postgres passes at most 100 arguments to a function: wider rows are joined in chunks, joined
# again with ',' (the same text).
_PG_ARGS = 90


def pg_row_hash(cols: list[Col]) -> sql.Composable:
    chunks = [
        sql.SQL("concat_ws(',', {})").format(sql.SQL(", ").join(_pg_field(c) for c in cols[i : i + _PG_ARGS]))
        for i in range(0, len(cols), _PG_ARGS)
    ]
    joined = (
        chunks[0] if len(chunks) == 1 else sql.SQL("concat_ws(',', {})").format(sql.SQL(", ").join(chunks))
    )
    return sql.SQL("md5({})").format(joined)


# The row's number: the first 60 bits of its md5, as a bigint in Postgres; in BigQuery as 28 +
# 32 bits, summed apart (an INT64 sum of 60-bit numbers would overflow).
def _pg_number(h: sql.Composable) -> sql.Composable:
    return sql.SQL("('x' || substr({}, 1, 15))::bit(60)::bigint").format(h)


_BQ_SUMS = (
    "sum(cast(concat('0x', substr(h, 1, 7)) as int64)), sum(cast(concat('0x', substr(h, 8, 8)) as int64))"
)


# --- fingerprints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    rows: int
    checksum: int

    def __add__(self, other: Fingerprint) -> Fingerprint:
        return Fingerprint(self.rows + other.rows, self.checksum + other.checksum)


EMPTY = Fingerprint(0, 0)


def _bq_day(col: SourceColumn) -> str:
    q = bq_quote(col.name)
    return q if col.field_type.upper() == "DATE" else f"date({q})"


def _pg_day(col: Col) -> sql.Composable:
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


def _bq_fp(n: Any, hi: Any, lo: Any) -> Fingerprint:
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


@dataclass(frozen=True)
class PlanFingerprints:
    """BigQuery's fingerprints that change detection took, before reading, of the slices a run
    then read (flows.engine.change_detection.detect): by slice start (None: the whole table), each
    the source's state at `as_of`. Kept on the table's outcome for the validation step, which
    reuses them when its own `signature` is the same instead of asking BigQuery again."""

    signature: str
    periods: dict[date | None, Fingerprint]
    as_of: datetime | None


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
        f"select d, count(*) as n, {_BQ_SUMS} "
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
        return {r[0]: _bq_fp(r[1], r[2], r[3]) for r in rows}
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
    day = _pg_day(cursor) if cursor else sql.SQL("null::date")
    where, params = _pg_where(cursor, window)
    h = pg_row_hash(declared(conn, schema, table, cols))
    query = sql.SQL("select {day}, count(*), sum({n}) from {t}{where} group by 1").format(
        day=day, n=_pg_number(h), t=sql.Identifier(schema, table), where=where
    )
    return {d: Fingerprint(int(n), int(s or 0)) for d, n, s in conn.execute(query, params).fetchall()}


def _pg_where(cursor: Col | None, window: Slice | None) -> tuple[sql.Composable, list[Any]]:
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


# --- bisecting a differing period -----------------------------------------------------------


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
        f"select p, count(*), {_BQ_SUMS} "
        f"from (select substr(h, 1, {k}) as p, h from (select {bq_row_hash(cols)} as h from {path}"
        + (f" where {where}" if where else "")
        + f"){within}) group by p"
    )
    rows = clients.rest.query(query, job_config=clients.query_config()).result()
    return {r[0]: _bq_fp(r[1], r[2], r[3]) for r in rows}


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
    where, params = _pg_where(cursor, window)
    within = sql.SQL(" where substr(h, 1, %s) = any(%s)") if prefixes else sql.SQL("")
    # `offset 0` keeps the subquery whole, so each row is hashed once (see fingerprint_pg).
    query = sql.SQL(
        "select substr(h, 1, %s) as p, count(*), sum({n}) "
        "from (select {h} as h from {t}{where} offset 0) s{within} group by p"
    ).format(n=_pg_number(sql.SQL("h")), h=pg_row_hash(cols), t=rel, where=where, within=within)
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
    where, params = _pg_where(cursor, window)
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


# --- one table ------------------------------------------------------------------------------


@dataclass
class PeriodResult:
    table_name: str
    period_start: date | None
    period_end: date | None
    bigquery: Fingerprint
    postgres: Fingerprint
    schema: str
    unchecked_columns: list[str]
    differences: Differences | None = None
    # Postgres' figures are the load's fingerprint, its rows proven untouched since (see
    # unchanged_since_load), not a fresh checksum.
    postgres_from_load: bool = False
    # BigQuery's figures are change detection's fingerprint of this run's plan (PlanFingerprints),
    # taken before the read (at `bigquery_as_of`, BigQuery's clock), not a fresh query.
    bigquery_from_plan: bool = False
    bigquery_as_of: datetime | None = None

    @property
    def passed(self) -> bool:
        return self.bigquery == self.postgres

    @property
    def status(self) -> str:
        return "pass" if self.passed else "fail"

    def details(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": self.schema,
            "period_end": self.period_end.isoformat() if self.period_end else None,
            "bigquery": {"rows": self.bigquery.rows, "checksum": str(self.bigquery.checksum)},
            "postgres": {"rows": self.postgres.rows, "checksum": str(self.postgres.checksum)},
        }
        if self.unchecked_columns:
            d["unchecked_columns"] = self.unchecked_columns
        if self.postgres_from_load:
            d["postgres_from"] = "load fingerprint, rows unchanged since the load"
        if self.bigquery_from_plan:
            d["bigquery_from_plan"] = True
            d["bigquery_as_of"] = self.bigquery_as_of.isoformat() if self.bigquery_as_of else None
        if self.differences is not None:
            d.update(self.differences.to_dict())
            found = self.differences.missing_in_postgres or self.differences.extra_in_postgres
            if self.bigquery_from_plan and not (found or self.differences.different):
                d["note"] = (
                    "no row differs from BigQuery now: the source changed after the plan's "
                    "fingerprint (bigquery_as_of), Postgres holds what the read saw"
                )
        return d


def cursor_of(cfg: TableConfig, source: SourceTable, cols: list[Col]) -> tuple[Col | None, SliceSize | None]:
    """The cursor column of a sliced table and its slice size; (None, None) for a whole table."""
    if cfg.write_strategy is not WriteStrategy.SLICE_REPLACE or not cfg.cursor_column:
        return None, None
    src = source.column(cfg.cursor_column)
    return next(c for c in cols if c.source.name == src.name), cfg.slice_size


def key_columns(cfg: TableConfig) -> list[str]:
    keys = cfg.custom_params.get("key_columns") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError(
            f"{cfg.table_name}: custom_params.key_columns must be a list of source column names"
        )
    return keys


@dataclass(frozen=True)
class LoadedBy:
    """The validation after a live refresh: the run whose loads are checked, where their
    checkpoints are, and the periods to report (None: every period, a whole-table load)."""

    control_schema: str
    run_id: UUID
    periods: frozenset[date | None] | None


_XID_SPAN = 2**31  # xmin holds 32 bits: younger loads are told apart from every later writer


def unchanged_since_load(
    conn: psycopg.Connection,
    loaded: LoadedBy,
    schema: str,
    table: str,
    cursor: Col | None,
) -> dict[date | None, Fingerprint]:
    """The fingerprints (by slice start) that `loaded.run_id`'s loads stored, for the slices
    whose rows are still exactly the rows those loads fingerprinted.

    A slice qualifies when every row in its range still carries its loading transaction's id
    (`xmin`: an update writes a new row version with the updater's id, an insert carries its
    inserter's, a delete leaves the count short), as many rows as the load fingerprinted, and
    that transaction is less than 2^31 transactions old (so no later one shares its 32 bits).
    One scan of the slices' span reads the cursor and tuple headers: no value is formatted or hashed.
    """
    slices, now = fingerprints.loaded_by(conn, loaded.control_schema, table, loaded.run_id)
    young = [s for s in slices if now - s.xid < _XID_SPAN]
    if not young:
        return {}
    # One scan of the slices' span: rows per day and per row-version writer.
    span = None
    if cursor is not None and all(s.start is not None and s.end is not None for s in young):
        span = Slice(min(s.start for s in young if s.start), max(s.end for s in young if s.end))
    where, params = _pg_where(cursor, span)
    day = _pg_day(cursor) if cursor else sql.SQL("null::date")
    counts = conn.execute(
        sql.SQL("select {day}, xmin::text, count(*) from {t}{where} group by 1, xmin").format(
            day=day, t=sql.Identifier(schema, table), where=where
        ),
        params,
    ).fetchall()
    out: dict[date | None, Fingerprint] = {}
    for s in young:
        inside = [
            (int(x), int(n))
            for d, x, n in counts
            if s.start is None or s.end is None or (d is not None and s.start <= d < s.end)
        ]
        rows = sum(n for _, n in inside)
        same = sum(n for x, n in inside if x == s.xid % 2**32)
        if rows == same == s.rows:
            out[s.start] = Fingerprint(s.rows, s.checksum)
    return out


def validate_table(
    clients: BigQueryClients,
    conn: psycopg.Connection,
    cfg: TableConfig,
    schema: str,
    first: date | None = None,
    last: date | None = None,
    stats: QueryStats | None = None,
    loaded: LoadedBy | None = None,
    plan: PlanFingerprints | None = None,
) -> list[PeriodResult]:
    """Compare one table period by period (days `first`..`last` inclusive; default: all).

    With `loaded` (the step after a live refresh), only its periods are reported, and where
    each of them is proven unchanged since its load, Postgres' side is the load's fingerprint
    instead of a fresh checksum; a period that then differs is checksummed afresh before it is
    reported, so a reused figure never decides a difference on Postgres' side.

    With `plan` as well (computed with the same normal form), BigQuery's side of the periods
    it holds is the plan's fingerprint: BigQuery is asked only for the other periods, or not at
    all. It is the source's state before the run read it (docs/operations.md says why that is
    sound: a source changed since shows as a difference, never as an agreement).
    """
    source = describe(clients, cfg.source_table)
    cols = columns_of(source, clients.settings.uses_emulator)
    keys = key_columns(cfg)
    unknown = [k for k in keys if not any(k in (c.source.name, c.name) for c in cols)]
    if unknown:
        raise ConfigError(f"{cfg.table_name}: key_columns {unknown} are not columns of the source")
    cursor, size = cursor_of(cfg, source, cols)
    window = None
    if cursor is not None and (first or last):
        lo = align(first, size) if first and size else date(1, 1, 1)
        hi = next_boundary(align(last, size), size) if last and size else date(9999, 12, 31)
        window = Slice(lo, hi)
    wanted = loaded.periods if loaded is not None else None
    if loaded is not None and wanted is None and cursor is None:
        wanted = frozenset({None})

    def fresh() -> dict[date | None, Fingerprint]:
        return by_period(fingerprint_pg(conn, schema, cfg.table_name, cols, cursor, window), size)

    planned: dict[date | None, Fingerprint] = {}
    if plan is not None and wanted and plan.signature == signature(cols, cursor, size):
        planned = {p: plan.periods[p] for p in wanted if p in plan.periods}
    ask = wanted - planned.keys() if wanted is not None else None
    bq_window = window
    if ask is not None and planned and cursor is not None and size is not None:
        # Only the periods the plan did not fingerprint (None when it did them all).
        starts = [p for p in ask if p is not None]
        bq_window = Slice(min(starts), next_boundary(max(starts), size)) if starts else None

    def bigquery() -> dict[date | None, Fingerprint]:
        if ask is not None and not ask:
            return {}
        days = fingerprint_bq(clients, cfg.source_table, cols, cursor, bq_window, stats)
        return {p: fp for p, fp in by_period(days, size).items() if p not in planned}

    # Both engines work at once: the BigQuery job runs while Postgres computes its side.
    from_load = False
    with ThreadPoolExecutor(max_workers=1) as pool:
        bq_days = pool.submit(bigquery)
        # A live table's checkpoints are keyed by its name (refresh.checkpoint_key).
        known = {}
        if loaded is not None and wanted:
            known = unchanged_since_load(conn, loaded, schema, cfg.table_name, cursor)
        if wanted and wanted <= known.keys():
            pg, from_load = {p: known[p] for p in wanted}, True
        else:
            pg = fresh()
        bq = {**bq_days.result(), **planned}
    if from_load and any(bq.get(p, EMPTY) != pg[p] for p in pg):
        pg, from_load = fresh(), False
    unchecked = [c.name for c in cols if c.kind == "UNCHECKED"]
    results = []
    for start in sorted(set(bq) | set(pg), key=lambda d: d or date.min):
        if wanted is not None and start not in wanted:
            continue
        end = next_boundary(start, size) if start and size else None
        r = PeriodResult(
            cfg.table_name,
            start,
            end,
            bq.get(start, EMPTY),
            pg.get(start, EMPTY),
            schema,
            unchecked,
            postgres_from_load=from_load,
            bigquery_from_plan=start in planned,
            bigquery_as_of=plan.as_of if plan is not None and start in planned else None,
        )
        if not r.passed:
            period = Slice(start, end) if start and end else None
            r.differences = bisect(clients, conn, cfg, schema, cols, cursor, period, keys)
        results.append(r)
    return results


def record_results(
    conn: psycopg.Connection,
    control_schema: str,
    cfg: TableConfig,
    results: list[PeriodResult],
    run_id: UUID | None = None,
) -> None:
    """One transaction: a dq_results row per period, and `validation.failed` if any differ."""
    rows = [
        dq.DqRow(
            r.table_name,
            CHECK_NAME,
            to_ts(r.period_start) if r.period_start else None,
            r.status,
            r.bigquery.rows,
            r.postgres.rows,
            r.details(),
        )
        for r in results
    ]
    failed = [r for r in results if not r.passed]
    with conn.transaction():
        dq.record(conn, control_schema, rows, run_id)
        if failed:
            dq.emit_event(
                conn,
                control_schema,
                dq.VALIDATION_FAILED,
                cfg.table_name,
                {
                    "schema": failed[0].schema,
                    "periods_failed": [str(r.period_start) if r.period_start else "full" for r in failed],
                    "periods_checked": len(results),
                    "rows_missing_in_postgres": sum(
                        len(r.differences.missing_in_postgres) for r in failed if r.differences
                    ),
                    "rows_extra_in_postgres": sum(
                        len(r.differences.extra_in_postgres) for r in failed if r.differences
                    ),
                    "rows_different": sum(len(r.differences.different) for r in failed if r.differences),
                },
                run_id,
            )


def check_raw_table(
    conn: psycopg.Connection, schema: str, cfg: TableConfig, clients: BigQueryClients
) -> None:
    existing = relation_columns(conn, schema, cfg.table_name)
    if not existing:
        raise ConfigError(
            f"{schema}.{cfg.table_name} does not exist: nothing has been loaded for this table "
            f"yet (run `refresh run --tables {cfg.table_name}` first)"
        )
    cols = columns_of(describe(clients, cfg.source_table), clients.settings.uses_emulator)
    missing = [c.name for c in cols if c.name not in existing]
    if missing:
        raise ConfigError(
            f"{schema}.{cfg.table_name} lacks source columns {missing}: the next refresh adds them; "
            "validate after it"
        )


def validate(
    settings: Settings,
    clients: BigQueryClients,
    tables: list[str] | None = None,
    first: date | None = None,
    last: date | None = None,
    run_id: UUID | None = None,
) -> dict[str, list[PeriodResult]]:
    """Validate and record the named tables (default: every enabled shadow or live table)."""
    from flows.engine.table_refresh import target_schema

    if first and last and first > last:
        raise ConfigError(f"--from {first} is after --to {last}")
    with connect(settings, autocommit=True) as conn:
        configs = registry.load_all(conn, settings.control_schema)
        by_name = {c.table_name: c for c in configs}
        if tables:
            unknown = [t for t in tables if t not in by_name]
            if unknown:
                raise ConfigError(
                    f"unknown table(s) {', '.join(unknown)}: registered are {', '.join(sorted(by_name))}"
                )
            chosen = [by_name[t] for t in tables]
        else:
            chosen = [c for c in configs if c.enabled and c.mode in (Mode.SHADOW, Mode.LIVE)]
        out: dict[str, list[PeriodResult]] = {}
        for cfg in chosen:
            schema = target_schema(settings, cfg)
            check_raw_table(conn, schema, cfg, clients)
            results = validate_table(clients, conn, cfg, schema, first, last)
            record_results(conn, settings.control_schema, cfg, results, run_id)
            out[cfg.table_name] = results
        return out


# --- after a live refresh -------------------------------------------------------------------

# A registry table opts out of the after-refresh step with custom_params {"validate_after_refresh": false}.
AFTER_REFRESH_PARAM = "validate_after_refresh"


@dataclass
class AfterRefresh:
    """What validating one table's touched periods added to a run."""

    table_name: str
    periods: int = 0
    # periods whose Postgres side was the load's fingerprint (unchanged_since_load)
    periods_from_load: int = 0
    # periods whose BigQuery side was change detection's fingerprint of the run's plan
    periods_bigquery_from_plan: int = 0
    failed: list[str] = field(default_factory=list)
    bytes_processed: int = 0
    duration_s: float = 0.0
    skipped: str | None = None  # why it was not validated
    error: str | None = None  # why validation could not run

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table_name,
            "periods": self.periods,
            "periods_from_load": self.periods_from_load,
            "periods_bigquery_from_plan": self.periods_bigquery_from_plan,
            "failed": self.failed,
            "bytes_processed": self.bytes_processed,
            "duration_s": round(self.duration_s, 2),
            "skipped": self.skipped,
            "error": self.error,
        }


def validated_after_refresh(cfg: TableConfig) -> bool:
    """A live run of this table validates the periods it commits (unless the refresh fails)."""
    return cfg.mode is Mode.LIVE and cfg.custom_params.get(AFTER_REFRESH_PARAM, True) is not False


def _skip_reason(cfg: TableConfig, status: str, dry_run: bool) -> str | None:
    if dry_run or cfg.mode is not Mode.LIVE:
        return f"mode {'dry_run' if dry_run else cfg.mode.value}: not live"
    if status != tables.TableStatus.SUCCESS:
        return f"refresh {status}"
    if cfg.custom_params.get(AFTER_REFRESH_PARAM, True) is False:
        return f"custom_params.{AFTER_REFRESH_PARAM} is false"
    return None


def validate_touched(
    settings: Settings,
    clients: BigQueryClients,
    cfg: TableConfig,
    status: str,
    run_id: UUID,
    dry_run: bool = False,
    plan: PlanFingerprints | None = None,
) -> AfterRefresh:
    """Validate exactly the periods the run committed for one live table and record them with
    the run id (`validation.failed` on a difference). BigQuery's side of a period the run's
    change detection fingerprinted is that fingerprint (`plan`, from the table's outcome).
    Never raises: a validation that cannot run (BigQuery down, a bad key_columns) comes back
    in `error`."""
    out = AfterRefresh(cfg.table_name, skipped=_skip_reason(cfg, status, dry_run))
    if out.skipped:
        return out
    started = time.monotonic()
    stats = QueryStats()
    try:
        with connect(settings, autocommit=True) as conn:
            touched = tables.touched_slices(conn, settings.control_schema, run_id, cfg.table_name)
            if not touched:
                out.skipped = "no slice committed (unchanged)"
                return out
            dated = [t for t in touched if t is not None]
            whole = len(dated) < len(touched)
            first = None if whole else dated[0][0]
            last = None if whole else max(b for _, b in dated) - timedelta(days=1)
            periods = None if whole else frozenset(a for a, _ in dated)
            loaded = LoadedBy(settings.control_schema, run_id, periods)
            results = validate_table(
                clients, conn, cfg, settings.raw_schema, first, last, stats, loaded, plan
            )
            record_results(conn, settings.control_schema, cfg, results, run_id)
        out.periods = len(results)
        out.periods_from_load = sum(r.postgres_from_load for r in results)
        out.periods_bigquery_from_plan = sum(r.bigquery_from_plan for r in results)
        out.failed = [str(r.period_start) if r.period_start else "full" for r in results if not r.passed]
    except (RefreshError, ConfigError, psycopg.Error) as exc:
        out.error = error_text(exc)
    finally:
        out.bytes_processed = stats.bytes
        out.duration_s = time.monotonic() - started
    return out


# --- shadow models against live ------------------------------------------------------------

SHADOW_CHECK = "shadow_match"
SHADOW_LAYERS = ("marts", "summaries")
# The column a model's rows are compared by, first found; a model without one is one period.
PERIOD_COLUMNS = ("period_start", "week_start", "date", "start_date")
_PG_KINDS = {
    "text": "STRING",
    "character varying": "STRING",
    "bigint": "INT64",
    "integer": "INT64",
    "smallint": "INT64",
    "boolean": "BOOL",
    "double precision": "FLOAT64",
    "real": "FLOAT64",
    "timestamp with time zone": "TIMESTAMP",
    "timestamp without time zone": "DATETIME",
    "date": "DATE",
    "bytea": "BYTES",
}


def _pg_col(name: str, pg_type: str) -> Col:
    base = pg_type.split("(")[0].strip()
    if base == "numeric":
        # Both sides are Postgres: compare numerics at their declared scale, else at 20 places.
        scale = int(pg_type.split(",")[1].rstrip(")")) if "," in pg_type else 20
        return Col(SourceColumn(name, "NUMERIC", "NULLABLE", None, scale), name)
    return Col(SourceColumn(name, _PG_KINDS.get(base, "JSON"), "NULLABLE", None, None), name)


def compared_columns(columns: dict[str, str]) -> list[Col]:
    """A model's columns as normal forms; lineage columns (`_loaded_at`, `_run_id` ...) differ
    by construction between two builds and are left out."""
    return [_pg_col(n, t) for n, t in columns.items() if not n.startswith("_")]


@dataclass(frozen=True)
class ShadowResult:
    model: str
    layer: str
    period_start: date | None
    live: Fingerprint
    shadow: Fingerprint

    @property
    def passed(self) -> bool:
        return self.live == self.shadow


def compare_shadow(conn: psycopg.Connection, suffix: str) -> list[ShadowResult]:
    """Each mart and summary against its shadow build (`<layer><suffix>`), period by period,
    with the same row checksums as validation; a model missing on one side fails whole."""
    out: list[ShadowResult] = []
    for layer in SHADOW_LAYERS:
        names = [
            r[0]
            for r in conn.execute(
                "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname in (%s, %s) and c.relkind in ('r', 'v', 'm', 'p') "
                "group by c.relname order by 1",
                (layer, layer + suffix),
            ).fetchall()
        ]
        for name in names:
            live_cols = relation_columns(conn, layer, name)
            shadow_cols = relation_columns(conn, layer + suffix, name)
            if not live_cols or not shadow_cols or live_cols != shadow_cols:
                out.append(
                    ShadowResult(
                        name, layer, None, _rows(conn, layer, name), _rows(conn, layer + suffix, name)
                    )
                )
                continue
            cols = compared_columns(live_cols)
            cursor = next((c for p in PERIOD_COLUMNS for c in cols if c.name == p), None)
            live = fingerprint_pg(conn, layer, name, cols, cursor, None)
            shadow = fingerprint_pg(conn, layer + suffix, name, cols, cursor, None)
            for start in sorted(set(live) | set(shadow), key=lambda d: d or date.min):
                out.append(ShadowResult(name, layer, start, live.get(start, EMPTY), shadow.get(start, EMPTY)))
    return out


def _rows(conn: psycopg.Connection, schema: str, name: str) -> Fingerprint:
    if not relation_columns(conn, schema, name):
        return Fingerprint(-1, 0)  # absent: differs from any table, even an empty one
    row = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(schema, name))).fetchone()
    return Fingerprint(int(row[0]) if row else 0, 0)


def record_shadow(
    conn: psycopg.Connection, control_schema: str, results: list[ShadowResult], run_id: UUID | None = None
) -> None:
    """A dq_results row per model and period (check `shadow_match`; expected/observed: live /
    shadow rows) and `validation.failed` per model that differs, in one transaction."""
    rows = [
        dq.DqRow(
            r.model,
            SHADOW_CHECK,
            to_ts(r.period_start) if r.period_start else None,
            "pass" if r.passed else "fail",
            r.live.rows,
            r.shadow.rows,
            {
                "layer": r.layer,
                "live": {"rows": r.live.rows, "checksum": str(r.live.checksum)},
                "shadow": {"rows": r.shadow.rows, "checksum": str(r.shadow.checksum)},
            },
        )
        for r in results
    ]
    failed: dict[str, list[str]] = {}
    for r in results:
        if not r.passed:
            failed.setdefault(r.model, []).append(str(r.period_start or "full"))
    _record_per_relation(conn, control_schema, rows, SHADOW_CHECK, failed, run_id)


def _record_per_relation(
    conn: psycopg.Connection,
    control_schema: str,
    rows: list[dq.DqRow],
    check: str,
    failed: dict[str, list[str]],
    run_id: UUID | None,
) -> None:
    """The dq rows and one `validation.failed` per relation with failed periods, in one
    transaction."""
    with conn.transaction():
        dq.record(conn, control_schema, rows, run_id)
        for name in sorted(failed):
            dq.emit_event(
                conn,
                control_schema,
                dq.VALIDATION_FAILED,
                name,
                {"check": check, "periods_failed": failed[name]},
                run_id,
            )


# --- the dbt layer against raw --------------------------------------------------------------

SUMMARY_SCHEMA = "summaries"
SUMMARY_PERIODS = {
    "week": "weekly_summary",
    "month": "monthly_summary",
    "quarter": "quarterly_summary",
    "year": "yearly_summary",
}
# raw column -> its sum's column in every summary
SUMMARY_MEASURES = {
    "asin_impression_count": "impressions",
    "asin_click_count": "clicks",
    "asin_cart_add_count": "cart_adds",
    "asin_purchase_count": "purchases",
}


@dataclass(frozen=True)
class SummaryCheck:
    summary: str
    period_start: date
    raw: tuple[int, ...]
    summary_sums: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return self.raw == self.summary_sums


def check_summaries(
    conn: psycopg.Connection, raw_schema: str, sqp_table: str = "search_query_performance"
) -> list[SummaryCheck]:
    """Per summary and period: the sums of the ASIN counts in the summary equal those of raw
    for the SQP weeks in that period (a week belongs to the period of its UTC start date)."""
    week = sql.SQL("({} at time zone 'UTC')::date").format(sql.Identifier("date"))
    raw_sums, summary_sums = (
        sql.SQL(", ").join(
            sql.SQL("sum({}) as {}").format(sql.Identifier(c), sql.Identifier(f"m{i}"))
            for i, c in enumerate(names)
        )
        for names in (list(SUMMARY_MEASURES), list(SUMMARY_MEASURES.values()))
    )
    n = len(SUMMARY_MEASURES)
    pick = sql.SQL(", ").join(
        sql.SQL("{}.{}").format(sql.Identifier(side), sql.Identifier(f"m{i}"))
        for side in "rs"
        for i in range(n)
    )
    out: list[SummaryCheck] = []
    for period, summary in SUMMARY_PERIODS.items():
        bucket = (
            week
            if period == "week"
            else sql.SQL("date_trunc({}, {})::date").format(sql.Literal(period), week)
        )
        rows = conn.execute(
            sql.SQL(
                "with r as (select {bucket} as p, {raw_sums} from {raw} group by 1), "
                "s as (select period_start as p, {summary_sums} from {summary} group by 1) "
                "select coalesce(r.p, s.p), {pick} from r full join s on r.p = s.p order by 1"
            ).format(
                bucket=bucket,
                raw_sums=raw_sums,
                summary_sums=summary_sums,
                raw=sql.Identifier(raw_schema, sqp_table),
                summary=sql.Identifier(SUMMARY_SCHEMA, summary),
                pick=pick,
            )
        ).fetchall()
        for r in rows:
            values = [int(x or 0) for x in r[1:]]
            out.append(SummaryCheck(summary, r[0], tuple(values[:n]), tuple(values[n:])))
    return out


def record_summary_checks(
    conn: psycopg.Connection, control_schema: str, checks: list[SummaryCheck], run_id: UUID | None = None
) -> None:
    """One dq_results row per summary period (check `matches_raw`; expected/observed: the
    purchase sums of raw / the summary); `validation.failed` when any differs."""
    rows = [
        dq.DqRow(
            c.summary,
            "matches_raw",
            to_ts(c.period_start),
            "pass" if c.passed else "fail",
            c.raw[-1],
            c.summary_sums[-1],
            {
                "raw": dict(zip(SUMMARY_MEASURES, c.raw, strict=True)),
                "summary": dict(zip(SUMMARY_MEASURES.values(), c.summary_sums, strict=True)),
            },
        )
        for c in checks
    ]
    failed: dict[str, list[str]] = {}
    for c in checks:
        if not c.passed:
            failed.setdefault(c.summary, []).append(str(c.period_start))
    _record_per_relation(conn, control_schema, rows, "matches_raw", failed, run_id)
