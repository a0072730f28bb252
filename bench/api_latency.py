"""API latency: p50/p99 of /status and /history at 10k runs of history, 16 concurrent clients.

A throwaway embedded Postgres (own port and temp folder) gets the control schema, the
registry from config/tables.yml, and `--runs` runs of history made by set-based SQL: per run
one row per table, a slice per table, a dbt invocation with a node per model. Then the real
`refresh api --workers 2` (uvicorn) serves it; `--clients` clients (one asyncio loop), each with
its own keep-alive connection and a `read` bearer token (so every request also checks the token),
send `--requests` requests per endpoint each, after a warm-up. Goal: p99 < 50 ms. The API
caches status for REFRESH_API_STATUS_CACHE_SECONDS (default 2; set 0 in the environment to
measure computing it on every request).

    .venv/bin/python bench/api_latency.py [--runs 10000] [--clients 16] [--requests 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import psycopg

from flows.control import tokens
from flows.core.settings import get_settings
from flows.demo.local_stack import EmbeddedPostgres, free_port
from flows.orchestration import run_plan

ENDPOINTS = {
    "status": "/api/refresh/status?hours=24",
    "history (runs, page 1)": "/api/refresh/history?page_size=20",
    "history (one table, page 50)": "/api/refresh/history?table=products&page=50&page_size=20",
    # The same page by keyset: the cursor of page 49 (filled in at start).
    "history (one table, cursor)": "/api/refresh/history?table=products&page_size=20&cursor={cursor}",
}
MODELS = [f"model_{i}" for i in range(12)]


def fill(dsn: str, schema: str, runs: int) -> None:
    """`runs` hourly runs back from now: 90% success, 7% warning, 3% failed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            insert into {schema}.refresh_runs (run_id, status, trigger, started_at, finished_at,
                tables_planned, tables_succeeded, tables_failed, rows_read, rows_inserted, message)
            select md5('run' || i)::uuid,
                   case when i % 33 = 0 then 'failed' when i % 14 = 0 then 'warning' else 'success' end,
                   'schedule', now() - i * interval '1 hour' - interval '10 minutes',
                   now() - i * interval '1 hour' - interval '10 minutes'
                       + (60 + i % 120) * interval '1 second',
                   3, 3, 0, 30000, 30000, '3 table(s) refreshed'
            from generate_series(1, {runs}) i
            """
        )
        conn.execute(
            f"""
            insert into {schema}.table_refreshes (run_id, table_name, mode, status, write_strategy,
                slices_planned, slices_done, rows_read, rows_inserted, rows_per_second, started_at,
                finished_at, error)
            select r.run_id, t.name, 'live',
                   case when r.status = 'failed' then 'failed' else 'success' end, 'slice_replace',
                   1, 1, 10000, 10000, 500, r.started_at, r.finished_at,
                   case when r.status = 'failed' then 'boom' end
            from {schema}.refresh_runs r
            cross join unnest(array['search_query_performance', 'daily_search_terms', 'products']) t(name)
            """
        )
        conn.execute(
            f"""
            insert into {schema}.slice_refreshes (run_id, table_name, slice_start, slice_end, status,
                rows_read, rows_inserted, started_at, finished_at)
            select run_id, table_name, date_trunc('week', started_at), date_trunc('week', started_at)
                   + interval '7 days', 'success', rows_read, rows_inserted, started_at, finished_at
            from {schema}.table_refreshes
            """
        )
        conn.execute(
            f"""
            insert into {schema}.dbt_invocations (invocation_id, run_id, command, success, started_at,
                finished_at, nodes_total)
            select run_id::text, run_id, 'build', true, finished_at - interval '30 seconds', finished_at,
                   {len(MODELS)}
            from {schema}.refresh_runs
            """
        )
        conn.execute(
            f"""
            insert into {schema}.dbt_node_runs (invocation_id, unique_id, resource_type, name, status,
                started_at, finished_at, execution_time_s, rows_affected)
            select i.invocation_id, 'model.sqp_refresh.' || m, 'model', m, 'success', i.started_at,
                   i.finished_at, 1.5, 1000
            from {schema}.dbt_invocations i cross join unnest(%s::text[]) m
            """,
            (MODELS,),
        )
        # As autovacuum leaves a history that has settled: statistics and visibility maps.
        conn.execute(f"vacuum analyze {schema}.refresh_runs, {schema}.table_refreshes")


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/openapi.json", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("refresh api exited; see its log")
        time.sleep(0.3)
    raise SystemExit("refresh api did not start in 120 s")


async def _client(host: str, port: int, request: bytes, requests: int, start: asyncio.Event) -> list[float]:
    """One keep-alive connection sending `requests` GETs one after the other; their latencies."""
    reader, writer = await asyncio.open_connection(host, port)
    latencies = []
    try:
        await start.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise SystemExit(f"{status} {body[:200]!r}")
    finally:
        writer.close()
    return latencies


def hammer(url: str, path: str, token: str, clients: int, requests: int) -> tuple[list[float], float]:
    """Latencies (ms) of clients x requests GETs, all clients at once; and the wall time.

    Each client is one keep-alive HTTP/1.1 connection; one asyncio loop in this process drives
    them all. (Client threads measured themselves: with 16 of them in one process, a response
    that had arrived waited for the client's GIL before its clock stopped, and httpx took more
    CPU per request than the cached status endpoint itself, on the server's two cores.)"""
    host, _, port = url.removeprefix("http://").partition(":")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()

    async def run() -> tuple[list[float], float]:
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(_client(host, int(port), request, requests, start)) for _ in range(clients)
        ]
        await asyncio.sleep(0.1)  # every connection open before the clock starts
        t0 = time.perf_counter()
        start.set()
        results = await asyncio.gather(*tasks)
        return [ms for r in results for ms in r], time.perf_counter() - t0

    return asyncio.run(run())


def cpu_s(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of these processes (those gone since count 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def postgres_processes(datadir: Path) -> list[psutil.Process]:
    """The postmaster serving `datadir` and its backends."""
    for p in psutil.process_iter(["cmdline"]):
        if str(datadir) in " ".join(p.info["cmdline"] or []):
            return [p, *p.children(recursive=True)]
    return []


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=100, help="per client and endpoint")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="sqp-api-bench-"))
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    proc: subprocess.Popen[bytes] | None = None
    try:
        pg.start()
        settings = get_settings(pg_dsn=pg.dsn, state_dir=workdir)
        run_plan.prepare(settings)
        t0 = time.monotonic()
        fill(pg.dsn, settings.control_schema, args.runs)
        print(f"history: {args.runs} runs filled in {time.monotonic() - t0:.1f}s")
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            token, _ = tokens.create(conn, settings.control_schema, "bench", ["read"])
        port = free_port()
        env = {
            **os.environ,
            "REFRESH_PG_DSN": pg.dsn,
            "REFRESH_STATE_DIR": str(workdir),
            "PREFECT_HOME": str(workdir / "prefect"),
        }
        log = (workdir / "api.log").open("wb")
        cmd = [sys.executable, "-m", "flows.cli", "api", "--no-stack", "--port", str(port)]
        proc = subprocess.Popen(
            [*cmd, "--workers", str(args.workers)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc)
        print(
            f"{args.clients} clients x {args.requests} requests per endpoint, "
            f"{args.workers} uvicorn worker(s)"
        )
        failed = False
        page_49 = httpx.get(
            f"{url}/api/refresh/history?table=products&page=49&page_size=20",
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        for name, template in ENDPOINTS.items():
            path = template.format(cursor=page_49["next_cursor"])
            hammer(url, path, token, args.clients, 20)  # warm-up: connections, plans, caches
            api_procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            pg_procs = postgres_processes(pg.data_dir)
            api0, pg0 = cpu_s(api_procs), cpu_s(pg_procs)
            lat, wall = hammer(url, path, token, args.clients, args.requests)
            api_ms = 1000 * (cpu_s(api_procs) - api0) / len(lat)
            pg_ms = 1000 * (cpu_s(pg_procs) - pg0) / len(lat)
            p50, p99 = pct(lat, 0.50), pct(lat, 0.99)
            failed |= p99 >= 50
            print(
                f"{name:<30} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  max {max(lat):6.1f} ms  "
                f"{len(lat) / wall:6.0f} req/s  CPU per request: API {api_ms:.2f} ms, Postgres {pg_ms:.2f} ms"
            )
        print(f"load average {os.getloadavg()[0]:.1f}; goal p99 < 50 ms: " + ("MISSED" if failed else "met"))
        return 1 if failed else 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
