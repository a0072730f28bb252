"""Shadow match: each dbt mart and summary against its shadow build, period by period (check
`shadow_match`), with the row checksums of source match.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control import dq
from flows.control.fingerprints import EMPTY, Fingerprint
from flows.core.db import relation_columns
from flows.core.planning import to_ts
from flows.engine.extract import SourceColumn
from flows.engine.fingerprinting import fingerprint_pg
from flows.engine.normal_form import Col

SHADOW_CHECK = "shadow_match"
SHADOW_LAYERS = ("marts", "summaries")
# The column a model's rows are compared by, first found; a model without one is one period.
PERIOD_COLUMNS = ("period_start", "week_start", "date", "start_date")
_PG_KINDS = {
    "text": "STRING",
    "character varying": "STRING",
    "bigint": "INT64",
    "integer": "INT64",
    "smallint": "INT64",
    "boolean": "BOOL",
    "double precision": "FLOAT64",
    "real": "FLOAT64",
    "timestamp with time zone": "TIMESTAMP",
    "timestamp without time zone": "DATETIME",
    "date": "DATE",
    "bytea": "BYTES",
}


def _pg_col(name: str, pg_type: str) -> Col:
    base = pg_type.split("(")[0].strip()
    if base == "numeric":
        # Both sides are Postgres: compare numerics at their declared scale, else at 20 places.
        scale = int(pg_type.split(",")[1].rstrip(")")) if "," in pg_type else 20
        return Col(SourceColumn(name, "NUMERIC", "NULLABLE", None, scale), name)
    return Col(SourceColumn(name, _PG_KINDS.get(base, "JSON"), "NULLABLE", None, None), name)


def compared_columns(columns: dict[str, str]) -> list[Col]:
    """A model's columns as normal forms; lineage columns (`_loaded_at`, `_run_id` ...) differ
    by construction between two builds and are left out."""
    return [_pg_col(n, t) for n, t in columns.items() if not n.startswith("_")]


@dataclass(frozen=True)
class ShadowResult:
    model: str
    layer: str
    period_start: date | None
    live: Fingerprint
    shadow: Fingerprint

    @property
    def passed(self) -> bool:
        return self.live == self.shadow


def compare_shadow(conn: psycopg.Connection, suffix: str) -> list[ShadowResult]:
    """Each mart and summary against its shadow build (`<layer><suffix>`), period by period,
    with the same row checksums as validation; a model missing on one side fails whole."""
    out: list[ShadowResult] = []
    for layer in SHADOW_LAYERS:
        names = [
            r[0]
            for r in conn.execute(
                "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname in (%s, %s) and c.relkind in ('r', 'v', 'm', 'p') "
                "group by c.relname order by 1",
                (layer, layer + suffix),
            ).fetchall()
        ]
        for name in names:
            live_cols = relation_columns(conn, layer, name)
            shadow_cols = relation_columns(conn, layer + suffix, name)
            if not live_cols or not shadow_cols or live_cols != shadow_cols:
                out.append(
                    ShadowResult(
                        name, layer, None, _rows(conn, layer, name), _rows(conn, layer + suffix, name)
                    )
                )
                continue
            cols = compared_columns(live_cols)
            cursor = next((c for p in PERIOD_COLUMNS for c in cols if c.name == p), None)
            live = fingerprint_pg(conn, layer, name, cols, cursor, None)
            shadow = fingerprint_pg(conn, layer + suffix, name, cols, cursor, None)
            for start in sorted(set(live) | set(shadow), key=lambda d: d or date.min):
                out.append(ShadowResult(name, layer, start, live.get(start, EMPTY), shadow.get(start, EMPTY)))
    return out


def _rows(conn: psycopg.Connection, schema: str, name: str) -> Fingerprint:
    if not relation_columns(conn, schema, name):
        return Fingerprint(-1, 0)  # absent: differs from any table, even an empty one
    row = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(schema, name))).fetchone()
    return Fingerprint(int(row[0]) if row else 0, 0)


def record_shadow(
    conn: psycopg.Connection, control_schema: str, results: list[ShadowResult], run_id: UUID | None = None
) -> None:
    """A dq_results row per model and period (check `shadow_match`; expected/observed: live /
    shadow rows) and `validation.failed` per model that differs, in one transaction."""
    rows = [
        dq.DqRow(
            r.model,
            SHADOW_CHECK,
            to_ts(r.period_start) if r.period_start else None,
            "pass" if r.passed else "fail",
            r.live.rows,
            r.shadow.rows,
            {
                "layer": r.layer,
                "live": {"rows": r.live.rows, "checksum": str(r.live.checksum)},
                "shadow": {"rows": r.shadow.rows, "checksum": str(r.shadow.checksum)},
            },
        )
        for r in results
    ]
    failed: dict[str, list[str]] = {}
    for r in results:
        if not r.passed:
            failed.setdefault(r.model, []).append(str(r.period_start or "full"))
    dq.record_per_relation(conn, control_schema, rows, SHADOW_CHECK, failed, run_id)
