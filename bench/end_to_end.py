"""The whole daily refresh, end to end, on the embedded stack: where does the time go?

--rows SQP rows (plus rows/100 daily rows and 500 products) are generated in the BigQuery
emulator, then the real `daily_refresh` flow runs twice, each time in a child process as a
user would run it (`refresh run`): the first load (every table, every slice), then a daily run
(the lookback window: 60 days of SQP, 14 of daily terms; a few values restated in the source
first). Per stage, the flow's own functions are timed by wrappers installed in the child:

  plan     registry, due tables, source schema, cursor range, high-water mark, resume
  read     waiting for the next Arrow batch from the Storage Read API (emulator-bound here)
  load     apply_slice minus the read waits inside it: delete, CSV encoding, COPY, checkpoint
  validate the validation after the refresh (post_load_checks.validate_after_refresh: per-period row
           counts and checksums of what the run committed, in BigQuery and in Postgres)
  dbt      dbt build of what is downstream of the changed sources (in process)
  vacuum   flows.engine.maintenance.vacuum_after_run
  prefect  starting Prefect's ephemeral API server (a child process), as `refresh run` does
           without PREFECT_API_URL
  audit    everything else in the flow: run/table/slice audit rows, lock, due times, Prefect's
           task orchestration, the run's end

Stage times are wall time (the union of its intervals over the flow's threads: two tables load
at once). Peak RSS is sampled every 50 ms over the child and all its descendants (psutil; what
`ps` shows a user), and the child's own high-water mark (VmHWM). After the first load, the SQP
raw table is dumped to a CSV file and COPYed into an identical table: raw COPY of the same rows
in the same run, to compare with the load stage. Goals: first load of 10M rows, dbt included,
under 3 minutes; peak RSS under 600 MB.

    .venv/bin/python bench/end_to_end.py --rows 1000000
    .venv/bin/python bench/end_to_end.py --rows 10000000

Postgres: REFRESH_PG_DSN if set, else an embedded Postgres; the emulator is started here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
from bench_stack import standing_prefect_server  # bench/ on sys.path
from load_throughput import _own_peak_rss_kib, _settings_overrides, local_services
from psycopg import sql

from flows.core.db import migrate
from flows.core.settings import PROJECT_ROOT, Settings, get_settings

STAGES = ("plan", "read", "load", "validate", "dbt", "vacuum", "prefect", "audit")
SQP_RAW = "search_query_performance"

# --------------------------------------------------------------------------------------
# In the child: the flow, with its stages timed
# --------------------------------------------------------------------------------------

Interval = tuple[float, float]


class Recorder:
    """Intervals per stage and thread; rows per stage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.intervals: dict[str, list[Interval]] = defaultdict(list)
        self.slices: list[tuple[Interval, list[Interval]]] = []  # apply_slice, read waits inside
        self.read_waits: dict[int, list[Interval]] = defaultdict(list)
        self.rows: dict[str, int] = defaultdict(int)

    def add(self, stage: str, start: float, end: float, rows: int = 0) -> None:
        with self.lock:
            self.intervals[stage].append((start, end))
            self.rows[stage] += rows

    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, start, time.perf_counter())

        return wrapper

    def reading(self, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            it = fn(*args, **kwargs)
            thread = threading.get_ident()
            while True:
                start = time.perf_counter()
                batch = next(it, None)
                end = time.perf_counter()
                with self.lock:
                    self.read_waits[thread].append((start, end))
                self.add("read", start, end, 0 if batch is None else batch.num_rows)
                if batch is None:
                    return
                yield batch

        return wrapper

    def loading(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            thread = threading.get_ident()
            start = time.perf_counter()
            with self.lock:
                first_wait = len(self.read_waits[thread])
            try:
                result = fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                with self.lock:
                    self.slices.append(((start, end), self.read_waits[thread][first_wait:]))
            with self.lock:
                self.rows["load"] += result.rows_inserted
            return result

        return wrapper

    def load_intervals(self) -> list[Interval]:
        """apply_slice's intervals minus the read waits inside them."""
        out: list[Interval] = []
        for (start, end), waits in self.slices:
            cur = start
            for w0, w1 in sorted(waits):
                if w0 > cur:
                    out.append((cur, min(w0, end)))
                cur = max(cur, w1)
            if cur < end:
                out.append((cur, end))
        return out


def union(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def length(intervals: list[Interval]) -> float:
    return sum(e - s for s, e in union(intervals))


def child(out: Path) -> None:
    """Runs in the child: the daily_refresh flow (force: every table), stages timed."""
    started = time.perf_counter()
    from flows.engine import maintenance, table_refresh
    from flows.orchestration import daily_refresh as dr
    from flows.orchestration import post_load_checks, run_plan

    rec = Recorder()
    run_plan.plan_tables = rec.timed("plan", run_plan.plan_tables)  # type: ignore[assignment]
    from flows.control import checkpoints

    for name in ("describe", "cursor_range"):
        setattr(table_refresh, name, rec.timed("plan", getattr(table_refresh, name)))
    for name in ("high_water", "committed_since_last_success"):
        setattr(checkpoints, name, rec.timed("plan", getattr(checkpoints, name)))
    table_refresh.read_slice = rec.reading(table_refresh.read_slice)  # type: ignore[assignment]
    table_refresh.apply_slice = rec.loading(table_refresh.apply_slice)  # type: ignore[assignment]
    dr.run_dbt = rec.timed("dbt", dr.run_dbt)  # type: ignore[assignment]
    post_load_checks.validate_after_refresh = rec.timed("validate", post_load_checks.validate_after_refresh)  # type: ignore[assignment]
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer.start = rec.timed("prefect", SubprocessASGIServer.start)  # type: ignore[method-assign]
    maintenance.vacuum_after_run = rec.timed("vacuum", maintenance.vacuum_after_run)  # type: ignore[assignment]
    imported = time.perf_counter()
    flow_start = time.perf_counter()
    state = dr.daily_refresh(force=True, trigger="bench", return_state=True)
    flow_end = time.perf_counter()
    summary = state.result() if state.is_completed() else None
    stages = {
        "plan": rec.intervals["plan"],
        "read": rec.intervals["read"],
        "load": rec.load_intervals(),
        "dbt": rec.intervals["dbt"],
        "validate": rec.intervals["validate"],
        "vacuum": rec.intervals["vacuum"],
        "prefect": rec.intervals["prefect"],
    }
    busy = length([i for v in stages.values() for i in v])
    result = {
        "status": state.name,
        "message": (summary or {}).get("message") if isinstance(summary, dict) else str(state.message),
        "imports_s": imported - started,
        "flow_s": flow_end - flow_start,
        "seconds": {k: length(v) for k, v in stages.items()} | {"audit": flow_end - flow_start - busy},
        "rows": {"read": rec.rows["read"], "load": rec.rows["load"]},
        "slices": len(rec.slices),
        "peak_rss_kib": _own_peak_rss_kib(),
    }
    out.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------
# In the parent: data, the two runs, raw COPY
# --------------------------------------------------------------------------------------


def run_child(
    env: dict[str, str], out: Path, server: psutil.Process | None = None
) -> tuple[dict[str, Any], float, float, dict[str, float]]:
    """(child's result, wall s, peak RSS of the process tree MB, peak MB per process name).
    `server`: a standing Prefect server, outside the tree; its RSS is reported apart."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(out)], env={**os.environ, **env})
    root = psutil.Process(proc.pid)
    peak_tree = 0
    per_name: dict[str, float] = defaultdict(float)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = "flow" if p.pid == root.pid else " ".join(p.cmdline()[1:3])[:60] or p.name()
            except psutil.Error:
                continue
            total += rss
            per_name[name] = max(per_name[name], rss / 1024**2)
        peak_tree = max(peak_tree, total)
        if server is not None:
            try:
                rss = server.memory_info().rss + sum(
                    c.memory_info().rss for c in server.children(recursive=True)
                )
                per_name["standing Prefect server (not in the tree)"] = max(
                    per_name["standing Prefect server (not in the tree)"], rss / 1024**2
                )
            except psutil.Error:
                pass
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if proc.wait() != 0 or not out.exists():
        raise SystemExit(f"the flow's process failed with exit code {proc.returncode}")
    return json.loads(out.read_text()), wall, peak_tree / 1024**2, dict(per_name)


def report(what: str, res: dict[str, Any], wall: float, peak_tree: float, per_name: dict[str, float]) -> None:
    print(f"\n{what}: {res['status']} ({res['message']})")
    print(
        f"  process wall {wall:.1f} s = imports {res['imports_s']:.1f} s + flow {res['flow_s']:.1f} s "
        f"+ exit; {res['slices']} slices"
    )
    for stage in STAGES:
        s = res["seconds"][stage]
        rows = res["rows"].get(stage, res["rows"]["load"] if stage in ("dbt", "validate") else 0)
        rate = f"{rows / s:>11,.0f} rows/s" if rows and s > 0 else " " * 18
        print(f"  {stage:7s} {s:7.1f} s {rate}")
    print(
        f"  peak RSS: flow process {res['peak_rss_kib'] / 1024:.0f} MB (VmHWM); process tree "
        f"{peak_tree:.0f} MB (sampled sum); per process: "
        + ", ".join(f"{n} {mb:.0f} MB" for n, mb in sorted(per_name.items(), key=lambda x: -x[1]))
    )


def raw_copy(settings: Settings, state: Path) -> tuple[int, float]:
    """Raw COPY of the SQP raw table's rows into an identical table: (rows, seconds)."""
    from flows.core.db import relation_columns
    from flows.core.type_mapping import ColumnMapping
    from flows.engine.load import ensure_raw_table

    schema = settings.raw_schema
    dump = state / "sqp.csv"
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        cols = [c for c in relation_columns(conn, schema, SQP_RAW) if not c.startswith("_")]
        types = relation_columns(conn, schema, SQP_RAW)
        col_list = sql.SQL(", ").join(map(sql.Identifier, cols))
        with dump.open("wb") as f, conn.cursor() as cur:
            stmt = sql.SQL("copy (select {} from {}) to stdout (format csv)").format(
                col_list, sql.Identifier(schema, SQP_RAW)
            )
            with cur.copy(stmt) as copy:
                for data in copy:
                    f.write(data)
        mapping = [ColumnMapping(c, c, "", types[c]) for c in cols]
        conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, "bench_raw_copy")))
        with conn.transaction():
            ensure_raw_table(conn, schema, "bench_raw_copy", mapping, "date")
        conn.execute("checkpoint")
        stmt = sql.SQL("copy {} ({}) from stdin (format csv)").format(
            sql.Identifier(schema, "bench_raw_copy"), col_list
        )
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur, cur.copy(stmt) as copy, dump.open("rb") as f:
            while chunk := f.read(4 * 1024 * 1024):
                copy.write(chunk)
        seconds = time.perf_counter() - started
        row = conn.execute(
            sql.SQL("select count(*) from {}").format(sql.Identifier(schema, "bench_raw_copy"))
        ).fetchone()
        conn.execute(sql.SQL("drop table {}").format(sql.Identifier(schema, "bench_raw_copy")))
    dump.unlink()
    return int(row[0]) if row else 0, seconds


def restate(settings: Settings) -> str:
    """Change a value in the newest weeks of the source, as a late restatement does."""
    from flows.demo.sample_data import SQP_TABLE
    from flows.engine.bigquery import make_clients

    clients = make_clients(settings)
    try:
        path = f"`{clients.project}.{clients.dataset}.{SQP_TABLE}`"
        job = clients.rest.query(
            f"update {path} set `Search Query Score` = `Search Query Score` + 1 "
            f"where `Date` >= (select timestamp_sub(max(`Date`), interval 21 day) from {path})"
        )
        job.result()
        return f"{job.num_dml_affected_rows:,} source rows of the last 3 weeks restated"
    except Exception as exc:  # the emulator may not run DML: the daily run then reloads unchanged rows
        return f"no restatement (the emulator refused the UPDATE: {str(exc)[:120]})"
    finally:
        clients.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="SQP rows to generate (1M, 10M)")
    p.add_argument("--weeks", type=int, default=52)
    p.add_argument(
        "--standing-server",
        action="store_true",
        help="run the flow against a standing `prefect server start` (PREFECT_API_URL) instead of "
        "the ephemeral API server `refresh run` starts as its child",
    )
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    from flows.demo.sample_data import SampleSpec, generate
    from flows.engine.bigquery import make_clients

    state = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        with contextlib.ExitStack() as stack:
            env = stack.enter_context(local_services(state, with_emulator=True))
            env |= {
                "PREFECT_HOME": str(state / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "WARNING",
                # Prefect's ephemeral API server (a child process) starts slowly on a busy machine.
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                "REFRESH_CONTROL_SCHEMA": "refresh_control",
                "REFRESH_TABLES_FILE": str(PROJECT_ROOT / "config" / "tables.yml"),
            }
            server = None
            if args.standing_server:
                url, server_proc = stack.enter_context(standing_prefect_server(state / "prefect-server"))
                server = psutil.Process(server_proc.pid)
                env["PREFECT_API_URL"] = url
            os.environ.update(env)
            settings = get_settings(**_settings_overrides(env))
            migrate(settings)
            load = os.getloadavg()
            print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
            print(
                "Prefect: "
                + ("a standing server (PREFECT_API_URL)" if server else "the ephemeral API server (a child)")
            )
            spec = SampleSpec(sqp_rows=args.rows, weeks=args.weeks, asins=500, daily_rows=args.rows // 100)
            started = time.perf_counter()
            clients = make_clients(settings)
            try:
                generate(clients, spec, force=True)
            finally:
                clients.close()
            print(
                f"generated {spec.sqp_rows:,} SQP rows ({spec.weeks} weeks), {spec.daily_rows:,} daily rows, "
                f"{spec.asins} products in the emulator in {time.perf_counter() - started:.1f} s"
            )
            first, wall, tree, names = run_child(env, state / "first.json", server)
            report("first load", first, wall, tree, names)
            rows, seconds = raw_copy(settings, state)
            load_s = first["seconds"]["load"]
            print(
                f"  raw COPY of the same {rows:,} SQP rows (pre-encoded CSV file): {seconds:.1f} s, "
                f"{rows / seconds:,.0f} rows/s; the flow's load stage, all tables: "
                f"{first['rows']['load'] / load_s:,.0f} rows/s"
            )
            print(f"\n{restate(settings)}")
            daily, dwall, dtree, dnames = run_child(env, state / "daily.json", server)
            report("daily run", daily, dwall, dtree, dnames)
            print(
                f"\nfirst_load_s={wall:.1f} daily_run_s={dwall:.1f} peak_rss_mb={max(tree, dtree):.0f} "
                f"load_vs_copy={(first['rows']['load'] / load_s) / (rows / seconds):.2f} "
                f"dbt_first_s={first['seconds']['dbt']:.1f} prefect={'standing' if server else 'ephemeral'}"
            )
    finally:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
