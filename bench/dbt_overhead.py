"""The dbt stage as the flow runs it against plain `dbt build` of the same selection.

One SQP history in a throwaway embedded Postgres (bench/incremental_scaling.py builds it: raw
tables as the extractor makes them; the control schema migrated for the monitoring views), a
full `dbt build`, then before each timed run the newest week reloaded as a slice replace
would. Then the flow's daily dbt command for that one changed week

    dbt build --select source:sqp.<tables>+ source:refresh_control+ \
        --vars {refresh_weeks: [<newest ISO week>]}

is timed, `repeats` times each, alternating so that other load hits all alike:
- plain: dbt's own runner in this process, no Prefect (flows.engine.transform.invoke_dbt);
- flow (one dbt task): flows.orchestration.daily_refresh.dbt_task inside a Prefect flow, as the daily flow
  runs it by default: one Prefect task for the stage, dbt's own runner, dbt's warnings and
  errors forwarded to the task's log, the changed weeks passed by environment variable (so
  partial parsing holds), a table artifact with every node;
- flow, task per node: flows.engine.transform.run_dbt with REFRESH_DBT_NODE_TASKS (PrefectDbtRunner:
  one Prefect task per dbt node, waiting for every node's task to end);
Medians of wall time and of this process's CPU time (every thread's, the node tasks' too;
steadier on a shared machine; the Prefect server and Postgres are other processes) reported,
with each variant's ratio to plain. The last line is `ratio=X cpu_ratio=Y`: flow (one dbt
task) over plain, wall and CPU time (goal: under 1.3).

    .venv/bin/python bench/dbt_overhead.py [--weeks 52] [--rows-per-week 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from incremental_scaling import LAST_WEEK, RAW_SCHEMA, Bench, History

from flows.core.db import migrate
from flows.core.settings import PROJECT_ROOT, get_settings
from flows.demo.local_stack import EmbeddedPostgres, free_port
from flows.demo.sample_data import DAILY_TABLE, PRODUCTS_TABLE, SQP_TABLE
from flows.engine.transform import run_dbt
from flows.orchestration.dbt_selection import CONTROL_SOURCE, DBT_SOURCE

FLOW = "flow (one dbt task)"


def flow_args() -> list[str]:
    """The flow's dbt command for a day whose only change is the newest week."""
    select = " ".join(
        [
            *(f"source:{DBT_SOURCE}.{t}+" for t in (SQP_TABLE, PRODUCTS_TABLE, DAILY_TABLE)),
            f"source:{CONTROL_SOURCE}+",
        ]
    )
    newest_iso_week = LAST_WEEK - timedelta(days=LAST_WEEK.weekday())
    return [
        "build",
        "--select",
        select,
        "--vars",
        json.dumps({"refresh_weeks": [newest_iso_week.isoformat()]}),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weeks", type=int, default=52, help="weeks of SQP history")
    p.add_argument("--rows-per-week", type=int, default=2000, help="SQP rows per week")
    p.add_argument("--asins", type=int, default=100)
    p.add_argument("--daily-rows-per-day", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    p.add_argument("--threads", type=int, default=4, help="dbt threads (the flow's default)")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="sqp-bench-dbt-"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    try:
        pg.start()
        bench = Bench(args, pg, workdir)
        h = History("N", "bench_overhead", args.weeks)
        bench.load_history(h)
        settings = get_settings(
            pg_dsn=bench.dsn(h.dbname),
            dbt_target="postgres",
            dbt_threads=args.threads,
            raw_schema=RAW_SCHEMA,
            state_dir=workdir / "state",
            dbt_project_dir=PROJECT_ROOT,
        )
        migrate(settings)  # the monitoring views read the control schema
        h.full_build_s, _ = bench.dbt(h, ["build", "--full-refresh"], {})
        print(f"{h.rows} rows, full build {h.full_build_s:.1f}s", flush=True)
        dbt_args = flow_args()
        dbt_vars = json.loads(dbt_args[4])

        def plain() -> bool:
            bench.dbt(h, dbt_args[:3], dbt_vars)  # raises when dbt fails
            return True

        from prefect import flow

        from flows.orchestration.daily_refresh import dbt_task

        # Each variant its own target dir: dbt keeps one partial-parse state per target dir,
        # and variants with other vars alternating in one would each force a full parse.
        node_tasks = settings.model_copy(
            update={"dbt_node_tasks": True, "state_dir": workdir / "state-nodes"}
        )
        variants: dict[str, Callable[[], bool]] = {
            "plain dbt build": plain,
            FLOW: lambda: dbt_task(settings, dbt_args, "build").result().success,
            "flow, task per node": lambda: run_dbt(node_tasks, dbt_args).success,
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}

        @flow(name="dbt-overhead-bench")
        def measure() -> None:
            for attempt in range(args.repeats + 1):  # the first round warms up, untimed
                for name, run in variants.items():
                    bench.reload_newest_week(h.dbname)
                    started, cpu_started = time.perf_counter(), time.process_time()
                    if not run():
                        raise SystemExit(f"{name}: dbt failed")
                    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
                    if attempt:
                        times[name].append(elapsed)
                        cpu[name].append(cpu_s)
                    print(f"[{name}] run {attempt}: {elapsed:.2f}s wall, {cpu_s:.2f}s CPU", flush=True)

        measure()
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    base = statistics.median(times["plain dbt build"])
    base_cpu = statistics.median(cpu["plain dbt build"])
    print(f"\n{args.weeks} weeks x {args.rows_per_week} SQP rows, {args.repeats} timed runs each, medians")
    print("(CPU: this process's own, user + system; the Prefect server and Postgres run apart):")
    for name, values in times.items():
        median, median_cpu = statistics.median(values), statistics.median(cpu[name])
        print(
            f"  {name:24} {median:7.2f}s wall {median / base:5.2f}x"
            f"   {median_cpu:7.2f}s CPU {median_cpu / base_cpu:5.2f}x"
        )
    flow_cpu = statistics.median(cpu[FLOW])
    print(f"ratio={statistics.median(times[FLOW]) / base:.2f} cpu_ratio={flow_cpu / base_cpu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
