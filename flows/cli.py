"""The `refresh` command line.

Every command fails with one line saying what went wrong, a hint line, and exit code 1.
A refresh (`run`, `backfill`, `demo`) exits 0 on success, 1 when it failed and 2 when it
ended `warning` (some table or dbt node failed, the rest went on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.api_cli import api as api_command
from flows.api_cli import token_app
from flows.errors import ConfigError, RefreshError
from flows.redact import redact
from flows.rollout_cli import register as register_rollout_commands
from flows.settings import PROJECT_ROOT, Settings, get_settings

# What the Makefile exports, for a CLI started any other way (a shell, cron, CI): no usage
# statistics sent by Prefect's local server or dbt (and no notice about them). Set before
# Prefect or dbt is imported; a value the user set wins. PREFECT_HOME: see _prefect_env.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
# pgserver asks platformdirs for a runtime directory when it is imported; without
# XDG_RUNTIME_DIR (cron, containers, ssh) platformdirs warns on every command and falls back
# to a private directory under /tmp, which is all the embedded Postgres needs.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")

app = typer.Typer(
    help="Daily BigQuery -> Postgres refresh (dbt + Prefect).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="The embedded local stack (Postgres + BigQuery emulator).", no_args_is_help=True)
config_app = typer.Typer(help="The table registry: show and change per-table settings.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(config_app, name="config")
register_rollout_commands(app)
app.add_typer(token_app, name="token")


@app.callback()
def _console() -> None:
    """Daily BigQuery -> Postgres refresh (dbt + Prefect)."""
    out.width = None if out.is_terminal else PIPE_WIDTH  # type: ignore[assignment]


out = Console(highlight=False)
# Output that is not a terminal (a pipe, a file, CI logs, cron mail) has no width to fit:
# rich would assume 80 columns and wrap table cells mid-word.
PIPE_WIDTH = 1000
PG_HINT = "is Postgres up? (`refresh stack up` for the embedded one, else check REFRESH_PG_DSN)"

TablesOption = Annotated[
    list[str] | None,
    typer.Option("--tables", "-t", help="Tables to refresh (repeat, or comma-separated); default: all due"),
]
WithStackOption = Annotated[
    bool, typer.Option("--with-stack/--no-stack", help="Start the embedded parts that are not configured")
]


def _prefect_env(settings: Settings, log_level: str) -> None:
    """Project-local Prefect home unless the user configured Prefect themselves."""
    os.environ.setdefault("PREFECT_HOME", str(settings.state_dir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", log_level)
    # Prefect's 20 s for its ephemeral server is too short when several commands start at once
    # on a small machine (each migrates the shared SQLite database).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Prefect cannot create its home (and its database) under a state directory that is missing.
    with contextlib.suppress(OSError):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


def _start_ephemeral_prefect(settings: Settings) -> None:
    """Without PREFECT_API_URL each command starts Prefect's ephemeral server on the SQLite
    database under the state directory; started together they race creating its tables and
    block types (UNIQUE-constraint tracebacks, start-up timeouts). One at a time."""
    import fcntl

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with (settings.state_dir / "prefect-start.lock").open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        SubprocessASGIServer().start()  # the client reuses this one (a per-process singleton)


def _settings(prefect_log_level: str = "WARNING") -> Settings:
    try:
        s = get_settings()
    except ConfigError as exc:  # one line per bad setting, secrets masked
        _fail(f"configuration error: {exc}", "check the REFRESH_* environment variables (or .env)")
    _prefect_env(s, prefect_log_level)
    return s


EXIT_WARNING = 2


def _exit_for(summary: dict[str, Any]) -> None:
    """A warning must not look like a success to a script, cron or CI: exit code 2."""
    if summary["status"] == "warning":
        raise typer.Exit(EXIT_WARNING)
    if summary["status"] != "success":
        raise typer.Exit(1)


def _fail(message: str, hint: str | None = None) -> NoReturn:
    typer.secho(f"error: {redact(message)}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {redact(hint)}", err=True)
    raise typer.Exit(1)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _postgres(settings: Settings | None = None) -> str:
    """Which Postgres, as the user would fix it."""
    if settings is not None and settings.uses_embedded_postgres:
        return f"the embedded Postgres on port {settings.local_pg_port}"
    return "REFRESH_PG_DSN"


@contextlib.contextmanager
def _errors(hint: str | None = None, settings: Settings | None = None) -> Iterator[None]:
    """Our errors and an unreachable Postgres become one line + hint, exit code 1."""
    import psycopg

    try:
        yield
    except ConfigError as exc:
        # A setting or file to fix, not a Postgres to start.
        _fail(str(exc), "fix the setting or file named above, then run `refresh validate`")
    except RefreshError as exc:
        _fail(str(exc), hint)
    except psycopg.OperationalError as exc:
        _fail(f"cannot connect to Postgres ({_postgres(settings)}): {_first_line(exc)}", PG_HINT)
    except psycopg.Error as exc:
        _fail(f"Postgres refused the request ({_postgres(settings)}): {_first_line(exc)}", hint)


def _parse_date(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        _fail(f"{option} {value!r} is not a date", "use YYYY-MM-DD, e.g. 2026-01-31")


def _split(values: list[str] | None) -> list[str] | None:
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def _stack(settings: Settings, with_stack: bool) -> contextlib.AbstractContextManager[Any]:
    if not with_stack:
        return contextlib.nullcontext()
    from flows.local_stack import local_stack

    return local_stack(settings)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# dbt's node lines: "12 of 131 START sql view model staging.stg_x .... [RUN]" when a node starts,
# "12 of 131 OK created sql view model ..." (PASS, WARN, FAIL, ERROR, SKIP, NO-OP) when it ends.
_DBT_NODE = re.compile(r"\b(\d+) of (\d+) (START|OK|PASS|WARN|FAIL|ERROR|SKIP|NO-OP)\b ?(.*?)(?: \.{2,}.*)?$")


@dataclass
class DbtLogProgress:
    """dbt's progress as its log file tells it, line by line: nodes done of the total, and the
    nodes running now. A new invocation ("Running with dbt=") starts the count again."""

    total: int = 0
    done: set[int] = field(default_factory=set)
    running: dict[int, str] = field(default_factory=dict)

    def feed(self, lines: Iterable[str]) -> None:
        for raw in lines:
            line = _ANSI.sub("", raw).rstrip()
            if "Running with dbt=" in line:
                self.total, self.done, self.running = 0, set(), {}
                continue
            m = _DBT_NODE.search(line)
            if m is None:
                continue
            index, self.total, event, rest = int(m[1]), int(m[2]), m[3], m[4].split()
            if event == "START":
                if index not in self.done:
                    self.running[index] = rest[-1].rsplit(".", 1)[-1] if rest else f"node {index}"
            else:
                self.done.add(index)
                self.running.pop(index, None)

    def describe(self, max_names: int = 2) -> str:
        names = [self.running[i] for i in sorted(self.running)]
        shown = ", ".join(names[:max_names]) + (
            f" +{len(names) - max_names}" if len(names) > max_names else ""
        )
        return f"{len(self.done)}/{self.total} nodes" + (f", running {shown}" if shown else "")


class _DbtLogTail:
    """Reads what dbt appended to its log file since the run started (dbt writes it under the
    state directory, flows.transform.run_dbt); a log dbt rotated is read from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""
        self.progress = DbtLogProgress()

    def poll(self) -> DbtLogProgress:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.progress
        if size < self.offset:
            self.offset, self.partial = 0, ""
        if size > self.offset:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            self.offset = size
            lines = (self.partial + chunk.decode("utf-8", "replace")).split("\n")
            self.partial = lines.pop()
            self.progress.feed(lines)
        return self.progress


class _RunProgress:
    """Live progress of the refresh running now, read every half second: one line per table
    with its slices and rows so far (from the audit tables), then the dbt build's nodes done of
    the total and the nodes running (from dbt's log).
    """

    def __init__(self, settings: Settings) -> None:
        from flows.transform import target_dir

        self.settings = settings
        self.dbt_log = _DbtLogTail(target_dir(settings).parent / "logs" / "dbt.log")
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

        from flows.db import connect

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
        from psycopg import sql

        schema = self.settings.control_schema
        run = conn.execute(
            sql.SQL(
                "select run_id from {} where status = 'running' and started_at >= %s "
                "order by started_at desc limit 1"
            ).format(sql.Identifier(schema, "refresh_runs")),
            (self.since,),
        ).fetchone()
        if run is None:
            return
        rows = conn.execute(
            sql.SQL(
                "select t.table_name, t.status, count(s.id), coalesce(sum(s.rows_inserted), 0) "
                "from {t} t left join {s} s on s.run_id = t.run_id and s.table_name = t.table_name "
                "where t.run_id = %s group by t.table_name, t.status order by t.table_name"
            ).format(
                t=sql.Identifier(schema, "table_refreshes"), s=sql.Identifier(schema, "slice_refreshes")
            ),
            (run[0],),
        ).fetchall()
        for table, status, slices, inserted in rows:
            if table not in self.tasks:
                self.tasks[table] = self.progress.add_task(f"  {table}", detail="", total=None)
            done = status != "running"
            self.progress.update(
                self.tasks[table],
                detail=f"{status}: {slices} slice(s), {inserted} rows",
                total=1 if done else None,
                completed=1 if done else 0,
            )
        running = sum(1 for r in rows if r[1] == "running")
        detail = f"extracting {running} table(s)" if running else "dbt build and audit"
        self.progress.update(self.tasks["run"], detail=detail if rows else "extracting")
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


def _grid(*columns: str) -> Table:
    """A compact table; in a narrow terminal cells wrap, the first column (a name) does not."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        table.add_column(name, no_wrap=i == 0, overflow="fold")
    return table


def _print_summary(summary: dict[str, Any], settings: Settings, elapsed: float) -> None:
    color = {"success": "green", "warning": "yellow"}.get(str(summary["status"]), "red")
    out.print(f"[{color}]refresh {summary['status']}[/]: {summary['message']} ({elapsed:.1f}s)")
    table = _grid("table", "status", "mode", "slices", "read", "inserted", "deleted", "seconds")
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
        if t["error"]:
            out.print(f"  [red]{t['table']}[/]: {t['error']}")
    for t in summary["tables"]:
        for p in t.get("plan") or []:
            out.print(
                f"  plan {t['table']} {p['slice']}: {p.get('estimated_rows', '?')} rows, "
                f"~{p['estimated_bytes']} bytes"
            )
    out.print(
        f"dbt: {summary['dbt_models_built']} models built, {summary['dbt_nodes']} nodes run, "
        f"{len(summary['dbt_failed'])} failed, {len(summary['dbt_skipped'])} skipped"
    )
    for label, nodes in (("failed", summary["dbt_failed"]), ("skipped", summary["dbt_skipped"])):
        if nodes:
            out.print(f"  [red]dbt {label}[/]: {', '.join(nodes)}")
    if summary["first_error"]:
        out.print(f"  first error: {summary['first_error']}")
    out.print("where to look next:")
    pg = settings.dsn() if settings.uses_embedded_postgres else "(REFRESH_PG_DSN)"
    schemas = f"{settings.raw_schema}, staging, marts, summaries, {settings.control_schema}"
    out.print(f"  Postgres:   {pg}  schemas {schemas}")
    if settings.uses_embedded_postgres:
        out.print("              (`refresh stack up` keeps the embedded Postgres running to connect)")
    out.print("  history:    refresh history, refresh status")
    out.print("  dbt docs:   refresh docs   (serves lineage from BigQuery sources to summaries)")
    out.print("  Prefect UI: prefect server start, then `refresh serve` for scheduled and manual runs")


class _ReportedByUs(logging.Filter):
    """Our own errors and Postgres errors are reported in one line by `_errors`: the console
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


def _run_refresh(
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
        "tables": _split(tables),
        "start_date": _parse_date(start_date, "--start-date"),
        "end_date": _parse_date(end_date, "--end-date"),
        **flags,
    }
    t0 = time.monotonic()
    with (
        _errors("see `refresh status`, `refresh history` and the Prefect logs", settings),
        _stack(settings, with_stack),
    ):
        from flows.audit import refresh_lock

        # The refresh lock before Prefect: Postgres unreachable, or another refresh running, is
        # one line now; the refused command has started nothing (no Prefect server, no flow
        # run, not even Prefect's import) and exits at once. The flow run adopts this lock.
        with refresh_lock(settings) as lock_conn:
            from flows.daily_refresh import daily_refresh, lock_taken_by_caller

            _start_ephemeral_prefect(settings)
            _quiet_console()
            with lock_taken_by_caller(lock_conn), _RunProgress(settings):
                summary: dict[str, Any] = daily_refresh(**params, trigger=trigger)  # type: ignore[assignment]
    _print_summary(summary, settings, time.monotonic() - t0)
    return summary


@app.command()
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
        _explain(_settings(), with_stack, tables, start_date, end_date, full_refresh, force)
        return
    summary = _run_refresh(
        _settings(),
        with_stack,
        trigger="schedule" if scheduled else "cli",
        tables=tables,
        start_date=start_date,
        end_date=end_date,
        full_refresh=full_refresh,
        dry_run=dry_run,
        force=force,
    )
    _exit_for(summary)


def _explain(
    settings: Settings,
    with_stack: bool,
    tables: list[str] | None,
    start_date: str | None,
    end_date: str | None,
    full_refresh: bool,
    force: bool,
) -> None:
    from flows import runbook
    from flows.bigquery import make_clients
    from flows.explain import explain, render

    with _errors(settings=settings), _stack(settings, with_stack):
        params = runbook.validate_params(
            _split(tables),
            _parse_date(start_date, "--start-date"),
            _parse_date(end_date, "--end-date"),
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


@app.command()
def backfill(
    start_date: Annotated[str, typer.Option(help="First date to reload (YYYY-MM-DD)")],
    end_date: Annotated[str, typer.Option(help="Last date to reload, inclusive (YYYY-MM-DD)")],
    tables: TablesOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: write nothing")] = False,
    with_stack: WithStackOption = True,
) -> None:
    """Reload a date range of the given tables (default: every enabled table), due or not.
    Exit codes as for `run`."""
    summary = _run_refresh(
        _settings(),
        with_stack,
        trigger="backfill",
        tables=tables,
        start_date=start_date,
        end_date=end_date,
        dry_run=dry_run,
        force=True,
    )
    _exit_for(summary)


@app.command()
def demo(
    sqp_rows: Annotated[int, typer.Option(help="SQP rows to generate")] = 20_000,
    weeks: Annotated[int, typer.Option(help="weeks of SQP history")] = 26,
) -> None:
    """The whole daily refresh on the embedded stack with generated sample data."""
    settings = _settings()
    if not settings.starts_local_emulator:
        _fail(
            "the demo fills the local BigQuery emulator with sample data",
            "unset REFRESH_BQ_PROJECT, or use `refresh run` against your BigQuery",
        )
    from flows.bigquery import make_clients
    from flows.local_stack import local_stack
    from flows.sample_data import SampleSpec, generate

    t0 = time.monotonic()
    with _errors(), local_stack(settings):
        out.print(
            f"local stack up ({time.monotonic() - t0:.1f}s): Postgres {redact(settings.dsn())}, "
            f"BigQuery emulator {settings.rest_endpoint}"
        )
        clients = make_clients(settings)
        try:
            with out.status("generating sample data in the BigQuery emulator"):
                generated = generate(clients, SampleSpec(sqp_rows=sqp_rows, weeks=weeks))
            for g in generated:
                out.print(
                    f"sample data {g.table}: {g.rows} rows{' (already there)' if g.skipped else ' generated'}"
                )
        finally:
            clients.close()
        summary = _run_refresh(settings, False, force=True, trigger="demo")
    _exit_for(summary)


@app.command()
def generate(
    sqp_rows: Annotated[int, typer.Option()] = 20_000,
    weeks: Annotated[int, typer.Option()] = 26,
    asins: Annotated[int, typer.Option()] = 50,
    daily_rows: Annotated[int, typer.Option()] = 10_000,
    force: Annotated[bool, typer.Option("--force")] = False,
) -> None:
    """Fill the BigQuery dataset with deterministic sample data."""
    settings = _settings()
    from flows.bigquery import make_clients
    from flows.sample_data import SampleSpec
    from flows.sample_data import generate as gen

    with _errors("is the BigQuery emulator up? (`refresh stack up`)"):
        clients = make_clients(settings)
        try:
            for g in gen(clients, SampleSpec(sqp_rows, weeks, asins, daily_rows), force=force):
                out.print(f"{g.table}: {g.rows} rows{' (unchanged)' if g.skipped else ''}")
        finally:
            clients.close()


@stack_app.command("up")
def stack_up() -> None:
    """Start the embedded Postgres and BigQuery emulator and leave them running."""
    from flows.local_stack import LocalStack

    settings = _settings()
    stack = LocalStack(settings, keep_running=True)
    with _errors():
        stack.start()
    out.print(json.dumps(stack.status()))
    out.print(f"Postgres: {redact(settings.dsn())}  BigQuery REST: {settings.rest_endpoint}")


@stack_app.command("down")
def stack_down() -> None:
    """Stop the embedded parts (data is kept)."""
    from flows.local_stack import LocalStack

    LocalStack(_settings()).stop_all()
    out.print("stopped")


@stack_app.command("status")
def stack_status() -> None:
    """Whether the embedded parts are up."""
    from flows.local_stack import LocalStack

    out.print(json.dumps(LocalStack(_settings()).status()))


def _ts(value: datetime | None) -> str:
    return "-" if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _seconds(value: Any) -> str:
    return "running" if value is None else f"{float(value):.1f}s"


def _print_run(r: dict[str, Any]) -> None:
    color = {"success": "green", "warning": "yellow", "running": "cyan"}.get(r["status"], "red")
    took = _seconds(r["duration_s"])
    out.print(
        f"{_ts(r['started_at'])}  [{color}]{r['status']:<9}[/] {r['trigger']:<9} {took:>8}  "
        f"{r['tables_planned']} table(s), {r['tables_failed']} failed, {r['rows_inserted']} rows inserted"
    )
    out.print(f"    run {r['run_id']}  flow run {r['flow_run_id'] or '-'}")
    if r["message"]:
        out.print(f"    {r['message']}")


def _print_table_refresh(r: dict[str, Any]) -> None:
    color = {"success": "green", "planned": "cyan", "running": "cyan"}.get(r["status"], "red")
    took = _seconds(r["duration_s"])
    out.print(
        f"{_ts(r['started_at'])}  [{color}]{r['status']:<8}[/] {r['mode']:<8} {took:>8}  "
        f"{r['slices_done']} slice(s), read {r['rows_read']}, inserted {r['rows_inserted']}, "
        f"deleted {r['rows_deleted']}  run {r['run_id']}"
    )
    if r["message"]:
        out.print(f"    error: {r['message']}")


@app.command()
def status(
    hours: Annotated[int, typer.Option(min=1, max=24 * 30, help="Runs of the last N hours")] = 24,
) -> None:
    """Is a refresh running, the latest runs, and per table: last refresh, last success, next due."""
    settings = _settings()
    from flows import audit
    from flows.db import connect

    with _errors(PG_HINT, settings), connect(settings, autocommit=True) as conn:
        exists = conn.execute(
            "select to_regclass(%s)", (f'"{settings.control_schema}".refresh_runs',)
        ).fetchone()
        if not exists or exists[0] is None:
            _fail("no refresh has run against this database yet", "run `refresh run` (or `refresh migrate`)")
        running = audit.refresh_running(conn)
        since = datetime.now(UTC) - timedelta(hours=hours)
        latest = audit.history(conn, settings.control_schema, audit.HistoryQuery(page_size=20))
        runs = [r for r in latest.rows if r["started_at"] >= since]
        tables = audit.table_status(conn, settings.control_schema)
    out.print(f"refresh running now: {'yes' if running else 'no'}")
    for r in runs:
        _print_run(r)
    if not runs:
        out.print(f"no runs in the last {hours}h")
    per_table = _grid("table", "mode", "last status", "last success (UTC)", "next due (UTC)")
    for row in tables:
        per_table.add_row(
            row["table_name"],
            row["mode"] if row["enabled"] else "disabled",
            row["last_status"] or "-",
            _ts(row["last_success_at"]),
            _ts(row["next_refresh_at"]) if row["next_refresh_at"] else "now (never refreshed)",
        )
    out.print(per_table)


@app.command()
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
    settings = _settings()
    from flows import audit
    from flows.db import connect

    with _errors("see `refresh history --help`", settings):
        q = audit.HistoryQuery(
            table=table,
            status=status_,
            since=_parse_date(since, "--since"),
            until=_parse_date(until, "--until"),
            page=page,
            page_size=page_size,
        )
        with connect(settings, autocommit=True) as conn:
            result = audit.history(conn, settings.control_schema, q)
    for r in result.rows:
        if table:
            _print_table_refresh(r)
        else:
            _print_run(r)
    pages = max(1, -(-result.total // q.page_size))
    out.print(f"page {q.page} of {pages} ({result.total} matching)")


def _registry(settings: Settings) -> Any:
    """The registry as it stands (the file synced in first, so file-only tables are there)."""
    from flows import runbook

    return runbook.prepare(settings)


@config_app.command("get")
def config_get(table: Annotated[str | None, typer.Argument(help="One table (default: all)")] = None) -> None:
    """Show the registry, or every setting of one table."""
    settings = _settings()
    with _errors(PG_HINT, settings):
        configs = _registry(settings)
    if table is not None:
        match = [c for c in configs if c.table_name == table]
        if not match:
            _fail(
                f"table {table!r} is not in the registry",
                f"registered: {', '.join(c.table_name for c in configs)}",
            )
        out.print(
            yaml.safe_dump({table: match[0].model_dump(mode="json", exclude={"table_name"})}, sort_keys=False)
        )
        return
    for c in configs:
        how = c.write_strategy.value
        if c.cursor_column:
            how += f" by {c.cursor_column} per {c.slice_size.value}, lookback {c.lookback_days}d"
        out.print(
            f"[bold]{c.table_name}[/]  {c.mode.value if c.enabled else 'disabled'}  priority {c.priority}  "
            f"every {c.refresh_frequency_hours}h  {how}  (source {c.source_table}, {c.origin})"
        )


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """`field=value` pairs into registry changes: JSON for custom_params, `null` for none,
    `now` for next_refresh_at; every other value is checked by the registry's model."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        field = field.strip()
        if not sep or not field:
            raise ConfigError(f"{pair!r} is not field=value (e.g. mode=live, priority=high)")
        value = value.strip()
        if value.lower() in ("null", "none"):
            changes[field] = None
        elif field == "custom_params":
            try:
                changes[field] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"custom_params must be a JSON object: {exc.msg}") from exc
        elif field == "next_refresh_at" and value.lower() == "now":
            changes[field] = datetime.now(UTC)
        else:
            changes[field] = value
    return changes


@config_app.command("set")
def config_set(
    table: Annotated[str, typer.Argument(help="Registry table name")],
    assignments: Annotated[list[str], typer.Argument(help="field=value ... (e.g. mode=live priority=high)")],
) -> None:
    """Change settings of one table; the row then keeps its edits when the registry file changes."""
    settings = _settings()
    from flows import registry
    from flows.db import connect

    with _errors(
        "`refresh config get TABLE` shows the current values; fields: " + ", ".join(registry.EDITABLE_FIELDS)
    ):
        changes = parse_assignments(assignments)
        _registry(settings)
        with connect(settings) as conn:
            new = registry.update(conn, settings.control_schema, table, changes, who="cli")
    out.print(yaml.safe_dump({table: new.model_dump(mode="json", exclude={"table_name"})}, sort_keys=False))


@app.command()
def validate(with_stack: WithStackOption = True) -> None:
    """Check the configuration: registry file, Postgres, BigQuery credentials, source tables
    and cursor columns. Exit code 1 when anything fails."""
    settings = _settings()
    from flows import registry
    from flows.bigquery import make_clients
    from flows.db import connect
    from flows.extract import describe, list_source_tables

    failed = 0

    def check(what: str, ok: bool, detail: str) -> None:
        nonlocal failed
        failed += not ok
        out.print(f"[{'green' if ok else 'red'}]{'ok  ' if ok else 'FAIL'}[/] {what}: {redact(detail)}")

    with _errors(settings=settings), _stack(settings, with_stack):
        configs: list[registry.TableConfig] = []
        try:
            configs = registry.load_file(settings.tables_file)
            check("registry file", True, f"{settings.tables_file} ({len(configs)} tables)")
        except ConfigError as exc:
            check("registry file", False, str(exc))
        try:
            with connect(settings, autocommit=True) as conn:
                found = conn.execute(
                    "select to_regclass(%s)", (f'"{settings.control_schema}".refresh_config',)
                ).fetchone()
                if found and found[0] is not None:
                    # The registry in use: the file plus edits made with `refresh config set`.
                    configs = registry.load_all(conn, settings.control_schema) or configs
            check("Postgres", True, "connected")
        except Exception as exc:
            check("Postgres", False, f"{str(exc).strip().splitlines()[0]} ({PG_HINT})")
        source_tables: set[str] | None = None
        try:
            clients = make_clients(settings)
            try:
                source_tables = set(list_source_tables(clients))
                check(
                    "BigQuery",
                    True,
                    f"credentials accepted, dataset {settings.project}.{settings.bq_dataset} "
                    f"holds {len(source_tables)} tables",
                )
                for cfg in configs:
                    if not cfg.enabled or cfg.mode is registry.Mode.DISABLED:
                        continue
                    what = f"table {cfg.table_name}"
                    if cfg.source_table not in source_tables:
                        check(what, False, f"source table {cfg.source_table} is not in {settings.bq_dataset}")
                    elif cfg.cursor_column is None:
                        check(what, True, f"source {cfg.source_table}, {cfg.write_strategy.value}")
                    else:
                        try:
                            col = describe(clients, cfg.source_table).column(cfg.cursor_column)
                        except RefreshError as exc:
                            check(what, False, str(exc))
                            continue
                        ok = col.field_type.upper() in ("DATE", "DATETIME", "TIMESTAMP")
                        check(
                            what,
                            ok,
                            f"cursor {col.name} is {col.field_type}"
                            + ("" if ok else ": use a date/time column"),
                        )
            finally:
                clients.close()
        except RefreshError as exc:
            check("BigQuery", False, str(exc))
    if failed:
        _fail(f"{failed} check(s) failed", "fix the lines marked FAIL, then run `refresh validate` again")
    out.print("[green]configuration is valid[/]")


@app.command()
def serve(
    limit: Annotated[
        int | None, typer.Option(help="At most this many flow runs at once on this machine")
    ] = None,
    with_stack: WithStackOption = True,
) -> None:
    """Serve the deployments (daily refresh on its cron, hourly housekeeping) from this machine.

    Needs a Prefect server (PREFECT_API_URL). Manual runs: the Prefect UI, Deployments ->
    daily-refresh/daily -> Run -> Custom run.
    """
    settings = _settings(prefect_log_level="INFO")
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        _fail(
            "no Prefect server configured, so nothing would see the schedule or the UI",
            "start one (`prefect server start`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`",
        )
    from flows.deployments import build_deployments, serve_deployments

    with _errors("see docs/deployment.md"):
        build_deployments(settings)  # the schedule is checked before anything starts
        with _stack(settings, with_stack):
            serve_deployments(settings, limit=limit)


@app.command()
def migrate() -> None:
    """Create or upgrade the control schema."""
    from flows.db import migrate as do_migrate

    settings = _settings()
    with _errors(PG_HINT, settings):
        do_migrate(settings)
    out.print("control schema up to date")


@app.command()
def docs(
    port: Annotated[int, typer.Option()] = 8080,
    serve: Annotated[bool, typer.Option("--serve/--no-serve")] = True,
) -> None:
    """Generate dbt docs (lineage) and serve them locally."""
    settings = _settings()
    from flows.transform import dbt_env, profiles_dir, with_project_vars

    env = {**os.environ, **dbt_env(settings)}
    base = [sys.executable, "-m", "dbt.cli.main"]
    common = ["--project-dir", str(PROJECT_ROOT), "--profiles-dir", str(profiles_dir(settings))]
    # The catalog reads the raw tables from the schema this installation loads into.
    rc = subprocess.call([*base, *with_project_vars(settings, ["docs", "generate", *common])], env=env)
    if rc != 0:
        _fail("dbt docs generate failed", PG_HINT)
    out.print(f"docs written to {Path(settings.dbt_project_dir) / 'target' / 'index.html'}")
    if serve:
        subprocess.call([*base, "docs", "serve", "--port", str(port), "--no-browser", *common], env=env)


app.command("api")(api_command)

# Last, as the sub-app reuses this module's helpers.
from flows.webhooks_cli import webhooks_app  # noqa: E402

app.add_typer(webhooks_app, name="webhooks")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
