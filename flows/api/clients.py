"""Who is asking: the client's address (behind the trusted proxies only) and whether it may
read without a token. Decided per request from the connection, whatever server runs the app."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from starlette.datastructures import Headers
from starlette.types import Scope

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _trusted(ip: IPAddress, proxies: tuple[Network, ...]) -> bool:
    # An IPv4 peer may arrive as ::ffff:a.b.c.d on a dual-stack socket.
    plain = ip.ipv4_mapped if isinstance(ip, IPv6Address) and ip.ipv4_mapped else ip
    return any(plain in net for net in proxies)


def client_address(scope: Scope, proxies: tuple[Network, ...]) -> IPAddress | None:
    """The client's address, or None when it cannot be known.

    A peer that is a trusted proxy: the right-most X-Forwarded-For entry that is not a trusted
    proxy itself (a proxy that names no client leaves it unknown). Any other peer: itself,
    unless the request carries forwarding headers, which only a proxy we were told about may
    set (a server in front that rewrote the peer from them, such as uvicorn's proxy headers,
    leaves them in place, so such a request is never taken for a local one either).
    """
    peer = _ip(scope["client"][0]) if scope.get("client") else None
    headers = Headers(scope=scope)
    forwarded = [e.strip() for v in headers.getlist("x-forwarded-for") for e in v.split(",") if e.strip()]
    if peer is None or not _trusted(peer, proxies):
        return None if forwarded or "forwarded" in headers else peer
    hops = [_ip(e) for e in forwarded]
    if not hops or any(h is None for h in hops):
        return None
    for hop in reversed(hops):
        assert hop is not None
        if not _trusted(hop, proxies):
            return hop
    return hops[0]


def is_loopback(scope: Scope, proxies: tuple[Network, ...]) -> bool:
    ip = client_address(scope, proxies)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback
