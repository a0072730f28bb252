"""The API's request guards without a database: the Host check, the body limit and the
security headers (flows/api/guards.py) around a stand-in app, and the client address behind
proxies (flows/api/clients.py)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from flows.api.clients import client_address, networks
from flows.api.guards import Guards, host_allowed, host_name


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"length": len(await request.body())})


@pytest.fixture
def guarded() -> TestClient:
    app = Starlette(routes=[Route("/echo", echo, methods=["POST", "GET"])])
    return TestClient(Guards(app, ["testserver", "localhost"], max_body=1024))


def test_host_names() -> None:
    assert host_name("Example.COM:8000") == "example.com"
    assert host_name("[::1]:8000") == "::1" and host_name("::1") == "::1"
    assert host_allowed("a.example.com", ["*.example.com"]) and not host_allowed(
        "example.com", ["*.example.com"]
    )
    assert not host_allowed("", ["*"]) and host_allowed("anything", ["*"])


@pytest.mark.parametrize("host", ["evil.example", "[", "[::1", "a b", "localhost.evil.example"])
def test_a_foreign_or_garbled_host_is_a_400_problem(guarded: TestClient, host: str) -> None:
    resp = guarded.get("/echo", headers={"Host": host})
    assert resp.status_code == 400 and resp.headers["content-type"] == "application/problem+json"
    assert "REFRESH_API_ALLOWED_HOSTS" in resp.json()["detail"]
    assert resp.headers["x-frame-options"] == "DENY"


def test_bodies_up_to_the_limit_pass_whole_larger_ones_are_413(guarded: TestClient) -> None:
    assert guarded.post("/echo", content=b"x" * 1024).json() == {"length": 1024}
    assert guarded.post("/echo", content=iter([b"x" * 600, b"y" * 424])).json() == {"length": 1024}
    for body in (b"x" * 1025, iter([b"x" * 600, b"y" * 600])):
        resp = guarded.post("/echo", content=body)
        assert resp.status_code == 413 and "1024 bytes" in resp.json()["detail"]
        assert "content-security-policy" in resp.headers
    bad = guarded.post("/echo", content=b"x", headers={"Content-Length": "nope"})
    assert bad.status_code == 400


def _scope(peer: str | None, *headers: tuple[str, str]) -> dict[str, object]:
    return {
        "type": "http",
        "client": (peer, 1234) if peer else None,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


PROXIES = networks(["10.0.0.0/8", "192.0.2.1"])


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        ("127.0.0.1", [], "127.0.0.1"),
        ("203.0.113.1", [], "203.0.113.1"),
        ("203.0.113.1", [("X-Forwarded-For", "127.0.0.1")], None),
        ("127.0.0.1", [("Forwarded", "for=203.0.113.9")], None),
        ("10.1.2.3", [("X-Forwarded-For", "198.51.100.4")], "198.51.100.4"),
        ("10.1.2.3", [("X-Forwarded-For", "198.51.100.4, 192.0.2.1")], "198.51.100.4"),
        ("10.1.2.3", [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "198.51.100.4")], "198.51.100.4"),
        ("10.1.2.3", [("X-Forwarded-For", "10.0.0.9, 10.0.0.8")], "10.0.0.9"),
        ("10.1.2.3", [("X-Forwarded-For", "unknown")], None),
        ("10.1.2.3", [], None),
        ("::ffff:10.1.2.3", [("X-Forwarded-For", "::1")], "::1"),
        (None, [], None),
    ],
)
def test_the_client_address_behind_trusted_proxies_only(
    peer: str | None, headers: list[tuple[str, str]], client: str | None
) -> None:
    found = client_address(_scope(peer, *headers), PROXIES)
    assert found == (ip_address(client) if client else None)


def test_settings_with_hosts_and_proxies_stay_hashable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings is frozen and hashed (scale-out workers cache their clients per settings): the
    comma-separated settings parse to tuples, not lists."""
    from flows.core.settings import Settings

    monkeypatch.setenv("REFRESH_API_ALLOWED_HOSTS", "API.example.com, [::1]")
    monkeypatch.setenv("REFRESH_API_TRUSTED_PROXIES", "10.0.0.1,10.1.0.0/16")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.api_allowed_hosts == ("api.example.com", "::1")
    assert s.api_trusted_proxies == ("10.0.0.1", "10.1.0.0/16")
    assert hash(s) == hash(s.model_copy())
