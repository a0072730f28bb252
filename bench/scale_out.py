"""Scale-out: what each stage of the daily refresh costs, and extraction on 1 and 2 Dask workers.

N SQP rows (flows.demo.sample_data) are generated in a throwaway BigQuery emulator; a throwaway
embedded Postgres receives them. Then, on this machine:

  stages     the SQP table's slices once more, each stage timed on its own in this process:
             read    flows.engine.extract.read_slice, batches discarded (BigQuery -> Arrow)
             encode  flows.engine.load.encode_csv of those batches, in COPY-sized chunks (Arrow -> CSV)
             copy    `COPY ... FROM STDIN (FORMAT csv)` of the encoded bytes into a raw table
             (client side negligible: Postgres parsing and inserting)
  extract    flows.engine.table_refresh.refresh_table of the SQP table (full refresh): in this process
             (workers=0, the default) and on a Dask LocalCluster of 1 and 2 worker
             processes (flows.engine.scale_out; the cluster's start-up, workers importing the
             loader included, timed apart)
  dbt        `dbt build` of everything downstream (full refresh), as the flow runs it;
             outside a flow this wall time includes starting Prefect's ephemeral API

Printed as `stage=... seconds=... rows_per_s=...` lines, then a model of extraction at 1, 4
and 16 workers from the measured per-row costs (docs/scaling.md explains it):

    per worker:   read + encode (the worker's CPU; the COPY waits on Postgres)
    Postgres:     copy, divided among at most --pg-cores backends
    time(W)     = max(rows * (read + encode) / W, rows * copy / min(W, pg_cores))

On this 2-core machine the emulator, Postgres and the workers share the cores, so the 2-worker
figure is a floor for a cluster, not a forecast of it.

    .venv/bin/python bench/scale_out.py [--rows 200000] [--weeks 26] [--workers 1 2] [--pg-cores 8]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import tempfile
import time

from bench_stack import refresh as refresh_table_locked  # a sibling script: bench/ is on sys.path
from bench_stack import register, throwaway_env


def main() -> None:
    state = tempfile.mkdtemp(prefix="bench-scale-out-")
    try:
        run(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def line(stage: str, seconds: float, rows: int, **extra: object) -> None:
    more = "".join(f" {k}={v}" for k, v in extra.items())
    print(f"stage={stage} seconds={seconds:.2f} rows_per_s={rows / seconds:,.0f}{more}", flush=True)


def run(state: str) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--weeks", type=int, default=26)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pg-cores", type=int, default=8, help="Postgres cores assumed by the model")
    args = ap.parse_args()

    throwaway_env(
        state,
        "bench_scale",
        PREFECT_LOGGING_LEVEL="WARNING",
        # dbt runs through prefect-dbt, which starts Prefect's ephemeral API: slow on a busy box.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    import psycopg
    from psycopg import sql

    from flows.core import table_config
    from flows.core.db import migrate
    from flows.core.planning import slices_between
    from flows.core.settings import get_settings
    from flows.core.type_mapping import map_schema
    from flows.demo.local_stack import local_stack
    from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
    from flows.engine import scale_out
    from flows.engine.bigquery import make_clients
    from flows.engine.extract import ReadStats, describe, read_slice, row_restriction
    from flows.engine.load import CHUNK_ROWS, encode_csv, ensure_raw_table
    from flows.engine.table_refresh import TableOutcome
    from flows.engine.transform import run_dbt
    from flows.orchestration import dbt_selection

    settings = get_settings()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    with local_stack(settings, throwaway=True):
        migrate(settings)
        clients = make_clients(settings)
        spec = SampleSpec(sqp_rows=args.rows, weeks=args.weeks, asins=200, daily_rows=args.rows // 10)
        generate(clients, spec)
        configs = {c.table_name: c for c in table_config.load_file(settings.tables_file)}
        sqp = configs[SQP_TABLE]
        register(settings, list(configs.values()))

        def refresh(table: str) -> TableOutcome:
            return refresh_table_locked(settings, clients, configs[table])

        outcomes = {t: refresh(t) for t in configs}  # the other tables too: dbt reads them
        slices = outcomes[SQP_TABLE].slices_done
        print(f"rows={args.rows} slices={slices} (SQP, weekly)")

        # --- stages, one at a time, in this process --------------------------------------
        source = describe(clients, SQP_TABLE)
        cursor = source.column(sqp.cursor_column or "")
        window = outcomes[SQP_TABLE].window
        assert window is not None
        pieces = slices_between(window.first, window.last, sqp.slice_size)
        batches = []
        t0 = time.perf_counter()
        for piece in pieces:
            batches.extend(read_slice(clients, sqp, row_restriction(cursor, piece), ReadStats()))
        read_s = time.perf_counter() - t0
        rows = sum(b.num_rows for b in batches)
        assert rows == args.rows, rows
        t0 = time.perf_counter()
        chunks = [
            encode_csv(b.slice(o, CHUNK_ROWS)) for b in batches for o in range(0, b.num_rows, CHUNK_ROWS)
        ]
        encode_s = time.perf_counter() - t0
        columns = map_schema(
            [(c.name, c.field_type, c.mode, c.precision, c.scale) for c in source.columns], "x"
        )
        with psycopg.connect(settings.dsn()) as conn:
            with conn.transaction():
                ensure_raw_table(conn, "bench_scale_copy", SQP_TABLE, columns, None)
            t0 = time.perf_counter()
            with conn.transaction():
                conn.execute("set local TimeZone = 'UTC'")
                stmt = sql.SQL("copy {} ({}) from stdin (format csv)").format(
                    sql.Identifier("bench_scale_copy", SQP_TABLE),
                    sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
                )
                with conn.cursor() as cur, cur.copy(stmt) as copy:
                    for chunk in chunks:
                        copy.write(chunk)
            copy_s = time.perf_counter() - t0
        del batches, chunks
        line("read", read_s, rows)
        line("encode", encode_s, rows)
        line("copy", copy_s, rows)

        # --- extraction, in process and on 1..N Dask workers -------------------------------
        measured = {}
        t0 = time.perf_counter()
        refresh(SQP_TABLE)
        measured[0] = time.perf_counter() - t0
        line("extract", measured[0], rows, workers=0)
        for w in args.workers:
            on = settings.model_copy(update={"slice_workers": w})
            t0 = time.perf_counter()
            with scale_out.slice_runner(on) as runner:
                # The workers import the loader's modules once, before the clock: part of the
                # cluster's start-up, paid once per run, not per slice.
                runner.client.run(importlib.import_module, "flows.engine.table_refresh")
                started = time.perf_counter() - t0
                t0 = time.perf_counter()
                refresh(SQP_TABLE)
                measured[w] = time.perf_counter() - t0
            line("extract", measured[w], rows, workers=w, cluster_start_s=f"{started:.1f}")

        # --- dbt, as the flow runs it (full refresh of everything downstream) -----------------
        build = dbt_selection.dbt_build_args(
            list(outcomes.values()), True, dbt_selection.dbt_sources(settings.dbt_project_dir)
        )
        assert build is not None
        t0 = time.perf_counter()
        dbt = run_dbt(settings, build)
        dbt_s = time.perf_counter() - t0
        assert dbt.success, dbt.message
        line("dbt", dbt_s, rows, models=dbt.models_built)
        clients.close()

    # --- the model ---------------------------------------------------------------------
    per_row_worker = (read_s + encode_s) / rows
    per_row_pg = copy_s / rows
    print(
        f"model: per row read+encode {per_row_worker * 1e6:.1f} us (a worker), "
        f"copy {per_row_pg * 1e6:.1f} us (Postgres)"
    )
    for w in (1, 4, 16):
        worker_s = rows * per_row_worker / w
        pg_s = rows * per_row_pg / min(w, args.pg_cores)
        bound = "workers (read+encode)" if worker_s >= pg_s else "Postgres COPY"
        total = max(worker_s, pg_s)
        print(
            f"model workers={w} extract_s={total:.2f} dbt_s={dbt_s:.2f} bound_by={bound} "
            f"extract_share={total / (total + dbt_s):.0%}"
        )


if __name__ == "__main__":
    main()
