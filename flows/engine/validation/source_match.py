"""Source match: a raw table against its BigQuery source, period by period (check `source_match`).

Each period's fingerprints (flows.engine.fingerprinting) are compared; a period that differs is
bisected (flows.engine.validation.bisection) into the rows that differ. The results are
recorded in dq_results, with `validation.failed` when a period differs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control import dq, fingerprints, registry
from flows.control.fingerprints import EMPTY, Fingerprint, PlanFingerprints
from flows.core.db import connect, relation_columns
from flows.core.errors import ConfigError
from flows.core.planning import Slice, align, next_boundary, to_ts
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig, target_schema
from flows.engine.bigquery import BigQueryClients
from flows.engine.extract import describe
from flows.engine.fingerprinting import (
    QueryStats,
    by_period,
    cursor_of,
    fingerprint_bq,
    fingerprint_pg,
    pg_day,
    pg_where,
    signature,
)
from flows.engine.normal_form import Col, columns_of
from flows.engine.validation.bisection import Differences, bisect

CHECK_NAME = "source_match"


@dataclass
class PeriodResult:
    table_name: str
    period_start: date | None
    period_end: date | None
    bigquery: Fingerprint
    postgres: Fingerprint
    schema: str
    unchecked_columns: list[str]
    differences: Differences | None = None
    # Postgres' figures are the load's fingerprint, its rows proven untouched since (see
    # unchanged_since_load), not a fresh checksum.
    postgres_from_load: bool = False
    # BigQuery's figures are change detection's fingerprint of this run's plan (PlanFingerprints),
    # taken before the read (at `bigquery_as_of`, BigQuery's clock), not a fresh query.
    bigquery_from_plan: bool = False
    bigquery_as_of: datetime | None = None

    @property
    def passed(self) -> bool:
        return self.bigquery == self.postgres

    @property
    def status(self) -> str:
        return "pass" if self.passed else "fail"

    def details(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": self.schema,
            "period_end": self.period_end.isoformat() if self.period_end else None,
            "bigquery": {"rows": self.bigquery.rows, "checksum": str(self.bigquery.checksum)},
            "postgres": {"rows": self.postgres.rows, "checksum": str(self.postgres.checksum)},
        }
        if self.unchecked_columns:
            d["unchecked_columns"] = self.unchecked_columns
        if self.postgres_from_load:
            d["postgres_from"] = "load fingerprint, rows unchanged since the load"
        if self.bigquery_from_plan:
            d["bigquery_from_plan"] = True
            d["bigquery_as_of"] = self.bigquery_as_of.isoformat() if self.bigquery_as_of else None
        if self.differences is not None:
            d.update(self.differences.to_dict())
            found = self.differences.missing_in_postgres or self.differences.extra_in_postgres
            if self.bigquery_from_plan and not (found or self.differences.different):
                d["note"] = (
                    "no row differs from BigQuery now: the source changed after the plan's "
                    "fingerprint (bigquery_as_of), Postgres holds what the read saw"
                )
        return d


def key_columns(cfg: TableConfig) -> list[str]:
    keys = cfg.custom_params.get("key_columns") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError(
            f"{cfg.table_name}: custom_params.key_columns must be a list of source column names"
        )
    return keys


@dataclass(frozen=True)
class LoadedBy:
    """The validation after a live refresh: the run whose loads are checked, where their
    checkpoints are, and the periods to report (None: every period, a whole-table load)."""

    control_schema: str
    run_id: UUID
    periods: frozenset[date | None] | None


_XID_SPAN = 2**31  # xmin holds 32 bits: younger loads are told apart from every later writer


def unchanged_since_load(
    conn: psycopg.Connection,
    loaded: LoadedBy,
    schema: str,
    table: str,
    cursor: Col | None,
) -> dict[date | None, Fingerprint]:
    """The fingerprints (by slice start) that `loaded.run_id`'s loads stored, for the slices
    whose rows are still exactly the rows those loads fingerprinted.

    A slice qualifies when every row in its range still carries its loading transaction's id
    (`xmin`: an update writes a new row version with the updater's id, an insert carries its
    inserter's, a delete leaves the count short), as many rows as the load fingerprinted, and
    that transaction is less than 2^31 transactions old (so no later one shares its 32 bits).
    One scan of the slices' span reads the cursor and tuple headers: no value is formatted or hashed.
    """
    slices, now = fingerprints.loaded_by(conn, loaded.control_schema, table, loaded.run_id)
    young = [s for s in slices if now - s.xid < _XID_SPAN]
    if not young:
        return {}
    # One scan of the slices' span: rows per day and per row-version writer.
    span = None
    if cursor is not None and all(s.start is not None and s.end is not None for s in young):
        span = Slice(min(s.start for s in young if s.start), max(s.end for s in young if s.end))
    where, params = pg_where(cursor, span)
    day = pg_day(cursor) if cursor else sql.SQL("null::date")
    counts = conn.execute(
        sql.SQL("select {day}, xmin::text, count(*) from {t}{where} group by 1, xmin").format(
            day=day, t=sql.Identifier(schema, table), where=where
        ),
        params,
    ).fetchall()
    out: dict[date | None, Fingerprint] = {}
    for s in young:
        inside = [
            (int(x), int(n))
            for d, x, n in counts
            if s.start is None or s.end is None or (d is not None and s.start <= d < s.end)
        ]
        rows = sum(n for _, n in inside)
        same = sum(n for x, n in inside if x == s.xid % 2**32)
        if rows == same == s.rows:
            out[s.start] = Fingerprint(s.rows, s.checksum)
    return out


def validate_table(
    clients: BigQueryClients,
    conn: psycopg.Connection,
    cfg: TableConfig,
    schema: str,
    first: date | None = None,
    last: date | None = None,
    stats: QueryStats | None = None,
    loaded: LoadedBy | None = None,
    plan: PlanFingerprints | None = None,
) -> list[PeriodResult]:
    """Compare one table period by period (days `first`..`last` inclusive; default: all).

    With `loaded` (the step after a live refresh), only its periods are reported, and where
    each of them is proven unchanged since its load, Postgres' side is the load's fingerprint
    instead of a fresh checksum; a period that then differs is checksummed afresh before it is
    reported, so a reused figure never decides a difference on Postgres' side.

    With `plan` as well (computed with the same normal form), BigQuery's side of the periods
    it holds is the plan's fingerprint: BigQuery is asked only for the other periods, or not at
    all. It is the source's state before the run read it (docs/operations.md says why that is
    sound: a source changed since shows as a difference, never as an agreement).
    """
    source = describe(clients, cfg.source_table)
    cols = columns_of(source, clients.settings.uses_emulator)
    keys = key_columns(cfg)
    unknown = [k for k in keys if not any(k in (c.source.name, c.name) for c in cols)]
    if unknown:
        raise ConfigError(f"{cfg.table_name}: key_columns {unknown} are not columns of the source")
    cursor, size = cursor_of(cfg, source, cols)
    window = None
    if cursor is not None and (first or last):
        lo = align(first, size) if first and size else date(1, 1, 1)
        hi = next_boundary(align(last, size), size) if last and size else date(9999, 12, 31)
        window = Slice(lo, hi)
    wanted = loaded.periods if loaded is not None else None
    if loaded is not None and wanted is None and cursor is None:
        wanted = frozenset({None})

    def fresh() -> dict[date | None, Fingerprint]:
        return by_period(fingerprint_pg(conn, schema, cfg.table_name, cols, cursor, window), size)

    planned: dict[date | None, Fingerprint] = {}
    if plan is not None and wanted and plan.signature == signature(cols, cursor, size):
        planned = {p: plan.periods[p] for p in wanted if p in plan.periods}
    ask = wanted - planned.keys() if wanted is not None else None
    bq_window = window
    if ask is not None and planned and cursor is not None and size is not None:
        # Only the periods the plan did not fingerprint (None when it did them all).
        starts = [p for p in ask if p is not None]
        bq_window = Slice(min(starts), next_boundary(max(starts), size)) if starts else None

    def bigquery() -> dict[date | None, Fingerprint]:
        if ask is not None and not ask:
            return {}
        days = fingerprint_bq(clients, cfg.source_table, cols, cursor, bq_window, stats)
        return {p: fp for p, fp in by_period(days, size).items() if p not in planned}

    # Both engines work at once: the BigQuery job runs while Postgres computes its side.
    from_load = False
    with ThreadPoolExecutor(max_workers=1) as pool:
        bq_days = pool.submit(bigquery)
        # A live table's checkpoints are keyed by its name (refresh.checkpoint_key).
        known = {}
        if loaded is not None and wanted:
            known = unchanged_since_load(conn, loaded, schema, cfg.table_name, cursor)
        if wanted and wanted <= known.keys():
            pg, from_load = {p: known[p] for p in wanted}, True
        else:
            pg = fresh()
        bq = {**bq_days.result(), **planned}
    if from_load and any(bq.get(p, EMPTY) != pg[p] for p in pg):
        pg, from_load = fresh(), False
    unchecked = [c.name for c in cols if c.kind == "UNCHECKED"]
    results = []
    for start in sorted(set(bq) | set(pg), key=lambda d: d or date.min):
        if wanted is not None and start not in wanted:
            continue
        end = next_boundary(start, size) if start and size else None
        r = PeriodResult(
            cfg.table_name,
            start,
            end,
            bq.get(start, EMPTY),
            pg.get(start, EMPTY),
            schema,
            unchecked,
            postgres_from_load=from_load,
            bigquery_from_plan=start in planned,
            bigquery_as_of=plan.as_of if plan is not None and start in planned else None,
        )
        if not r.passed:
            period = Slice(start, end) if start and end else None
            r.differences = bisect(clients, conn, cfg, schema, cols, cursor, period, keys)
        results.append(r)
    return results


def record_results(
    conn: psycopg.Connection,
    control_schema: str,
    cfg: TableConfig,
    results: list[PeriodResult],
    run_id: UUID | None = None,
) -> None:
    """One transaction: a dq_results row per period, and `validation.failed` if any differ."""
    rows = [
        dq.DqRow(
            r.table_name,
            CHECK_NAME,
            to_ts(r.period_start) if r.period_start else None,
            r.status,
            r.bigquery.rows,
            r.postgres.rows,
            r.details(),
        )
        for r in results
    ]
    failed = [r for r in results if not r.passed]
    with conn.transaction():
        dq.record(conn, control_schema, rows, run_id)
        if failed:
            dq.emit_event(
                conn,
                control_schema,
                dq.VALIDATION_FAILED,
                cfg.table_name,
                {
                    "schema": failed[0].schema,
                    "periods_failed": [str(r.period_start) if r.period_start else "full" for r in failed],
                    "periods_checked": len(results),
                    "rows_missing_in_postgres": sum(
                        len(r.differences.missing_in_postgres) for r in failed if r.differences
                    ),
                    "rows_extra_in_postgres": sum(
                        len(r.differences.extra_in_postgres) for r in failed if r.differences
                    ),
                    "rows_different": sum(len(r.differences.different) for r in failed if r.differences),
                },
                run_id,
            )


def check_raw_table(
    conn: psycopg.Connection, schema: str, cfg: TableConfig, clients: BigQueryClients
) -> None:
    existing = relation_columns(conn, schema, cfg.table_name)
    if not existing:
        raise ConfigError(
            f"{schema}.{cfg.table_name} does not exist: nothing has been loaded for this table "
            f"yet (run `refresh run --tables {cfg.table_name}` first)"
        )
    cols = columns_of(describe(clients, cfg.source_table), clients.settings.uses_emulator)
    missing = [c.name for c in cols if c.name not in existing]
    if missing:
        raise ConfigError(
            f"{schema}.{cfg.table_name} lacks source columns {missing}: the next refresh adds them; "
            "validate after it"
        )


def validate(
    settings: Settings,
    clients: BigQueryClients,
    tables: list[str] | None = None,
    first: date | None = None,
    last: date | None = None,
    run_id: UUID | None = None,
) -> dict[str, list[PeriodResult]]:
    """Validate and record the named tables (default: every enabled shadow or live table)."""
    if first and last and first > last:
        raise ConfigError(f"--from {first} is after --to {last}")
    with connect(settings, autocommit=True) as conn:
        configs = registry.load_all(conn, settings.control_schema)
        by_name = {c.table_name: c for c in configs}
        if tables:
            unknown = [t for t in tables if t not in by_name]
            if unknown:
                raise ConfigError(
                    f"unknown table(s) {', '.join(unknown)}: registered are {', '.join(sorted(by_name))}"
                )
            chosen = [by_name[t] for t in tables]
        else:
            chosen = [c for c in configs if c.enabled and c.mode in (Mode.SHADOW, Mode.LIVE)]
        out: dict[str, list[PeriodResult]] = {}
        for cfg in chosen:
            schema = target_schema(settings, cfg)
            check_raw_table(conn, schema, cfg, clients)
            results = validate_table(clients, conn, cfg, schema, first, last)
            record_results(conn, settings.control_schema, cfg, results, run_id)
            out[cfg.table_name] = results
        return out
