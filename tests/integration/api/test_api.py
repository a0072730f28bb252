"""The HTTP API against a real refresh (Postgres, the emulator, dbt): every endpoint, every
error code, tokens and scopes, the idempotent trigger, 409 and 429."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from flows.api.app import create_app
from flows.control import runs
from flows.core.settings import Settings
from tests.integration.api.support import auth, control_fingerprint

PROBLEM = "application/problem+json"
TABLES = {"search_query_performance", "daily_search_terms", "products"}


@pytest.fixture(scope="module", autouse=True)
def no_prefect_api() -> Iterator[None]:
    """No Prefect API configured here (as on a machine without one): a trigger starts the flow
    in a process of its own. Deployment runs: test_trigger_deployment.py."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.MonkeyPatch.context() as mp, temporary_settings(restore_defaults={PREFECT_API_URL}):
        mp.delenv("PREFECT_API_URL", raising=False)
        yield


def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body = resp.json()
    assert body["status"] == status and body["detail"] and body["title"]
    return body  # type: ignore[no-any-return]


def test_openapi_document_lists_every_endpoint(client: TestClient) -> None:
    doc = client.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {
        "/api/refresh/status",
        "/api/refresh/trigger",
        "/api/refresh/triggers/{trigger_id}",
        "/api/refresh/runs",
        "/api/refresh/runs/{run_id}",
        "/api/refresh/history",
        "/api/refresh/metrics",
        "/api/refresh/config",
        "/api/refresh/config/{table}",
        "/api/refresh/dashboard",
    } <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    trigger = doc["paths"]["/api/refresh/trigger"]["post"]
    assert {"202", "401", "403", "409", "422", "429"} <= set(trigger["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in trigger["parameters"])


def test_reads_need_a_token_unless_anonymous_reads_are_on(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    body = problem(client.get("/api/refresh/status"), 401)
    assert "bearer token" in body["detail"]
    assert client.get("/api/refresh/status").headers["www-authenticate"].startswith("Bearer")
    problem(client.get("/api/refresh/status", headers=auth("sqpr_nope_nope")), 401)
    problem(client.get("/api/refresh/status", headers=auth("not a token")), 401)
    revoked = problem(client.get("/api/refresh/status", headers=auth(api_tokens["revoked"])), 401)
    assert "revoked" in revoked["detail"]
    assert api_tokens["revoked"] not in revoked["detail"]
    # anonymous reads are for loopback clients (TestClient's default client is "testclient")
    local = ("127.0.0.1", 50000)
    with TestClient(
        create_app(settings.model_copy(update={"api_anonymous_read": True})), client=local
    ) as anon:
        assert anon.get("/api/refresh/status").status_code == 200
        # a wrong token is refused even when anonymous reads are on
        problem(anon.get("/api/refresh/status", headers=auth(api_tokens["revoked"])), 401)
        problem(anon.post("/api/refresh/trigger", json={"force": True}), 401)
        problem(anon.put("/api/refresh/config/products", json={"priority": 1}), 401)


def test_status_reports_health_and_per_table_freshness(
    client: TestClient, api_tokens: dict[str, str]
) -> None:
    body = client.get("/api/refresh/status?hours=24", headers=auth(api_tokens["read"])).json()
    assert body["status"] == "healthy", body["reasons"]
    assert body["refresh_running"] is False
    by_table = {t["table"]: t for t in body["tables"]}
    assert set(by_table) == TABLES
    for t in by_table.values():
        assert (t["mode"], t["last_status"], t["freshness"]) == ("live", "success", "fresh")
        assert t["last_success_at"] and t["next_due_at"]
    assert body["runs"][0]["status"] == "success"
    for bad in ("hours=0", "hours=721", "hours=abc"):
        err = problem(client.get(f"/api/refresh/status?{bad}", headers=auth(api_tokens["read"])), 422)
        assert err["errors"][0]["field"] == "hours"


def test_runs_and_one_run_with_tables_slices_and_dbt_nodes(
    client: TestClient, api_tokens: dict[str, str], refreshed: dict[str, Any]
) -> None:
    h = auth(api_tokens["read"])
    runs = client.get("/api/refresh/runs?page_size=5", headers=h).json()
    assert runs["total"] >= 1 and runs["page_size"] == 5
    assert str(refreshed["run_id"]) in {r["run_id"] for r in runs["items"]}
    one = client.get(f"/api/refresh/runs/{refreshed['run_id']}", headers=h).json()
    assert one["status"] == "success" and one["trigger"] == "test"
    assert {t["table_name"] for t in one["tables"]} == TABLES
    assert one["slices"] and all(s["status"] == "success" for s in one["slices"])
    assert any(n["resource_type"] == "model" for n in one["dbt_nodes"])
    problem(client.get(f"/api/refresh/runs/{uuid.uuid4()}", headers=h), 404)
    assert (
        problem(client.get("/api/refresh/runs/not-a-uuid", headers=h), 422)["errors"][0]["field"] == "run_id"
    )
    problem(client.get("/api/refresh/runs?status=bogus", headers=h), 422)
    problem(client.get(f"/api/refresh/triggers/{uuid.uuid4()}", headers=h), 404)


def test_history_filters_and_pages(client: TestClient, api_tokens: dict[str, str]) -> None:
    h = auth(api_tokens["read"])
    page = client.get("/api/refresh/history?table=products&status=success&page_size=1", headers=h).json()
    assert page["total"] >= 1 and len(page["items"]) == 1
    assert page["items"][0]["table_name"] == "products"
    assert (
        client.get("/api/refresh/history?since=2000-01-01&until=2000-01-02", headers=h).json()["total"] == 0
    )
    assert "page_size" in problem(client.get("/api/refresh/history?page_size=101", headers=h), 422)["detail"]
    assert (
        "unknown status" in problem(client.get("/api/refresh/history?status=bogus", headers=h), 422)["detail"]
    )
    assert (
        "after until"
        in problem(client.get("/api/refresh/history?since=2026-02-01&until=2026-01-01", headers=h), 422)[
            "detail"
        ]
    )
    assert (
        problem(client.get("/api/refresh/history?since=yesterday", headers=h), 422)["errors"][0]["field"]
        == "since"
    )
    problem(client.get("/api/refresh/history?page=0", headers=h), 422)


def test_history_by_cursor(client: TestClient, api_tokens: dict[str, str]) -> None:
    h = auth(api_tokens["read"])
    first = client.get("/api/refresh/history?table=products&page_size=1", headers=h).json()
    rows = [*first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get(
            f"/api/refresh/history?table=products&page_size=1&cursor={cursor}", headers=h
        ).json()
        assert page["items"] and "total" not in page
        rows += page["items"]
        cursor = page["next_cursor"]
    assert len(rows) == first["total"]
    assert len({r["run_id"] for r in rows}) == len(rows)
    runs = client.get("/api/refresh/runs?page_size=1", headers=h).json()
    if runs["next_cursor"]:
        after = client.get(f"/api/refresh/runs?page_size=1&cursor={runs['next_cursor']}", headers=h).json()
        assert after["items"][0]["run_id"] != runs["items"][0]["run_id"]
    err = problem(client.get("/api/refresh/history?cursor=bogus", headers=h), 422)
    assert "cursor" in err["detail"]
    err = problem(
        client.get(f"/api/refresh/history?page=2&cursor={first['next_cursor'] or 'x'}", headers=h), 422
    )
    assert err["errors"][0]["field"] == "cursor"


def test_status_is_served_again_for_a_few_seconds_and_says_how_old(
    api_tokens: dict[str, str], settings: Settings
) -> None:
    h, admin = auth(api_tokens["read"]), auth(api_tokens["admin"])
    with TestClient(create_app(settings.model_copy(update={"api_status_cache_seconds": 60}))) as c:
        first = c.get("/api/refresh/status?hours=5", headers=h)
        again = c.get("/api/refresh/status?hours=5", headers=h)
        assert first.headers["age"] == "0" and again.headers["age"] in ("0", "1")
        assert again.json()["generated_at"] == first.json()["generated_at"]
        assert c.get("/api/refresh/status?hours=6", headers=h).json()["hours"] == 6
        # A change made through this API is seen at once.
        priority = c.get("/api/refresh/config/products", headers=admin).json()["priority"]
        try:
            changed = c.put("/api/refresh/config/products", json={"priority": priority}, headers=admin)
            assert changed.status_code == 200
            after = c.get("/api/refresh/status?hours=5", headers=h).json()
            assert after["generated_at"] != first.json()["generated_at"]
        finally:
            with psycopg.connect(settings.dsn(), autocommit=True) as conn:
                conn.execute(
                    f"update {settings.control_schema}.refresh_config set origin = 'file', "
                    "updated_by = null where table_name = 'products'"
                )
    with TestClient(create_app(settings.model_copy(update={"api_status_cache_seconds": 0}))) as c:
        one, two = (c.get("/api/refresh/status?hours=5", headers=h).json() for _ in range(2))
        assert one["generated_at"] != two["generated_at"]


def test_metrics_per_table_and_dbt_model(client: TestClient, api_tokens: dict[str, str]) -> None:
    h = auth(api_tokens["read"])
    body = client.get("/api/refresh/metrics?days=7", headers=h).json()
    assert body["runs"]["runs"] >= 1 and 0 < body["runs"]["success_rate"] <= 1
    tables = {t["table"]: t for t in body["tables"]}
    assert set(tables) == TABLES
    assert tables["search_query_performance"]["rows_per_second"] > 0
    assert tables["products"]["p95_duration_s"] >= tables["products"]["p50_duration_s"] > 0
    models = {m["model"]: m for m in body["dbt_models"]}
    assert "weekly_summary" in models and models["weekly_summary"]["success_rate"] == 1
    for bad in ("days=0", "days=31"):
        problem(client.get(f"/api/refresh/metrics?{bad}", headers=h), 422)


def test_config_read_and_change_with_the_same_validation_as_the_cli(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    read, admin = auth(api_tokens["read"]), auth(api_tokens["admin"])
    listed = client.get("/api/refresh/config", headers=read).json()
    assert {c["table_name"] for c in listed} == TABLES
    before = client.get("/api/refresh/config/products", headers=read).json()
    assert before["write_strategy"] == "full_replace"
    problem(client.get("/api/refresh/config/nope", headers=read), 404)
    unchanged = control_fingerprint(settings)
    problem(client.put("/api/refresh/config/products", json={"priority": 1}, headers=read), 403)
    problem(
        client.put("/api/refresh/config/products", json={"priority": 1}, headers=auth(api_tokens["trigger"])),
        403,
    )
    assert (
        "priority"
        in problem(client.put("/api/refresh/config/products", json={"priority": 5000}, headers=admin), 422)[
            "detail"
        ]
    )
    body = problem(client.put("/api/refresh/config/products", json={"source_table": "x"}, headers=admin), 422)
    assert body["errors"][0]["field"] == "source_table"
    problem(client.put("/api/refresh/config/products", json={"mode": "bogus"}, headers=admin), 422)
    problem(client.put("/api/refresh/config/products", json={}, headers=admin), 422)
    assert (
        "cursor_column"
        in problem(
            client.put(
                "/api/refresh/config/products", json={"write_strategy": "slice_replace"}, headers=admin
            ),
            422,
        )["detail"]
    )
    problem(client.put("/api/refresh/config/nope", json={"priority": 1}, headers=admin), 404)
    problem(
        client.put(
            "/api/refresh/config/products",
            content=b"{not json",
            headers={**admin, "Content-Type": "application/json"},
        ),
        422,
    )
    assert control_fingerprint(settings) == unchanged
    try:
        changed = client.put("/api/refresh/config/products", json={"priority": "high"}, headers=admin)
        assert changed.status_code == 200, changed.text
        assert (changed.json()["priority"], changed.json()["origin"]) == (90, "user")
        assert client.get("/api/refresh/config/products", headers=read).json()["priority"] == 90
    finally:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            conn.execute(
                f"update {settings.control_schema}.refresh_config set priority = %s, origin = 'file', "
                "updated_by = null where table_name = 'products'",
                (before["priority"],),
            )


def test_trigger_rejects_bad_input_and_missing_scope_changing_nothing(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    h = auth(api_tokens["trigger"])
    unchanged = control_fingerprint(settings)
    problem(client.post("/api/refresh/trigger", json={"force": True}), 401)
    problem(client.post("/api/refresh/trigger", json={"force": True}, headers=auth(api_tokens["read"])), 403)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tables": ["nope"], "force": True}, "unknown table"),
        ({"tables": ["bad name;"], "force": True}, "table name"),
        ({"start_date": "2026-02-01", "end_date": "2026-01-01", "force": True}, "after end_date"),
        ({"start_date": "2999-01-01", "force": True}, "in the future"),
        ({"start_date": "not a date"}, "start_date"),
        ({"bogus": 1}, "bogus"),
        ({"force": "maybe"}, "force"),
        ({"tables": "products"}, "tables"),
    ]
    for body, expected in cases:
        assert (
            expected in problem(client.post("/api/refresh/trigger", json=body, headers=h), 422)["detail"]
        ), body
    problem(
        client.post("/api/refresh/trigger", content=b"[", headers={**h, "Content-Type": "application/json"}),
        422,
    )
    problem(
        client.post("/api/refresh/trigger", json={}, headers={**h, "Idempotency-Key": "bad key with spaces"}),
        422,
    )
    assert control_fingerprint(settings) == unchanged


def test_trigger_429_when_every_table_was_refreshed_within_the_hour(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    h = auth(api_tokens["trigger"])
    unchanged = control_fingerprint(settings)
    for body in (
        {},
        {"tables": ["products"]},
        {"tables": ["products", "daily_search_terms"], "dry_run": True},
    ):
        resp = client.post("/api/refresh/trigger", json=body, headers=h)
        err = problem(resp, 429)
        assert 0 < int(resp.headers["retry-after"]) <= 3600
        assert err["retry_after_s"] == int(resp.headers["retry-after"])
    assert control_fingerprint(settings) == unchanged


def test_trigger_409_while_the_refresh_lock_is_held(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    h = auth(api_tokens["trigger"])
    with runs.refresh_lock(settings) as lock_conn:
        run = runs.start_run(lock_conn, settings.control_schema, flow_run_id=None, trigger="test", params={})
        try:
            unchanged = control_fingerprint(settings)
            err = problem(client.post("/api/refresh/trigger", json={"force": True}, headers=h), 409)
            assert err["run_id"] == str(run.run_id)
            assert str(run.run_id) in err["detail"]
            assert client.get("/api/refresh/status", headers=h).json()["refresh_running"] is True
            assert control_fingerprint(settings) == unchanged
        finally:
            lock_conn.execute(
                f"delete from {settings.control_schema}.refresh_runs where run_id = %s", (run.run_id,)
            )
    # The lock goes with its session, which the server ends a moment after the client closes.
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while runs.refresh_running(conn) and time.monotonic() < deadline:
            time.sleep(0.2)


def test_trigger_409_names_a_refresh_still_starting_before_its_run_id_exists(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    """A CLI run holds the lock from before Prefect starts until it writes its run row: the
    409 then names its trigger and process, never an anonymous "starting"."""
    h = auth(api_tokens["trigger"])
    with runs.refresh_lock(settings, trigger="cli"):
        err = problem(client.post("/api/refresh/trigger", json={"force": True}, headers=h), 409)
    assert err["run_id"] is None and (err["trigger"], err["pid"]) == ("cli", os.getpid()), err
    assert f"a run starting, trigger cli, no run id yet: pid {os.getpid()}" in err["detail"], err
    assert err["started_at"], err
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while runs.refresh_running(conn) and time.monotonic() < deadline:
            time.sleep(0.2)


def test_trigger_starts_a_real_run_idempotently_and_409s_while_it_runs(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    # A real flow run in a background process, as a dry run: it takes the refresh lock and
    # writes its audit rows (removed at the end), but not the session's shared raw data. The
    # session's run refreshed products < 1 h ago: forcing past that takes an admin token.
    h = {**auth(api_tokens["admin"]), "Idempotency-Key": f"test-{uuid.uuid4()}"}
    body = {"tables": ["products"], "force": True, "dry_run": True}
    first = client.post("/api/refresh/trigger", json=body, headers=h)
    assert first.status_code == 202, first.text
    started = first.json()
    assert started["via"] == "process" and not started["replayed"]
    assert first.headers["location"] == f"/api/refresh/triggers/{started['trigger_id']}"
    trig: dict[str, Any] = {}
    try:
        # the client retries the same request: the same trigger back, not a conflict
        again = client.post("/api/refresh/trigger", json=body, headers=h)
        assert again.status_code == 202, again.text
        assert again.json()["trigger_id"] == started["trigger_id"] and again.json()["replayed"]
        # the same key with another body is a client error
        problem(client.post("/api/refresh/trigger", json={"tables": ["products"]}, headers=h), 422)
        # another request while the run is going: 409
        busy = problem(
            client.post(
                "/api/refresh/trigger", json={"force": True}, headers={**h, "Idempotency-Key": "other"}
            ),
            409,
        )
        assert "running" in busy["detail"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            trig = client.get(f"/api/refresh/triggers/{started['trigger_id']}", headers=h).json()
            if trig["run_id"] and trig["run_status"] not in (None, "running"):
                break
            time.sleep(2)
        assert trig["run_status"] == "success", trig
        run = client.get(f"/api/refresh/runs/{trig['run_id']}", headers=h).json()
        assert run["trigger"] == "api" and run["params"]["dry_run"] is True
        # a dry run records its plan on the run, and writes no table refresh
        assert [(t["table"], t["status"]) for t in run["plan"]] == [("products", "planned")]
        replay = client.post("/api/refresh/trigger", json=body, headers=h).json()
        assert (replay["trigger_id"], replay["run_id"]) == (started["trigger_id"], trig["run_id"])
    finally:
        if trig.get("run_id"):
            with psycopg.connect(settings.dsn(), autocommit=True) as conn:
                for table in ("slice_refreshes", "table_refreshes", "refresh_runs"):
                    conn.execute(
                        f"delete from {settings.control_schema}.{table} where run_id = %s", (trig["run_id"],)
                    )


def test_unknown_route_and_method_are_problems(client: TestClient) -> None:
    problem(client.get("/api/refresh/nope"), 404)
    problem(client.delete("/api/refresh/status"), 405)


def test_dashboard_shell_and_local_plotly(client: TestClient, api_tokens: dict[str, str]) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "/static/plotly.min.js" in page.text
    assert "cdn" not in page.text.lower()
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    data = client.get("/api/refresh/dashboard", headers=auth(api_tokens["read"])).json()
    assert data["timeline"] and {r["name"] for r in data["trends"]["tables"]} >= TABLES
    assert data["trends"]["dbt_models"]
    problem(client.get("/api/refresh/dashboard"), 401)


def test_token_cli_creates_lists_and_revokes_without_showing_secrets(settings: Settings) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner(env={"COLUMNS": "250"})
    made = runner.invoke(app, ["token", "create", "cli-test", "--scope", "read", "--scope", "trigger"])
    assert made.exit_code == 0, made.output
    secret = next(w for w in made.output.split() if w.startswith("sqpr_"))
    listed = runner.invoke(app, ["token", "list"])
    assert "cli-test" in listed.output and secret not in listed.output
    bad = runner.invoke(app, ["token", "create", "x", "--scope", "root"])
    assert bad.exit_code == 1 and "unknown scope" in bad.output
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/refresh/config", headers=auth(secret)).status_code == 200
        assert runner.invoke(app, ["token", "revoke", "cli-test"]).exit_code == 0
        problem(c.get("/api/refresh/config", headers=auth(secret)), 401)
    assert "cli-test" not in runner.invoke(app, ["token", "list"]).output
    assert runner.invoke(app, ["token", "revoke", "cli-test"]).exit_code == 1


@pytest.mark.parametrize("anonymous", [True])
def test_api_command_refuses_anonymous_reads_on_a_public_address(anonymous: bool) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["api", "--host", "0.0.0.0", "--anonymous-read", "--no-stack"])
    assert res.exit_code == 1 and "loopback" in res.output
