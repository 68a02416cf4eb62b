"""HAProxy PROXY protocol (v1 and v2) on interfaces configured for it [1, 4.8].

Twisted's own wrapper starts the wrapped protocol as soon as the TCP connection is up,
so a session that asks for its peer at connect time gets the load balancer's address.
This wrapper starts the session only once the header has been read, so the session,
its logs, the session limit and SSO all see the real client.  A header that is
malformed, too long, or does not arrive within C{HEADER_TIMEOUT} closes the connection.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser  # Twisted's parsers: no public name
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

#: seconds a load balancer has to send the header
HEADER_TIMEOUT = 10.0
_V2_SIGNATURE = V2Parser.PREFIX
_V1_SIGNATURE = b"PROXY "
#: v2: 16 bytes of fixed header + at most 216 of TCP/UNIX addresses; v1: 107
MAX_HEADER = 16 + 216


class ProxyHeaderWrapper(ProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol."""

    log = Logger()
    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[arg-type]
        self._source: IAddress | None = None
        self._destination: IAddress | None = None
        self._buffer = b""
        self._started = False
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._refuse, "no PROXY header in time")

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        buffered = self._buffer
        parser: V1Parser | V2Parser
        if buffered.startswith(_V2_SIGNATURE):
            parser = V2Parser()
        elif buffered.startswith(_V1_SIGNATURE):
            parser = V1Parser()
        elif _V2_SIGNATURE.startswith(buffered) or _V1_SIGNATURE.startswith(buffered):
            return  # too short to tell yet
        else:
            self._refuse("connection does not start with a PROXY header")
            return
        try:
            info, remaining = parser.feed(buffered)
        except InvalidProxyHeader:
            self._refuse("malformed PROXY header")
            return
        if info is None:
            if len(buffered) > MAX_HEADER:
                self._refuse("PROXY header too long")
            return
        if not _is_ip(info.source) or not _is_ip(info.destination):
            self._refuse("PROXY header without valid client and server addresses")
            return
        self._buffer = b""
        self._source, self._destination = info.source, info.destination
        self._started = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    def _refuse(self, reason: str) -> None:
        assert self.transport is not None
        self.log.info("Closing connection from {client}: {reason}", client=str(self.transport.getPeer()), reason=reason)
        self._buffer = b""
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def getPeer(self) -> IAddress:
        if self._source is not None:
            return self._source
        assert self.transport is not None
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._destination is not None:
            return self._destination
        assert self.transport is not None
        return self.transport.getHost()


def _is_ip(address: IAddress | None) -> bool:
    host = getattr(address, "host", None)
    try:
        ipaddress.ip_address(host)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


class ProxyHeaderFactory(WrappingFactory):
    """Wraps a factory so that its connections start after the PROXY header."""

    protocol = ProxyHeaderWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrappedFactory: Any, clock: IReactorTime) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
