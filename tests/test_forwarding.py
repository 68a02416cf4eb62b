"""forward_client_address [4.7] without sockets: the configuration key, the three
login clients on a StringTransport (what they send before the login, and only when
the server advertises it), and the sessions handing them the real client.  The same
behaviours run against real Dovecot, HAProxy and scripted servers in
tests/test_integration_forwarding.py."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import ConfigError
from mailgw.proxy.imap4 import IMAP4Session
from mailgw.proxy.pop3 import POP3Session
from mailgw.proxy.smtp import SMTPSession
from mailgw.testing import TLSStringTransport
from mailgw.upstream import UpstreamProtocol, UpstreamTarget
from mailgw.upstream.imap4 import IMAP4UpstreamLogin
from mailgw.upstream.pop3 import POP3UpstreamLogin
from mailgw.upstream.smtp import SMTPUpstreamLogin
from mailgw.wire.forwarding import ClientOrigin
from tests.test_proxy_pop3 import POP3Harness, answers, make_config

ORIGIN = ClientOrigin(
    address="192.0.2.7",
    port=40001,
    local_address="198.51.100.1",
    local_port=993,
    session_id="5f2c9a0b1d3e",
    helo="client.example.net",
    login="alice",
)
ID_LINE = (
    b'mgw1 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40001" "x-connected-ip" "198.51.100.1" '
    b'"x-connected-port" "993" "x-session-id" "5f2c9a0b1d3e")\r\n'
)
DOVECOT_XCLIENT = b"250 XCLIENT ADDR PORT PROTO HELO LOGIN SESSION TTL TIMEOUT FORWARD\r\n"


def target(tls: str = "none", port: int = 143) -> UpstreamTarget:
    return UpstreamTarget("mail.example.com", port, tls)


def start(protocol: UpstreamProtocol) -> TLSStringTransport:
    """Connect C{protocol} to a recording transport and begin the login as alice/pw."""
    transport = TLSStringTransport()
    protocol.makeConnection(transport)
    protocol.begin_login("alice", "pw")
    return transport


def sent(transport: TLSStringTransport) -> bytes:
    value: bytes = transport.value()
    transport.clear()
    return value


class Recorder:
    """Collects warnings while a test runs."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events)

    def refused(self) -> list[str]:
        return [str(e.get("command")) for e in self.events if "refused" in str(e.get("log_format", ""))]


class ConfigTests(SynchronousTestCase):
    """[PROXY.default_server] forward_client_address."""

    def test_defaultOff(self) -> None:
        """Absent, it is false for all three proxies."""
        config = make_config()
        for protocol in ("pop3s", "imap4s", "smtps"):
            self.assertFalse(config.proxy(protocol).default_server.forward_client_address)

    def test_read(self) -> None:
        """true is read per proxy."""
        server = {"host": "127.0.0.1", "port": 143, "tls": "none", "forward_client_address": True}
        config = make_config(imap4s={"default_server": server})
        self.assertTrue(config.proxy("imap4s").default_server.forward_client_address)
        self.assertFalse(config.proxy("pop3s").default_server.forward_client_address)

    def test_wrongType(self) -> None:
        """A value that is not a boolean is a configuration error naming the key."""
        server = {"host": "127.0.0.1", "port": 110, "tls": "none", "forward_client_address": "yes"}
        with self.assertRaises(ConfigError) as raised:
            make_config(pop3s={"default_server": server})
        self.assertIn("pop3s.default_server.forward_client_address", str(raised.exception))


class IMAP4LoginClientTests(SynchronousTestCase):
    """IMAP: ID with the client's origin before LOGIN, when the server offers ID."""

    def test_idBeforeLogin(self) -> None:
        """The server offers ID: the gateway's ID goes first; its answer (untagged ID
        data, tagged OK) is not passed on; LOGIN follows."""
        login = IMAP4UpstreamLogin(target(), None, origin=ORIGIN)
        wire = start(login)
        login.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n")
        self.assertEqual(sent(wire), ID_LINE)
        login.dataReceived(b'* ID ("name" "Dovecot")\r\nmgw1 OK ID completed.\r\n')
        self.assertEqual(sent(wire), b'mgw2 LOGIN "alice" "pw"\r\n')
        login.dataReceived(b"mgw2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        self.assertEqual(self.successResultOf(login.result), b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")

    def test_idAfterStarttls(self) -> None:
        """With STARTTLS upstream, ID goes over TLS, after the new CAPABILITY."""
        login = IMAP4UpstreamLogin(target("starttls"), object(), origin=ORIGIN)  # type: ignore[arg-type]
        wire = start(login)
        login.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ID STARTTLS] ready\r\n")
        self.assertEqual(sent(wire), b"mgw1 STARTTLS\r\n")
        login.dataReceived(b"mgw1 OK Begin TLS\r\n")
        self.assertIsNotNone(wire.tls_options)
        self.assertEqual(sent(wire), b"mgw2 CAPABILITY\r\n")
        login.dataReceived(b"* CAPABILITY IMAP4rev1 ID AUTH=PLAIN\r\nmgw2 OK done\r\n")
        self.assertEqual(sent(wire), ID_LINE.replace(b"mgw1", b"mgw3"))
        login.dataReceived(b"mgw3 OK ID completed.\r\n")
        self.assertEqual(sent(wire), b'mgw4 LOGIN "alice" "pw"\r\n')

    def test_clientFieldsFollow(self) -> None:
        """The client's own ID fields follow the gateway's; its x- fields do not."""
        client_id = ("name", "Thunderbird", "x-originating-ip", "6.6.6.6")
        origin = ClientOrigin("192.0.2.7", 1, "", 0, "s", client_id=client_id)
        login = IMAP4UpstreamLogin(target(), None, origin=origin)
        wire = start(login)
        login.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ID] ready\r\n")
        self.assertEqual(
            sent(wire),
            b'mgw1 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "1" "x-session-id" "s" '
            b'"name" "Thunderbird")\r\n',
        )

    def test_notOfferedNothingSent(self) -> None:
        """A server without ID gets LOGIN right away."""
        login = IMAP4UpstreamLogin(target(), None, origin=ORIGIN)
        wire = start(login)
        login.dataReceived(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        self.assertEqual(sent(wire), b'mgw1 LOGIN "alice" "pw"\r\n')

    def test_forwardingOffNothingSent(self) -> None:
        """Without an origin (forwarding off) nothing but LOGIN is sent."""
        login = IMAP4UpstreamLogin(target(), None)
        wire = start(login)
        login.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] ready\r\n")
        self.assertEqual(sent(wire), b'mgw1 LOGIN "alice" "pw"\r\n')

    def test_refusedLoginGoesOn(self) -> None:
        """A server that refuses the ID still gets the login; the log says so."""
        recorder = Recorder(self)
        login = IMAP4UpstreamLogin(target(), None, origin=ORIGIN)
        wire = start(login)
        login.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ID] ready\r\n")
        sent(wire)
        login.dataReceived(b"mgw1 BAD Invalid ID parameters\r\n")
        self.assertEqual(sent(wire), b'mgw2 LOGIN "alice" "pw"\r\n')
        self.assertEqual(recorder.refused(), ["ID"])


class POP3LoginClientTests(SynchronousTestCase):
    """POP3: XCLIENT before USER, when the greeting or CAPA offers it."""

    XCLIENT = b"XCLIENT ADDR=192.0.2.7 PORT=40001 SESSION=5f2c9a0b1d3e\r\n"

    def test_greetingOffers(self) -> None:
        """Dovecot's "+OK [XCLIENT]" greeting: XCLIENT at once, then USER/PASS."""
        login = POP3UpstreamLogin(target(port=110), None, origin=ORIGIN)
        wire = start(login)
        login.dataReceived(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(sent(wire), self.XCLIENT)
        login.dataReceived(b"+OK Updated\r\n")
        self.assertEqual(sent(wire), b"USER alice\r\n")
        login.dataReceived(b"+OK\r\n")
        self.assertEqual(sent(wire), b"PASS pw\r\n")
        login.dataReceived(b"+OK Logged in.\r\n")
        self.assertEqual(self.successResultOf(login.result), b"+OK Logged in.\r\n")

    def test_afterStls(self) -> None:
        """With STLS upstream, XCLIENT goes over TLS."""
        login = POP3UpstreamLogin(target("starttls", 110), object(), origin=ORIGIN)  # type: ignore[arg-type]
        wire = start(login)
        login.dataReceived(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(sent(wire), b"STLS\r\n")
        login.dataReceived(b"+OK Begin TLS negotiation now.\r\n")
        self.assertIsNotNone(wire.tls_options)
        self.assertEqual(sent(wire), self.XCLIENT)

    def test_capaOffers(self) -> None:
        """A greeting without the code: CAPA is asked; XCLIENT listed there is used."""
        login = POP3UpstreamLogin(target(port=110), None, origin=ORIGIN)
        wire = start(login)
        login.dataReceived(b"+OK ready\r\n")
        self.assertEqual(sent(wire), b"CAPA\r\n")
        login.dataReceived(b"+OK\r\nUSER\r\nXCLIENT\r\n.\r\n")
        self.assertEqual(sent(wire), self.XCLIENT)

    def test_notOfferedNothingSent(self) -> None:
        """Neither greeting nor CAPA offers it (or CAPA fails): USER, no XCLIENT."""
        for answer in (b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n", b"-ERR unknown command\r\n"):
            login = POP3UpstreamLogin(target(port=110), None, origin=ORIGIN)
            wire = start(login)
            login.dataReceived(b"+OK ready\r\n")
            sent(wire)
            login.dataReceived(answer)
            self.assertEqual(sent(wire), b"USER alice\r\n")

    def test_forwardingOffNothingSent(self) -> None:
        """Without an origin: no CAPA, no XCLIENT, even when the greeting offers it."""
        login = POP3UpstreamLogin(target(port=110), None)
        wire = start(login)
        login.dataReceived(b"+OK [XCLIENT] Dovecot ready.\r\n")
        self.assertEqual(sent(wire), b"USER alice\r\n")

    def test_refusedLoginGoesOn(self) -> None:
        """-ERR to XCLIENT: the login goes on; the log says so."""
        recorder = Recorder(self)
        login = POP3UpstreamLogin(target(port=110), None, origin=ORIGIN)
        wire = start(login)
        login.dataReceived(b"+OK [XCLIENT] ready\r\n")
        sent(wire)
        login.dataReceived(b"-ERR Invalid parameters\r\n")
        self.assertEqual(sent(wire), b"USER alice\r\n")
        self.assertEqual(recorder.refused(), ["XCLIENT"])


class SMTPLoginClientTests(SynchronousTestCase):
    """SMTP: XCLIENT after EHLO (and STARTTLS), then EHLO again as the client."""

    def login(
        self, origin: ClientOrigin | None = ORIGIN, *, tls: str = "none", authenticate: bool = True
    ) -> tuple[SMTPUpstreamLogin, TLSStringTransport]:
        tls_options: Any = object()
        login = SMTPUpstreamLogin(target(tls, 587), tls_options, origin=origin, authenticate=authenticate)
        wire = start(login)
        login.dataReceived(b"220 mail.example.com ESMTP\r\n")
        self.assertEqual(sent(wire), b"EHLO mailgw\r\n")
        return login, wire

    def test_dovecotSubmission(self) -> None:
        """The attributes the server lists (no NAME, no LOGIN while authenticating);
        after its 220 the gateway says EHLO with the client's HELO name, then AUTH."""
        login, wire = self.login()
        login.dataReceived(b"250-mail.example.com\r\n250-AUTH PLAIN\r\n" + DOVECOT_XCLIENT)
        self.assertEqual(
            sent(wire), b"XCLIENT ADDR=192.0.2.7 PORT=40001 HELO=client.example.net SESSION=5f2c9a0b1d3e\r\n"
        )
        login.dataReceived(b"220 mail.example.com ESMTP\r\n")
        self.assertEqual(sent(wire), b"EHLO client.example.net\r\n")
        login.dataReceived(b"250-mail.example.com\r\n250-AUTH PLAIN\r\n" + DOVECOT_XCLIENT)
        self.assertEqual(sent(wire), b"AUTH PLAIN AGFsaWNlAHB3\r\n")
        login.dataReceived(b"235 2.7.0 Logged in.\r\n")
        self.assertEqual(self.successResultOf(login.result), b"")

    def test_afterStarttls(self) -> None:
        """With STARTTLS upstream, XCLIENT follows the EHLO over TLS."""
        login, wire = self.login(tls="starttls")
        login.dataReceived(b"250-mail.example.com\r\n250 STARTTLS\r\n")
        self.assertEqual(sent(wire), b"STARTTLS\r\n")
        login.dataReceived(b"220 go ahead\r\n")
        self.assertIsNotNone(wire.tls_options)
        self.assertEqual(sent(wire), b"EHLO mailgw\r\n")
        login.dataReceived(b"250-mail.example.com\r\n250-AUTH PLAIN\r\n250 XCLIENT ADDR\r\n")
        self.assertEqual(sent(wire), b"XCLIENT ADDR=192.0.2.7\r\n")

    def test_postfixWithoutUpstreamAuth(self) -> None:
        """Relaying without AUTH (no mailhost): LOGIN tells Postfix who sends; NAME
        is unavailable; after the new EHLO the session is ready."""
        login, wire = self.login(authenticate=False)
        login.dataReceived(b"250-mx.example.com\r\n250 XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN\r\n")
        self.assertEqual(
            sent(wire),
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40001 HELO=client.example.net LOGIN=alice\r\n",
        )
        login.dataReceived(b"220 mx.example.com ESMTP\r\n")
        self.assertEqual(sent(wire), b"EHLO client.example.net\r\n")
        self.assertNoResult(login.result)
        login.dataReceived(b"250 mx.example.com\r\n")
        self.assertEqual(self.successResultOf(login.result), b"")
        self.assertEqual(sent(wire), b"")

    def test_badHeloName(self) -> None:
        """A client HELO name that is no domain or literal is [UNAVAILABLE], and the
        gateway's own name is used for the EHLO."""
        origin = ClientOrigin("192.0.2.7", 1, "", 0, "s", helo="x=ADDR=6.6.6.6")
        login, wire = self.login(origin)
        login.dataReceived(b"250-mx\r\n250-AUTH PLAIN\r\n250 XCLIENT ADDR HELO\r\n")
        self.assertEqual(sent(wire), b"XCLIENT ADDR=192.0.2.7 HELO=[UNAVAILABLE]\r\n")
        login.dataReceived(b"220 mx\r\n")
        self.assertEqual(sent(wire), b"EHLO mailgw\r\n")

    def test_longLoginSplit(self) -> None:
        """Attributes that do not fit 512 octets go in a second XCLIENT, sent after
        the first one's 220."""
        helo = ".".join(["h" * 60] * 4)
        origin = ClientOrigin("192.0.2.7", 1, "", 0, "s", helo=helo, login="l" * 250)
        login, wire = self.login(origin, authenticate=False)
        login.dataReceived(b"250-mx\r\n250 XCLIENT ADDR HELO LOGIN\r\n")
        self.assertEqual(sent(wire), b"XCLIENT ADDR=192.0.2.7 HELO=" + helo.encode() + b"\r\n")
        login.dataReceived(b"220 mx\r\n")
        self.assertEqual(sent(wire), b"XCLIENT LOGIN=" + b"l" * 250 + b"\r\n")
        login.dataReceived(b"220 mx\r\n")
        self.assertEqual(sent(wire), b"EHLO " + helo.encode() + b"\r\n")

    def test_notOfferedNothingSent(self) -> None:
        """A server without XCLIENT gets AUTH right after EHLO."""
        login, wire = self.login()
        login.dataReceived(b"250-mail.example.com\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(sent(wire), b"AUTH PLAIN AGFsaWNlAHB3\r\n")

    def test_forwardingOffNothingSent(self) -> None:
        """Without an origin no XCLIENT, even when offered."""
        login, wire = self.login(None)
        login.dataReceived(b"250-mail.example.com\r\n250-AUTH PLAIN\r\n" + DOVECOT_XCLIENT)
        self.assertEqual(sent(wire), b"AUTH PLAIN AGFsaWNlAHB3\r\n")

    def test_refusedLoginGoesOn(self) -> None:
        """A refused XCLIENT (550 not trusted): AUTH follows; the log says so."""
        recorder = Recorder(self)
        login, wire = self.login()
        login.dataReceived(b"250-mail.example.com\r\n250-AUTH PLAIN\r\n" + DOVECOT_XCLIENT)
        sent(wire)
        login.dataReceived(b"550 5.7.14 You are not from trusted IP\r\n")
        self.assertEqual(sent(wire), b"AUTH PLAIN AGFsaWNlAHB3\r\n")
        self.assertEqual(recorder.refused(), ["XCLIENT"])


def forwarding_harness(protocol: str, session_class: type[Any], **server: Any) -> POP3Harness:
    port = {"pop3s": 110, "imap4s": 143, "smtps": 587}[protocol]
    default_server = {"host": "127.0.0.1", "port": port, "tls": "none", **server}
    sections: dict[str, Any] = {protocol: {"default_server": default_server}}
    config = make_config(**sections)
    return POP3Harness(config, protocol=protocol, session_class=session_class)


class SessionTests(SynchronousTestCase):
    """The sessions give the login client the real client, only with forwarding on."""

    def imap_login(self, forward: bool) -> tuple[Any, Any, TLSStringTransport]:
        harness = forwarding_harness("imap4s", IMAP4Session, forward_client_address=forward)
        session, transport = harness.connect(port=40123, address="192.0.2.7")
        transport.hostAddr = IPv4Address("TCP", "198.51.100.1", 993)
        answers(transport)
        session.dataReceived(b'a ID ("name" "Thunderbird" "x-originating-ip" "6.6.6.6")\r\n')
        self.assertEqual(answers(transport), [b'* ID ("name" "mailgw")', b"a OK ID completed."])
        session.dataReceived(b'b LOGIN "alice" "alice-pw"\r\n')
        upstream = harness.connector.upstreams[-1]
        upstream.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] Dovecot ready.\r\n")
        wire = upstream.transport
        assert isinstance(wire, TLSStringTransport)
        return session, upstream, wire

    def test_imapIdCarriesClientAndItsFields(self) -> None:
        """IMAP with forwarding: the gateway still answers the client's ID itself; the
        server's ID carries the client's address and port, the address it reached,
        the session id, then the client's own fields (not its x- ones)."""
        session, _, wire = self.imap_login(True)
        self.assertEqual(
            wire.value(),
            b'mgw1 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40123" "x-connected-ip" "198.51.100.1" '
            b'"x-connected-port" "993" "x-session-id" "' + session.info.session_id.encode() + b'" '
            b'"name" "Thunderbird")\r\n',
        )

    def test_imapForwardingOff(self) -> None:
        """Without forwarding the server gets LOGIN only, the client's ID neither."""
        _, _, wire = self.imap_login(False)
        self.assertEqual(wire.value(), b'mgw1 LOGIN "alice" "alice-pw"\r\n')

    def test_imapIdNilForgets(self) -> None:
        """A later ID NIL from the client replaces its earlier fields."""
        harness = forwarding_harness("imap4s", IMAP4Session, forward_client_address=True)
        session, _ = harness.connect()
        session.dataReceived(b'a ID ("name" "x")\r\nb ID NIL\r\n')
        self.assertEqual(session.client_id_fields, ())

    def test_pop3Xclient(self) -> None:
        """POP3 with forwarding: XCLIENT with the peer's address, port and session id."""
        for forward, expected in ((True, b"XCLIENT ADDR=192.0.2.7 PORT=40123 SESSION="), (False, b"USER alice")):
            harness = forwarding_harness("pop3s", POP3Session, forward_client_address=forward)
            session, _ = harness.connect(port=40123, address="192.0.2.7")
            session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
            upstream = harness.connector.upstreams[-1]
            upstream.dataReceived(b"+OK [XCLIENT] Dovecot ready.\r\n")
            wire = upstream.transport
            assert isinstance(wire, TLSStringTransport)
            self.assertTrue(wire.value().startswith(expected), (forward, wire.value()))
            if forward:
                self.assertEqual(wire.value(), expected + session.info.session_id.encode() + b"\r\n")

    def test_smtpXclientHeloAndLogin(self) -> None:
        """SMTP with forwarding: XCLIENT with the client's address, its EHLO name and
        (relaying without upstream AUTH) the name it logged in with."""
        harness = forwarding_harness("smtps", SMTPSession, forward_client_address=True)
        session, _ = harness.connect(port=40123, address="192.0.2.7")
        session.dataReceived(b"EHLO client.example.net\r\nAUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\n")
        upstream = harness.connector.upstreams[-1]
        upstream.dataReceived(b"220 mx ESMTP\r\n")
        wire = upstream.transport
        assert isinstance(wire, TLSStringTransport)
        wire.clear()
        upstream.dataReceived(b"250-mx\r\n250-AUTH PLAIN\r\n250 XCLIENT ADDR PORT HELO LOGIN\r\n")
        self.assertEqual(wire.value(), b"XCLIENT ADDR=192.0.2.7 PORT=40123 HELO=client.example.net LOGIN=alice\r\n")
