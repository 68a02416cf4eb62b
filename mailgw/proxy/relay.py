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

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
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


#: seconds a closing connection gets to flush its last words and the TLS close alert
#: before it is aborted [4.1]: closing means closed, whether or not the peer reads
CLOSE_GRACE = 2.0


def _discard(data: bytes) -> None:
    pass


def _abort(transport: ITransport) -> None:
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()


def close_transport(transport: ITransport, clock: IReactorTime, grace: float = CLOSE_GRACE) -> IDelayedCall:
    """Close C{transport} politely (what is buffered, then the TLS close alert) and
    abort it if it is not gone after C{grace} seconds [4.1].  Returns the timer, which
    the owner cancels when the connection is lost."""
    transport.loseConnection()
    return clock.callLater(grace, _abort, transport)


def cancel_timer(timer: IDelayedCall | None) -> None:
    """Cancel C{timer} if it is still pending."""
    if timer is not None and timer.active():
        timer.cancel()


@implementer(IPushProducer)
class _Pauses:
    """One side as the other's producer, for flow control only.  Twisted stops a lost
    transport's producer, and stopping a transport closes it raw (no goodbye, no TLS
    close alert, a reset if the peer is still sending): the relay closes each side
    itself [4.1]."""

    __slots__ = ("_transport",)

    def __init__(self, transport: ITransport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        pass


class Relay:
    """Joins the client transport and the upstream transport of one session.

    The protocols on either side hand every chunk to L{from_client} /
    L{from_server} (they rebind their C{dataReceived} to these methods, so the hot
    path has no branch).  Closing either side closes the other; a side that is not
    gone L{CLOSE_GRACE} seconds after the close is aborted, so a peer that stops
    reading cannot hold the other connection [4.1].
    """

    __slots__ = (
        "_client",
        "_client_gone",
        "_client_timer",
        "_clock",
        "_info",
        "_seconds",
        "_server",
        "_server_gone",
        "_server_timer",
        "_to_client",
        "_to_server",
        "closed",
    )

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
        self._clock = clock
        self._seconds = clock.seconds
        self.closed = False
        self._client_gone = False
        self._server_gone = False
        self._client_timer: IDelayedCall | None = None
        self._server_timer: IDelayedCall | None = None
        if stage is not None:
            stage.attach(self._server.write, self._client.write)
            self._to_server: Sink = stage.from_client
            self._to_client: Sink = stage.from_server
        else:
            self._to_server = server.write
            self._to_client = client.write

    def start(self) -> None:
        """Register each side as the other's producer (flow control both ways)."""
        self._server.registerProducer(_Pauses(self._client), True)  # type: ignore[attr-defined]
        self._client.registerProducer(_Pauses(self._server), True)  # type: ignore[attr-defined]

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

    def close(self, goodbye: bytes = b"") -> None:
        """Close both sides once: C{goodbye} (the protocol's last words) to the
        client, then each side's close, aborted after L{CLOSE_GRACE} seconds."""
        if self.closed:
            return
        self.closed = True
        # Nothing more is passed on: a side that is still sending while the other
        # closes must not fill the closing side's buffer.
        self._to_server = self._to_client = _discard
        for transport in (self._client, self._server):
            try:
                transport.unregisterProducer()  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):
                pass
        if not self._client_gone:
            if goodbye:
                self._client.write(goodbye)
            self._client_timer = close_transport(self._client, self._clock)
        if not self._server_gone:
            # The server side may have been paused by the client's back-pressure:
            # let it read the server's close alert (what it reads is discarded).
            resume = getattr(self._server, "resumeProducing", None)
            if resume is not None:
                resume()
            self._server_timer = close_transport(self._server, self._clock)

    @property
    def server_gone(self) -> bool:
        """The server connection is gone."""
        return self._server_gone

    def client_lost(self) -> None:
        """The client connection is gone: close the server side."""
        self._client_gone = True
        cancel_timer(self._client_timer)
        self.close()

    def server_lost(self, goodbye: bytes = b"") -> None:
        """The server connection is gone: close the client side (after C{goodbye})."""
        self._server_gone = True
        cancel_timer(self._server_timer)
        self.close(goodbye)
