"""Who is asking: the client address the per-client token bucket is keyed on."""

from __future__ import annotations

import functools
import ipaddress

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The peer; or, when the peer is a trusted proxy, the right-most untrusted hop of
    X-Forwarded-For. Hops a client wrote itself (to the left) are never believed, so a spoofed
    header from an untrusted peer changes nothing."""
    peer = request.remote or ""
    if "X-Forwarded-For" not in request.headers or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    for hop in reversed([h for h in hops if h]):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a trusted proxy never writes this; believe nothing further left
        if not any(address in net for net in trusted):
            return str(address)
    return peer


@functools.lru_cache(maxsize=4096)  # peers repeat (keep-alive, proxies): parse each once
def is_trusted(peer: str, trusted: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in trusted)
