"""The dbt layer against raw, per summary period (issue 12), on the session's refreshed data."""

from __future__ import annotations

from typing import Any

import psycopg

from flows.core.settings import Settings
from flows.engine.validation import summary_checks


def test_every_summary_period_matches_raw_and_a_changed_raw_count_is_found(
    refreshed: dict[str, Any], settings: Settings
) -> None:
    assert refreshed["status"] == "success"
    # One transaction, rolled back: the shared session data stays as it was.
    with psycopg.connect(settings.dsn()) as conn:
        checks = summary_checks.check_summaries(conn, settings.raw_schema)
        assert {c.summary for c in checks} == set(summary_checks.SUMMARY_PERIODS.values())
        assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]
        assert sum(c.raw[-1] for c in checks if c.summary == "yearly_summary") > 0

        week = conn.execute(
            "update raw.search_query_performance set asin_purchase_count = asin_purchase_count + 1 "
            "where ctid = (select min(ctid) from raw.search_query_performance) "
            "returning (date at time zone 'UTC')::date"
        ).fetchone()
        assert week is not None
        failed = [c for c in summary_checks.check_summaries(conn, settings.raw_schema) if not c.passed]
        assert sorted(c.summary for c in failed) == sorted(summary_checks.SUMMARY_PERIODS.values())
        weekly = next(c for c in failed if c.summary == "weekly_summary")
        assert weekly.period_start == week[0]
        assert weekly.raw[-1] == weekly.summary_sums[-1] + 1 and weekly.raw[:3] == weekly.summary_sums[:3]

        summary_checks.record_summary_checks(conn, settings.control_schema, failed)
        recorded = conn.execute(
            f"select table_name, status from {settings.control_schema}.dq_results "
            "where check_name = 'matches_raw' order by table_name"
        ).fetchall()
        events = conn.execute(
            f"select count(*) from {settings.control_schema}.events where event = 'validation.failed'"
        ).fetchone()
        conn.rollback()
    assert recorded == sorted((name, "fail") for name in summary_checks.SUMMARY_PERIODS.values())
    assert events is not None and events[0] >= 4
