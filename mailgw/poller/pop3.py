"""The poller's POP3 client after login: CAPA, UIDL/LIST, streamed RETR, DELE, QUIT.

The login itself (greeting, STLS, USER/PASS, with certificate verification) is the
gateway's upstream login client (L{mailgw.upstream.pop3.POP3UpstreamLogin}), reached
through the L{mailgw.upstream.Connector}; once it succeeds, its connection is handed
to a L{Pop3Session}, which drives the TRANSACTION state with the codec of
L{mailgw.wire.pop3}.

Commands may be pipelined (the answers are matched in order).  A ``RETR`` answer is
not collected: its body flows, still dot-stuffed, to a L{RetrConsumer} chunk by chunk,
and reading from the server can be paused (L{ReadGate}) so that the consumer — the
SMTP side — sets the pace and memory stays bounded whatever the message size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.poller.message import DotStreamScanner
from mailgw.upstream import UpstreamProtocol
from mailgw.wire import pop3
from mailgw.wire.errors import ProtocolError
from mailgw.wire.lines import LineBuffer, TooLong

__all__ = ["Listing", "Pop3Error", "Pop3Session", "ReadGate", "RetrConsumer"]

#: the most lines of a multi-line answer (UIDL/LIST of a mailbox of that many messages)
MAX_LISTING_LINES = 500_000


class Pop3Error(Exception):
    """The POP3 connection failed, timed out or broke the protocol: the poll ends."""


class RetrConsumer(Protocol):
    """Receives the body of a ``RETR`` answer."""

    def payload(self, data: bytes) -> None:
        """Some bytes of the message, dot-stuffed as on the wire."""

    def end(self) -> None:
        """The terminating ``.`` line arrived."""

    def failed(self, reason: Exception) -> None:
        """The connection broke before the end."""


@dataclass
class Listing:
    """A multi-line answer: the status and the body lines (un-stuffed), and how many
    lines were too long to keep (their content is lost)."""

    status: pop3.Status
    lines: list[bytes] = field(default_factory=list)
    too_long: int = 0


@implementer(IPushProducer)
class ReadGate:
    """Pauses reading from a transport while any reason to pause holds.

    Reasons are names (``"smtp"`` for the SMTP side's back-pressure, ``"decide"``
    while the recipients are being checked).  As an L{IPushProducer} it can be
    registered with the SMTP transport, which pauses it when its buffer is full.
    """

    def __init__(self, transport: Any) -> None:
        self._bottom = _socket_transport(transport)
        self._reasons: set[str] = set()
        self.on_change: Callable[[bool], None] | None = None

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def pause(self, reason: str) -> None:
        was = self.paused
        self._reasons.add(reason)
        if not was:
            self._bottom.pauseProducing()
            if self.on_change is not None:
                self.on_change(True)

    def resume(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self._bottom.resumeProducing()
            if self.on_change is not None:
                self.on_change(False)

    # IPushProducer, for the SMTP transport
    def pauseProducing(self) -> None:
        self.pause("smtp")

    def resumeProducing(self) -> None:
        self.resume("smtp")

    def stopProducing(self) -> None:
        self.resume("smtp")


def _socket_transport(transport: Any) -> Any:
    """The transport that reads the socket: TLS wrappers (implicit TLS through
    C{wrapClientTLS}) are followed down to the TCP transport."""
    current = transport
    for _ in range(8):
        if isinstance(current, ProtocolWrapper) and current.transport is not None:
            current = current.transport
            continue
        break
    return current


class _Request:
    def __init__(self, kind: str, consumer: RetrConsumer | None = None) -> None:
        self.kind = kind  # "status" | "listing" | "retr"
        self.consumer = consumer
        self.result: defer.Deferred[Any] = defer.Deferred()
        self.status: pop3.Status | None = None
        self.reader: pop3.MultiLineReader | None = None
        self.too_long = 0


class Pop3Session:
    """The TRANSACTION state of a logged-in POP3 connection.

    @param login: the login client after its success (the session attaches to it).
    @param clock: for the idle timeout.
    @param timeout: seconds without a byte from the server, while an answer is
        awaited and reading is not paused, after which the connection is dropped.
    """

    def __init__(self, login: UpstreamProtocol, clock: IReactorTime, *, timeout: float = 120.0) -> None:
        self._login = login
        self.transport = login.transport
        self.clock = clock
        self.timeout = timeout
        self._lines = LineBuffer(pop3.MAX_RESPONSE_LINE)
        self._queue: deque[_Request] = deque()
        self._scanner: DotStreamScanner | None = None
        self._raw: _Request | None = None
        self._error: Exception | None = None
        self._closed = False
        self._timer: IDelayedCall | None = None
        self.gate = ReadGate(self.transport)
        self.gate.on_change = self._gate_changed
        self.lost: defer.Deferred[None] = defer.Deferred()
        rest = login.attach(self._data, self._connection_lost)
        if rest:
            self._data(rest)

    @property
    def broken(self) -> bool:
        """Whether the connection failed (or was aborted)."""
        return self._error is not None

    # -- commands ------------------------------------------------------------------------

    def _send(self, request: _Request, command: str, *args: str) -> defer.Deferred[Any]:
        if self._error is not None:
            return defer.fail(self._error)
        line = pop3.format_command(command, *args)
        self._queue.append(request)
        assert self.transport is not None
        self.transport.write(line)
        self._arm()
        return request.result

    def command(self, command: str, *args: str) -> defer.Deferred[pop3.Status]:
        """Send a command with a single-line answer; fires with its status (``-ERR``
        included)."""
        return self._send(_Request("status"), command, *args)

    def listing(self, command: str, *args: str) -> defer.Deferred[Listing]:
        """Send a command with a multi-line answer (``CAPA``, ``UIDL``, ``LIST``)."""
        return self._send(_Request("listing"), command, *args)

    def retr(self, number: int, consumer: RetrConsumer) -> defer.Deferred[pop3.Status]:
        """``RETR number``: fires with the status line; after ``+OK`` the body goes to
        C{consumer}."""
        return self._send(_Request("retr", consumer), "RETR", str(number))

    async def capabilities(self) -> dict[str, tuple[str, ...]]:
        """The CAPA answer (empty when the server has no CAPA)."""
        answer = await self.listing("CAPA")
        if not answer.status.ok:
            return {}
        return pop3.parse_capa(answer.lines)

    async def quit(self) -> bool:
        """QUIT: whether the server confirmed (and so applied the deletions)."""
        status = await self.command("QUIT")
        if self.transport is not None:
            self.transport.loseConnection()
        return status.ok

    def abort(self) -> None:
        """Drop the connection at once (deletions are not applied)."""
        self._fail(Pop3Error("connection aborted"))

    # -- input -----------------------------------------------------------------------------

    def _data(self, data: bytes) -> None:
        self._arm()
        try:
            while data and self._error is None:
                if self._raw is not None:
                    assert self._scanner is not None
                    payload, done, data = self._scanner.feed(data)
                    consumer = self._raw.consumer
                    assert consumer is not None
                    if payload:
                        consumer.payload(payload)
                    if not done:
                        return
                    self._raw = self._scanner = None
                    consumer.end()
                    continue
                self._lines.append(data)
                data = b""
                data = self._process_lines()
        except ProtocolError as e:
            self._fail(Pop3Error(f"unexpected answer from the POP3 server: {e}"))

    def _process_lines(self) -> bytes:
        """Answer queued requests from buffered lines; returns bytes to stream raw
        when a RETR body starts."""
        while self._queue and self._error is None:
            request = self._queue[0]
            line = self._lines.next_line()
            if line is None:
                return b""
            if request.status is None:
                if isinstance(line, TooLong):
                    raise ProtocolError("over-long status line")
                status = pop3.parse_status(line)
                request.status = status
                if request.kind == "status" or not status.ok:
                    self._queue.popleft()
                    request.result.callback(Listing(status) if request.kind == "listing" else status)
                    continue
                if request.kind == "retr":
                    self._queue.popleft()
                    self._raw = request
                    self._scanner = DotStreamScanner()
                    rest = self._lines.take_rest()
                    request.result.callback(status)
                    return rest
                request.reader = pop3.MultiLineReader(MAX_LISTING_LINES)
                continue
            assert request.reader is not None
            if isinstance(line, TooLong):
                request.too_long += 1
                continue
            if request.reader.feed(line):
                self._queue.popleft()
                request.result.callback(Listing(request.status, request.reader.lines, request.too_long))
        if self._lines.pending() and not self._queue:
            raise ProtocolError("data from the server nobody asked for")
        return b""

    # -- time limits and failures -------------------------------------------------------------

    def _gate_changed(self, paused: bool) -> None:
        if paused:
            self._disarm()
        else:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        if self._error is None and (self._queue or self._raw is not None) and not self.gate.paused:
            self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(Pop3Error(f"the POP3 server sent nothing for {self.timeout:g} s"))

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._disarm()
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._flush_failures()

    def _flush_failures(self) -> None:
        error = self._error or Pop3Error("connection closed")
        raw, self._raw = self._raw, None
        if raw is not None and raw.consumer is not None:
            raw.consumer.failed(error)
        while self._queue:
            request = self._queue.popleft()
            request.result.errback(Failure(error))

    def _connection_lost(self, reason: Failure) -> None:
        self._closed = True
        self._disarm()
        if self._error is None:
            self._error = Pop3Error("the POP3 server closed the connection")
        self._flush_failures()
        if not self.lost.called:
            self.lost.callback(None)
