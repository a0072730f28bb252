"""Validation and quoting of identifiers for BigQuery and Postgres.

Nothing user-supplied is ever formatted into SQL unvalidated: BigQuery names are checked
against the documented character sets and quoted with backticks; Postgres names go through
psycopg's `sql.Identifier`.
"""

from __future__ import annotations

import re

from flows.core.errors import ConfigError

# Project ids: 6-30 chars, lowercase letters, digits, hyphens; may carry an org domain prefix
# ("example.com:project"). Dataset and table ids: letters, digits, underscores (tables may also
# hold hyphens and spaces in recent BigQuery, which we do not accept from configuration).
_PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.-]{0,62}:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_DATASET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
# Postgres identifiers we create: lowercase snake_case, at most 63 bytes.
_PG_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_project(project: str) -> str:
    if not isinstance(project, str) or not _PROJECT_RE.match(project):
        raise ConfigError(
            f"invalid BigQuery project id {project!r}: use 6-30 lowercase letters, digits or "
            "hyphens, starting with a letter (no dots, quotes or trailing punctuation)"
        )
    return project


def validate_dataset(dataset: str) -> str:
    if not isinstance(dataset, str) or not _DATASET_RE.match(dataset):
        raise ConfigError(
            f"invalid BigQuery dataset name {dataset!r}: use letters, digits and underscores "
            "only (no dots, quotes, spaces or trailing punctuation)"
        )
    return dataset


def validate_table(table: str) -> str:
    if not isinstance(table, str) or not _TABLE_RE.match(table):
        raise ConfigError(f"invalid BigQuery table name {table!r}: use letters, digits and underscores only")
    return table


def validate_pg_identifier(name: str, what: str = "Postgres identifier") -> str:
    if not isinstance(name, str) or not _PG_RE.match(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use lowercase letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return name


def bq_quote(name: str) -> str:
    """Quote a BigQuery column or path element with backticks.

    Column names from a source schema may contain spaces (the SQP export does); they may
    not contain backticks or backslashes, which no BigQuery column name can.
    """
    if "`" in name or "\\" in name or "\n" in name:
        raise ConfigError(f"BigQuery name {name!r} contains a character that cannot be quoted")
    return f"`{name}`"


def bq_table_path(project: str, dataset: str, table: str) -> str:
    """Fully qualified, quoted `project.dataset.table` after validating each part."""
    validate_project(project)
    validate_dataset(dataset)
    validate_table(table)
    return f"`{project}.{dataset}.{table}`"
