"""`refresh config get|set`: the table registry (flows.core.table_config, as the API's config endpoints)."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from flows.cli.common import PG_HINT, fail, load_settings, one_line_errors, out, synced_registry

config_app = typer.Typer(help="The table registry: show and change per-table settings.", no_args_is_help=True)


@config_app.command("get")
def config_get(table: Annotated[str | None, typer.Argument(help="One table (default: all)")] = None) -> None:
    """Show the registry, or every setting of one table."""
    settings = load_settings()
    with one_line_errors(PG_HINT, settings):
        configs = synced_registry(settings)
    if table is not None:
        match = [c for c in configs if c.table_name == table]
        if not match:
            fail(
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


@config_app.command("set")
def config_set(
    table: Annotated[str, typer.Argument(help="Registry table name")],
    assignments: Annotated[list[str], typer.Argument(help="field=value ... (e.g. mode=live priority=high)")],
) -> None:
    """Change settings of one table; the row then keeps its edits when the registry file changes."""
    settings = load_settings()
    from flows.control import registry as config_rows
    from flows.core import table_config
    from flows.core.db import connect

    with one_line_errors(
        "`refresh config get TABLE` shows the current values; fields: "
        + ", ".join(table_config.EDITABLE_FIELDS)
    ):
        changes = table_config.parse_assignments(assignments)
        synced_registry(settings)
        with connect(settings) as conn:
            new = config_rows.update(conn, settings.control_schema, table, changes, who="cli")
    out.print(yaml.safe_dump({table: new.model_dump(mode="json", exclude={"table_name"})}, sort_keys=False))
