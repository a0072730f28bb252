"""Reading slices of a BigQuery table as Arrow record batches.

The Storage Read API is the main path: one read session per slice with a row restriction,
record batches decoded straight from the IPC bytes, so memory holds one batch per stream at a
time whatever the table size. The REST path (a query job paged with page tokens) is the
fallback where Storage Read is not available. Neither uses OFFSET.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import TypeVar, cast

import pyarrow as pa

from flows.core.errors import SourceError, TransientError
from flows.core.identifiers import bq_quote, bq_table_path
from flows.core.planning import Slice
from flows.core.table_config import TableConfig
from flows.engine.bigquery import BigQueryClients, classify


@dataclass(frozen=True)
class SourceColumn:
    name: str
    field_type: str
    mode: str
    precision: int | None
    scale: int | None


@dataclass(frozen=True)
class SourceTable:
    name: str
    columns: list[SourceColumn]
    num_rows: int | None
    num_bytes: int | None
    # Time partitioning (column, DAY|HOUR|MONTH|YEAR); None: not time-partitioned on a column.
    partitioning: tuple[str, str] | None = None

    def column(self, name: str) -> SourceColumn:
        for c in self.columns:
            if c.name == name or c.name.lower() == name.lower():
                return c
        raise SourceError(
            f"{self.name}: cursor column {name!r} does not exist in the source "
            f"(columns: {', '.join(c.name for c in self.columns)}); fix cursor_column in the registry"
        )


def describe(clients: BigQueryClients, table: str) -> SourceTable:
    try:
        t = clients.rest.get_table(f"{clients.project}.{clients.dataset}.{table}", **clients.call_options())
    except Exception as exc:
        raise classify(exc, f"{table}: reading the table schema from {clients.rest_where}") from exc
    cols = [SourceColumn(f.name, f.field_type, f.mode or "NULLABLE", f.precision, f.scale) for f in t.schema]
    tp = t.time_partitioning
    partitioning = (tp.field, str(tp.type_)) if tp is not None and tp.field else None
    return SourceTable(table, cols, t.num_rows, t.num_bytes, partitioning)


def check_reachable(clients: BigQueryClients) -> None:
    """Fail fast, before a run writes anything, when BigQuery cannot be reached at all.

    One dataset lookup within REFRESH_BQ_TIMEOUT_S. Only unreachability stops the run here; any
    other answer (even an error such as not found) shows the endpoint is up, and the steps that
    follow report it as usual.
    """
    try:
        clients.rest.get_dataset(f"{clients.project}.{clients.dataset}", **clients.call_options())
    except Exception as exc:
        if isinstance(classify(exc, ""), TransientError):
            raise SourceError(
                f"cannot reach {clients.rest_where} within {clients.settings.bq_timeout_s:.0f}s "
                f"(REFRESH_BQ_TIMEOUT_S): {type(exc).__name__}: {exc}; this run did nothing: "
                "check the network, REFRESH_BQ_ENDPOINT or BigQuery's status, then run again"
            ) from exc


def list_source_tables(clients: BigQueryClients) -> list[str]:
    try:
        dataset = f"{clients.project}.{clients.dataset}"
        return [t.table_id for t in clients.rest.list_tables(dataset, **clients.call_options())]
    except Exception as exc:
        raise classify(exc, f"listing tables of dataset {clients.dataset} at {clients.rest_where}") from exc


def _literal(col: SourceColumn, d: date) -> str:
    # Slice bounds are dates computed by the planner, never user text.
    t = col.field_type.upper()
    if t == "DATE":
        return f"DATE '{d.isoformat()}'"
    if t == "DATETIME":
        return f"DATETIME '{d.isoformat()} 00:00:00'"
    if t == "TIMESTAMP":
        return f"TIMESTAMP '{d.isoformat()} 00:00:00+00'"
    raise SourceError(
        f"cursor column {col.name!r} is {t}: use a DATE, DATETIME or TIMESTAMP column as cursor"
    )


def row_restriction(col: SourceColumn, s: Slice) -> str:
    if s.start is None or s.end is None:
        return ""
    q = bq_quote(col.name)
    return f"{q} >= {_literal(col, s.start)} AND {q} < {_literal(col, s.end)}"


def cursor_range(
    clients: BigQueryClients, cfg: TableConfig, col: SourceColumn
) -> tuple[date | None, date | None]:
    """Oldest and newest cursor value (as UTC dates); scans only the cursor column."""
    q = bq_quote(col.name)
    path = bq_table_path(clients.project, clients.dataset, cfg.source_table)
    expr = f"date({q})" if col.field_type.upper() != "DATE" else q
    sql = f"select min({expr}) as lo, max({expr}) as hi from {path}"
    try:
        opts = clients.call_options()
        row = next(iter(clients.rest.query(sql, job_config=clients.query_config(), **opts).result(**opts)))
    except Exception as exc:
        raise classify(exc, f"{cfg.table_name}: reading the cursor range from {clients.rest_where}") from exc
    return row["lo"], row["hi"]


def estimate_bytes(clients: BigQueryClients, cfg: TableConfig, where: str) -> int:
    """BigQuery's dry-run estimate of the bytes a slice read scans."""
    path = bq_table_path(clients.project, clients.dataset, cfg.source_table)
    sql = f"select * from {path}" + (f" where {where}" if where else "")
    return clients.dry_run_bytes(sql, f"{cfg.table_name}: dry-run estimate")


def rows_per_day(
    clients: BigQueryClients, cfg: TableConfig, col: SourceColumn | None, span: Slice | None
) -> dict[date | None, int]:
    """Rows per cursor day within `span` (without a cursor: all rows under None), the dry run's
    row estimate: scans the cursor column only (a bare count(*) is free in BigQuery)."""
    path = bq_table_path(clients.project, clients.dataset, cfg.source_table)
    if col is None or span is None:
        sql = f"select cast(null as date) as d, count(*) as n from {path}"
    else:
        q = bq_quote(col.name)
        expr = f"date({q})" if col.field_type.upper() != "DATE" else q
        where = row_restriction(col, span)
        sql = (
            f"select {expr} as d, count(*) as n from {path}"
            + (f" where {where}" if where else "")
            + " group by d"
        )
    try:
        return {
            r["d"]: int(r["n"]) for r in clients.rest.query(sql, job_config=clients.query_config()).result()
        }
    except Exception as exc:
        raise classify(exc, f"{cfg.table_name}: counting rows for the plan") from exc


@functools.cache
def _return_large_buffers_to_the_os() -> None:
    """Serve allocations of 4 MiB and more by mmap, so each freed read buffer (a Storage message
    can be tens of MB, held several times over by gRPC, protobuf and Arrow) goes back to the OS
    at once. glibc's default threshold slides up to 32 MiB after the first such free and then
    keeps those buffers in the heap: peak RSS of the 2M-row extraction benchmark was ~150 MB
    higher without this. A no-op where the C library has no mallopt."""
    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 4 * 1024 * 1024)


@dataclass
class ReadStats:
    rows: int = 0
    bytes: int = 0


def read_storage(
    clients: BigQueryClients, table: str, where: str, stats: ReadStats, streams: int = 1
) -> Iterator[pa.RecordBatch]:
    """Stream a slice through the Storage Read API.

    One reader thread per stream feeds a queue of at most two batches per stream, so memory
    stays bounded while streams are read in parallel, and the consumer notices a stream that
    delivers nothing for REFRESH_BQ_STALL_TIMEOUT_S (a dead or hung endpoint keeps a socket
    open for minutes): the streams are cancelled and a TransientError names the endpoint.
    """
    from google.cloud.bigquery_storage_v1 import types

    _return_large_buffers_to_the_os()
    storage = clients.storage()
    session_spec = types.ReadSession(
        table=f"projects/{clients.project}/datasets/{clients.dataset}/tables/{table}",
        data_format=types.DataFormat.ARROW,
        read_options=types.ReadSession.TableReadOptions(row_restriction=where),
    )
    where_ = clients.storage_where
    try:
        session = storage.create_read_session(
            parent=f"projects/{clients.project}",
            read_session=session_spec,
            max_stream_count=streams,
            retry=clients.storage_retry(),
            timeout=clients.settings.bq_timeout_s,
        )
    except Exception as exc:
        raise classify(exc, f"{table}: creating a read session at {where_}") from exc
    if not session.streams:
        return
    schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema))

    # The bare gRPC calls, not the library's ReadRowsStream: that one waits for the first
    # message while it is created (a stalled endpoint hangs the caller, beyond any watchdog) and
    # reconnects for up to a day. These start at once and cancel() ends them from any thread; a
    # broken stream fails the slice attempt, which is retried whole within the table's budget.
    readers = [
        storage._transport.read_rows(
            types.ReadRowsRequest(read_stream=s.name),
            metadata=(("x-goog-request-params", f"read_stream={s.name}"),),
        )
        for s in session.streams
    ]

    def batches(reader: Iterable[types.ReadRowsResponse]) -> Iterator[tuple[int, pa.RecordBatch]]:
        for resp in reader:
            if not resp.row_count:
                continue
            payload = resp.arrow_record_batch.serialized_record_batch
            yield len(payload), pa.ipc.read_record_batch(pa.py_buffer(payload), schema)

    stall_s = clients.settings.bq_stall_timeout_s

    def stalled() -> Exception:
        for r in readers:
            r.cancel()
        return TransientError(
            f"{table}: {where_} sent nothing for {stall_s:.0f}s (REFRESH_BQ_STALL_TIMEOUT_S): "
            "the read stream stalled"
        )

    try:
        read = _in_threads([batches(r) for r in readers], stall_s=stall_s, on_stall=stalled)
        # Counted here, in the one consuming thread, not by the stream threads.
        for size, batch in read:
            stats.bytes += size
            stats.rows += batch.num_rows
            yield batch
    except SourceError:
        raise
    except Exception as exc:
        raise classify(exc, f"{table}: reading rows from {where_}") from exc
    finally:
        for r in readers:
            r.cancel()


_DONE = object()
T = TypeVar("T")


def _in_threads(
    sources: list[Iterable[T]],
    stall_s: float | None = None,
    on_stall: Callable[[], Exception] | None = None,
) -> Iterator[T]:
    """The items of every source, each source iterated in its own thread.

    A queue of at most two items per source bounds memory; the consumer sees the sources'
    items interleaved, and a source's exception is raised in the consumer. When the consumer
    stops early, the threads stop at their next item. When no item arrives for `stall_s`,
    the consumer raises `on_stall()` (which should also unblock the sources, e.g. cancel them).
    """
    q: queue.Queue[object] = queue.Queue(maxsize=2 * len(sources))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def work(source: Iterable[T]) -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in sources]
    for t in threads:
        t.start()
    done = 0
    try:
        while done < len(sources):
            try:
                item = q.get(timeout=stall_s)
            except queue.Empty:
                raise (on_stall() if on_stall else TimeoutError(f"no item for {stall_s}s")) from None
            if item is _DONE:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield cast(T, item)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def read_rest(
    clients: BigQueryClients, table: str, where: str, stats: ReadStats, page_size: int = 50_000
) -> Iterator[pa.RecordBatch]:
    """Fallback: a query job whose result is paged with page tokens (tabledata.list)."""
    path = bq_table_path(clients.project, clients.dataset, table)
    sql = f"select * from {path}" + (f" where {where}" if where else "")
    try:
        opts = clients.call_options()
        job = clients.rest.query(sql, job_config=clients.query_config(), **opts)
        result = job.result(page_size=page_size, **opts)
        for batch in result.to_arrow_iterable(bqstorage_client=None):
            rb = batch if isinstance(batch, pa.RecordBatch) else pa.record_batch(batch)
            stats.rows += rb.num_rows
            stats.bytes += rb.nbytes
            yield rb
    except Exception as exc:
        raise classify(exc, f"{table}: reading rows from {clients.rest_where}") from exc


def read_slice(
    clients: BigQueryClients, cfg: TableConfig, where: str, stats: ReadStats
) -> Iterator[pa.RecordBatch]:
    api = str(cfg.custom_params.get("read_api", "storage"))
    if api == "rest":
        return read_rest(clients, cfg.source_table, where, stats)
    return read_storage(clients, cfg.source_table, where, stats, clients.settings.bq_read_streams)
