"""Tests for L{mailgw.inspect.clamd}: the zINSTREAM client, on fakes and against a real clamd."""

from __future__ import annotations

import base64
import struct
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import (
    IConsumer,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.config import ClamdAddress
from mailgw.inspect.clamd import (
    ClamdClient,
    Clean,
    Failed,
    Infected,
    Scan,
    ScanResult,
    clamd_endpoint,
    parse_answer,
)
from tests.servers.clamd import EICAR, EICAR_SIGNATURE, Clamd

reactor: Any = _reactor


def chunk(data: bytes) -> bytes:
    """One zINSTREAM chunk."""
    return struct.pack("!L", len(data)) + data


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connection attempts that the test completes (on a StringTransport) or fails."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[IProtocol], IProtocolFactory]] = []
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt: Deferred[IProtocol] = Deferred(self._cancel)
        self.attempts.append((attempt, factory))
        return attempt

    def _cancel(self, attempt: Deferred[IProtocol]) -> None:
        self.cancelled += 1

    def complete(self) -> tuple[Any, StringTransport]:
        attempt, factory = self.attempts.pop(0)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3310))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        attempt.callback(protocol)
        return protocol, transport


@implementer(IPushProducer)
class Feeder:
    """A push producer that records whether it is paused."""

    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def fake_scan(timeout: float = 10) -> tuple[Scan, FakeEndpoint, Clock]:
    clock = Clock()
    endpoint = FakeEndpoint()
    return ClamdClient(clock, endpoint, timeout).scan(), endpoint, clock


class ParseAnswerTests(SynchronousTestCase):
    """clamd's answers and what they mean."""

    cases: list[tuple[bytes, ScanResult]] = [
        (b"stream: OK", Clean()),
        (b"stream: OK\n", Clean()),
        (b"stream: Win.Test.EICAR_HDB-1 FOUND", Infected("Win.Test.EICAR_HDB-1")),
        (b"stream: Mailgw.Test.EICAR.UNOFFICIAL FOUND", Infected("Mailgw.Test.EICAR.UNOFFICIAL")),
        (b"stream: Bad\x1b[31mName\r\n FOUND", Infected("Bad[31mName")),
        (b"stream:  FOUND", Infected("unknown")),
        (b"stream: " + b"A" * 500 + b" FOUND", Infected("A" * 200)),
        (b"INSTREAM size limit exceeded. ERROR", Failed("clamd error: INSTREAM size limit exceeded.")),
        (b"UNKNOWN COMMAND", Failed("unexpected answer from clamd")),
        (b"", Failed("unexpected answer from clamd")),
        (b"\xff\xfe", Failed("unexpected answer from clamd")),
    ]

    def test_knownAnswers(self) -> None:
        """Each answer gives its result; signature names are printable ASCII, at most 200 characters."""
        for answer, result in self.cases:
            self.assertEqual(parse_answer(answer), result, answer)


class EndpointTests(SynchronousTestCase):
    """clamd_endpoint picks the endpoint of an address."""

    def test_kinds(self) -> None:
        """UNIX socket, IPv4, IPv6, host name."""
        clock: Any = Clock()
        cases = [
            (ClamdAddress("unix", path=Path("/run/clamd.ctl")), UNIXClientEndpoint),
            (ClamdAddress("tcp", host="127.0.0.1", port=3310), TCP4ClientEndpoint),
            (ClamdAddress("tcp", host="::1", port=3310), TCP6ClientEndpoint),
            (ClamdAddress("tcp", host="clamd.example.com", port=3310), HostnameEndpoint),
        ]
        for address, kind in cases:
            self.assertIsInstance(clamd_endpoint(clock, address, 5), kind)


class ScanProtocolTests(SynchronousTestCase):
    """A L{Scan} on a fake connection: the bytes sent, the answers, the timeouts, flow control."""

    def test_interfaces(self) -> None:
        """A Scan is a consumer (for the feeder) and a push producer (for clamd's transport)."""
        scan, _, _ = fake_scan()
        verifyObject(IConsumer, scan)
        verifyObject(IPushProducer, scan)

    def test_bytesOnTheWire(self) -> None:
        """zINSTREAM, then each write as a length-prefixed chunk, then a zero-length chunk; b"" sends nothing."""
        scan, endpoint, _ = fake_scan()
        scan.write(b"early")
        _, transport = endpoint.complete()
        self.assertEqual(transport.value(), b"zINSTREAM\0" + chunk(b"early"))
        scan.write(b"")
        scan.write(b"x" * 70000)
        scan.finish()
        self.assertEqual(transport.value(), b"zINSTREAM\0" + chunk(b"early") + chunk(b"x" * 70000) + b"\0\0\0\0")
        self.assertEqual(scan.bytes_sent, 70005)
        self.assertNoResult(scan.result)

    def test_finishBeforeConnected(self) -> None:
        """Everything written before the connection is made is sent once it is, the end included."""
        scan, endpoint, _ = fake_scan()
        scan.write(b"ab")
        scan.finish()
        _, transport = endpoint.complete()
        self.assertEqual(transport.value(), b"zINSTREAM\0" + chunk(b"ab") + b"\0\0\0\0")

    def test_answers(self) -> None:
        """The NUL-terminated answer gives the result, and the connection is closed."""
        for answer, result in [
            (b"stream: OK\0", Clean()),
            (b"stream: Eicar-Test-Signature FOUND\0", Infected("Eicar-Test-Signature")),
            (b"INSTREAM size limit exceeded. ERROR\0", Failed("clamd error: INSTREAM size limit exceeded.")),
        ]:
            scan, endpoint, _ = fake_scan()
            protocol, transport = endpoint.complete()
            scan.finish()
            protocol.dataReceived(answer[:5])
            self.assertNoResult(scan.result)
            protocol.dataReceived(answer[5:])
            self.assertEqual(self.successResultOf(scan.result), result)
            self.assertTrue(transport.disconnecting)
            self.assertIsNone(transport.producer)

    def test_answerWithoutNul(self) -> None:
        """An answer cut short by the end of the connection still counts; no answer is a failure."""
        scan, endpoint, _ = fake_scan()
        protocol, _ = endpoint.complete()
        protocol.dataReceived(b"stream: OK")
        protocol.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.successResultOf(scan.result), Clean())
        scan, endpoint, _ = fake_scan()
        protocol, _ = endpoint.complete()
        protocol.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.successResultOf(scan.result), Failed("clamd closed the connection without an answer"))

    def test_answerTooLong(self) -> None:
        """An endless answer is a failure, not a growing buffer."""
        scan, endpoint, _ = fake_scan()
        protocol, _ = endpoint.complete()
        protocol.dataReceived(b"x" * 5000)
        self.assertEqual(self.successResultOf(scan.result), Failed("answer from clamd too long"))

    def test_earlyAnswer(self) -> None:
        """An answer before the end (a size limit) is the result; later writes are ignored."""
        scan, endpoint, _ = fake_scan()
        protocol, transport = endpoint.complete()
        scan.write(b"a")
        protocol.dataReceived(b"INSTREAM size limit exceeded. ERROR\0")
        self.assertIsInstance(self.successResultOf(scan.result), Failed)
        sent = transport.value()
        scan.write(b"more")
        scan.finish()
        self.assertEqual(transport.value(), sent)
        self.assertTrue(scan.done)

    def test_connectFails(self) -> None:
        """A failed connection gives a failure naming it."""
        scan, endpoint, _ = fake_scan()
        attempt, _ = endpoint.attempts.pop()
        attempt.errback(Failure(ConnectionRefusedError("refused")))
        result = self.successResultOf(scan.result)
        assert isinstance(result, Failed)
        self.assertTrue(result.reason.startswith("cannot connect to clamd:"), result.reason)

    def test_connectTimeout(self) -> None:
        """Connecting may last timeout seconds; then the attempt is cancelled and the scan fails."""
        scan, endpoint, clock = fake_scan(timeout=3)
        clock.advance(2.9)
        self.assertNoResult(scan.result)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(scan.result), Failed("clamd did not answer within 3 s"))
        self.assertEqual(endpoint.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answerTimeout(self) -> None:
        """After the end, the answer may take timeout seconds; then the connection is closed."""
        scan, endpoint, clock = fake_scan(timeout=3)
        _, transport = endpoint.complete()
        clock.advance(100)  # the message may take its time to arrive
        self.assertNoResult(scan.result)
        scan.finish()
        clock.advance(2.9)
        self.assertNoResult(scan.result)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(scan.result), Failed("clamd did not answer within 3 s"))
        self.assertTrue(transport.disconnecting)

    def test_stallTimeout(self) -> None:
        """clamd not taking data (its transport paused) for timeout seconds fails the scan,
        and the feeder is resumed rather than left paused."""
        scan, endpoint, clock = fake_scan(timeout=3)
        feeder = Feeder()
        scan.registerProducer(feeder, True)
        _, transport = endpoint.complete()
        self.assertIs(transport.producer, scan)
        scan.pauseProducing()  # what the transport does when its buffer is full
        self.assertTrue(feeder.paused)
        clock.advance(2)
        scan.resumeProducing()
        self.assertFalse(feeder.paused)
        clock.advance(2)
        self.assertNoResult(scan.result)  # progress restarts the clock
        scan.pauseProducing()
        clock.advance(3)
        self.assertEqual(self.successResultOf(scan.result), Failed("clamd did not answer within 3 s"))
        self.assertFalse(feeder.paused)
        self.assertEqual(feeder.calls, ["pause", "resume", "pause", "resume"])

    def test_bufferWhileConnecting(self) -> None:
        """More than HIGH_WATER octets waiting for the connection pause the feeder; connecting resumes it."""
        scan, endpoint, _ = fake_scan()
        feeder = Feeder()
        scan.registerProducer(feeder, True)
        scan.write(b"x" * (Scan.HIGH_WATER - 4))  # with its length: HIGH_WATER octets
        self.assertFalse(feeder.paused)
        scan.write(b"y")
        self.assertTrue(feeder.paused)
        _, transport = endpoint.complete()
        self.assertFalse(feeder.paused)
        self.assertEqual(len(transport.value()), 10 + Scan.HIGH_WATER + 4 + 1)

    def test_registeredWhilePaused(self) -> None:
        """A feeder registered while clamd takes no data is paused at once."""
        scan, endpoint, _ = fake_scan()
        endpoint.complete()
        scan.pauseProducing()
        feeder = Feeder()
        scan.registerProducer(feeder, True)
        self.assertTrue(feeder.paused)
        scan.unregisterProducer()
        scan.resumeProducing()
        self.assertEqual(feeder.calls, ["pause"])

    def test_pullProducersRefused(self) -> None:
        """Only push producers can feed a scan; one at a time."""
        scan, _, _ = fake_scan()
        self.assertRaises(ValueError, scan.registerProducer, Feeder(), False)
        scan.registerProducer(Feeder(), True)
        self.assertRaises(RuntimeError, scan.registerProducer, Feeder(), True)

    def test_writeAfterFinish(self) -> None:
        """Writing after finish is a programming error."""
        scan, _, _ = fake_scan()
        scan.finish()
        self.assertRaises(ValueError, scan.write, b"x")

    def test_cancel(self) -> None:
        """Cancelling the result aborts the connection (or the attempt) and resumes the feeder."""
        scan, endpoint, clock = fake_scan()
        feeder = Feeder()
        scan.registerProducer(feeder, True)
        _, transport = endpoint.complete()
        scan.pauseProducing()
        scan.result.cancel()
        self.failureResultOf(scan.result, CancelledError)
        self.assertTrue(transport.disconnected)
        self.assertFalse(feeder.paused)
        self.assertEqual(clock.getDelayedCalls(), [])
        scan, endpoint, clock = fake_scan()
        scan.result.cancel()
        self.failureResultOf(scan.result, CancelledError)
        self.assertEqual(endpoint.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_ping(self) -> None:
        """ping is True for PONG, False for anything else, a failed connection or a timeout."""
        clock = Clock()
        endpoint = FakeEndpoint()
        client = ClamdClient(clock, endpoint, 2)
        answer = client.ping()
        protocol, transport = endpoint.complete()
        self.assertEqual(transport.value(), b"zPING\0")
        protocol.dataReceived(b"PONG\0")
        self.assertTrue(self.successResultOf(answer))
        answer = client.ping()
        protocol, _ = endpoint.complete()
        protocol.dataReceived(b"UNKNOWN COMMAND\0")
        self.assertFalse(self.successResultOf(answer))
        answer = client.ping()
        endpoint.attempts.pop()[0].errback(Failure(ConnectionRefusedError()))
        self.assertFalse(self.successResultOf(answer))
        answer = client.ping()
        _, transport = endpoint.complete()
        clock.advance(2)
        self.assertFalse(self.successResultOf(answer))
        self.assertTrue(transport.disconnected)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeoutPositive(self) -> None:
        """A client needs a positive timeout."""
        self.assertRaises(ValueError, ClamdClient, Clock(), FakeEndpoint(), 0)


# -- against a real clamd ------------------------------------------------------------------

_MAIL = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"--XX\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
    b'--XX\r\nContent-Type: application/octet-stream; name="e.com"\r\n'
    b'Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename="e.com"\r\n\r\n'
    b"%s--XX--\r\n"
)


class _Silent(Protocol):
    """Accepts and reads, never answers; C{closed} fires when the connection is gone."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class RealClamdTests(TestCase):
    """The client against a real clamd (tests.servers.clamd)."""

    def setUp(self) -> None:
        self.clamd = Clamd.started(self)

    async def _scan(self, address: ClamdAddress, chunks: list[bytes], timeout: float = 10) -> ScanResult:
        scan = ClamdClient.for_address(reactor, address, timeout).scan()
        for data in chunks:
            scan.write(data)
        scan.finish()
        return await scan.result

    async def test_clean(self) -> None:
        """A clean message is clean, over the UNIX socket and over TCP."""
        message = _MAIL % base64.encodebytes(b"just some bytes\n" * 1000).replace(b"\n", b"\r\n")
        for address in (self.clamd.address, self.clamd.tcp_address):
            self.assertEqual(await self._scan(address, [message[:100], message[100:]]), Clean())

    async def test_eicarSplitOverChunks(self) -> None:
        """EICAR cut over several chunks (and across them) is found, naming the signature."""
        stream = b"Subject: x\r\n\r\nbefore " + EICAR + b" after\r\n"
        chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
        for address in (self.clamd.address, self.clamd.tcp_address):
            self.assertEqual(await self._scan(address, chunks), Infected(EICAR_SIGNATURE))

    async def test_eicarInBase64Attachment(self) -> None:
        """clamd decodes the mail itself: EICAR in a base64 attachment is found too."""
        message = _MAIL % base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
        self.assertEqual(
            await ClamdClient.for_address(reactor, self.clamd.address, 10).scan_bytes(message, 16),
            Infected(EICAR_SIGNATURE),
        )

    async def test_feederPausedAndResumed(self) -> None:
        """A big message fed at once: clamd's connection pauses the feeder at some point, the
        scan completes, and the feeder ends resumed."""
        feeder = Feeder()
        scan = ClamdClient.for_address(reactor, self.clamd.address, 10).scan()
        scan.registerProducer(feeder, True)
        while not feeder.paused and scan.bytes_sent < 16 << 20:
            scan.write(b"z" * 65536)
            await _tick()
        self.assertTrue(feeder.paused)
        scan.finish()
        self.assertEqual(await scan.result, Clean())
        self.assertFalse(feeder.paused)

    async def test_ping(self) -> None:
        """ping is True while clamd runs, False once it is stopped."""
        client = ClamdClient.for_address(reactor, self.clamd.address, 5)
        self.assertTrue(await client.ping())
        self.clamd.stop()
        self.assertFalse(await client.ping())

    async def test_stopped(self) -> None:
        """A stopped clamd fails the scan at once (not after the timeout), over both addresses."""
        addresses = (self.clamd.address, self.clamd.tcp_address)
        self.clamd.stop()
        for address in addresses:
            start = time.monotonic()
            result = await self._scan(address, [b"hello"], timeout=30)
            self.assertIsInstance(result, Failed)
            assert isinstance(result, Failed)
            self.assertTrue(result.reason.startswith("cannot connect to clamd:"), result.reason)
            self.assertLess(time.monotonic() - start, 2)


class SizeLimitTests(TestCase):
    """clamd's StreamMaxLength."""

    async def test_overLimit(self) -> None:
        """A stream over clamd's StreamMaxLength fails with clamd's error, early or at the end."""
        clamd = Clamd.started(self, stream_max_length="64K")
        scan = ClamdClient.for_address(reactor, clamd.address, 10).scan()
        for _ in range(4):
            scan.write(b"a" * 65536)
        scan.finish()
        self.assertEqual(await scan.result, Failed("clamd error: INSTREAM size limit exceeded."))


class SilentServerTests(TestCase):
    """A clamd that accepts and never answers."""

    async def test_timeout(self) -> None:
        """The scan fails after clamd_timeout, and the connection is closed."""
        connections: list[_Silent] = []

        def build() -> _Silent:
            protocol = _Silent()
            connections.append(protocol)
            return protocol

        port: IListeningPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        self.addCleanup(port.stopListening)
        address = ClamdAddress("tcp", host="127.0.0.1", port=port.getHost().port)  # type: ignore[attr-defined]
        start = time.monotonic()
        scan = ClamdClient.for_address(reactor, address, 0.5).scan()
        scan.write(b"x" * 1000)
        scan.finish()
        self.assertEqual(await scan.result, Failed("clamd did not answer within 0.5 s"))
        self.assertGreaterEqual(time.monotonic() - start, 0.45)
        self.assertLess(time.monotonic() - start, 3)
        (server,) = connections
        await server.closed


def _tick() -> Deferred[None]:
    """Let the reactor run once (the socket writes its buffer)."""
    tick: Deferred[None] = Deferred()
    reactor.callLater(0, tick.callback, None)
    return tick
