"""The relay after login [4.6]: bytes both ways without parsing.

Each direction is one Python call per chunk the transport delivers: count it, note the
time, write it to the other side.  Flow control is the transports' own: each side is
registered as the streaming producer of the other, so when one side's write buffer
fills up Twisted pauses reading on the other (no unbounded buffering).

Content inspection [4.9] plugs in as an L{IRelayStage}: a session whose policy inspects
gets a stage between the two sides; the others keep the direct path.  A stage is
producer/consumer-aware: it writes through an L{IStageEnds}, can hold (pause the reading
of) either side while it waits for a verdict, is told when a side's write buffer fills
or drains, and when the relay closes.  A side is read only when neither the other
side's full buffer nor the stage holds it, so the bounded-buffering rule holds.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
from zope.interface import Attribute, Interface, implementer

from mailgw.proxy.registry import SessionInfo

Sink = Callable[[bytes], None]


class IStageEnds(Interface):
    """What a stage writes to and controls: the two sides of the relay."""

    def to_client(data: bytes) -> None:
        """Write to the client."""

    def to_server(data: bytes) -> None:
        """Write to the mail server."""

    def hold_client(held: bool) -> None:
        """Stop (C{True}) or allow again (C{False}) reading from the client."""

    def hold_server(held: bool) -> None:
        """Stop (C{True}) or allow again (C{False}) reading from the mail server."""

    def end(reason: str, goodbye: bytes) -> None:
        """End the session: C{goodbye} to the client, both sides closed, C{reason} logged."""


class IRelayStage(Interface):
    """A filter put between client and server by a session's policy [4.9]."""

    name = Attribute("Short name of the stage, for logs.")

    def attach(ends: IStageEnds) -> None:
        """Where the stage writes what it lets through, and how it holds a side."""

    def from_client(data: bytes) -> None:
        """Bytes the client sent; the stage calls C{ends.to_server} with what passes."""

    def from_server(data: bytes) -> None:
        """Bytes the server sent; the stage calls C{ends.to_client} with what passes."""

    def client_writable(writable: bool) -> None:
        """The client's write buffer is full (C{False}) or has room again (C{True}):
        a stage writing much (a spooled message) waits for C{True}."""

    def server_writable(writable: bool) -> None:
        """The same for the mail server's write buffer."""

    def closed() -> None:
        """The relay is closing (either side went, or the session ends): nothing more
        is written; release what the stage holds (spools, scans)."""


@implementer(IRelayStage)
class PassThrough:
    """A stage that changes nothing (the reference for stage authors and tests)."""

    name = "pass-through"

    def __init__(self) -> None:
        self.ends: IStageEnds | None = None

    def attach(self, ends: IStageEnds) -> None:
        self.ends = ends

    def from_client(self, data: bytes) -> None:
        _attached(self.ends).to_server(data)

    def from_server(self, data: bytes) -> None:
        _attached(self.ends).to_client(data)

    def client_writable(self, writable: bool) -> None:
        pass

    def server_writable(self, writable: bool) -> None:
        pass

    def closed(self) -> None:
        pass


def _attached(ends: IStageEnds | None) -> IStageEnds:
    if ends is None:
        raise RuntimeError("relay stage used before attach()")
    return ends


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


@implementer(IPushProducer)
class _Valve:
    """One side as the other's producer when a stage sits between them: the side is
    read only while neither the other side's full write buffer nor the stage holds
    it, and the stage hears when the other side's buffer fills or drains."""

    __slots__ = ("_by_peer", "_by_stage", "_transport", "_writable")

    def __init__(self, transport: ITransport, writable: Callable[[bool], None]) -> None:
        self._transport = transport
        #: told whether the transport this valve is registered with can take more
        self._writable = writable
        self._by_peer = False
        self._by_stage = False

    def _set(self, by_peer: bool, by_stage: bool) -> None:
        was = self._by_peer or self._by_stage
        self._by_peer, self._by_stage = by_peer, by_stage
        now = by_peer or by_stage
        if now and not was:
            self._transport.pauseProducing()  # type: ignore[attr-defined]
        elif was and not now:
            self._transport.resumeProducing()  # type: ignore[attr-defined]

    def hold(self, held: bool) -> None:
        self._set(self._by_peer, held)

    def pauseProducing(self) -> None:
        self._set(True, self._by_stage)
        self._writable(False)

    def resumeProducing(self) -> None:
        self._set(False, self._by_stage)
        self._writable(True)

    def stopProducing(self) -> None:
        pass


@implementer(IStageEnds)
class _Ends:
    """The relay's sides as a stage sees them."""

    __slots__ = ("_relay", "client_valve", "end", "server_valve", "to_client", "to_server")

    def __init__(self, relay: Relay, stage: IRelayStage, end: Callable[[str, bytes], None]) -> None:
        self.to_client: Sink = relay._client.write
        self.to_server: Sink = relay._server.write
        #: the client side, registered with the server transport
        self.client_valve = _Valve(relay._client, stage.server_writable)
        #: the server side, registered with the client transport
        self.server_valve = _Valve(relay._server, stage.client_writable)
        self.end = end

    def hold_client(self, held: bool) -> None:
        self.client_valve.hold(held)

    def hold_server(self, held: bool) -> None:
        self.server_valve.hold(held)


def _no_end(reason: str, goodbye: bytes) -> None:
    raise RuntimeError("this relay has no session to end")


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
        "_ends",
        "_info",
        "_seconds",
        "_server",
        "_server_gone",
        "_server_timer",
        "_stage",
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
        end: Callable[[str, bytes], None] = _no_end,
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
        self._stage = stage
        self._ends: _Ends | None = None
        if stage is not None:
            self._ends = _Ends(self, stage, end)
            stage.attach(self._ends)
            self._to_server: Sink = stage.from_client
            self._to_client: Sink = stage.from_server
        else:
            self._to_server = server.write
            self._to_client = client.write

    def start(self) -> None:
        """Register each side as the other's producer (flow control both ways; through
        the stage's valves when there is a stage)."""
        ends = self._ends
        if ends is None:
            self._server.registerProducer(_Pauses(self._client), True)  # type: ignore[attr-defined]
            self._client.registerProducer(_Pauses(self._server), True)  # type: ignore[attr-defined]
        else:
            self._server.registerProducer(ends.client_valve, True)  # type: ignore[attr-defined]
            self._client.registerProducer(ends.server_valve, True)  # type: ignore[attr-defined]

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
        if self._ends is not None:
            self._ends.to_client = self._ends.to_server = _discard
            assert self._stage is not None
            self._stage.closed()
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
