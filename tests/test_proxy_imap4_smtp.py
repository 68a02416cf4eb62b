"""The IMAP and SMTP proxies' dialogues over StringTransport with a Clock (the same
behaviours run against real Dovecot in test_integration_imap4/_smtp)."""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailgw.proxy.imap4 import IMAP4Session
from mailgw.proxy.registry import SessionState
from mailgw.proxy.smtp import SMTPSession
from mailgw.testing import TLSStringTransport
from tests.test_proxy_pop3 import POP3Harness, answers, make_config


def imap_harness(**options: Any) -> POP3Harness:
    return POP3Harness(make_config(imap4s=options), protocol="imap4s", session_class=IMAP4Session)


def smtp_harness(**options: Any) -> POP3Harness:
    return POP3Harness(make_config(smtps=options), protocol="smtps", session_class=SMTPSession)


def upstream_wire(harness: POP3Harness) -> TLSStringTransport:
    transport = harness.connector.upstreams[-1].transport
    assert isinstance(transport, TLSStringTransport)
    return transport


class IMAP4DialogueTests(SynchronousTestCase):
    def test_greetingCapabilities(self) -> None:
        """The greeting carries the capabilities: LOGINDISABLED and STARTTLS on the
        plaintext port, AUTH=PLAIN and SASL-IR over TLS."""
        harness = imap_harness()
        _, plain = harness.connect(implicit_tls=False)
        greeting = answers(plain)[0]
        self.assertIn(b"LOGINDISABLED", greeting)
        self.assertIn(b"STARTTLS", greeting)
        _, tls = harness.connect()
        greeting = answers(tls)[0]
        self.assertIn(b"AUTH=PLAIN", greeting)
        self.assertIn(b"SASL-IR", greeting)
        self.assertNotIn(b"STARTTLS", greeting)

    def test_greetingNamesGatewayAndMechanisms(self) -> None:
        """The greeting names the gateway (gateway.node_name) and, over TLS, offers
        AUTH=PLAIN and AUTH=LOGIN; CAPABILITY says the same; on the plaintext port
        neither, only LOGINDISABLED."""
        harness = imap_harness()
        harness.env.node_name = "gw7.example.net"
        session, tls = harness.connect()
        greeting = answers(tls)[0]
        self.assertTrue(greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 "), greeting)
        self.assertTrue(greeting.endswith(b"] gw7.example.net IMAP gateway ready."), greeting)
        self.assertIn(b" AUTH=PLAIN AUTH=LOGIN", greeting)
        session.dataReceived(b"c CAPABILITY\r\n")
        self.assertIn(b" AUTH=PLAIN AUTH=LOGIN", answers(tls)[0])
        _, plain = harness.connect(implicit_tls=False)
        greeting = answers(plain)[0]
        self.assertNotIn(b"AUTH=", greeting)
        self.assertIn(b"LOGINDISABLED", greeting)

    def test_starttlsDiscardsPipelined(self) -> None:
        """Commands pipelined after STARTTLS in the same packet are not executed."""
        harness = imap_harness()
        session, transport = harness.connect(implicit_tls=False)
        answers(transport)
        session.dataReceived(b"a STARTTLS\r\nb LOGIN alice alice-pw\r\n")
        self.assertEqual(answers(transport), [b"a OK Begin TLS negotiation now."])
        self.assertIsNotNone(transport.tls_options)
        self.assertEqual(harness.connector.targets, [])
        session.dataReceived(b"c CAPABILITY\r\n")
        lines = answers(transport)
        self.assertNotIn(b"STARTTLS", lines[0])
        self.assertIn(b"AUTH=PLAIN", lines[0])

    def test_literalLoginRelaysWithUpstreamCapabilities(self) -> None:
        """LOGIN with a synchronizing literal password: '+' then the login upstream;
        the client's tagged OK carries the server's capabilities; a command
        pipelined after the login is relayed."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"a LOGIN alice {8}\r\n")
        self.assertEqual(answers(transport), [b"+ Ready for literal data"])
        session.dataReceived(b"alice-pw\r\nb SELECT INBOX\r\n")
        upstream = harness.connector.upstreams[-1]
        upstream.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n")
        wire = upstream_wire(harness)
        self.assertEqual(wire.value(), b'mgw1 LOGIN "alice" "alice-pw"\r\n')
        wire.clear()
        upstream.dataReceived(b"mgw1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
        self.assertEqual(answers(transport), [b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"])
        self.assertEqual(wire.value(), b"b SELECT INBOX\r\n")

    def test_capabilitiesFetchedWhenOkHasNone(self) -> None:
        """When the server's OK carries no capabilities, the gateway asks for them
        and puts them in the client's OK; untagged data of the login is not passed on."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"a LOGIN alice alice-pw\r\n")
        upstream = harness.connector.upstreams[-1]
        upstream.dataReceived(b"* OK ready\r\n")
        self.assertEqual(upstream_wire(harness).value(), b"mgw1 CAPABILITY\r\n")
        upstream.dataReceived(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nmgw1 OK done\r\n")
        upstream.dataReceived(b"mgw2 OK Logged in\r\n")
        upstream.dataReceived(b"* CAPABILITY IMAP4rev1 IDLE\r\nmgw3 OK done\r\n")
        self.assertEqual(answers(transport), [b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in"])

    def test_authenticateContinuationAndFailure(self) -> None:
        """AUTHENTICATE PLAIN without SASL-IR asks with '+'; a wrong password gets
        NO [AUTHENTICATIONFAILED] after the delay."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"x AUTHENTICATE PLAIN\r\n")
        self.assertEqual(answers(transport), [b"+ "])
        session.dataReceived(base64.b64encode(b"\x00alice\x00wrong") + b"\r\n")
        self.assertEqual(answers(transport), [])
        harness.clock.advance(1)
        self.assertEqual(answers(transport), [b"x NO [AUTHENTICATIONFAILED] Authentication failed."])

    def test_hugeLiteralRefused(self) -> None:
        """A literal announcing 2 GB before login is refused at once with
        BAD [TOOBIG], nothing allocated; the next command works."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"a LOGIN {2147483648}\r\n")
        self.assertEqual(answers(transport), [b"a BAD [TOOBIG] Literal too big."])
        self.assertLess(session.reader.buffered, 100)
        session.dataReceived(b"b NOOP\r\n")
        self.assertEqual(answers(transport), [b"b OK NOOP completed."])

    def test_literalOverLimitTooBig(self) -> None:
        """A literal one octet over the pre-login limit gets BAD [TOOBIG] and no '+'
        (tagged, or untagged without a valid tag); a smaller one is asked for."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        limit = harness.env.proxy.max_login_literal
        session.dataReceived(b"a LOGIN alice {%d}\r\n" % (limit + 1))
        self.assertEqual(answers(transport), [b"a BAD [TOOBIG] Literal too big."])
        session.dataReceived(b"* LOGIN alice {99999999999}\r\n")
        self.assertEqual(answers(transport), [b"* BAD [TOOBIG] Literal too big."])
        self.assertLess(session.reader.buffered, 100)
        session.dataReceived(b"b LOGIN alice {%d}\r\n" % (limit // 2))
        self.assertEqual(answers(transport), [b"+ Ready for literal data"])

    def test_invalidLiteralSyntax(self) -> None:
        """Invalid literal syntax is refused with a tagged BAD (untagged without a
        valid tag), never a '+', nothing allocated; the next command works."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        for marker in [b"{abc}", b"{-1}", b"{ 5}", b"{5x}", b"{}"]:
            session.dataReceived(b"a LOGIN alice " + marker + b"\r\nb NOOP\r\n")
            self.assertEqual(
                answers(transport),
                [b"a BAD Invalid command: invalid literal size.", b"b OK NOOP completed."],
                marker,
            )
            self.assertEqual(session.reader.buffered, 0)
        session.dataReceived(b"(x LOGIN alice {abc}\r\nb NOOP\r\n")
        self.assertEqual(answers(transport), [b"* BAD Invalid command: invalid literal size.", b"b OK NOOP completed."])
        self.assertFalse(transport.disconnecting)

    def test_invalidNonSynchronizingLiteralCloses(self) -> None:
        """A {…+} with an invalid size cannot be skipped: BAD, BYE, and the connection closes."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"a LOGIN alice {abc+}\r\nb NOOP\r\n")
        self.assertEqual(
            answers(transport), [b"a BAD Invalid command: invalid literal size.", b"* BYE Invalid literal."]
        )
        self.assertTrue(transport.disconnecting)
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"a LOGIN alice {99999999999+}\r\nb NOOP\r\n")
        self.assertEqual(answers(transport), [b"a BAD [TOOBIG] Literal too big.", b"* BYE Invalid literal."])
        self.assertTrue(transport.disconnecting)

    def test_limitsFromConfiguration(self) -> None:
        """The pre-login line and literal limits are the proxy's C{max_login_line}
        and C{max_login_literal} (default 4096 each)."""
        self.assertEqual((make_config().imap4s.max_login_line, make_config().imap4s.max_login_literal), (4096, 4096))
        harness = POP3Harness(
            make_config(imap4s={"max_login_line": 512, "max_login_literal": 16}),
            protocol="imap4s",
            session_class=IMAP4Session,
        )
        session, transport = harness.connect()
        answers(transport)
        self.assertEqual((session.reader.max_line, session.reader.max_literal), (512, 16))
        session.dataReceived(b"a LOGIN alice {17}\r\nb NOOP " + b"x" * 512 + b"\r\nc LOGIN alice {16}\r\n")
        self.assertEqual(
            answers(transport),
            [b"a BAD [TOOBIG] Literal too big.", b"* BAD Line too long.", b"+ Ready for literal data"],
        )

    def test_upstreamUnavailable(self) -> None:
        """An unreachable server gives NO [UNAVAILABLE] at once."""
        harness = POP3Harness(make_config(), protocol="imap4s", session_class=IMAP4Session, unreachable=True)
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"a LOGIN alice alice-pw\r\n")
        self.assertEqual(answers(transport), [b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later."])

    def test_logout(self) -> None:
        """LOGOUT before login: BYE, tagged OK, close."""
        harness = imap_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"z LOGOUT\r\n")
        self.assertEqual(answers(transport), [b"* BYE Logging out.", b"z OK LOGOUT completed."])
        self.assertTrue(transport.disconnecting)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class IMAP4AuthenticateLoginTests(SynchronousTestCase):
    """AUTHENTICATE LOGIN, with and without SASL-IR (RFC 4959: the initial response is
    the user name); the server's LOGIN is done with the decoded credentials."""

    def setUp(self) -> None:
        self.harness = imap_harness()
        self.session, self.transport = self.harness.connect()
        answers(self.transport)

    def send(self, data: bytes) -> list[bytes]:
        self.session.dataReceived(data)
        return answers(self.transport)

    def assert_logs_in(self, tag: bytes, user: bytes = b"alice", password: bytes = b"alice-pw") -> None:
        upstream = self.harness.connector.upstreams[-1]
        upstream.dataReceived(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n")
        wire = upstream_wire(self.harness)
        self.assertEqual(wire.value(), b'mgw1 LOGIN "' + user + b'" "' + password + b'"\r\n')
        upstream.dataReceived(b"mgw1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        self.assertEqual(answers(self.transport), [tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in"])
        assert self.session.info is not None
        self.assertIs(self.session.info.state, SessionState.AUTHENTICATED)

    def test_continuations(self) -> None:
        """Without an initial response: '+ VXNlcm5hbWU6' (Username:), then
        '+ UGFzc3dvcmQ6' (Password:); the session is authenticating from the first
        step; the tagged OK carries the server's capabilities."""
        self.assertEqual(self.send(b"a1 AUTHENTICATE LOGIN\r\n"), [b"+ VXNlcm5hbWU6"])
        assert self.session.info is not None
        self.assertIs(self.session.info.state, SessionState.AUTHENTICATING)
        self.assertEqual(self.send(b64(b"alice") + b"\r\n"), [b"+ UGFzc3dvcmQ6"])
        self.assertEqual(self.send(b64(b"alice-pw") + b"\r\n"), [])
        self.assert_logs_in(b"a1")

    def test_saslIr(self) -> None:
        """With SASL-IR the user name comes with the command: only the password is
        asked for; the mechanism name is case-insensitive."""
        self.assertEqual(self.send(b"a2 authenticate login " + b64(b"alice") + b"\r\n"), [b"+ UGFzc3dvcmQ6"])
        self.send(b64(b"alice-pw") + b"\r\n")
        self.assert_logs_in(b"a2")

    def test_pipelinedAnswers(self) -> None:
        """The command and both answers in one write log in as if each had waited."""
        lines = self.send(b"a3 AUTHENTICATE LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"alice-pw") + b"\r\n")
        self.assertEqual(lines, [b"+ VXNlcm5hbWU6", b"+ UGFzc3dvcmQ6"])
        self.assert_logs_in(b"a3")

    def test_vpnSyntaxInLoginItems(self) -> None:
        """The decoded items go through the login syntax like LOGIN's: the VPN part is
        split off, the mail user and password go to the server."""
        self.send(b"a4 AUTHENTICATE LOGIN " + b64(b"alice:mailbox") + b"\r\n")
        self.send(b64(b"alice-pw:mail-secret") + b"\r\n")
        self.assert_logs_in(b"a4", b"mailbox", b"mail-secret")

    def test_wrongPassword(self) -> None:
        """A wrong password gets the tagged NO [AUTHENTICATIONFAILED] after the delay."""
        self.send(b"a5 AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.send(b64(b"wrong") + b"\r\n"), [])
        self.harness.clock.advance(1)
        self.assertEqual(answers(self.transport), [b"a5 NO [AUTHENTICATIONFAILED] Authentication failed."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_cancelled(self) -> None:
        """'*' cancels at either step with a tagged BAD; the next line is a command."""
        self.send(b"a6 AUTHENTICATE LOGIN\r\n")
        self.assertEqual(self.send(b"*\r\n"), [b"a6 BAD Authentication cancelled."])
        self.send(b"a7 AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.send(b"*\r\nb NOOP\r\n"), [b"a7 BAD Authentication cancelled.", b"b OK NOOP completed."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_badItems(self) -> None:
        """Bad base64 or an empty user name (as answer or as '=' initial response) get
        a tagged BAD at once; bad base64 for the password too; nothing goes upstream."""
        self.send(b"a8 AUTHENTICATE LOGIN\r\n")
        self.assertEqual(self.send(b"!!!\r\n"), [b"a8 BAD Invalid SASL LOGIN user name."])
        self.assertEqual(self.send(b"a9 AUTHENTICATE LOGIN =\r\n"), [b"a9 BAD Invalid SASL LOGIN user name."])
        self.send(b"b1 AUTHENTICATE LOGIN\r\n")
        self.assertEqual(self.send(b"\r\n"), [b"b1 BAD Invalid SASL LOGIN user name."])
        self.send(b"b2 AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.send(b"a===\r\n"), [b"b2 BAD Invalid SASL LOGIN password."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_lineTooLongEndsExchange(self) -> None:
        """An over-long answer to the password challenge ends the exchange with BAD:
        the next line is a command, never taken as the password."""
        self.send(b"c1 AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n")
        lines = self.send(b"A" * 5000 + b"\r\nc2 NOOP\r\n")
        self.assertEqual(lines, [b"c1 BAD Line too long.", b"c2 OK NOOP completed."])
        self.assertEqual(self.harness.connector.targets, [])

    def test_unsupportedMechanism(self) -> None:
        """Other mechanisms get NO."""
        self.assertEqual(
            self.send(b"c3 AUTHENTICATE CRAM-MD5\r\n"), [b"c3 NO Unsupported authentication mechanism."]
        )


class SMTPDialogueTests(SynchronousTestCase):
    def test_ehloBeforeAndAfterTLS(self) -> None:
        """EHLO on the plaintext port offers STARTTLS and no AUTH; over TLS, AUTH."""
        harness = smtp_harness()
        session, transport = harness.connect(implicit_tls=False)
        self.assertTrue(answers(transport)[0].startswith(b"220 "))
        session.dataReceived(b"EHLO client.example\r\n")
        lines = answers(transport)
        self.assertIn(b"STARTTLS", [line[4:] for line in lines])
        self.assertFalse(any(b"AUTH" in line for line in lines))
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"EHLO client.example\r\n")
        self.assertIn(b"250 AUTH PLAIN LOGIN", answers(transport))

    def test_starttlsDiscardsPipelined(self) -> None:
        """Commands pipelined after STARTTLS are not executed; EHLO is needed again."""
        harness = smtp_harness()
        session, transport = harness.connect(implicit_tls=False)
        answers(transport)
        session.dataReceived(b"EHLO c\r\n")
        answers(transport)
        session.dataReceived(b"STARTTLS\r\nAUTH PLAIN " + base64.b64encode(b"\x00alice\x00alice-pw") + b"\r\n")
        self.assertEqual(answers(transport), [b"220 2.0.0 Ready to start TLS"])
        self.assertEqual(harness.connector.targets, [])
        session.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00alice-pw") + b"\r\n")
        self.assertEqual(answers(transport), [b"503 5.5.1 Send EHLO first"])

    def test_authLoginThenRelay(self) -> None:
        """AUTH LOGIN: the upstream session is set up with EHLO and AUTH PLAIN of the
        MAILUSER (mailhost listed), the client gets 235, and a MAIL FROM pipelined
        after the password is relayed."""
        harness = smtp_harness(authentication=["aaa", "mailhost"])
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"EHLO c\r\nAUTH LOGIN\r\n")
        self.assertEqual(answers(transport)[-1], b"334 VXNlcm5hbWU6")
        session.dataReceived(base64.b64encode(b"alice") + b"\r\n")
        self.assertEqual(answers(transport), [b"334 UGFzc3dvcmQ6"])
        session.dataReceived(base64.b64encode(b"alice-pw") + b"\r\nMAIL FROM:<a@example.com>\r\n")
        upstream = harness.connector.upstreams[-1]
        wire = upstream_wire(harness)
        upstream.dataReceived(b"220 mail ESMTP\r\n")
        self.assertEqual(wire.value(), b"EHLO mailgw\r\n")
        wire.clear()
        upstream.dataReceived(b"250-mail\r\n250-SIZE 1000\r\n250 AUTH PLAIN LOGIN\r\n")
        self.assertEqual(wire.value(), b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00alice-pw") + b"\r\n")
        wire.clear()
        upstream.dataReceived(b"235 2.7.0 OK\r\n")
        self.assertEqual(answers(transport), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(wire.value(), b"MAIL FROM:<a@example.com>\r\n")
        assert session.info is not None
        self.assertIs(session.info.state, SessionState.AUTHENTICATED)

    def test_withoutMailhostNoUpstreamAuth(self) -> None:
        """Without mailhost the gateway relays unauthenticated after its own AAA."""
        harness = smtp_harness(authentication=["aaa"])
        session, transport = harness.connect()
        session.dataReceived(b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(b"\x00alice\x00alice-pw") + b"\r\n")
        upstream = harness.connector.upstreams[-1]
        upstream.dataReceived(b"220 mail ESMTP\r\n250 mail\r\n")
        self.assertEqual(upstream_wire(harness).value(), b"EHLO mailgw\r\n")
        self.assertEqual(answers(transport)[-1], b"235 2.7.0 Authentication successful")

    def test_mailBeforeAuth(self) -> None:
        """MAIL before AUTH: 530."""
        harness = smtp_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(answers(transport)[-1], b"530 5.7.0 Authentication required")

    def test_lineTooLongEndsAuthExchange(self) -> None:
        """An over-long line in answer to an AUTH continuation (PLAIN, or either LOGIN
        step) gets 500 5.5.6 and ends the exchange: the next EHLO is a command."""
        harness = smtp_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"EHLO c\r\n")
        answers(transport)
        long_line = b"A" * 20000 + b"\r\n"
        for start in [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n"]:
            session.dataReceived(start)
            self.assertTrue(answers(transport)[0].startswith(b"334 "), start)
            session.dataReceived(long_line + b"EHLO c\r\n")
            lines = answers(transport)
            self.assertEqual(lines[0], b"500 5.5.6 Authentication Exchange line is too long", start)
            self.assertEqual(lines[1], b"250-mailgw at your service", start)
            self.assertIn(b"250 AUTH PLAIN LOGIN", lines)
        self.assertEqual(harness.connector.targets, [])
        # Outside an exchange, the ordinary answer.
        session.dataReceived(long_line)
        self.assertEqual(answers(transport), [b"500 5.5.2 Line too long"])

    def test_authFailedAndCancelled(self) -> None:
        """A wrong password gets 535 after the delay; '*' cancels with 501."""
        harness = smtp_harness()
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(b"\x00alice\x00bad") + b"\r\n")
        answers(transport)
        harness.clock.advance(1)
        self.assertEqual(answers(transport), [b"535 5.7.8 Authentication credentials invalid"])
        session.dataReceived(b"AUTH PLAIN\r\n*\r\n")
        self.assertEqual(answers(transport), [b"334 ", b"501 5.7.0 Authentication cancelled"])
