"""How long does exact validation take next to a bare `select count(*)`, and what does it ship?

N identical SQP rows (flows.demo.sample_data) are generated in a throwaway BigQuery emulator and
loaded into a throwaway embedded Postgres by the real refresh (flows.engine.table_refresh.refresh_table,
change detection on, so each slice's load stores Postgres' fingerprint of it). Then, best of
--repeats each, wall time and CPU seconds (Postgres: the backend plus its parallel workers;
BigQuery: the emulator process):

  count     `select count(*)` of the table in BigQuery and in Postgres (reads no values)
  read      Postgres `sum(length(t::text))`: every value of every row formatted once
  checksum  flows.engine.fingerprinting.fingerprint_pg / fingerprint_bq alone: per-day row count and
            checksum of every column, in each engine
  validate  flows.engine.validation.source_match.validate_table (`refresh validate-data`): both
            checksums at once, summed into weekly periods, compared (no period differs here)
  after     flows.engine.validation.after_refresh.validate_touched, the step after a live
            refresh: BigQuery's checksum, and Postgres' proof that each loaded week is untouched
            since its load (tuple headers only), reusing the load's fingerprint
  after+plan  the same step after a daily run (lookback over every week, every week restated
            in the source, so change detection fingerprints each week and the run reloads
            them all): BigQuery's side is change detection's fingerprint of the run's plan,
            reused (TableOutcome.plan_fingerprints), so BigQuery is not queried at all

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
from dataclasses import dataclass
from pathlib import Path

from bench_stack import refresh, register, throwaway_env  # a sibling script: bench/ is on sys.path

HZ = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int, children: bool = False) -> int:
    """CPU ticks of a process (with `children`: of its reaped children, e.g. parallel workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14]) if children else int(fields[11]) + int(fields[12])


@dataclass
class Meter:
    """CPU seconds of the Postgres backend + its workers and of the emulator, when local."""

    backend: int | None
    postmaster: int | None
    emulator: int | None

    def read(self) -> tuple[float, float]:
        pg = bq = 0.0
        try:
            if self.backend and self.postmaster:
                pg = (_ticks(self.backend) + _ticks(self.postmaster, children=True)) / HZ
            if self.emulator:
                bq = (_ticks(self.emulator) + _ticks(self.emulator, children=True)) / HZ
        except OSError:  # not on this machine (a remote Postgres)
            pass
        return pg, bq


@dataclass
class Timing:
    wall: float
    pg_cpu: float
    bq_cpu: float

    def __str__(self) -> str:
        return f"{self.wall:.2f}s (cpu: postgres {self.pg_cpu:.2f}s, emulator {self.bq_cpu:.2f}s)"


def best(meter: Meter, fn: Callable[[], object], repeats: int) -> Timing:
    out: Timing | None = None
    for _ in range(repeats):
        pg0, bq0 = meter.read()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        pg1, bq1 = meter.read()
        t = Timing(wall, pg1 - pg0, bq1 - bq0)
        if out is None or t.wall < out.wall:
            out = t
    assert out is not None
    return out


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

    throwaway_env(
        state,
        "bench_validate",
        REFRESH_RAW_SCHEMA="bench_validate_raw",
        REFRESH_CONTROL_SCHEMA="bench_validate_control",
    )
    import psycopg

    from flows.control import fingerprints
    from flows.core.db import migrate
    from flows.core.settings import get_settings
    from flows.core.table_config import TableConfig
    from flows.demo.local_stack import local_stack
    from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
    from flows.engine import extract, fingerprinting, normal_form
    from flows.engine.bigquery import make_clients
    from flows.engine.validation import after_refresh, source_match

    settings = get_settings()
    with local_stack(settings, throwaway=True) as stack:
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
        register(settings, [cfg])
        t0 = time.perf_counter()
        outcome = refresh(settings, clients, cfg)
        loaded = time.perf_counter() - t0
        assert outcome.run_id is not None
        raw = settings.raw_schema
        path = f"`{clients.project}.{clients.dataset}.{SQP_TABLE}`"
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            conn.execute(f"vacuum analyze {raw}.{SQP_TABLE}")
            backend = conn.info.backend_pid
            try:
                postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                postmaster = None
            emulator = stack.emulator.process.pid if stack.emulator and stack.emulator.process else None
            meter = Meter(backend, postmaster, emulator)

            def q(sql: str) -> Callable[[], object]:
                return lambda: conn.execute(sql).fetchall()

            pg_count = best(meter, q(f"select count(*) from {raw}.{SQP_TABLE}"), args.repeats)
            bq_count = best(
                meter, lambda: list(clients.rest.query(f"select count(*) from {path}").result()), args.repeats
            )
            # What reading every value costs: each row formatted as text once, no hashing.
            pg_read = best(meter, q(f"select sum(length(t::text)) from {raw}.{SQP_TABLE} t"), args.repeats)
            cols = normal_form.columns_of(
                extract.describe(clients, SQP_TABLE), clients.settings.uses_emulator
            )
            cursor = cols[0]
            days: dict[object, fingerprints.Fingerprint] = {}

            def pg_checksums() -> None:
                days.update(fingerprinting.fingerprint_pg(conn, raw, SQP_TABLE, cols, cursor, None))

            pg_fp = best(meter, pg_checksums, args.repeats)
            bq_fp = best(
                meter,
                lambda: fingerprinting.fingerprint_bq(clients, SQP_TABLE, cols, cursor, None),
                args.repeats,
            )
            results: list[source_match.PeriodResult] = []

            def run_validation() -> None:
                results[:] = source_match.validate_table(clients, conn, cfg, raw)

            validate = best(meter, run_validation, args.repeats)
            after: list[after_refresh.AfterRefresh] = []

            def run_after() -> None:
                after[:] = [after_refresh.validate_touched(settings, clients, cfg, "success", outcome.run_id)]

            after_s = best(meter, run_after, args.repeats)
            loaded_periods = source_match.LoadedBy(settings.control_schema, outcome.run_id, None)
            pg_proof = best(
                meter,
                lambda: source_match.unchanged_since_load(conn, loaded_periods, raw, SQP_TABLE, cursor),
                args.repeats,
            )
            # A daily run whose window is every week, each week restated in the source (about
            # 1% of the rows): change detection fingerprints every week, the run reloads them.
            clients.rest.query(
                f"update {path} set `ASIN Click Count` = `ASIN Click Count` + 1 "
                "where mod(`ASIN Click Count`, 97) = 0"
            ).result()
            daily = cfg.model_copy(update={"lookback_days": 7 * (args.weeks + 1)})
            register(settings, [daily])
            t0 = time.perf_counter()
            daily_outcome = refresh(settings, clients, daily, full_refresh=False)
            reloaded = time.perf_counter() - t0
            assert daily_outcome.run_id is not None and daily_outcome.plan_fingerprints is not None
            daily_run = daily_outcome.run_id

            def run_after_plan() -> None:
                after[1:] = [
                    after_refresh.validate_touched(
                        settings, clients, daily, "success", daily_run, plan=daily_outcome.plan_fingerprints
                    )
                ]

            after_plan = best(meter, run_after_plan, args.repeats)
        clients.close()

    failed = [r for r in results if not r.passed]
    fetched = sum(
        len(r.differences.missing_in_postgres)
        + len(r.differences.extra_in_postgres)
        + len(r.differences.different)
        for r in results
        if r.differences
    )
    a, p = after
    assert a.error is None and not a.failed, a.to_dict()
    assert p.error is None and not p.failed and p.periods_bigquery_from_plan == p.periods, p.to_dict()
    count_s = pg_count.wall + bq_count.wall
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"rows={args.rows} weeks={args.weeks} generated in {generated:.1f}s, loaded in {loaded:.1f}s")
    print(f"count(*): postgres {pg_count}; bigquery {bq_count}")
    print(f"postgres, every row as text once (sum(length(t::text))): {pg_read}")
    print(f"checksums alone: postgres {pg_fp}; bigquery {bq_fp}")
    print(f"validate (both sides, {len(results)} periods, {len(failed)} differ): {validate}")
    print(
        f"after a refresh ({a.periods} periods, {a.periods_from_load} from the load's fingerprint): "
        f"{after_s}; postgres' proof alone {pg_proof}"
    )
    print(
        f"after a daily run ({daily_outcome.slices_done} weeks reloaded in {reloaded:.1f}s; "
        f"{p.periods} periods, {p.periods_from_load} from the load's fingerprint, "
        f"{p.periods_bigquery_from_plan} from the plan's; bigquery bytes {p.bytes_processed}): {after_plan}"
    )
    print(f"aggregate rows sent back per side: {len(days)} (one per day); table rows fetched: {fetched}")
    print(
        f"ratio_validate_vs_count={validate.wall / count_s:.1f} "
        f"ratio_after_refresh_vs_count={after_s.wall / count_s:.1f} "
        f"ratio_after_plan_vs_count={after_plan.wall / count_s:.1f} "
        f"ratio_pg_proof_vs_pg_count={pg_proof.wall / pg_count.wall:.1f} rows_shipped={fetched}"
    )


if __name__ == "__main__":
    main()
