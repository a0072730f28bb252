"""The normal form of a row: one text per row, the same in BigQuery and Postgres, and its hash.

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from flows.core.db import relation_columns
from flows.core.identifiers import bq_quote
from flows.core.type_mapping import pg_column_name
from flows.engine.extract import SourceColumn, SourceTable

NULL_MARK = "~"
_UNCHECKED = {"JSON", "RECORD", "STRUCT", "GEOGRAPHY", "INTERVAL", "RANGE"}


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
def pg_number(h: sql.Composable) -> sql.Composable:
    return sql.SQL("('x' || substr({}, 1, 15))::bit(60)::bigint").format(h)


BQ_SUMS = (
    "sum(cast(concat('0x', substr(h, 1, 7)) as int64)), sum(cast(concat('0x', substr(h, 8, 8)) as int64))"
)
