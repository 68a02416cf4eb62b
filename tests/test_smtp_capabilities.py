"""SMTP capabilities before AUTH [4.5] and the end of a relayed SMTP session, without
sockets: the prober (L{mailgw.upstream.smtpprobe}) against a scripted server on a
StringTransport with a Clock, and the SMTP session's EHLO answer and its 421 when the
mail server goes away.  The same behaviours run against Dovecot's submission service
and swaks in tests/test_integration_fidelity.py."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.proxy.relay import IRelayStage, PassThrough
from mailgw.proxy.smtp import GoodbyeWatch, SMTPSession
from mailgw.testing import RecordingEnds, TLSStringTransport
from mailgw.upstream import UpstreamTarget
from mailgw.upstream.smtpprobe import PROBE_TIMEOUT, SMTPCapabilities
from tests.test_proxy_imap4_smtp import smtp_harness, upstream_wire
from tests.test_proxy_pop3 import POP3Harness, answers, make_config

EHLO_ANSWER = (
    b"250-mail.example.com\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 35882577\r\n"
    b"250-ETRN\r\n"
    b"250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 CHUNKING\r\n"
)
LEARNED = ("SIZE 35882577", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING")


class Connection:
    """One connection the prober opened."""

    def __init__(self, target: UpstreamTarget, tls: object, protocol: Any, transport: TLSStringTransport) -> None:
        self.target = target
        self.tls = tls
        self.protocol = protocol
        self.transport = transport

    def server(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    def __init__(self, owner: ScriptedServers, target: UpstreamTarget, tls: object) -> None:
        self.owner = owner
        self.target = target
        self.tls = tls

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        if self.owner.refuse:
            return defer.fail(ConnectionRefusedError("scripted"))
        if self.owner.hang:
            return defer.Deferred()
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.25", 587))
        assert protocol is not None
        transport = TLSStringTransport()
        protocol.makeConnection(transport)
        self.owner.connections.append(Connection(self.target, self.tls, protocol, transport))
        return defer.succeed(protocol)


class ScriptedServers:
    """The prober's endpoint seam: each connection lands on a StringTransport the
    test answers for; or the server refuses, or the connection never completes."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.refuse = False
        self.hang = False

    def __call__(self, target: UpstreamTarget, tls: object) -> ScriptedEndpoint:
        return ScriptedEndpoint(self, target, tls)


def logged(events: EventLoggingObserver) -> str:
    return "\n".join(formatEvent(event) for event in events)


def tls_for(target: UpstreamTarget) -> Any:
    return ("tls-options", target.host)


def smtps_config(**options: Any) -> Any:
    return make_config(smtps={"default_server": {"host": "mail.example.com", "port": 587, "tls": "none"}, **options})


class ProberTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.servers = ScriptedServers()
        self.prober = SMTPCapabilities(self.clock, endpoint_for=self.servers)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def start(self, **options: Any) -> None:
        self.prober.configure(smtps_config(**options).smtps, "gw7", tls_for)
        self.prober.startService()
        self.addCleanup(self.prober.stopService)

    def answer_ehlo(self, connection: Connection, answer: bytes = EHLO_ANSWER) -> None:
        connection.server(b"220 mail.example.com ESMTP\r\n")
        self.assertEqual(connection.sent(), b"EHLO gw7\r\n")
        connection.server(answer)

    def test_learnsAtStart(self) -> None:
        """At start the default server is asked: greeting, EHLO with the node name,
        QUIT; the relayed extensions it has are kept, in a fixed order, nothing else
        (not its AUTH, STARTTLS, ETRN, DSN)."""
        self.assertEqual(self.prober.keywords(), ("SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES"))
        self.start()
        [connection] = self.servers.connections
        target = connection.target
        self.assertEqual((target.host, target.port, connection.tls), ("mail.example.com", 587, None))
        self.answer_ehlo(connection)
        self.assertEqual(connection.sent(), b"QUIT\r\n")
        self.assertTrue(connection.transport.disconnecting)
        self.assertTrue(self.prober.learned)
        self.assertEqual(self.prober.keywords(), LEARNED)
        self.assertIn("SIZE 35882577 PIPELINING", logged(self.events))

    def test_starttls(self) -> None:
        """With tls = "starttls" the EHLO that counts is the one after STARTTLS, with
        the configured server's TLS options."""
        self.start(default_server={"host": "mail.example.com", "port": 587, "tls": "starttls"})
        [connection] = self.servers.connections
        connection.server(b"220 mail.example.com ESMTP\r\n")
        self.assertEqual(connection.sent(), b"EHLO gw7\r\n")
        connection.server(b"250-mail.example.com\r\n250-STARTTLS\r\n250 SIZE 1000\r\n")
        self.assertEqual(connection.sent(), b"STARTTLS\r\n")
        self.assertFalse(self.prober.learned)
        connection.server(b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(connection.transport.tls_options, ("tls-options", "mail.example.com"))
        self.assertEqual(connection.sent(), b"EHLO gw7\r\n")
        connection.server(EHLO_ANSWER)
        self.assertEqual(self.prober.keywords(), LEARNED)

    def test_implicitTlsEndpoint(self) -> None:
        """With tls = "implicit" the endpoint gets the TLS options (TLS from the first
        byte) and no STARTTLS is sent."""
        self.start(default_server={"host": "mail.example.com", "port": 465, "tls": "implicit"})
        [connection] = self.servers.connections
        self.assertEqual(connection.tls, ("tls-options", "mail.example.com"))
        self.answer_ehlo(connection, b"250-mail\r\n250 SIZE 2000\r\n")
        self.assertEqual(self.prober.keywords(), ("SIZE 2000",))

    def test_serverDownUsesFallback(self) -> None:
        """A server that cannot be reached leaves the configured fallback SIZE, and
        the log says why; 0 advertises SIZE without a limit."""
        self.servers.refuse = True
        self.start(fallback_message_size=52428800)
        self.assertFalse(self.prober.learned)
        self.assertEqual(self.prober.keywords(), ("SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES"))
        self.assertIn("Cannot read the SMTP extensions of mail.example.com:587", logged(self.events))
        self.prober.configure(smtps_config(fallback_message_size=0).smtps, "gw7", tls_for)
        self.assertEqual(self.prober.keywords(), ("SIZE", "8BITMIME", "ENHANCEDSTATUSCODES"))

    def test_refreshedPeriodically(self) -> None:
        """The server is asked again every capabilities_refresh seconds; a failed
        refresh keeps what it said last."""
        self.start(capabilities_refresh=60)
        self.answer_ehlo(self.servers.connections[0])
        self.servers.connections[0].protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(59)
        self.assertEqual(len(self.servers.connections), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.servers.connections), 2)
        self.answer_ehlo(self.servers.connections[1], b"250-mail\r\n250-SIZE 99\r\n250 PIPELINING\r\n")
        self.assertEqual(self.prober.keywords(), ("SIZE 99", "PIPELINING"))
        self.servers.refuse = True
        self.clock.advance(60)
        self.assertEqual(self.prober.keywords(), ("SIZE 99", "PIPELINING"))

    def test_probeTimesOut(self) -> None:
        """A server that never answers (or a connection that never completes) does
        not hold the prober: after PROBE_TIMEOUT the connection is aborted and the
        next refresh asks again."""
        self.start()
        [connection] = self.servers.connections
        connection.server(b"220 mail ESMTP\r\n")
        self.clock.advance(PROBE_TIMEOUT)
        self.assertTrue(connection.transport.disconnected)
        self.assertFalse(self.prober.learned)
        self.servers.hang = True
        self.clock.advance(600 - PROBE_TIMEOUT)
        self.clock.advance(PROBE_TIMEOUT)
        self.servers.hang = False
        self.clock.advance(600 - PROBE_TIMEOUT)
        self.assertEqual(len(self.servers.connections), 2)

    def test_badServerAnswers(self) -> None:
        """A server refusing EHLO or STARTTLS, or sending garbage, is a failed probe
        (connection aborted, fallback kept)."""
        for script in (
            [b"554 go away\r\n"],
            [b"220 mail\r\n", b"502 no EHLO\r\n"],
            [b"220 mail\r\n", b"this is not SMTP\r\n"],
        ):
            prober = SMTPCapabilities(self.clock, endpoint_for=self.servers)
            prober.configure(smtps_config().smtps, "gw7", tls_for)
            prober.startService()
            connection = self.servers.connections[-1]
            for data in script:
                connection.server(data)
            self.assertTrue(connection.transport.disconnected, script)
            self.assertFalse(prober.learned, script)
            prober.stopService()

    def test_reloadAsksAgainAndForgetsAnotherServer(self) -> None:
        """A reload asks at once; naming another server forgets what the old one said
        (the fallback until the new one answers); an answer of the old server that
        arrives after the reload is ignored."""
        self.start()
        self.answer_ehlo(self.servers.connections[0])
        self.prober.configure(smtps_config().smtps, "gw7", tls_for)
        self.assertEqual(len(self.servers.connections), 2)
        self.assertEqual(self.prober.keywords(), LEARNED)
        other = smtps_config(default_server={"host": "mail2.example.com", "port": 587, "tls": "none"}).smtps
        self.prober.configure(other, "gw7", tls_for)
        self.assertTrue(self.servers.connections[1].transport.disconnected)
        self.assertFalse(self.prober.learned)
        self.assertEqual(self.servers.connections[2].target.host, "mail2.example.com")
        self.servers.connections[1].server(b"220 mail\r\n" + EHLO_ANSWER)
        self.assertFalse(self.prober.learned)
        self.answer_ehlo(self.servers.connections[2], b"250-mail2\r\n250 SIZE 5\r\n")
        self.assertEqual(self.prober.keywords(), ("SIZE 5",))

    def test_stopStopsTimerAndProbe(self) -> None:
        """At service stop the probe under way is aborted and no timer is left."""
        self.start()
        [connection] = self.servers.connections
        self.prober.stopService()
        self.assertTrue(connection.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600)
        self.assertEqual(len(self.servers.connections), 1)

    def test_stopWaitsForClosingConnection(self) -> None:
        """At stop a connection still closing after QUIT is aborted, and the stop
        fires once it is gone (nothing left for the reactor)."""
        self.start()
        connection = self.servers.connections[0]
        self.answer_ehlo(connection)
        stopping = self.prober.stopService()
        self.assertTrue(connection.transport.disconnected)
        self.assertNoResult(stopping)
        connection.protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopping)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeAbortedAfterGrace(self) -> None:
        """After QUIT the connection is closed politely and aborted if the server does
        not let go within 2 seconds; a connection that goes leaves no timer."""
        self.start()
        connection = self.servers.connections[0]
        self.answer_ehlo(connection)
        self.assertFalse(connection.transport.disconnected)
        self.clock.advance(2)
        self.assertTrue(connection.transport.disconnected)
        self.clock.advance(600)
        second = self.servers.connections[1]
        self.answer_ehlo(second)
        second.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [1200.0])

    def test_disabledProxyNotAsked(self) -> None:
        """With the SMTP proxy disabled nothing is asked."""
        self.prober.configure(make_config(smtps={"enabled": False}).smtps, "gw7", tls_for)
        self.prober.startService()
        self.addCleanup(self.prober.stopService)
        self.assertEqual(self.servers.connections, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


def harness_with(extensions: tuple[str, ...] | None, **options: Any) -> POP3Harness:
    harness = smtp_harness(**options)
    if extensions is not None:
        harness.env.smtp_extensions = lambda: extensions
    return harness


def ehlo(harness: POP3Harness, implicit_tls: bool = True) -> list[bytes]:
    session, transport = harness.connect(implicit_tls=implicit_tls)
    answers(transport)
    session.dataReceived(b"EHLO client.example\r\n")
    return answers(transport)


class EhloBeforeAuthTests(SynchronousTestCase):
    def test_serverExtensionsAdvertised(self) -> None:
        """The EHLO answer before AUTH carries what the default server offers (as
        learned), then STARTTLS and AUTH where the gateway offers them."""
        lines = ehlo(harness_with(LEARNED))
        self.assertEqual(
            lines,
            [
                b"250-mailgw at your service",
                b"250-SIZE 35882577",
                b"250-PIPELINING",
                b"250-8BITMIME",
                b"250-ENHANCEDSTATUSCODES",
                b"250-SMTPUTF8",
                b"250-CHUNKING",
                b"250 AUTH PLAIN LOGIN",
            ],
        )
        lines = ehlo(harness_with(("SIZE 1000",)), implicit_tls=False)
        self.assertEqual(lines, [b"250-mailgw at your service", b"250-SIZE 1000", b"250 STARTTLS"])

    def test_fallbackWithoutProber(self) -> None:
        """Without learned extensions: SIZE fallback_message_size, 8BITMIME and
        ENHANCEDSTATUSCODES, no PIPELINING."""
        lines = ehlo(harness_with(None, fallback_message_size=777))
        self.assertEqual(
            lines,
            [
                b"250-mailgw at your service",
                b"250-SIZE 777",
                b"250-8BITMIME",
                b"250-ENHANCEDSTATUSCODES",
                b"250 AUTH PLAIN LOGIN",
            ],
        )

    def test_currentExtensionsEachTime(self) -> None:
        """Each EHLO asks the prober again: a refresh is seen by new EHLOs."""
        current: list[tuple[str, ...]] = [("SIZE 1",)]
        harness = smtp_harness()
        harness.env.smtp_extensions = lambda: current[0]
        self.assertIn(b"250-SIZE 1", ehlo(harness))
        current[0] = ("SIZE 2", "PIPELINING")
        self.assertEqual(ehlo(harness)[1:3], [b"250-SIZE 2", b"250-PIPELINING"])


AUTH = b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00alice-pw") + b"\r\n"


class UpstreamLostTests(SynchronousTestCase):
    """The mail server closing the relayed connection [4.5]."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def relaying(self) -> tuple[SMTPSession, TLSStringTransport, Any]:
        harness = smtp_harness(authentication=["aaa"])
        session, transport = harness.connect()
        session.dataReceived(b"EHLO c\r\n" + AUTH)
        upstream = harness.connector.upstreams[-1]
        upstream.dataReceived(b"220 mail ESMTP\r\n250 mail\r\n")
        self.assertEqual(answers(transport)[-1], b"235 2.7.0 Authentication successful")
        self.wire = upstream_wire(harness)
        return session, transport, upstream

    def test_droppedMidTransaction(self) -> None:
        """The server closing (cleanly, as a crashed or killed one does) in the middle
        of DATA: the client gets 421 4.4.2 and is closed at once; the log says the
        mail server closed the connection."""
        session, transport, upstream = self.relaying()
        session.dataReceived(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        upstream.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        session.dataReceived(b"Subject: x\r\n\r\n" + b"x" * 10000)
        answers(transport)
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            answers(transport), [b"421 4.4.2 mailgw Connection to the mail server lost, closing connection"]
        )
        self.assertTrue(transport.disconnecting)
        self.assertIn("the mail server closed the connection without a goodbye", logged(self.events))

    def test_resetMidTransaction(self) -> None:
        """A reset connection gets the same 421 (the core logs the reason)."""
        session, transport, upstream = self.relaying()
        session.dataReceived(b"MAIL FROM:<a@example.com>\r\n")
        upstream.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        self.assertEqual(
            answers(transport), [b"421 4.4.2 mailgw Connection to the mail server lost, closing connection"]
        )
        self.assertIn("Connection reset by peer", logged(self.events))

    def test_droppedBetweenTransactions(self) -> None:
        """Closed silently while the client is idle after a transaction: 421 too (the
        client's next command would wait for an answer that never comes)."""
        _session, transport, upstream = self.relaying()
        upstream.dataReceived(b"250 2.0.0 Ok: queued as 1234\r\n")
        answers(transport)
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(answers(transport)[0][:9], b"421 4.4.2")

    def test_quitAnsweredNothingAdded(self) -> None:
        """After QUIT the server's 221 is its last word: the client gets it and the
        close, no 421 after it; a 221 split over two reads counts the same."""
        for chunks in ([b"221 2.0.0 Bye\r\n"], [b"250 2.0.0 Ok\r\n221 2.0", b".0 Bye\r\n"]):
            session, transport, upstream = self.relaying()
            session.dataReceived(b"QUIT\r\n")
            self.assertTrue(self.wire.value().endswith(b"QUIT\r\n"))
            for chunk in chunks:
                upstream.dataReceived(chunk)
            upstream.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(answers(transport)[-1], b"221 2.0.0 Bye")
            self.assertTrue(transport.disconnecting)

    def test_serversOwn421NothingAdded(self) -> None:
        """A server that says 421 itself (shutting down, its own timeout) before
        closing: its 421 reaches the client, no second one."""
        _session, transport, upstream = self.relaying()
        upstream.dataReceived(b"421 4.4.2 mail.example.com Error: timeout exceeded\r\n")
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(answers(transport), [b"421 4.4.2 mail.example.com Error: timeout exceeded"])

    def test_partialReplyThen421(self) -> None:
        """A reply cut off in the middle, even one that starts 221, is no goodbye: the
        line is ended, then the 421 comes on a line of its own."""
        _session, transport, upstream = self.relaying()
        upstream.dataReceived(b"221 2.0.0 By")
        upstream.connectionLost(Failure(ConnectionDone()))
        lines = answers(transport)
        self.assertEqual(lines[0], b"221 2.0.0 By")
        self.assertEqual(lines[1][:9], b"421 4.4.2")

    def test_gatewayClosingNothingAdded(self) -> None:
        """When the gateway ends the session itself (kill, timeout) the client gets
        the gateway's goodbye only, not a second 421 when the server goes."""
        session, transport, upstream = self.relaying()
        session.terminate("test")
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(answers(transport), [b"421 4.3.2 mailgw Connection closed by the gateway"])


class GoodbyeWatchTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """The watch is a relay stage; the client's direction goes straight to the
        server's write, and an inner stage sees both directions behind it."""
        watch = GoodbyeWatch()
        ends = RecordingEnds()
        to_server, to_client = ends.server, ends.client
        watch.attach(ends)
        self.assertTrue(verifyObject(IRelayStage, watch))
        self.assertEqual(watch.from_client, ends.to_server)
        watch.from_server(b"250 ok\r\n")
        self.assertEqual(to_client, [b"250 ok\r\n"])

        class Upper(PassThrough):
            def from_server(self, data: bytes) -> None:
                super().from_server(data.upper())

        inner = Upper()
        watch = GoodbyeWatch(inner)
        watch.attach(ends)
        watch.from_client(b"quit\r\n")
        watch.from_server(b"221 bye\r\n")
        self.assertEqual((to_server[-1], to_client[-1]), (b"quit\r\n", b"221 BYE\r\n"))
        self.assertTrue(watch.said_goodbye)

    def test_saidGoodbye(self) -> None:
        """Only a complete last reply line with code 221 or 421 is a goodbye; the
        tail kept is bounded."""
        cases = [
            (b"221 2.0.0 Bye\r\n", True),
            (b"221\r\n", True),
            (b"250-x\r\n421 4.3.2 shutting down\r\n", True),
            (b"221-first line\r\n", False),
            (b"2210 nope\r\n", False),
            (b"250 2.0.0 Ok\r\n", False),
            (b"221 2.0.0 Bye", False),
            (b"", False),
        ]
        for data, expected in cases:
            watch = GoodbyeWatch()
            watch.attach(RecordingEnds())
            watch.from_server(data)
            self.assertEqual(watch.said_goodbye, expected, data)
        watch = GoodbyeWatch()
        watch.attach(RecordingEnds())
        watch.from_server(b"x" * 100000 + b"\r\n221 Bye\r\n")
        self.assertTrue(watch.said_goodbye)
        self.assertLessEqual(len(watch._tail), 512)
