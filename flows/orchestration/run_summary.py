"""A run's outcome: its status and message from the tables, dbt, validation and shadow
(the summarise step)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from flows.control.dbt_audit import DbtOutcome, NodeRun, NodeStatus
from flows.control.runs import RunStatus, RunSummary
from flows.control.statuses import TableStatus
from flows.control.tables import TableOutcome
from flows.core.errors import one_line
from flows.engine.validation.after_refresh import AfterRefresh

# At most this many node names in a run's message (the summary and the audit keep them all).
MAX_NAMES_IN_MESSAGE = 10


def _names(nodes: list[NodeRun]) -> str:
    names = [n["name"] for n in nodes[:MAX_NAMES_IN_MESSAGE]]
    more = len(nodes) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def skipped_nodes(dbt: DbtOutcome) -> list[NodeRun]:
    return [n for n in dbt.nodes if n["status"] == NodeStatus.SKIPPED]


def first_error(outcomes: list[TableOutcome], dbt: DbtOutcome | None) -> str | None:
    """The first line of the first failed dbt node's error, else dbt's own, else a table's."""
    if dbt is not None and not dbt.success:
        for n in dbt.failed_nodes:
            if line := one_line(n["message"]):
                return f"{n['name']}: {line}"
        if line := one_line(dbt.message):
            return line
    for o in outcomes:
        if o.status == TableStatus.FAILED and (line := one_line(o.error)):
            return f"{o.table_name}: {line}"
    return None


def dbt_problem(dbt: DbtOutcome) -> str:
    """Which dbt nodes failed and which were skipped because of them, and the first error."""
    failed, skipped = dbt.failed_nodes, skipped_nodes(dbt)
    parts = []
    if failed:
        parts.append(f"{len(failed)} failed ({_names(failed)})")
    if skipped:
        parts.append(f"{len(skipped)} skipped, stale until the next build ({_names(skipped)})")
    error = first_error([], dbt)
    return "dbt: " + ("; ".join(parts) or "failed") + (f"; first error: {error}" if error else "")


def overall_status(outcomes: list[TableOutcome], dbt: DbtOutcome | None) -> tuple[RunStatus, str]:
    """success, warning (something failed, the rest went on) or failed, and why: the failed
    tables, the failed and skipped dbt nodes and the first error line."""
    failed = [o for o in outcomes if o.status == TableStatus.FAILED]
    problems = [f"{o.table_name}: {o.error}" for o in failed]
    if dbt is not None and not dbt.success:
        problems.append(dbt_problem(dbt))
    if outcomes and len(failed) == len(outcomes):
        return RunStatus.FAILED, "every table failed: " + " | ".join(problems)
    if dbt is not None and dbt.invocation_id is None and not dbt.success:
        return RunStatus.FAILED, " | ".join(problems)
    if problems:
        ok = len(outcomes) - len(failed)
        return RunStatus.WARNING, f"{ok} of {len(outcomes)} table(s) refreshed; " + " | ".join(problems)
    if not outcomes:
        return RunStatus.SUCCESS, "no table was due"
    if all(o.status == TableStatus.PLANNED for o in outcomes):
        return RunStatus.SUCCESS, f"dry run: {len(outcomes)} table(s) planned, nothing written"
    return RunStatus.SUCCESS, f"{len(outcomes)} table(s) refreshed"


def with_validation(status: RunStatus, message: str, checks: list[AfterRefresh]) -> tuple[RunStatus, str]:
    """A period that differs from BigQuery (or a validation that could not run) makes a
    successful run a `warning` naming the table and period; a failed run stays failed."""
    problems = [f"{v.table_name} differs from BigQuery in {', '.join(v.failed)}" for v in checks if v.failed]
    problems += [f"{v.table_name}: validation could not run: {v.error}" for v in checks if v.error]
    if not problems:
        return status, message
    note = "validation: " + " | ".join(problems) + " (`refresh validate-data` shows the rows)"
    return (RunStatus.WARNING if status == RunStatus.SUCCESS else status), f"{message} | {note}"


def with_shadow(message: str, shadow: dict[str, Any] | None) -> str:
    if not shadow or (shadow["dbt_success"] and not shadow["differs"]):
        return message
    notes = []
    if shadow.get("error"):
        notes.append(f"shadow comparison could not run: {shadow['error']}")
    elif not shadow["dbt_success"]:
        notes.append(
            f"shadow dbt build failed ({', '.join(shadow['dbt_failed'][:5]) or 'see dbt_invocations'})"
        )
    if shadow["differs"]:
        shown = shadow["differs"][:MAX_NAMES_IN_MESSAGE]
        more = len(shadow["differs"]) - len(shown)
        notes.append(
            "shadow differs from live in " + ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        )
    return f"{message} | " + "; ".join(notes)


def summarise(
    run_id: UUID,
    outcomes: list[TableOutcome],
    dbt: DbtOutcome | None,
    dry_run: bool,
    *,
    flow_run_id: UUID | None = None,
    duration_s: float = 0.0,
    validation: list[AfterRefresh] | None = None,
    shadow: dict[str, Any] | None = None,
) -> RunSummary:
    status, message = overall_status(outcomes, dbt)
    status, message = with_validation(status, message, validation or [])
    return RunSummary(
        shadow=shadow,
        message=with_shadow(message, shadow),
        validation=[v.to_dict() for v in validation or []],
        run_id=str(run_id),
        status=status,
        dry_run=dry_run,
        flow_run_id=str(flow_run_id) if flow_run_id else None,
        duration_s=round(duration_s, 2),
        tables=[
            {
                "table": o.table_name,
                "status": o.status,
                "mode": o.mode,
                "rows_read": o.rows_read,
                "rows_inserted": o.rows_inserted,
                "rows_deleted": o.rows_deleted,
                "slices": o.slices_done,
                "slices_skipped": o.slices_skipped,
                "duration_s": round(o.duration_s, 2),
                "window": None if o.window is None else f"{o.window.first}..{o.window.last}",
                "error": o.error,
                "plan": o.plan,
            }
            for o in outcomes
        ],
        dbt_models_built=dbt.models_built if dbt else 0,
        dbt_nodes=len(dbt.nodes) if dbt else 0,
        dbt_failed=[n["unique_id"] for n in dbt.failed_nodes] if dbt else [],
        dbt_skipped=[n["unique_id"] for n in skipped_nodes(dbt)] if dbt else [],
        first_error=first_error(outcomes, dbt),
        dbt_invocation_id=dbt.invocation_id if dbt else None,
    )
