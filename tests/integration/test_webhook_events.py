"""Validation and rollout events go through the webhook outbox: `validation.failed`,
`table.cutover` and `table.rollback` reach a subscribed receiver that verifies them with
`standardwebhooks`. In their own control schema, so no other test's endpoints or runs mix in."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import psycopg
import pytest

from flows.control import registry, rollout
from flows.control.fingerprints import Fingerprint
from flows.core.db import migrate
from flows.core.settings import Settings, get_settings
from flows.core.table_config import Mode, TableConfig
from flows.engine.validation import source_match, summary_checks
from flows.engine.validation.source_match import PeriodResult
from flows.notify import endpoints, webhook_delivery
from tests.webhook_receiver import Receiver

CONTROL = "wv_control"
TABLE = "wv_sqp"
SUBSCRIBED = ["validation.failed", "table.cutover", "table.rollback"]


@pytest.fixture
def wv(refreshed: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Its own control schema (after the session's refresh, which uses the default one)."""
    monkeypatch.setenv("REFRESH_CONTROL_SCHEMA", CONTROL)
    monkeypatch.setenv("REFRESH_WEBHOOK_ALLOW_PRIVATE", "true")
    s = get_settings()
    migrate(s)
    with psycopg.connect(s.dsn(), autocommit=True) as conn:
        conn.execute(
            f"truncate {CONTROL}.webhook_endpoints, {CONTROL}.events, {CONTROL}.mode_changes, "
            f"{CONTROL}.dq_results cascade"
        )
        conn.execute(f"delete from {CONTROL}.refresh_config")
        registry.sync_from_file(
            conn,
            CONTROL,
            [TableConfig(table_name=TABLE, source_table="sqp", cursor_column="Date", mode=Mode.DRY_RUN)],
        )
    yield s


def _results(passed: bool) -> list[PeriodResult]:
    other = Fingerprint(10, 1) if passed else Fingerprint(9, 1)
    return [
        PeriodResult(
            TABLE,
            date(2026, 11, 2),
            date(2026, 11, 9),
            Fingerprint(10, 1),
            Fingerprint(10, 1),
            "raw_shadow",
            [],
        ),
        PeriodResult(
            TABLE, date(2026, 11, 9), date(2026, 11, 16), Fingerprint(10, 1), other, "raw_shadow", []
        ),
    ]


def test_validation_and_rollout_events_reach_a_verifying_receiver(wv: Settings) -> None:
    with Receiver() as rx:
        ep = endpoints.add_endpoint(wv, rx.url, SUBSCRIBED, "data quality")
        rx.secrets = [ep.secret]
        with psycopg.connect(wv.dsn(), autocommit=True) as conn:
            rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana", reason="start shadow")
            cfg = registry.get(conn, CONTROL, TABLE)
            source_match.record_results(conn, CONTROL, cfg, _results(passed=True))  # no event
            source_match.record_results(conn, CONTROL, cfg, _results(passed=False))
            rollout.rollback(conn, CONTROL, TABLE, who="bob", reason="numbers look off")
        result = webhook_delivery.dispatch(wv, deadline_s=20)
    assert result.to_dict() == {"attempted": 3, "succeeded": 3, "failed": 0, "exhausted": 0, "disabled": 0}
    assert all(r.verified_with == [ep.secret] for r in rx.received), "every delivery verifies"
    by_type = {r.json["type"]: r.json["data"] for r in rx.received}
    assert set(by_type) == set(SUBSCRIBED)
    failed = by_type["validation.failed"]
    assert (failed["table"], failed["schema"], failed["periods_failed"], failed["periods_checked"]) == (
        TABLE,
        "raw_shadow",
        ["2026-11-09"],
        2,
    )
    assert by_type["table.cutover"] | {"table": TABLE} == {
        "table": TABLE,
        "from_mode": "dry_run",
        "to_mode": "shadow",
        "forced": False,
        "by": "ana",
        "reason": "start shadow",
    }
    assert (by_type["table.rollback"]["from_mode"], by_type["table.rollback"]["to_mode"]) == (
        "shadow",
        "dry_run",
    )


def test_summary_check_finding_a_difference_delivers_validation_failed(
    wv: Settings, refreshed: dict[str, Any]
) -> None:
    """A real check of the dbt summaries against raw on the session's data, with one raw count
    changed in a transaction that is rolled back (the shared data stays as it was)."""
    with psycopg.connect(wv.dsn()) as conn:
        conn.execute(
            "update raw.search_query_performance set asin_purchase_count = asin_purchase_count + 1 "
            "where ctid = (select min(ctid) from raw.search_query_performance)"
        )
        failed = [c for c in summary_checks.check_summaries(conn, wv.raw_schema) if not c.passed]
        conn.rollback()
    assert failed
    with Receiver() as rx:
        ep = endpoints.add_endpoint(wv, rx.url, ["validation.failed"])
        rx.secrets = [ep.secret]
        with psycopg.connect(wv.dsn(), autocommit=True) as conn:
            summary_checks.record_summary_checks(conn, CONTROL, failed)
        assert webhook_delivery.dispatch(wv, deadline_s=20).succeeded == len(summary_checks.SUMMARY_PERIODS)
    assert all(r.verified_with == [ep.secret] for r in rx.received)
    assert sorted(r.json["data"]["table"] for r in rx.received) == sorted(
        summary_checks.SUMMARY_PERIODS.values()
    )
    assert {r.json["type"] for r in rx.received} == {"validation.failed"}
