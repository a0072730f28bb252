"""A real HTTP receiver for webhook tests and the bench: verifies every delivery with the
`standardwebhooks` library, answers from a script of status codes."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int
    verified_with: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog (5) drops concurrent connects: 1 s SYN retries
    daemon_threads = True


class Receiver:
    """Answers `script` codes in order (then `default`), after `delay_s`, with `body_out` (one
    byte every `dribble_s` when set); records everything."""

    def __init__(self, secrets: list[str] | None = None, script: list[int] | None = None, default: int = 200):
        self.secrets = list(secrets or [])
        self.script = list(script or [])
        self.default = default
        self.delay_s = 0.0
        self.dribble_s = 0.0
        self.body_out = b"ok"
        self.headers_out: dict[str, str] = {}
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # else each small response waits ~40 ms for an ACK

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = []
                for s in receiver.secrets:
                    try:
                        Webhook(s).verify(body, headers)
                        verified.append(s)
                    except WebhookVerificationError:
                        pass
                with receiver._lock:
                    code = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver.received.append(Received(headers, body, code, verified))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                try:
                    self.send_response(code)
                    for k, v in receiver.headers_out.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(receiver.body_out)))
                    self.end_headers()
                    if not receiver.dribble_s:
                        self.wfile.write(receiver.body_out)
                    for i in range(len(receiver.body_out) if receiver.dribble_s else 0):
                        self.wfile.write(receiver.body_out[i : i + 1])
                        self.wfile.flush()
                        time.sleep(receiver.dribble_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up waiting (a timeout under test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
