"""Loading Arrow record batches into Postgres raw tables.

Each slice is applied in ONE transaction: delete the slice's cursor range, COPY the new rows
straight into the raw table, upsert the slice's checkpoint and write its audit row, commit.
A crash at any instant leaves the slice either fully applied and checkpointed or untouched,
and readers keep seeing the previous rows until the commit (MVCC), so no staging table is
needed and every row is written once.

Lineage columns are filled by column defaults from transaction-local settings, so COPY carries
only source columns: `_loaded_at` = transaction time, `_run_id` and `_slice_start` from
`set_config(..., is_local => true)`.

Speed (bench/load_throughput.py): batches are encoded by Arrow's C++ CSV writer in chunks of a
few MB, so Postgres parses one chunk (already in the socket buffers) while the next is encoded;
TIMESTAMP values are written as UTC wall-clock text under a transaction-local `TimeZone = UTC`
(Arrow formats zoned timestamps an order of magnitude slower than naive ones). An encoding
thread was slower than this: it contends for the GIL with the thread feeding COPY.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql

from flows.control import checkpoints
from flows.core.db import relation_columns
from flows.core.errors import BadSourceValueError, SchemaDriftError
from flows.core.planning import Slice, to_ts
from flows.core.type_mapping import ColumnMapping, diff_schema, pg_column_name

# Advisory lock (two-key form: key, hashtext(schema)) held while creating or altering raw tables.
DDL_LOCK_KEY = 7_312_003
# Advisory lock (two-key form: key, hashtext(checkpoint key and slice start)) held by a slice's
# transaction: one writer per slice at a time (see apply_slice).
SLICE_LOCK_KEY = 7_312_005
RUN_SETTING = "sqp_refresh.run_id"
SLICE_SETTING = "sqp_refresh.slice_start"

_LINEAGE_DDL = sql.SQL(
    "_loaded_at timestamp with time zone not null default now(), "
    "_run_id uuid default nullif(current_setting('" + RUN_SETTING + "', true), '')::uuid, "
    "_slice_start timestamp with time zone default "
    "nullif(current_setting('" + SLICE_SETTING + "', true), '')::timestamptz"
)

_CSV_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="needed", delimiter=",")


def ensure_raw_table(
    conn: psycopg.Connection, schema: str, table: str, columns: list[ColumnMapping], cursor: str | None
) -> list[str]:
    """Create the raw table, or add new source columns to it; drift raises SchemaDriftError.

    Returns the names of columns added. Run it inside a transaction: it holds a lock until then.
    """
    # The flow refreshes tables in parallel, and two first loads both running `create schema if
    # not exists` can fail one of them with a unique violation: serialise this DDL per schema.
    conn.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (DDL_LOCK_KEY, schema))
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
    existing = relation_columns(conn, schema, table)
    if not existing:
        conn.execute(
            sql.SQL("create table {t} ({cols}, {lineage})").format(
                t=sql.Identifier(schema, table),
                cols=sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in columns
                ),
                lineage=_LINEAGE_DDL,
            )
        )
        if cursor:
            conn.execute(
                sql.SQL("create index {i} on {t} ({c})").format(
                    i=sql.Identifier(f"{table}__cursor_idx"[:63]),
                    t=sql.Identifier(schema, table),
                    c=sql.Identifier(cursor),
                )
            )
        return []
    diff = diff_schema(table, columns, existing)
    for col in diff.added:
        conn.execute(
            sql.SQL("alter table {t} add column {c} {ty}").format(
                t=sql.Identifier(schema, table), c=sql.Identifier(col.name), ty=sql.SQL(col.pg_type)
            )
        )
    return [c.name for c in diff.added]


def _json_column(arr: pa.Array) -> pa.Array:
    # Nested values (ARRAY/STRUCT) become JSON text for jsonb; off the hot path (SQP has none).
    # A BigQuery ARRAY is never NULL (queries return []), but a Storage read may carry a null
    # list: load it as [] so both read paths give the same rows.
    empty = "[]" if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) else None
    return pa.array(
        [empty if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in arr.to_pylist()],
        pa.string(),
    )


def _bytea_column(arr: pa.Array) -> pa.Array:
    return pa.array([None if v is None else "\\x" + v.hex() for v in arr.to_pylist()], pa.string())


def prepare_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Make a batch CSV-encodable for COPY: nested -> JSON text, binary -> bytea hex, zoned
    timestamps -> UTC wall-clock time (read under TimeZone = UTC by apply_slice)."""
    cols = []
    changed = False
    for field, col in zip(batch.schema, batch.columns, strict=True):
        t = field.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
            cols.append(_json_column(col))
            changed = True
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
            cols.append(_bytea_column(col))
            changed = True
        elif pa.types.is_timestamp(t) and t.tz is not None:
            # Arrow stores instants as UTC; dropping the zone keeps the values (no copy).
            cols.append(col.cast(pa.timestamp(t.unit)))
            changed = True
        else:
            cols.append(col)
    if not changed:
        return batch
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


def encode_csv(batch: pa.RecordBatch) -> memoryview:
    """CSV for COPY ... (FORMAT csv): NULL is an empty field, '' is a quoted empty string.

    Zoned timestamps come out as UTC without a zone: COPY them under TimeZone = UTC.
    """
    out = pa.BufferOutputStream()
    pacsv.write_csv(prepare_batch(batch), out, _CSV_OPTIONS)
    return memoryview(out.getvalue())


# Rows encoded per COPY write: ~2.5 MB of SQP CSV, small enough to sit in the socket buffers
# while the next chunk is encoded, large enough to keep per-call overhead negligible.
CHUNK_ROWS = 8_192


def _encoded(
    batches: Iterable[pa.RecordBatch], check: Callable[[pa.RecordBatch], None] | None = None
) -> Iterator[tuple[int, memoryview]]:
    for batch in batches:
        if check is not None:
            check(batch)
        for offset in range(0, batch.num_rows, CHUNK_ROWS):
            chunk = batch.slice(offset, CHUNK_ROWS)
            yield chunk.num_rows, encode_csv(chunk)


def copy_columns(batch_schema: pa.Schema, table: str, expected: list[ColumnMapping]) -> list[str]:
    """Postgres column names for a batch's fields; the batch must match the mapped schema."""
    names = [pg_column_name(n) for n in batch_schema.names]
    known = {c.name for c in expected}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SchemaDriftError(
            f"{table}: the read returned columns {unknown} that the table schema does not list; "
            "the source changed during the run: re-run to pick up the new schema"
        )
    return names


@dataclass
class StorableCheck:
    """Rejects a batch holding a value Postgres cannot store: a NUL character in a string.

    Vectorised (one Arrow kernel per string column, ~1 GB/s) so it costs little next to COPY.
    The error names the table, slice, column and the row (its position in the slice and key
    values), so the value can be found and fixed in BigQuery.
    """

    table: str
    slice_label: str
    key_columns: list[str]
    rows_seen: int = 0

    def __call__(self, batch: pa.RecordBatch) -> None:
        for name, col in zip(batch.schema.names, batch.columns, strict=True):
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                continue
            bad = pc.match_substring(col, "\x00")
            if not pc.any(bad).as_py():
                continue
            i = pc.index(bad, True).as_py()
            count = pc.sum(bad).as_py()
            keys = [k for k in self.key_columns if k != name and k in batch.schema.names]
            key = ", ".join(f"{k}={batch.column(k)[i].as_py()!s}" for k in keys)
            raise BadSourceValueError(
                f"{self.table}: slice {self.slice_label}: column {name!r} holds a NUL character "
                f"(\\x00), which Postgres text cannot store, in {count} row(s) of a batch; first at "
                f"row {self.rows_seen + i + 1} of the slice ({key}). The slice was not loaded; "
                "remove the character in BigQuery (e.g. REPLACE(col, CHR(0), '')), then reload "
                "the slice with `refresh backfill`"
            )
        self.rows_seen += batch.num_rows


@dataclass
class SliceResult:
    rows_inserted: int
    rows_deleted: int
    # The distinct UTC days of the cursor values the slice deleted or inserted (sorted): the
    # days whose dbt periods it changed. None when unknown: a whole-table slice, or a cursor
    # of another type than date or timestamp.
    days: list[date] | None = None


def cursor_day(cursor: ColumnMapping) -> sql.Composable | None:
    """SQL for the UTC day of the cursor column's value, or None for another type."""
    column = sql.Identifier(cursor.name)
    if cursor.pg_type == "date":
        return column
    if cursor.pg_type == "timestamp with time zone":
        return sql.SQL("({} at time zone 'UTC')::date").format(column)
    if cursor.pg_type == "timestamp without time zone":
        return sql.SQL("{}::date").format(column)
    return None


def days_in_slice(
    conn: psycopg.Connection, schema: str, table: str, cursor: ColumnMapping, piece: Slice
) -> set[date] | None:
    """The distinct UTC days of the cursor values `schema.table` holds in `piece` (through the
    cursor column's index), or None when the cursor is not a date or timestamp."""
    day = cursor_day(cursor)
    if day is None or piece.start is None or piece.end is None:
        return None
    rows = conn.execute(
        sql.SQL("select distinct {d} from {t} where {c} >= %s and {c} < %s").format(
            d=day, t=sql.Identifier(schema, table), c=sql.Identifier(cursor.name)
        ),
        (_cursor_bound(piece.start, cursor.pg_type), _cursor_bound(piece.end, cursor.pg_type)),
    )
    return {d for (d,) in rows}


def _cursor_bound(value: date, cursor_pg_type: str) -> date | datetime:
    if cursor_pg_type == "date":
        return value
    from flows.core.planning import to_ts

    ts = to_ts(value)
    return ts.replace(tzinfo=None) if cursor_pg_type == "timestamp without time zone" else ts


def apply_slice(
    conn: psycopg.Connection,
    *,
    schema: str,
    table: str,
    control_schema: str,
    columns: list[ColumnMapping],
    cursor: ColumnMapping | None,
    piece: Slice,
    batches: Iterable[pa.RecordBatch],
    run_id: UUID,
    in_transaction: Any = None,
    checkpoint_key: str | None = None,
) -> SliceResult:
    """Replace one slice of `schema.table` with `batches` and checkpoint it, atomically.

    The first batch is read before the transaction opens: a slow or dead source then never
    keeps a transaction (and the rows it deleted) open. A batch with a value Postgres cannot
    store fails the whole slice (BadSourceValueError), nothing of it is written.
    """
    target = sql.Identifier(schema, table)
    it: Iterator[pa.RecordBatch] = iter(batches)
    first = next(it, None)
    names = copy_columns(first.schema, table, columns) if first is not None else []
    # A row is named by the source's first column and the cursor (SQP: the ASIN and the week).
    keys = [first.schema.names[0]] if first is not None else []
    if cursor is not None and cursor.source_name not in keys:
        keys.append(cursor.source_name)
    check = StorableCheck(table, piece.label, keys)
    with conn.transaction():
        # Two transactions of one slice (a Dask task run again on another worker while the first
        # still runs) would each delete only the rows committed before they started, and both
        # insert: the second waits here, then deletes the first's rows.
        conn.execute(
            "select pg_advisory_xact_lock(%s, hashtext(%s))",
            (SLICE_LOCK_KEY, f"{checkpoint_key or table}:{piece.label}"),
        )
        conn.execute(
            "select set_config('TimeZone', 'UTC', true), set_config(%s, %s, true), set_config(%s, %s, true)",
            (
                RUN_SETTING,
                str(run_id),
                SLICE_SETTING,
                "" if piece.start is None else to_ts(piece.start).isoformat(),
            ),
        )
        day = None if piece.start is None or cursor is None else cursor_day(cursor)
        days: set[date] | None = None
        if piece.start is None or cursor is None:
            deleted = conn.execute(sql.SQL("delete from {}").format(target)).rowcount
        else:
            assert piece.end is not None
            in_slice = sql.SQL("{c} >= %s and {c} < %s").format(c=sql.Identifier(cursor.name))
            bounds = (_cursor_bound(piece.start, cursor.pg_type), _cursor_bound(piece.end, cursor.pg_type))
            if day is None:
                deleted = conn.execute(
                    sql.SQL("delete from {t} where {w}").format(t=target, w=in_slice), bounds
                ).rowcount
            else:
                # The deleted rows' days in the same statement: no second scan of the slice.
                row = conn.execute(
                    sql.SQL(
                        "with gone as (delete from {t} where {w} returning {d} as day) "
                        "select count(*), coalesce(array_agg(distinct day), '{{}}') from gone"
                    ).format(t=target, w=in_slice, d=day),
                    bounds,
                ).fetchone()
                assert row is not None
                deleted, days = row[0], set(row[1])
        inserted = 0
        if first is not None:
            stmt = sql.SQL("copy {t} ({cols}) from stdin (format csv)").format(
                t=target, cols=sql.SQL(", ").join(map(sql.Identifier, names))
            )
            with conn.cursor() as cur, cur.copy(stmt) as copy:
                for rows, data in _encoded(itertools.chain([first], it), check):
                    copy.write(data)
                    inserted += rows
        if days is not None and cursor is not None and inserted:
            # Through the cursor column's index, over this slice's new rows only.
            days.update(days_in_slice(conn, schema, table, cursor, piece) or ())
        checkpoints.record(
            conn, control_schema, checkpoint_key or table, piece.start_ts, piece.end_ts, run_id, inserted
        )
        if in_transaction is not None:
            in_transaction(conn, inserted, deleted)
    return SliceResult(
        rows_inserted=inserted, rows_deleted=deleted, days=None if days is None else sorted(days)
    )
