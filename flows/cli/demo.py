"""`refresh demo` and `refresh generate`: the local demo's sample data (flows.demo, imported when
a command runs)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from flows.cli.common import exit_for, fail, load_settings, one_line_errors, out
from flows.cli.run import run_refresh
from flows.core.redact import redact


def demo(
    sqp_rows: Annotated[int, typer.Option(help="SQP rows to generate")] = 20_000,
    weeks: Annotated[int, typer.Option(help="weeks of SQP history")] = 26,
) -> None:
    """The whole daily refresh on the embedded stack with generated sample data."""
    settings = load_settings()
    if not settings.starts_local_emulator:
        fail(
            "the demo fills the local BigQuery emulator with sample data",
            "unset REFRESH_BQ_PROJECT, or use `refresh run` against your BigQuery",
        )
    from flows.demo.local_stack import local_stack
    from flows.demo.sample_data import SampleSpec, generate
    from flows.engine.bigquery import make_clients

    t0 = time.monotonic()
    with one_line_errors(), local_stack(settings):
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
        summary = run_refresh(settings, False, force=True, trigger="demo")
    exit_for(summary)


def generate(
    sqp_rows: Annotated[int, typer.Option()] = 20_000,
    weeks: Annotated[int, typer.Option()] = 26,
    asins: Annotated[int, typer.Option()] = 50,
    daily_rows: Annotated[int, typer.Option()] = 10_000,
    force: Annotated[bool, typer.Option("--force")] = False,
) -> None:
    """Fill the BigQuery dataset with deterministic sample data."""
    settings = load_settings()
    from flows.demo.sample_data import SampleSpec
    from flows.demo.sample_data import generate as gen
    from flows.engine.bigquery import make_clients

    with one_line_errors("is the BigQuery emulator up? (`refresh stack up`)"):
        clients = make_clients(settings)
        try:
            for g in gen(clients, SampleSpec(sqp_rows, weeks, asins, daily_rows), force=force):
                out.print(f"{g.table}: {g.rows} rows{' (unchanged)' if g.skipped else ''}")
        finally:
            clients.close()
