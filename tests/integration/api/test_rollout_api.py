"""Cutover and rollback over HTTP: admin scope, 409 naming why, the same audit as the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from flows.control import registry
from flows.control.fingerprints import Fingerprint
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig
from flows.engine.validation import source_match
from flows.engine.validation.source_match import PeriodResult
from tests.integration.api.support import auth
from tests.integration.api.test_api import problem

TABLE = "api_rollout_t"


@pytest.fixture
def table(settings: Settings) -> Iterator[str]:
    """A disabled dry_run table of its own in the session's registry, removed after."""
    schema = settings.control_schema
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        registry.sync_from_file(
            conn,
            schema,
            [
                TableConfig(
                    table_name=TABLE,
                    source_table="products",
                    write_strategy="full_replace",
                    mode=Mode.DRY_RUN,
                    enabled=False,
                )
            ],
        )
    try:
        yield TABLE
    finally:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            for t in ("mode_changes", "dq_results", "refresh_config"):
                conn.execute(f"delete from {schema}.{t} where table_name = %s", (TABLE,))
            conn.execute(f"delete from {schema}.events where table_name = %s", (TABLE,))


def _validate(settings: Settings, passed: bool) -> None:
    other = Fingerprint(10, 1) if passed else Fingerprint(9, 1)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        cfg = registry.get(conn, settings.control_schema, TABLE)
        result = PeriodResult(TABLE, date(2026, 11, 2), None, Fingerprint(10, 1), other, "raw_shadow", [])
        source_match.record_results(conn, settings.control_schema, cfg, [result])


def _post(client: TestClient, token: str, action: str, body: dict[str, Any]) -> Any:
    return client.post(f"/api/refresh/config/{TABLE}/{action}", json=body, headers=auth(token))


def test_cutover_and_rollback_need_admin_and_refuse_with_409(
    client: TestClient, api_tokens: dict[str, str], settings: Settings, table: str
) -> None:
    for action in ("cutover", "rollback"):
        problem(client.post(f"/api/refresh/config/{TABLE}/{action}", json={}), 401)
        for scope in ("read", "trigger", "revoked"):
            problem(_post(client, api_tokens[scope], action, {}), 403 if scope != "revoked" else 401)
        problem(
            client.post(f"/api/refresh/config/nope/{action}", json={}, headers=auth(api_tokens["admin"])), 404
        )
    admin = api_tokens["admin"]

    problem(_post(client, admin, "rollback", {"reason": "x"}), 409)
    first = _post(client, admin, "cutover", {"reason": "start shadow"})
    assert first.status_code == 200, first.text
    assert (first.json()["from_mode"], first.json()["to_mode"]) == ("dry_run", "shadow")
    assert first.json()["changed_by"].startswith("api:admin-")

    refused = problem(_post(client, admin, "cutover", {}), 409)
    assert "never been validated" in refused["detail"]
    _validate(settings, passed=False)
    refused = problem(_post(client, admin, "cutover", {}), 409)
    assert "latest validation failed (1 of 1 periods differ)" in refused["detail"]
    body = problem(_post(client, admin, "cutover", {"force": True}), 422)
    assert body["errors"] == [{"field": "reason", "problem": "required when force is true"}]
    problem(_post(client, admin, "cutover", {"bogus": 1}), 422)

    _validate(settings, passed=True)
    live = _post(client, admin, "cutover", {"reason": "validated"})
    assert live.status_code == 200, live.text
    assert (live.json()["to_mode"], live.json()["forced"]) == ("live", False)
    assert "live already" in problem(_post(client, admin, "cutover", {}), 409)["detail"]

    back = _post(client, admin, "rollback", {"reason": "numbers look off"})
    assert back.status_code == 200, back.text
    assert (back.json()["from_mode"], back.json()["to_mode"]) == ("live", "shadow")
    forced = _post(client, admin, "cutover", {"force": True, "reason": "accepted difference"})
    assert forced.status_code == 200 and forced.json()["forced"] is True
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            f"select action, to_mode, forced, reason from {settings.control_schema}.mode_changes "
            "where table_name = %s order by id",
            (TABLE,),
        ).fetchall()
        assert rows == [
            ("cutover", "shadow", False, "start shadow"),
            ("cutover", "live", False, "validated"),
            ("rollback", "shadow", False, "numbers look off"),
            ("cutover", "live", True, "accepted difference"),
        ]
        assert registry.get(conn, settings.control_schema, TABLE).mode is Mode.LIVE


def test_openapi_lists_cutover_and_rollback(client: TestClient) -> None:
    paths = client.get("/api/openapi.json").json()["paths"]
    for action in ("cutover", "rollback"):
        responses = paths[f"/api/refresh/config/{{table}}/{action}"]["post"]["responses"]
        assert {"200", "401", "403", "404", "409", "422"} <= set(responses)
