"""The POP3 proxy's dialogue over StringTransport with a Clock: no sockets, no real
time.  The same behaviours run against real Dovecot and real clients in
tests/test_integration_pop3.py."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailgw.auth.portal import GatewayRealm
from mailgw.config import Config, parse_config
from mailgw.proxy.core import MAX_ERRORS, ProxySession
from mailgw.proxy.environment import ProxyEnvironment
from mailgw.proxy.gatekeeper import Gatekeeper
from mailgw.proxy.pop3 import POP3Session
from mailgw.proxy.registry import SessionRegistry, SessionState
from mailgw.proxy.relay import PassThrough
from mailgw.testing import ScriptedConnector, StaticChecker, TLSStringTransport

USERS = {"alice": ("alice-pw", None), "bob": ("bob-pw", "Solo"), "nobody": ("nobody-pw", "Blocked")}


def make_config(
    pop3s: dict[str, Any] | None = None,
    policies: list[dict[str, Any]] | None = None,
    imap4s: dict[str, Any] | None = None,
    smtps: dict[str, Any] | None = None,
    sso_policy: list[str] | None = None,
    inspection: list[dict[str, Any]] | None = None,
) -> Config:
    data: dict[str, Any] = {
        "gateway": {"state_dir": "state"},
        "tls": {"generate_self_signed": True},
        "pop3s": {
            "default_server": {"host": "127.0.0.1", "port": 110, "tls": "none"},
            "allowed_servers": ["mail2.example.com"],
            **(pop3s or {}),
        },
        "imap4s": {
            "default_server": {"host": "127.0.0.1", "port": 143, "tls": "none"},
            "allowed_servers": ["mail2.example.com"],
            **(imap4s or {}),
        },
        "smtps": {
            "default_server": {"host": "127.0.0.1", "port": 587, "tls": "none"},
            "allowed_servers": ["mail2.example.com"],
            **(smtps or {}),
        },
        "aaa_server_group": [{"name": "LOCAL", "protocol": "local", "users_file": "users.toml"}],
        "group_policy": policies
        or [
            {"name": "DfltGrpPolicy", "simultaneous_logins": 3},
            {"name": "Solo", "simultaneous_logins": 1},
            {"name": "Blocked", "simultaneous_logins": 0},
        ],
    }
    if inspection is not None:
        data["inspection"] = inspection
    if sso_policy is not None:
        data["sso"] = {"pop3": {"enabled": True, "servers": ["127.0.0.1:110"], "policy": sso_policy}}
    return parse_config(data, Path("/nonexistent"), check_files=False)


class POP3Harness:
    """A proxy environment (POP3 unless told otherwise) with a static checker and a
    scripted upstream."""

    def __init__(
        self,
        config: Config,
        *,
        unreachable: bool = False,
        protocol: str = "pop3s",
        session_class: type[ProxySession] = POP3Session,
    ) -> None:
        self.session_class = session_class
        proxy = config.proxy(protocol)
        self.clock = Clock()
        self.config = config
        self.registry = SessionRegistry(self.clock)
        realm = GatewayRealm(config.group_policy)
        portals = {"LOCAL": Portal(realm, [StaticChecker(USERS)])}
        self.connector = ScriptedConnector(unreachable=unreachable)
        self.env = ProxyEnvironment(
            proxy=proxy,
            clock=self.clock,
            registry=self.registry,
            gatekeeper=Gatekeeper(proxy, portals, self.registry, config.group_policy),
            connector=self.connector,  # type: ignore[arg-type]
            server_tls=object(),
            failure_delay=1.0,
        )

    def connect(
        self, *, implicit_tls: bool = True, port: int = 40000, address: str = "192.0.2.7"
    ) -> tuple[Any, TLSStringTransport]:
        session = self.session_class(self.env, implicit_tls=implicit_tls)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", address, port))
        session.makeConnection(transport)
        if implicit_tls:
            # What TLSMemoryBIOProtocol tells the session once the handshake is done.
            session.handshakeCompleted()
        return session, transport


def answers(transport: TLSStringTransport) -> list[bytes]:
    value: bytes = transport.value()
    transport.clear()
    return value.split(b"\r\n")[:-1]


def login_upstream(harness: POP3Harness, answer: bytes = b"+OK Logged in.") -> Any:
    """Play the mail server's side of a successful USER/PASS login."""
    upstream = harness.connector.upstreams[-1]
    upstream.dataReceived(b"+OK Dovecot ready.\r\n")
    upstream.dataReceived(b"+OK\r\n")
    upstream.dataReceived(answer + b"\r\n")
    return upstream


class PreLoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = POP3Harness(make_config())

    def test_greeting(self) -> None:
        """A new connection gets a +OK greeting naming the gateway (gateway.node_name)
        and is unauthenticated."""
        session, transport = self.harness.connect()
        self.assertEqual(answers(transport), [b"+OK mailgw POP3 gateway ready."])
        assert session.info is not None
        self.assertIs(session.info.state, SessionState.UNAUTHENTICATED)
        self.harness.env.node_name = "gw7.example.net"
        _, transport = self.harness.connect(implicit_tls=False)
        self.assertEqual(answers(transport), [b"+OK gw7.example.net POP3 gateway ready."])

    def test_capaOnImplicitTLS(self) -> None:
        """CAPA over TLS lists USER and SASL PLAIN LOGIN but not STLS."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"CAPA\r\n")
        lines = answers(transport)
        self.assertEqual(lines[0][:3], b"+OK")
        self.assertIn(b"USER", lines)
        self.assertIn(b"SASL PLAIN LOGIN", lines)
        self.assertNotIn(b"STLS", lines)
        self.assertEqual(lines[-1], b".")

    def test_capaPipelining(self) -> None:
        """CAPA before login offers PIPELINING (RFC 2449), on both ports."""
        for implicit_tls in (True, False):
            session, transport = self.harness.connect(implicit_tls=implicit_tls)
            answers(transport)
            session.dataReceived(b"CAPA\r\n")
            self.assertIn(b"PIPELINING", answers(transport), implicit_tls)

    def test_pipelinedLoginThenRelay(self) -> None:
        """What PIPELINING promises before login: CAPA, USER, PASS and two commands
        for after the login in one write are answered in order, the last two by the
        mail server once the login is through."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"CAPA\r\nNOOP\r\nUSER alice\r\nPASS alice-pw\r\nSTAT\r\nLIST 1\r\n")
        lines = answers(transport)
        self.assertEqual(lines[0], b"+OK Capability list follows")
        self.assertEqual(lines[-3:], [b".", b"-ERR Not logged in.", b"+OK Send the password."])
        upstream = login_upstream(self.harness)
        wire = upstream.transport
        assert isinstance(wire, TLSStringTransport)
        self.assertEqual(answers(transport), [b"+OK Logged in."])
        self.assertTrue(wire.value().endswith(b"PASS alice-pw\r\nSTAT\r\nLIST 1\r\n"), wire.value())

    def test_pipelinedAfterFailedLogin(self) -> None:
        """Commands pipelined behind a failing PASS wait for its answer (after the
        failure delay) and are then answered in order: a second, good login goes
        through."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS alice-pw\r\nSTAT\r\n")
        self.assertEqual(answers(transport), [b"+OK Send the password."])
        self.assertEqual(self.harness.connector.targets, [])
        self.harness.clock.advance(1)
        self.assertEqual(answers(transport), [b"-ERR [AUTH] Authentication failed.", b"+OK Send the password."])
        upstream = login_upstream(self.harness)
        self.assertEqual(answers(transport), [b"+OK Logged in."])
        wire = upstream.transport
        assert isinstance(wire, TLSStringTransport)
        self.assertTrue(wire.value().endswith(b"PASS alice-pw\r\nSTAT\r\n"), wire.value())

    def test_pipelinedSaslContinuation(self) -> None:
        """AUTH LOGIN with its two answers sent in the same write as the command
        logs in as if each had waited for its '+'."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(
            b"AUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n" + base64.b64encode(b"alice-pw") + b"\r\n"
        )
        self.assertEqual(answers(transport), [b"+ VXNlcm5hbWU6", b"+ UGFzc3dvcmQ6"])
        login_upstream(self.harness)
        self.assertEqual(answers(transport), [b"+OK Logged in."])

    def test_capaOnPlaintextPort(self) -> None:
        """CAPA before STLS offers STLS and no login mechanisms."""
        session, transport = self.harness.connect(implicit_tls=False)
        answers(transport)
        session.dataReceived(b"CAPA\r\n")
        lines = answers(transport)
        self.assertIn(b"STLS", lines)
        self.assertNotIn(b"USER", lines)

    def test_plaintextLoginRefused(self) -> None:
        """USER and AUTH before STLS are refused unless allow_plaintext_auth."""
        session, transport = self.harness.connect(implicit_tls=False)
        answers(transport)
        session.dataReceived(b"USER alice\r\nAUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\n")
        lines = answers(transport)
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(line.startswith(b"-ERR [AUTH] Plaintext") for line in lines))
        self.assertEqual(self.harness.connector.targets, [])

    def test_plaintextLoginAllowed(self) -> None:
        """With allow_plaintext_auth, USER/PASS work on the plaintext port."""
        harness = POP3Harness(make_config({"allow_plaintext_auth": True}))
        session, transport = harness.connect(implicit_tls=False)
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        login_upstream(harness)
        self.assertEqual(answers(transport)[-1], b"+OK Logged in.")

    def test_stlsDiscardsPipelinedCommands(self) -> None:
        """Commands pipelined after STLS in the same packet are not executed."""
        session, transport = self.harness.connect(implicit_tls=False)
        answers(transport)
        session.dataReceived(b"STLS\r\nUSER alice\r\nPASS alice-pw\r\n")
        self.assertEqual(answers(transport), [b"+OK Begin TLS negotiation now."])
        self.assertIs(transport.tls_options, self.harness.env.server_tls)
        self.assertTrue(session.tls_active)
        assert session.info is not None
        self.assertIs(session.info.state, SessionState.UNAUTHENTICATED)
        self.assertEqual(self.harness.connector.targets, [])
        # After the handshake the client starts over.
        session.dataReceived(b"CAPA\r\n")
        self.assertNotIn(b"STLS", answers(transport))

    def test_stlsTwice(self) -> None:
        """STLS over TLS is an error."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"STLS\r\n")
        self.assertEqual(answers(transport), [b"-ERR TLS is already active."])

    def test_stlsDisabled(self) -> None:
        """With tls_support disabled, STLS is neither offered nor accepted."""
        harness = POP3Harness(make_config({"tls_support": "disabled", "allow_plaintext_auth": True}))
        session, transport = harness.connect(implicit_tls=False)
        answers(transport)
        session.dataReceived(b"CAPA\r\nSTLS\r\n")
        lines = answers(transport)
        self.assertNotIn(b"STLS", lines)
        self.assertEqual(lines[-1], b"-ERR STLS is not available.")

    def test_commandsSplitAndPipelined(self) -> None:
        """A command split across reads and several commands in one read both work."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"CA")
        session.dataReceived(b"PA\r\nNOOP\r")
        session.dataReceived(b"\nQUIT\r\n")
        lines = answers(transport)
        self.assertEqual(lines[0], b"+OK Capability list follows")
        self.assertIn(b"-ERR Not logged in.", lines)
        self.assertEqual(lines[-1], b"+OK Logging out.")
        self.assertTrue(transport.disconnecting)

    def test_tooManyErrors(self) -> None:
        """After 10 errors the connection closes."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"BOGUS\r\n" * (MAX_ERRORS - 1))
        self.assertFalse(transport.disconnecting)
        session.dataReceived(b"BOGUS\r\n" + b"BOGUS\r\n" * 5)
        lines = answers(transport)
        self.assertEqual(len(lines), MAX_ERRORS + 1)
        self.assertEqual(lines[-1], b"-ERR Too many errors, closing connection.")
        self.assertTrue(transport.disconnecting)

    def test_lineTooLong(self) -> None:
        """An over-long line is a protocol error; the session goes on."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER " + b"a" * 5000 + b"\r\nCAPA\r\n")
        lines = answers(transport)
        self.assertEqual(lines[0], b"-ERR Line too long.")
        self.assertEqual(lines[1], b"+OK Capability list follows")

    def test_badBase64(self) -> None:
        """AUTH PLAIN with bad base64 gets -ERR, and nothing reaches the upstream."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"AUTH PLAIN !!!notbase64\r\n")
        self.assertEqual(answers(transport), [b"-ERR Invalid SASL PLAIN response."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_apopRefused(self) -> None:
        """APOP is not offered."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"APOP alice 0123456789abcdef\r\n")
        self.assertTrue(answers(transport)[0].startswith(b"-ERR APOP"))

    def test_loginTimeout(self) -> None:
        """login_timeout closes a session that does not log in."""
        _session, transport = self.harness.connect()
        answers(transport)
        self.harness.clock.advance(self.harness.config.pop3s.login_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.harness.clock.advance(1)
        self.assertEqual(answers(transport), [b"-ERR [SYS/TEMP] Login timeout, closing connection."])
        self.assertTrue(transport.disconnecting)

    def test_quit(self) -> None:
        """QUIT before login closes politely."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"QUIT\r\n")
        self.assertEqual(answers(transport), [b"+OK Logging out."])
        self.assertTrue(transport.disconnecting)


class LoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = POP3Harness(make_config())
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def test_userPassRelays(self) -> None:
        """USER/PASS: the gateway logs in upstream with the same credentials, passes
        the server's answer on, and relays from then on (including a command
        pipelined right after PASS)."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\nSTAT\r\n")
        self.assertEqual(answers(transport), [b"+OK Send the password."])
        upstream = self.harness.connector.upstreams[-1]
        upstream.dataReceived(b"+OK Dovecot ready.\r\n")
        upstream_wire = upstream.transport
        assert isinstance(upstream_wire, TLSStringTransport)
        self.assertEqual(upstream_wire.value(), b"USER alice\r\n")
        upstream.dataReceived(b"+OK\r\n")
        self.assertEqual(upstream_wire.value(), b"USER alice\r\nPASS alice-pw\r\n")
        upstream_wire.clear()
        upstream.dataReceived(b"+OK Logged in.\r\n")
        self.assertEqual(answers(transport), [b"+OK Logged in."])
        self.assertEqual(upstream_wire.value(), b"STAT\r\n")
        upstream.dataReceived(b"+OK 2 320\r\n")
        self.assertEqual(answers(transport), [b"+OK 2 320"])
        assert session.info is not None
        self.assertIs(session.info.state, SessionState.AUTHENTICATED)
        self.assertEqual(session.info.user, "alice")
        self.assertEqual(session.info.upstream, "127.0.0.1:110")
        self.assertEqual(session.info.bytes_from_client, len(b"STAT\r\n"))
        self.assertEqual(session.info.bytes_to_client, len(b"+OK 2 320\r\n"))

    def test_authPlainInitialResponse(self) -> None:
        """AUTH PLAIN with an initial response logs in."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00alice-pw") + b"\r\n")
        login_upstream(self.harness)
        self.assertEqual(answers(transport), [b"+OK Logged in."])

    def test_authPlainContinuation(self) -> None:
        """AUTH PLAIN without an initial response asks for it with '+ '."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"AUTH PLAIN\r\n")
        self.assertEqual(answers(transport), [b"+ "])
        session.dataReceived(base64.b64encode(b"\x00alice\x00alice-pw") + b"\r\n")
        login_upstream(self.harness)
        self.assertEqual(answers(transport), [b"+OK Logged in."])

    def test_vpnSyntaxAndAllowedServer(self) -> None:
        """vpnuser:mailuser@server with split passwords: the VPN part is checked by
        AAA, the mail part goes upstream to the named (allowed) server."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice:a.smith@mail2.example.com\r\nPASS alice-pw:mail secret\r\n")
        self.assertEqual(self.harness.connector.targets[-1].host, "mail2.example.com")
        self.assertEqual(self.harness.connector.targets[-1].port, 110)
        upstream = self.harness.connector.upstreams[-1]
        upstream.dataReceived(b"+OK ready\r\n+OK\r\n")
        assert isinstance(upstream.transport, TLSStringTransport)
        self.assertEqual(upstream.transport.value(), b"USER a.smith\r\nPASS mail secret\r\n")

    def test_serverNotAllowed(self) -> None:
        """A server not in allowed_servers: -ERR after the delay, no connection."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice@evil.example.net\r\nPASS alice-pw\r\n")
        self.assertEqual(answers(transport), [b"+OK Send the password."])
        self.harness.clock.advance(1)
        self.assertEqual(answers(transport), [b"-ERR [AUTH] Authentication failed."])
        self.assertEqual(self.harness.connector.targets, [])
        self.assertIn("is not in allowed_servers", self.reasons())

    def reasons(self) -> str:
        return " ".join(str(e.get("reason", "")) for e in self.events)

    def test_wrongVpnPassword(self) -> None:
        """A wrong VPN password: -ERR only after the failure delay, reason logged,
        commands sent meanwhile wait."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice:alice\r\nPASS wrong:alice-pw\r\nCAPA\r\n")
        self.assertEqual(answers(transport), [b"+OK Send the password."])
        self.harness.clock.advance(0.9)
        self.assertEqual(answers(transport), [])
        self.harness.clock.advance(0.1)
        lines = answers(transport)
        self.assertEqual(lines[0], b"-ERR [AUTH] Authentication failed.")
        self.assertEqual(lines[1], b"+OK Capability list follows")
        self.assertIn("bad credentials", self.reasons())
        self.assertEqual(self.harness.connector.targets, [])

    def test_wrongMailPassword(self) -> None:
        """The mail server rejecting the mail password gives -ERR and a logged reason."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice:alice\r\nPASS alice-pw:wrong\r\n")
        upstream = self.harness.connector.upstreams[-1]
        upstream.dataReceived(b"+OK ready\r\n+OK\r\n-ERR [AUTH] Authentication failed.\r\n")
        self.harness.clock.advance(1)
        self.assertEqual(answers(transport)[-1], b"-ERR [AUTH] Authentication failed.")
        self.assertIn("mail server rejected the login", self.reasons())
        assert session.info is not None
        self.assertIs(session.info.state, SessionState.UNAUTHENTICATED)
        self.assertIsNone(session.info.user)

    def test_upstreamDown(self) -> None:
        """An unreachable mail server gives -ERR [SYS/TEMP] at once."""
        harness = POP3Harness(make_config(), unreachable=True)
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        self.assertEqual(
            answers(transport),
            [b"+OK Send the password.", b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later."],
        )

    def test_passwordNeverLogged(self) -> None:
        """No log event of a full login (good and bad) carries a password."""
        session, _transport = self.harness.connect()
        session.dataReceived(b"USER alice:alice\r\nPASS alice-pw:mailpw-secret\r\n")
        login_upstream(self.harness)
        other, _ = self.harness.connect()
        other.dataReceived(b"USER alice\r\nPASS wrong-secret\r\n")
        self.harness.clock.advance(2)
        session.connectionLost()
        text = repr(list(self.events))
        for secret in ("alice-pw", "mailpw-secret", "wrong-secret"):
            self.assertNotIn(secret, text)
        self.assertTrue(self.events)

    def test_simultaneousLoginsOne(self) -> None:
        """With simultaneous_logins = 1 a second login (from another address) logs
        off the first session, which gets the protocol's goodbye."""
        first, first_transport = self.harness.connect()
        first.dataReceived(b"USER bob\r\nPASS bob-pw\r\n")
        login_upstream(self.harness)
        first_transport.clear()
        second, second_transport = self.harness.connect(address="192.0.2.8")
        second.dataReceived(b"USER bob\r\nPASS bob-pw\r\n")
        self.assertTrue(first_transport.disconnecting)
        self.assertEqual(first_transport.value(), b"-ERR [SYS/TEMP] Connection closed by the gateway.\r\n")
        first_upstream = self.harness.connector.upstreams[0].transport
        assert isinstance(first_upstream, TLSStringTransport)
        self.assertTrue(first_upstream.disconnecting)
        login_upstream(self.harness)
        self.assertEqual(answers(second_transport)[-1], b"+OK Logged in.")
        assert first.info is not None and second.info is not None
        logged = [e for e in self.events if e.get("victim_session_id") == first.info.session_id]
        self.assertEqual(logged[0]["session_id"], second.info.session_id)

    def test_simultaneousLoginsZero(self) -> None:
        """simultaneous_logins = 0 refuses the login."""
        session, transport = self.harness.connect()
        answers(transport)
        session.dataReceived(b"USER nobody\r\nPASS nobody-pw\r\n")
        self.harness.clock.advance(1)
        self.assertEqual(answers(transport)[-1], b"-ERR [AUTH] Authentication failed.")
        self.assertEqual(self.harness.connector.targets, [])
        self.assertIn("simultaneous_logins is 0", self.reasons())

    def test_noGroupPolicy(self) -> None:
        """No default group policy and no attribute: refused [5.2]."""
        harness = POP3Harness(make_config({"default_group_policy": ""}))
        session, transport = harness.connect()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        harness.clock.advance(1)
        self.assertEqual(answers(transport)[-1], b"-ERR [AUTH] Authentication failed.")
        self.assertIn("no default group policy", self.reasons())

    def test_clientGoneDuringLogin(self) -> None:
        """A client that disconnects mid-login cancels the upstream login."""
        session, _transport = self.harness.connect()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        upstream = self.harness.connector.upstreams[-1]
        session.connectionLost()
        assert isinstance(upstream.transport, TLSStringTransport)
        self.assertTrue(upstream.transport.disconnecting)
        self.assertEqual(len(self.harness.registry), 0)

    def test_idleTimeout(self) -> None:
        """After login, idle_timeout closes a session without traffic, and traffic
        postpones it."""
        harness = POP3Harness(make_config({"idle_timeout": 100}))
        session, transport = harness.connect()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        upstream = login_upstream(harness)
        harness.clock.advance(60)
        session.dataReceived(b"NOOP\r\n")
        harness.clock.advance(60)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(40)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(upstream.transport.disconnecting)

    def test_maxSessionTime(self) -> None:
        """A group policy's max_session_time ends the session."""
        harness = POP3Harness(
            make_config(policies=[{"name": "DfltGrpPolicy", "simultaneous_logins": 3, "max_session_time": 50}])
        )
        session, transport = harness.connect()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        login_upstream(harness)
        harness.clock.advance(49)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_upstreamClosesClient(self) -> None:
        """When the server closes, the client is closed too."""
        session, transport = self.harness.connect()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        upstream = login_upstream(self.harness)
        upstream.connectionLost()
        self.assertTrue(transport.disconnecting)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class SaslTests(SynchronousTestCase):
    """AUTH PLAIN and AUTH LOGIN exchanges: continuations, cancelling, bad input."""

    def setUp(self) -> None:
        self.harness = POP3Harness(make_config())
        self.session, self.transport = self.harness.connect()
        answers(self.transport)

    def send(self, data: bytes) -> list[bytes]:
        self.session.dataReceived(data)
        return answers(self.transport)

    def test_authListing(self) -> None:
        """AUTH without arguments lists PLAIN and LOGIN."""
        self.assertEqual(self.send(b"AUTH\r\n"), [b"+OK Supported mechanisms follow.", b"PLAIN", b"LOGIN", b"."])

    def test_authLoginContinuations(self) -> None:
        """AUTH LOGIN asks for the user name and the password in base64 and logs in
        with them; the session is authenticating from the first step."""
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), [b"+ VXNlcm5hbWU6"])
        assert self.session.info is not None
        self.assertIs(self.session.info.state, SessionState.AUTHENTICATING)
        self.assertEqual(self.send(b64(b"alice") + b"\r\n"), [b"+ UGFzc3dvcmQ6"])
        self.assertEqual(self.send(b64(b"alice-pw") + b"\r\n"), [])
        upstream = login_upstream(self.harness)
        self.assertEqual(answers(self.transport), [b"+OK Logged in."])
        wire = upstream.transport
        assert isinstance(wire, TLSStringTransport)
        self.assertEqual(wire.value(), b"USER alice\r\nPASS alice-pw\r\n")

    def test_authLoginInitialResponse(self) -> None:
        """AUTH LOGIN with the user name as initial response asks for the password only."""
        self.assertEqual(self.send(b"auth login " + b64(b"alice") + b"\r\n"), [b"+ UGFzc3dvcmQ6"])
        self.send(b64(b"alice-pw") + b"\r\n")
        login_upstream(self.harness)
        self.assertEqual(answers(self.transport), [b"+OK Logged in."])

    def test_authLoginWrongPassword(self) -> None:
        """A wrong AUTH LOGIN password gets the ordinary failure after the delay."""
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.send(b64(b"wrong") + b"\r\n"), [])
        self.harness.clock.advance(1)
        self.assertEqual(answers(self.transport), [b"-ERR [AUTH] Authentication failed."])

    def test_authLoginCancelled(self) -> None:
        """'*' cancels AUTH LOGIN at either step; the next line is a command again."""
        self.send(b"AUTH LOGIN\r\n")
        self.assertEqual(self.send(b"*\r\nNOOP\r\n"), [b"-ERR Authentication cancelled.", b"-ERR Not logged in."])
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.send(b"*\r\n" + b64(b"alice-pw") + b"\r\n")[0], b"-ERR Authentication cancelled.")
        self.assertEqual(self.send(b"AUTH LOGIN *\r\n"), [b"-ERR Authentication cancelled."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_authLoginBadBase64(self) -> None:
        """Bad base64 or an empty user name at any AUTH LOGIN step gets a clear -ERR at
        once, ends the exchange, and nothing reaches the upstream."""
        self.assertEqual(self.send(b"AUTH LOGIN !!!\r\n"), [b"-ERR Invalid base64 in the SASL LOGIN user name."])
        self.send(b"AUTH LOGIN\r\n")
        self.assertEqual(
            self.send(b"YWxpY2U\r\nNOOP\r\n"),
            [b"-ERR Invalid base64 in the SASL LOGIN user name.", b"-ERR Not logged in."],
        )
        self.send(b"AUTH LOGIN\r\n")
        self.assertEqual(self.send(b"=\r\n"), [b"-ERR Invalid SASL LOGIN user name."])
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(
            self.send(b"cGFzcw=\r\nNOOP\r\n"),
            [b"-ERR Invalid base64 in the SASL LOGIN password.", b"-ERR Not logged in."],
        )
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.send(b64(b"\xff\xfe") + b"\r\n"), [b"-ERR Invalid SASL LOGIN password."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_authPlainCancelled(self) -> None:
        """'*' cancels AUTH PLAIN; the next line is a command again."""
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.send(b"*\r\nNOOP\r\n"), [b"-ERR Authentication cancelled.", b"-ERR Not logged in."])

    def test_unsupportedMechanism(self) -> None:
        """Other mechanisms are refused."""
        self.assertEqual(self.send(b"AUTH CRAM-MD5\r\n"), [b"-ERR Unsupported authentication mechanism."])

    def test_lineTooLongEndsPlainContinuation(self) -> None:
        """An over-long line in answer to AUTH PLAIN's '+ ' ends the exchange: the
        client gets -ERR, and the next CAPA is a command, not a SASL response."""
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), [b"+ "])
        lines = self.send(b"A" * 5000 + b"\r\nCAPA\r\n")
        self.assertEqual(lines[:2], [b"-ERR Line too long, authentication cancelled.", b"+OK Capability list follows"])
        self.assertEqual(lines[-1], b".")
        # A PLAIN response sent now is not taken as one.
        self.assertEqual(self.send(b64(b"\x00alice\x00alice-pw") + b"\r\n"), [b"-ERR Invalid command."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_lineTooLongEndsLoginContinuation(self) -> None:
        """An over-long line at either AUTH LOGIN step ends the exchange; the user name
        given before it is forgotten."""
        self.send(b"AUTH LOGIN\r\n")
        lines = self.send(b"A" * 5000 + b"\r\nCAPA\r\n")
        self.assertEqual(lines[:2], [b"-ERR Line too long, authentication cancelled.", b"+OK Capability list follows"])
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        lines = self.send(b"A" * 5000 + b"\r\nCAPA\r\n")
        self.assertEqual(lines[:2], [b"-ERR Line too long, authentication cancelled.", b"+OK Capability list follows"])
        self.assertEqual(self.send(b64(b"alice-pw") + b"\r\n"), [b"-ERR Invalid command."])
        self.assertEqual(self.harness.connector.targets, [])
        self.assertEqual(self.session._login_user, "")

    def test_lineTooLongOutsideSasl(self) -> None:
        """Outside a SASL exchange the over-long line answer is unchanged."""
        self.assertEqual(self.send(b"A" * 5000 + b"\r\nNOOP\r\n"), [b"-ERR Line too long.", b"-ERR Not logged in."])


class SessionLimitTests(SynchronousTestCase):
    def test_floodEvictsInOrder(self) -> None:
        """unauthenticated_session_limit = 2: a flood of connections never closes the
        authenticated session; the oldest unauthenticated one goes first, then the
        oldest authenticating one."""
        harness = POP3Harness(make_config({"unauthenticated_session_limit": 2}))
        logged_in, logged_in_transport = harness.connect()
        logged_in.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        login_upstream(harness)
        harness.clock.advance(1)
        authenticating, authenticating_transport = harness.connect()
        authenticating.dataReceived(b"USER bob\r\n")
        harness.clock.advance(1)
        _unauth, unauth_transport = harness.connect()
        harness.clock.advance(1)
        newcomer, newcomer_transport = harness.connect()
        self.assertTrue(unauth_transport.disconnecting)
        self.assertFalse(authenticating_transport.disconnecting)
        newcomer.dataReceived(b"USER carol\r\n")
        harness.clock.advance(1)
        harness.connect()
        self.assertTrue(authenticating_transport.disconnecting)
        self.assertFalse(newcomer_transport.disconnecting)
        for _ in range(20):
            harness.connect()
        self.assertFalse(logged_in_transport.disconnecting)


class RelayStageTests(SynchronousTestCase):
    def _relaying(self, policy_inspection: str) -> tuple[Any, Any, Any, list[tuple[str, str]], list[bytes]]:
        config = make_config(
            policies=[{"name": "DfltGrpPolicy", "simultaneous_logins": 3, "inspection": policy_inspection}]
            if policy_inspection
            else None,
            inspection=[{"name": "strict", "clamd": ""}],
        )
        harness = POP3Harness(config)
        asked: list[tuple[str, str]] = []
        seen: list[bytes] = []

        class Upper(PassThrough):
            def from_server(self, data: bytes) -> None:
                seen.append(data)
                super().from_server(data.upper())

        class Factory:
            def stage_for(self, protocol: str, profile: str, info: Any) -> Upper:
                asked.append((protocol, profile))
                return Upper()

        harness.env.inspection = Factory()
        session, transport = harness.connect()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        upstream = harness.connector.upstreams[-1]
        upstream.dataReceived(b"+OK ready\r\n+OK\r\n")
        upstream.dataReceived(b"+OK Logged in.\r\n")
        answers(transport)
        return session, transport, upstream, asked, seen

    def test_stageFromPolicy(self) -> None:
        """The session gets its stage from the environment's factory, for the profile
        its group policy names, when the relay starts [4.9]; the stage sees the
        server's bytes and writes what passes."""
        _session, transport, upstream, asked, seen = self._relaying("strict")
        self.assertEqual(asked, [("pop3", "strict")])
        upstream.dataReceived(b"+ok 1 10\r\n")
        self.assertEqual(answers(transport), [b"+OK 1 10"])
        self.assertEqual(seen, [b"+ok 1 10\r\n"])

    def test_noProfileNoStage(self) -> None:
        """A policy naming no profile keeps the direct relay: the factory is not asked."""
        _session, transport, upstream, asked, _seen = self._relaying("")
        self.assertEqual(asked, [])
        upstream.dataReceived(b"+ok 1 10\r\n")
        self.assertEqual(answers(transport), [b"+ok 1 10"])


class RecordingAccounting:
    """Stands in for RadiusAccounting: records Start/Stop calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def start(self, session: Any) -> None:
        self.calls.append(("start", session, None))

    def stop(self, session: Any, cause: Any = None) -> None:
        self.calls.append(("stop", session, cause))


class AccountingTests(SynchronousTestCase):
    def login(self, **pop3s: Any) -> tuple[POP3Harness, Any, TLSStringTransport, RecordingAccounting]:
        harness = POP3Harness(make_config(pop3s))
        accounting = RecordingAccounting()
        harness.env.accounting = accounting  # type: ignore[assignment]
        session, transport = harness.connect()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        login_upstream(harness)
        return harness, session, transport, accounting

    def test_stopWhenClientVanishes(self) -> None:
        """Start at login; the Stop is sent when the client vanishes without QUIT,
        with the same session id and the byte counts."""
        _harness, session, _transport, accounting = self.login()
        session.dataReceived(b"STAT\r\n")
        session.connectionLost()
        (kind1, start, _), (kind2, stop, cause) = accounting.calls
        self.assertEqual((kind1, kind2), ("start", "stop"))
        self.assertEqual(start.session_id, stop.session_id)
        self.assertEqual(stop.user, "alice")
        self.assertEqual(stop.bytes_in, len(b"STAT\r\n"))
        self.assertEqual(cause, "User-Request")

    def test_idleTimeoutCause(self) -> None:
        """A session closed by idle_timeout reports Idle-Timeout."""
        harness, session, _transport, accounting = self.login(idle_timeout=10)
        harness.clock.advance(10)
        session.connectionLost()
        self.assertEqual(accounting.calls[-1][2], "Idle-Timeout")

    def test_noAccountingBeforeLogin(self) -> None:
        """A session that never logged in sends no accounting."""
        harness = POP3Harness(make_config())
        accounting = RecordingAccounting()
        harness.env.accounting = accounting  # type: ignore[assignment]
        session, _ = harness.connect()
        session.connectionLost()
        self.assertEqual(accounting.calls, [])
