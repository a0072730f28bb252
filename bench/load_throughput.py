"""How fast does our loader put Arrow rows into Postgres, and how much memory does extraction take?

The same N SQP-shaped Arrow rows (deterministic, built in memory) are loaded into identical
raw tables four ways, each timed on its own:

  ours     flows.engine.load.apply_slice: one transaction, COPY (FORMAT csv) encoded from the batches
  copy     raw `COPY ... FROM STDIN (FORMAT csv)` of bytes encoded before the clock starts:
           the limit for CSV COPY of these rows
  dlt      dlt's postgres destination with default settings: pipeline.run(arrow_table)
  pandas   DataFrame.to_sql (SQLAlchemy + psycopg, default method and chunksize), on at most
           --pandas-rows rows (the Arrow -> pandas conversion is not timed)

`ours` and `copy` run --repeats times, alternating, best time kept. Then a 2M-row SQP table is
generated in the BigQuery emulator (flows.demo.sample_data) and a child process extracts it as ONE
slice through flows.engine.extract.read_slice + flows.engine.load.apply_slice. Its peak RSS is the kernel's
high-water mark of the child's own memory (VmHWM, read by the child as it ends), cross-checked
by psutil sampling from here. Not wait4()/RUSAGE_CHILDREN: Linux charges a child spawned by
vfork+exec with the parent's RSS at exec time, here the >1 GB of benchmark data. The last
line is exactly `ratio_vs_copy=X ratio_vs_dlt=Y peak_rss_mb=Z`.

Postgres: REFRESH_PG_DSN if set, else an embedded Postgres started here on a free port in a
temp dir; the emulator is started here too (throwaway, free ports). Nothing else is touched.

    .venv/bin/python bench/load_throughput.py [--rows 1000000] [--extract-rows 2000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql

from flows.core.db import migrate
from flows.core.planning import Slice
from flows.core.settings import Settings, get_settings
from flows.core.type_mapping import ColumnMapping, map_schema
from flows.demo.local_stack import free_port
from flows.demo.sample_data import SQP_TABLE, sqp_schema
from flows.engine.load import apply_slice, ensure_raw_table

SCHEMA = "bench_load"
CONTROL = "bench_control"
BATCH_ROWS = 65_536  # what the emulator's Storage Read sends per message
# The emulator caps a gRPC message at ~11 MB, less than one 65,536-row SQP batch (~28 MB); real
# BigQuery sizes its messages itself. Raised for the emulator this script starts.
EMULATOR_MESSAGE_CAP = str(96 * 1024 * 1024)

_ARROW_TYPES = {
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "NUMERIC": pa.decimal128(38, 9),
}


# --------------------------------------------------------------------------------------
# Data: SQP-shaped Arrow rows, a pure function of (rows, seed), no per-row Python objects
# --------------------------------------------------------------------------------------


def _decimal(units: np.ndarray, per_unit: int, valid: np.ndarray | None = None) -> pa.Array:
    """decimal128(38, 9) holding units / per_unit, built from the 128-bit words directly."""
    unscaled = units.astype(np.int64) * (10**9 // per_unit)
    words = np.zeros((len(units), 2), dtype=np.int64)
    words[:, 0] = unscaled
    words[:, 1] = np.where(unscaled < 0, -1, 0)
    bitmap, nulls = None, 0
    if valid is not None:
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
        nulls = int((~valid).sum())
    return pa.Array.from_buffers(
        pa.decimal128(38, 9), len(units), [bitmap, pa.py_buffer(words.tobytes())], nulls
    )


def _labels(prefix: str, n: int) -> pa.Array:
    return pa.array([f"{prefix}{i:08d}" for i in range(n)], pa.string())


def sqp_arrow(rows: int, seed: int = 20261128) -> pa.Table:
    """SQP rows with consistent funnels (each stage capped by the one above), shares in [0, 1],
    unicode queries and NULL parents / prices, as the real export has."""
    rng = np.random.default_rng(seed)
    week = rng.integers(0, 52, rows)
    dates = np.datetime64("2025-11-30T00:00:00", "us") + (week * 7).astype("timedelta64[D]")
    ai = rng.integers(0, 2_000, rows)
    qi = rng.integers(0, 50_000, rows)
    words = ["running shoes", "跑步鞋", "laufschuhe größe 42", "café en grano", "yoga mat", "🏃 trail"]
    queries = pa.array([f"{words[i % len(words)]} {i}" for i in range(50_000)], pa.string())
    asins = _labels("B0", 2_000)
    volume = 1_000 + rng.integers(0, 50_000, rows)
    total_imp = volume * (2 + rng.integers(0, 5, rows))
    asin_imp = total_imp * rng.integers(0, 300, rows) // 1_000
    cols: dict[str, pa.Array] = {
        "Date": pa.array(dates, pa.timestamp("us", tz="UTC")),
        "Parent ASIN": pc.if_else(
            pa.array(rng.integers(0, 50, rows) == 0),
            pa.scalar(None, pa.string()),
            _labels("P0", 500).take(pa.array(ai // 4)),
        ),
        "Child ASIN": asins.take(pa.array(ai)),
        "ASIN": asins.take(pa.array(ai)),
        "Search Query": queries.take(pa.array(qi)),
        "Search Query Score": pa.array(1 + rng.integers(0, 100, rows)),
        "Search Query Volume": pa.array(volume),
        "Total Query Impression Count": pa.array(total_imp),
        "ASIN Impression Count": pa.array(asin_imp),
        "ASIN Impression Share": _decimal(asin_imp * 10_000 // np.maximum(total_imp, 1), 10_000),
    }
    above_total, above_asin = total_imp, asin_imp
    for x in ("Click", "Cart Add", "Purchase"):
        total = above_total * rng.integers(10, 110, rows) // 1_000
        asin = np.minimum(total * rng.integers(0, 400, rows) // 1_000, above_asin)
        cols[f"Total {x} Count"] = pa.array(total)
        cols[f"Total {x} Rate"] = _decimal(total * 10_000 // np.maximum(above_total, 1), 10_000)
        cols[f"ASIN {x} Count"] = pa.array(asin)
        cols[f"ASIN {x} Share"] = _decimal(asin * 10_000 // np.maximum(total, 1), 10_000)
        for who in ("Total", "ASIN"):
            price_cents = 299 + rng.integers(0, 9_000, rows)
            cols[f"{who} Median {x} Price Amount"] = _decimal(
                price_cents, 100, rng.integers(0, 23, rows) != 0
            )
        for speed in ("Same", "One", "Two"):
            cols[f"Total {speed} Day Shipping {x} Count"] = pa.array(total * rng.integers(0, 30, rows) // 100)
        above_total, above_asin = total, asin
    fields = sqp_schema()
    schema = pa.schema([pa.field(f.name, _ARROW_TYPES[f.field_type]) for f in fields])
    return pa.table([cols[f.name] for f in fields], schema=schema)


def sqp_columns() -> list[ColumnMapping]:
    return map_schema([(f.name, f.field_type, f.mode, f.precision, f.scale) for f in sqp_schema()], SQP_TABLE)


# --------------------------------------------------------------------------------------
# The local stack for the run
# --------------------------------------------------------------------------------------


@contextmanager
def local_services(state: Path, with_emulator: bool) -> Iterator[dict[str, str]]:
    """REFRESH_* variables pointing at this run's Postgres and emulator (started here)."""
    from flows.demo.local_stack import BigQueryEmulator, EmbeddedPostgres

    env = {"REFRESH_STATE_DIR": str(state), "REFRESH_CONTROL_SCHEMA": CONTROL}
    with ExitStack() as stack:
        if os.environ.get("REFRESH_PG_DSN"):
            env["REFRESH_PG_DSN"] = os.environ["REFRESH_PG_DSN"]
        else:
            pg = EmbeddedPostgres(state / "pg", free_port())
            pg.start()
            stack.callback(pg.stop)
            env["REFRESH_PG_DSN"] = pg.dsn
        if with_emulator:
            rest, grpc = free_port(), free_port()
            os.environ["BQEMU_WRITE_API_MAX_REQUEST_BYTES"] = EMULATOR_MESSAGE_CAP
            emu = BigQueryEmulator(rest, grpc, data_dir=None, log_file=state / "logs" / "bqemulator.log")
            emu.start()
            stack.callback(emu.stop)
            env |= {
                "REFRESH_BQ_ENDPOINT": f"http://127.0.0.1:{rest}",
                "REFRESH_BQ_STORAGE_ENDPOINT": f"127.0.0.1:{grpc}",
                "REFRESH_BQ_DATASET": "bench",
            }
        yield env


# --------------------------------------------------------------------------------------
# The four loaders
# --------------------------------------------------------------------------------------


def fresh_table(conn: psycopg.Connection, name: str, columns: list[ColumnMapping]) -> None:
    """An empty raw table exactly as the extractor creates it (lineage defaults, cursor index)."""
    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(SCHEMA, name)))
    with conn.transaction():
        ensure_raw_table(conn, SCHEMA, name, columns, "date")
    conn.execute("checkpoint")  # start each load from the same clean slate


@dataclass(frozen=True)
class Timing:
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float | None  # the Postgres backend's CPU, when it runs on this machine


def _backend_cpu_s(conn: psycopg.Connection) -> float | None:
    row = conn.execute("select pg_backend_pid()").fetchone()
    stat = Path(f"/proc/{row[0] if row else 0}/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def timed(conn: psycopg.Connection, fn: Callable[[], object]) -> Timing:
    """Wall time, and CPU time of this process and of the connection's backend, for fn()."""
    server0, client0, wall0 = _backend_cpu_s(conn), time.process_time(), time.perf_counter()
    fn()
    wall, client, server = time.perf_counter(), time.process_time(), _backend_cpu_s(conn)
    busy = None if server is None or server0 is None else server - server0
    return Timing(wall - wall0, client - client0, busy)


def timed_wall(fn: Callable[[], object]) -> Timing:
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - started, time.process_time() - cpu, None)


def load_ours(settings: Settings, columns: list[ColumnMapping], batches: list[pa.RecordBatch]) -> Timing:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        fresh_table(conn, "ours", columns)
        return timed(
            conn,
            lambda: apply_slice(
                conn,
                schema=SCHEMA,
                table="ours",
                control_schema=CONTROL,
                columns=columns,
                cursor=None,
                piece=Slice(None, None),
                batches=iter(batches),
                run_id=uuid4(),
                checkpoint_key="bench:ours",
            ),
        )


def encode_plain_csv(batches: list[pa.RecordBatch]) -> list[bytes]:
    opts = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    out = []
    for b in batches:
        sink = pa.BufferOutputStream()
        pacsv.write_csv(b, sink, opts)
        out.append(sink.getvalue().to_pybytes())
    return out


def load_raw_copy(settings: Settings, columns: list[ColumnMapping], encoded: list[bytes]) -> Timing:
    stmt = sql.SQL("copy {} ({}) from stdin (format csv)").format(
        sql.Identifier(SCHEMA, "copy"), sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
    )
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        fresh_table(conn, "copy", columns)

        def run() -> None:
            with conn.transaction(), conn.cursor() as cur, cur.copy(stmt) as copy:
                for chunk in encoded:
                    copy.write(chunk)

        return timed(conn, run)


def load_dlt(settings: Settings, table: pa.Table, workdir: Path) -> Timing:
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    import dlt

    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        conn.execute("drop schema if exists bench_dlt cascade")
        conn.execute("checkpoint")
    pipeline = dlt.pipeline(
        pipeline_name="bench_load_throughput",
        destination=dlt.destinations.postgres(credentials=_dlt_credentials(settings.dsn())),
        dataset_name="bench_dlt",
        pipelines_dir=str(workdir / "dlt"),
    )
    return timed_wall(lambda: pipeline.run(table, table_name="sqp"))


def _dlt_credentials(dsn: str) -> str:
    # dlt takes a URL with the password in it: the embedded server's is in its passfile
    # (host:port:database:user:password), which dlt's psycopg2 does not read from a URL.
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    c = conninfo_to_dict(dsn)
    secret = c.get("password")
    if not secret and c.get("passfile"):
        secret = Path(str(c["passfile"])).read_text().splitlines()[0].rsplit(":", 1)[1]
    password = quote(str(secret or "unused"), safe="")
    return f"postgresql://{c.get('user', 'postgres')}:{password}@{c['host']}:{c['port']}/{c['dbname']}"


def load_pandas(settings: Settings, table: pa.Table) -> Timing:
    from sqlalchemy import create_engine

    df = table.to_pandas()
    engine = create_engine(settings.dsn().replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            conn.execute("drop schema if exists bench_pandas cascade")
            conn.execute("create schema bench_pandas")
            conn.execute("checkpoint")
        return timed_wall(lambda: df.to_sql("sqp", engine, schema="bench_pandas", index=False))
    finally:
        engine.dispose()


def count(settings: Settings, schema: str, table: str) -> int:
    with psycopg.connect(settings.dsn()) as conn:
        row = conn.execute(
            sql.SQL("select count(*) from {}").format(sql.Identifier(schema, table))
        ).fetchone()
    return int(row[0]) if row else 0


# --------------------------------------------------------------------------------------
# Peak RSS of an extraction, measured in a child process
# --------------------------------------------------------------------------------------


def extract_child() -> None:
    """Runs in the child: the whole SQP table as ONE slice, read_slice -> apply_slice."""
    from flows.core.table_config import TableConfig
    from flows.engine.bigquery import make_clients
    from flows.engine.extract import ReadStats, describe, read_slice

    settings = get_settings()
    clients = make_clients(settings)
    cfg = TableConfig(table_name="extracted", source_table=SQP_TABLE, write_strategy="full_replace")
    source = describe(clients, SQP_TABLE)
    columns = map_schema([(c.name, c.field_type, c.mode, c.precision, c.scale) for c in source.columns], "x")
    stats = ReadStats()
    started = time.perf_counter()
    with psycopg.connect(settings.dsn()) as conn:
        with conn.transaction():
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(SCHEMA, "extracted")))
            ensure_raw_table(conn, SCHEMA, "extracted", columns, "date")
        result = apply_slice(
            conn,
            schema=SCHEMA,
            table="extracted",
            control_schema=CONTROL,
            columns=columns,
            cursor=None,
            piece=Slice(None, None),
            batches=read_slice(clients, cfg, "", stats),
            run_id=uuid4(),
            checkpoint_key="bench:extracted",
        )
    elapsed = time.perf_counter() - started
    clients.close()
    print(f"{result.rows_inserted} {elapsed:.3f} {_own_peak_rss_kib()}", flush=True)


def _own_peak_rss_kib() -> int:
    """This process's peak RSS since exec (Linux VmHWM; elsewhere getrusage's ru_maxrss)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_extraction(env: dict[str, str], rows: int) -> tuple[int, float, float, float]:
    """(rows loaded, seconds, peak RSS MB, max sampled RSS MB) of a child extracting `rows` rows."""
    import psutil

    from flows.demo.sample_data import SampleSpec, generate
    from flows.engine.bigquery import make_clients

    settings = get_settings(**_settings_overrides(env))
    clients = make_clients(settings)
    try:
        generate(clients, SampleSpec(sqp_rows=rows, weeks=52, asins=500, daily_rows=0), force=True)
    finally:
        clients.close()
    child = subprocess.Popen(
        [sys.executable, __file__, "--extract-child"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    sampled = 0
    watched = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            sampled = max(sampled, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    out = child.stdout.read() if child.stdout else ""
    if child.wait() != 0:
        raise SystemExit(f"the extraction child failed with exit code {child.returncode}")
    loaded, seconds, peak_kib = out.split()
    return int(loaded), float(seconds), int(peak_kib) / 1024, sampled / 1024**2


def _settings_overrides(env: dict[str, str]) -> dict[str, object]:
    prefix = "REFRESH_"
    return {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="Arrow rows for the load comparison")
    p.add_argument("--pandas-rows", type=int, default=200_000, help="rows for pandas to_sql (slow)")
    p.add_argument("--extract-rows", type=int, default=2_000_000, help="SQP rows for the RSS measurement")
    p.add_argument("--repeats", type=int, default=5, help="runs of ours and raw COPY (best kept)")
    p.add_argument("--extract-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.extract_child:
        extract_child()
        return

    state = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        with local_services(state, with_emulator=True) as env:
            os.environ.update(env)
            settings = get_settings(**_settings_overrides(env))
            migrate(settings)
            with psycopg.connect(settings.dsn(), autocommit=True) as conn:
                conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(SCHEMA)))
                server = conn.execute("show server_version").fetchone()
            print(
                f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
                f"pyarrow {pa.__version__}, psycopg {psycopg.__version__}, "
                f"Postgres {server[0] if server else '?'}"
            )
            run(settings, args, state, env)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _describe(runs: list[Timing]) -> str:
    walls = sorted(t.wall_s for t in runs)
    best = min(runs, key=lambda t: t.wall_s)
    cpu = f"client {best.client_cpu_s:.1f} s"
    if best.server_cpu_s is not None:
        cpu += f" + server {best.server_cpu_s:.1f} s"
    return (
        f"best {walls[0]:.2f} s, median {walls[len(walls) // 2]:.2f} s of {len(runs)}; CPU of the best: {cpu}"
    )


def run(settings: Settings, args: argparse.Namespace, state: Path, env: dict[str, str]) -> None:
    n = args.rows
    started = time.perf_counter()
    table = sqp_arrow(n)
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    columns = sqp_columns()
    encoded = encode_plain_csv(batches)
    print(
        f"data: {n:,} SQP rows x {table.num_columns} columns, {table.nbytes / 1e6:.0f} MB as Arrow, "
        f"{sum(map(len, encoded)) / 1e6:.0f} MB as CSV, {len(batches)} batches "
        f"(built in {time.perf_counter() - started:.1f} s)"
    )

    ours_t: list[Timing] = []
    copy_t: list[Timing] = []
    for i in range(args.repeats):  # alternate which goes first
        if i % 2:
            ours_t.append(load_ours(settings, columns, batches))
        copy_t.append(load_raw_copy(settings, columns, encoded))
        if not i % 2:
            ours_t.append(load_ours(settings, columns, batches))
    assert count(settings, SCHEMA, "ours") == n and count(settings, SCHEMA, "copy") == n
    ours, limit = min(t.wall_s for t in ours_t), min(t.wall_s for t in copy_t)
    print(f"ours    {n / ours:>11,.0f} rows/s  {_describe(ours_t)}")
    print(f"copy    {n / limit:>11,.0f} rows/s  {_describe(copy_t)} (pre-encoded CSV)")
    del encoded

    dlt_s = load_dlt(settings, table, state).wall_s
    assert count(settings, "bench_dlt", "sqp") == n
    print(f"dlt     {n / dlt_s:>11,.0f} rows/s  {dlt_s:.2f} s (default settings)")

    pn = min(args.pandas_rows, n)
    pandas_s = load_pandas(settings, table.slice(0, pn)).wall_s
    assert count(settings, "bench_pandas", "sqp") == pn
    note = "" if pn == n else f" on {pn:,} of the {n:,} rows"
    print(f"pandas  {pn / pandas_s:>11,.0f} rows/s  {pandas_s:.2f} s (to_sql defaults{note})")
    del table, batches

    ratio_copy = (n / ours) / (n / limit)
    ratio_dlt = (n / ours) / (n / dlt_s)
    ratio_pandas = (n / ours) / (pn / pandas_s)
    print(f"ours / copy = {ratio_copy:.2f} (target >= 0.8)   ours / dlt = {ratio_dlt:.1f}x (target >= 5)")
    print(f"ours / pandas = {ratio_pandas:.1f}x")

    rows, seconds, rss, sampled = measure_extraction(env, args.extract_rows)
    assert rows == args.extract_rows, rows
    print(
        f"extract {rows:,} SQP rows from the emulator as one slice: {seconds:.1f} s "
        f"({rows / seconds:,.0f} rows/s); peak RSS of the extracting process {rss:.0f} MB "
        f"(VmHWM; sampled max {sampled:.0f} MB; target < 500)"
    )
    print(f"ratio_vs_copy={ratio_copy:.2f} ratio_vs_dlt={ratio_dlt:.1f} peak_rss_mb={rss:.0f}")


if __name__ == "__main__":
    main()
