"""/api/refresh/webhooks against real Postgres and a real local receiver that verifies every
delivery with `standardwebhooks`: CRUD, deliveries with attempts, the test event, rotation,
scopes, and bad input that changes nothing and never echoes a secret."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from flows.control import outbox
from flows.core.settings import Settings
from tests.integration.api.support import auth, control_fingerprint
from tests.webhook_receiver import Receiver

PROBLEM = "application/problem+json"
BASE = "/api/refresh/webhooks"


@pytest.fixture
def private_ok(client: TestClient, settings: Settings) -> Iterator[None]:
    """The receiver is on 127.0.0.1 (the API allows private addresses for this test);
    afterwards every endpoint is removed so the other tests' runs deliver nothing."""
    # Set and put back by hand: monkeypatch would delete the attribute afterwards (State keeps
    # its values outside the instance __dict__).
    state = client.app.state
    before = state.settings
    state.settings = before.model_copy(update={"webhook_allow_private": True})
    try:
        yield
    finally:
        state.settings = before
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for ep in outbox.list_endpoints(conn, settings.control_schema):
            outbox.remove_endpoint(conn, settings.control_schema, ep["id"], "test")


def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body = resp.json()
    assert body["status"] == status and body["detail"]
    return body  # type: ignore[no-any-return]


def routes(eid: int) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", BASE, None),
        ("POST", BASE, {"url": "http://127.0.0.1:9/hook"}),
        ("GET", f"{BASE}/{eid}", None),
        ("PATCH", f"{BASE}/{eid}", {"description": "x"}),
        ("DELETE", f"{BASE}/{eid}", None),
        ("GET", f"{BASE}/{eid}/deliveries", None),
        ("POST", f"{BASE}/{eid}/test", None),
        ("POST", f"{BASE}/{eid}/rotate-secret", None),
    ]


def test_every_webhook_route_needs_the_admin_scope(
    client: TestClient, api_tokens: dict[str, str], settings: Settings, private_ok: None
) -> None:
    made = client.post(BASE, json={"url": "http://127.0.0.1:9/hook"}, headers=auth(api_tokens["admin"]))
    assert made.status_code == 201, made.text
    before = control_fingerprint(settings)
    for method, path, body in routes(made.json()["id"]):
        for scope in ("read", "trigger"):
            err = problem(client.request(method, path, json=body, headers=auth(api_tokens[scope])), 403)
            assert "this needs 'admin'" in err["detail"]
        problem(client.request(method, path, json=body), 401)
        problem(client.request(method, path, json=body, headers=auth(api_tokens["revoked"])), 401)
    assert control_fingerprint(settings) == before, "a refused request changed the control schema"


def test_create_list_get_update_delete_and_the_secret_shown_once(
    client: TestClient,
    api_tokens: dict[str, str],
    settings: Settings,
    private_ok: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = auth(api_tokens["admin"])
    caplog.set_level(logging.DEBUG)
    made = client.post(
        BASE,
        json={"url": "http://127.0.0.1:9/hook", "description": "on-call", "event_types": ["refresh.failed"]},
        headers=h,
    )
    assert made.status_code == 201, made.text
    ep = made.json()
    secret = ep.pop("secret")
    assert secret.startswith("whsec_") and len(secret) > 40
    assert made.headers["location"] == f"{BASE}/{ep['id']}"
    assert made.headers["cache-control"] == "no-store"
    assert (ep["url"], ep["description"], ep["event_types"], ep["enabled"]) == (
        "http://127.0.0.1:9/hook",
        "on-call",
        ["refresh.failed"],
        True,
    )
    assert ep["created_by"] == ep["updated_by"] and ep["created_by"].startswith("api:admin-")

    listed = client.get(BASE, headers=h)
    assert ep["id"] in {e["id"] for e in listed.json()}
    got = client.get(f"{BASE}/{ep['id']}", headers=h)
    assert got.json() == ep

    changed = client.patch(
        f"{BASE}/{ep['id']}",
        json={
            "url": "http://127.0.0.1:10/other",
            "description": "renamed",
            "event_types": ["validation.failed", "table.cutover"],
        },
        headers=h,
    ).json()
    assert (changed["url"], changed["description"], changed["event_types"], changed["enabled"]) == (
        "http://127.0.0.1:10/other",
        "renamed",
        ["validation.failed", "table.cutover"],
        True,
    )
    # Disabling cancels what is pending; enabling clears the reason.
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        outbox.emit(conn, settings.control_schema, "validation.failed", {"table": "t"})
    off = client.patch(f"{BASE}/{ep['id']}", json={"enabled": False}, headers=h).json()
    assert off["enabled"] is False and off["disabled_reason"].startswith("disabled by api:")
    page = client.get(f"{BASE}/{ep['id']}/deliveries", headers=h).json()
    assert [(d["event"], d["status"]) for d in page["items"]] == [("validation.failed", "cancelled")]
    problem(client.post(f"{BASE}/{ep['id']}/test", headers=h), 422)  # disabled: enable it first
    on = client.patch(f"{BASE}/{ep['id']}", json={"enabled": True}, headers=h).json()
    assert on["enabled"] is True and on["disabled_reason"] is None

    assert client.delete(f"{BASE}/{ep['id']}", headers=h).status_code == 204
    problem(client.get(f"{BASE}/{ep['id']}", headers=h), 404)
    problem(client.delete(f"{BASE}/{ep['id']}", headers=h), 404)
    assert ep["id"] not in {e["id"] for e in client.get(BASE, headers=h).json()}

    # The secret was in the create answer only: not in any other answer, log or control row.
    for resp in (listed, got):
        assert secret not in resp.text and "secret_enc" not in resp.text
    assert secret not in caplog.text
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            f"select string_agg(t::text, '|') from {settings.control_schema}.webhook_endpoints t"
        ).fetchone()
    assert rows is not None and secret not in rows[0] and secret.removeprefix("whsec_") not in rows[0]


def test_bad_input_names_the_field_and_changes_nothing(
    client: TestClient, api_tokens: dict[str, str], settings: Settings
) -> None:
    h = auth(api_tokens["admin"])
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        eid = outbox.create_endpoint(
            conn,
            settings.control_schema,
            url="https://hooks.example.com/x",
            description="",
            event_types=["refresh.failed"],
            secret_enc="not-used",
            who="test",
        )
    try:
        before = control_fingerprint(settings)
        bad_creates = {
            "url": [
                {"url": "ftp://example.com/x"},
                {"url": "https://user:pw@example.com/x"},
                {"url": "http://127.0.0.1:9/hook"},  # loopback refused by default
                {"url": "http://[::ffff:10.0.0.1]/x"},
                {"url": "http://host.invalid/x"},
                {"url": "http://example.com:99999/x"},
                {"url": "x" * 2001},
                {"url": "https://192.0.2.1/a\x00b"},  # Postgres text cannot hold NUL: a 422, not a 500
                {"url": "https://192.0.2.1/a b"},
            ],
            "event_types": [{"url": "https://192.0.2.1/x", "event_types": ["refresh.done"]}],
            "description": [
                {"url": "https://192.0.2.1/x", "description": "d" * 501},
                {"url": "https://192.0.2.1/x", "description": "a\x00b"},
            ],
            "extra": [{"url": "https://192.0.2.1/x", "extra": 1}],
        }
        for field, bodies in bad_creates.items():
            for body in bodies:
                err = problem(client.post(BASE, json=body, headers=h), 422)
                assert err["errors"][0]["field"] == field, (body, err)
        assert (
            "REFRESH_WEBHOOK_ALLOW_PRIVATE"
            in problem(client.post(BASE, json={"url": "http://127.0.0.1:9/hook"}, headers=h), 422)["detail"]
        )
        for body, field in [
            ({}, "body"),
            ({"event_types": []}, "event_types"),
            ({"event_types": ["nope"]}, "event_types"),
            ({"url": "gopher://x"}, "url"),
            ({"enabled": "maybe"}, "enabled"),
            ({"secret": "whsec_x"}, "secret"),
        ]:
            err = problem(client.patch(f"{BASE}/{eid}", json=body, headers=h), 422)
            assert err["errors"][0]["field"] == field, (body, err)
        assert (
            problem(client.post(f"{BASE}/{eid}/rotate-secret", json={"grace_hours": -1}, headers=h), 422)[
                "errors"
            ][0]["field"]
            == "grace_hours"
        )
        for method, path, body in routes(eid + 10_000)[2:]:
            problem(client.request(method, path, json=body, headers=h), 404)
        for path in (f"{BASE}/0", f"{BASE}/abc", f"{BASE}/{2**63}"):
            problem(client.get(path, headers=h), 422)
        for query in ("page_size=101", "page=0", "status=bogus"):
            problem(client.get(f"{BASE}/{eid}/deliveries?{query}", headers=h), 422)
        assert control_fingerprint(settings) == before, "a rejected request changed the control schema"
    finally:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            outbox.remove_endpoint(conn, settings.control_schema, eid, "test")


def test_test_event_is_verified_by_a_real_receiver_and_rotation_signs_twice(
    client: TestClient, api_tokens: dict[str, str], private_ok: None
) -> None:
    h = auth(api_tokens["admin"])
    with Receiver(script=[200, 500]) as rx:
        made = client.post(BASE, json={"url": rx.url}, headers=h).json()
        eid, secret = made["id"], made["secret"]
        rx.secrets = [secret]

        sent = client.post(f"{BASE}/{eid}/test", headers=h)
        assert sent.status_code == 200, sent.text
        body = sent.json()
        assert body["delivered"] is True and body["status"] == "succeeded"
        assert [(a["attempt"], a["success"], a["status_code"]) for a in body["attempt_log"]] == [
            (1, True, 200)
        ]
        [got] = rx.received
        assert got.verified_with == [secret], "standardwebhooks verifies the test event"
        assert got.id == body["event_id"] and got.json["type"] == "webhook.test"
        assert secret not in sent.text

        failed = client.post(f"{BASE}/{eid}/test", headers=h).json()  # the receiver answers 500
        assert failed["delivered"] is False and failed["status"] == "pending"
        assert failed["attempt_log"][0]["status_code"] == 500 and failed["last_error"] == "HTTP 500"

        rotated = client.post(f"{BASE}/{eid}/rotate-secret", json={"grace_hours": 1}, headers=h)
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["secret"]
        assert new.startswith("whsec_") and new != secret
        assert rotated.json()["previous_secret_expires_at"]
        rx.secrets = [secret, new]
        assert client.post(f"{BASE}/{eid}/test", headers=h).json()["delivered"] is True
        assert rx.received[-1].verified_with == [secret, new], "both signatures verify during the grace"
        assert len(rx.received[-1].headers["webhook-signature"].split(" ")) == 2

        page = client.get(f"{BASE}/{eid}/deliveries?page_size=2", headers=h).json()
        assert (page["total"], page["pages"], len(page["items"])) == (3, 2, 2)
        second = client.get(f"{BASE}/{eid}/deliveries?page_size=2&page=2", headers=h).json()
        assert [d["id"] for d in second["items"]] == [body["id"]]
        assert second["items"][0]["attempt_log"][0]["status_code"] == 200
        pending = client.get(f"{BASE}/{eid}/deliveries?status=pending", headers=h).json()
        assert [d["id"] for d in pending["items"]] == [failed["id"]]
        for resp in (page, second, pending):
            assert secret not in str(resp) and new not in str(resp)
