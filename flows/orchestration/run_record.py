"""A run's row in `refresh_runs`, begun and finished, each with its webhook events in the
same transaction (transactional outbox)."""

from __future__ import annotations

from uuid import UUID

import psycopg

from flows.control import runs
from flows.control.runs import RunSummary
from flows.control.statuses import TableStatus
from flows.core.settings import Settings
from flows.notify import webhook_events
from flows.orchestration.run_params import RunParams


def begin_run(
    lock_conn: psycopg.Connection,
    settings: Settings,
    *,
    flow_run_id: UUID | None,
    params: RunParams,
) -> runs.RunRecord:
    with lock_conn.transaction():  # a killed run's refresh.failed event commits with its row
        runs.mark_abandoned(lock_conn, settings.control_schema)
        webhook_events.runs_abandoned(lock_conn, settings)
    return runs.start_run(
        lock_conn,
        settings.control_schema,
        flow_run_id=flow_run_id,
        trigger=params.trigger,
        params=params.to_json(),
    )


def finish_run(
    conn: psycopg.Connection, settings: Settings, run: runs.RunRecord, summary: RunSummary
) -> None:
    ok = sum(1 for t in summary.tables if t["status"] in (TableStatus.SUCCESS, TableStatus.PLANNED))
    # The webhook event commits with the run row or not at all (transactional outbox).
    with conn.transaction():
        runs.finish_run(
            conn,
            settings.control_schema,
            run.run_id,
            status=runs.RunStatus(summary.status),
            message=summary.message,
            tables_planned=len(summary.tables),
            tables_succeeded=ok,
            tables_failed=len(summary.tables) - ok,
            rows_read=sum(t["rows_read"] for t in summary.tables),
            rows_inserted=sum(t["rows_inserted"] for t in summary.tables),
            dbt_invocation_id=summary.dbt_invocation_id,
        )
        webhook_events.run_finished(conn, settings, summary)
    if summary.dry_run:
        runs.set_plan(conn, settings.control_schema, run.run_id, summary.tables)
