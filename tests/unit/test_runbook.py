"""The runbook's plain steps, the deployments' schedule checks, CLI parsing, history filters."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import yaml

from flows.control.dbt_audit import DbtOutcome
from flows.control.history import HistoryQuery
from flows.core.errors import ConfigError
from flows.core.planning import Window
from flows.core.settings import PROJECT_ROOT, get_settings
from flows.core.table_config import TableConfig
from flows.engine.table_refresh import TableOutcome
from flows.orchestration import dbt_selection, run_params, run_plan, run_report, run_summary

TODAY = date(2026, 11, 28)
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


def cfg(name: str, **kw: Any) -> TableConfig:
    base: dict[str, Any] = {"table_name": name, "source_table": name, "write_strategy": "full_replace"}
    return TableConfig(**{**base, **kw})


def outcome(name: str, status: str = "success", mode: str = "live", **kw: Any) -> TableOutcome:
    return TableOutcome(name, status, mode, **kw)


# --- parameters -----------------------------------------------------------------------------


def test_params_are_normalised() -> None:
    p = run_params.validate_params([" products ", "sqp", "products", ""], today=TODAY)
    assert p.tables == ["products", "sqp"]
    assert run_params.validate_params([], today=TODAY).tables is None
    assert p.to_json()["tables"] == ["products", "sqp"]
    assert (
        run_params.validate_params(start_date=date(2026, 1, 1), today=TODAY).to_json()["start_date"]
        == "2026-01-01"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_date": date(2026, 3, 1), "end_date": date(2026, 2, 1)}, "is after end_date"),
        ({"end_date": date(2026, 12, 25)}, "in the future"),
        ({"full_refresh": True, "start_date": date(2026, 1, 1)}, "full_refresh"),
        ({"tables": ["Robert'); drop table x;--"]}, "invalid table name"),
        ({"trigger": " "}, "trigger"),
    ],
)
def test_bad_params_say_what_to_change(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid run parameters") as err:
        run_params.validate_params(**kwargs, today=TODAY)
    assert message in str(err.value)


def test_tomorrow_is_allowed_for_callers_east_of_utc() -> None:
    assert run_params.validate_params(end_date=TODAY + timedelta(days=1), today=TODAY).end_date


# --- choosing tables ----------------------------------------------------------------------------


def test_unknown_tables_are_named_with_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown table\(s\) nope; registered: a, b"):
        run_plan.select_tables([cfg("a"), cfg("b")], ["a", "nope"], force=False, now=NOW)


def test_due_tables_by_priority_and_disabled_ones_only_with_force() -> None:
    configs = [
        cfg("low", priority=60),
        cfg("high", priority=100),
        cfg("later", next_refresh_at=NOW + timedelta(hours=3)),
        cfg("off", enabled=False),
    ]
    assert [c.table_name for c in run_plan.select_tables(configs, None, force=False, now=NOW)] == [
        "high",
        "low",
    ]
    assert [c.table_name for c in run_plan.select_tables(configs, None, force=True, now=NOW)] == [
        "high",
        "later",
        "low",
    ]
    # named tables run whether due or not; a disabled one needs force
    assert [c.table_name for c in run_plan.select_tables(configs, ["later"], force=False, now=NOW)] == [
        "later"
    ]
    with pytest.raises(ConfigError, match="disabled"):
        run_plan.select_tables(configs, ["off"], force=False, now=NOW)
    assert run_plan.select_tables(configs, ["off"], force=True, now=NOW)[0].table_name == "off"


# --- dbt ------------------------------------------------------------------------------------------


def test_dbt_sources_are_read_from_the_project() -> None:
    assert {"search_query_performance", "products", "daily_search_terms"} <= dbt_selection.dbt_sources(
        PROJECT_ROOT
    )


def test_dbt_builds_downstream_of_changed_live_sources_only() -> None:
    sources = {"sqp", "products", "quiet", "catalog"}
    window = Window(date(2026, 9, 7), date(2026, 11, 22), "lookback")
    outcomes = [
        outcome("sqp", window=window, changed_slices=[(date(2026, 11, 16), date(2026, 11, 23))]),
        outcome("products", replaced_whole=True),
        outcome("quiet", window=window),  # every slice unchanged: nothing applied
        outcome("catalog"),  # a whole table found unchanged, no rebuild owed
        outcome("shadowed", mode="shadow"),
        outcome("not_modelled"),
        outcome("broken", status="failed", error="boom"),
    ]
    args = dbt_selection.dbt_build_args(outcomes, False, sources)
    assert args is not None
    assert args[:3] == ["build", "--select", "source:sqp.sqp+ source:sqp.products+ source:refresh_control+"]
    # a slice without known days counts as every day of its range
    assert args[3:] == ["--vars", json.dumps({"refresh_days": [f"2026-11-{d}" for d in range(16, 23)]})]
    full = dbt_selection.dbt_build_args(outcomes, True, sources)
    assert full is not None and full[-1] == "--full-refresh" and full[4] == "{}"
    assert (
        dbt_selection.dbt_build_args(
            [outcome("not_modelled"), outcome("sqp", status="planned")], False, sources
        )
        is None
    )
    assert dbt_selection.dbt_build_args([outcome("quiet", window=window)], False, sources) is None
    assert dbt_selection.dbt_build_args([outcome("catalog")], False, sources) is None
    # Only a whole table changed: no var (each model's lookback from its newest period).
    only_whole = dbt_selection.dbt_build_args([outcome("products", replaced_whole=True)], False, sources)
    assert only_whole is not None and only_whole[2:5] == [
        "source:sqp.products+ source:refresh_control+",
        "--vars",
        "{}",
    ]


def test_dbt_rebuilds_the_changed_weeks_or_from_a_requested_start() -> None:
    sources = {"sqp", "daily"}
    outcomes = [
        outcome(
            "sqp",
            window=Window(date(2026, 9, 7), date(2026, 11, 22), "lookback"),
            changed_slices=[(date(2026, 11, 16), date(2026, 11, 23)), (date(2026, 9, 7), date(2026, 9, 14))],
        ),
        outcome(
            "daily",
            window=Window(date(2026, 11, 8), date(2026, 11, 22), "lookback"),
            changed_slices=[(date(2026, 11, 16), date(2026, 11, 23))],
        ),
    ]
    args = dbt_selection.dbt_build_args(outcomes, False, sources)
    assert args is not None and json.loads(args[4]) == {
        "refresh_days": [f"2026-09-{d:02d}" for d in range(7, 14)] + [f"2026-11-{d}" for d in range(16, 23)]
    }
    backfill = dbt_selection.dbt_build_args(outcomes, False, sources, explicit_range=True)
    assert backfill is not None and json.loads(backfill[4]) == {"refresh_start_date": "2026-09-07"}
    # only a full_replace table changed: the models' own lookback
    only_products = dbt_selection.dbt_build_args(
        [outcome("products", replaced_whole=True)], False, {"products"}
    )
    assert only_products is not None and only_products[4] == "{}"


def test_a_daily_run_rebuilds_the_days_its_slices_changed() -> None:
    crossing = (date(2026, 11, 30), date(2026, 12, 7))  # ISO week across a month end
    owed = (date(2026, 11, 2), date(2026, 11, 9))  # applied by an earlier run: no days
    unchanged = (date(2026, 11, 23), date(2026, 11, 30))  # applied, no row deleted or inserted
    window = Window(date(2026, 11, 2), date(2026, 12, 6), "lookback")
    sqp = outcome(
        "sqp",
        window=window,
        changed_slices=[crossing, unchanged, owed],
        slice_days={crossing: [date(2026, 12, 6)], unchanged: []},
    )
    other = outcome(
        "daily", window=window, changed_slices=[crossing], slice_days={crossing: [date(2026, 12, 1)]}
    )
    vars_ = dbt_selection.rebuild_vars([sqp, other], explicit_range=False)
    assert vars_ == {"refresh_days": [f"2026-11-0{d}" for d in range(2, 9)] + ["2026-12-01", "2026-12-06"]}
    # the owed slice gone: only the changed days, none from the quiet slice
    sqp.changed_slices = [crossing, unchanged]
    assert dbt_selection.rebuild_vars([sqp], explicit_range=False) == {"refresh_days": ["2026-12-06"]}
    sqp.changed_slices = [unchanged]
    assert dbt_selection.rebuild_vars([sqp], explicit_range=False) == {"refresh_days": []}
    assert dbt_selection.rebuild_vars([sqp], explicit_range=True) == {"refresh_start_date": "2026-11-02"}


# --- status ---------------------------------------------------------------------------------------


def dbt(success: bool, invocation_id: str | None = "inv") -> DbtOutcome:
    return DbtOutcome(invocation_id, success, "build", [], message=None if success else "dbt failed: x")


def test_run_status_says_why() -> None:
    ok, bad = outcome("a"), outcome("b", status="failed", error="not found")
    assert run_summary.overall_status([ok], dbt(True)) == ("success", "1 table(s) refreshed")
    assert run_summary.overall_status([], None) == ("success", "no table was due")
    status, message = run_summary.overall_status([ok, bad], dbt(True))
    assert status == "warning" and message == "1 of 2 table(s) refreshed; b: not found"
    assert run_summary.overall_status([bad], None)[0] == "failed"
    assert run_summary.overall_status([ok], dbt(False))[0] == "warning"
    assert run_summary.overall_status([ok], dbt(False, invocation_id=None))[0] == "failed"
    assert run_summary.overall_status([outcome("a", status="planned")], None)[1].startswith("dry run")


def test_markdown_report_shows_tables_slices_rows_durations_status_and_docs() -> None:
    settings = get_settings()
    outcomes = [
        outcome(
            "sqp",
            rows_read=4000,
            rows_inserted=4000,
            slices_done=12,
            duration_s=3.456,
            window=Window(date(2026, 9, 7), date(2026, 11, 22), "first load"),
        ),
        outcome("broken", status="failed", error="broken: not found: check the table name"),
    ]
    summary = run_summary.summarise(
        "00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
        outcomes,
        dbt(True),
        False,
        flow_run_id="00000000-0000-0000-0000-000000000002",  # type: ignore[arg-type]
        duration_s=12.5,
    )
    report = run_report.markdown_report(summary, settings)
    assert report.startswith("# Refresh WARNING")
    assert "| sqp | success | live | 2026-09-07..2026-11-22 | 12 | 0 | 4000 | 4000 | 0 | 3.46 |" in report
    assert "- **broken**: broken: not found: check the table name" in report
    assert "2 table(s), 12 slice(s), 4000 rows inserted in 12.5s" in report
    assert str(settings.dbt_project_dir / "target" / "index.html") in report and "refresh docs" in report
    assert "00000000-0000-0000-0000-000000000002" in report


def node(unique_id: str, status: str, message: str | None = None) -> Any:
    resource_type = unique_id.split(".")[0]
    return {
        "unique_id": unique_id,
        "resource_type": resource_type,
        "name": unique_id.split(".")[2],
        "relation": None,
        "status": status,
        "started_at": None,
        "finished_at": None,
        "execution_time_s": None,
        "rows_affected": None,
        "message": message,
        "failures": None,
    }


def failed_build() -> DbtOutcome:
    """dbt build where a test failed and the models downstream of it were skipped."""
    nodes = [
        node("model.sqp.stg_sqp", "success"),
        node(
            "test.sqp.funnel_non_increasing_int_funnel.abc",
            "fail",
            "Got 3 results, configured to fail if != 0\nsee target/compiled/...",
        ),
        node("model.sqp.asin_performance", "skipped"),
        node("model.sqp.monthly_summary", "skipped"),
    ]
    return DbtOutcome("inv-1", False, "build", [], nodes, message="funnel: fail (Got 3 results)")


def test_a_dbt_failure_names_the_failed_and_skipped_nodes_and_the_first_error() -> None:
    status, message = run_summary.overall_status([outcome("sqp")], failed_build())
    assert status == "warning"
    assert "1 failed (funnel_non_increasing_int_funnel)" in message
    assert "2 skipped, stale until the next build (asin_performance, monthly_summary)" in message
    assert message.endswith(
        "first error: funnel_non_increasing_int_funnel: Got 3 results, configured to fail if != 0"
    )
    summary = run_summary.summarise(
        "00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
        [outcome("sqp")],
        failed_build(),
        False,
    )
    assert summary.status == "warning" and summary.message == message
    assert summary.dbt_failed == ["test.sqp.funnel_non_increasing_int_funnel.abc"]
    assert summary.dbt_skipped == ["model.sqp.asin_performance", "model.sqp.monthly_summary"]
    assert summary.first_error == (
        "funnel_non_increasing_int_funnel: Got 3 results, configured to fail if != 0"
    )
    report = run_report.markdown_report(summary, get_settings())
    assert "1 failed, 2 skipped" in report
    assert "Failed: `test.sqp.funnel_non_increasing_int_funnel.abc`" in report
    assert "`model.sqp.asin_performance`, `model.sqp.monthly_summary`" in report
    assert "First error: funnel_non_increasing_int_funnel: Got 3 results" in report


def test_long_lists_of_skipped_nodes_are_cut_in_the_message_only() -> None:
    many = [node(f"model.sqp.m{i:03}", "skipped") for i in range(30)]
    dbt_run = DbtOutcome("inv", False, "build", [], [node("model.sqp.root", "error", "boom"), *many])
    summary = run_summary.summarise("00000000-0000-0000-0000-000000000001", [], dbt_run, False)  # type: ignore[arg-type]
    assert "and 20 more" in summary.message and len(summary.dbt_skipped) == 30
    assert summary.first_error == "root: boom"


def test_the_first_error_of_a_run_without_dbt_is_a_tables() -> None:
    bad = outcome("b", status="failed", error="b: not found\nmore detail")
    assert run_summary.first_error([outcome("a"), bad], None) == "b: b: not found"
    assert run_summary.first_error([outcome("a")], dbt(True)) is None


def test_dry_run_report_lists_the_plan() -> None:
    plan = [{"slice": f"s{i}", "estimated_rows": 10 * i, "estimated_bytes": i} for i in range(20)]
    summary = run_summary.summarise(
        "00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
        [outcome("sqp", status="planned", plan=plan)],
        None,
        True,
    )
    report = run_report.markdown_report(summary, get_settings())
    assert "(dry run)" in report and "s1 10 rows ~1 B" in report and "and 8 more" in report


# --- deployments, prefect.yaml, CLI parsing, history filters ----------------------------------------


def test_bad_schedules_fail_with_the_setting_to_fix() -> None:
    from flows.orchestration.deployments import validate_schedule

    validate_schedule("0 2 * * *", "Europe/Berlin")
    with pytest.raises(ConfigError, match="REFRESH_SCHEDULE_CRON"):
        validate_schedule("every day", "UTC")
    with pytest.raises(ConfigError, match="REFRESH_SCHEDULE_TIMEZONE"):
        validate_schedule("0 2 * * *", "Mars/Olympus")


def test_prefect_yaml_matches_the_served_deployments() -> None:
    from flows.core.settings import Settings
    from flows.orchestration.deployments import (
        DAILY_DEPLOYMENT,
        FULL_DBT_TEST_CRON,
        HOUSEKEEPING_CONCURRENCY,
        HOUSEKEEPING_CRON,
        HOUSEKEEPING_DEPLOYMENT,
        REFRESH_CONCURRENCY,
    )

    doc = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    daily, hourly = doc["deployments"]
    assert (daily["name"], hourly["name"]) == (DAILY_DEPLOYMENT, HOUSEKEEPING_DEPLOYMENT)
    assert daily["schedules"][0]["cron"] == Settings.model_fields["schedule_cron"].default
    assert daily["schedules"][0]["timezone"] == Settings.model_fields["schedule_timezone"].default
    assert hourly["schedules"][0]["cron"] == HOUSEKEEPING_CRON
    assert hourly["schedules"][1] == {
        "cron": FULL_DBT_TEST_CRON,
        "timezone": "UTC",
        "parameters": {"full_dbt_test": True},
    }
    for d, limit in ((daily, REFRESH_CONCURRENCY), (hourly, HOUSEKEEPING_CONCURRENCY)):
        assert d["concurrency_limit"] == {
            "limit": limit.limit,
            "collision_strategy": limit.collision_strategy.value,
        }


def test_config_assignments_are_parsed() -> None:
    from flows.core.table_config import parse_assignments

    changes = parse_assignments(
        ["mode=live", "priority = high", 'custom_params={"a": 1}', "cursor_column=null"]
    )
    assert changes == {"mode": "live", "priority": "high", "custom_params": {"a": 1}, "cursor_column": None}
    assert parse_assignments(["next_refresh_at=now"])["next_refresh_at"].tzinfo is UTC
    with pytest.raises(ConfigError, match="field=value"):
        parse_assignments(["priority"])
    with pytest.raises(ConfigError, match="JSON object"):
        parse_assignments(["custom_params={oops"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": "warning", "table": "sqp"}, "unknown status"),
        ({"status": "exploded"}, "unknown status"),
        ({"since": date(2026, 2, 1), "until": date(2026, 1, 1)}, "after until"),
        ({"page": 0}, "page starts at 1"),
        ({"page_size": 101}, "between 1 and 100"),
    ],
)
def test_history_filters_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HistoryQuery(**kwargs)


def test_markdown_report_links_back_to_the_dashboard() -> None:
    summary = run_summary.summarise(
        "00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
        [outcome("sqp")],
        dbt(True),
        False,
        duration_s=1.0,
    )
    served = get_settings(api_host="127.0.0.9", api_port=8123)
    assert "[http://127.0.0.9:8123/](http://127.0.0.9:8123/)" in run_report.markdown_report(summary, served)
    public = get_settings(dashboard_url="https://refresh.example.org/")
    report = run_report.markdown_report(summary, public)
    assert "[https://refresh.example.org/](https://refresh.example.org/)" in report
