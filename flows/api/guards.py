"""What every request passes before any route, and every answer carries: the Host header
checked (against DNS rebinding), the body bounded before it is parsed (Content-Length or
chunked), and the security headers."""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.api.problems import problem_response

# The dashboard's and the API docs' scripts are files the app serves: no inline script, no
# other origin. plotly.js sets inline styles on what it draws.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def host_name(header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0] if header.count(":") == 1 else header


def host_allowed(header: str, allowed: list[str]) -> bool:
    host = host_name(header)
    if not host:
        return False
    return any(
        pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
        for pattern in allowed
    )


class Guards:
    """Pure ASGI middleware: the body is read here, at most max_body bytes, and handed on."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], max_body: int) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        async def refuse(status: int, detail: str) -> None:
            response = problem_response(Request(scope), status, detail, headers={"Connection": "close"})
            await response(scope, receive, send_with_headers)

        headers = Headers(scope=scope)
        if not host_allowed(headers.get("host", ""), self.allowed_hosts):
            await refuse(
                400,
                f"Host {host_name(headers.get('host', ''))!r} is not a name this API answers to "
                "(REFRESH_API_ALLOWED_HOSTS)",
            )
            return
        too_large = f"the request body is larger than {self.max_body} bytes (REFRESH_API_MAX_BODY_BYTES)"
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await refuse(400, f"Content-Length {length[:40]!r} is not a number of bytes")
            return
        if length is not None and int(length) > self.max_body:
            await refuse(413, too_large)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await refuse(413, too_large)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send_with_headers)
