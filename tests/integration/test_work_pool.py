"""Whole runs on a work pool: a real process work pool, a real worker.

`prefect deploy` of the project's prefect.yaml onto a process pool, `prefect worker start`
polling it, and a flow run of `daily-refresh` created through the API: the worker runs it in
a process of its own, whose slices go to a Dask LocalCluster of 2 worker processes
(REFRESH_SLICE_WORKERS=2 in the worker's environment), and Postgres ends equal to the source.

Own Prefect server, BigQuery dataset, raw and control schema and registry (two tables no dbt
model reads, so dbt does not run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from flows.core.settings import PROJECT_ROOT, Settings, get_settings
from flows.demo.sample_data import SampleSpec, generate
from flows.engine.bigquery import make_clients
from flows.engine.validation.source_match import validate
from tests.prefect_server import prefect_server, stop, tail

SPEC = SampleSpec(sqp_rows=200, weeks=6, asins=8, daily_rows=420)
POOL = "sqp-pool-test"
DEPLOYMENT = "daily-refresh/daily-pool-test"
TABLES_FILE = """
tables:
  pool_products:
    source_table: products
    priority: 90
    write_strategy: full_replace
    custom_params: {key_columns: [ASIN]}
  pool_daily:
    source_table: daily_search_terms
    priority: 80
    cursor_column: date
    slice_size: week
    lookback_days: 7
    custom_params: {key_columns: [date, asin, search_query]}
"""
TABLES = ["pool_products", "pool_daily"]


@pytest.fixture(scope="module")
def pool_env(stack: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server, this module's settings and the sample data in BigQuery: the
    environment the worker (and so the flow run) gets."""
    home = Path(tempfile.mkdtemp(prefix="sqp-pool-prefect-"))
    tables_file = tmp_path_factory.mktemp("pool") / "tables.yml"
    tables_file.write_text(TABLES_FILE)
    with prefect_server(home) as url:
        env = {
            **os.environ,
            "PREFECT_API_URL": url,
            "REFRESH_BQ_DATASET": "pool",
            "REFRESH_RAW_SCHEMA": "raw_pool",
            "REFRESH_CONTROL_SCHEMA": "pool_control",
            "REFRESH_TABLES_FILE": str(tables_file),
        }
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            clients = make_clients(get_settings())
            try:
                generate(clients, SPEC)
            finally:
                clients.close()
            yield env


@pytest.fixture(scope="module")
def worker(pool_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The pool, prefect.yaml deployed onto it, and `prefect worker start` polling it; the
    worker's pid. The worker is stopped (and its process group killed) at the end."""
    doc = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    for d in doc["deployments"]:
        d["name"] = f"{d['name']}-pool-test"
        d["work_pool"] = {**d["work_pool"], "name": POOL}
    prefect_file = tmp_path_factory.mktemp("pool") / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    cli = [sys.executable, "-m", "prefect"]
    for cmd in (
        [*cli, "work-pool", "create", POOL, "--type", "process", "--overwrite"],
        [*cli, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
    ):
        done = subprocess.run(
            cmd, cwd=PROJECT_ROOT, env=pool_env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = prefect_file.parent / "worker.log"
    env = {
        **pool_env,
        "SQP_REFRESH_DIR": str(PROJECT_ROOT),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # The flow run's slices: a LocalCluster of 2 worker processes (flows.engine.scale_out).
        "REFRESH_SLICE_WORKERS": "2",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cli, "worker", "start", "--pool", POOL, "--limit", "1", "--name", "pool-test"],
            cwd=tempfile.gettempdir(),  # the run finds the project through SQP_REFRESH_DIR
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc.pid
    finally:
        stop(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a flow run or cluster left behind by a failed test
        print(tail(log, 30))


def _run(parameters: dict[str, Any], timeout: float = 420) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(DEPLOYMENT, parameters=parameters, timeout=timeout, poll_interval=2)


def test_a_process_worker_runs_the_deployment_to_exact_data(pool_env: dict[str, str], worker: int) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # This process's Prefect settings may already be pinned to another test's server: the
    # flow run is created on (and its logs read from) this module's server.
    with temporary_settings(updates={PREFECT_API_URL: pool_env["PREFECT_API_URL"]}):
        _check_a_pool_run(worker)


def _check_a_pool_run(worker: int) -> None:
    run = _run({"tables": TABLES, "trigger": "pool"})
    assert run.state.is_completed(), (run.state, run.state.message)
    settings = get_settings()
    assert isinstance(settings, Settings) and settings.control_schema == "pool_control"
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "select run_id, status, pid from pool_control.refresh_runs where flow_run_id = %s", (run.id,)
        ).fetchone()
        assert row is not None, "no refresh run carries the flow run's id"
        run_id, status, pid = row
        # run by the worker, in a process of its own
        assert status == "success" and pid not in (os.getpid(), worker), (status, pid)
        per_table = dict(
            conn.execute(
                "select table_name, slices_done from pool_control.table_refreshes where run_id = %s "
                "and status = 'success'",
                (run_id,),
            ).fetchall()
        )
    assert per_table["pool_daily"] > 1 and per_table["pool_products"] == 1, per_table
    clients = make_clients(settings)
    try:
        results = validate(settings, clients, TABLES)
    finally:
        clients.close()
    assert {t: [r.period_start for r in rs if not r.passed] for t, rs in results.items()} == {
        "pool_products": [],
        "pool_daily": [],
    }
    assert sum(r.postgres.rows for r in results["pool_daily"]) == SPEC.daily_rows
    assert sum(r.postgres.rows for r in results["pool_products"]) == SPEC.asins
    # the flow run's slices went through Dask: the run's log says where
    deadline = time.monotonic() + 30
    while "slices run on Dask" not in _logs(run.id):
        assert time.monotonic() < deadline, _logs(run.id)[-2000:]
        time.sleep(1)


def _logs(flow_run_id: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return "\n".join(entry.message for entry in asyncio.run(read()))
