"""The registry's rows (`refresh_config`): sync from the file, reads, edits and due times.

A row edited through the CLI/API (origin 'user') keeps its edits; rows still owned by the file
follow it; source tables seen for the first time are registered in dry_run mode, with an event.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import ValidationError

from flows.control import outbox
from flows.core.db import qualified
from flows.core.errors import ConfigError
from flows.core.table_config import (
    EDITABLE_FIELDS,
    PRIORITY_NAMES,
    Mode,
    TableConfig,
    WriteStrategy,
    describe_errors,
)


def sync_from_file(conn: psycopg.Connection, schema: str, configs: list[TableConfig]) -> None:
    """Insert new rows; update rows the file still owns. User-edited rows are left alone."""
    cols = [c for c in EDITABLE_FIELDS if c != "next_refresh_at"]
    insert_cols = ["table_name", "source_table", "origin", *cols]
    stmt = sql.SQL(
        "insert into {t} ({cols}) values ({vals}) on conflict (table_name) do update set "
        "{updates}, updated_at = now() where {t}.origin = 'file' and ({old}) is distinct from ({new})"
    ).format(
        t=qualified(schema, "refresh_config"),
        cols=sql.SQL(", ").join(map(sql.Identifier, insert_cols)),
        vals=sql.SQL(", ").join(sql.Placeholder() * len(insert_cols)),
        updates=sql.SQL(", ").join(
            sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in ["source_table", *cols]
        ),
        old=sql.SQL(", ").join(
            sql.SQL("{t}.{c}").format(t=qualified(schema, "refresh_config"), c=sql.Identifier(c))
            for c in ["source_table", *cols]
        ),
        new=sql.SQL(", ").join(
            sql.SQL("excluded.{c}").format(c=sql.Identifier(c)) for c in ["source_table", *cols]
        ),
    )
    with conn.cursor() as cur:
        cur.executemany(stmt, [_row(c, insert_cols) for c in configs])


def _row(cfg: TableConfig, cols: list[str]) -> list[Any]:
    data = cfg.model_dump(mode="json")
    return [json.dumps(data[c]) if c == "custom_params" else data[c] for c in cols]


def load_all(conn: psycopg.Connection, schema: str) -> list[TableConfig]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "select table_name, source_table, enabled, mode, priority, refresh_frequency_hours,"
                " next_refresh_at, cursor_column, slice_size, lookback_days, write_strategy,"
                " custom_params, change_detection, origin from {t} order by priority desc, table_name"
            ).format(t=qualified(schema, "refresh_config"))
        )
        return [TableConfig(**row) for row in cur.fetchall()]


def get(conn: psycopg.Connection, schema: str, table_name: str) -> TableConfig:
    for cfg in load_all(conn, schema):
        if cfg.table_name == table_name:
            return cfg
    raise ConfigError(f"table {table_name!r} is not in the registry (see `refresh config get`)")


def update(
    conn: psycopg.Connection, schema: str, table_name: str, changes: dict[str, Any], who: str = "cli"
) -> TableConfig:
    """Validate and apply a change to one row; the row becomes user-owned."""
    unknown = sorted(set(changes) - set(EDITABLE_FIELDS))
    if unknown:
        raise ConfigError(
            f"cannot set {', '.join(unknown)}: editable fields are {', '.join(EDITABLE_FIELDS)}"
        )
    current = get(conn, schema, table_name)
    try:
        new = TableConfig(**{**current.model_dump(), **changes, "origin": "user"})
    except ValidationError as exc:
        raise ConfigError(f"{table_name}: {describe_errors(exc)}") from exc
    cols = list(changes)
    data = new.model_dump(mode="json")
    conn.execute(
        sql.SQL(
            "update {t} set {sets}, origin = 'user', updated_at = now(), updated_by = %s "
            "where table_name = %s"
        ).format(
            t=qualified(schema, "refresh_config"),
            sets=sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in cols),
        ),
        [*(json.dumps(data[c]) if c == "custom_params" else data[c] for c in cols), who, table_name],
    )
    return new


def set_next_refresh(conn: psycopg.Connection, schema: str, table_name: str, when: datetime) -> None:
    """The table's next due time (set after each successful refresh; not a user edit)."""
    conn.execute(
        sql.SQL("update {t} set next_refresh_at = %s where table_name = %s").format(
            t=qualified(schema, "refresh_config")
        ),
        (when, table_name),
    )


def register_new_tables(
    conn: psycopg.Connection, schema: str, source_tables: list[str], known: list[TableConfig]
) -> list[TableConfig]:
    """Register source tables the registry has never seen, in dry_run mode; emit events."""
    from flows.core.type_mapping import pg_column_name

    have = {c.source_table for c in known} | {c.table_name for c in known}
    added = []
    for source in sorted(source_tables):
        if source in have:
            continue
        try:
            cfg = TableConfig(
                table_name=pg_column_name(source),
                source_table=source,
                mode=Mode.DRY_RUN,
                priority=PRIORITY_NAMES["background"],
                write_strategy=WriteStrategy.FULL_REPLACE,
                origin="auto",
            )
        except (ValidationError, ConfigError):
            continue  # a name we cannot map is reported by `refresh validate`, not registered
        sync_from_file(conn, schema, [cfg])
        outbox.emit(
            conn,
            schema,
            "table.registered",
            {
                "table": cfg.table_name,
                "source_table": source,
                "mode": cfg.mode.value,
                "write_strategy": cfg.write_strategy.value,
            },
            table_name=cfg.table_name,
        )
        added.append(cfg)
    return added
