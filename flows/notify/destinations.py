"""Where webhook deliveries may go: the address rules (the SSRF guard) and the HTTP transport
that connects only to the address the guard vetted, each attempt within one deadline.

The host is resolved once, every address it resolves to is judged, and the connection goes to
the vetted address: the HTTP client never resolves the name again, so a DNS answer that
changes between the check and the connect (DNS rebinding) cannot redirect a delivery. TLS
still verifies the certificate for the host name (the URL keeps it; only the TCP connect is
pinned).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

from flows.core.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses it resolves to; injectable so tests never ask real DNS.
Resolver = Callable[[str, int], list[str]]

# Cloud instance metadata and host services: credentials live there. Refused even when private
# targets are allowed. The link-local ones (169.254.169.254 and friends) are refused as
# link-local anyway; these are the ones outside 169.254.0.0/16 and fe80::/10.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean...
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer
        "192.0.0.192",  # Oracle Cloud (classic)
        "fd00:ec2::254",  # AWS IMDS over IPv6
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
BROADCAST = ipaddress.ip_address("255.255.255.255")
PRIVATE_HINT = "set REFRESH_WEBHOOK_ALLOW_PRIVATE=true to allow loopback and private ones"


class DestinationRefused(ConfigError):
    """The URL's host does not resolve, or resolves to an address deliveries must not reach."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: IPv4-mapped, 6to4 (2002::/16) or NAT64."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(address: str, allow_private: bool) -> str | None:
    """Why a delivery must not go to `address`, or None when it may.

    Anything not globally routable is refused (loopback, private, shared 100.64.0.0/10,
    reserved, documentation ranges); `allow_private` lets those through but never link-local,
    metadata, multicast, broadcast or unspecified addresses.
    """
    ip = ipaddress.ip_address(address.split("%")[0])
    inner = _embedded_ipv4(ip)
    if inner is not None:
        # Judged by the IPv4 host it reaches; ::ffff:a.b.c.d is that host itself.
        verdict = refusal(str(inner), allow_private)
        if verdict is not None or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped):
            return verdict
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata service"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast or ip.is_unspecified or ip == BROADCAST:
        return "multicast, broadcast or unspecified"
    if not allow_private and not ip.is_global:
        return "loopback, private or otherwise not globally routable"
    return None


def host_of(url: str) -> tuple[str, int]:
    """The host as the HTTP client connects to it (IDNA-encoded, IPv6 without brackets), and
    the port."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise DestinationRefused(f"webhook URL is malformed ({exc})") from None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.raw_host.decode("ascii"), port


def vet(url: str, allow_private: bool, resolver: Resolver = system_resolver) -> str:
    """The address to connect to for `url`: its host resolved once, every address judged (one
    bad address refuses the host: a later connect could pick it)."""
    host, port = host_of(url)
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise DestinationRefused(f"webhook host {host!r} does not resolve ({exc})") from None
    if not addresses:
        raise DestinationRefused(f"webhook host {host!r} does not resolve")
    refused = {a: why for a in addresses if (why := refusal(a, allow_private)) is not None}
    if refused:
        named = ", ".join(f"{a} ({why})" for a, why in sorted(refused.items()))
        if allow_private:
            raise DestinationRefused(
                f"webhook host {host!r} resolves to {named}: refused even with "
                "REFRESH_WEBHOOK_ALLOW_PRIVATE=true (link-local, metadata, multicast and broadcast "
                "addresses are never allowed)"
            )
        raise DestinationRefused(
            f"webhook host {host!r} resolves to {named}: deliveries to loopback, link-local or "
            f"private addresses are refused; {PRIVATE_HINT} (link-local and metadata addresses "
            "stay refused)"
        )
    return addresses[0]


# --- the transport -------------------------------------------------------------------------


class _Deadline(threading.local):
    at: float | None = None


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most what is left of the attempt."""

    def __init__(self, inner: httpcore.NetworkStream, backend: _PinnedBackend) -> None:
        self._inner, self._backend = inner, backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = self._backend.left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left), self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()
        self.pins: dict[str, str] = {}
        self.deadline = _Deadline()

    def left(self, timeout: float | None, error: type[httpcore.TimeoutException]) -> float:
        at = self.deadline.at
        if at is None:
            raise error("no attempt deadline set")
        remaining = at - time.monotonic()
        if remaining <= 0:
            raise error("the attempt's deadline passed")
        return remaining if timeout is None else min(timeout, remaining)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        address = self.pins.get(host)
        if address is None:
            raise httpcore.ConnectError(f"{host} was not vetted: refused")
        left = self.left(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(address, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are not delivered over Unix sockets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport with a network backend that connects a host name only to the address
    pinned for it, and never past the attempt's deadline. No proxy from the environment: a
    proxy would resolve the name itself."""

    def __init__(self, socket_options: Iterable[Any] | None = None) -> None:
        super().__init__(trust_env=False)
        self._backend = _PinnedBackend()
        limits = httpx.Limits()
        # httpx has no public way to hand its pool a network backend: build the pool as it
        # would, with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            socket_options=socket_options,
            network_backend=self._backend,
        )

    @contextmanager
    def attempt(self, url: str, address: str, timeout_s: float) -> Iterator[None]:
        """Within: `url`'s host connects to `address` only, and all I/O ends `timeout_s` from now."""
        host, _port = host_of(url)
        self._backend.pins[host] = address
        self._backend.deadline.at = time.monotonic() + timeout_s
        try:
            yield
        finally:
            self._backend.deadline.at = None
