"""Data-quality results (`dq_results`) and the `validation.failed` event (webhook outbox).

One validation of one table is recorded in one transaction: a row per period and, when a period
differs, the event. Every row of that transaction shares `checked_at` (now()), which is what
"the latest validation of a table" means to `latest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control import outbox
from flows.core.db import qualified

VALIDATION_FAILED = "validation.failed"


@dataclass(frozen=True)
class DqRow:
    table_name: str
    check_name: str
    period_start: datetime | None  # UTC midnight of the period's first day
    status: str  # pass | warn | fail
    expected: int | None
    observed: int | None
    details: dict[str, Any]


def record(conn: psycopg.Connection, schema: str, rows: list[DqRow], run_id: UUID | None = None) -> None:
    """Insert the rows; call inside the transaction that also raises the event, if any."""
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "insert into {} (run_id, table_name, check_name, period_start, status, expected, "
                "observed, details) values (%s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(qualified(schema, "dq_results")),
            [
                (
                    run_id,
                    r.table_name,
                    r.check_name,
                    r.period_start,
                    r.status,
                    r.expected,
                    r.observed,
                    json.dumps(r.details, default=str),
                )
                for r in rows
            ],
        )


def emit_event(
    conn: psycopg.Connection,
    schema: str,
    event: str,
    table_name: str | None,
    payload: dict[str, Any],
    run_id: UUID | None = None,
) -> None:
    """The one place validation and rollout raise an event: into the webhook outbox, in the
    caller's transaction (with the dq or mode-change rows), queued for subscribed endpoints."""
    outbox.emit(conn, schema, event, {"table": table_name, **payload}, table_name=table_name, run_id=run_id)


def record_per_relation(
    conn: psycopg.Connection,
    control_schema: str,
    rows: list[DqRow],
    check: str,
    failed: dict[str, list[str]],
    run_id: UUID | None,
) -> None:
    """The dq rows and one `validation.failed` per relation with failed periods, in one
    transaction."""
    with conn.transaction():
        record(conn, control_schema, rows, run_id)
        for name in sorted(failed):
            emit_event(
                conn,
                control_schema,
                VALIDATION_FAILED,
                name,
                {"check": check, "periods_failed": failed[name]},
                run_id,
            )


@dataclass(frozen=True)
class LatestValidation:
    checked_at: datetime
    periods: int
    failed: int
    schema: str | None

    @property
    def passed(self) -> bool:
        return self.periods > 0 and self.failed == 0


def latest(
    conn: psycopg.Connection, schema: str, table_name: str, check_name: str
) -> LatestValidation | None:
    """The most recent validation of a table (all rows recorded together), or None."""
    row = conn.execute(
        sql.SQL(
            "select checked_at, count(*), count(*) filter (where status = 'fail'), "
            "min(details->>'schema') from {t} where table_name = %s and check_name = %s "
            "and checked_at = (select max(checked_at) from {t} where table_name = %s and check_name = %s) "
            "group by checked_at"
        ).format(t=qualified(schema, "dq_results")),
        (table_name, check_name, table_name, check_name),
    ).fetchone()
    if row is None:
        return None
    return LatestValidation(row[0], int(row[1]), int(row[2]), row[3])
