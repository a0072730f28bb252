"""The run's Prefect artifact: a markdown report of its summary."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from flows.control.runs import RunSummary
from flows.core.settings import Settings

MAX_PLAN_LINES = 12


def markdown_report(summary: RunSummary, settings: Settings) -> str:
    """The run's Prefect artifact: status and why, per table, dbt, and where to look next."""
    docs = Path(settings.dbt_project_dir) / "target" / "index.html"
    dashboard = settings.dashboard_url or f"http://{settings.api_host}:{settings.api_port}/"
    lines = [
        f"# Refresh {summary.status.upper()}{' (dry run)' if summary.dry_run else ''}",
        "",
        summary.message,
        "",
        f"{len(summary.tables)} table(s), {sum(t['slices'] for t in summary.tables)} slice(s), "
        f"{sum(t['rows_inserted'] for t in summary.tables)} rows inserted in {summary.duration_s}s.",
        "",
        "| table | status | mode | window | slices | skipped | rows read | rows inserted "
        "| rows deleted | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in summary.tables:
        lines.append(
            f"| {t['table']} | {t['status']} | {t['mode']} | {t['window'] or '-'} | {t['slices']} | "
            f"{t['slices_skipped']} | {t['rows_read']} | {t['rows_inserted']} | {t['rows_deleted']} | "
            f"{t['duration_s']} |"
        )
    errors = [t for t in summary.tables if t["error"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- **{t['table']}**: {t['error']}" for t in errors]
    planned = [t for t in summary.tables if t["plan"]]
    if planned:
        lines += ["", "## Plan (rows and estimated bytes per slice)", ""]
        for t in planned:
            shown = t["plan"][:MAX_PLAN_LINES]
            more = len(t["plan"]) - len(shown)
            lines.append(
                f"- **{t['table']}**: "
                + ", ".join(
                    f"{p['slice']} {p.get('estimated_rows', '?')} rows ~{p['estimated_bytes']} B"
                    for p in shown
                )
                + (f", and {more} more" if more > 0 else "")
            )
    checked = [v for v in summary.validation if not v["skipped"]]
    if checked:
        lines += ["", "## Validation against BigQuery (the periods this run loaded)", ""]
        lines += [
            f"- **{v['table']}**: {v['periods']} period(s), "
            + (f"differ: {', '.join(v['failed'])}" if v["failed"] else (v["error"] or "all equal"))
            + f" ({v['duration_s']}s, {v['bytes_processed']} B)"
            for v in checked
        ]
    if summary.shadow:
        sh = summary.shadow
        lines += [
            "",
            "## Shadow",
            "",
            f"{', '.join(sh['tables'])}: shadow dbt build {'ok' if sh['dbt_success'] else 'failed'}; "
            f"{sh['periods_compared']} model period(s) compared with live, "
            + (f"differ: {', '.join(sh['differs'][:MAX_PLAN_LINES])}" if sh["differs"] else "all equal"),
        ]
    lines += [
        "",
        "## dbt",
        "",
        f"{summary.dbt_models_built} models built, {summary.dbt_nodes} nodes, "
        f"{len(summary.dbt_failed)} failed, {len(summary.dbt_skipped)} skipped "
        f"(invocation `{summary.dbt_invocation_id or 'none'}`).",
        "",
    ]
    if summary.dbt_failed:
        lines += ["Failed: " + ", ".join(f"`{u}`" for u in summary.dbt_failed), ""]
    if summary.dbt_skipped:
        lines += [
            "Skipped because something upstream failed (stale until the next build): "
            + ", ".join(f"`{u}`" for u in summary.dbt_skipped),
            "",
        ]
    if summary.first_error:
        lines += [f"First error: {summary.first_error}", ""]
    lines += [
        f"dbt docs (lineage from the BigQuery sources to the summaries): `refresh docs` writes and "
        f"serves `{docs}`.",
        "",
        "## Audit",
        "",
        f"Run `{summary.run_id}`, flow run `{summary.flow_run_id or '-'}`: `refresh history` lists it; "
        f"its rows in `{settings.control_schema}` (table_refreshes, slice_refreshes, dbt_invocations) "
        "carry the run id.",
        f"Dashboard: [{dashboard}]({dashboard}) (`refresh api` serves it).",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')}.",
    ]
    return "\n".join(lines)
