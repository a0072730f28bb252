"""The table registry: per-table refresh configuration kept in Postgres.

Initial values come from config/tables.yml; a row edited through the CLI/API (origin 'user')
keeps its edits, rows still owned by the file follow it. Tables that appear in the source
dataset and are in neither place are registered automatically in `dry_run` mode (they write
nothing until someone cuts them over) and an audit event says so.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.control import webhooks as webhook_events
from flows.errors import ConfigError
from flows.identifiers import validate_pg_identifier, validate_table


class Mode(StrEnum):
    DISABLED = "disabled"
    DRY_RUN = "dry_run"
    SHADOW = "shadow"
    LIVE = "live"


class SliceSize(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class WriteStrategy(StrEnum):
    SLICE_REPLACE = "slice_replace"
    FULL_REPLACE = "full_replace"


class ChangeDetection(StrEnum):
    """checksum: fingerprint each slice in BigQuery first and skip the unchanged ones
    (flows.change_detection); off: read every slice of the window."""

    CHECKSUM = "checksum"
    OFF = "off"


PRIORITY_NAMES = {"critical": 100, "high": 90, "medium": 80, "low": 70, "background": 60}

EDITABLE_FIELDS = (
    "enabled",
    "mode",
    "priority",
    "refresh_frequency_hours",
    "next_refresh_at",
    "cursor_column",
    "slice_size",
    "lookback_days",
    "write_strategy",
    "custom_params",
    "change_detection",
)


def _as_value_error(check: Any, *args: Any) -> Any:
    # pydantic reports ValueErrors per field; our validators raise ConfigError.
    try:
        return check(*args)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class TableConfig(BaseModel):
    """One registry row. `table_name` is the Postgres raw table name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    table_name: str
    source_table: str
    enabled: bool = True
    mode: Mode = Mode.LIVE
    priority: int = Field(default=80, ge=0, le=1000)
    refresh_frequency_hours: int = Field(default=24, ge=1, le=168)
    next_refresh_at: datetime | None = None
    cursor_column: str | None = None
    slice_size: SliceSize = SliceSize.WEEK
    lookback_days: int = Field(default=60, ge=0, le=3650)
    write_strategy: WriteStrategy = WriteStrategy.SLICE_REPLACE
    custom_params: dict[str, Any] = Field(default_factory=dict)
    change_detection: ChangeDetection = ChangeDetection.CHECKSUM
    origin: str = "file"

    @field_validator("table_name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _as_value_error(validate_pg_identifier, v, "table name")

    @field_validator("source_table")
    @classmethod
    def _source(cls, v: str) -> str:
        return _as_value_error(validate_table, v)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in PRIORITY_NAMES:
            return PRIORITY_NAMES[v.lower()]
        return v

    @model_validator(mode="after")
    def _cursor(self) -> TableConfig:
        if self.write_strategy is WriteStrategy.SLICE_REPLACE and not self.cursor_column:
            raise ValueError("slice_replace needs a cursor_column (or use full_replace)")
        return self


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())


def load_file(path: Path) -> list[TableConfig]:
    """Parse and validate the registry file; every problem is named in one ConfigError."""
    if not path.is_file():
        raise ConfigError(f"table registry file {path} does not exist (REFRESH_TABLES_FILE)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        # The parser's own text spans several lines (context, a caret): one line instead.
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else str(problem)
        raise ConfigError(f"{path}: not valid YAML{where}: {detail}") from None
    tables = doc.get("tables") if isinstance(doc, dict) else None
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: expected a mapping `tables:` with at least one table")
    out, problems = [], []
    for name, body in tables.items():
        try:
            out.append(TableConfig(table_name=name, **(body or {})))
        except ValidationError as exc:
            problems.append(f"{name}: {_errors(exc)}")
        except TypeError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise ConfigError(f"{path}: invalid table config: " + " | ".join(problems))
    return out


def _table(schema: str) -> sql.Composable:
    return sql.Identifier(schema, "refresh_config")


def sync_from_file(conn: psycopg.Connection, schema: str, configs: list[TableConfig]) -> None:
    """Insert new rows; update rows the file still owns. User-edited rows are left alone."""
    cols = [c for c in EDITABLE_FIELDS if c != "next_refresh_at"]
    insert_cols = ["table_name", "source_table", "origin", *cols]
    stmt = sql.SQL(
        "insert into {t} ({cols}) values ({vals}) on conflict (table_name) do update set "
        "{updates}, updated_at = now() where {t}.origin = 'file' and ({old}) is distinct from ({new})"
    ).format(
        t=_table(schema),
        cols=sql.SQL(", ").join(map(sql.Identifier, insert_cols)),
        vals=sql.SQL(", ").join(sql.Placeholder() * len(insert_cols)),
        updates=sql.SQL(", ").join(
            sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in ["source_table", *cols]
        ),
        old=sql.SQL(", ").join(
            sql.SQL("{t}.{c}").format(t=_table(schema), c=sql.Identifier(c)) for c in ["source_table", *cols]
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
            ).format(t=_table(schema))
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
        raise ConfigError(f"{table_name}: {_errors(exc)}") from exc
    cols = list(changes)
    data = new.model_dump(mode="json")
    conn.execute(
        sql.SQL(
            "update {t} set {sets}, origin = 'user', updated_at = now(), updated_by = %s "
            "where table_name = %s"
        ).format(
            t=_table(schema),
            sets=sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in cols),
        ),
        [*(json.dumps(data[c]) if c == "custom_params" else data[c] for c in cols), who, table_name],
    )
    return new


def set_next_refresh(conn: psycopg.Connection, schema: str, table_name: str, when: datetime) -> None:
    """The table's next due time (set after each successful refresh; not a user edit)."""
    conn.execute(
        sql.SQL("update {t} set next_refresh_at = %s where table_name = %s").format(t=_table(schema)),
        (when, table_name),
    )


def register_new_tables(
    conn: psycopg.Connection, schema: str, source_tables: list[str], known: list[TableConfig]
) -> list[TableConfig]:
    """Register source tables the registry has never seen, in dry_run mode; emit events."""
    from flows.type_mapping import pg_column_name

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
        webhook_events.emit(
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
