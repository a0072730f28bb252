"""Fault injection for tests: proxies in front of a server that stall, drop or refuse.

    with FaultProxy(target_port) as proxy:
        settings = get_settings(bq_storage_endpoint=f"127.0.0.1:{proxy.port}")
        proxy.stall()        # stop forwarding, keep every socket open (a hung peer)
        proxy.stall_after(n) # forward n more bytes from the server, then stall
        proxy.reset()        # drop every connection (RST) and refuse new ones (a dead peer)
        proxy.resume()       # forward again (held bytes are delivered)
        proxy.fail_calls(0.1)  # from now on 10 % of gRPC calls hit a reset or a stall

    with HttpFaultProxy(target_port, rate=0.1) as rest:  # 10 % of HTTP requests fail
        settings = get_settings(bq_endpoint=rest.url)

One thread accepts; two threads per connection pump bytes. Stalled pumps hold the chunk they
read, so TCP back-pressure stops the sender; nothing is lost when forwarding resumes.

Rate-based faults hit calls drawn by a seeded random generator, their kinds taken in turn: for gRPC (HTTP/2) a
call is a HEADERS frame opening a new stream, seen by reading the frame headers the client
sends (nothing is rewritten). Answering a gRPC status (UNAVAILABLE, RESOURCE_EXHAUSTED) would
mean re-encoding HPACK headers on a connection whose compression state both ends share, so
there a faulty call resets its connection (every stream on it fails UNAVAILABLE) or stalls it
for `stall_s` and then resets it (a hung peer that dies). The HTTP proxy answers REST calls
itself: 429 or 503 with BigQuery's error body, a reset, or a stall then a reset; a faulty
request is never forwarded, so the server never acts on a request the client sees fail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


def _abort(sock: socket.socket) -> None:
    """Close with RST, as a peer whose process died."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._down = False
        self._closed = False
        self._budget: int | None = None  # server->client bytes left before a stall
        self.stalled_at: float | None = None  # time.monotonic() of the last stall
        self._socks: list[socket.socket] = []
        self._rate = 0.0
        self._kinds: tuple[str, ...] = ()
        self._stall_s = 0.0
        self._rng = random.Random(0)
        self.calls = 0  # gRPC calls seen (new streams)
        self.injected: Counter[str] = Counter()  # faults injected, by kind
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"fault-proxy-{self.port}")
        self._thread.start()

    # --- faults ---------------------------------------------------------------------------

    def stall(self) -> None:
        with self._lock:
            self._forwarding.clear()
            self.stalled_at = time.monotonic()

    def stall_after(self, server_bytes: int) -> None:
        with self._lock:
            self._budget = server_bytes

    def reset(self) -> None:
        with self._lock:
            self._down = True
            socks, self._socks = self._socks, []
        for s in socks:
            _abort(s)

    def fail_calls(
        self, rate: float, kinds: tuple[str, ...] = ("reset", "stall"), stall_s: float = 3.0, seed: int = 0
    ) -> None:
        """From now on each new gRPC call fails with probability `rate`, by one of `kinds`."""
        with self._lock:
            self._rate, self._kinds, self._stall_s = rate, kinds, stall_s
            self._rng = random.Random(seed)

    def resume(self) -> None:
        with self._lock:
            self._down = False
            self._budget = None
            self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self.reset()
        self._forwarding.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._down:
                _abort(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _abort(client)
                continue
            with self._lock:
                self._socks += [client, server]
            calls = _H2Calls(self._on_call, client, server)
            threading.Thread(target=self._pump, args=(client, server, False, calls), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _take(self, n: int) -> int:
        """How many of n server bytes may pass before the stall (all of them if none is set)."""
        with self._lock:
            if self._budget is None:
                return n
            allowed = min(n, self._budget)
            self._budget -= allowed
            if self._budget == 0:
                self._budget = None
                self._forwarding.clear()
                self.stalled_at = time.monotonic()
            return allowed

    def _on_call(self, client: socket.socket, server: socket.socket) -> None:
        """A new gRPC call on this connection: maybe its fault, before it is forwarded."""
        with self._lock:
            self.calls += 1
            if not self._rate or self._rng.random() >= self._rate:
                return
            kind = self._kinds[sum(self.injected.values()) % len(self._kinds)]
            self.injected[kind] += 1
        if kind == "stall":
            time.sleep(self._stall_s)  # this pump forwards nothing meanwhile
        _abort(client)
        _abort(server)
        raise OSError(f"injected {kind}")

    def _pump(
        self, src: socket.socket, dst: socket.socket, from_server: bool, calls: _H2Calls | None = None
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if calls is not None:
                    calls.feed(data)
                while data:
                    self._forwarding.wait()
                    if self._closed or self._down:
                        raise OSError("proxy dropped the connection")
                    n = self._take(len(data)) if from_server else len(data)
                    dst.sendall(data[:n])
                    data = data[n:]
        except OSError:
            pass
        finally:
            _abort(src)
            _abort(dst)


class _H2Calls:
    """Reads the frame headers of an HTTP/2 client's byte stream; calls `on_call` for each
    HEADERS frame that opens a new stream. Anything else (not HTTP/2) is passed over."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, on_call: object, client: socket.socket, server: socket.socket) -> None:
        self._on_call = on_call
        self._args = (client, server)
        self._buf = b""
        self._skip = len(self.PREFACE)
        self._last_stream = 0

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            if self._skip:
                n = min(self._skip, len(self._buf))
                self._buf, self._skip = self._buf[n:], self._skip - n
                if self._skip:
                    return
            if len(self._buf) < 9:
                return
            length = int.from_bytes(self._buf[:3], "big")
            kind, stream = self._buf[3], int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            self._buf, self._skip = self._buf[9:], length
            if kind == 0x1 and stream > self._last_stream:
                self._last_stream = stream
                self._on_call(*self._args)  # type: ignore[operator]


class HttpFaultProxy:
    """An HTTP/1.1 proxy that fails `rate` of the requests it receives, by one of `kinds`:
    "429" / "503" (answered with BigQuery's JSON error body), "reset" (RST, no answer),
    "stall" (no answer for `stall_s`, then RST). Other requests go to the target unchanged."""

    def __init__(
        self,
        target_port: int,
        rate: float = 0.0,
        kinds: tuple[str, ...] = ("429", "503", "reset", "stall"),
        stall_s: float = 2.0,
        seed: int = 0,
        target_host: str = "127.0.0.1",
    ) -> None:
        self.target = (target_host, target_port)
        self.rate, self.kinds, self.stall_s = rate, kinds, stall_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls = 0
        self.injected: Counter[str] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                fault = proxy._draw()
                if fault in ("reset", "stall"):
                    if fault == "stall":
                        time.sleep(proxy.stall_s)
                    self.close_connection = True
                    _abort(self.connection)
                    return
                if fault:
                    code = int(fault)
                    reason, status = _REASONS.get(code, ("backendError", "UNAVAILABLE"))
                    err = {"code": code, "message": f"injected {code}", "status": status}
                    self._answer(
                        code, [], json.dumps({"error": {**err, "errors": [{"reason": reason}]}}).encode()
                    )
                    return
                conn = http.client.HTTPConnection(*proxy.target, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self._answer(
                        resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data
                    )
                finally:
                    conn.close()

            def _answer(self, code: int, headers: list[tuple[str, str]], body: bytes) -> None:
                try:
                    self.send_response(code)
                    for k, v in headers:
                        if k.lower() != "content-length":
                            self.send_header(k, v)
                    if not headers:  # an answer of the proxy's own
                        self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _draw(self) -> str | None:
        with self._lock:
            self.calls += 1
            if not self.rate or self._rng.random() >= self.rate:
                return None
            kind = self.kinds[sum(self.injected.values()) % len(self.kinds)]
            self.injected[kind] += 1
            return kind

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HttpFaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REASONS = {429: ("rateLimitExceeded", "RESOURCE_EXHAUSTED"), 503: ("backendError", "UNAVAILABLE")}
_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "host",
}
