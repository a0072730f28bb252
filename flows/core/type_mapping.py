"""BigQuery -> Postgres type and column-name mapping.

Column names: one rule, applied everywhere (raw tables, dbt sources, validation):
  1. lowercase;
  2. every run of characters other than a-z and 0-9 becomes one underscore;
  3. leading and trailing underscores are stripped;
  4. a name that then starts with a digit gets a leading ``c_``;
  5. the result must be 1-63 characters and must not start with ``_`` (reserved for the
     lineage columns ``_loaded_at``, ``_run_id``, ``_slice_start``); two source columns that
     map to one name are an error.
So ``Total Same Day Shipping Cart Add Count`` -> ``total_same_day_shipping_cart_add_count``.

Types: exact where Postgres has the type; nested and JSON values become ``jsonb``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flows.core.errors import ConfigError, SchemaDriftError

_NON_ALNUM = re.compile(r"[^a-z0-9]+")

# BigQuery legacy and standard SQL type names -> Postgres type.
_SCALAR_TYPES: dict[str, str] = {
    "STRING": "text",
    "BYTES": "bytea",
    "INTEGER": "bigint",
    "INT64": "bigint",
    "FLOAT": "double precision",
    "FLOAT64": "double precision",
    "NUMERIC": "numeric(38,9)",
    "DECIMAL": "numeric(38,9)",
    "BIGNUMERIC": "numeric",
    "BIGDECIMAL": "numeric",
    "BOOLEAN": "boolean",
    "BOOL": "boolean",
    "TIMESTAMP": "timestamp with time zone",
    "DATE": "date",
    "TIME": "time without time zone",
    "DATETIME": "timestamp without time zone",
    "JSON": "jsonb",
    "RECORD": "jsonb",
    "STRUCT": "jsonb",
    "GEOGRAPHY": "text",
    "INTERVAL": "interval",
    "RANGE": "text",
}

LINEAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("_loaded_at", "timestamp with time zone"),
    ("_run_id", "uuid"),
    ("_slice_start", "timestamp with time zone"),
)


def pg_column_name(bq_name: str) -> str:
    """Map a BigQuery column name to its Postgres name (see the module docstring)."""
    name = _NON_ALNUM.sub("_", bq_name.lower()).strip("_")
    if name and name[0].isdigit():
        name = f"c_{name}"
    if not name or len(name) > 63:
        raise ConfigError(
            f"column {bq_name!r} maps to {name!r}, which is not a usable Postgres name "
            "(empty or longer than 63 characters): rename it in the source or a view"
        )
    return name


def pg_type(
    field_type: str, mode: str = "NULLABLE", precision: int | None = None, scale: int | None = None
) -> str:
    """The Postgres type for a BigQuery field type and mode."""
    if (mode or "NULLABLE").upper() == "REPEATED":
        return "jsonb"
    key = field_type.upper()
    if key not in _SCALAR_TYPES:
        raise ConfigError(f"BigQuery type {field_type!r} has no Postgres mapping")
    if key in ("NUMERIC", "DECIMAL") and precision is not None:
        return f"numeric({precision},{scale or 0})"
    if key in ("BIGNUMERIC", "BIGDECIMAL") and precision is not None:
        return f"numeric({precision},{scale or 0})"
    return _SCALAR_TYPES[key]


@dataclass(frozen=True)
class ColumnMapping:
    source_name: str
    name: str
    source_type: str
    pg_type: str

    @property
    def is_json(self) -> bool:
        return self.pg_type == "jsonb"


def map_schema(fields: list[tuple[str, str, str, int | None, int | None]], table: str) -> list[ColumnMapping]:
    """Map (name, type, mode, precision, scale) tuples; reject collisions and reserved names."""
    seen: dict[str, str] = {}
    out: list[ColumnMapping] = []
    for name, ftype, mode, precision, scale in fields:
        mapped = pg_column_name(name)
        if mapped in seen:
            raise ConfigError(
                f"{table}: columns {seen[mapped]!r} and {name!r} both map to {mapped!r}; "
                "rename one of them in the source"
            )
        seen[mapped] = name
        mode = mode or "NULLABLE"
        source_type = f"ARRAY<{ftype}>" if mode.upper() == "REPEATED" else ftype.upper()
        out.append(ColumnMapping(name, mapped, source_type, pg_type(ftype, mode, precision, scale)))
    return out


def _normalise_pg_type(t: str) -> str:
    return t.replace(" ", "").lower()


@dataclass(frozen=True)
class SchemaDiff:
    added: list[ColumnMapping]


def diff_schema(table: str, wanted: list[ColumnMapping], existing: dict[str, str]) -> SchemaDiff:
    """Compare the mapped source schema with the raw table's columns (name -> formatted type).

    New source columns are returned to be added; a dropped or retyped column raises
    SchemaDriftError naming the column and what to do.
    """
    wanted_by_name = {c.name: c for c in wanted}
    problems: list[str] = []
    for name, pgtype in existing.items():
        if name.startswith("_"):
            continue
        col = wanted_by_name.get(name)
        if col is None:
            problems.append(f"column {name!r} was dropped from the source")
        elif _normalise_pg_type(col.pg_type) != _normalise_pg_type(pgtype):
            problems.append(
                f"column {name!r} changed type: raw table has {pgtype}, source now maps to "
                f"{col.pg_type} ({col.source_type})"
            )
    if problems:
        raise SchemaDriftError(
            f"{table}: schema drift: " + "; ".join(problems) + ". Fix the source, or rebuild "
            f"the raw table with `refresh run --tables {table} --full-refresh` after "
            "checking the downstream dbt models"
        )
    return SchemaDiff(added=[c for c in wanted if c.name not in existing])
