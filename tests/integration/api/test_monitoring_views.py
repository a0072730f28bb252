"""The monitoring views (models/monitoring) after a real refresh: built by the refresh's own
dbt build, agreeing with what the API reports, and flagging a period whose volume drops."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from flows.core.settings import Settings
from flows.engine.transform import run_dbt
from tests.integration.api.support import auth

TABLES = {"search_query_performance", "daily_search_terms", "products"}


def rows(pg: psycopg.Connection, query: str) -> list[tuple[Any, ...]]:
    return pg.execute(query).fetchall()


def test_views_are_built_by_the_refresh_and_agree_with_the_api(
    pg: psycopg.Connection, client: TestClient, api_tokens: dict[str, str]
) -> None:
    fresh = dict(rows(pg, "select table_name, freshness from monitoring.mon_table_freshness"))
    assert fresh == dict.fromkeys(TABLES, "fresh")
    latest = rows(pg, "select table_name, mode, last_status from monitoring.mon_table_latest_status")
    assert {r[0]: (r[1], r[2]) for r in latest} == dict.fromkeys(TABLES, ("live", "success"))
    rate = dict(rows(pg, "select table_name, success_rate from monitoring.mon_success_rate_7d"))
    assert set(rate) == TABLES and all(float(v) == 1 for v in rate.values())
    trend = rows(pg, "select table_name, refreshes, p50_duration_s from monitoring.mon_table_duration_trend")
    assert {r[0] for r in trend} == TABLES and all(r[2] > 0 for r in trend)
    models = {r[0] for r in rows(pg, "select model_name from monitoring.mon_dbt_model_duration_trend")}
    assert {"weekly_summary", "yearly_summary"} <= models
    # the API applies the same freshness rule
    status = client.get("/api/refresh/status", headers=auth(api_tokens["read"])).json()
    assert {t["table"]: t["freshness"] for t in status["tables"]} == fresh


def test_volume_drop_is_flagged_against_the_previous_periods(
    pg: psycopg.Connection, settings: Settings
) -> None:
    schema = settings.control_schema
    start = datetime(2026, 1, 5, tzinfo=UTC)
    counts = [1000, 1100, 900, 1000, 700, 300]  # -30% is within the 50% threshold, -65% is not
    run_id = "00000000-0000-0000-0000-000000000001"
    try:
        with pg.cursor() as cur:
            cur.executemany(
                f"insert into {schema}.checkpoints (table_name, slice_start, slice_end, run_id, rows_loaded) "
                "values ('zz_volume', %s, %s, %s, %s)",
                [
                    (start + timedelta(weeks=i), start + timedelta(weeks=i + 1), run_id, n)
                    for i, n in enumerate(counts)
                ],
            )
        flagged = rows(
            pg,
            "select rows_loaded, volume_drop from monitoring.mon_table_volume_by_period "
            "where table_name = 'zz_volume' order by period_start",
        )
        assert flagged == [(n, n == 300) for n in counts]
        # the threshold is a dbt var: at 20% the -30% week is flagged as well
        outcome = run_dbt(
            settings,
            ["run", "--select", "mon_table_volume_by_period", "--vars", '{"volume_drop_threshold": 0.2}'],
        )
        assert outcome.success, outcome.message
        stricter = rows(
            pg,
            "select rows_loaded from monitoring.mon_table_volume_by_period "
            "where table_name = 'zz_volume' and volume_drop order by period_start",
        )
        assert [r[0] for r in stricter] == [700, 300]
    finally:
        pg.execute(f"delete from {schema}.checkpoints where table_name = 'zz_volume'")
        run_dbt(settings, ["run", "--select", "mon_table_volume_by_period"])
