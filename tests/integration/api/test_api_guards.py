"""The API's guards against a real refresh's control schema: what a trigger token may not do,
mode changes only by cutover, malformed cursors, and (with a real uvicorn) body limits, the
client address and Host header, and the security headers."""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from flows.control import registry, runs, tokens, triggers
from flows.core.errors import ConfigError
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig
from tests.integration.api.support import api_process, auth, control_fingerprint
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
    limited = client.post(
        "/api/refresh/trigger", json={"tables": ["products"], "force": True}, headers=trigger
    )
    assert "admin token" in problem(limited, 429)["detail"]
    assert control_fingerprint(settings) == unchanged
    # an admin token passes both checks: it gets as far as the refresh lock (held here)
    with runs.refresh_lock(settings):
        unchanged = control_fingerprint(settings)
        for tables in ([disabled_table], ["products"]):
            problem(
                client.post("/api/refresh/trigger", json={"tables": tables, "force": True}, headers=admin),
                409,
            )
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
            small.post(
                "/api/refresh/trigger", json={"force": True, "start_date": start, "dry_run": True}, headers=h
            ),
            422,
        )
        assert "REFRESH_API_MAX_SLICES (50)" in err["detail"], err
    assert control_fingerprint(settings) == unchanged
    # within the cap the request goes on to the next check (the lock, held here)
    with runs.refresh_lock(settings):
        ok = {"tables": ["search_query_performance"], "force": True, "start_date": start, "dry_run": True}
        problem(client.post("/api/refresh/trigger", json=ok, headers=h), 409)


def test_a_deployment_the_prefect_api_does_not_know_is_a_503_that_changes_nothing(
    api_tokens: dict[str, str], settings: Settings
) -> None:
    """With a Prefect API configured (the session's server) but no such deployment on it, the
    trigger says what to start instead of failing with a 500, and records nothing."""
    from prefect.settings import get_current_settings

    assert get_current_settings().api.url, "the session's Prefect server is configured"
    unchanged = control_fingerprint(settings)
    with TestClient(create_app_with(settings, api_deployment="nobody/here")) as c:
        body = {"tables": ["products"], "force": True, "dry_run": True}
        err = problem(c.post("/api/refresh/trigger", json=body, headers=auth(api_tokens["admin"])), 503)
    assert "'nobody/here'" in err["detail"] and "refresh serve" in err["detail"], err
    assert control_fingerprint(settings) == unchanged


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


LOCAL = ("127.0.0.1", 50000)
PUBLIC = "203.0.113.5"
PROXY = "10.9.9.9"


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "anonymous"),
    [
        ("127.0.0.1", None, True),
        ("::1", None, True),
        (PUBLIC, None, False),
        # through the trusted proxy: the client is the right-most hop that is not the proxy
        (PROXY, "127.0.0.1", True),
        (PROXY, f"127.0.0.1, {PROXY}", True),
        (PROXY, "203.0.113.7", False),
        (PROXY, "127.0.0.1, 203.0.113.7", False),
        (PROXY, "not-an-address", False),
        (PROXY, None, False),  # a proxy that does not say for whom
        # forwarded by a peer nobody said to trust: never a loopback client
        ("127.0.0.1", "203.0.113.7", False),
        ("127.0.0.1", "127.0.0.1", False),
        (PUBLIC, "127.0.0.1", False),
    ],
)
def test_anonymous_reads_go_to_loopback_clients_behind_trusted_proxies_only(
    settings: Settings, peer: str, forwarded_for: str | None, anonymous: bool
) -> None:
    from flows.api.app import create_app

    app = create_app(settings.model_copy(update={"api_anonymous_read": True, "api_trusted_proxies": [PROXY]}))
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    with TestClient(app, client=(peer, 50000)) as c:
        resp = c.get("/api/refresh/config", headers=headers)
        if anonymous:
            assert resp.status_code == 200, resp.text
        else:
            assert "loopback clients only" in problem(resp, 401)["detail"]
        # the dashboard offers the trigger's token field only where reads need none
        assert ('id="trigger-token"' in c.get("/", headers=headers).text) is anonymous


def test_a_host_header_not_configured_is_refused(settings: Settings, client: TestClient) -> None:
    from flows.api.app import create_app

    for host in ("evil.example", "127.0.0.1.evil.example", ""):
        err = problem(client.get("/api/refresh/status", headers={"Host": host}), 400)
        assert "REFRESH_API_ALLOWED_HOSTS" in err["detail"]
    assert client.get("/api/openapi.json", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/api/openapi.json", headers={"Host": "[::1]:8000"}).status_code == 200
    app = create_app(
        settings.model_copy(update={"api_allowed_hosts": ["api.example.com", "*.internal.example"]})
    )
    with TestClient(app) as c:
        assert c.get("/api/openapi.json", headers={"Host": "api.example.com"}).status_code == 200
        assert c.get("/api/openapi.json", headers={"Host": "x.internal.example:443"}).status_code == 200
        problem(c.get("/api/openapi.json", headers={"Host": "sub.api.example.com"}), 400)
        problem(c.get("/api/openapi.json", headers={"Host": "localhost"}), 400)
    with pytest.raises(ConfigError, match="DNS rebinding"):
        create_app(settings.model_copy(update={"api_anonymous_read": True, "api_allowed_hosts": ["*"]}))


SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")


def _secured(resp: httpx.Response | Any) -> None:
    for name in SECURITY_HEADERS:
        assert resp.headers.get(name), (resp.request.url, name)
    csp = dict(d.strip().split(" ", 1) for d in resp.headers["content-security-policy"].split(";"))
    assert csp["script-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert resp.headers["x-content-type-options"] == "nosniff"


def test_every_answer_carries_the_security_headers_and_the_pages_no_inline_script(
    client: TestClient, api_tokens: dict[str, str]
) -> None:
    read = auth(api_tokens["read"])
    page = client.get("/")
    for resp in (
        page,
        client.get("/static/dashboard.js"),
        client.get("/static/plotly.min.js"),
        client.get("/api/openapi.json"),
        client.get("/api/refresh/status", headers=read),
        client.get("/api/refresh/status"),
        client.get("/api/refresh/nope"),
        client.get("/api/refresh/status", headers={"Host": "evil.example"}),
    ):
        _secured(resp)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    # no Swagger UI page: FastAPI's loads script from a CDN
    assert client.get("/api/docs").status_code == 404


@pytest.fixture(scope="module")
def factory_url(refreshed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app served by plain uvicorn (`--factory`, uvicorn's own defaults, which trust
    X-Forwarded-For from 127.0.0.1), anonymous reads on, settings from the environment."""
    log_path = tmp_path_factory.mktemp("factory") / "api.log"
    server = [
        sys.executable,
        "-m",
        "uvicorn",
        "flows.api.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
    ]
    env = {**os.environ, "REFRESH_API_ANONYMOUS_READ": "true", "REFRESH_API_MAX_BODY_BYTES": "4096"}
    with api_process(env, log_path, server=server) as url:
        yield url


def test_served_by_plain_uvicorn_the_same_rules_hold(factory_url: str, api_tokens: dict[str, str]) -> None:
    with httpx.Client(base_url=factory_url, timeout=60) as c:
        assert c.get("/api/refresh/config").status_code == 200  # a loopback client
        _secured(c.get("/api/refresh/config"))
        # a request forwarded for someone else is not the loopback client it arrives from
        problem(c.get("/api/refresh/config", headers={"X-Forwarded-For": "203.0.113.7"}), 401)
        problem(c.get("/api/refresh/config", headers={"X-Forwarded-For": "127.0.0.1"}), 401)
        problem(c.get("/api/refresh/config", headers={"Host": "evil.example"}), 400)


def _chunks(size: int, chunk: int = 1024) -> Iterator[bytes]:
    # a generator body: httpx sends it chunked, without a Content-Length
    for start in range(0, size, chunk):
        yield b" " * min(chunk, size - start)


def test_bodies_over_the_limit_are_refused_before_parsing_chunked_too(
    factory_url: str, api_tokens: dict[str, str], settings: Settings
) -> None:
    unchanged = control_fingerprint(settings)
    trigger = auth(api_tokens["trigger"])
    json_headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=factory_url, timeout=60) as c:
        big = c.post("/api/refresh/trigger", content=b" " * 5000 + b"{}", headers=json_headers)
        assert "REFRESH_API_MAX_BODY_BYTES" in problem(big, 413)["detail"]
        _secured(big)
        chunked = c.post("/api/refresh/trigger", content=_chunks(100_000), headers=json_headers)
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in chunked.request.headers
        assert "4096 bytes" in problem(chunked, 413)["detail"]
        # the same, with a token: refused for its size before anything reads the JSON
        problem(
            c.post("/api/refresh/trigger", content=_chunks(100_000), headers={**trigger, **json_headers}), 413
        )
        problem(c.put("/api/refresh/config/products", content=_chunks(5000), headers=json_headers), 413)
        # under the limit, a chunked body reaches the route whole
        small = iter([b'{"tables": ', b'["nope"], "force": true}'])
        err = problem(c.post("/api/refresh/trigger", content=small, headers={**trigger, **json_headers}), 422)
        assert "unknown table" in err["detail"]
    assert control_fingerprint(settings) == unchanged


def _token_id(secret: str) -> str:
    return secret.split("_")[1]


def test_tokens_expire_and_record_their_last_use(client: TestClient, settings: Settings) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    schema = settings.control_schema
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        with pytest.raises(ConfigError, match="not in the future"):
            tokens.create(conn, schema, "guard-past", ["read"], expires_at=datetime.now(UTC))
        secret, info = tokens.create(
            conn, schema, "guard-expiring", ["read"], expires_at=datetime.now(UTC) + timedelta(days=1)
        )

        def listed() -> tokens.TokenInfo:
            return next(t for t in tokens.list_tokens(conn, schema) if t.token_id == info.token_id)

        try:
            assert listed().last_used_at is None and listed().expires_at == info.expires_at
            assert client.get("/api/refresh/config", headers=auth(secret)).status_code == 200
            used = listed().last_used_at
            assert used is not None and datetime.now(UTC) - used < timedelta(minutes=1)
            # written at most once a minute, not on every request
            assert client.get("/api/refresh/config", headers=auth(secret)).status_code == 200
            assert listed().last_used_at == used
            runner = CliRunner(env={"COLUMNS": "250"})
            out = runner.invoke(app, ["token", "list"]).output
            assert "expires (UTC)" in out and "last used (UTC)" in out
            assert f"{used.astimezone(UTC):%Y-%m-%d %H:%M:%S}" in out
            conn.execute(
                f"update {schema}.api_tokens set expires_at = now() - interval '1 second' where token_id = %s",
                (info.token_id,),
            )
            err = problem(client.get("/api/refresh/config", headers=auth(secret)), 401)
            assert "expired" in err["detail"] and secret not in err["detail"]
            assert "(expired)" in runner.invoke(app, ["token", "list"]).output
            made = runner.invoke(
                app, ["token", "create", "guard-cli", "--scope", "read", "--expires-in-days", "7"]
            )
            assert made.exit_code == 0 and "expires" in made.output, made.output
            bad = runner.invoke(
                app, ["token", "create", "guard-cli-2", "--scope", "read", "--expires-in-days", "0"]
            )
            assert bad.exit_code != 0
        finally:
            for name in ("guard-expiring", "guard-cli"):
                conn.execute(f"delete from {schema}.api_tokens where name = %s", (name,))


def test_an_idempotency_key_finds_only_its_own_tokens_trigger(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    from flows.orchestration import run_params
    from flows.orchestration.trigger import request_hash

    schema = settings.control_schema
    body = {"tables": ["products"], "force": True, "dry_run": True}
    params = run_params.validate_params(["products"], None, None, False, True, True, trigger="api")
    mine = uuid.uuid4()
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        triggers.record(
            conn,
            schema,
            trigger_id=mine,
            idempotency_key="shared-key",
            request_sha256=request_hash(params),
            params={},
            via="process",
            flow_run_id=None,
            pid=None,
            hostname=None,
            token_id=_token_id(api_tokens["admin"]),
        )
    try:
        key = {"Idempotency-Key": "shared-key"}
        again = client.post("/api/refresh/trigger", json=body, headers={**auth(api_tokens["admin"]), **key})
        assert again.status_code == 202 and again.json()["trigger_id"] == str(mine), again.text
        with runs.refresh_lock(settings):
            # another token with the same key: its own new request (here refused as busy),
            # never the first token's trigger, nor a conflict with its body
            other = client.post(
                "/api/refresh/trigger", json=body, headers={**auth(api_tokens["trigger"]), **key}
            )
            assert str(mine) not in problem(other, 409)["detail"]
            other = client.post(
                "/api/refresh/trigger", json={"force": True}, headers={**auth(api_tokens["trigger"]), **key}
            )
            problem(other, 409)
    finally:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            conn.execute(f"delete from {schema}.api_triggers where trigger_id = %s", (mine,))


def test_housekeeping_prunes_old_api_triggers(settings: Settings) -> None:
    from flows.orchestration.housekeeping import prune_audit

    schema = settings.control_schema
    old, recent = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for trigger_id, age in ((old, "400 days"), (recent, "1 day")):
            conn.execute(
                f"insert into {schema}.api_triggers (trigger_id, request_sha256, params, via, created_at) "
                "values (%s, 'x', '{}', 'process', now() - %s::interval)",
                (trigger_id, age),
            )
        try:
            assert prune_audit(settings, 365)["api_triggers"] == 1
            left = conn.execute(
                f"select trigger_id from {schema}.api_triggers where trigger_id = any(%s)", ([old, recent],)
            ).fetchall()
            assert left == [(recent,)]
        finally:
            conn.execute(f"delete from {schema}.api_triggers where trigger_id = any(%s)", ([old, recent],))


def test_a_history_table_that_is_no_table_name_is_a_422(
    client: TestClient, api_tokens: dict[str, str]
) -> None:
    # a NUL byte (Postgres refuses it in text) was a 500
    for table in ("pro\x00ducts", "bad name;"):
        err = problem(
            client.get("/api/refresh/history", params={"table": table}, headers=auth(api_tokens["read"])), 422
        )
        assert "table name" in err["detail"]
