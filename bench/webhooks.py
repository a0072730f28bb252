"""Webhook delivery: throughput to a local receiver, and the wall time a run pays for it.

1. N events (default 1,000) in the outbox, one endpoint, a receiver on 127.0.0.1 that
   verifies every signature with `standardwebhooks` and answers 200 at once: deliveries/s of
   one `dispatch` pass.
2. The added wall time per refresh: a run row finished through `run_record.finish_run` (its
   event written with it) and the flow's `dispatch_after_run`, timed, when the receiver
   answers in 100 ms; then when it hangs (5 s) or is down. Target: < 1 s per run.

Starts its own embedded Postgres (or uses REFRESH_PG_DSN) in a temp folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from flows.control import outbox
from flows.control.runs import start_run
from flows.core.db import migrate
from flows.core.settings import PROJECT_ROOT, Settings, get_settings
from flows.demo.local_stack import EmbeddedPostgres, free_port
from flows.notify import endpoints, webhook_delivery
from flows.orchestration import run_record

sys.path.insert(0, str(PROJECT_ROOT))
from tests.webhook_receiver import Receiver


def _clear_endpoints(settings: Settings) -> None:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for ep in outbox.list_endpoints(conn, settings.control_schema):
            outbox.remove_endpoint(conn, settings.control_schema, ep["id"], "bench")


def throughput(settings: Settings, events: int) -> None:
    with Receiver() as rx:
        ep = endpoints.add_endpoint(settings, rx.url, ["table.failed"])
        rx.secrets = [ep.secret]
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            for i in range(events):
                outbox.emit(conn, settings.control_schema, "table.failed", {"i": i, "error": "x" * 200})
        t0 = time.perf_counter()
        result = webhook_delivery.dispatch(settings, deadline_s=600)
        wall = time.perf_counter() - t0
        verified = sum(1 for r in rx.received if r.verified_with)
    _clear_endpoints(settings)
    print(
        f"throughput: {result.succeeded}/{events} delivered in {wall:.2f} s = {result.succeeded / wall:.0f} "
        f"deliveries/s (all {verified} verified by the receiver)"
    )


def run_cost(settings: Settings, label: str, runs: int, delay_s: float | None) -> None:
    """delay_s None: the receiver is down (nothing listens on the port)."""
    with Receiver() as rx:
        rx.delay_s = delay_s or 0.0
        url = rx.url if delay_s is not None else f"http://127.0.0.1:{free_port()}/down"
        ep = endpoints.add_endpoint(settings, url, ["refresh.completed"])
        rx.secrets = [ep.secret]
        walls = []
        delivered = 0
        for _ in range(runs):
            with psycopg.connect(settings.dsn(), autocommit=True) as conn:
                run = start_run(conn, settings.control_schema, flow_run_id=None, trigger="bench", params={})
                run_record.finish_run(
                    conn, settings, run, runs.RunSummary(str(run.run_id), "success", "bench")
                )
            t0 = time.perf_counter()
            result = webhook_delivery.dispatch_after_run(settings)
            walls.append(time.perf_counter() - t0)
            delivered += result.succeeded if result else 0
        assert all(r.verified_with for r in rx.received)
    _clear_endpoints(settings)
    print(
        f"added wall time per run, receiver {label}: median {statistics.median(walls) * 1000:.0f} ms, "
        f"max {max(walls) * 1000:.0f} ms over {runs} runs; delivered during the run: {delivered}/{runs}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    pg = None
    try:
        env = {"REFRESH_STATE_DIR": str(state), "REFRESH_WEBHOOK_ALLOW_PRIVATE": "true"}
        if not os.environ.get("REFRESH_PG_DSN"):
            pg = EmbeddedPostgres(state / "pg", free_port())
            pg.start()
            env["REFRESH_PG_DSN"] = pg.dsn
        os.environ.update(env)
        settings = get_settings()
        migrate(settings)
        deadline = settings.webhook_run_deadline_s
        print(f"machine: {os.cpu_count()} cores; run deadline {deadline} s")
        throughput(settings, args.events)
        run_cost(settings, "answering in 100 ms", args.runs, 0.1)
        run_cost(settings, "hanging 5 s", args.runs, 5.0)
        run_cost(settings, "down", args.runs, None)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
