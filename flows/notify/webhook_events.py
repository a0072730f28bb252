"""The webhook events and their payloads, written to the outbox (flows.control.outbox.emit) in
the transaction of the audit row that causes them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import psycopg

from flows.control import outbox
from flows.control.runs import RunStatus, RunSummary
from flows.control.statuses import TableStatus
from flows.core.errors import SchemaDriftError
from flows.core.settings import Settings

if TYPE_CHECKING:
    from flows.control.tables import TableOutcome

EVENT_TYPES = (
    "refresh.completed",
    "refresh.warning",
    "refresh.failed",
    "table.failed",
    "table.registered",
    "schema.drift",
    "validation.failed",
    "table.cutover",
    "table.rollback",
    "delivery.exhausted",
)
RUN_EVENTS = {
    RunStatus.SUCCESS: "refresh.completed",
    RunStatus.WARNING: "refresh.warning",
    RunStatus.FAILED: "refresh.failed",
}
MAX_ERROR_CHARS = 500


def shorten(text: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    """`text` cut to `limit` characters, saying how long it was (errors in payloads stay small)."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 20] + f"... ({len(text)} chars)"


def links(flow_run_id: str | None, settings: Settings) -> dict[str, str]:
    out: dict[str, str] = {}
    if settings.dashboard_url:
        out["dashboard"] = settings.dashboard_url
    ui = os.environ.get("PREFECT_UI_URL", "").rstrip("/")
    if ui and flow_run_id:
        out["prefect_flow_run"] = f"{ui}/runs/flow-run/{flow_run_id}"
    return out


def run_finished(conn: psycopg.Connection, settings: Settings, summary: RunSummary) -> str | None:
    """The run's refresh.completed / .warning / .failed event (call in the run row's transaction).

    A dry run writes nothing but its run row, and tells nobody: no event.
    """
    if summary.dry_run:
        return None
    data = {
        "run_id": summary.run_id,
        "flow_run_id": summary.flow_run_id,
        "status": summary.status,
        "message": shorten(summary.message, 2000),
        "duration_s": summary.duration_s,
        "tables": [
            {
                "table": t["table"],
                "status": t["status"],
                "mode": t["mode"],
                "rows_read": t["rows_read"],
                "rows_inserted": t["rows_inserted"],
                "rows_deleted": t["rows_deleted"],
                "slices": t["slices"],
                "window": t["window"],
                "error": shorten(t["error"]),
            }
            for t in summary.tables
        ],
        "dbt": {
            "invocation_id": summary.dbt_invocation_id,
            "models_built": summary.dbt_models_built,
            "failed": summary.dbt_failed[:20],
        },
        "links": links(summary.flow_run_id, settings),
    }
    return outbox.emit(conn, settings.control_schema, RUN_EVENTS[summary.status], data, run_id=summary.run_id)


def runs_abandoned(conn: psycopg.Connection, settings: Settings) -> int:
    """refresh.failed for each run this transaction marked abandoned (a killed process)."""
    rows = outbox.abandoned_now(conn, settings.control_schema)
    for r in rows:
        flow_run_id = str(r["flow_run_id"]) if r["flow_run_id"] else None
        data = {
            "run_id": str(r["run_id"]),
            "flow_run_id": flow_run_id,
            "status": RunStatus.ABANDONED,
            "message": shorten(r["message"], 2000),
            "started_at": r["started_at"].isoformat(),
            "links": links(flow_run_id, settings),
        }
        outbox.emit(conn, settings.control_schema, "refresh.failed", data, run_id=r["run_id"])
    return len(rows)


def table_finished(
    conn: psycopg.Connection, settings: Settings, rec: TableOutcome, failure: BaseException | None
) -> None:
    """table.failed (and schema.drift when drift stopped it); call in the audit row's transaction."""
    if rec.status != TableStatus.FAILED:
        return
    data = {
        "run_id": str(rec.run_id),
        "table": rec.table_name,
        "mode": rec.mode,
        "error": shorten(rec.error),
        "slices_done": rec.slices_done,
        "rows_inserted": rec.rows_inserted,
        "links": links(None, settings),
    }
    schema = settings.control_schema
    outbox.emit(conn, schema, "table.failed", data, table_name=rec.table_name, run_id=rec.run_id)
    if isinstance(failure, SchemaDriftError):
        outbox.emit(conn, schema, "schema.drift", data, table_name=rec.table_name, run_id=rec.run_id)
