"""A raw table whose lookback window is replaced every day stays compact (flows.engine.maintenance),
and readers see a slice's old rows or its new rows, never part of either."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import date, timedelta
from uuid import uuid4

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from flows.core.db import migrate
from flows.core.planning import Slice, slices_between
from flows.core.settings import Settings
from flows.core.table_config import Mode, SliceSize
from flows.core.type_mapping import ColumnMapping, map_schema
from flows.engine import maintenance
from flows.engine.load import apply_slice, ensure_raw_table

pytestmark = pytest.mark.integration

TABLE = "bloat_probe"
WEEKS = slices_between(date(2026, 1, 5), date(2026, 6, 21), SliceSize.WEEK)
assert len(WEEKS) == 24
LOOKBACK = WEEKS[-4:]  # 4 of 24 weeks replaced a day: 1.17x once vacuumed after each run
ROWS_PER_WEEK = 2_000
BOUND = 1.3


def _columns() -> list[ColumnMapping]:
    fields = [("day", "DATE", "NULLABLE"), ("k", "INT64", "NULLABLE"), ("payload", "STRING", "NULLABLE")]
    return map_schema([(n, t, m, None, None) for n, t, m in fields], TABLE)


def _batches(piece: Slice, rows: int, generation: int, per_batch: int = 1_000) -> list[pa.RecordBatch]:
    assert piece.start is not None
    days = [piece.start + timedelta(days=i % 7) for i in range(rows)]
    payload = [f"gen{generation} " + "x" * 300 for _ in range(rows)]
    t = pa.table({"day": pa.array(days, pa.date32()), "k": pa.array(range(rows)), "payload": payload})
    return t.to_batches(max_chunksize=per_batch)


def _replace(settings: Settings, table: str, piece: Slice, batches: Iterator[pa.RecordBatch]) -> None:
    cursor = next(c for c in _columns() if c.name == "day")
    with psycopg.connect(settings.dsn()) as conn:
        apply_slice(
            conn,
            schema=settings.raw_schema,
            table=table,
            control_schema=settings.control_schema,
            columns=_columns(),
            cursor=cursor,
            piece=piece,
            batches=batches,
            run_id=uuid4(),
            checkpoint_key=f"test:{table}",
        )


def _size(conn: psycopg.Connection, schema: str, table: str) -> int:
    row = conn.execute(
        "select pg_total_relation_size(%s::regclass), pg_relation_size(%s::regclass), "
        "pg_indexes_size(%s::regclass)",
        (f"{schema}.{table}",) * 3,
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def probe(settings: Settings) -> Iterator[str]:
    """A raw table loaded with 24 weeks, autovacuum off: only the product's own vacuum counts."""
    migrate(settings)
    schema = settings.raw_schema
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for t in (TABLE, f"{TABLE}_fresh"):
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, t)))
        with conn.transaction():
            ensure_raw_table(conn, schema, TABLE, _columns(), "day")
        conn.execute(
            sql.SQL("alter table {} set (autovacuum_enabled = false)").format(sql.Identifier(schema, TABLE))
        )
    for piece in WEEKS:
        _replace(settings, TABLE, piece, iter(_batches(piece, ROWS_PER_WEEK, 0)))
    yield TABLE
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for t in (TABLE, f"{TABLE}_fresh"):
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, t)))


def _daily_runs(settings: Settings, days: int, vacuum: bool) -> None:
    for day in range(1, days + 1):
        for piece in LOOKBACK:
            _replace(settings, TABLE, piece, iter(_batches(piece, ROWS_PER_WEEK, day)))
        if vacuum:
            maintenance.vacuum_after_run(settings, [(TABLE, Mode.LIVE.value, len(LOOKBACK) * ROWS_PER_WEEK)])


def _fresh_size(settings: Settings, conn: psycopg.Connection) -> int:
    schema = settings.raw_schema
    with conn.transaction():
        ensure_raw_table(conn, schema, f"{TABLE}_fresh", _columns(), "day")
        conn.execute(
            sql.SQL("insert into {} select * from {} order by day").format(
                sql.Identifier(schema, f"{TABLE}_fresh"), sql.Identifier(schema, TABLE)
            )
        )
    return _size(conn, schema, f"{TABLE}_fresh")


def test_ten_daily_runs_stay_within_bound_of_a_fresh_load(settings: Settings, probe: str) -> None:
    _daily_runs(settings, days=10, vacuum=True)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("select count(*) from {}").format(sql.Identifier(settings.raw_schema, TABLE))
        )
        assert rows.fetchone() == (len(WEEKS) * ROWS_PER_WEEK,)
        size, fresh = _size(conn, settings.raw_schema, TABLE), _fresh_size(settings, conn)
    assert size <= BOUND * fresh, f"{size / fresh:.2f}x a fresh load of the same rows"


def test_housekeeping_vacuums_a_raw_table_left_with_dead_rows(settings: Settings, probe: str) -> None:
    _daily_runs(settings, days=2, vacuum=False)  # 16,000 dead rows: over DEAD_ROWS_MIN
    # Statistics reach the shared counters when the loading backends report them.
    until = time.monotonic() + 15
    took: dict[str, float] = {}
    while not took and time.monotonic() < until:
        took = maintenance.vacuum_bloated_raw_tables(settings)
        time.sleep(0.2)
    assert f"{settings.raw_schema}.{TABLE}" in took
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        dead = conn.execute(
            "select n_dead_tup from pg_stat_user_tables where schemaname = %s and relname = %s",
            (settings.raw_schema, TABLE),
        ).fetchone()
    assert dead == (0,)


def test_reader_sees_old_or_new_slice_never_part(settings: Settings, probe: str) -> None:
    """A reader in another connection, polling while a slice is replaced (and vacuumed after),
    sees the slice's 400 old rows or its 600 new rows, nothing in between."""
    piece = LOOKBACK[-1]
    assert piece.start is not None and piece.end is not None
    copying = threading.Event()
    done = threading.Event()
    seen: list[tuple[int, int, bool]] = []

    def slow_batches() -> Iterator[pa.RecordBatch]:
        for i, b in enumerate(_batches(piece, 600, 1, per_batch=100)):
            if i:  # after the first batch the slice's rows are deleted and COPY is under way
                copying.set()
                time.sleep(0.15)
            yield b

    def reader() -> None:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            while not done.is_set():
                row = conn.execute(
                    sql.SQL(
                        "select count(*), count(distinct left(payload, 4)) from {} where day >= %s and day < %s"
                    ).format(sql.Identifier(settings.raw_schema, TABLE)),
                    (piece.start, piece.end),
                ).fetchone()
                assert row is not None
                seen.append((int(row[0]), int(row[1]), copying.is_set()))

    t = threading.Thread(target=reader)
    t.start()
    try:
        _replace(settings, TABLE, piece, slow_batches())
        maintenance.vacuum_after_run(settings, [(TABLE, Mode.LIVE.value, ROWS_PER_WEEK)])
        time.sleep(0.2)
    finally:
        done.set()
        t.join()
    assert {(n, gens) for n, gens, _ in seen} <= {(ROWS_PER_WEEK, 1), (600, 1)}, seen
    assert any(n == ROWS_PER_WEEK and during for n, _, during in seen), "no read overlapped the COPY"
    assert seen[-1][:2] == (600, 1)
