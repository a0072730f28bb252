"""Keeping raw tables compact under daily slice replacement (docs/benchmarks.md, "Bloat").

A slice replacement deletes and re-inserts its rows in one transaction, so the new rows cannot
reuse the space of the rows they replace: readers still see those until the commit. The space
becomes reusable only once VACUUM has removed the dead rows. Never vacuumed, a table grows by
one run's worth a day (bench/bloat.py: 6.2x after 30 days); autovacuum's default trigger (20%
of the table dead) lets a table replaced 17% a day reach 1.35x, and only if autovacuum gets to
it in time (busy workers, cost throttling on a large table, long transactions). Vacuumed after
each run, the table stays within its size plus one run's worth of replaced rows (1.18x).

So the flow vacuums the raw tables a run changed once the run's transactions are over (every
slice committed, dbt done: the deleted rows are then dead to every snapshot), and hourly
housekeeping vacuums any raw table whose dead rows exceed a share of its live rows (a run
killed before its end). VACUUM takes no lock that readers or COPY wait for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import psycopg
from psycopg import sql

from flows.core.db import connect
from flows.core.settings import Settings
from flows.core.table_config import Mode

log = logging.getLogger(__name__)

# Housekeeping vacuums a raw table once its dead rows exceed this share of its live rows
# (autovacuum's default is 0.2 of the table, which lets a table replaced daily grow ~1.5x).
DEAD_ROWS_SHARE = 0.05
DEAD_ROWS_MIN = 10_000


def changed_raw_tables(settings: Settings, changed: Iterable[tuple[str, str, int]]) -> list[tuple[str, str]]:
    """(schema, table) of each (table, mode, rows deleted) whose run deleted rows: only those
    hold dead rows; a first load or a dry run left nothing to vacuum."""
    out: list[tuple[str, str]] = []
    for table, mode, deleted in changed:
        if deleted <= 0 or mode in (Mode.DRY_RUN.value, Mode.DISABLED.value):
            continue
        schema = f"{settings.raw_schema}_shadow" if mode == Mode.SHADOW.value else settings.raw_schema
        out.append((schema, table))
    return out


def vacuum_tables(settings: Settings, tables: Iterable[tuple[str, str]]) -> dict[str, float]:
    """VACUUM each (schema, table); seconds per table. Never raises: a failure is logged, the
    next run or housekeeping vacuums again. A table locked by DDL is skipped, not waited for."""
    took: dict[str, float] = {}
    try:
        with connect(settings, autocommit=True) as conn:
            for schema, table in tables:
                started = time.monotonic()
                try:
                    conn.execute(sql.SQL("vacuum (skip_locked) {}").format(sql.Identifier(schema, table)))
                except psycopg.errors.UndefinedTable:
                    continue
                took[f"{schema}.{table}"] = time.monotonic() - started
    except psycopg.Error as exc:
        log.warning("vacuum of raw tables failed (the next run or housekeeping retries): %s", exc)
    return took


def vacuum_after_run(settings: Settings, changed: Iterable[tuple[str, str, int]]) -> dict[str, float]:
    """The flow's last step: vacuum the raw tables whose slices this run replaced."""
    took = vacuum_tables(settings, changed_raw_tables(settings, changed))
    if took:
        log.info("vacuumed %s", ", ".join(f"{t} ({s:.1f}s)" for t, s in took.items()))
    return took


def vacuum_bloated_raw_tables(settings: Settings) -> dict[str, float]:
    """Housekeeping: vacuum the raw tables whose dead rows exceed DEAD_ROWS_SHARE of their
    live rows (and DEAD_ROWS_MIN); seconds per table."""
    with connect(settings, autocommit=True) as conn:
        rows = conn.execute(
            "select schemaname, relname from pg_stat_user_tables "
            "where schemaname in (%s, %s) and n_dead_tup > greatest(%s, %s * n_live_tup) "
            "order by schemaname, relname",
            (settings.raw_schema, f"{settings.raw_schema}_shadow", DEAD_ROWS_MIN, DEAD_ROWS_SHARE),
        ).fetchall()
    return vacuum_tables(settings, [(r[0], r[1]) for r in rows])
