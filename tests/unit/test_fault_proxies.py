"""The fault harness's proxies (tests/faults.py) do what the fault tests count on."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faults import FaultProxy, HttpFaultProxy, _H2Calls


def _frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + stream.to_bytes(4, "big") + payload


def test_h2_calls_are_headers_frames_opening_new_streams_across_chunk_boundaries() -> None:
    seen: list[int] = []
    calls = _H2Calls(lambda *_: seen.append(1), None, None)  # type: ignore[arg-type]
    stream = (
        _H2Calls.PREFACE
        + _frame(0x4, 0, b"\x00" * 6)  # SETTINGS
        + _frame(0x1, 1, b"h" * 30)  # call 1
        + _frame(0x0, 1, b"d" * 100)  # its DATA
        + _frame(0x1, 3, b"h" * 10)  # call 2
        + _frame(0x1, 3, b"t" * 5)  # trailers of stream 3: not a new call
        + _frame(0x8, 0, b"\x00" * 4)  # WINDOW_UPDATE
        + _frame(0x1, 5, b"")  # call 3
    )
    for i in range(0, len(stream), 7):  # split anywhere, even inside a frame header
        calls.feed(stream[i : i + 7])
    assert len(seen) == 3


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> object:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _get(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/x")
        return conn.getresponse().status
    finally:
        conn.close()


def test_http_proxy_fails_its_share_of_requests_kinds_in_turn(upstream: int) -> None:
    with HttpFaultProxy(upstream, rate=0.3, kinds=("429", "503", "reset"), seed=1) as proxy:
        outcomes = []
        for _ in range(100):
            try:
                outcomes.append(_get(proxy.port))
            except (ConnectionError, http.client.HTTPException):
                outcomes.append(0)
    assert proxy.calls == 100
    failed = sum(proxy.injected.values())
    assert 15 <= failed <= 45, proxy.injected
    assert outcomes.count(200) == 100 - failed
    assert outcomes.count(429) == proxy.injected["429"] and outcomes.count(503) == proxy.injected["503"]
    assert outcomes.count(0) == proxy.injected["reset"]
    assert max(proxy.injected.values()) - min(proxy.injected.values()) <= 1


def test_tcp_proxy_without_a_rate_forwards_everything(upstream: int) -> None:
    with FaultProxy(upstream) as proxy:
        assert [_get(proxy.port) for _ in range(5)] == [200] * 5
        proxy.reset()
        with pytest.raises((ConnectionError, http.client.HTTPException, socket.timeout)):
            _get(proxy.port)
