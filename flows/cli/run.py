"""`refresh run` and `refresh backfill`: the daily refresh in this process, with a live progress
display (tables and slices from the audit tables, dbt nodes from dbt's log) and a summary."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from flows.cli.common import (
    TablesOption,
    WithStackOption,
    embedded_stack,
    exit_for,
    load_settings,
    new_grid,
    one_line_errors,
    out,
    parse_date,
    plain,
    split_names,
)
from flows.core.errors import RefreshError
from flows.core.settings import Settings


class _RunProgress:
    """Live progress of the refresh running now, read every half second: one line per table
    with its slices and rows so far (from the audit tables), then the dbt build's nodes done of
    the total and the nodes running (from dbt's log).
    """

    def __init__(self, settings: Settings) -> None:
        from flows.orchestration.dbt_progress import DbtLogTail, dbt_log_path

        self.settings = settings
        self.dbt_log = DbtLogTail(dbt_log_path(settings))
        console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.tasks: dict[str, TaskID] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        # This run's row: started after us (less a margin for a database clock that runs behind).
        self.since = datetime.now(UTC) - timedelta(seconds=30)

    def __enter__(self) -> _RunProgress:
        if not self.progress.disable:
            self.progress.start()
            self.tasks["run"] = self.progress.add_task("refresh", detail="planning", total=None)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        self.progress.stop()

    def _poll(self) -> None:
        import psycopg

        from flows.core.db import connect

        conn: psycopg.Connection | None = None
        while not self.stop.wait(0.5):
            try:
                if conn is None or conn.closed:
                    conn = connect(self.settings, autocommit=True)
                self._update(conn)
            except psycopg.Error:
                conn = None  # not up yet, or the schema is being created: try again
        if conn is not None:
            conn.close()

    def _update(self, conn: Any) -> None:
        from flows.control.status import run_progress

        run = run_progress(conn, self.settings.control_schema, self.since)
        if run is None:
            return
        for t in run.tables:
            if t.table_name not in self.tasks:
                self.tasks[t.table_name] = self.progress.add_task(f"  {t.table_name}", detail="", total=None)
            done = not t.running
            self.progress.update(
                self.tasks[t.table_name],
                detail=f"{t.status}: {t.slices} slice(s), {t.rows_inserted} rows",
                total=1 if done else None,
                completed=1 if done else 0,
            )
        running = sum(1 for t in run.tables if t.running)
        detail = f"extracting {running} table(s)" if running else "dbt build and audit"
        self.progress.update(self.tasks["run"], detail=detail if run.tables else "extracting")
        dbt = self.dbt_log.poll()
        if dbt.total:
            if "dbt" not in self.tasks:
                self.tasks["dbt"] = self.progress.add_task("  dbt build", detail="", total=None)
            finished = len(dbt.done) == dbt.total
            self.progress.update(
                self.tasks["dbt"],
                detail=dbt.describe(),
                total=1 if finished else None,
                completed=1 if finished else 0,
            )


def _print_summary(summary: dict[str, Any], settings: Settings, elapsed: float) -> None:
    from flows.control.runs import RunStatus

    color = {RunStatus.SUCCESS: "green", RunStatus.WARNING: "yellow"}.get(summary["status"], "red")
    out.print(f"[{color}]refresh {summary['status']}[/]: {plain(summary['message'])} ({elapsed:.1f}s)")
    table = new_grid("table", "status", "mode", "slices", "read", "inserted", "deleted", "seconds")
    for t in summary["tables"]:
        table.add_row(
            t["table"],
            t["status"],
            t["mode"],
            str(t["slices"]),
            str(t["rows_read"]),
            str(t["rows_inserted"]),
            str(t["rows_deleted"]),
            str(t["duration_s"]),
        )
    if summary["tables"]:
        out.print(table)
    for t in summary["tables"]:
        if t["slices_skipped"]:
            out.print(
                f"  {t['table']}: resumed: {t['slices_skipped']} slice(s) an interrupted attempt "
                "committed were not read again"
            )
    for t in summary["tables"]:
        if t["error"]:
            out.print(f"  [red]{t['table']}[/]: {plain(t['error'])}")
    for t in summary["tables"]:
        for p in t.get("plan") or []:
            out.print(
                f"  plan {t['table']} {p['slice']}: {p.get('estimated_rows', '?')} rows, "
                f"~{p['estimated_bytes']} bytes"
            )
    if (
        summary["dbt_invocation_id"] is None
        and not summary["dry_run"]
        and summary["status"] == RunStatus.SUCCESS
    ):
        out.print("dbt: not run: nothing it models changed and no rebuild was owed")
    else:
        out.print(
            f"dbt: {summary['dbt_models_built']} models built, {summary['dbt_nodes']} nodes run, "
            f"{len(summary['dbt_failed'])} failed, {len(summary['dbt_skipped'])} skipped"
        )
    for label, nodes in (("failed", summary["dbt_failed"]), ("skipped", summary["dbt_skipped"])):
        if nodes:
            out.print(f"  [red]dbt {label}[/]: {', '.join(nodes)}")
    if summary["first_error"]:
        out.print(f"  first error: {plain(summary['first_error'])}")
    out.print("where to look next:")
    pg = settings.dsn() if settings.uses_embedded_postgres else "(REFRESH_PG_DSN)"
    schemas = f"{settings.raw_schema}, staging, marts, summaries, {settings.control_schema}"
    out.print(f"  Postgres:   {pg}  schemas {schemas}")
    if settings.uses_embedded_postgres:
        out.print("              (`refresh stack up` keeps the embedded Postgres running to connect)")
    out.print("  history:    refresh history, refresh status")
    out.print("  dbt docs:   refresh docs   (serves lineage from BigQuery sources to summaries)")
    out.print(
        "  dashboard:  `make api` (local reads without a token) or `refresh api`, then "
        f"http://{settings.api_host}:{settings.api_port}/"
    )
    from flows.demo.local_prefect import flow_run_url, prefect_ui

    ui, stacks = prefect_ui(settings)
    if stacks:
        out.print("  Prefect:    `refresh stack up` keeps its Prefect server running to open this run")
    if summary.get("flow_run_id"):
        out.print(f"  Prefect UI: {flow_run_url(ui, summary['flow_run_id'])}")


class _ReportedByUs(logging.Filter):
    """Our own errors and Postgres errors are reported in one line by `one_line_errors`: the console
    need not show their traceback too. Anything else (a bug) keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        import psycopg

        return not (record.exc_info and isinstance(record.exc_info[1], RefreshError | psycopg.Error))


def _quiet_console() -> None:
    """Prefect's console output down to PREFECT_LOGGING_LEVEL (WARNING unless set): dbt raises
    the run loggers to INFO so the UI gets every node, which would drown the progress display.
    Logs sent to the Prefect API are unchanged."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"))
            handler.addFilter(_ReportedByUs())


@contextmanager
def _display(settings: Settings) -> Iterator[None]:
    """Prefect's console quieted and the live progress shown while the flow runs."""
    _quiet_console()
    with _RunProgress(settings):
        yield


def run_refresh(
    settings: Settings,
    with_stack: bool,
    *,
    trigger: str,
    tables: list[str] | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
    **flags: bool,
) -> dict[str, Any]:
    """The daily_refresh flow in this process, with a progress display and a summary at the end;
    exits 1 with one line when it fails."""
    params: dict[str, Any] = {
        "tables": split_names(tables),
        "start_date": parse_date(start_date, "--start-date"),
        "end_date": parse_date(end_date, "--end-date"),
        **flags,
    }
    t0 = time.monotonic()
    with (
        one_line_errors("see `refresh status`, `refresh history` and the Prefect logs", settings),
        embedded_stack(settings, with_stack),
    ):
        from flows.orchestration.foreground import refresh_here

        summary = refresh_here(settings, params, trigger=trigger, display=lambda: _display(settings))
    _print_summary(summary, settings, time.monotonic() - t0)
    return summary


def run(
    tables: TablesOption = None,
    start_date: Annotated[str | None, typer.Option(help="Reload from this date (YYYY-MM-DD)")] = None,
    end_date: Annotated[str | None, typer.Option(help="Reload up to this date (YYYY-MM-DD)")] = None,
    full_refresh: Annotated[
        bool, typer.Option("--full-refresh", help="Reload whole tables, rebuild dbt models")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: write nothing")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Refresh tables even if not due or disabled")
    ] = False,
    scheduled: Annotated[
        bool,
        typer.Option(
            "--scheduled", help="Run as the schedule (for cron): due times count from this run's start"
        ),
    ] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Print which slices are new, changed or unchanged (and why) and what dbt would "
            "rebuild; write nothing",
        ),
    ] = False,
    with_stack: WithStackOption = True,
) -> None:
    """Run the daily refresh once, now, in this process. Exit code 0 success, 1 failed,
    2 warning (some table or dbt node failed)."""
    if explain:
        _explain(load_settings(), with_stack, tables, start_date, end_date, full_refresh, force)
        return
    summary = run_refresh(
        load_settings(),
        with_stack,
        trigger="schedule" if scheduled else "cli",
        tables=tables,
        start_date=start_date,
        end_date=end_date,
        full_refresh=full_refresh,
        dry_run=dry_run,
        force=force,
    )
    exit_for(summary)


def _explain(
    settings: Settings,
    with_stack: bool,
    tables: list[str] | None,
    start_date: str | None,
    end_date: str | None,
    full_refresh: bool,
    force: bool,
) -> None:
    from flows.engine.bigquery import make_clients
    from flows.orchestration import run_params
    from flows.orchestration.explain import explain, render

    with one_line_errors(settings=settings), embedded_stack(settings, with_stack):
        params = run_params.validate_params(
            split_names(tables),
            parse_date(start_date, "--start-date"),
            parse_date(end_date, "--end-date"),
            full_refresh,
            force=force,
        )
        clients = make_clients(settings)
        try:
            ex = explain(settings, clients, params, datetime.now(UTC))
        finally:
            clients.close()
    for line in render(ex):
        out.print(line, markup=False)


def backfill(
    start_date: Annotated[str, typer.Option(help="First date to reload (YYYY-MM-DD)")],
    end_date: Annotated[str, typer.Option(help="Last date to reload, inclusive (YYYY-MM-DD)")],
    tables: TablesOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: write nothing")] = False,
    with_stack: WithStackOption = True,
) -> None:
    """Reload a date range of the given tables (default: every enabled table), due or not.
    Exit codes as for `run`."""
    summary = run_refresh(
        load_settings(),
        with_stack,
        trigger="backfill",
        tables=tables,
        start_date=start_date,
        end_date=end_date,
        dry_run=dry_run,
        force=True,
    )
    exit_for(summary)
