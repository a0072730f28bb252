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

    Reports to the configured Prefect API (PREFECT_API_URL), else to the embedded stack's Prefect
    server. Manual runs: the Prefect UI, Deployments -> daily-refresh/daily -> Run -> Custom run.
    """
    settings = load_settings(prefect_log_level="INFO")
    from flows.demo.local_prefect import configured_prefect_api
    from flows.orchestration.deployments import build_deployments, serve_deployments

    with one_line_errors("see docs/deployment.md"):
        build_deployments(settings)  # the schedule is checked before anything starts
        with embedded_stack(settings, with_stack):
            if configured_prefect_api() is None:
                fail(
                    "no Prefect server, so nothing would see the schedule or the UI",
                    "drop --no-stack (the stack starts one), or set PREFECT_API_URL to a Prefect server",
                )
            serve_deployments(settings, limit=limit)


def migrate() -> None:
    """Create or upgrade the control schema."""
    from flows.core.db import migrate as do_migrate

    settings = load_settings()
    with one_line_errors(PG_HINT, settings):
        do_migrate(settings)
    out.print("control schema up to date")
