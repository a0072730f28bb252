"""A daily run on a year of history: what a quiet day, a restatement and a full lookback cost.

A throwaway stack (embedded Postgres, BigQuery emulator, one Prefect server for all runs as
the daily deployment has; free ports, a temp folder) holds `--weeks` weeks of SQP at `--rows-per-week` rows
(flows.demo.sample_data), loaded and built once by a first daily run. Then, each through the real
`daily-refresh` flow in its own child process (so its peak RSS is its own):

  (a) quiet day     one new week arrives in the source; the daily run (change-aware: skips
                    unchanged slices by fingerprint where that is on, rebuilds the changed
                    days' periods in dbt: var refresh_days)
  (b) restatement   one old week inside the lookback window changes; the daily run
  (c) full lookback one new week arrives; no change detection: every slice of the lookback
                    window re-read and re-written, dbt rebuilding every period from the
                    window start (an explicit date range from the lookback start: var
                    refresh_start_date, no fingerprint skip)

For each: rows read, rows written (inserted + deleted) in the raw table, dbt models built and
the periods each incremental model rebuilt (distinct period values carrying the run's dbt
invocation), wall time per stage (extract+load; dbt split into its start-up, its nodes and
what follows them; validation and the rest; imports; Prefect's start and end; the whole child
process) and peak RSS. The last line holds the ratios: `ratio_wall` (a) over (c), whole
process (goal <= 0.3), `ratio_run` the same for the flow's own time, `ratio_rows` rows read +
written, and (a)'s rows read and written per new-week row (`a_read_per_new_week`,
`a_written_per_new_week`, goal <= 1.2).

    .venv/bin/python bench/daily_run.py [--weeks 52] [--rows-per-week 200000]
    .venv/bin/python bench/daily_run.py --weeks 8 --rows-per-week 5000   # small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench_stack import standing_prefect_server  # a sibling script: bench/ is on sys.path

from flows.demo.local_stack import free_port

INCREMENTAL_MODELS = {
    "marts.search_query_performance": "week_start",
    "intermediate.int_asin_weekly_funnel": "week_start",
    "marts.search_performance_summary": "week_start",
    "summaries.weekly_summary": "period_start",
    "summaries.monthly_summary": "period_start",
    "summaries.quarterly_summary": "period_start",
    "summaries.yearly_summary": "period_start",
}
SCENARIOS = {
    "first": "first run",
    "a": "(a) quiet day",
    "b": "(b) restated week",
    "c": "(c) full lookback",
}


def stack_env(state: Path) -> dict[str, str]:
    return {
        "REFRESH_STATE_DIR": str(state),
        "REFRESH_LOCAL_PG_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_REST_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_GRPC_PORT": str(free_port()),
        "REFRESH_BQ_DATASET": "bench_daily",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }


@contextlib.contextmanager
def prefect_server(state: Path) -> Iterator[str]:
    """One `prefect server start` for every scenario, as the daily deployment runs against a
    standing server (`refresh serve`): no run pays for starting one. Yields its API URL."""
    with standing_prefect_server(state / "prefect") as (url, _):
        yield url


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM): not charged with a parent's memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------------------
# The child: one daily run
# --------------------------------------------------------------------------------------


def child(scenario: str, result_file: Path) -> None:
    """Run the daily flow for `scenario` (the source is prepared by the parent); write the run's
    figures to `result_file` (JSON)."""
    t0 = time.perf_counter()
    import psycopg

    from flows.core.settings import get_settings
    from flows.demo.sample_data import SQP_TABLE
    from flows.orchestration.daily_refresh import daily_refresh

    import_s = time.perf_counter() - t0
    settings = get_settings()
    kwargs: dict[str, Any] = {"tables": [SQP_TABLE], "trigger": "bench"}
    if scenario == "first":  # every table: the models need them all
        kwargs = {"force": True, "trigger": "bench"}
    elif scenario == "c":
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            row = conn.execute(
                f"select max(slice_end), (select lookback_days from {settings.control_schema}.refresh_config "
                f"where table_name = %s) from {settings.control_schema}.checkpoints "
                "where table_name = %s and slice_start > '0001-01-02'",
                (SQP_TABLE, SQP_TABLE),
            ).fetchone()
        assert row and row[0], "no high-water mark: the first run did not load"
        kwargs["start_date"] = row[0].date() - timedelta(days=row[1])
    else:
        kwargs["force"] = True
    started = time.perf_counter()
    summary = daily_refresh(**kwargs)
    wall = time.perf_counter() - started
    figures = {"summary": summary, "wall_s": wall, "import_s": import_s, "peak_rss_mb": _peak_rss_mb()}
    result_file.write_text(json.dumps(figures, default=str))


# --------------------------------------------------------------------------------------
# The parent: the stack, the source changes, the report
# --------------------------------------------------------------------------------------


def run_child(scenario: str, env: dict[str, str], state: Path) -> dict[str, Any]:
    """One scenario in a child process of its own session. Its output goes to a file and its
    figures to another: Prefect's ephemeral server (a grandchild) inherits the child's stdout,
    and one left behind would keep a pipe open for ever; whatever the child leaves running is
    stopped with its process group."""
    out, result_file = state / f"child-{scenario}.log", state / f"child-{scenario}.json"
    with out.open("w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", scenario, "--result", str(result_file)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=6 * 3600)
            process_s = time.perf_counter() - started
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    text = out.read_text(errors="replace")
    if proc.returncode != 0 or not result_file.exists():
        raise SystemExit(f"scenario {scenario} failed (exit {proc.returncode}):\n{text[-4000:]}")
    result: dict[str, Any] = json.loads(result_file.read_text())
    result["process_s"] = process_s
    if result["summary"]["status"] != "success":
        raise SystemExit(
            f"scenario {scenario}: run ended {result['summary']['status']}: {result['summary']['message']}"
        )
    return result


def measure(conn: Any, schema: str, result: dict[str, Any]) -> dict[str, Any]:
    """The run's figures from its summary and the control schema."""
    summary = result["summary"]
    [table] = summary["tables"]
    invocation = summary["dbt_invocation_id"]
    # The dbt stage split at its first node's start and last node's end: before, dbt's start-up
    # (project parse, adapter, selection); between, the nodes; after, the artifacts, the node
    # tasks' last events and the audit.
    row = conn.execute(
        f"select extract(epoch from i.finished_at - i.started_at), "
        f"extract(epoch from min(n.started_at) - i.started_at), "
        f"extract(epoch from max(n.finished_at) - min(n.started_at)) "
        f"from {schema}.dbt_invocations i left join {schema}.dbt_node_runs n using (invocation_id) "
        "where i.invocation_id = %s group by i.invocation_id",
        (invocation,),
    ).fetchone()
    dbt_s, dbt_setup_s, dbt_nodes_s = (float(v or 0.0) for v in row) if row else (0.0, 0.0, 0.0)
    periods = {}
    for model, column in INCREMENTAL_MODELS.items():
        n = conn.execute(
            f"select count(distinct {column}), count(*) from {model} where _dbt_invocation_id = %s",
            (invocation,),
        ).fetchone()
        periods[model] = (int(n[0]), int(n[1])) if n else (0, 0)
    # The slowest nodes and the sum of all node times by kind: where the dbt stage went.
    slowest = conn.execute(
        f"select resource_type || ' ' || name, execution_time_s from {schema}.dbt_node_runs "
        "where invocation_id = %s order by execution_time_s desc nulls last limit 12",
        (invocation,),
    ).fetchall()
    by_kind = conn.execute(
        f"select resource_type, count(*), sum(execution_time_s) from {schema}.dbt_node_runs "
        "where invocation_id = %s group by resource_type order by 1",
        (invocation,),
    ).fetchall()
    extract_s = float(table.get("duration_s") or 0.0)
    return {
        "slowest_nodes": [(str(name), float(t or 0.0)) for name, t in slowest],
        "node_time_by_kind": {str(k): (int(n), float(t or 0.0)) for k, n, t in by_kind},
        "rows_read": int(table.get("rows_read") or 0),
        "rows_written": int(table.get("rows_inserted") or 0) + int(table.get("rows_deleted") or 0),
        "slices": int(table.get("slices") or 0),
        "dbt_models": int(summary.get("dbt_models_built") or 0),
        "periods": periods,
        "extract_s": extract_s,
        "dbt_s": dbt_s,
        "dbt_setup_s": dbt_setup_s,
        "dbt_nodes_s": dbt_nodes_s,
        "dbt_after_s": max(dbt_s - dbt_setup_s - dbt_nodes_s, 0.0),
        "run_s": float(summary.get("duration_s") or 0.0),
        "rest_s": max(float(summary.get("duration_s") or 0.0) - extract_s - dbt_s, 0.0),
        "import_s": float(result["import_s"]),
        # Prefect around the flow's own time: its client and flow run start, its end
        "prefect_s": max(float(result["wall_s"]) - float(summary.get("duration_s") or 0.0), 0.0),
        "wall_s": float(result["process_s"]),
        "peak_rss_mb": float(result["peak_rss_mb"]),
    }


def progress(name: str, f: dict[str, Any]) -> None:
    """One scenario's figures as soon as it ends (a long run still shows what it measured)."""
    print(
        f"{SCENARIOS[name]}: read {f['rows_read']:,}, wrote {f['rows_written']:,} rows "
        f"in {f['slices']} slices; extract {f['extract_s']:.1f}s, dbt {f['dbt_s']:.1f}s "
        f"({f['dbt_models']} models; start-up {f['dbt_setup_s']:.1f}s), run {f['run_s']:.1f}s, "
        f"process {f['wall_s']:.1f}s, "
        f"peak RSS {f['peak_rss_mb']:.0f} MB; periods {[p for p, _ in f['periods'].values()]}",
        flush=True,
    )
    kinds = ", ".join(f"{k} {n} nodes {t:.1f}s" for k, (n, t) in f["node_time_by_kind"].items())
    print(f"  dbt node time (sum over threads): {kinds}")
    print("  slowest: " + ", ".join(f"{name} {t:.1f}s" for name, t in f["slowest_nodes"]), flush=True)


def report(figures: dict[str, dict[str, Any]], new_week_rows: int) -> dict[str, float]:
    names = list(figures)
    print(f"\n{'':34}" + "".join(f"{SCENARIOS[n]:>20}" for n in names))

    def line(label: str, fmt: str, key: str) -> None:
        print(f"{label:34}" + "".join(f"{format(figures[n][key], fmt):>20}" for n in names))

    line("slices applied", "d", "slices")
    line("rows read", ",d", "rows_read")
    line("rows written (ins + del)", ",d", "rows_written")
    line("dbt models built", "d", "dbt_models")
    for model in INCREMENTAL_MODELS:
        cells = []
        for n in names:
            rebuilt, rows = figures[n]["periods"][model]
            cells.append(f"{rebuilt} p / {rows:,} r")
        print(f"  {model.split('.')[1][:32]:32}" + "".join(f"{c:>20}" for c in cells))
    line("extract + load (s)", ".1f", "extract_s")
    line("dbt (s)", ".1f", "dbt_s")
    line("  start-up: parse, selection (s)", ".1f", "dbt_setup_s")
    line("  nodes, first start to last end (s)", ".1f", "dbt_nodes_s")
    line("  after: artifacts, node tasks (s)", ".1f", "dbt_after_s")
    line("validation and the rest (s)", ".1f", "rest_s")
    line("run, flow's own measure (s)", ".1f", "run_s")
    line("imports (s)", ".1f", "import_s")
    line("Prefect flow run start and end (s)", ".1f", "prefect_s")
    line("wall, whole process (s)", ".1f", "wall_s")
    line("peak RSS (MB)", ".0f", "peak_rss_mb")
    a, c = figures["a"], figures["c"]
    ratios = {
        "ratio_wall": a["wall_s"] / c["wall_s"],
        "ratio_run": a["run_s"] / c["run_s"],
        "ratio_rows": (a["rows_read"] + a["rows_written"]) / max(c["rows_read"] + c["rows_written"], 1),
        "a_read_per_new_week": a["rows_read"] / new_week_rows,
        "a_written_per_new_week": a["rows_written"] / new_week_rows,
    }
    print(
        f"\n(a) / (c): wall {ratios['ratio_wall']:.2f}x (goal <= 0.3), flow's own time "
        f"{ratios['ratio_run']:.2f}x, rows read + written {ratios['ratio_rows']:.2f}x; (a) read "
        f"{ratios['a_read_per_new_week']:.2f}x and wrote {ratios['a_written_per_new_week']:.2f}x the new "
        f"week's {new_week_rows:,} rows (goal <= 1.2)"
    )
    print("(p: distinct periods the run's dbt invocation rebuilt; r: their rows)")
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weeks", type=int, default=52, help="weeks of SQP history")
    p.add_argument("--rows-per-week", type=int, default=200_000, help="SQP rows per week")
    p.add_argument("--asins", type=int, default=200)
    p.add_argument(
        "--order",
        default="a,b,c",
        help="the scenarios' order after the first run (e.g. c,a,b: the emulator's memory grows "
        "with every read session, and at 10M rows it ran out of the machine's 24 GB during (c))",
    )
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="leave the temp folder (each scenario's log, the dbt target and logs) for a look after",
    )
    p.add_argument("--child", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    order = args.order.split(",")
    if sorted(order) != ["a", "b", "c"]:
        p.error("--order must name a, b and c once each, e.g. c,a,b")
    if args.child:
        child(args.child, args.result)
        return 0

    state = Path(tempfile.mkdtemp(prefix="sqp-bench-daily-"))
    env = stack_env(state)
    os.environ.update(env)
    import psycopg

    from flows.core.db import migrate
    from flows.core.settings import get_settings
    from flows.demo.local_stack import local_stack
    from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
    from flows.engine.bigquery import make_clients

    settings = get_settings()
    spec = SampleSpec(
        sqp_rows=args.weeks * args.rows_per_week,
        weeks=args.weeks,
        asins=args.asins,
        daily_rows=args.weeks * 7,
    )
    try:
        with local_stack(settings, throwaway=True), prefect_server(state) as api:
            env["PREFECT_API_URL"] = api
            migrate(settings)
            clients = make_clients(settings)
            t0 = time.perf_counter()
            generate(clients, spec, force=True)
            elapsed = time.perf_counter() - t0
            print(f"generated {spec.sqp_rows:,} SQP rows ({args.weeks} weeks) in {elapsed:.0f}s")
            table = f"`{clients.project}.{clients.dataset}.{SQP_TABLE}`"

            def bq(statement: str) -> None:
                clients.rest.query(statement).result()

            def add_week(after: int) -> None:
                """A new week: the newest week's rows, `after` weeks later."""
                newest = spec.last_week + timedelta(weeks=after - 1)
                bq(
                    f"insert into {table} select * replace (timestamp_add(`Date`, interval 7 day) as `Date`) "
                    f"from {table} where `Date` = timestamp '{newest} 00:00:00+00'"
                )

            first = run_child("first", env, state)
            print(f"first run (full load + full dbt build): {first['process_s']:.0f}s", flush=True)

            def restate_week() -> None:
                restated = spec.last_week - timedelta(weeks=3)
                bq(
                    f"update {table} set `ASIN Impression Count` = `ASIN Impression Count` + 1 "
                    f"where `Date` = timestamp '{restated} 00:00:00+00'"
                )

            figures: dict[str, dict[str, Any]] = {}
            weeks_added = 0
            with psycopg.connect(settings.dsn(), autocommit=True) as conn:
                for name in order:
                    if name == "b":
                        restate_week()
                    else:  # (a) and (c) each start from one new week
                        weeks_added += 1
                        add_week(weeks_added)
                    figures[name] = measure(conn, settings.control_schema, run_child(name, env, state))
                    progress(name, figures[name])
            clients.close()
    finally:
        if args.keep_state:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    ratios = report(figures, spec.rows_per_week)
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
