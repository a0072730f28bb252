"""`refresh validate-data`, `refresh cutover`, `refresh rollback`: the safe-rollout commands."""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.common import (
    fail,
    load_settings,
    one_line_errors,
    out,
    parse_date,
    split_names,
    synced_registry,
)

if TYPE_CHECKING:
    from flows.core.settings import Settings

TablesOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tables", "-t", help="Tables to validate (repeat, or comma-separated); default: shadow and live"
    ),
]
ByOption = Annotated[str | None, typer.Option("--by", help="Who makes the change (default: the OS user)")]
ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why; recorded in the audit (required with --force)")
]


def validate_data(
    tables: TablesOption = None,
    from_: Annotated[str | None, typer.Option("--from", help="First day to check (YYYY-MM-DD)")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Last day to check (YYYY-MM-DD)")] = None,
    summaries: Annotated[
        bool, typer.Option("--summaries", help="Instead: check every dbt summary period's sums against raw")
    ] = False,
) -> None:
    """Compare BigQuery and Postgres per period (row count + checksum of every column), list the
    rows that differ, record the results. Exit code 1 when a period differs."""
    from rich.table import Table

    if summaries:
        _validate_summaries()
        return

    from flows.engine.bigquery import make_clients
    from flows.engine.validation.source_match import validate

    settings = load_settings()
    first, last = parse_date(from_, "--from"), parse_date(to, "--to")
    with one_line_errors(
        "`refresh config get` lists the tables; validate a table after it has been refreshed"
    ):
        synced_registry(settings)
        clients = make_clients(settings)
        try:
            results = validate(settings, clients, split_names(tables), first, last)
        finally:
            clients.close()
    _notify(settings)
    grid = Table("table", "period", "bigquery rows", "postgres rows", "status", "differences")
    failed = 0
    for name, periods in results.items():
        for r in periods:
            diff = ""
            if r.differences is not None:
                d = r.differences
                diff = (
                    f"{len(d.missing_in_postgres)} missing, {len(d.extra_in_postgres)} extra, "
                    f"{len(d.different)} different"
                    + (
                        f" ({', '.join(sorted({c for x in d.different for c in x['columns']}))})"
                        if d.different
                        else ""
                    )
                    + (" (truncated)" if d.truncated else "")
                )
            failed += not r.passed
            grid.add_row(
                name,
                str(r.period_start or "full"),
                str(r.bigquery.rows),
                str(r.postgres.rows),
                "[green]pass[/]" if r.passed else "[red]fail[/]",
                diff,
            )
    out.print(grid)
    if failed:
        fail(
            f"{failed} period(s) differ between BigQuery and Postgres",
            "the rows are in refresh_control.dq_results (details); reload them with "
            "`refresh backfill --tables TABLE --start ... --end ...`",
        )
    out.print("[green]Postgres holds exactly what BigQuery holds[/] for the periods checked")


def _validate_summaries() -> None:
    from flows.core.db import connect
    from flows.engine.validation.summary_checks import check_summaries, record_summary_checks

    settings = load_settings()
    with (
        one_line_errors("run a refresh first: the summaries are built by dbt from raw"),
        connect(settings) as conn,
    ):
        checks = check_summaries(conn, settings.raw_schema)
        record_summary_checks(conn, settings.control_schema, checks)
    _notify(settings)
    failed = [c for c in checks if not c.passed]
    for c in failed:
        out.print(f"[red]fail[/] {c.summary} {c.period_start}: raw {c.raw} != summary {c.summary_sums}")
    if failed:
        fail(f"{len(failed)} summary period(s) differ from raw", "rebuild them: `refresh run --full-refresh`")
    out.print(f"[green]{len(checks)} summary periods equal the sums of raw[/]")


def cutover(
    table: Annotated[str, typer.Argument(help="Registry table name")],
    force: Annotated[bool, typer.Option("--force", help="Cut over although validation did not pass")] = False,
    reason: ReasonOption = "",
    by: ByOption = None,
) -> None:
    """Move a table one step: dry_run -> shadow -> live (live only after a passing validation)."""
    from flows.control import rollout
    from flows.core.db import connect
    from flows.core.table_config import Mode

    settings = load_settings()
    with one_line_errors(
        "`refresh config get TABLE` shows its mode; `refresh validate-data --tables TABLE` validates it"
    ):
        synced_registry(settings)
        with connect(settings) as conn:
            change = rollout.cutover(
                conn,
                settings.control_schema,
                table,
                validated_schema=settings.shadow_schema,
                who=by or getpass.getuser(),
                reason=reason,
                force=force,
            )
    _notify(settings)
    out.print(
        f"{table}: {change.from_mode} -> [bold]{change.to_mode}[/]" + (" (forced)" if change.forced else "")
    )
    if change.to_mode == Mode.LIVE.value:
        out.print(
            "the next refresh loads it into the live schema; `refresh rollback` undoes this in one step"
        )


def rollback(
    table: Annotated[str, typer.Argument(help="Registry table name")],
    reason: ReasonOption = "",
    by: ByOption = None,
) -> None:
    """Return a table to the mode it had before its last cutover; its data stays as it is."""
    from flows.control import rollout
    from flows.core.db import connect

    settings = load_settings()
    with one_line_errors("`refresh config get TABLE` shows its mode"):
        synced_registry(settings)
        with connect(settings) as conn:
            change = rollout.rollback(
                conn, settings.control_schema, table, who=by or getpass.getuser(), reason=reason
            )
    _notify(settings)
    out.print(f"{table}: {change.from_mode} -> [bold]{change.to_mode}[/] (live data left in place)")


def _notify(settings: Settings) -> None:
    """Send the events just written (validation.failed, table.cutover, table.rollback) now rather
    than at the next run or housekeeping pass; bounded, never raises (the outbox keeps the rest)."""
    from flows.notify.webhook_delivery import dispatch_after_run

    dispatch_after_run(settings)
