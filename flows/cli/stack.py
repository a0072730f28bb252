"""`refresh stack up|down|status`: the embedded local stack (flows.demo, imported when a command
runs)."""

from __future__ import annotations

import json

import typer

from flows.cli.common import load_settings, one_line_errors, out
from flows.core.redact import redact

stack_app = typer.Typer(
    help="The embedded local stack (Postgres, BigQuery emulator, Prefect server).", no_args_is_help=True
)


@stack_app.command("up")
def stack_up() -> None:
    """Start the embedded Postgres, BigQuery emulator and Prefect server and leave them running."""
    from flows.demo.local_stack import LocalStack

    settings = load_settings()
    stack = LocalStack(settings, keep_running=True)
    with one_line_errors():
        stack.start()
    if stack.prefect_fallback:
        typer.echo(f"warning: {stack.prefect_fallback}", err=True)
    out.print(json.dumps(stack.status()))
    out.print(f"Postgres: {redact(settings.dsn())}  BigQuery REST: {settings.rest_endpoint}")
    if stack.prefect is not None and stack.prefect_fallback is None:
        out.print(f"Prefect UI: {stack.prefect.ui_url}  (API {stack.prefect.api_url})")


@stack_app.command("down")
def stack_down() -> None:
    """Stop the embedded parts (data is kept)."""
    from flows.demo.local_stack import LocalStack

    LocalStack(load_settings()).stop_all()
    out.print("stopped")


@stack_app.command("status")
def stack_status() -> None:
    """Whether the embedded parts are up."""
    from flows.demo.local_stack import LocalStack

    out.print(json.dumps(LocalStack(load_settings()).status()))
