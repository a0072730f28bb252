"""Does a one-week incremental dbt refresh cost the same on 10x the history?

Builds two SQP histories in a throwaway embedded Postgres (its own port and temp folder, so it
never touches the demo's or the tests' data): N weeks and factor x N weeks, each in its own
database. Raw tables are created exactly as the extractor creates them (flows.engine.load) and filled
by set-based SQL in Postgres. Each history gets a full `dbt build`; then the newest week is
reloaded (as a slice replace would) and the flow's own command is timed:

    dbt build --select source:sqp.<table>+ ... --vars {refresh_start_date: <newest week>}

`repeats` times after one warm-up run, alternating between the two histories so that other
load on the machine hits both alike; medians reported. The last line is `ratio=X`: the
factor x N median divided by the N median (target: at most 1.3).

    .venv/bin/python bench/incremental_scaling.py [--weeks 52] [--rows-per-week 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from flows.core.settings import PROJECT_ROOT, get_settings
from flows.core.type_mapping import ColumnMapping, map_schema
from flows.demo.local_stack import EmbeddedPostgres, free_port
from flows.demo.sample_data import (
    DAILY_TABLE,
    PRODUCTS_TABLE,
    SQP_TABLE,
    daily_schema,
    products_schema,
    sqp_schema,
)
from flows.engine.load import ensure_raw_table
from flows.engine.transform import dbt_env, invoke_dbt, read_run_results
from flows.orchestration.dbt_selection import DBT_SOURCE

RAW_SCHEMA = "raw_bench"
LAST_WEEK = date(2026, 11, 22)  # a Sunday, like the sample data's weeks


def _columns(fields: list) -> list[ColumnMapping]:  # type: ignore[type-arg]
    return map_schema([(f.name, f.field_type, f.mode, f.precision, f.scale) for f in fields], "bench")


def _h(salt: int, m: int, row: str = "i", week: str = "w") -> str:
    """A deterministic pseudo-random integer in [0, m) from the row and week numbers."""
    return f"(({row} * {2 * salt + 7919} + {week} * {salt * 104729 + 13}) % {m})"


def _sqp_select(weeks_sql: str, rows_per_week: int, asins: int) -> tuple[str, list[str]]:
    """SELECT producing SQP rows for the weeks listed by `weeks_sql` (column w), consistent
    funnels (each stage capped by the one above), and the raw column names it fills."""
    ratio = "round(cast({0} as numeric) / nullif({1}, 0), 4)"
    exprs: dict[str, str] = {
        "date": f"timestamptz '{LAST_WEEK.isoformat()} 00:00:00+00' - (w * interval '7 days')",
        "parent_asin": (
            f"case when {_h(11, 50)} = 0 then null else 'P0' || lpad(((i % {asins}) / 4)::text, 8, '0') end"
        ),
        "child_asin": f"'B0' || lpad((i % {asins})::text, 8, '0')",
        "asin": f"'B0' || lpad((i % {asins})::text, 8, '0')",
        "search_query": f"'query ' || (i / {asins})::text",
        "search_query_score": f"1 + {_h(12, 100)}",
        "search_query_volume": "volume",
        "total_query_impression_count": "total_imp",
        "asin_impression_count": "asin_imp",
        "asin_impression_share": ratio.format("asin_imp", "total_imp"),
    }
    for stage, total, asin, above, salt in (
        ("click", "total_click", "asin_click", "total_imp", 20),
        ("cart_add", "total_cart", "asin_cart", "total_click", 30),
        ("purchase", "total_purchase", "asin_purchase", "total_cart", 40),
    ):
        exprs |= {
            f"total_{stage}_count": total,
            f"total_{stage}_rate": ratio.format(total, above),
            f"asin_{stage}_count": asin,
            f"asin_{stage}_share": ratio.format(asin, total),
            f"total_median_{stage}_price_amount": f"(299 + {_h(salt, 9000)})::numeric / 100",
            f"asin_median_{stage}_price_amount": f"(299 + {_h(salt + 1, 9000)})::numeric / 100",
            f"total_same_day_shipping_{stage}_count": f"{total} * {_h(salt + 2, 20)} / 100",
            f"total_one_day_shipping_{stage}_count": f"{total} * {_h(salt + 3, 30)} / 100",
            f"total_two_day_shipping_{stage}_count": f"{total} * {_h(salt + 4, 40)} / 100",
        }
    names = [c.name for c in _columns(sqp_schema())]
    assert set(names) == set(exprs), set(names) ^ set(exprs)
    funnel = f"""
        select w, i, volume, total_imp, asin_imp, total_click, asin_click, total_cart, asin_cart,
               total_purchase, least(total_purchase * {_h(9, 400)} / 1000, asin_cart) as asin_purchase
        from (
          select *, total_cart * (20 + {_h(6, 60)}) / 100 as total_purchase,
                 least(total_cart * {_h(8, 400)} / 1000, asin_click) as asin_cart
          from (
            select *, total_click * (10 + {_h(5, 50)}) / 100 as total_cart,
                   least(total_click * {_h(7, 400)} / 1000, asin_imp) as asin_click
            from (
              select *, total_imp * (10 + {_h(4, 100)}) / 1000 as total_click,
                     total_imp * {_h(3, 300)} / 1000 as asin_imp
              from (
                select w, i, volume, volume * (2 + {_h(2, 5)}) as total_imp
                from (
                  select w, i, 1000 + {_h(1, 50000)} as volume
                  from ({weeks_sql}) weeks cross join generate_series(0::bigint, {rows_per_week - 1}) as i
                ) a
              ) b
            ) c
          ) d
        ) e"""
    select = f"select {', '.join(exprs[n] for n in names)} from ({funnel}) f"
    return select, names


@dataclass
class History:
    label: str
    dbname: str
    weeks: int
    rows: dict[str, int] = field(default_factory=dict)
    full_build_s: float = 0.0
    runs_s: list[float] = field(default_factory=list)
    node_s: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


class Bench:
    def __init__(self, args: argparse.Namespace, pg: EmbeddedPostgres, workdir: Path) -> None:
        self.args = args
        self.pg = pg
        self.workdir = workdir
        self.last_results = workdir / "run_results.json"
        self.profiles = workdir / "profiles"
        self.profiles.mkdir()
        shutil.copyfile(PROJECT_ROOT / "profiles.example.yml", self.profiles / "profiles.yml")

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.pg.dsn, dbname=dbname)

    # ---- raw data ---------------------------------------------------------------------

    def load_history(self, h: History) -> None:
        with psycopg.connect(self.pg.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("create database {}").format(sql.Identifier(h.dbname)))
        a = self.args
        with psycopg.connect(self.dsn(h.dbname), autocommit=True) as conn:
            ensure_raw_table(conn, RAW_SCHEMA, SQP_TABLE, _columns(sqp_schema()), "date")
            ensure_raw_table(conn, RAW_SCHEMA, PRODUCTS_TABLE, _columns(products_schema()), None)
            ensure_raw_table(conn, RAW_SCHEMA, DAILY_TABLE, _columns(daily_schema()), "date")
            self.insert_sqp_weeks(conn, f"select generate_series(0::bigint, {h.weeks - 1}) as w")
            conn.execute(
                sql.SQL(
                    "insert into {t} (asin, parent_asin, title, brand, updated_at) "
                    "select 'B0' || lpad(n::text, 8, '0'), 'P0' || lpad((n / 4)::text, 8, '0'), "
                    "'Product ' || n, 'Brand ' || (n %% 5), now() from generate_series(0, %s) as n"
                ).format(t=sql.Identifier(RAW_SCHEMA, PRODUCTS_TABLE)),
                (a.asins - 1,),
            )
            self.insert_daily_days(conn, 0, h.weeks * 7 - 1)
            for table in (SQP_TABLE, PRODUCTS_TABLE, DAILY_TABLE):
                conn.execute(sql.SQL("analyze {}").format(sql.Identifier(RAW_SCHEMA, table)))
                count = conn.execute(
                    sql.SQL("select count(*) from {}").format(sql.Identifier(RAW_SCHEMA, table))
                ).fetchone()
                h.rows[table] = int(count[0]) if count else 0

    def insert_sqp_weeks(self, conn: psycopg.Connection, weeks_sql: str) -> None:
        select, names = _sqp_select(weeks_sql, self.args.rows_per_week, self.args.asins)
        conn.execute(
            sql.SQL("insert into {t} ({cols}) {select}").format(
                t=sql.Identifier(RAW_SCHEMA, SQP_TABLE),
                cols=sql.SQL(", ").join(map(sql.Identifier, names)),
                select=sql.SQL(select),  # type: ignore[arg-type]
            )
        )

    def insert_daily_days(self, conn: psycopg.Connection, first_day_back: int, last_day_back: int) -> None:
        """Daily rows for the days `first_day_back`..`last_day_back` before the newest day."""
        newest = LAST_WEEK + timedelta(days=6)
        per_day = self.args.daily_rows_per_day
        conn.execute(
            sql.SQL(
                "insert into {t} (date, asin, search_query, impressions, clicks, purchases, spend, sales) "
                "select %s::date - d, 'B0' || lpad((i %% %s)::text, 8, '0'), 'query ' || (i / %s), "
                "imp, clk, clk * ((i * 7 + d) %% 30) / 100, (clk * (10 + (i + d) %% 90))::numeric / 100, "
                "(clk * (50 + (i * 3 + d) %% 400))::numeric / 100 "
                "from (select d, i, 100 + (i * 7919 + d * 13) %% 5000 as imp, "
                "(100 + (i * 7919 + d * 13) %% 5000) * ((i + d) %% 20) / 100 as clk "
                "from generate_series(%s::int, %s::int) as d cross join generate_series(0, %s::int) as i) x"
            ).format(t=sql.Identifier(RAW_SCHEMA, DAILY_TABLE)),
            (newest, self.args.asins, self.args.asins, first_day_back, last_day_back, per_day - 1),
        )

    def reload_newest_week(self, dbname: str) -> None:
        """What a slice replace of the newest week does to the raw tables."""
        with psycopg.connect(self.dsn(dbname)) as conn:
            conn.execute(
                sql.SQL("delete from {} where date >= %s").format(sql.Identifier(RAW_SCHEMA, SQP_TABLE)),
                (LAST_WEEK,),
            )
            self.insert_sqp_weeks(conn, "select 0::bigint as w")
            conn.execute(
                sql.SQL("delete from {} where date >= %s").format(sql.Identifier(RAW_SCHEMA, DAILY_TABLE)),
                (LAST_WEEK,),
            )
            self.insert_daily_days(conn, 0, 6)

    # ---- dbt --------------------------------------------------------------------------

    def dbt(self, h: History, args: list[str], dbt_vars: dict[str, str]) -> tuple[float, Path]:
        target = self.workdir / f"target-{h.dbname}"
        settings = get_settings(
            pg_dsn=self.dsn(h.dbname), dbt_target="postgres", dbt_threads=self.args.threads
        )
        started = time.perf_counter()
        res = invoke_dbt(
            PROJECT_ROOT,
            [*args, "--vars", json.dumps({"raw_schema": RAW_SCHEMA, **dbt_vars})],
            profiles_dir=self.profiles,
            target_path=target,
            env=dbt_env(settings),
        )
        elapsed = time.perf_counter() - started
        if not res.success:
            raise SystemExit(f"dbt {' '.join(args)} failed on {h.dbname}: {res.exception or 'see output'}")
        return elapsed, target / "run_results.json"

    def prepare(self, h: History) -> None:
        """Load the history, build it in full, then one untimed incremental run (warm-up)."""
        t0 = time.perf_counter()
        self.load_history(h)
        print(f"[{h.label}] {h.weeks} weeks loaded in {time.perf_counter() - t0:.1f}s: {h.rows}", flush=True)
        h.full_build_s, _ = self.dbt(h, ["build", "--full-refresh"], {})
        with psycopg.connect(self.dsn(h.dbname), autocommit=True) as conn:
            conn.execute("analyze")
        print(f"[{h.label}] full build {h.full_build_s:.1f}s", flush=True)
        print(f"[{h.label}] incremental build (warm-up) {self.incremental(h):.2f}s", flush=True)

    def incremental(self, h: History) -> float:
        """The newest week lands again; the flow's dbt build of what it changed, timed."""
        self.reload_newest_week(h.dbname)
        select = " ".join(f"source:{DBT_SOURCE}.{t}+" for t in (SQP_TABLE, PRODUCTS_TABLE, DAILY_TABLE))
        elapsed, results = self.dbt(
            h, ["build", "--select", select], {"refresh_start_date": LAST_WEEK.isoformat()}
        )
        self.last_results = results
        return elapsed

    def measure(self, histories: list[History]) -> None:
        """Timed runs alternate between the histories, so load on the machine hits both alike."""
        for attempt in range(1, self.args.repeats + 1):
            for h in histories:
                elapsed = self.incremental(h)
                h.runs_s.append(elapsed)
                for node in read_run_results(self.last_results)[1]:
                    h.node_s.setdefault(node["unique_id"], []).append(node["execution_time_s"] or 0.0)
                print(f"[{h.label}] incremental build (run {attempt}) {elapsed:.2f}s", flush=True)


def report(small: History, large: History) -> float:
    ratio = large.median_s / small.median_s
    print()
    print(f"{'':34} {small.label:>10} {large.label:>10}")
    print(f"{'weeks of history':34} {small.weeks:>10} {large.weeks:>10}")
    print(f"{'raw SQP rows':34} {small.rows[SQP_TABLE]:>10} {large.rows[SQP_TABLE]:>10}")
    print(f"{'full build (s)':34} {small.full_build_s:>10.1f} {large.full_build_s:>10.1f}")
    print(f"{'incremental build, median (s)':34} {small.median_s:>10.2f} {large.median_s:>10.2f}")
    node_s = [sum(statistics.median(v) for v in h.node_s.values()) for h in (small, large)]
    print(f"{'  of which node execution (s)':34} {node_s[0]:>10.2f} {node_s[1]:>10.2f}")
    print("\nslowest nodes in the incremental build (median s):")
    slowest = sorted(large.node_s, key=lambda k: -statistics.median(large.node_s[k]))[:8]
    for uid in slowest:
        s = statistics.median(small.node_s.get(uid, [0.0]))
        lg = statistics.median(large.node_s[uid])
        print(f"  {uid[:70]:70} {s:6.2f} {lg:6.2f}")
    print()
    return ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weeks", type=int, default=52, help="N: weeks of history of the small run")
    p.add_argument("--factor", type=int, default=10, help="the large run has factor x N weeks")
    p.add_argument("--rows-per-week", type=int, default=2000, help="SQP rows per week")
    p.add_argument("--asins", type=int, default=100)
    p.add_argument("--daily-rows-per-day", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="timed incremental runs per history")
    p.add_argument("--threads", type=int, default=4, help="dbt threads (the flow's default)")
    args = p.parse_args(argv)

    # Stopped with SIGTERM, still stop the Postgres started here and remove its folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="sqp-bench-"))
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    try:
        pg.start()
        small = History("N", "bench_small", args.weeks)
        large = History(f"{args.factor}N", "bench_large", args.weeks * args.factor)
        bench = Bench(args, pg, workdir)
        for h in (small, large):
            bench.prepare(h)
        bench.measure([small, large])
        ratio = report(small, large)
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
