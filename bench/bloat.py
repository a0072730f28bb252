"""Does a raw table stay compact when its lookback window is replaced every day?

A raw SQP table of --rows rows over --weeks weekly slices is first loaded slice by slice, then
--days simulated daily runs each replace the lookback window (the registry's SQP settings:
weekly slices, 60 days back, i.e. the window flows.core.planning plans) through the product's
`flows.engine.load.apply_slice` (delete + COPY + checkpoint, one transaction per slice), with fresh
values each day. Each candidate mechanism gets its own table and the same rows:

  none          autovacuum off on the table, nothing else: how fast the table grows unaided
  autovacuum    Postgres' defaults: after each run (a day passes) the table is vacuumed iff
                autovacuum's own trigger holds (dead rows > 50 + 0.2 x rows, or rows inserted
                since the last vacuum > 1000 + 0.2 x rows); emulated, so the result does not
                depend on when autovacuum's 60 s naptime happens to fall
  vacuum_run    the product (flows.engine.maintenance): VACUUM of the changed table after the run,
                plus the emulated autovacuum
  vacuum_slice  VACUUM after every slice commit
  partition     declarative partitions, one per week; a replacement COPYs into a new table
                and swaps it in (detach + drop the old partition, attach the new) in the same
                transaction as the checkpoint

After the last day each table is measured (pg_total_relation_size, heap, indexes; partitions
summed) against a fresh load of the same rows (a new raw table made by ensure_raw_table, the
rows inserted in cursor order), and after every day against its own size after the first load.
Goal: at most 1.3x. The last line is `ratio_vacuum_run=X ratio_autovacuum=Y ...`, each the
largest ratio over the days (the size swings by one run's worth from day to day: VACUUM gives
the table's empty tail back when the new rows all landed in reused space).

    .venv/bin/python bench/bloat.py [--rows 10000000] [--days 30] [--candidates none,vacuum_run]

Postgres: REFRESH_PG_DSN if set, else a throwaway embedded Postgres (temp dir, free port).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from uuid import uuid4

import numpy as np
import psycopg
import pyarrow as pa
from load_throughput import (  # a sibling script: bench/ is on sys.path
    BATCH_ROWS,
    CONTROL,
    _settings_overrides,
    local_services,
    sqp_arrow,
    sqp_columns,
)
from psycopg import sql

from flows.core.db import migrate
from flows.core.planning import Slice, plan_window, slices_between
from flows.core.settings import Settings, get_settings
from flows.core.table_config import TableConfig
from flows.core.type_mapping import ColumnMapping
from flows.engine.load import apply_slice, ensure_raw_table
from flows.engine.maintenance import vacuum_tables

SCHEMA = "bench_bloat"
CANDIDATES = ("none", "autovacuum", "vacuum_run", "vacuum_slice", "partition")
FIRST_WEEK = date(2025, 12, 1)  # a Monday: weekly slices start on Mondays
# The registry's SQP settings (config/tables.yml).
SQP = TableConfig(
    table_name="sqp",
    source_table="search_query_performance",
    cursor_column="Date",
    slice_size="week",
    lookback_days=60,
)


def week_rows(week: int, rows: int, seed: int) -> list[pa.RecordBatch]:
    """SQP rows of one week (the Date of each row inside it); `seed` varies the values."""
    t = sqp_arrow(rows, seed=seed)
    start = np.datetime64(FIRST_WEEK.isoformat(), "us") + np.timedelta64(week * 7, "D")
    offsets = np.random.default_rng(seed).integers(0, 7, rows).astype("timedelta64[D]")
    dates = pa.array(start + offsets, pa.timestamp("us", tz="UTC"))
    return t.set_column(0, t.schema.field(0), dates).to_batches(max_chunksize=BATCH_ROWS)


@dataclass
class Sizes:
    total: int
    heap: int
    indexes: int

    def __str__(self) -> str:
        mb = 1024**2
        return (
            f"total {self.total / mb:8.1f} MB  heap {self.heap / mb:8.1f} MB  "
            f"indexes {self.indexes / mb:6.1f} MB"
        )


def sizes(conn: psycopg.Connection, table: str) -> Sizes:
    """Table + index sizes; for a partitioned table, summed over its partitions."""
    row = conn.execute(
        "select coalesce(sum(pg_total_relation_size(relid)), 0), coalesce(sum(pg_relation_size(relid)), 0), "
        "coalesce(sum(pg_indexes_size(relid)), 0) from ("
        "  select relid from pg_partition_tree(%s::regclass) union select %s::regclass) t",
        (f"{SCHEMA}.{table}",) * 2,
    ).fetchone()
    assert row is not None
    return Sizes(int(row[0]), int(row[1]), int(row[2]))


@dataclass
class Candidate:
    name: str
    vacuum_s: float = 0.0
    vacuums: int = 0
    load_s: float = 0.0
    trajectory: list[float] = field(default_factory=list)


def _partition_name(piece: Slice) -> str:
    assert piece.start is not None
    return f"partition_p{piece.start:%Y%m%d}"


def create_table(conn: psycopg.Connection, c: Candidate, columns: list[ColumnMapping]) -> None:
    target = sql.Identifier(SCHEMA, c.name)
    conn.execute(sql.SQL("drop table if exists {} cascade").format(target))
    with conn.transaction():
        if c.name == "partition":
            ensure_raw_table(conn, SCHEMA, "partition_template", columns, "date")
            conn.execute(
                sql.SQL("create table {} (like {} including defaults) partition by range (date)").format(
                    target, sql.Identifier(SCHEMA, "partition_template")
                )
            )
            conn.execute(sql.SQL("create index on {} (date)").format(target))
        else:
            ensure_raw_table(conn, SCHEMA, c.name, columns, "date")
    # Autovacuum is emulated where it counts (see the module docstring); partitions hold no dead rows.
    if c.name != "partition":
        conn.execute(sql.SQL("alter table {} set (autovacuum_enabled = false)").format(target))


def load_slice(
    conn: psycopg.Connection,
    c: Candidate,
    columns: list[ColumnMapping],
    piece: Slice,
    batches: list[pa.RecordBatch],
) -> None:
    cursor = next(col for col in columns if col.name == "date")
    common = dict(
        control_schema=CONTROL,
        columns=columns,
        cursor=cursor,
        piece=piece,
        batches=iter(batches),
        run_id=uuid4(),
        checkpoint_key=f"bench:{c.name}",
    )
    if c.name != "partition":
        apply_slice(conn, schema=SCHEMA, table=c.name, **common)  # type: ignore[arg-type]
        return
    # COPY into a new table, then swap it in: one transaction, readers see old or new.
    name = _partition_name(piece)
    new = f"{name}_new"
    assert piece.start is not None and piece.end is not None
    with conn.transaction():
        conn.execute(
            sql.SQL("create table {} (like {} including defaults)").format(
                sql.Identifier(SCHEMA, new), sql.Identifier(SCHEMA, "partition")
            )
        )
        apply_slice(conn, schema=SCHEMA, table=new, **common)  # type: ignore[arg-type]
        conn.execute(sql.SQL("create index on {} (date)").format(sql.Identifier(SCHEMA, new)))
        lo, hi = sql.Literal(piece.start_ts), sql.Literal(piece.end_ts)
        conn.execute(
            sql.SQL("alter table {} add constraint {} check (date >= {} and date < {})").format(
                sql.Identifier(SCHEMA, new), sql.Identifier(f"{new}_range"), lo, hi
            )
        )
        old = conn.execute("select to_regclass(%s)", (f"{SCHEMA}.{name}",)).fetchone()
        if old and old[0]:
            conn.execute(sql.SQL("drop table {}").format(sql.Identifier(SCHEMA, name)))
        conn.execute(
            sql.SQL("alter table {} rename to {}").format(sql.Identifier(SCHEMA, new), sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("alter table {} attach partition {} for values from ({}) to ({})").format(
                sql.Identifier(SCHEMA, "partition"), sql.Identifier(SCHEMA, name), lo, hi
            )
        )


def emulated_autovacuum(settings: Settings, conn: psycopg.Connection, c: Candidate) -> None:
    """Vacuum iff Postgres' default autovacuum trigger holds for the table now."""
    # Statistics of the loading backends reach the shared stats at their next report.
    conn.execute("select pg_stat_clear_snapshot()")
    row = conn.execute(
        "select s.n_dead_tup > 50 + 0.2 * greatest(c.reltuples, 0) "
        "or s.n_ins_since_vacuum > 1000 + 0.2 * greatest(c.reltuples, 0) "
        "from pg_stat_user_tables s join pg_class c on c.oid = s.relid "
        "where s.schemaname = %s and s.relname = %s",
        (SCHEMA, c.name),
    ).fetchone()
    if row and row[0]:
        timed_vacuum(settings, c)


def timed_vacuum(settings: Settings, c: Candidate) -> None:
    took = vacuum_tables(settings, [(SCHEMA, c.name)])
    c.vacuum_s += sum(took.values())
    c.vacuums += 1


def wait_for_stats(conn: psycopg.Connection, table: str, deleted: int) -> None:
    """Until the table's statistics count every row deleted so far (at most 15 s)."""
    until = time.monotonic() + 15
    while time.monotonic() < until:
        conn.execute("select pg_stat_clear_snapshot()")
        row = conn.execute(
            "select n_tup_del from pg_stat_user_tables where schemaname = %s and relname = %s",
            (SCHEMA, table),
        ).fetchone()
        if row and row[0] >= deleted:
            return
        time.sleep(0.2)


def run(settings: Settings, args: argparse.Namespace) -> None:
    columns = sqp_columns()
    per_week = args.rows // args.weeks
    weeks = slices_between(FIRST_WEEK, FIRST_WEEK + timedelta(days=7 * args.weeks - 1), SQP.slice_size)
    last_day = weeks[-1].end - timedelta(days=1)  # type: ignore[operator]
    window = plan_window(SQP, weeks[0].start, last_day, weeks[-1].end)
    assert window is not None
    lookback = slices_between(window.first, window.last, SQP.slice_size)
    index = {s.start: i for i, s in enumerate(weeks)}
    print(
        f"raw table: {per_week * args.weeks:,} SQP rows, {args.weeks} weekly slices of {per_week:,}; "
        f"each daily run replaces {len(lookback)} slices ({len(lookback) * per_week:,} rows, "
        f"{len(lookback) / args.weeks:.0%}); {args.days} daily runs"
    )
    candidates = [Candidate(n) for n in args.candidates.split(",")]
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(SCHEMA)))
        for c in candidates:
            create_table(conn, c, columns)
    # Day 0: the first load, slice by slice, identical rows for every candidate.
    for i, piece in enumerate(weeks):
        batches = week_rows(i, per_week, seed=i)
        for c in candidates:
            with psycopg.connect(settings.dsn(), autocommit=True) as conn:
                load_slice(conn, c, columns, piece, batches)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        first = {c.name: sizes(conn, c.name) for c in candidates}
    print("after the first load: " + "; ".join(f"{n}: {s}" for n, s in first.items()))
    deleted_so_far = 0
    for day in range(1, args.days + 1):
        day_started = time.perf_counter()
        for piece in lookback:
            batches = week_rows(index[piece.start], per_week, seed=day * 1000 + index[piece.start])
            for c in candidates:
                started = time.perf_counter()
                with psycopg.connect(settings.dsn(), autocommit=True) as conn:
                    load_slice(conn, c, columns, piece, batches)
                c.load_s += time.perf_counter() - started
                if c.name == "vacuum_slice":
                    timed_vacuum(settings, c)
        deleted_so_far += len(lookback) * per_week
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            for c in candidates:
                if c.name == "vacuum_run":
                    timed_vacuum(settings, c)
                if c.name in ("autovacuum", "vacuum_run"):
                    wait_for_stats(conn, c.name, deleted_so_far)
                    emulated_autovacuum(settings, conn, c)
                c.trajectory.append(sizes(conn, c.name).total / first[c.name].total)
        print(
            f"day {day:2d} ({time.perf_counter() - day_started:5.1f} s): "
            + "  ".join(f"{c.name} {c.trajectory[-1]:.2f}" for c in candidates),
            flush=True,
        )

    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        fresh = _fresh_copy(conn, columns, candidates[0].name)
        print(f"\nfresh load of the same {per_week * args.weeks:,} rows: {fresh}")
        ratios = {}
        for c in candidates:
            s = sizes(conn, c.name)
            # The worst day counts: the size swings by a run's worth as VACUUM truncates the tail.
            ratios[c.name] = max(c.trajectory) * first[c.name].total / fresh.total
            print(
                f"{c.name:13s} {s}  x{s.total / fresh.total:.2f} (heap x{s.heap / fresh.heap:.2f}, "
                f"indexes x{s.indexes / fresh.indexes:.2f}); max over the days x"
                f"{max(c.trajectory) * first[c.name].total / fresh.total:.2f}; loading {c.load_s:.0f} s, "
                f"{c.vacuums} vacuum(s) {c.vacuum_s:.1f} s"
            )
    print(" ".join(f"ratio_{n}={r:.2f}" for n, r in ratios.items()))


def _fresh_copy(conn: psycopg.Connection, columns: list[ColumnMapping], source: str) -> Sizes:
    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(SCHEMA, "fresh")))
    with conn.transaction():
        ensure_raw_table(conn, SCHEMA, "fresh", columns, "date")
        conn.execute(
            sql.SQL("insert into {} select * from {} order by date").format(
                sql.Identifier(SCHEMA, "fresh"), sql.Identifier(SCHEMA, source)
            )
        )
    return sizes(conn, "fresh")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the raw table")
    p.add_argument("--weeks", type=int, default=52, help="weekly slices the rows span")
    p.add_argument("--days", type=int, default=30, help="simulated daily runs")
    p.add_argument("--candidates", default="autovacuum,vacuum_run", help=",".join(CANDIDATES))
    args = p.parse_args()
    unknown = set(args.candidates.split(",")) - set(CANDIDATES)
    if unknown:
        p.error(f"unknown candidate(s) {sorted(unknown)}; choose from {','.join(CANDIDATES)}")
    state = Path(tempfile.mkdtemp(prefix="bench-bloat-"))
    try:
        with local_services(state, with_emulator=False) as env:
            os.environ.update(env)
            settings = get_settings(**_settings_overrides(env))
            migrate(settings)
            started = time.perf_counter()
            run(settings, args)
            print(f"(took {time.perf_counter() - started:.0f} s)")
    finally:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
