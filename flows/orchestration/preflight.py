"""The configuration checks of `refresh validate`: registry file, Postgres, BigQuery credentials,
source tables and cursor columns, one result per check, in order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from flows.core.errors import ConfigError, RefreshError, one_line
from flows.core.settings import Settings

CURSOR_TYPES = ("DATE", "DATETIME", "TIMESTAMP")


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def check_configuration(settings: Settings, pg_hint: str) -> Iterator[Check]:
    """Each check as it completes (BigQuery ones take a round trip each); `pg_hint` is added to
    a Postgres that cannot be reached."""
    from flows.control import registry as config_rows
    from flows.control.status import has_table
    from flows.core import table_config
    from flows.core.db import connect
    from flows.engine.bigquery import make_clients
    from flows.engine.extract import describe, list_source_tables

    configs: list[table_config.TableConfig] = []
    try:
        configs = table_config.load_file(settings.tables_file)
        yield Check("registry file", True, f"{settings.tables_file} ({len(configs)} tables)")
    except ConfigError as exc:
        yield Check("registry file", False, str(exc))
    try:
        with connect(settings, autocommit=True) as conn:
            if has_table(conn, settings.control_schema, "refresh_config"):
                # The registry in use: the file plus edits made with `refresh config set`.
                configs = config_rows.load_all(conn, settings.control_schema) or configs
        yield Check("Postgres", True, "connected")
    except Exception as exc:
        yield Check("Postgres", False, f"{one_line(exc)} ({pg_hint})")
    try:
        clients = make_clients(settings)
        try:
            source_tables = set(list_source_tables(clients))
            yield Check(
                "BigQuery",
                True,
                f"credentials accepted, dataset {settings.project}.{settings.bq_dataset} "
                f"holds {len(source_tables)} tables",
            )
            for cfg in configs:
                if not cfg.enabled or cfg.mode is table_config.Mode.DISABLED:
                    continue
                what = f"table {cfg.table_name}"
                if cfg.source_table not in source_tables:
                    yield Check(
                        what, False, f"source table {cfg.source_table} is not in {settings.bq_dataset}"
                    )
                elif cfg.cursor_column is None:
                    yield Check(what, True, f"source {cfg.source_table}, {cfg.write_strategy.value}")
                else:
                    try:
                        col = describe(clients, cfg.source_table).column(cfg.cursor_column)
                    except RefreshError as exc:
                        yield Check(what, False, str(exc))
                        continue
                    ok = col.field_type.upper() in CURSOR_TYPES
                    yield Check(
                        what,
                        ok,
                        f"cursor {col.name} is {col.field_type}" + ("" if ok else ": use a date/time column"),
                    )
        finally:
            clients.close()
    except RefreshError as exc:
        yield Check("BigQuery", False, str(exc))
