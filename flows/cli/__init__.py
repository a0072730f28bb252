"""The `refresh` command line: one module per command group, wired here.

Every command fails with one line saying what went wrong, a hint line, and exit code 1.
A refresh (`run`, `backfill`, `demo`) exits 0 on success, 1 when it failed and 2 when it
ended `warning` (some table or dbt node failed, the rest went on).

Commands parse their options, call the functions the flow and the API call, and format what
they return. No command module imports Prefect, dbt or the local demo at module level: a
command imports what it needs when it runs (`refresh run` takes the refresh lock first).
"""

from __future__ import annotations

import typer

from flows.cli import admin, api, demo, docs, registry, rollout, run, stack, status, webhooks
from flows.cli.common import PIPE_WIDTH, out

app = typer.Typer(
    help="Daily BigQuery -> Postgres refresh (dbt + Prefect).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _console() -> None:
    """Daily BigQuery -> Postgres refresh (dbt + Prefect)."""
    out.width = None if out.is_terminal else PIPE_WIDTH  # type: ignore[assignment]


# Registration order is the order `refresh --help` lists the commands in.
app.command("validate-data")(rollout.validate_data)
app.command("cutover")(rollout.cutover)
app.command("rollback")(rollout.rollback)
app.command()(run.run)
app.command()(run.backfill)
app.command()(demo.demo)
app.command()(demo.generate)
app.command()(status.status)
app.command()(status.history)
app.command()(admin.validate)
app.command()(admin.serve)
app.command()(admin.migrate)
app.command()(docs.docs)
app.command("api")(api.api)
app.add_typer(stack.stack_app, name="stack")
app.add_typer(registry.config_app, name="config")
app.add_typer(api.token_app, name="token")
app.add_typer(webhooks.webhooks_app, name="webhooks")


def main() -> None:
    app()
