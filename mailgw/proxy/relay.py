"""The relay after login [4.6]: bytes both ways without parsing.

Each direction is one Python call per chunk the transport delivers: count it, note the
time, write it to the other side.  Flow control is the transports' own: each side is
registered as the streaming producer of the other, so when one side's write buffer
fills up Twisted pauses reading on the other (no unbounded buffering).

Content inspection [4.9] plugs in as an L{IRelayStage}: a session whose policy inspects
gets a stage between the two sides; the others keep the direct path.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime, ITransport
from zope.interface import Attribute, Interface, implementer

from mailgw.proxy.registry import SessionInfo

Sink = Callable[[bytes], None]


class IRelayStage(Interface):
    """A filter put between client and server by a session's policy [4.9]."""

    name = Attribute("Short name of the stage, for logs.")

    def attach(to_server: Sink, to_client: Sink) -> None:
        """Where the stage writes what it lets through, in each direction."""

    def from_client(data: bytes) -> None:
        """Bytes the client sent; the stage calls C{to_server} with what passes."""

    def from_server(data: bytes) -> None:
        """Bytes the server sent; the stage calls C{to_client} with what passes."""


@implementer(IRelayStage)
class PassThrough:
    """A stage that changes nothing (the reference for stage authors and tests)."""

    name = "pass-through"

    def __init__(self) -> None:
        self._to_server: Sink = _unattached
        self._to_client: Sink = _unattached

    def attach(self, to_server: Sink, to_client: Sink) -> None:
        self._to_server = to_server
        self._to_client = to_client

    def from_client(self, data: bytes) -> None:
        self._to_server(data)

    def from_server(self, data: bytes) -> None:
        self._to_client(data)


def _unattached(data: bytes) -> None:
    raise RuntimeError("relay stage used before attach()")


class Relay:
    """Joins the client transport and the upstream transport of one session.

    The protocols on either side hand every chunk to L{from_client} /
    L{from_server} (they rebind their C{dataReceived} to these methods, so the hot
    path has no branch).  Closing either side closes the other.
    """

    def __init__(
        self,
        info: SessionInfo,
        client: ITransport,
        server: ITransport,
        clock: IReactorTime,
        stage: IRelayStage | None = None,
    ) -> None:
        self._info = info
        self._client = client
        self._server = server
        self._seconds = clock.seconds
        self.closed = False
        if stage is not None:
            stage.attach(self._server.write, self._client.write)
            self._to_server: Sink = stage.from_client
            self._to_client: Sink = stage.from_server
        else:
            self._to_server = server.write
            self._to_client = client.write

    def start(self) -> None:
        """Register each side as the other's producer (flow control both ways)."""
        self._server.registerProducer(self._client, True)  # type: ignore[attr-defined]
        self._client.registerProducer(self._server, True)  # type: ignore[attr-defined]

    def from_client(self, data: bytes) -> None:
        info = self._info
        info.bytes_from_client += len(data)
        info.last_activity = self._seconds()
        self._to_server(data)

    def from_server(self, data: bytes) -> None:
        info = self._info
        info.bytes_to_client += len(data)
        info.last_activity = self._seconds()
        self._to_client(data)

    def close(self) -> None:
        """Close both sides once; whatever is buffered is still written."""
        if self.closed:
            return
        self.closed = True
        for transport in (self._client, self._server):
            try:
                transport.unregisterProducer()  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):
                pass
            transport.loseConnection()
