"""How long does exact validation take next to a bare `select count(*)`, and what does it ship?

N identical SQP rows (flows.demo.sample_data) are generated in a throwaway BigQuery emulator and
loaded into a throwaway embedded Postgres by the real refresh (flows.refresh.refresh_table).
Then, best of --repeats each:

  count     `select count(*)` of the table in BigQuery and in Postgres (reads no values)
  read      Postgres `sum(length(t::text))`: every value of every row formatted once
  validate  flows.validation.validate_table: per-day row count + checksum of every column in
            each engine, summed into weekly periods, compared (no period differs here)

and the rows each side sent back: the per-day aggregates, and the table rows fetched (0 when
the two sides agree; only a differing period is bisected and fetched).

    .venv/bin/python bench/validate.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable

from flows.demo.local_stack import free_port


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    state = tempfile.mkdtemp(prefix="bench-validate-")
    try:
        run(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)  # the 5M-row run leaves ~3 GB otherwise


def run(state: str) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--weeks", type=int, default=26)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    for var in [v for v in os.environ if v.startswith("REFRESH_") and v != "REFRESH_PG_DSN"]:
        del os.environ[var]
    os.environ.update(
        {
            "REFRESH_STATE_DIR": state,
            "REFRESH_LOCAL_PG_PORT": str(free_port()),
            "REFRESH_LOCAL_BQ_REST_PORT": str(free_port()),
            "REFRESH_LOCAL_BQ_GRPC_PORT": str(free_port()),
            "REFRESH_BQ_DATASET": "bench_validate",
            "REFRESH_RAW_SCHEMA": "bench_validate_raw",
            "REFRESH_CONTROL_SCHEMA": "bench_validate_control",
        }
    )
    import psycopg

    from flows import validation
    from flows.bigquery import make_clients
    from flows.control import registry, runs
    from flows.db import migrate
    from flows.demo.local_stack import local_stack
    from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
    from flows.refresh import RefreshOptions, refresh_table
    from flows.registry import TableConfig
    from flows.settings import get_settings

    settings = get_settings()
    with local_stack(settings, throwaway=True):
        migrate(settings)
        clients = make_clients(settings)
        t0 = time.perf_counter()
        generate(clients, SampleSpec(sqp_rows=args.rows, weeks=args.weeks, asins=200, daily_rows=0))
        generated = time.perf_counter() - t0
        cfg = TableConfig(
            table_name=SQP_TABLE,
            source_table=SQP_TABLE,
            cursor_column="Date",
            slice_size="week",
            custom_params={"key_columns": ["Date", "ASIN", "Search Query"]},
        )
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            registry.sync_from_file(conn, settings.control_schema, [cfg])
        with runs.refresh_lock(settings, wait_s=30) as lock:
            run = runs.start_run(lock, settings.control_schema, flow_run_id=None, trigger="bench", params={})
            t0 = time.perf_counter()
            outcome = refresh_table(settings, clients, cfg, run.run_id, RefreshOptions(full_refresh=True))
            loaded = time.perf_counter() - t0
        assert outcome.status == "success", outcome.error
        raw = settings.raw_schema
        path = f"`{clients.project}.{clients.dataset}.{SQP_TABLE}`"
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            conn.execute(f"vacuum analyze {raw}.{SQP_TABLE}")
            pg_count = best(
                lambda: conn.execute(f"select count(*) from {raw}.{SQP_TABLE}").fetchone(), args.repeats
            )
            # What reading every value costs: each row formatted as text once, no hashing.
            pg_read = best(
                lambda: conn.execute(f"select sum(length(t::text)) from {raw}.{SQP_TABLE} t").fetchone(),
                args.repeats,
            )
            bq_count = best(
                lambda: list(clients.rest.query(f"select count(*) from {path}").result()), args.repeats
            )
            results: list[validation.PeriodResult] = []

            def run_validation() -> None:
                results[:] = validation.validate_table(clients, conn, cfg, raw)

            validate_s = best(run_validation, args.repeats)
            cols = validation.columns_of(
                validation.describe(clients, SQP_TABLE), clients.settings.uses_emulator
            )
            cursor = cols[0]
            pg_fp = best(lambda: validation.fingerprint_pg(conn, raw, SQP_TABLE, cols, cursor, None), 1)
            bq_fp = best(lambda: validation.fingerprint_bq(clients, SQP_TABLE, cols, cursor, None), 1)
            days = len(validation.fingerprint_pg(conn, raw, SQP_TABLE, cols, cursor, None))
        clients.close()

    failed = [r for r in results if not r.passed]
    fetched = sum(
        len(r.differences.missing_in_postgres)
        + len(r.differences.extra_in_postgres)
        + len(r.differences.different)
        for r in results
        if r.differences
    )
    count_s = pg_count + bq_count
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"rows={args.rows} weeks={args.weeks} generated in {generated:.1f}s, loaded in {loaded:.1f}s")
    print(f"count(*): postgres {pg_count:.2f}s + bigquery {bq_count:.2f}s = {count_s:.2f}s")
    print(f"postgres, every row as text once (sum(length(t::text))): {pg_read:.2f}s")
    print(f"checksums alone: postgres {pg_fp:.2f}s, bigquery {bq_fp:.2f}s")
    print(f"validate (both sides, {len(results)} periods, {len(failed)} differ): {validate_s:.2f}s")
    print(f"aggregate rows sent back per side: {days} (one per day); table rows fetched: {fetched}")
    print(f"ratio_validate_vs_count={validate_s / count_s:.1f} rows_shipped={fetched}")


if __name__ == "__main__":
    main()
