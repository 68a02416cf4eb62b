"""Implicit TLS on the system's OpenSSL (L{mailgw.systls}): L{SystemTLSProtocol} over a
C{StringTransport}, with Python's C{ssl} (or pyOpenSSL) as the client in memory."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailgw.listeners import implicit_tls_factory
from mailgw.systls import LibSSL, SystemTLSFactory, SystemTLSProtocol, error_text
from mailgw.tls import ServerTLS, peer_certificate, tls_failure_text
from mailgw.tlstickets import TicketKeyControl, TicketKeys
from tests.servers.pki import TestPKI


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """What the proxies' sessions see of their transport."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.handshakes = 0
        self.lost: Failure | None = None
        self.peer: x509.Certificate | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"+OK greeting\r\n")  # before the handshake, as the sessions do

    def handshakeCompleted(self) -> None:
        self.handshakes += 1
        self.peer = peer_certificate(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class Pair:
    """A L{SystemTLSProtocol} on a C{StringTransport} and a client C{SSLObject}."""

    def __init__(self, server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None) -> None:
        self.app = Recorder()
        self.tls = SystemTLSProtocol(server, self.app)
        self.transport = StringTransport()
        self.tls.makeConnection(self.transport)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost", session=session)
        self.client_error: ssl.SSLError | None = None

    def pump(self) -> None:
        """Move bytes both ways until neither side has more."""
        for _ in range(10):
            moved = False
            data = self.outgoing.read()
            if data:
                moved = True
                self.tls.dataReceived(data)
            data = self.transport.value()
            if data:
                moved = True
                self.transport.clear()
                self.incoming.write(data)
            try:
                self.client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                self.client_error = e
                return
            if not moved and not self.outgoing.pending:
                return

    def count_writes(self) -> list[bytes]:
        """From now on, what the TLS layer writes to the TCP transport, write by write."""
        writes: list[bytes] = []
        tcp_write = self.transport.write

        def counted(data: bytes) -> None:
            writes.append(data)
            tcp_write(data)

        self.transport.write = counted  # type: ignore[method-assign]
        return writes

    def handshake(self) -> None:
        self.pump()
        self.pump()

    def send(self, data: bytes) -> None:
        self.client.write(data)
        self.pump()

    def read(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.client.read(65536))
            except ssl.SSLWantReadError:
                return b"".join(chunks)


def resumes(first: ssl.SSLContext, second: ssl.SSLContext, client: ssl.SSLContext) -> bool:
    """Whether a session from a full handshake on C{first} resumes on C{second}."""
    pair = Pair(first, client)
    pair.handshake()
    pair.read()
    again = Pair(second, client, pair.client.session)
    again.handshake()
    return again.client.session_reused


class SystemTLSTests(TestCase):
    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.pki = TestPKI(folder)
        self.cert, self.key = self.pki.server_cert(["localhost"])

    def server_tls(self, **settings: Any) -> ServerTLS:
        return ServerTLS(Path(self.cert), Path(self.key), **settings)

    def context(self, **settings: Any) -> ssl.SSLContext:
        context = self.server_tls(**settings).system_context
        assert context is not None, "the system's OpenSSL is reachable on this machine"
        return context

    def client(self, maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki.ca_path)
        context.maximum_version = maximum
        return context

    def test_libraryFound(self) -> None:
        """On this machine the system's libssl is reached (the rest depends on it)."""
        self.assertIsInstance(LibSSL.load(), LibSSL)
        self.assertIsInstance(TicketKeyControl.locate_system(), TicketKeyControl)

    def test_heldUntilHandshake(self) -> None:
        """The greeting written before the handshake goes out after it, once; the
        wrapped protocol hears of the handshake once; then data flows both ways."""
        pair = Pair(self.context(), self.client())
        self.assertEqual(pair.app.handshakes, 0)
        pair.handshake()
        self.assertEqual(pair.app.handshakes, 1)
        self.assertEqual(pair.read(), b"+OK greeting\r\n")
        pair.send(b"USER alice\r\n")
        self.assertEqual(b"".join(pair.app.received), b"USER alice\r\n")
        pair.tls.write(b"+OK\r\n")
        pair.tls.writeSequence([b"+OK ", b"two\r\n"])
        pair.pump()
        self.assertEqual(pair.read(), b"+OK\r\n+OK two\r\n")
        self.assertEqual(pair.app.handshakes, 1)

    def test_answersWhileDeliveringInOneSend(self) -> None:
        """What the wrapped protocol writes while it is handed data (two answers to a
        pipelined burst) reaches the TCP transport as one write, after the delivery;
        a write outside a delivery (a relayed answer) goes out at once."""
        pair = Pair(self.context(), self.client())
        pair.handshake()
        pair.read()
        writes = pair.count_writes()

        def answer(data: bytes) -> None:
            pair.app.received.append(data)
            pair.tls.write(b"+OK first\r\n")
            pair.tls.write(b"+OK second\r\n")

        pair.app.dataReceived = answer  # type: ignore[method-assign]
        pair.send(b"NOOP\r\nNOOP\r\n")
        self.assertEqual(len(writes), 1)
        self.assertEqual(pair.read(), b"+OK first\r\n+OK second\r\n")
        pair.tls.write(b"+OK relayed\r\n")
        self.assertEqual(len(writes), 2)
        pair.pump()
        self.assertEqual(pair.read(), b"+OK relayed\r\n")

    def test_handshakeEndInOneSend(self) -> None:
        """The client's Finished is answered with one TCP write: the held greeting,
        the session tickets, and what handshakeCompleted writes."""
        pair = Pair(self.context(), self.client())
        writes = pair.count_writes()

        def completed() -> None:
            pair.tls.write(b"+OK ready\r\n")
            pair.tls.write(b"+OK more\r\n")

        pair.app.handshakeCompleted = completed  # type: ignore[method-assign]
        pair.handshake()
        self.assertEqual(pair.read(), b"+OK greeting\r\n+OK ready\r\n+OK more\r\n")
        self.assertEqual(len(writes), 2)  # the server's flight, then the rest
        self.assertIsNotNone(pair.client.session)

    def test_settingsAsPyOpenSSL(self) -> None:
        """The system context has the pyOpenSSL context's settings: minimum version,
        verify mode, options."""
        ca = Path(self.pki.ca_path)
        for mode, verify in (("none", ssl.CERT_NONE), ("optional", ssl.CERT_OPTIONAL), ("required", ssl.CERT_REQUIRED)):
            context = self.context(client_certificate=mode, client_ca=ca, minimum_version="TLSv1.3")
            self.assertEqual(context.verify_mode, verify)
            self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_3)
            for option in (ssl.OP_NO_COMPRESSION, ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_RENEGOTIATION):
                self.assertTrue(context.options & option)

    def test_tls12Refused(self) -> None:
        """minimum_version = TLSv1.3: a TLS 1.2 client fails the handshake, and the
        wrapped protocol learns OpenSSL's reason."""
        pair = Pair(self.context(minimum_version="TLSv1.3"), self.client(ssl.TLSVersion.TLSv1_2))
        pair.handshake()
        self.assertEqual(pair.app.handshakes, 0)
        self.assertIsNotNone(pair.client_error)
        assert pair.app.lost is None  # the transport has not told it yet
        pair.tls.connectionLost(Failure(Exception("closed")))
        assert pair.app.lost is not None
        self.assertEqual(tls_failure_text(pair.app.lost), "unsupported protocol")
        self.assertTrue(pair.transport.disconnecting)

    def test_notTLS(self) -> None:
        """A client that speaks plaintext to the TLS port: closed, with the reason."""
        app = Recorder()
        tls = SystemTLSProtocol(self.context(), app)
        transport = StringTransport()
        tls.makeConnection(transport)
        tls.dataReceived(b"USER alice\r\n")
        self.assertTrue(transport.disconnecting)
        assert app.lost is None  # the transport has not told it yet
        tls.connectionLost(Failure(Exception("closed")))
        assert app.lost is not None
        self.assertEqual(tls_failure_text(app.lost), "wrong version number")
        tls.write(b"more")  # after the end: nothing, no error
        self.assertEqual(app.received, [])

    def test_goneMidHandshake(self) -> None:
        """A peer that vanishes during the handshake: an unexpected EOF, in words."""
        pair = Pair(self.context(), self.client())
        try:
            pair.client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        pair.tls.dataReceived(pair.outgoing.read())  # the ClientHello, then nothing
        pair.tls.connectionLost(Failure(Exception("connection lost")))
        assert pair.app.lost is not None
        self.assertEqual(tls_failure_text(pair.app.lost), "unexpected eof while reading")
        self.assertEqual(error_text(ssl.SSLEOFError()), "unexpected eof while reading")

    def test_loseConnectionSendsCloseAlert(self) -> None:
        """C{loseConnection}: the close alert (the client reads a clean end); what the
        client still sends is read and discarded, so it is not reset while uploading;
        its close alert closes the TCP connection. Nothing is written after it."""
        pair = Pair(self.context(), self.client())
        pair.handshake()
        pair.read()
        pair.tls.write(b"+OK bye\r\n")
        pair.tls.loseConnection()
        self.assertTrue(pair.tls.disconnecting)
        self.assertFalse(pair.transport.disconnecting)
        pair.incoming.write(pair.transport.value())
        self.assertEqual(pair.client.read(100), b"+OK bye\r\n")
        self.assertEqual(pair.client.read(100), b"")  # the close alert: a clean end
        pair.transport.clear()
        pair.tls.write(b"late")
        self.assertEqual(pair.transport.value(), b"")
        pair.client.write(b"x" * 100000)  # still uploading
        pair.tls.dataReceived(pair.outgoing.read())
        self.assertEqual(pair.app.received, [])
        self.assertFalse(pair.transport.disconnecting)
        pair.client.unwrap()
        pair.tls.dataReceived(pair.outgoing.read())
        self.assertTrue(pair.transport.disconnecting)

    def test_loseConnectionThenPeerGone(self) -> None:
        """The peer ends the TCP connection instead of answering the alert: a normal
        end for the wrapped protocol."""
        pair = Pair(self.context(), self.client())
        pair.handshake()
        pair.tls.loseConnection()
        pair.tls.connectionLost(Failure(Exception("connection done")))
        assert pair.app.lost is not None
        self.assertIsNone(tls_failure_text(pair.app.lost))

    def test_loseConnectionMidHandshake(self) -> None:
        """Before the handshake is done there is nothing to say: closed at once."""
        pair = Pair(self.context(), self.client())
        pair.tls.loseConnection()
        self.assertTrue(pair.transport.disconnecting)

    def test_peerCloseAlert(self) -> None:
        """The client's close alert: answered and closed."""
        pair = Pair(self.context(), self.client())
        pair.handshake()
        pair.read()
        try:
            pair.client.unwrap()
        except ssl.SSLWantReadError:
            pass
        pair.tls.dataReceived(pair.outgoing.read())
        self.assertTrue(pair.transport.disconnecting)

    def test_abort(self) -> None:
        pair = Pair(self.context(), self.client())
        pair.handshake()
        pair.tls.abortConnection()
        self.assertTrue(pair.transport.disconnecting)
        self.assertTrue(pair.tls.disconnecting)

    def test_pauseHoldsDecryptedData(self) -> None:
        """Paused (a full peer, a login under way): what was already decrypted is not
        handed on until reading resumes, and then in order."""
        pair = Pair(self.context(), self.client())
        pair.handshake()
        pair.tls.pauseProducing()
        self.assertEqual(pair.transport.producerState, "paused")
        pair.client.write(b"one\r\n")
        pair.client.write(b"two\r\n")  # two records, in one read from the socket
        pair.tls.dataReceived(pair.outgoing.read())
        self.assertEqual(pair.app.received, [])
        pair.tls.resumeProducing()
        self.assertEqual(pair.transport.producerState, "producing")
        self.assertEqual(b"".join(pair.app.received), b"one\r\ntwo\r\n")

    def test_answersAfterResumeInOneSend(self) -> None:
        """Reading resumes (a login finished): the answers to the commands held
        meanwhile reach the TCP transport as one write."""
        pair = Pair(self.context(), self.client())
        pair.handshake()
        pair.read()
        pair.tls.pauseProducing()
        pair.client.write(b"one\r\n")
        pair.client.write(b"two\r\n")
        pair.tls.dataReceived(pair.outgoing.read())
        pair.app.dataReceived = lambda data: pair.tls.write(b"+OK " + data)  # type: ignore[method-assign]
        writes = pair.count_writes()
        pair.tls.resumeProducing()
        self.assertEqual(len(writes), 1)
        pair.pump()
        self.assertEqual(pair.read(), b"+OK one\r\n+OK two\r\n")

    def test_pauseWhileDelivering(self) -> None:
        """A pause from inside the wrapped protocol's C{dataReceived} stops at once; a
        resume from inside it does not hand on data out of order."""
        pair = Pair(self.context(), self.client())
        pair.handshake()
        order: list[bytes] = []

        def received(data: bytes) -> None:
            order.append(data)
            if data == b"one":
                pair.tls.pauseProducing()
                pair.tls.resumeProducing()  # re-entrant: the outer loop goes on
                order.append(b"after resume")

        pair.app.dataReceived = received  # type: ignore[method-assign]
        pair.client.write(b"one")
        pair.client.write(b"two")
        pair.tls.dataReceived(pair.outgoing.read())
        self.assertEqual(order, [b"one", b"after resume", b"two"])

    def test_producerReachesTheTCPTransport(self) -> None:
        pair = Pair(self.context(), self.client())
        producer = object()
        pair.tls.registerProducer(producer, True)
        self.assertIs(pair.transport.producer, producer)
        pair.tls.unregisterProducer()
        self.assertIsNone(pair.transport.producer)

    def test_clientCertificate(self) -> None:
        """A verified client certificate is what C{peer_certificate} returns, on a full
        and on a resumed handshake; with C{"none"}, none is asked for or returned."""
        cert, key = self.pki.client_cert("alice")
        context = self.context(client_certificate="optional", client_ca=Path(self.pki.ca_path))
        client = self.client()
        client.load_cert_chain(cert, key)
        pair = Pair(context, client)
        pair.handshake()
        pair.read()
        assert pair.app.peer is not None
        self.assertEqual(pair.app.peer.subject.rfc4514_string(), "CN=alice")
        session = pair.client.session
        again = Pair(context, client, session)
        again.handshake()
        self.assertTrue(again.client.session_reused)
        assert again.app.peer is not None
        self.assertEqual(again.app.peer.subject.rfc4514_string(), "CN=alice")
        plain = Pair(self.context(), client)
        plain.handshake()
        self.assertIsNone(plain.app.peer)

    def test_clientCertificateRequired(self) -> None:
        pair = Pair(self.context(client_certificate="required", client_ca=Path(self.pki.ca_path)), self.client())
        pair.handshake()
        pair.tls.connectionLost(Failure(Exception("closed")))
        assert pair.app.lost is not None
        self.assertIn("certificate", tls_failure_text(pair.app.lost) or "")
        self.assertEqual(pair.app.handshakes, 0)

    def test_caNamesInCertificateRequest(self) -> None:
        """The CertificateRequest names the client CAs (clients choose their
        certificate by them), as the pyOpenSSL context does."""
        context = self.context(client_certificate="optional", client_ca=Path(self.pki.ca_path))
        app = Recorder()
        tls = SystemTLSProtocol(context, app)
        transport = StringTransport()
        tls.makeConnection(transport)
        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_connect_state()
        for _ in range(6):
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                tls.dataReceived(client.bio_read(65536))
            except SSL.WantReadError:
                pass
            if transport.value():
                client.bio_write(transport.value())
                transport.clear()
        names = [name.rfc4514_string() for name in client.get_client_ca_list(as_cryptography=True)]
        ca = x509.load_pem_x509_certificate(Path(self.pki.ca_path).read_bytes())
        self.assertEqual(names, [ca.subject.rfc4514_string()])

    def test_sharedTicketKey(self) -> None:
        """Two system contexts with the process's ticket key resume each other's
        tickets (two workers, or before and after a reload); without it they do not."""
        for maximum in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            keys = TicketKeys()
            first, second = self.context(), self.context()
            keys.use(first)
            keys.use(second)
            self.assertTrue(resumes(first, second, self.client(maximum)), maximum)
        other = self.context()
        TicketKeys().use(other)
        self.assertFalse(resumes(self.context(), other, self.client()))

    def test_sessionsOfOtherSettingsDoNotResume(self) -> None:
        """The session id context is the configuration's (certificate, client
        certificate mode, CAs), as on the pyOpenSSL context: a ticket from a context
        that did not ask for client certificates does not resume on one that does,
        even with the same ticket key."""
        keys = TicketKeys()
        ca = Path(self.pki.ca_path)
        plain, asking = self.context(), self.context(client_certificate="optional", client_ca=ca)
        same = self.context(client_certificate="optional", client_ca=ca)
        for context in (plain, asking, same):
            keys.use(context)
        client = self.client()
        self.assertTrue(resumes(asking, same, client))
        self.assertFalse(resumes(plain, asking, client))

    def test_buffersReleased(self) -> None:
        """An idle connection holds no read or write buffer: Python's C{ssl} sets
        SSL_MODE_RELEASE_BUFFERS on every context (what idle memory [10] relies on)."""
        library = LibSSL.load()
        assert isinstance(library, LibSSL)
        context = self.context()
        mode = library.ctrl(library.context_pointer(context), 33, 0, None)  # SSL_CTRL_MODE, add nothing
        self.assertTrue(mode & 0x10)

    def test_lean(self) -> None:
        """The per-connection object has no instance dict [10]."""
        tls = SystemTLSProtocol(self.context(), Recorder())
        self.assertFalse(hasattr(tls, "__dict__"))


class FactoryTests(TestCase):
    def test_buildsAroundTheWrappedProtocol(self) -> None:
        contexts: list[ssl.SSLContext] = []

        def current() -> ssl.SSLContext:
            contexts.append(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            return contexts[-1]

        factory = SystemTLSFactory(current, Factory.forProtocol(Recorder))
        first = factory.buildProtocol(None)
        second = factory.buildProtocol(None)
        assert isinstance(first, SystemTLSProtocol) and isinstance(second, SystemTLSProtocol)
        self.assertIsInstance(first.wrapped, Recorder)
        self.assertEqual(len(contexts), 2)  # each connection takes the current one

    def test_fallbackWithoutTheLibrary(self) -> None:
        """When the system's libssl cannot be reached the listeners use pyOpenSSL."""
        from twisted.protocols.tls import TLSMemoryBIOFactory

        class Environment:
            def __init__(self, context: ssl.SSLContext | None) -> None:
                self.server_tls = type("T", (), {"system_context": context})()

        wrapped = Factory.forProtocol(Recorder)
        with_library = implicit_tls_factory(lambda: Environment(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)), wrapped)  # type: ignore[arg-type, return-value]
        without = implicit_tls_factory(lambda: Environment(None), wrapped)  # type: ignore[arg-type, return-value]
        self.assertIsInstance(with_library, SystemTLSFactory)
        self.assertIsInstance(without, TLSMemoryBIOFactory)
