"""Fault injection for tests: a TCP proxy in front of a server that can stall or drop.

    with FaultProxy(target_port) as proxy:
        settings = get_settings(bq_storage_endpoint=f"127.0.0.1:{proxy.port}")
        proxy.stall()        # stop forwarding, keep every socket open (a hung peer)
        proxy.stall_after(n) # forward n more bytes from the server, then stall
        proxy.reset()        # drop every connection (RST) and refuse new ones (a dead peer)
        proxy.resume()       # forward again (held bytes are delivered)

One thread accepts; two threads per connection pump bytes. Stalled pumps hold the chunk they
read, so TCP back-pressure stops the sender; nothing is lost when forwarding resumes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
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
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
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

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
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
