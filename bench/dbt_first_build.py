"""The dbt stage of a first load, per node: where do its seconds go at 1M-10M SQP rows?

Fills raw tables in a throwaway embedded Postgres with set-based SQL (as
`bench/incremental_scaling.py` does: `--rows` SQP rows over `--weeks` weeks, rows/100 daily
rows, `--asins` products), then runs the `dbt build` the flow runs after a first load: every
model downstream of the SQP sources, with var refresh_weeks listing every week (on a first load
every week is "changed"), into empty model schemas. Per node, dbt's own execution time from
run_results.json; per model, a fingerprint of its rows (count and a sum of row hashes, the dbt
invocation id left out).

`--compare DIR` builds a second dbt project (e.g. an older commit checked out with
`git worktree add /tmp/old <commit>`) on the same raw rows, alternating with this one
`--repeats` times so that other load on the machine hits both alike, and checks that every
model's rows are identical. Wall time on a shared machine is noisy; the CPU seconds of
Postgres (its backends) and of dbt's process per build are not. Last line:
`build_s=.. cpu_s=.. [compare_s=.. compare_cpu_s=.. wall_ratio=.. cpu_ratio=.. identical=..]`
(medians).

    .venv/bin/python bench/dbt_first_build.py --rows 1000000 [--compare /tmp/old]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psutil
import psycopg
from incremental_scaling import LAST_WEEK, RAW_SCHEMA, Bench, History  # bench/ on sys.path
from psycopg import sql

from flows.core.settings import PROJECT_ROOT, get_settings
from flows.demo.local_stack import EmbeddedPostgres, free_port
from flows.demo.sample_data import DAILY_TABLE, PRODUCTS_TABLE, SQP_TABLE
from flows.engine.transform import dbt_env, invoke_dbt, read_run_results
from flows.orchestration.dbt_selection import DBT_SOURCE

MODEL_SCHEMAS = ("staging", "intermediate", "marts", "summaries")


def fingerprints(dsn: str) -> dict[str, tuple[int, int]]:
    """Per model table: (rows, sum of a 64-bit hash of each row without its invocation id)."""
    out: dict[str, tuple[int, int]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            "select table_schema, table_name from information_schema.tables "
            "where table_schema = any(%s) and table_type = 'BASE TABLE' order by 1, 2",
            (list(MODEL_SCHEMAS),),
        ).fetchall()
        for schema, table in tables:
            row = conn.execute(
                sql.SQL(
                    "select count(*), coalesce(sum(hashtextextended("
                    "(to_jsonb(t) - '_dbt_invocation_id')::text, 0)), 0) from {} t"
                ).format(sql.Identifier(schema, table))
            ).fetchone()
            out[f"{schema}.{table}"] = (int(row[0]), int(row[1])) if row else (0, 0)
    return out


def postgres_cpu_s(workdir: Path) -> float:
    """CPU seconds of the embedded Postgres so far: its server process's children, the exited
    ones (backends, reaped by it) and the living ones (checkpointer, autovacuum, ...)."""
    pid_file = next((workdir / "pg").rglob("postmaster.pid"))
    server = psutil.Process(int(pid_file.read_text().split()[0]))
    own = server.cpu_times()
    total = own.children_user + own.children_system
    for child in server.children():
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return total


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def first_build(
    bench: Bench, h: History, project: Path, weeks: list[str]
) -> tuple[float, float, float, list[dict]]:  # type: ignore[type-arg]
    """Empty model schemas, then the flow's first-load build: (wall s, Postgres CPU s, dbt's
    own CPU s, nodes of run_results)."""
    with psycopg.connect(bench.dsn(h.dbname), autocommit=True) as conn:
        for schema in MODEL_SCHEMAS:
            conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(schema)))
    select = " ".join(f"source:{DBT_SOURCE}.{t}+" for t in (SQP_TABLE, PRODUCTS_TABLE, DAILY_TABLE))
    pg_cpu, dbt_cpu = postgres_cpu_s(bench.workdir), own_cpu_s()
    started = time.perf_counter()
    res_path = bench.workdir / f"target-{project.name}"
    settings = get_settings(pg_dsn=bench.dsn(h.dbname), dbt_target="postgres", dbt_threads=bench.args.threads)
    res = invoke_dbt(
        project,
        [
            "build",
            "--select",
            select,
            "--vars",
            json.dumps({"raw_schema": RAW_SCHEMA, "refresh_weeks": weeks}),
        ],
        profiles_dir=bench.profiles,
        target_path=res_path,
        env=dbt_env(settings),
    )
    elapsed = time.perf_counter() - started
    pg_cpu, dbt_cpu = postgres_cpu_s(bench.workdir) - pg_cpu, own_cpu_s() - dbt_cpu
    if not res.success:
        raise SystemExit(f"dbt build of {project} failed: {res.exception or 'see output'}")
    _, nodes = read_run_results(res_path / "run_results.json")
    return elapsed, pg_cpu, dbt_cpu, [dict(n) for n in nodes]


def report_nodes(label: str, runs: list[list[dict]]) -> None:  # type: ignore[type-arg]
    per: dict[str, list[float]] = {}
    for nodes in runs:
        for n in nodes:
            per.setdefault(n["unique_id"], []).append(n["execution_time_s"] or 0.0)
    med = {k: statistics.median(v) for k, v in per.items()}
    models = sum(v for k, v in med.items() if k.startswith("model."))
    tests = sum(v for k, v in med.items() if k.startswith("test."))
    print(f"\n[{label}] {len(med)} nodes; node execution (median s): models {models:.1f}, tests {tests:.1f}")
    for uid in sorted(med, key=lambda k: -med[k])[:25]:
        print(f"  {med[uid]:7.2f}  {uid[:100]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="SQP raw rows")
    p.add_argument("--weeks", type=int, default=52)
    p.add_argument("--asins", type=int, default=500)
    p.add_argument("--threads", type=int, default=4, help="dbt threads (the flow's default)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compare", type=Path, help="another dbt project directory to build side by side")
    args = p.parse_args(argv)
    args.rows_per_week = max(1, args.rows // args.weeks)
    args.daily_rows_per_day = max(1, args.rows // 100 // (args.weeks * 7))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="sqp-bench-first-"))
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    projects = [("this", PROJECT_ROOT)] + ([("compare", args.compare.resolve())] if args.compare else [])
    try:
        pg.start()
        bench = Bench(args, pg, workdir)
        h = History("raw", "bench_first", args.weeks)
        t0 = time.perf_counter()
        bench.load_history(h)
        print(f"raw rows {h.rows} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        # ISO weeks (Mondays) holding the SQP weeks (which start on Sundays) and the daily rows.
        newest = LAST_WEEK + timedelta(days=6)
        first = newest - timedelta(days=args.weeks * 7 + 6)
        monday = first - timedelta(days=first.weekday())
        weeks = []
        while monday <= newest:
            weeks.append(monday.isoformat())
            monday += timedelta(days=7)
        walls: dict[str, list[float]] = {label: [] for label, _ in projects}
        cpus: dict[str, list[float]] = {label: [] for label, _ in projects}
        nodes: dict[str, list[list[dict]]] = {label: [] for label, _ in projects}  # type: ignore[type-arg]
        prints: dict[str, dict[str, tuple[int, int]]] = {}
        for attempt in range(1, args.repeats + 1):
            for label, project in projects:
                load = os.getloadavg()
                elapsed, pg_cpu, dbt_cpu, run_nodes = first_build(bench, h, project, weeks)
                walls[label].append(elapsed)
                cpus[label].append(pg_cpu + dbt_cpu)
                nodes[label].append(run_nodes)
                print(
                    f"[{label}] first build (run {attempt}) {elapsed:.1f} s, CPU {pg_cpu:.1f} s Postgres "
                    f"+ {dbt_cpu:.1f} s dbt, load average {load[0]:.1f}",
                    flush=True,
                )
                if attempt == 1 and args.compare:
                    prints[label] = fingerprints(bench.dsn(h.dbname))
        for label, _ in projects:
            report_nodes(label, nodes[label])
        this_s, this_cpu = statistics.median(walls["this"]), statistics.median(cpus["this"])
        last = f"build_s={this_s:.1f} cpu_s={this_cpu:.1f}"
        if args.compare:
            this, other = prints["this"], prints["compare"]
            diff = sorted(k for k in this.keys() | other.keys() if this.get(k) != other.get(k))
            print("\nmodel rows identical in both projects" if not diff else f"\nMODEL ROWS DIFFER: {diff}")
            other_s, other_cpu = statistics.median(walls["compare"]), statistics.median(cpus["compare"])
            last += (
                f" compare_s={other_s:.1f} compare_cpu_s={other_cpu:.1f} wall_ratio={this_s / other_s:.2f} "
                f"cpu_ratio={this_cpu / other_cpu:.2f} identical={not diff}"
            )
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
