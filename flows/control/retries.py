"""Retries in the audit: how many attempts a slice took, how many retries a table refresh made.

The retries themselves and their count while a table refreshes are flows.core.retry.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control.checkpoints import START_PARAM
from flows.core.db import qualified


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
