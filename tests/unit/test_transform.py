"""flows.engine.transform without a database: reading dbt's run_results.json and building dbt args."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.core.settings import get_settings
from flows.engine.transform import (
    REFRESH_DAYS_ENV,
    REFRESH_WEEKS_ENV,
    DbtOutcome,
    read_run_results,
    vars_to_env,
    with_project_vars,
)

INVOCATION = "8d5f3f1e-0000-4000-8000-000000000001"


def _timing(start: str, mid: str, end: str) -> list[dict[str, str]]:
    return [
        {"name": "compile", "started_at": start, "completed_at": mid},
        {"name": "execute", "started_at": mid, "completed_at": end},
    ]


def _model(i: int, message: str, rows: int) -> dict[str, Any]:
    return {
        "unique_id": f"model.sqp_refresh.model_{i}",
        "status": "success",
        "timing": _timing("2026-11-28T02:00:00.000001Z", "2026-11-28T02:00:00.5Z", "2026-11-28T02:00:01.25Z"),
        "execution_time": 1.25,
        "adapter_response": {"_message": message, "code": message.split()[0], "rows_affected": rows},
        "message": message,
        "failures": None,
        "relation_name": f'"postgres"."marts"."model_{i}"',
    }


def _test(i: int, failures: int) -> dict[str, Any]:
    return {
        "unique_id": f"test.sqp_refresh.not_null_model_{i}_asin.{i:010x}",
        "status": "fail" if failures else "pass",
        "timing": _timing("2026-11-28T02:00:02Z", "2026-11-28T02:00:02.1Z", "2026-11-28T02:00:02.2Z"),
        "execution_time": 0.2,
        # dbt runs `select count(*) ...` for a test: Postgres reports the one row it returned.
        "adapter_response": {"_message": "SELECT 1", "code": "SELECT", "rows_affected": 1},
        "message": f"Got {failures} results, configured to fail if != 0" if failures else None,
        "failures": failures,
        "relation_name": None,
    }


def _write(tmp_path: Path, results: list[dict[str, Any]]) -> Path:
    path = tmp_path / "run_results.json"
    doc = {
        "metadata": {"dbt_version": "1.11.0", "invocation_id": INVOCATION},
        "results": results,
        "elapsed_time": 12.5,
        "args": {"which": "build"},
    }
    path.write_text(json.dumps(doc))
    return path


def test_model_view_test_and_skipped_nodes(tmp_path: Path) -> None:
    skipped = {
        "unique_id": "model.sqp_refresh.yearly_summary",
        "status": "skipped",
        "timing": [],
        "execution_time": 0,
        "adapter_response": {},
        "message": None,
        "failures": None,
        "relation_name": '"postgres"."summaries"."yearly_summary"',
    }
    errored = {**_model(3, "INSERT 0 0", 0), "status": "error", "message": "Database Error\n  boom"}
    path = _write(
        tmp_path,
        [
            _model(1, "INSERT 0 3332", 3332),
            _model(2, "CREATE VIEW", -1),
            _test(4, 0),
            _test(5, 7),
            skipped,
            errored,
            {**_model(6, "SELECT 240", 240), "unique_id": "source.sqp_refresh.sqp.products"},
        ],
    )
    invocation_id, nodes = read_run_results(path)
    assert invocation_id == INVOCATION
    by_id = {n["unique_id"]: n for n in nodes}

    inserted = by_id["model.sqp_refresh.model_1"]
    assert inserted["resource_type"] == "model" and inserted["name"] == "model_1"
    assert inserted["rows_affected"] == 3332
    assert inserted["relation"] == '"postgres"."marts"."model_1"'
    assert inserted["started_at"] == datetime(2026, 11, 28, 2, 0, 0, 1, tzinfo=UTC)
    assert inserted["finished_at"] == datetime(2026, 11, 28, 2, 0, 1, 250000, tzinfo=UTC)
    assert inserted["execution_time_s"] == 1.25 and inserted["status"] == "success"

    # Postgres reports no row count for DDL (-1), and a test's count is not rows affected.
    assert by_id["model.sqp_refresh.model_2"]["rows_affected"] is None
    passed = by_id["test.sqp_refresh.not_null_model_4_asin.0000000004"]
    failed = by_id["test.sqp_refresh.not_null_model_5_asin.0000000005"]
    assert passed["name"] == "not_null_model_4_asin" and passed["resource_type"] == "test"
    assert (passed["rows_affected"], passed["failures"], passed["status"]) == (None, 0, "pass")
    assert (failed["failures"], failed["status"]) == (7, "fail")
    assert failed["message"] == "Got 7 results, configured to fail if != 0"

    assert by_id["model.sqp_refresh.yearly_summary"]["started_at"] is None
    assert by_id["model.sqp_refresh.yearly_summary"]["status"] == "skipped"
    assert by_id["source.sqp_refresh.sqp.products"]["name"] == "sqp.products"

    outcome = DbtOutcome(invocation_id, False, "build", ["build"], nodes)
    assert [n["unique_id"] for n in outcome.failed_nodes] == [
        "test.sqp_refresh.not_null_model_5_asin.0000000005",
        "model.sqp_refresh.model_3",
    ]
    assert outcome.models_built == 2  # model_1 and model_2; skipped and errored ones do not count


def test_thousands_of_nodes_are_read_quickly(tmp_path: Path) -> None:
    results = [_model(i, f"INSERT 0 {i}", i) if i % 3 else _test(i, i % 2) for i in range(6000)]
    path = _write(tmp_path, results)
    started = time.perf_counter()
    invocation_id, nodes = read_run_results(path)
    elapsed = time.perf_counter() - started
    assert invocation_id == INVOCATION and len(nodes) == 6000
    assert len({n["unique_id"] for n in nodes}) == 6000
    assert sum(1 for n in nodes if n["rows_affected"] is not None) == 4000
    assert elapsed < 2.0, f"reading 6,000 node results took {elapsed:.2f}s"


def test_raw_schema_var_is_merged_into_the_flow_args() -> None:
    settings = get_settings(raw_schema="raw_elsewhere", control_schema="control_elsewhere")
    args = ["build", "--select", "source:sqp.products+", "--vars", '{"refresh_start_date": "2026-10-11"}']
    merged = with_project_vars(settings, args)
    assert merged[:4] == args[:4]
    assert json.loads(merged[4]) == {
        "raw_schema": "raw_elsewhere",
        "control_schema": "control_elsewhere",
        "refresh_start_date": "2026-10-11",
    }
    assert args[4] == '{"refresh_start_date": "2026-10-11"}'  # the caller's list is left alone

    assert with_project_vars(settings, ["parse"]) == [
        "parse",
        "--vars",
        '{"raw_schema": "raw_elsewhere", "control_schema": "control_elsewhere"}',
    ]
    # a var given by the caller wins
    given = with_project_vars(settings, ["run", "--vars", '{"raw_schema": "raw_bench"}'])
    assert json.loads(given[2]) == {"raw_schema": "raw_bench", "control_schema": "control_elsewhere"}


def test_prefect_dbt_still_runs_node_tasks_in_threads_named_after_run_task() -> None:
    # run_dbt finds the node-task threads it waits for by the name Python gives a thread after
    # its target: a prefect-dbt that renames or drops that target must fail here, not bring
    # back event errors and aborts at `refresh run`'s exit.
    import inspect

    from prefect_dbt.core._tracker import NodeTaskTracker

    from flows.engine.transform import NODE_TASK_THREAD_SUFFIX

    source = inspect.getsource(NodeTaskTracker.run_task_in_thread)
    assert "def run_task():" in source and "threading.Thread(target=run_task)" in source
    assert NODE_TASK_THREAD_SUFFIX == "(run_task)"


def test_wait_for_node_tasks_joins_the_threads_started_since_and_counts_stuck_ones() -> None:
    import threading

    from flows.engine.transform import node_task_threads, wait_for_node_tasks

    release = threading.Event()

    def run_task() -> None:  # named as prefect-dbt's node-task thread target
        release.wait(0.5)

    def other() -> None:
        release.wait(5)

    before = node_task_threads()
    unrelated = threading.Thread(target=other)
    slow = threading.Thread(target=run_task)
    unrelated.start()
    slow.start()
    t0 = time.monotonic()
    assert wait_for_node_tasks(before, timeout_s=30) == 0  # waited for run_task, not for `other`
    assert not slow.is_alive() and unrelated.is_alive()
    assert 0.3 < time.monotonic() - t0 < 4

    stuck = threading.Thread(target=run_task)
    stuck.start()
    t0 = time.monotonic()
    assert wait_for_node_tasks(before, timeout_s=0.1) == 1  # gives up at the timeout
    assert time.monotonic() - t0 < 0.4
    release.set()
    stuck.join()
    unrelated.join()


def test_vars_to_env_moves_only_the_weeks_and_keeps_the_vars_stable() -> None:
    def daily(weeks: list[str]) -> list[str]:
        args = [
            "build",
            "--select",
            "source:sqp+",
            "--vars",
            json.dumps({"refresh_weeks": weeks, "raw_schema": "raw"}),
        ]
        return args

    first, env1 = vars_to_env(daily(["2026-11-09"]))
    second, env2 = vars_to_env(daily(["2026-11-16", "2026-11-23"]))
    assert (
        first == second == ["build", "--select", "source:sqp+", "--vars", json.dumps({"raw_schema": "raw"})]
    )
    assert json.loads(env1[REFRESH_WEEKS_ENV]) == ["2026-11-09"]
    assert json.loads(env2[REFRESH_WEEKS_ENV]) == ["2026-11-16", "2026-11-23"]
    # An empty list (no week changed) is passed on, not dropped: it means "rebuild nothing".
    assert vars_to_env(daily([]))[1] == {REFRESH_WEEKS_ENV: "[]"}
    # Other vars stay vars; no --vars at all: nothing to move.
    # The flow's daily run passes days: moved to their own variable the same way.
    days = ["build", "--vars", json.dumps({"refresh_days": ["2026-12-06"], "raw_schema": "raw"})]
    assert vars_to_env(days) == (
        ["build", "--vars", json.dumps({"raw_schema": "raw"})],
        {REFRESH_DAYS_ENV: '["2026-12-06"]'},
    )
    assert vars_to_env(["build", "--vars", json.dumps({"refresh_days": []})])[1] == {REFRESH_DAYS_ENV: "[]"}
    backfill = ["build", "--vars", json.dumps({"refresh_start_date": "2026-01-05"})]
    assert vars_to_env(backfill) == (backfill, {})
    assert vars_to_env(["test"]) == (["test"], {})
