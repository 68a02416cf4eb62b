"""Client endpoints for configured addresses.

A host that is an IP address gets a plain TCP endpoint: Twisted's C{HostnameEndpoint}
would resolve it anyway, in a thread, on every connection (the benchmark's profile
showed that lookup as a fifth of the gateway's CPU per session).  Names go through
C{HostnameEndpoint} (resolved without blocking, every address tried).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = ["tcp_client_endpoint"]


def tcp_client_endpoint(reactor: object, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP endpoint to C{host} (an IP address, in brackets or not, or a name) and
    C{port}, giving up connecting after C{timeout} seconds."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)  # type: ignore[arg-type]
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, literal, port, timeout=timeout)  # type: ignore[arg-type]
    return TCP4ClientEndpoint(reactor, literal, port, timeout=timeout)  # type: ignore[arg-type]
