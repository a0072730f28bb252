"""The table registry: per-table refresh configuration kept in Postgres.

Initial values come from config/tables.yml; a row edited through the CLI/API (origin 'user')
keeps its edits, rows still owned by the file follow it. Tables that appear in the source
dataset and are in neither place are registered automatically in `dry_run` mode (they write
nothing until someone cuts them over) and an audit event says so. This module holds the model
and the file; the rows (`refresh_config`) are read and written by flows.control.registry.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.core.errors import ConfigError
from flows.core.identifiers import validate_pg_identifier, validate_table

if TYPE_CHECKING:
    from flows.core.settings import Settings


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
    (flows.engine.change_detection); off: read every slice of the window."""

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


def target_schema(settings: Settings, cfg: TableConfig) -> str:
    """The Postgres schema a table's refresh writes and its validation reads: a shadow table's
    own schema beside raw, so the live raw table stays as it is until cutover."""
    return f"{settings.raw_schema}_shadow" if cfg.mode is Mode.SHADOW else settings.raw_schema


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """`field=value` pairs (`refresh config set`) into registry changes: JSON for custom_params,
    `null` for none, `now` for next_refresh_at; every other value is checked by TableConfig
    when `update` applies it."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        field = field.strip()
        if not sep or not field:
            raise ConfigError(f"{pair!r} is not field=value (e.g. mode=live, priority=high)")
        value = value.strip()
        if value.lower() in ("null", "none"):
            changes[field] = None
        elif field == "custom_params":
            try:
                changes[field] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"custom_params must be a JSON object: {exc.msg}") from exc
        elif field == "next_refresh_at" and value.lower() == "now":
            changes[field] = datetime.now(UTC)
        else:
            changes[field] = value
    return changes


def describe_errors(exc: ValidationError) -> str:
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
            problems.append(f"{name}: {describe_errors(exc)}")
        except TypeError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise ConfigError(f"{path}: invalid table config: " + " | ".join(problems))
    return out
