"""`refresh validate` (the configuration), `refresh serve` (the deployments), `refresh migrate`
(the control schema)."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import (
    PG_HINT,
    WithStackOption,
    embedded_stack,
    fail,
    load_settings,
    one_line_errors,
    out,
    plain,
)
from flows.core.redact import redact


def validate(with_stack: WithStackOption = True) -> None:
    """Check the configuration: registry file, Postgres, BigQuery credentials, source tables
    and cursor columns. Exit code 1 when anything fails."""
    settings = load_settings()
    from flows.orchestration.preflight import check_configuration

    failed = 0
    with one_line_errors(settings=settings), embedded_stack(settings, with_stack):
        for check in check_configuration(settings, PG_HINT):
            failed += not check.ok
            mark = "[green]ok  [/]" if check.ok else "[red]FAIL[/]"
            out.print(f"{mark} {check.what}: {plain(redact(check.detail))}")
    if failed:
        fail(f"{failed} check(s) failed", "fix the lines marked FAIL, then run `refresh validate` again")
    out.print("[green]configuration is valid[/]")


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
    settings = load_settings(prefect_log_level="INFO")
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        fail(
            "no Prefect server configured, so nothing would see the schedule or the UI",
            "start one (`prefect server start`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`",
        )
    from flows.orchestration.deployments import build_deployments, serve_deployments

    with one_line_errors("see docs/deployment.md"):
        build_deployments(settings)  # the schedule is checked before anything starts
        with embedded_stack(settings, with_stack):
            serve_deployments(settings, limit=limit)


def migrate() -> None:
    """Create or upgrade the control schema."""
    from flows.core.db import migrate as do_migrate

    settings = load_settings()
    with one_line_errors(PG_HINT, settings):
        do_migrate(settings)
    out.print("control schema up to date")
