"""The SMTPS proxy end to end: Dovecot's submission service (AUTH required, relaying
to a capturing sink) behind the gateway; curl, smtplib and raw sockets in front."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, start_gateway
from tests.rawclient import RawClient, StallingPipe
from tests.servers.dovecot import Dovecot, big_message
from tests.servers.pki import TestPKI
from tests.test_integration_pop3 import (
    POLICIES,
    assert_discarded,
    assert_flood_evicts_oldest,
    assert_stalled,
    in_thread,
    open_greeted,
    relay_of,
    shrink_send_buffer,
)

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail"}
VPN_USERS: dict[str, tuple[str, str | None]] = {"alice": ("alice-mail", None), "jdoe": ("jdoe-vpn", None)}
MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: through the gateway\r\n"
    b"Message-ID: <gw-test-1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".leading dot line\r\n"
    b"Bye.\r\n"
)


class SMTPIntegrationBase(TestCase):
    timeout = 120
    smtps_options: dict[str, Any] = {"authentication": ["aaa", "mailhost"]}

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=MAIL_USERS, submission=True)
        assert self.dovecot.smtp_sink is not None
        self.sink = self.dovecot.smtp_sink
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        self.gateway = self.start(self.smtps_options)

    def start(self, options: dict[str, Any]) -> Gateway:
        smtps = {
            "default_server": {
                "host": "127.0.0.1",
                "port": self.dovecot.submission_port,
                "tls": "starttls",
                "ca": str(self.dovecot.ca_path),
            },
            "allowed_servers": ["localhost"],
            **options,
        }
        return start_gateway(self, self.pki, VPN_USERS, None, smtps=smtps, group_policy=POLICIES)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_path))

    def smtps(self) -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL("127.0.0.1", self.gateway.port("smtps"), context=self.context(), timeout=60)

    def received(self, count: int = 1) -> list[Any]:
        return self.sink.wait_for_messages(count, timeout=30)


def without_trace(data: bytes) -> bytes:
    """The message as the client sent it: the receiving servers' trace headers
    (Received) removed from the top."""
    lines = data.split(b"\r\n")
    while lines and (lines[0].startswith(b"Received:") or lines[0][:1] in (b" ", b"\t")):
        lines.pop(0)
    return b"\r\n".join(lines)


class SubmitTests(SMTPIntegrationBase):
    async def test_curlSmtps(self) -> None:
        """curl smtps:// submits a message that arrives byte-identical apart from
        trace headers; the mail server saw AUTH with the MAILUSER."""
        path = Path(self.mktemp())
        path.write_bytes(MESSAGE)
        # VPN user and split passwords in the URL's user info (curl's -u would split
        # the password off at the first colon).
        user_info = "jdoe%3Aalice:jdoe-vpn%3Aalice-mail"
        _, err, code = await getProcessOutputAndValue(
            "curl",
            [
                "--silent", "--show-error", "--max-time", "30", "--cacert", str(self.pki.ca_path),
                f"smtps://{user_info}@127.0.0.1:{self.gateway.port('smtps')}",
                "--mail-from", "alice@example.com", "--mail-rcpt", "bob@example.com",
                "--upload-file", str(path),
            ],
        )
        self.assertEqual(code, 0, err)
        messages = await in_thread(self.received)
        self.assertEqual([r.strip("<>") for r in messages[0].rcpt_to], ["bob@example.com"])
        self.assertEqual(without_trace(messages[0].data), MESSAGE)
        self.assertIn("user=<alice>", self.dovecot.log_text())

    async def test_smtplibStarttls(self) -> None:
        """smtplib over the STARTTLS port: EHLO, STARTTLS, AUTH LOGIN, sendmail."""
        port = self.gateway.port("smtps", implicit=False)

        def send() -> Any:
            client = smtplib.SMTP("127.0.0.1", port, timeout=60)
            try:
                client.ehlo()
                before = set(client.esmtp_features)
                client.starttls(context=self.context())
                client.ehlo()
                client.login("alice", "alice-mail")
                client.sendmail("alice@example.com", ["bob@example.com"], MESSAGE)
                return before
            finally:
                client.quit()

        before = await in_thread(send)
        self.assertIn("starttls", before)
        self.assertNotIn("auth", before)  # no AUTH before TLS
        messages = await in_thread(self.received)
        self.assertEqual(without_trace(messages[0].data), MESSAGE)

    async def test_pipelinedAfterStarttlsDiscarded(self) -> None:
        """An EHLO and an AUTH pipelined after STARTTLS in the same write are not
        executed: after the handshake the first answer is to the client's next
        command, nobody logs in, and the log says how many bytes were discarded."""
        port = self.gateway.port("smtps", implicit=False)
        injected = b"EHLO evil\r\nAUTH PLAIN " + base64.b64encode(b"\0alice\0alice-mail") + b"\r\n"

        def inject() -> tuple[bytes, bytes]:
            client = open_greeted(port)
            try:
                client.send(b"EHLO test\r\n")
                client.read_until(b"\r\n250 ")
                client.read_line()
                client.send(b"STARTTLS\r\n" + injected)
                starttls_answer = client.read_line()
                client.start_tls(self.context())
                first = client.command(b"NOOP")
                client.command(b"QUIT")
                return starttls_answer, first
            finally:
                client.close()

        starttls_answer, first = await in_thread(inject)
        self.assertTrue(starttls_answer.startswith(b"220 "), starttls_answer)
        self.assertEqual(first, b"250 2.0.0 OK\r\n")
        assert_discarded(self, self.gateway, len(injected))

    async def test_wrongPasswords(self) -> None:
        """A wrong VPN password and a wrong mail password each get 535."""

        def attempt(user: str, password: str) -> int:
            client = self.smtps()
            try:
                client.login(user, password)
            except smtplib.SMTPAuthenticationError as e:
                return int(e.smtp_code)
            finally:
                client.close()
            return 235

        self.assertEqual(await in_thread(attempt, "jdoe:alice", "wrong:alice-mail"), 535)
        self.assertEqual(await in_thread(attempt, "jdoe:alice", "jdoe-vpn:wrong"), 535)
        self.assertEqual(await in_thread(attempt, "alice@mail.example.net", "alice-mail"), 535)
        reasons = " ".join(self.gateway.reasons())
        self.assertIn("wrong password", reasons)
        self.assertIn("mail server rejected", reasons)
        self.assertIn("is not in allowed_servers", reasons)
        self.assertNotIn("alice-mail", self.gateway.log_text())


class MailhostOnlyTests(SMTPIntegrationBase):
    smtps_options = {"authentication": ["mailhost"]}

    async def test_mailServerDecides(self) -> None:
        """With only "mailhost", the mail server's AUTH decides: a user unknown to the
        gateway's AAA but known to the mail server submits; a wrong password is 535."""

        def send(password: str) -> int:
            client = self.smtps()
            try:
                client.login("bob", password)
                client.sendmail("bob@example.com", ["alice@example.com"], MESSAGE)
            except smtplib.SMTPAuthenticationError as e:
                return int(e.smtp_code)
            finally:
                client.close()
            return 250

        self.assertEqual(await in_thread(send, "wrong"), 535)
        self.assertEqual(await in_thread(send, "bob-mail"), 250)
        messages = await in_thread(self.received)
        self.assertEqual(without_trace(messages[0].data), MESSAGE)


class BadInputTests(SMTPIntegrationBase):
    smtps_options = {"authentication": ["aaa", "mailhost"], "unauthenticated_session_limit": 2}

    def raw(self) -> tuple[ssl.SSLSocket, Any]:
        raw = socket.create_connection(("127.0.0.1", self.gateway.port("smtps")), timeout=30)
        tls = self.context().wrap_socket(raw, server_hostname="localhost")
        reader = tls.makefile("rb")
        reader.readline()
        return tls, reader

    async def test_badInputThenClose(self) -> None:
        """An 8 KB+ line, broken base64 in AUTH and unknown commands get errors; after
        10 errors the connection closes; a logged-in session in parallel goes on."""
        client = await in_thread(self.smtps)
        await in_thread(client.login, "alice", "alice-mail")

        def abuse() -> list[bytes]:
            tls, reader = self.raw()
            answers = []
            with tls:
                tls.sendall(b"EHLO test\r\n")
                while not reader.readline().startswith(b"250 "):
                    pass
                tls.sendall(b"NOOP " + b"x" * 13000 + b"\r\n")
                answers.append(reader.readline())
                tls.sendall(b"AUTH PLAIN !!!notbase64\r\n")
                answers.append(reader.readline())
                for _ in range(8):
                    tls.sendall(b"FROB\r\n")
                    answers.append(reader.readline())
                answers.append(reader.read())
            return answers

        answers = await in_thread(abuse)
        self.assertTrue(answers[0].startswith(b"500 5.5.2"), answers[0])
        self.assertTrue(answers[1].startswith(b"501"), answers[1])
        self.assertTrue(all(a.startswith(b"500") for a in answers[2:9]), answers)
        self.assertTrue(answers[9].startswith(b"500"), answers[9])
        self.assertIn(b"421 4.7.0", answers[10])
        code, _ = await in_thread(client.noop)
        self.assertEqual(code, 250)
        await in_thread(client.quit)

    async def test_floodKeepsAuthenticatedSession(self) -> None:
        """The non-authenticated session limit holds for SMTP: a flood of five
        connections closes exactly the three oldest unauthenticated ones (end of file,
        gone from the registry); the two newest stay open and answer, and the
        logged-in session goes on."""
        client = await in_thread(self.smtps)
        await in_thread(client.login, "alice", "alice-mail")
        port = self.gateway.port("smtps")
        await assert_flood_evicts_oldest(
            self, self.gateway, "smtp", lambda: open_greeted(port, self.context()), 5, b"NOOP"
        )
        code, _ = await in_thread(client.noop)
        self.assertEqual(code, 250)
        await in_thread(client.quit)


class FlowControlTests(SMTPIntegrationBase):
    async def test_bigMessageStalledServerPausesClient(self) -> None:
        """A mail server that stops reading the DATA of a 10 MB message makes the
        gateway stop reading from the client instead of buffering it; when the server
        reads again, the message is accepted and arrives byte-identical."""
        assert self.dovecot.submission_port is not None
        pipe = StallingPipe(reactor, self.dovecot.submission_port)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(pipe.stop()))
        gateway = self.start(
            {
                "authentication": ["aaa", "mailhost"],
                "default_server": {
                    "host": "127.0.0.1",
                    "port": pipe.port,
                    "tls": "starttls",
                    "ca": str(self.dovecot.ca_path),
                },
            }
        )
        port = gateway.port("smtps")
        message = big_message()
        auth = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0alice-mail")

        def login_and_start_data() -> RawClient:
            client = open_greeted(port, self.context())
            client.send(b"EHLO test\r\n")
            client.read_until(b"\r\n250 ")
            client.read_line()
            for line in (auth, b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.com>", b"DATA"):
                answer = client.command(line)
                assert answer[:1] in (b"2", b"3"), (line, answer)
            return client

        client: RawClient = await in_thread(login_and_start_data)
        self.addCleanup(client.close)
        info, relay = relay_of(gateway, "smtp")
        shrink_send_buffer(relay._server)
        pipe.stall()
        stuffed = message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        sending = in_thread(client.send, stuffed)
        await assert_stalled(self, lambda: info.bytes_from_client, relay._client, len(message))
        pipe.resume()
        await sending
        accepted = await in_thread(client.read_line)
        self.assertTrue(accepted.startswith(b"250 "), accepted)
        await in_thread(client.command, b"QUIT")
        messages = await in_thread(self.received)
        self.assertEqual(without_trace(messages[0].data), message)
