"""The `refresh` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.errors import RefreshError
from flows.settings import PROJECT_ROOT, Settings, get_settings

app = typer.Typer(
    help="Daily BigQuery -> Postgres refresh (dbt + Prefect).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="The embedded local stack (Postgres + BigQuery emulator).")
config_app = typer.Typer(help="The table registry.")
app.add_typer(stack_app, name="stack")
app.add_typer(config_app, name="config")


def _prefect_env(settings: Settings) -> None:
    """Project-local Prefect home unless the user configured Prefect themselves."""
    os.environ.setdefault("PREFECT_HOME", str(settings.state_dir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _settings() -> Settings:
    try:
        s = get_settings()
    except Exception as exc:  # pydantic ValidationError -> one clear line
        _fail(f"configuration error: {exc}", "check the REFRESH_* environment variables")
    _prefect_env(s)
    return s


def _fail(message: str, hint: str | None = None) -> Any:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(1)


def _print_summary(summary: dict[str, Any], settings: Settings, elapsed: float) -> None:
    color = {"success": typer.colors.GREEN, "warning": typer.colors.YELLOW}.get(
        str(summary["status"]), typer.colors.RED
    )
    typer.secho(f"refresh {summary['status']}: {summary['message']} ({elapsed:.1f}s)", fg=color)
    for t in summary["tables"]:
        line = (
            f"  {t['table']:<28} {t['status']:<8} slices={t['slices']:<4} "
            f"rows read={t['rows_read']:<9} inserted={t['rows_inserted']:<9} "
            f"deleted={t['rows_deleted']:<9} {t['duration_s']}s"
        )
        typer.echo(line + (f"  error: {t['error']}" if t["error"] else ""))
        for p in t.get("plan") or []:
            typer.echo(f"      plan {p['slice']}: ~{p['estimated_bytes']} bytes")
    typer.echo(
        f"  dbt: {summary['dbt_models_built']} models built, {summary['dbt_nodes']} nodes run, "
        f"{len(summary['dbt_failed'])} failed"
    )
    typer.echo("where to look next:")
    typer.echo(
        f"  Postgres:   {settings.dsn() if settings.uses_embedded_postgres else '(REFRESH_PG_DSN)'}"
        f"  schemas {settings.raw_schema}, staging, marts, summaries, {settings.control_schema}"
    )
    if settings.uses_embedded_postgres:
        typer.echo("              (`refresh stack up` keeps the embedded Postgres running to connect)")
    typer.echo("  dbt docs:   refresh docs   (serves lineage from BigQuery sources to summaries)")
    typer.echo("  Prefect UI: prefect server start, then `refresh serve` for scheduled/manual runs")


def _run_flow(settings: Settings, **params: Any) -> dict[str, Any]:
    from flows.daily_refresh import daily_refresh

    return daily_refresh(**params)


@app.command()
def run(
    tables: Annotated[
        list[str] | None, typer.Option("--tables", "-t", help="Tables to refresh (default: all due)")
    ] = None,
    start_date: Annotated[str | None, typer.Option(help="Backfill from this date (YYYY-MM-DD)")] = None,
    end_date: Annotated[str | None, typer.Option(help="Backfill up to this date (YYYY-MM-DD)")] = None,
    full_refresh: Annotated[
        bool, typer.Option("--full-refresh", help="Reload whole tables, rebuild dbt models")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: write nothing")] = False,
    force: Annotated[bool, typer.Option("--force", help="Refresh tables even if not due")] = False,
    with_stack: Annotated[
        bool, typer.Option("--with-stack/--no-stack", help="Start the embedded parts that are not configured")
    ] = True,
) -> None:
    """Run the daily refresh once, now."""
    settings = _settings()
    try:
        sd = date.fromisoformat(start_date) if start_date else None
        ed = date.fromisoformat(end_date) if end_date else None
    except ValueError as exc:
        _fail(f"bad date: {exc}", "use YYYY-MM-DD")
    t0 = time.monotonic()
    try:
        if with_stack:
            from flows.local_stack import local_stack

            with local_stack(settings):
                summary = _run_flow(
                    settings,
                    tables=tables,
                    start_date=sd,
                    end_date=ed,
                    full_refresh=full_refresh,
                    dry_run=dry_run,
                    force=force,
                    trigger="cli",
                )
        else:
            summary = _run_flow(
                settings,
                tables=tables,
                start_date=sd,
                end_date=ed,
                full_refresh=full_refresh,
                dry_run=dry_run,
                force=force,
                trigger="cli",
            )
    except RefreshError as exc:
        _fail(str(exc), "see `refresh status` and the Prefect logs")
    _print_summary(summary, settings, time.monotonic() - t0)
    if summary["status"] == "failed":
        raise typer.Exit(1)


@app.command()
def demo(
    sqp_rows: Annotated[int, typer.Option(help="SQP rows to generate")] = 20_000,
    weeks: Annotated[int, typer.Option(help="weeks of SQP history")] = 26,
) -> None:
    """The whole daily refresh on the embedded stack with generated sample data."""
    settings = _settings()
    if not settings.starts_local_emulator:
        _fail("the demo fills the local BigQuery emulator with sample data; unset REFRESH_BQ_PROJECT")
    from flows.bigquery import make_clients
    from flows.local_stack import local_stack
    from flows.sample_data import SampleSpec, generate

    t0 = time.monotonic()
    try:
        with local_stack(settings):
            typer.echo(
                f"local stack up ({time.monotonic() - t0:.1f}s): Postgres {settings.dsn()}, "
                f"BigQuery emulator {settings.rest_endpoint}"
            )
            clients = make_clients(settings)
            try:
                for g in generate(clients, SampleSpec(sqp_rows=sqp_rows, weeks=weeks)):
                    typer.echo(
                        f"sample data {g.table}: {g.rows} rows"
                        f"{' (already there)' if g.skipped else ' generated'}"
                    )
            finally:
                clients.close()
            summary = _run_flow(settings, force=True, trigger="demo")
    except RefreshError as exc:
        _fail(str(exc))
    _print_summary(summary, settings, time.monotonic() - t0)
    if summary["status"] != "success":
        raise typer.Exit(1)


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

    clients = make_clients(settings)
    try:
        for g in gen(clients, SampleSpec(sqp_rows, weeks, asins, daily_rows), force=force):
            typer.echo(f"{g.table}: {g.rows} rows{' (unchanged)' if g.skipped else ''}")
    except RefreshError as exc:
        _fail(str(exc))
    finally:
        clients.close()


@stack_app.command("up")
def stack_up() -> None:
    """Start the embedded Postgres and BigQuery emulator and leave them running."""
    from flows.local_stack import LocalStack

    settings = _settings()
    stack = LocalStack(settings)
    try:
        stack.start()
    except RefreshError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stack.status()))
    typer.echo(f"Postgres: {settings.dsn()}  BigQuery REST: {settings.rest_endpoint}")


@stack_app.command("down")
def stack_down() -> None:
    """Stop the embedded parts (data is kept)."""
    from flows.local_stack import LocalStack

    LocalStack(_settings()).stop_all()
    typer.echo("stopped")


@stack_app.command("status")
def stack_status() -> None:
    from flows.local_stack import LocalStack

    typer.echo(json.dumps(LocalStack(_settings()).status()))


@app.command()
def status(hours: Annotated[int, typer.Option(min=1, max=24 * 30)] = 24) -> None:
    """Latest runs and per-table results."""
    settings = _settings()
    from psycopg import sql

    from flows.db import connect

    try:
        with connect(settings) as conn:
            rows = conn.execute(
                sql.SQL(
                    "select run_id, status, trigger, started_at, finished_at, tables_planned, "
                    "tables_failed, rows_inserted, message from {} "
                    "where started_at > now() - make_interval(hours => %s) "
                    "order by started_at desc limit 20"
                ).format(sql.Identifier(settings.control_schema, "refresh_runs")),
                (hours,),
            ).fetchall()
    except Exception as exc:
        _fail(f"cannot read the audit tables: {exc}", "is Postgres up? (`refresh stack up`)")
    if not rows:
        typer.echo(f"no runs in the last {hours}h")
    for r in rows:
        typer.echo(
            f"{r[3]:%Y-%m-%d %H:%M:%S} {r[1]:<9} {r[2]:<8} tables={r[5]} failed={r[6]} "
            f"rows={r[7]} {r[0]}  {r[8] or ''}"
        )


@app.command()
def migrate() -> None:
    """Create or upgrade the control schema."""
    from flows.db import migrate as do_migrate

    do_migrate(_settings())
    typer.echo("control schema up to date")


@app.command()
def docs(
    port: Annotated[int, typer.Option()] = 8080,
    serve: Annotated[bool, typer.Option("--serve/--no-serve")] = True,
) -> None:
    """Generate dbt docs (lineage) and serve them locally."""
    settings = _settings()
    from flows.transform import dbt_env, profiles_dir

    env = {**os.environ, **dbt_env(settings)}
    base = [sys.executable, "-m", "dbt.cli.main"]
    common = ["--project-dir", str(PROJECT_ROOT), "--profiles-dir", str(profiles_dir(settings))]
    import subprocess

    rc = subprocess.call([*base, "docs", "generate", *common], env=env)
    if rc != 0:
        _fail("dbt docs generate failed", "is Postgres up? (`refresh stack up`)")
    typer.echo(f"docs written to {Path(settings.dbt_project_dir) / 'target' / 'index.html'}")
    if serve:
        subprocess.call([*base, "docs", "serve", "--port", str(port), "--no-browser", *common], env=env)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
