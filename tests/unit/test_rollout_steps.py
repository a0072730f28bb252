"""The run-level effects of validation and of the shadow comparison (pure logic)."""

from __future__ import annotations

from uuid import uuid4

from flows.core.settings import get_settings
from flows.engine.table_refresh import TableOutcome
from flows.engine.transform import shadow_build_args
from flows.engine.validation.after_refresh import AfterRefresh
from flows.engine.validation.shadow_match import compared_columns
from flows.orchestration import run_report, run_summary


def test_a_difference_makes_a_successful_run_a_warning_naming_table_and_period() -> None:
    ok = AfterRefresh("products", periods=1)
    bad = AfterRefresh("sqp", periods=3, failed=["2026-11-16"])
    assert run_summary.with_validation("success", "2 table(s) refreshed", [ok]) == (
        "success",
        "2 table(s) refreshed",
    )
    status, message = run_summary.with_validation("success", "2 table(s) refreshed", [ok, bad])
    assert status == "warning" and "sqp differs from BigQuery in 2026-11-16" in message
    assert run_summary.with_validation("failed", "x", [bad])[0] == "failed"
    down = AfterRefresh("sqp", error="BigQuery unreachable")
    assert run_summary.with_validation("success", "x", [down])[0] == "warning"


def test_summary_and_report_carry_validation_and_shadow() -> None:
    checks = [AfterRefresh("sqp", periods=2, failed=["2026-11-16"], bytes_processed=10, duration_s=1.5)]
    shadow = {
        "tables": ["sqp"],
        "dbt_success": True,
        "dbt_failed": [],
        "periods_compared": 9,
        "differs": ["weekly_summary 2026-11-16"],
    }
    outcomes = [TableOutcome("sqp", "success", "live", slices_done=2)]
    summary = run_summary.summarise(uuid4(), outcomes, None, False, validation=checks, shadow=shadow)
    assert summary.status == "warning"
    assert "shadow differs from live in weekly_summary 2026-11-16" in summary.message
    assert summary.to_dict()["validation"][0]["bytes_processed"] == 10
    report = run_report.markdown_report(summary, get_settings())
    assert "**sqp**: 2 period(s), differ: 2026-11-16 (1.5s, 10 B)" in report
    assert "9 model period(s) compared with live, differ: weekly_summary 2026-11-16" in report


def test_shadow_build_reads_raw_shadow_and_writes_suffixed_schemas() -> None:
    args = shadow_build_args(get_settings(), "2026-10-01")
    assert args[:5] == ["build", "--select", "source:sqp+", "--exclude", "source:refresh_control+"]
    assert '"schema_suffix": "_shadow"' in args[-1] and '"refresh_start_date": "2026-10-01"' in args[-1]


def test_model_columns_compared_without_lineage_and_by_type() -> None:
    cols = compared_columns(
        {"week_start": "date", "n": "bigint", "share": "numeric(18,6)", "q": "text", "_run_id": "uuid"}
    )
    assert [(c.name, c.kind, c.scale) for c in cols] == [
        ("week_start", "DATE", 9),
        ("n", "INT64", 9),
        ("share", "NUMERIC", 6),
        ("q", "STRING", 9),
    ]


def test_a_shadow_problem_is_named_but_never_fails_the_run() -> None:
    broken = {
        "tables": ["sqp"],
        "dbt_success": False,
        "dbt_failed": [],
        "periods_compared": 0,
        "differs": [],
        "error": "relation does not exist",
    }
    assert run_summary.with_shadow("1 table(s) refreshed", broken) == (
        "1 table(s) refreshed | shadow comparison could not run: relation does not exist"
    )
    summary = run_summary.summarise(
        uuid4(), [TableOutcome("sqp", "success", "shadow")], None, False, shadow=broken
    )
    assert summary.status == "success"
