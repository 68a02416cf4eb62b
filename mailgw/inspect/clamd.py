"""A clamd client: antivirus scanning of a message while it arrives [4.9].

clamd's C{zINSTREAM} (clamd(8), "ClamD Protocol"): the command C{zINSTREAM\\0}, then
the data in chunks, each a 4-byte big-endian length and that many octets, then a
zero-length chunk; clamd answers one NUL-terminated line, C{stream: OK},
C{stream: NAME FOUND} or C{... ERROR} (e.g. C{INSTREAM size limit exceeded. ERROR}
beyond its C{StreamMaxLength}, which it may send before the data is complete), and
closes the connection.

Usage::

    client = ClamdClient.for_address(reactor, profile.clamd, profile.clamd_timeout)
    scan = client.scan()                  # connects at once
    scan.registerProducer(upstream, True) # optional: paused while clamd cannot keep up
    scan.write(chunk); ...                # as the message arrives (buffered while connecting)
    scan.finish()
    result = await scan.result            # Clean() | Infected(signature) | Failed(reason)

L{Scan.result} always fires with a L{ScanResult}, never with a failure, except
L{CancelledError} when it is cancelled (which closes the connection).  A connection
that fails, closes early or says something unexpected gives L{Failed}; so does
C{timeout}, the seconds clamd may keep the scan waiting: to connect, to take more data
(while its connection's buffer is full) and to answer after the end.  Nothing blocks:
all of it is events on the reactor.

Flow control: a L{Scan} is an L{IConsumer}.  A push producer registered with it (the
side the message comes from) is paused while clamd's connection has a full write
buffer, or while more than L{Scan.HIGH_WATER} octets wait for the connection to be
made, and resumed afterwards; it is never left paused once the result is known.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol as TypingProtocol
from typing import TypeAlias, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config import ClamdAddress
from mailgw.endpoints import tcp_client_endpoint

__all__ = [
    "MAX_ANSWER",
    "ClamdClient",
    "Clean",
    "Failed",
    "Infected",
    "Scan",
    "ScanResult",
    "clamd_endpoint",
    "parse_answer",
]

#: The longest answer accepted from clamd (a signature name is far shorter).
MAX_ANSWER = 4096
#: The longest signature name passed on (it goes into logs and replacement notices).
_MAX_SIGNATURE = 200
_END_OF_STREAM = b"\0\0\0\0"


@dataclass(frozen=True, slots=True)
class Clean:
    """clamd found nothing (C{stream: OK})."""


@dataclass(frozen=True, slots=True)
class Infected:
    """clamd found C{signature} (C{stream: NAME FOUND}); printable ASCII, at most 200 characters."""

    signature: str


@dataclass(frozen=True, slots=True)
class Failed:
    """No verdict: clamd unreachable, too slow, or it answered an error; C{reason} says which."""

    reason: str


#: What a scan gives.
ScanResult: TypeAlias = Clean | Infected | Failed


def parse_answer(answer: bytes) -> ScanResult:
    """The result a clamd C{INSTREAM} answer (without its NUL) means."""
    text = answer.decode("utf-8", "replace").strip()
    if text == "stream: OK":
        return Clean()
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        name = "".join(c for c in text[len("stream: ") : -len(" FOUND")].strip() if " " < c <= "~")
        return Infected(name[:_MAX_SIGNATURE] or "unknown")
    if text.endswith(" ERROR"):
        reason = "".join(c if " " <= c <= "~" else "?" for c in text[: -len(" ERROR")])
        return Failed(f"clamd error: {reason[:_MAX_SIGNATURE]}")
    return Failed("unexpected answer from clamd")


def clamd_endpoint(reactor: object, address: ClamdAddress, timeout: float) -> IStreamClientEndpoint:
    """
    The endpoint of a configured clamd address: a UNIX socket, or TCP to an IP address
    or a host name (resolved without blocking), with C{timeout} to connect.
    """
    if address.kind == "unix":
        return UNIXClientEndpoint(reactor, str(address.path), timeout=timeout)
    return tcp_client_endpoint(reactor, address.host, address.port, timeout)


class ClamdClient:
    """
    Scans with one clamd.

    @param clock: for the timeouts.
    @param endpoint: where clamd listens (see L{clamd_endpoint}).
    @param timeout: seconds clamd may keep a scan waiting (see the module docstring).
    """

    def __init__(self, clock: IReactorTime, endpoint: IStreamClientEndpoint, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._clock = clock
        self._endpoint = endpoint
        self.timeout = timeout

    @classmethod
    def for_address(cls, reactor: IReactorTime, address: ClamdAddress, timeout: float) -> ClamdClient:
        """A client of the clamd at a configured address."""
        return cls(reactor, clamd_endpoint(reactor, address, timeout), timeout)

    def scan(self) -> Scan:
        """Start a scan: connect now, take the message with L{Scan.write} and L{Scan.finish}."""
        return Scan(self._clock, self._endpoint, self.timeout)

    def scan_bytes(self, data: bytes, chunk_size: int = 65536) -> Deferred[ScanResult]:
        """Scan C{data} (already at hand, e.g. small or spooled), in chunks of C{chunk_size}."""
        scan = self.scan()
        for start in range(0, len(data), chunk_size):
            scan.write(data[start : start + chunk_size])
        scan.finish()
        return scan.result

    def ping(self) -> Deferred[bool]:
        """Whether clamd answers C{zPING} with C{PONG} within the timeout (its health)."""
        protocol = _Ping()
        connecting = connectProtocol(self._endpoint, protocol)
        # Cancelling aborts the connection attempt or, once connected, the connection.
        timer = self._clock.callLater(self.timeout, connecting.cancel)

        def connected(_: object) -> Deferred[bytes | None]:
            return protocol.answer

        def done(answer: bytes | None) -> bool:
            return answer == b"PONG"

        def failed(_: Failure) -> bool:
            return False

        def cleanup(result: bool) -> bool:
            if timer.active():
                timer.cancel()
            return result

        result: Deferred[bool] = connecting.addCallback(connected).addCallbacks(done, failed)
        return result.addBoth(cleanup)


class _Ping(Protocol):
    """Sends C{zPING}; L{answer} fires with the answer (or C{None} if none came)."""

    def __init__(self) -> None:
        self.answer: Deferred[bytes | None] = Deferred(self._abort)
        self._received = bytearray()

    def _abort(self, answer: Deferred[bytes | None]) -> None:
        if self.transport is not None:
            cast(_Connection, self.transport).abortConnection()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"zPING\0")

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        end = self._received.find(b"\0")
        if end >= 0 or len(self._received) > MAX_ANSWER:
            assert self.transport is not None
            self.transport.loseConnection()
            if not self.answer.called:
                self.answer.callback(bytes(self._received[:end]) if end >= 0 else None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answer.called:
            self.answer.callback(None)


class _Connection(TypingProtocol):
    """What a L{Scan} uses of its connection's transport (TCP and UNIX transports have it)."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


class _ClamdProtocol(Protocol):
    """The connection of one L{Scan}: passes the connection and the answer on."""

    def __init__(self, scan: Scan) -> None:
        self._scan = scan
        self._received = bytearray()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._scan._connected(cast(_Connection, self.transport))

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        end = self._received.find(b"\0")
        if end >= 0:
            self._scan._done(parse_answer(bytes(self._received[:end])))
        elif len(self._received) > MAX_ANSWER:
            self._scan._done(Failed("answer from clamd too long"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._received and b"\0" not in self._received:
            # clamd closes right after its answer; without the NUL, take what came
            self._scan._done(parse_answer(bytes(self._received)))
        self._scan._done(Failed("clamd closed the connection without an answer"))


@implementer(IConsumer, IPushProducer)
class Scan:
    """
    One C{zINSTREAM} scan (see the module docstring).  An L{IConsumer} for the side
    the message comes from; an L{IPushProducer} for clamd's connection.

    @ivar result: fires once with the L{ScanResult}.
    @ivar bytes_sent: the octets of message given to L{write} so far.
    """

    #: Octets buffered while connecting before a registered producer is paused.
    HIGH_WATER = 128 * 1024

    def __init__(self, clock: IReactorTime, endpoint: IStreamClientEndpoint, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self.result: Deferred[ScanResult] = Deferred(self._cancel)
        self.bytes_sent = 0
        self._transport: _Connection | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._finished = False
        self._over = False
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self._clamd_paused = False
        self._timer: IDelayedCall | None = None
        self._arm()
        self._connecting: Deferred[_ClamdProtocol] | None = connectProtocol(endpoint, _ClamdProtocol(self))
        self._connecting.addErrback(self._connect_failed)

    @property
    def done(self) -> bool:
        """Whether the result is known (later writes are ignored)."""
        return self._over

    # -- IConsumer ---------------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Register the push producer of the message (pull producers are not supported)."""
        if not streaming or not IPushProducer.providedBy(producer):
            raise ValueError("a Scan takes push producers only")
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        self._producer_paused = False
        self._update_producer()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    def write(self, data: bytes) -> None:
        """The next octets of the message (nothing for C{b""}); ignored once L{done}."""
        if self._over or not data:
            return
        if self._finished:
            raise ValueError("write after finish")
        self.bytes_sent += len(data)
        chunk = struct.pack("!L", len(data)) + data
        if self._transport is not None:
            self._transport.write(chunk)
        else:
            self._pending.append(chunk)
            self._pending_size += len(chunk)
            self._update_producer()

    def finish(self) -> None:
        """The message is complete; the answer is awaited (L{result})."""
        if self._over or self._finished:
            return
        self._finished = True
        if self._transport is not None:
            self._transport.write(_END_OF_STREAM)
            self._arm()

    # -- IPushProducer (for clamd's transport) -----------------------------------------

    def pauseProducing(self) -> None:
        self._clamd_paused = True
        if self._timer is None:
            self._arm()  # clamd takes no more data: that, too, may last only so long
        self._update_producer()

    def resumeProducing(self) -> None:
        self._clamd_paused = False
        if not self._finished:
            self._disarm()
        self._update_producer()

    def stopProducing(self) -> None:
        self._done(Failed("clamd connection closed"))

    # -- internals ---------------------------------------------------------------------

    def _update_producer(self) -> None:
        """Pause or resume the registered producer as clamd can take data or not."""
        producer = self._producer
        if producer is None:
            return
        congested = not self._over and (
            self._clamd_paused or (self._transport is None and self._pending_size > self.HIGH_WATER)
        )
        if congested and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()
        elif not congested and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._done(Failed(f"clamd did not answer within {self._timeout:g} s"))

    def _connected(self, transport: _Connection) -> None:
        self._connecting = None
        if self._over:
            transport.loseConnection()
            return
        self._transport = transport
        self._disarm()
        transport.registerProducer(self, True)
        transport.write(b"zINSTREAM\0" + b"".join(self._pending))
        self._pending, self._pending_size = [], 0
        if self._finished:
            transport.write(_END_OF_STREAM)
            self._arm()
        self._update_producer()

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = None
        if reason.check(CancelledError) and self._over:
            return  # we cancelled it: the result is already known
        self._done(Failed(f"cannot connect to clamd: {reason.getErrorMessage()}"))

    def _done(self, result: ScanResult) -> None:
        if self._over:
            return
        self._over = True
        self._disarm()
        self._pending, self._pending_size = [], 0
        self._update_producer()  # never leave the feeder paused
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.unregisterProducer()
            transport.loseConnection()
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        self.result.callback(result)

    def _cancel(self, result: Deferred[ScanResult]) -> None:
        """L{result} was cancelled: drop the connection (the Deferred fails with CancelledError)."""
        if self._over:
            return
        self._over = True
        self._disarm()
        self._pending, self._pending_size = [], 0
        self._update_producer()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.unregisterProducer()
            transport.abortConnection()
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
