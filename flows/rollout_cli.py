"""`refresh validate-data`, `refresh cutover`, `refresh rollback`: the safe-rollout commands.

Registered on the main app by `register`; the helpers of flows.cli are imported when a command
runs, so this module and flows.cli can import each other in any order.
"""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from flows.settings import Settings

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

    from flows.bigquery import make_clients
    from flows.cli import _errors, _fail, _parse_date, _registry, _settings, _split, out
    from flows.validation import validate

    settings = _settings()
    first, last = _parse_date(from_, "--from"), _parse_date(to, "--to")
    with _errors("`refresh config get` lists the tables; validate a table after it has been refreshed"):
        _registry(settings)
        clients = make_clients(settings)
        try:
            results = validate(settings, clients, _split(tables), first, last)
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
        _fail(
            f"{failed} period(s) differ between BigQuery and Postgres",
            "the rows are in refresh_control.dq_results (details); reload them with "
            "`refresh backfill --tables TABLE --start ... --end ...`",
        )
    out.print("[green]Postgres holds exactly what BigQuery holds[/] for the periods checked")


def _validate_summaries() -> None:
    from flows.cli import _errors, _fail, _settings, out
    from flows.db import connect
    from flows.validation import check_summaries, record_summary_checks

    settings = _settings()
    with _errors("run a refresh first: the summaries are built by dbt from raw"), connect(settings) as conn:
        checks = check_summaries(conn, settings.raw_schema)
        record_summary_checks(conn, settings.control_schema, checks)
    _notify(settings)
    failed = [c for c in checks if not c.passed]
    for c in failed:
        out.print(f"[red]fail[/] {c.summary} {c.period_start}: raw {c.raw} != summary {c.summary_sums}")
    if failed:
        _fail(
            f"{len(failed)} summary period(s) differ from raw", "rebuild them: `refresh run --full-refresh`"
        )
    out.print(f"[green]{len(checks)} summary periods equal the sums of raw[/]")


def cutover(
    table: Annotated[str, typer.Argument(help="Registry table name")],
    force: Annotated[bool, typer.Option("--force", help="Cut over although validation did not pass")] = False,
    reason: ReasonOption = "",
    by: ByOption = None,
) -> None:
    """Move a table one step: dry_run -> shadow -> live (live only after a passing validation)."""
    from flows.cli import _errors, _registry, _settings, out
    from flows.control import rollout
    from flows.db import connect
    from flows.registry import Mode

    settings = _settings()
    with _errors(
        "`refresh config get TABLE` shows its mode; `refresh validate-data --tables TABLE` validates it"
    ):
        _registry(settings)
        with connect(settings) as conn:
            change = rollout.cutover(
                conn,
                settings.control_schema,
                table,
                validated_schema=f"{settings.raw_schema}_shadow",
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
    from flows.cli import _errors, _registry, _settings, out
    from flows.control import rollout
    from flows.db import connect

    settings = _settings()
    with _errors("`refresh config get TABLE` shows its mode"):
        _registry(settings)
        with connect(settings) as conn:
            change = rollout.rollback(
                conn, settings.control_schema, table, who=by or getpass.getuser(), reason=reason
            )
    _notify(settings)
    out.print(f"{table}: {change.from_mode} -> [bold]{change.to_mode}[/] (live data left in place)")


def _notify(settings: Settings) -> None:
    """Send the events just written (validation.failed, table.cutover, table.rollback) now rather
    than at the next run or housekeeping pass; bounded, never raises (the outbox keeps the rest)."""
    from flows.webhooks import dispatch_after_run

    dispatch_after_run(settings)


def register(app: typer.Typer) -> None:
    app.command("validate-data")(validate_data)
    app.command("cutover")(cutover)
    app.command("rollback")(rollback)
