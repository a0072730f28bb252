"""Orchestration against a real local Prefect server started by this module.

The module works in its own BigQuery dataset, raw schema, control schema and table registry
(two tables that no dbt model reads), so nothing here touches the data the dbt tests check
and dbt never runs. Deployments are served by `refresh serve` in a subprocess, which runs
the flow runs created through the Prefect API; other runs call the flow in this process,
reporting to the same server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
import yaml
from psycopg import sql
from typer.testing import CliRunner

from flows.core.settings import PROJECT_ROOT, Settings, get_settings
from flows.demo.sample_data import PRODUCTS_TABLE, SampleSpec, generate
from flows.engine.bigquery import make_clients
from tests.integration.conftest import pg_scalar
from tests.prefect_server import prefect_server, stop, tail

ORCH_SPEC = SampleSpec(sqp_rows=200, weeks=4, asins=8, daily_rows=280)
DAILY = "daily-refresh/daily"
HOUSEKEEPING = "housekeeping/hourly"
TIMEZONE = "Europe/Berlin"
TABLES_FILE = """
tables:
  orch_products:
    source_table: products
    priority: 90
    write_strategy: full_replace
  orch_daily:
    source_table: daily_search_terms
    priority: 80
    cursor_column: date
    slice_size: week
    lookback_days: 7
"""
TABLES = ["orch_products", "orch_daily"]


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """`prefect server start` on a free port with its own PREFECT_HOME; stopped at the end."""
    home = Path(tempfile.mkdtemp(prefix="sqp-prefect-"))
    # A run waiting for the deployment's concurrency slot asks again after 1 s, not 30 s.
    with prefect_server(home, PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1") as url:
        yield url


@pytest.fixture(scope="module")
def orch(stack: object, prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """This module's settings (own dataset, schemas, registry) with the sample data loaded into
    BigQuery; in-process flows report to the module's Prefect server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tables_file = tmp_path_factory.mktemp("orch") / "tables.yml"
    tables_file.write_text(TABLES_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFRESH_BQ_DATASET", "orch")
        mp.setenv("REFRESH_RAW_SCHEMA", "raw_orch")
        mp.setenv("REFRESH_CONTROL_SCHEMA", "orch_control")
        mp.setenv("REFRESH_TABLES_FILE", str(tables_file))
        mp.setenv("REFRESH_SCHEDULE_TIMEZONE", TIMEZONE)
        mp.setenv("PREFECT_API_URL", prefect_api)
        settings = get_settings()
        clients = make_clients(settings)
        try:
            generate(clients, ORCH_SPEC)
        finally:
            clients.close()
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            yield settings
            # Logs and events still queued go to this server before it stops.
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="module")
def served(orch: Settings, prefect_api: str) -> Iterator[None]:
    """`refresh serve` in a subprocess until both deployments are registered."""
    from prefect.client.orchestration import get_client

    log = orch.state_dir / "refresh-serve.log"
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--no-stack"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def registered() -> bool:
        async with get_client() as client:
            try:
                for name in (DAILY, HOUSEKEEPING):
                    await client.read_deployment_by_name(name)
            except Exception:
                return False
            return True

    try:
        deadline = time.monotonic() + 120
        while not asyncio.run(registered()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`refresh serve` did not register the deployments:\n{tail(log)}")
            time.sleep(1)
        yield
    finally:
        stop(proc, signal.SIGINT)


def _run_deployment(parameters: dict[str, Any], timeout: float = 240) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(DAILY, parameters=parameters, timeout=timeout, poll_interval=1)


def _wait_final(flow_run_id: UUID, timeout: float = 240) -> Any:
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    deadline = time.monotonic() + timeout
    while True:
        fr = asyncio.run(read())
        if fr.state is not None and fr.state.is_final():
            return fr
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {flow_run_id} still {fr.state} after {timeout}s")
        time.sleep(1)


def _state_names(flow_run_id: UUID) -> list[str]:
    from prefect.client.orchestration import get_client

    async def read() -> list[str]:
        async with get_client() as client:
            return [s.name or "" for s in await client.read_flow_run_states(flow_run_id)]

    return asyncio.run(read())


def _row_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Rows of every table in every schema of the database (data, dbt output, control)."""
    tables = conn.execute(
        """select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
             and n.nspname not like 'pg_%'"""
    ).fetchall()
    counts = {}
    for schema, table in tables:
        q = sql.SQL("select count(*) from {}").format(sql.Identifier(schema, table))
        counts[f"{schema}.{table}"] = pg_scalar(conn, q.as_string(conn))
    return counts


def _undocumented(schema: dict[str, Any]) -> list[str]:
    """Parameters of a deployment's schema without a description (the UI shows none)."""
    return [name for name, prop in schema["properties"].items() if not prop.get("description", "").strip()]


@pytest.fixture(scope="module")
def api_run(served: None, orch: Settings) -> Any:
    """A live refresh of the module's two tables, created through the Prefect API."""
    return _run_deployment({"tables": TABLES, "trigger": "api"})


# --- deployments ------------------------------------------------------------------------


def test_deployments_register_with_cron_time_zone_and_limit(served: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    async def read() -> tuple[Any, Any]:
        async with get_client() as client:
            return await client.read_deployment_by_name(DAILY), await client.read_deployment_by_name(
                HOUSEKEEPING
            )

    daily, housekeeping = asyncio.run(read())
    [schedule] = daily.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", TIMEZONE)
    assert schedule.active and schedule.parameters == {"trigger": "schedule"}
    assert daily.global_concurrency_limit.limit == 1
    assert daily.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert set(daily.parameter_openapi_schema["properties"]) == {
        "tables",
        "start_date",
        "end_date",
        "full_refresh",
        "dry_run",
        "force",
        "trigger",
    }
    assert daily.enforce_parameter_schema
    # the UI's custom-run form shows each parameter's description, with its format
    for deployment in (daily, housekeeping):
        assert not _undocumented(deployment.parameter_openapi_schema), deployment.name
    described = daily.parameter_openapi_schema["properties"]
    assert "YYYY-MM-DD" in described["start_date"]["description"]
    assert "every enabled table that is due" in described["tables"]["description"]
    schedules = {s.schedule.cron: s for s in housekeeping.schedules}
    assert set(schedules) == {"30 * * * *", "45 4 * * 0"}
    hourly, weekly = schedules["30 * * * *"], schedules["45 4 * * 0"]
    assert hourly.schedule.timezone == weekly.schedule.timezone == TIMEZONE
    assert not hourly.parameters and weekly.parameters == {"full_dbt_test": True}
    assert housekeeping.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW


def test_prefect_yaml_deploys_to_a_process_work_pool(
    orch: Settings, prefect_api: str, tmp_path: Path
) -> None:
    """`prefect deploy --all` accepts prefect.yaml (deployments renamed here so the served
    ones stay as they are)."""
    from prefect.client.orchestration import get_client

    doc = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    for d in doc["deployments"]:
        d["name"] = f"{d['name']}-pool"
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    cli = [sys.executable, "-m", "prefect"]
    for cmd in (
        [*cli, "work-pool", "create", "sqp-refresh", "--type", "process", "--overwrite"],
        [*cli, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
    ):
        done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    async def read() -> tuple[Any, Any]:
        async with get_client() as client:
            return (
                await client.read_deployment_by_name("daily-refresh/daily-pool"),
                await client.read_deployment_by_name("housekeeping/hourly-pool"),
            )

    daily, housekeeping = asyncio.run(read())
    assert not _undocumented(daily.parameter_openapi_schema)
    assert not _undocumented(housekeeping.parameter_openapi_schema)
    assert (
        daily.work_pool_name == "sqp-refresh"
        and daily.entrypoint == "flows/orchestration/daily_refresh.py:daily_refresh"
    )
    assert housekeeping.entrypoint == "flows/orchestration/housekeeping.py:housekeeping"
    [schedule] = daily.schedules
    # prefect.yaml carries the same defaults `refresh serve` reads from the settings.
    defaults = Settings.model_fields
    assert schedule.schedule.cron == defaults["schedule_cron"].default
    assert schedule.schedule.timezone == defaults["schedule_timezone"].default
    assert schedule.parameters == {"trigger": "schedule"}
    assert daily.global_concurrency_limit.limit == 1
    assert daily.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert sorted(s.schedule.cron for s in housekeeping.schedules) == ["30 * * * *", "45 4 * * 0"]
    # the worker resolves the project directory from its own environment when a run starts
    assert daily.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SQP_REFRESH_DIR }}"}}
    ]


# --- runs through the API -----------------------------------------------------------------


def test_run_through_the_api_completes_and_audit_carries_the_flow_run_id(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    assert api_run.state.is_completed(), api_run.state
    row = pg.execute(
        "select run_id, status, trigger, params from orch_control.refresh_runs where flow_run_id = %s",
        (api_run.id,),
    ).fetchone()
    assert row is not None, "no refresh_runs row carries the flow-run id"
    run_id, status, trigger, params = row
    assert (status, trigger, params["tables"]) == ("success", "api", TABLES)
    per_table = dict(
        pg.execute(
            "select table_name, rows_inserted from orch_control.table_refreshes where run_id = %s "
            "and status = 'success'",
            (run_id,),
        ).fetchall()
    )
    assert per_table == {"orch_products": ORCH_SPEC.asins, "orch_daily": ORCH_SPEC.daily_rows}
    assert pg_scalar(pg, "select count(*) from raw_orch.orch_products") == ORCH_SPEC.asins
    assert pg_scalar(pg, "select count(distinct _run_id) from raw_orch.orch_daily") == 1

    async def artifacts() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[api_run.id]))
            )

    [report] = [a for a in asyncio.run(artifacts()) if a.key == "refresh-report"]
    for text in ("SUCCESS", "orch_products", "orch_daily", "slices", "rows inserted", "seconds", "dbt docs"):
        assert text in report.data, text
    assert str(run_id) in report.data and str(api_run.id) in report.data


def test_a_manual_run_with_a_bad_date_is_refused_before_anything_runs(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    before = pg_scalar(pg, "select count(*) from orch_control.refresh_runs")
    # The API accepts the string (the schema says "format: date" but does not check it); the
    # flow's signature refuses it when the run starts, before the flow body runs.
    run = _run_deployment({"tables": TABLES, "start_date": "2026-02-30"}, timeout=120)
    assert run.state.is_failed(), run.state
    assert "start_date" in (run.state.message or ""), run.state.message
    assert pg_scalar(pg, "select count(*) from orch_control.refresh_runs") == before


def test_two_runs_triggered_together_never_refresh_at_the_same_time(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    params = {"tables": TABLES, "dry_run": True, "trigger": "api"}
    first = _run_deployment(params, timeout=0)
    second = _run_deployment(params, timeout=0)
    runs = [_wait_final(first.id), _wait_final(second.id)]

    # ENQUEUE: both complete, the second after waiting for the deployment's concurrency slot
    assert [r.state.is_completed() for r in runs] == [True, True], [r.state for r in runs]
    assert sum("AwaitingConcurrencySlot" in _state_names(r.id) for r in runs) == 1
    intervals = pg.execute(
        "select started_at, finished_at from orch_control.refresh_runs "
        "where flow_run_id = any(%s) and status = 'success' order by started_at",
        ([r.id for r in runs],),
    ).fetchall()
    assert len(intervals) == 2
    (_, first_end), (second_start, _) = intervals
    assert first_end <= second_start, f"runs overlapped: {intervals}"


def test_a_second_refresh_fails_fast_while_one_holds_the_lock(orch: Settings, pg: psycopg.Connection) -> None:
    from flows.control.runs import RefreshBusyError, refresh_lock
    from flows.orchestration.daily_refresh import daily_refresh

    before = pg_scalar(pg, "select count(*) from orch_control.refresh_runs")
    with refresh_lock(orch):
        t0 = time.monotonic()
        with pytest.raises(RefreshBusyError, match="another refresh is running"):
            daily_refresh(tables=["orch_products"], trigger="test")
        assert time.monotonic() - t0 < 60
    assert pg_scalar(pg, "select count(*) from orch_control.refresh_runs") == before


# --- what a run changes ---------------------------------------------------------------------


def test_dry_run_changes_no_row_but_its_own_audit_record(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    from flows.orchestration.daily_refresh import daily_refresh

    before = _row_counts(pg)
    assert before["raw_orch.orch_daily"] == ORCH_SPEC.daily_rows and before["orch_control.checkpoints"] > 0
    summary = daily_refresh(tables=TABLES, dry_run=True, force=True, trigger="test")
    after = _row_counts(pg)

    assert summary["status"] == "success" and summary["dry_run"]
    assert {t["status"] for t in summary["tables"]} == {"planned"}
    daily = next(t for t in summary["tables"] if t["table"] == "orch_daily")
    assert daily["plan"] and all(p["estimated_bytes"] >= 0 for p in daily["plan"])
    changed = {
        k: (before.get(k), after.get(k))
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k)
    }
    assert changed == {
        "orch_control.refresh_runs": (
            before["orch_control.refresh_runs"],
            before["orch_control.refresh_runs"] + 1,
        )
    }
    plan = pg_scalar(pg, "select plan from orch_control.refresh_runs where run_id = %s", (summary["run_id"],))
    assert {p["table"] for p in plan} == set(TABLES)


def test_permanent_errors_fail_their_table_only_without_retries(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    from flows.cli import app
    from flows.control import registry
    from flows.core.table_config import TableConfig
    from flows.orchestration.daily_refresh import daily_refresh

    broken = ["orch_missing_source", "orch_bad_cursor"]
    with psycopg.connect(orch.dsn()) as conn:
        registry.sync_from_file(
            conn,
            "orch_control",
            [
                TableConfig(
                    table_name="orch_missing_source",
                    source_table="no_such_table",
                    write_strategy="full_replace",
                ),
                TableConfig(
                    table_name="orch_bad_cursor", source_table="daily_search_terms", cursor_column="date"
                ),
            ],
        )
        registry.update(
            conn, "orch_control", "orch_bad_cursor", {"cursor_column": "no_such_column"}, who="test"
        )
    try:
        checked = CliRunner().invoke(app, ["validate", "--no-stack"])
        assert checked.exit_code == 1
        assert "no_such_table" in checked.output and "no_such_column" in checked.output

        state = daily_refresh(tables=["orch_products", *broken], trigger="test", return_state=True)
        summary = state.result()
        assert state.is_completed() and state.name == "Warning"
        assert summary["status"] == "warning", summary["message"]
        by_table = {t["table"]: t for t in summary["tables"]}
        assert by_table["orch_products"]["status"] == "success"
        # 0 when an earlier test already loaded the same rows: change detection skips it
        assert by_table["orch_products"]["rows_inserted"] in (0, ORCH_SPEC.asins)
        assert "not found" in by_table["orch_missing_source"]["error"]
        assert "no_such_column" in by_table["orch_bad_cursor"]["error"]
        assert "fix cursor_column" in by_table["orch_bad_cursor"]["error"]
        for name in broken:  # failed at once: no backoff (the first retry waits 2 s)
            assert by_table[name]["status"] == "failed" and by_table[name]["duration_s"] < 2
        status, message = pg.execute(
            "select status, message from orch_control.refresh_runs where run_id = %s", (summary["run_id"],)
        ).fetchone()  # type: ignore[misc]
        assert status == "warning" and all(name in message for name in broken)
        assert pg_scalar(pg, "select count(*) from raw_orch.orch_products") == ORCH_SPEC.asins
    finally:
        pg.execute("delete from orch_control.refresh_config where table_name = any(%s)", (broken,))


def test_transient_table_failures_retry_and_a_crash_stops_no_other_table(
    orch: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.core.table_config import TableConfig
    from flows.engine.table_refresh import RefreshOptions, TableOutcome
    from flows.orchestration import daily_refresh as module

    calls: dict[str, int] = {}

    def fake_refresh_table(
        settings: Any, clients: Any, cfg: TableConfig, run_id: Any, options: Any
    ) -> TableOutcome:
        name = cfg.table_name
        calls[name] = calls.get(name, 0) + 1
        if name == "buggy":
            raise KeyError("a bug, not a table problem")
        if name == "broken" or (name == "stuck") or (name == "flaky" and calls[name] < 3):
            transient = name != "broken"
            return TableOutcome(
                name, "failed", "live", error="503" if transient else "not found", retryable=transient
            )
        return TableOutcome(name, "success", "live", rows_inserted=1)

    monkeypatch.setattr(module, "refresh_table", fake_refresh_table)
    monkeypatch.setattr(
        module, "refresh_table_task", module.refresh_table_task.with_options(retry_delay_seconds=0)
    )
    names = ["fine", "flaky", "stuck", "broken", "buggy"]

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
    def extract_all() -> list[TableOutcome]:
        configs = [TableConfig(table_name=n, source_table=n, write_strategy="full_replace") for n in names]
        return module.extract(orch, None, configs, uuid4(), RefreshOptions())  # type: ignore[arg-type]

    outcomes = {o.table_name: o for o in extract_all()}
    assert {n: o.status for n, o in outcomes.items()} == {
        "fine": "success",
        "flaky": "success",  # third attempt
        "stuck": "failed",
        "broken": "failed",
        "buggy": "failed",
    }
    # transient: 1 try + 2 retries; permanent and bugs: never retried
    assert calls == {"fine": 1, "flaky": 3, "stuck": 3, "broken": 1, "buggy": 1}
    assert outcomes["stuck"].error == "503" and "KeyError" in (outcomes["buggy"].error or "")


# --- housekeeping ---------------------------------------------------------------------------


def test_abandoned_runs_are_marked_only_when_no_refresh_holds_the_lock(
    orch: Settings, pg: psycopg.Connection
) -> None:
    from flows.control.runs import refresh_lock
    from flows.orchestration.housekeeping import mark_abandoned_runs
    from flows.orchestration.run_plan import prepare

    prepare(orch)
    run_id = uuid4()
    pg.execute(
        "insert into orch_control.refresh_runs (run_id, status, pid, hostname) values (%s, 'running', 999999, 'gone')",
        (run_id,),
    )
    pg.execute(
        "insert into orch_control.table_refreshes (run_id, table_name, mode, status, write_strategy) "
        "values (%s, 'orch_products', 'live', 'running', 'full_replace')",
        (run_id,),
    )
    with refresh_lock(orch):  # a live refresh: its `running` row is not abandoned
        assert mark_abandoned_runs(orch) == 0
    assert (
        pg_scalar(pg, "select status from orch_control.refresh_runs where run_id = %s", (run_id,))
        == "running"
    )
    assert mark_abandoned_runs(orch) == 1
    status, message = pg.execute(
        "select status, message from orch_control.refresh_runs where run_id = %s", (run_id,)
    ).fetchone()  # type: ignore[misc]
    assert status == "abandoned" and "pid 999999 on gone" in message
    assert (
        pg_scalar(pg, "select status from orch_control.table_refreshes where run_id = %s", (run_id,))
        == "failed"
    )


def test_checkpoint_cleanup_keeps_every_tables_high_water_mark(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    from flows.orchestration.housekeeping import cleanup_checkpoints

    old = datetime.now(UTC) - timedelta(days=200)
    week = timedelta(days=7)
    first = datetime(2026, 1, 5, tzinfo=UTC)
    rows = [("hk_sliced", first + i * week, first + (i + 1) * week, old) for i in range(5)]
    rows += [
        ("hk_full", None, None, old),  # the whole table (flows.control.checkpoints)
        ("hk_recent", first, first + week, old),
        ("hk_recent", first + week, first + 2 * week, datetime.now(UTC)),
        ("hk_recent", first + 2 * week, first + 3 * week, old),
    ]
    with pg.cursor() as cur:
        cur.executemany(
            "insert into orch_control.checkpoints (table_name, slice_start, slice_end, run_id, rows_loaded, "
            "committed_at) values (%s, coalesce(%s, '-infinity'::timestamptz), "
            "coalesce(%s, 'infinity'::timestamptz), %s, 1, %s)",
            [(t, s, e, uuid4(), c) for t, s, e, c in rows],
        )
    high_water = "select max(slice_end) from orch_control.checkpoints where table_name = %s and slice_start > '0001-01-02'"
    marks = {t: pg_scalar(pg, high_water, (t,)) for t in ("hk_sliced", "hk_recent")}

    assert cleanup_checkpoints(orch, retention_days=90) == 4 + 1
    kept = pg.execute(
        "select table_name, case when isfinite(slice_start) then slice_start end from orch_control.checkpoints "
        "where table_name = any(%s) order by 1, 2",
        (["hk_sliced", "hk_full", "hk_recent"],),
    ).fetchall()
    assert [(t, s.astimezone(UTC).date().isoformat() if s else "whole table") for t, s in kept] == [
        ("hk_full", "whole table"),
        ("hk_recent", "2026-01-12"),
        ("hk_recent", "2026-01-19"),
        ("hk_sliced", "2026-02-02"),
    ]
    assert {t: pg_scalar(pg, high_water, (t,)) for t in marks} == marks
    assert (
        pg_scalar(pg, "select count(*) from orch_control.checkpoints where table_name = any(%s)", (TABLES,))
        > 0
    )


def test_audit_pruning_keeps_running_and_latest_runs(orch: Settings, pg: psycopg.Connection) -> None:
    from flows.orchestration.housekeeping import housekeeping

    long_ago = datetime.now(UTC) - timedelta(days=500)
    pruned, kept = uuid4(), uuid4()
    for run_id, table in ((pruned, "hk_audit"), (kept, "hk_only_once")):
        pg.execute(
            "insert into orch_control.refresh_runs (run_id, status, started_at, finished_at) "
            "values (%s, 'success', %s, %s)",
            (run_id, long_ago, long_ago),
        )
        pg.execute(
            "insert into orch_control.table_refreshes (run_id, table_name, mode, status, write_strategy, "
            "started_at) values (%s, %s, 'live', 'success', 'full_replace', %s)",
            (run_id, table, long_ago),
        )
    newer = uuid4()
    pg.execute("insert into orch_control.refresh_runs (run_id, status) values (%s, 'success')", (newer,))
    pg.execute(
        "insert into orch_control.table_refreshes (run_id, table_name, mode, status, write_strategy) "
        "values (%s, 'hk_audit', 'live', 'success', 'full_replace')",
        (newer,),
    )

    result = housekeeping(checkpoint_retention_days=90, audit_retention_days=365)

    assert result["audit_rows_deleted"]["refresh_runs"] == 1
    assert result["audit_rows_deleted"]["table_refreshes"] == 1
    remaining = {
        r[0]
        for r in pg.execute(
            "select run_id from orch_control.refresh_runs where run_id = any(%s)", ([pruned, kept, newer],)
        )
    }
    assert remaining == {kept, newer}


# --- the CLI --------------------------------------------------------------------------------


def test_cli_rejects_bad_parameters_with_one_line_and_changes_nothing(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    from flows.cli import app

    runner = CliRunner()
    before = _row_counts(pg)
    for args, expected in (
        (["run", "--no-stack", "--tables", "orch_products,nope"], "unknown table(s) nope"),
        (["run", "--no-stack", "--start-date", "2026-02-30"], "is not a date"),
        (
            ["backfill", "--no-stack", "--start-date", "2026-03-01", "--end-date", "2026-02-01"],
            "is after end_date",
        ),
        (["run", "--no-stack", "--full-refresh", "--start-date", "2026-01-01"], "full_refresh"),
        (["history", "--status", "exploded"], "unknown status"),
        (["history", "--page-size", "500"], "page_size"),
        (["config", "set", "orch_daily", "colour=blue"], "cannot set colour"),
        (["config", "set", "orch_daily", "lookback_days=-3"], "lookback_days"),
        (["config", "set", "orch_daily", "lookback_days"], "is not field=value"),
        (["config", "get", "nope"], "not in the registry"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[0].startswith("error: ") and expected in lines[0], (args, result.output)
        assert lines[1].startswith("hint: "), (args, result.output)
    assert _row_counts(pg) == before


def test_cli_config_history_status_and_backfill(api_run: Any, orch: Settings, pg: psycopg.Connection) -> None:
    from flows.cli import app

    runner = CliRunner(env={"COLUMNS": "250"})
    result = runner.invoke(app, ["config", "set", "orch_daily", "priority=high", "lookback_days=14"])
    assert result.exit_code == 0, result.output
    assert pg.execute(
        "select priority, lookback_days, origin from orch_control.refresh_config where table_name = 'orch_daily'"
    ).fetchone() == (90, 14, "user")
    result = runner.invoke(app, ["config", "get", "orch_daily"])
    assert result.exit_code == 0 and "lookback_days: 14" in result.output

    result = runner.invoke(
        app,
        [
            "backfill",
            "--no-stack",
            "--start-date",
            "2026-11-02",
            "--end-date",
            "2026-11-08",
            "-t",
            "orch_daily",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "refresh success" in result.output
    last = pg.execute(
        "select r.trigger, t.window_start, t.window_end, t.slices_done from orch_control.refresh_runs r "
        "join orch_control.table_refreshes t using (run_id) order by r.started_at desc limit 1"
    ).fetchone()
    assert last is not None and last[0] == "backfill" and last[3] == 1
    window = (last[1].astimezone(UTC).date().isoformat(), last[2].astimezone(UTC).date().isoformat())
    assert window == ("2026-11-02", "2026-11-08")

    result = runner.invoke(
        app, ["history", "--table", "orch_daily", "--status", "success", "--page-size", "1"]
    )
    assert result.exit_code == 0, result.output
    total = pg_scalar(
        pg,
        "select count(*) from orch_control.table_refreshes where table_name = 'orch_daily' and status = 'success'",
    )
    assert f"page 1 of {total} ({total} matching)" in result.output
    result = runner.invoke(app, ["history", "--status", "success", "--since", "2026-01-01"])
    assert result.exit_code == 0 and "api" in result.output and "backfill" in result.output

    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "refresh running now: no" in result.output and "orch_daily" in result.output

    result = runner.invoke(app, ["validate", "--no-stack"])
    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.output
    assert PRODUCTS_TABLE in result.output


def test_cli_run_ending_warning_exits_2_and_names_what_failed(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    """One table fails, the other loads: `refresh run` must not exit 0, and the summary, the
    audit row and `refresh status` say what failed and the first error line."""
    from flows.cli import app
    from flows.control import registry
    from flows.core.table_config import TableConfig

    with psycopg.connect(orch.dsn()) as conn:
        registry.sync_from_file(
            conn,
            "orch_control",
            [
                TableConfig(
                    table_name="orch_gone", source_table="no_such_table", write_strategy="full_replace"
                )
            ],
        )
    try:
        # as in CI, where COLUMNS says 80 and stdout is a pipe
        runner = CliRunner(env={"COLUMNS": "80"})
        result = runner.invoke(app, ["run", "--no-stack", "--tables", "orch_products,orch_gone"])
        assert result.exit_code == 2, result.output
        assert "refresh warning" in result.output
        rows = {
            line.split()[0]: line.split()[1:3]
            for line in result.output.splitlines()
            if line.startswith(" orch_")
        }
        assert rows == {"orch_products": ["success", "live"], "orch_gone": ["failed", "live"]}, result.output
        assert "first error: orch_gone:" in result.output and "no_such_table" in result.output
        message = pg_scalar(
            pg, "select message from orch_control.refresh_runs order by started_at desc limit 1"
        )
        assert message.startswith("1 of 2 table(s) refreshed; orch_gone: ") and "no_such_table" in message
        status = runner.invoke(app, ["status"])
        assert status.exit_code == 0, status.output
        assert "warning" in status.output and "orch_gone" in status.output
    finally:
        pg.execute("delete from orch_control.refresh_config where table_name = 'orch_gone'")


def test_a_scheduled_run_counts_the_next_due_time_from_its_scheduled_start(
    api_run: Any, orch: Settings, pg: psycopg.Connection
) -> None:
    """The flow wires Prefect's expected start of the run into the due time, not the moment
    the table's refresh ended."""
    from prefect.client.orchestration import get_client

    from flows.orchestration.daily_refresh import daily_refresh

    # Due for this run, as a table is when the schedule starts (a run refreshing a table that
    # was not due keeps its earlier due time: flows.core.planning.next_due).
    pg.execute(
        "update orch_control.refresh_config set next_refresh_at = now() where table_name = 'orch_products'"
    )
    summary = daily_refresh(tables=["orch_products"], trigger="schedule")

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_flow_run(UUID(summary["flow_run_id"]))

    expected_start = asyncio.run(read()).expected_start_time
    due = pg_scalar(
        pg, "select next_refresh_at from orch_control.refresh_config where table_name = 'orch_products'"
    )
    assert due == expected_start + timedelta(hours=24)
