"""Retries in the audit: how many attempts a slice took, how many retries a table refresh made.

`start_counting()` opens a counter for the table being refreshed in this thread (a context
variable: each task thread has its own); `bump()` adds one retry to it: called by the slice
retry loop and as `on_error` of the BigQuery client's request retries, which run in the
thread that makes the call. A slice run on a Dask worker counts in the worker and hands its
count back with its result (`add`).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control.checkpoints import START_PARAM
from flows.core.db import qualified


@dataclass
class RetryCount:
    n: int = 0


_current: contextvars.ContextVar[RetryCount | None] = contextvars.ContextVar("retry_count", default=None)


def start_counting() -> RetryCount:
    count = RetryCount()
    _current.set(count)
    return count


def bump(_exc: BaseException | None = None) -> None:
    add(1)


def add(n: int) -> None:
    """Adds `n` retries made elsewhere (a slice's on a Dask worker, flows.engine.scale_out)."""
    count = _current.get()
    if count is not None:
        count.n += n


def set_slice_attempts(
    conn: psycopg.Connection,
    schema: str,
    run_id: UUID,
    table: str,
    slice_start: datetime | None,
    attempts: int,
) -> None:
    """On the slice's audit row just written in this transaction (its newest for the slice)."""
    conn.execute(
        sql.SQL(
            "update {s} set attempts = %s where id = (select max(id) from {s} where run_id = %s "
            "and table_name = %s and slice_start = {start})"
        ).format(s=qualified(schema, "slice_refreshes"), start=START_PARAM),
        (attempts, run_id, table, slice_start),
    )


def add_table_retries(conn: psycopg.Connection, schema: str, run_id: UUID, table: str, retries: int) -> None:
    """Added, not set: a table tried again as a whole (a Prefect task retry) keeps its count."""
    conn.execute(
        sql.SQL("update {t} set retries = retries + %s where run_id = %s and table_name = %s").format(
            t=qualified(schema, "table_refreshes")
        ),
        (retries, run_id, table),
    )
