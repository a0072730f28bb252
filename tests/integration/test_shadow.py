"""Shadow mode end to end: a shadow table is loaded into raw_shadow, dbt builds every
model from it into `*_shadow` schemas, and the shadow marts and summaries are compared with the
live ones (built by the session's real refresh) with the validation checksums."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC
from typing import Any

import psycopg
import pytest

from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig
from flows.demo.sample_data import SQP_TABLE
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.orchestration import post_load_checks, run_summary
from tests.integration.test_extraction_engine import locked_run

SHADOW_SCHEMAS = ("raw_shadow", "staging_shadow", "intermediate_shadow", "marts_shadow", "summaries_shadow")


@pytest.fixture
def shadow_cfg(refreshed: dict[str, Any], settings: Settings) -> Iterator[TableConfig]:
    """The session's SQP table as if it were in shadow mode (the registry is not changed: the
    live copy and its marts stay the session's)."""
    yield TableConfig(
        table_name="search_query_performance",
        source_table=SQP_TABLE,
        cursor_column="Date",
        slice_size="week",
        mode=Mode.SHADOW,
    )
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for schema in SHADOW_SCHEMAS:
            conn.execute(f"drop schema if exists {schema} cascade")
        conn.execute(f"delete from {settings.control_schema}.checkpoints where table_name like 'shadow:%%'")


def _shadow_rows(conn: psycopg.Connection, schema: str, run_id: Any) -> list[tuple[str, Any, str]]:
    rows = conn.execute(
        f"select table_name, period_start, status from {schema}.dq_results "
        "where run_id = %s and check_name = 'shadow_match' order by 1, 2",
        (run_id,),
    ).fetchall()
    return [(t, p.astimezone(UTC).date() if p else None, s) for t, p, s in rows]


def _load_shadow(settings: Settings, clients: Any, cfg: TableConfig) -> tuple[Any, TableOutcome]:
    with locked_run(settings) as run_id:
        outcome = refresh_table(settings, clients, cfg, run_id, RefreshOptions(full_refresh=True))
    assert outcome.status == "success" and outcome.slices_done > 0, outcome.error
    return run_id, outcome


def test_shadow_build_matches_live_then_a_difference_names_model_and_period(
    settings: Settings, clients: Any, shadow_cfg: TableConfig, pg: psycopg.Connection
) -> None:
    run_id, outcome = _load_shadow(settings, clients, shadow_cfg)
    shadow = post_load_checks.shadow_step(settings, [outcome], run_id, full_refresh=True)
    assert shadow is not None and shadow["dbt_success"], shadow
    assert shadow["differs"] == [] and shadow["periods_compared"] > 0
    present = {
        r[0]
        for r in pg.execute(
            "select nspname from pg_namespace where nspname = any(%s)", (list(SHADOW_SCHEMAS),)
        ).fetchall()
    }
    assert present == set(SHADOW_SCHEMAS)
    # The stand-in views over live raw tables (products ...) are gone after the build.
    assert pg.execute("select count(*) from pg_views where schemaname = 'raw_shadow'").fetchone() == (0,)
    rows = _shadow_rows(pg, settings.control_schema, run_id)
    models = {t for t, _, _ in rows}
    assert {"weekly_summary", "monthly_summary", "search_query_performance", "asin_performance"} <= models
    assert {s for _, _, s in rows} == {"pass"}
    weekly = sorted(p for t, p, _ in rows if t == "weekly_summary")
    assert (
        len(weekly)
        == pg.execute("select count(distinct period_start) from summaries.weekly_summary").fetchone()[0]
    )  # type: ignore[index]

    # One purchase more in raw_shadow's newest week: its mart week and summary periods differ.
    newest = pg.execute("select max(date) from raw_shadow.search_query_performance").fetchone()[0]  # type: ignore[index]
    pg.execute(
        "update raw_shadow.search_query_performance set asin_purchase_count = asin_purchase_count + 1 "
        "where ctid = (select ctid from raw_shadow.search_query_performance where date = %s limit 1)",
        (newest,),
    )
    shadow = post_load_checks.shadow_step(settings, [outcome], run_id, full_refresh=True)
    assert shadow is not None
    week = newest.astimezone(UTC).date()
    assert f"weekly_summary {week}" in shadow["differs"], shadow["differs"]
    failed = [(t, p) for t, p, s in _shadow_rows(pg, settings.control_schema, run_id) if s == "fail"]
    assert ("weekly_summary", week) in failed
    assert ("monthly_summary", week.replace(day=1)) in failed
    # Periods and models the change does not reach still pass.
    assert all(p is None or p >= week.replace(month=1, day=1) for _, p in failed), failed
    events = pg.execute(
        f"select table_name from {settings.control_schema}.events where event = 'validation.failed' "
        "and run_id = %s and payload->>'check' = 'shadow_match'",
        (run_id,),
    ).fetchall()
    assert ("weekly_summary",) in events
    message = run_summary.with_shadow("1 table(s) refreshed", shadow)
    assert "shadow differs from live in " in message and "weekly_summary" in message


def test_no_shadow_table_loaded_means_no_shadow_build(settings: Settings) -> None:
    live = TableOutcome("search_query_performance", "success", "live", slices_done=3)
    idle = TableOutcome("daily_search_terms", "success", "shadow", slices_done=0)
    assert post_load_checks.shadow_step(settings, [live, idle], None, full_refresh=False) is None  # type: ignore[arg-type]
