"""The PROXY header wrapper: the session starts only after a valid header."""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailgw.proxy.proxyprotocol import HEADER_TIMEOUT, ProxyHeaderFactory


class Recorder(Protocol):
    def __init__(self) -> None:
        self.peer: object = None
        self.data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def v2_header(source: str, port: int) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 995)
    return b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


class ProxyHeaderTests(SynchronousTestCase):
    def connect(self) -> tuple[Recorder, StringTransport, Clock]:
        clock = Clock()
        recorder = Recorder()
        factory = ProxyHeaderFactory(Factory.forProtocol(lambda: recorder), clock)
        wrapper = factory.buildProtocol(IPv4Address("TCP", "10.9.9.9", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.9.9.9", 1234))
        wrapper.makeConnection(transport)
        self.wrapper = wrapper
        return recorder, transport, clock

    def test_v1SplitByteByByte(self) -> None:
        """A v1 header split into single bytes starts the session with the client's
        address once its last byte is in, not before; the bytes after it reach the
        session."""
        recorder, _transport, _ = self.connect()
        header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 995\r\n"
        started_after = []
        for index, byte in enumerate(header + b"CAPA\r\n"):
            self.wrapper.dataReceived(bytes([byte]))
            started_after.append(recorder.peer is not None)
            self.assertEqual(recorder.data, (header + b"CAPA\r\n")[len(header) : index + 1])
        self.assertEqual(started_after.index(True), len(header) - 1)
        self.assertTrue(all(started_after[len(header) - 1 :]))
        self.assertEqual(recorder.peer, IPv4Address("TCP", "203.0.113.9", 40001))
        self.assertEqual(recorder.data, b"CAPA\r\n")

    def test_v1WithData(self) -> None:
        """Data in the same read as the header is passed on after connectionMade."""
        recorder, _, _ = self.connect()
        self.wrapper.dataReceived(b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 995\r\nCAPA\r\n")
        self.assertEqual(recorder.data, b"CAPA\r\n")

    def test_v2(self) -> None:
        """A v2 header in two pieces gives the client's address."""
        recorder, _, _ = self.connect()
        header = v2_header("198.51.100.4", 5555)
        self.wrapper.dataReceived(header[:10])
        self.assertIsNone(recorder.peer)
        self.wrapper.dataReceived(header[10:] + b"x")
        self.assertEqual(recorder.peer, IPv4Address("TCP", "198.51.100.4", 5555))
        self.assertEqual(recorder.data, b"x")

    def test_noHeaderClosed(self) -> None:
        """A connection that starts with anything else is closed; no session starts."""
        recorder, transport, _ = self.connect()
        self.wrapper.dataReceived(b"USER alice\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(recorder.peer)

    def test_malformedClosed(self) -> None:
        """A malformed v1 header is refused."""
        recorder, transport, _ = self.connect()
        self.wrapper.dataReceived(b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(recorder.peer)

    def test_endlessHeaderClosed(self) -> None:
        """A header that never ends is refused before it grows past the limit."""
        _recorder, transport, _ = self.connect()
        self.wrapper.dataReceived(b"PROXY " + b"1" * 300)
        self.assertTrue(transport.disconnecting)

    def test_timeout(self) -> None:
        """No header within HEADER_TIMEOUT closes the connection."""
        recorder, transport, clock = self.connect()
        clock.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(recorder.peer)
