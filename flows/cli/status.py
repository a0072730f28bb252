"""`refresh status` and `refresh history`: the same reads the API's status and history use
(flows.control.history)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from flows.cli.common import (
    PG_HINT,
    fail,
    load_settings,
    new_grid,
    one_line_errors,
    out,
    parse_date,
    plain,
    seconds,
    ts,
)


def _print_run(r: dict[str, Any]) -> None:
    from flows.control.runs import RunStatus

    color = {RunStatus.SUCCESS: "green", RunStatus.WARNING: "yellow", RunStatus.RUNNING: "cyan"}.get(
        r["status"], "red"
    )
    took = seconds(r["duration_s"])
    out.print(
        f"{ts(r['started_at'])}  [{color}]{r['status']:<9}[/] {r['trigger']:<9} {took:>8}  "
        f"{r['tables_planned']} table(s), {r['tables_failed']} failed, {r['rows_inserted']} rows inserted"
    )
    out.print(f"    run {r['run_id']}  flow run {r['flow_run_id'] or '-'}")
    if r["message"]:
        out.print(f"    {plain(r['message'])}")


def _print_table_refresh(r: dict[str, Any]) -> None:
    from flows.control.statuses import TableStatus

    color = {TableStatus.SUCCESS: "green", TableStatus.PLANNED: "cyan", TableStatus.RUNNING: "cyan"}.get(
        r["status"], "red"
    )
    took = seconds(r["duration_s"])
    out.print(
        f"{ts(r['started_at'])}  [{color}]{r['status']:<8}[/] {r['mode']:<8} {took:>8}  "
        f"{r['slices_done']} slice(s), read {r['rows_read']}, inserted {r['rows_inserted']}, "
        f"deleted {r['rows_deleted']}  run {r['run_id']}"
    )
    if r["message"]:
        out.print(f"    error: {plain(r['message'])}")


def status(
    hours: Annotated[int, typer.Option(min=1, max=24 * 30, help="Runs of the last N hours")] = 24,
) -> None:
    """Is a refresh running, the latest runs, and per table: last refresh, last success, next due."""
    settings = load_settings()
    from flows.control.history import HistoryQuery, read_history, table_status
    from flows.control.runs import refresh_running
    from flows.control.status import has_table
    from flows.core.db import connect

    with one_line_errors(PG_HINT, settings), connect(settings, autocommit=True) as conn:
        if not has_table(conn, settings.control_schema, "refresh_runs"):
            fail("no refresh has run against this database yet", "run `refresh run` (or `refresh migrate`)")
        running = refresh_running(conn)
        since = datetime.now(UTC) - timedelta(hours=hours)
        latest = read_history(conn, settings.control_schema, HistoryQuery(page_size=20))
        runs = [r for r in latest.rows if r["started_at"] >= since]
        tables = table_status(conn, settings.control_schema)
    out.print(f"refresh running now: {'yes' if running else 'no'}")
    for r in runs:
        _print_run(r)
    if not runs:
        out.print(f"no runs in the last {hours}h")
    per_table = new_grid("table", "mode", "last status", "last success (UTC)", "next due (UTC)")
    for row in tables:
        per_table.add_row(
            row["table_name"],
            row["mode"] if row["enabled"] else "disabled",
            row["last_status"] or "-",
            ts(row["last_success_at"]),
            ts(row["next_refresh_at"]) if row["next_refresh_at"] else "now (never refreshed)",
        )
    out.print(per_table)


def history(
    table: Annotated[
        str | None, typer.Option("--table", help="One table's refreshes instead of runs")
    ] = None,
    status_: Annotated[str | None, typer.Option("--status", help="Only this status")] = None,
    since: Annotated[str | None, typer.Option(help="Started on or after (YYYY-MM-DD)")] = None,
    until: Annotated[str | None, typer.Option(help="Started on or before (YYYY-MM-DD)")] = None,
    page: Annotated[int, typer.Option(help="Page number, from 1")] = 1,
    page_size: Annotated[int, typer.Option(help="Rows per page (at most 100)")] = 20,
) -> None:
    """Past runs (or one table's refreshes), newest first, filtered and paged."""
    settings = load_settings()
    from flows.control.history import HistoryQuery, read_history
    from flows.core.db import connect

    with one_line_errors("see `refresh history --help`", settings):
        q = HistoryQuery(
            table=table,
            status=status_,
            since=parse_date(since, "--since"),
            until=parse_date(until, "--until"),
            page=page,
            page_size=page_size,
        )
        with connect(settings, autocommit=True) as conn:
            result = read_history(conn, settings.control_schema, q)
    for r in result.rows:
        if table:
            _print_table_refresh(r)
        else:
            _print_run(r)
    pages = max(1, -(-result.total // q.page_size))
    out.print(f"page {q.page} of {pages} ({result.total} matching)")
