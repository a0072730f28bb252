"""The API's guards against a real refresh's control schema: what a trigger token may not do,
mode changes only by cutover, malformed cursors, and (with a real uvicorn) body limits, the
client address and Host header, and the security headers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from flows.control import registry, runs
from flows.registry import Mode, TableConfig
from flows.settings import Settings
from tests.integration.api.support import auth, control_fingerprint
from tests.integration.api.test_api import problem

DISABLED = "api_guard_disabled"


@pytest.fixture
def disabled_table(settings: Settings) -> Iterator[str]:
    """A disabled table of its own in the session's registry, removed after."""
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        registry.sync_from_file(
            conn,
            settings.control_schema,
            [
                TableConfig(
                    table_name=DISABLED,
                    source_table="products",
                    write_strategy="full_replace",
                    mode=Mode.LIVE,
                    enabled=False,
                )
            ],
        )
    try:
        yield DISABLED
    finally:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            conn.execute(
                f"delete from {settings.control_schema}.refresh_config where table_name = %s", (DISABLED,)
            )


def test_a_trigger_token_cannot_force_a_disabled_table_or_past_the_rate_limit(
    client: TestClient, api_tokens: dict[str, str], settings: Settings, disabled_table: str
) -> None:
    trigger, admin = auth(api_tokens["trigger"]), auth(api_tokens["admin"])
    unchanged = control_fingerprint(settings)
    body = {"tables": [disabled_table], "force": True}
    refused = problem(client.post("/api/refresh/trigger", json=body, headers=trigger), 403)
    assert disabled_table in refused["detail"] and "admin" in refused["detail"]
    # products was refreshed by the session's run less than an hour ago: force does not lift
    # the rate limit for a trigger token
    limited = client.post("/api/refresh/trigger", json={"tables": ["products"], "force": True}, headers=trigger)
    assert "admin token" in problem(limited, 429)["detail"]
    assert control_fingerprint(settings) == unchanged
    # an admin token passes both checks: it gets as far as the refresh lock (held here)
    with runs.refresh_lock(settings):
        unchanged = control_fingerprint(settings)
        for tables in ([disabled_table], ["products"]):
            problem(client.post("/api/refresh/trigger", json={"tables": tables, "force": True}, headers=admin), 409)
        assert control_fingerprint(settings) == unchanged


def test_a_trigger_plans_at_most_the_configured_number_of_slices(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    h = auth(api_tokens["trigger"])
    unchanged = control_fingerprint(settings)
    # a weekly table from year 1: ~105k slices
    body = {"tables": ["search_query_performance"], "force": True, "start_date": "0001-01-01"}
    err = problem(client.post("/api/refresh/trigger", json=body, headers=h), 422)
    assert "REFRESH_API_MAX_SLICES (2000)" in err["detail"] and "search_query_performance" in err["detail"]
    assert err["errors"][0]["field"] == "start_date"
    start = (datetime.now(UTC) - timedelta(weeks=30)).date().isoformat()
    with TestClient(create_app_with(settings, api_max_slices=50)) as small:
        err = problem(
            small.post("/api/refresh/trigger", json={"force": True, "start_date": start, "dry_run": True}, headers=h),
            422,
        )
        assert "REFRESH_API_MAX_SLICES (50)" in err["detail"], err
    assert control_fingerprint(settings) == unchanged
    # within the cap the request goes on to the next check (the lock, held here)
    with runs.refresh_lock(settings):
        ok = {"tables": ["search_query_performance"], "force": True, "start_date": start, "dry_run": True}
        problem(client.post("/api/refresh/trigger", json=ok, headers=h), 409)


def create_app_with(settings: Settings, **changes: object) -> object:
    from flows.api.app import create_app

    return create_app(settings.model_copy(update={"api_anonymous_read": False, **changes}))


def test_a_mode_changes_only_by_cutover_or_rollback(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    admin = auth(api_tokens["admin"])
    unchanged = control_fingerprint(settings)
    for mode in ("live", "shadow", "dry_run", "disabled", None):
        err = problem(client.put("/api/refresh/config/products", json={"mode": mode}, headers=admin), 422)
        assert err["errors"][0]["field"] == "mode" and "cutover" in err["detail"], err
    assert control_fingerprint(settings) == unchanged
    schema = client.get("/api/openapi.json").json()["components"]["schemas"]["ConfigChanges"]
    assert "mode" not in schema["properties"]


@pytest.mark.parametrize(
    "cursor",
    [
        "WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgMV0",  # ["2024-01-01T00:00:00+00:00", 1]
        "WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwge31d",  # [..., {}]
        "e30",  # {}
    ],
)
def test_a_crafted_cursor_is_a_problem_not_a_500(
    client: TestClient, api_tokens: dict[str, str], cursor: str
) -> None:
    for path in ("/api/refresh/runs", "/api/refresh/history"):
        err = problem(client.get(f"{path}?cursor={cursor}", headers=auth(api_tokens["read"])), 422)
        assert err["errors"][0]["field"] == "cursor" and "next_cursor" in err["detail"]
