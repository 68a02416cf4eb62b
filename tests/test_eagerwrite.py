"""Eager writes (L{mailgw.eagerwrite}) on real loopback TCP connections: sent at once
when nothing is queued, queued (in order, with the producer paused) when the kernel
does not take everything, and Twisted's own path for TLS, pull producers, closing and
errors."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailgw.eagerwrite import EagerClient, EagerServer, make_eager
from mailgw.tls import tune_tcp
from tests.test_tls import _PKI, _client_creator


class _Peer(Protocol):
    """Collects what arrives; C{made} and C{lost} fire at connection and its end."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.made: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.waiting: tuple[int, defer.Deferred[None]] | None = None

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.waiting is not None and len(self.data) >= self.waiting[0]:
            _, d = self.waiting
            self.waiting = None
            d.callback(None)

    def received(self, size: int) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.data) >= size:
            d.callback(None)
        else:
            self.waiting = (size, d)
        return d

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IPushProducer)
class _Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class EagerWriteTests(TestCase):
    timeout = 30

    async def pair(self) -> tuple[Any, _Peer, _Peer]:
        """A loopback connection: the server side's transport (eager), the server
        protocol, the client protocol."""
        servers: list[_Peer] = []

        def build() -> _Peer:
            servers.append(_Peer())
            return servers[-1]

        server_factory: Any = Factory.forProtocol(build)
        port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = _Peer()
        factory: Any = ClientFactory.forProtocol(lambda: client)
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)  # type: ignore[attr-defined]
        await client.made
        while not servers:
            await _turn()
        await servers[0].made
        server = servers[0]
        transport = server.transport
        self.assertTrue(make_eager(transport))

        def close() -> defer.Deferred[list[None]]:
            for side in (server, client):
                if not side.lost.called:
                    side.transport.abortConnection()  # type: ignore[union-attr]
            return defer.gatherResults([server.lost, client.lost])

        self.addCleanup(close)
        return transport, server, client

    async def test_sentAtOnce(self) -> None:
        """A write with nothing queued is on the socket when C{write} returns: the
        transport is not waiting for the reactor to write it."""
        transport, _, client = await self.pair()
        self.assertIsInstance(transport, EagerServer)
        transport.write(b"+OK hello\r\n")
        self.assertNotIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        await client.received(11)
        self.assertEqual(bytes(client.data), b"+OK hello\r\n")

    async def test_fullSocketQueuesInOrder(self) -> None:
        """What the kernel does not take is queued (and the streaming producer paused),
        later writes queue behind it, and the peer gets every byte in order."""
        transport, _, client = await self.pair()
        client.transport.pauseProducing()  # type: ignore[union-attr]
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        producer = _Producer()
        transport.registerProducer(producer, True)
        chunks = [bytes([65 + i % 26]) * 65536 for i in range(64)]
        for chunk in chunks:
            transport.write(chunk)
        self.assertIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        self.assertGreater(producer.paused, 0)
        self.assertGreater(len(transport.dataBuffer) + transport._tempDataLen, 0)
        client.transport.resumeProducing()  # type: ignore[union-attr]
        total = sum(map(len, chunks))
        await client.received(total)
        self.assertEqual(bytes(client.data), b"".join(chunks))
        self.assertGreater(producer.resumed, 0)

    async def test_queuedBytesStayAhead(self) -> None:
        """Once bytes are queued, a later write queues behind them even when the
        kernel has room again before the reactor writes the queue."""
        transport, _, client = await self.pair()
        client.transport.pauseProducing()  # type: ignore[union-attr]
        raw = client.transport.getHandle()  # type: ignore[union-attr]
        first = b"q" * (8 << 20)
        transport.write(first)
        self.assertGreater(len(transport.dataBuffer) + transport._tempDataLen, 0)
        early = raw.recv(1 << 20)  # room in the kernel, the queue not yet written
        self.assertTrue(early)
        transport.write(b"LAST")
        client.transport.resumeProducing()  # type: ignore[union-attr]
        await client.received(len(first) + 4 - len(early))
        self.assertEqual(early + bytes(client.data), first + b"LAST")

    async def test_closeAfterWrite(self) -> None:
        """loseConnection after an eager write: the data arrives, then the end."""
        transport, _, client = await self.pair()
        transport.write(b"* BYE\r\n")
        transport.loseConnection()
        await client.lost
        self.assertEqual(bytes(client.data), b"* BYE\r\n")
        assert client.reason is not None
        self.assertIsInstance(client.reason.value, ConnectionDone)
        transport.write(b"more")  # after the close: ignored, no error

    async def test_pullProducerStillDriven(self) -> None:
        """With a pull producer, writes take Twisted's path, whose doWrite asks the
        producer for more when the queue empties (an eager send would stall it)."""
        transport, _, client = await self.pair()
        pieces = [b"a" * 1000, b"b" * 1000, b"c" * 1000]

        class Pull:
            def resumeProducing(self) -> None:
                if pieces:
                    transport.write(pieces.pop(0))
                else:
                    transport.unregisterProducer()

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Pull(), False)
        await client.received(3000)
        self.assertEqual(bytes(client.data), b"a" * 1000 + b"b" * 1000 + b"c" * 1000)

    async def test_resetPeerReported(self) -> None:
        """A write to a connection the peer reset raises nothing; the loss is reported
        through connectionLost as with Twisted's own writes."""
        transport, server, client = await self.pair()
        transport.stopReading()  # the loss is found by writing, not by reading an end
        client.transport.getHandle().setsockopt(  # type: ignore[union-attr]
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client.transport.abortConnection()  # type: ignore[union-attr]
        await client.lost
        for _ in range(20):
            transport.write(b"x" * 1000)
            if server.lost.called:
                break
            await _turn()
        await server.lost
        assert server.reason is not None
        self.assertIsInstance(server.reason.value, ConnectionLost)

    async def test_startTLSAfterEager(self) -> None:
        """STARTTLS on an eager connection: writes go through TLS (the peer reads
        plaintext only after its handshake) and the transport is an ISSLTransport."""
        pki = _PKI(Path(self.mktemp()))
        transport, _server, client = await self.pair()
        transport.write(b"+OK begin TLS\r\n")
        await client.received(15)
        transport.startTLS(pki.server_tls())
        client.transport.startTLS(_client_creator(pki.ca))  # type: ignore[union-attr]
        self.assertTrue(ISSLTransport.providedBy(transport))
        transport.write(b"secret\r\n")
        await client.received(15 + 8)
        self.assertEqual(bytes(client.data), b"+OK begin TLS\r\nsecret\r\n")
        self.assertTrue(transport.TLS)

    async def test_clientSide(self) -> None:
        """The client side of a connection becomes an L{EagerClient}; tune_tcp does
        it together with TCP_NODELAY."""
        _, _, client = await self.pair()
        tune_tcp(client.transport)
        self.assertIsInstance(client.transport, EagerClient)
        sock = client.transport.getHandle()  # type: ignore[union-attr]
        self.assertNotEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        self.assertTrue(make_eager(client.transport))  # again: still eager

    def test_otherTransportsUntouched(self) -> None:
        """Only Twisted's TCP server and client connections are made eager."""
        string = StringTransport()
        self.assertFalse(make_eager(string))
        self.assertIs(type(string), StringTransport)
        self.assertFalse(make_eager(object()))

        class Subclass(tcp.Server):
            pass

        self.assertFalse(make_eager(Subclass.__new__(Subclass)))


def _turn() -> defer.Deferred[None]:
    """One turn of the reactor."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0, d.callback, None)  # type: ignore[attr-defined]
    return d
