"""The IMAP4S proxy end to end: a real Dovecot behind the gateway, curl, imaplib and
raw TLS sockets in front of it (clients in threads or subprocesses)."""

from __future__ import annotations

import imaplib
import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, start_gateway
from tests.rawclient import SMALL_BUFFER, RawClient, StallingPipe
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

QUOTED_PASSWORD = 'pa ss "quoted" \\ word'
MAIL_USERS = {"alice": "alice-mail", "carol": QUOTED_PASSWORD}
VPN_USERS: dict[str, tuple[str, str | None]] = {
    "alice": ("alice-mail", None),
    "carol": (QUOTED_PASSWORD, None),
}


class IMAP4IntegrationBase(TestCase):
    timeout = 120
    imap4s_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=MAIL_USERS)
        self.messages = self.dovecot.seed_standard("alice")
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        self.gateway = self.start(self.imap4s_options)

    def start(self, options: dict[str, Any]) -> Gateway:
        imap4s = {
            "default_server": {
                "host": "127.0.0.1",
                "port": self.dovecot.imap_port,
                "tls": "starttls",
                "ca": str(self.dovecot.ca_path),
            },
            "allowed_servers": ["localhost"],
            **options,
        }
        return start_gateway(self, self.pki, VPN_USERS, None, imap4s=imap4s, group_policy=POLICIES)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_path))

    def imaps(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap4s"), ssl_context=self.context(), timeout=60)

    def raw_tls(self) -> tuple[ssl.SSLSocket, Any]:
        raw = socket.create_connection(("127.0.0.1", self.gateway.port("imap4s")), timeout=30)
        tls = self.context().wrap_socket(raw, server_hostname="localhost")
        reader = tls.makefile("rb")
        reader.readline()  # greeting
        return tls, reader


class ClientTests(IMAP4IntegrationBase):
    async def test_curlFetchesMessage(self) -> None:
        """curl imaps://…/INBOX;UID=1 through the gateway fetches a message
        byte-identical."""
        out, err, code = await getProcessOutputAndValue(
            "curl",
            [
                "--silent", "--show-error", "--max-time", "30", "--cacert", str(self.pki.ca_path),
                "-u", "alice:alice-mail", f"imaps://127.0.0.1:{self.gateway.port('imap4s')}/INBOX;UID=1",
            ],
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, self.messages[0])

    async def test_imaplibLiteralLoginFetchIdle(self) -> None:
        """imaplib over STARTTLS: LOGIN with a literal password containing spaces and
        quotes, SELECT, FETCH, IDLE (one EXISTS arrives when mail is delivered
        meanwhile), LOGOUT; the tagged OK of LOGIN carries the server's capabilities."""
        port = self.gateway.port("imap4s", implicit=False)
        for message in self.messages[:2]:
            self.dovecot.deliver("carol", message)

        def session() -> tuple[Any, ...]:
            client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
            client.starttls(self.context())
            client.literal = QUOTED_PASSWORD.encode()  # type: ignore[attr-defined,assignment]
            typ, data = client._simple_command("LOGIN", "carol")  # type: ignore[attr-defined]
            login = (typ, data, client.untagged_responses.get("CAPABILITY"))
            client.state = "AUTH"
            typ, count = client.select("INBOX")
            _, fetched = client.fetch("1", "(BODY.PEEK[])")
            tag = client._new_tag()  # type: ignore[attr-defined]
            client.send(tag + b" IDLE\r\n")
            idling = client.readline()
            self.dovecot.deliver("carol", self.messages[2])
            exists = client.readline()
            client.send(b"DONE\r\n")
            done = client.readline()
            while done.startswith(b"* "):  # e.g. "* 3 RECENT"
                done = client.readline()
            client.logout()
            return login, count, fetched, idling, exists, done, tag

        login, count, fetched, idling, exists, done, tag = await in_thread(session)
        self.assertEqual(login[0], "OK", login)
        self.assertIn(b"CAPABILITY", login[1][0])
        self.assertIn(b"IDLE", login[1][0])
        self.assertEqual(count, [b"2"])
        self.assertEqual(fetched[0][1], self.messages[0])
        self.assertTrue(idling.startswith(b"+"), idling)
        self.assertEqual(exists, b"* 3 EXISTS\r\n")
        self.assertTrue(done.startswith(tag + b" OK"), done)

    async def test_authenticatePlainSaslIr(self) -> None:
        """AUTHENTICATE PLAIN with an initial response logs in."""

        def login() -> tuple[bytes, bytes]:
            tls, reader = self.raw_tls()
            with tls:
                tls.sendall(b"a AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlLW1haWw=\r\nb SELECT INBOX\r\n")
                first = reader.readline()
                rest = b""
                while not rest.startswith(b"b "):
                    rest = reader.readline()
                return first, rest

        first, select = await in_thread(login)
        self.assertTrue(first.startswith(b"a OK [CAPABILITY "), first)
        self.assertTrue(select.startswith(b"b OK"), select)

    async def test_pipelinedAfterStarttlsDiscarded(self) -> None:
        """A LOGIN pipelined after STARTTLS in the same write is not executed: after
        the handshake the first answer is to the client's next command, nobody logs
        in, and the log says how many bytes were discarded."""
        port = self.gateway.port("imap4s", implicit=False)
        injected = b"b LOGIN alice alice-mail\r\n"

        def inject() -> tuple[bytes, bytes, bytes]:
            client = open_greeted(port)
            try:
                client.send(b"a STARTTLS\r\n" + injected)
                starttls_answer = client.read_line()
                client.start_tls(self.context())
                first = client.command(b"c NOOP")
                client.send(b"d LOGOUT\r\n")
                return starttls_answer, first, client.read_until(b"d OK")
            finally:
                client.close()

        starttls_answer, first, rest = await in_thread(inject)
        self.assertTrue(starttls_answer.startswith(b"a OK"), starttls_answer)
        self.assertEqual(first, b"c OK NOOP completed.\r\n")
        self.assertNotIn(b"b ", rest)
        assert_discarded(self, self.gateway, len(injected))


class FlowControlTests(IMAP4IntegrationBase):
    """A slow side pauses the other [4.6], in both directions."""

    async def test_fetchSlowClientPausesUpstream(self) -> None:
        """A client that stops reading a FETCH of the 10 MB message makes the gateway
        stop reading from the mail server; when the client reads again, the message
        arrives complete and byte-identical."""
        big_index = max(range(len(self.messages)), key=lambda i: len(self.messages[i]))
        expected = self.messages[big_index]
        port = self.gateway.port("imap4s")

        def login() -> RawClient:
            client = RawClient.open(port, self.context(), timeout=60, receive_buffer=SMALL_BUFFER)
            client.read_line()
            client.send(b"a LOGIN alice alice-mail\r\nb EXAMINE INBOX\r\n")
            client.read_until(b"\r\nb OK")
            client.read_line()
            return client

        client: RawClient = await in_thread(login)
        self.addCleanup(client.close)
        info, relay = relay_of(self.gateway, "imap4")
        shrink_send_buffer(relay._client)
        await in_thread(client.send, b"c FETCH %d (BODY.PEEK[])\r\n" % (big_index + 1))
        await assert_stalled(self, lambda: info.bytes_to_client, relay._server, len(expected))

        def read_all() -> bytes:
            header = client.read_until(b"}\r\n")
            size = int(header[header.rindex(b"{") + 1 : -3])
            body = client.read_exactly(size)
            client.read_until(b"c OK")
            client.command(b"d LOGOUT")
            return body

        self.assertEqual(await in_thread(read_all), expected)

    async def test_appendStalledServerPausesClient(self) -> None:
        """A mail server that stops reading a 10 MB APPEND makes the gateway stop
        reading from the client instead of buffering the upload; when the server
        reads again, the message is stored complete and byte-identical."""
        pipe = StallingPipe(reactor, self.dovecot.imap_port)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(pipe.stop()))
        gateway = self.start(
            {
                "default_server": {
                    "host": "127.0.0.1",
                    "port": pipe.port,
                    "tls": "starttls",
                    "ca": str(self.dovecot.ca_path),
                }
            }
        )
        port = gateway.port("imap4s")
        body = big_message()

        def login_and_append() -> RawClient:
            client = RawClient.open(port, self.context(), timeout=60)
            client.read_line()
            client.send(b"a LOGIN alice alice-mail\r\n")
            client.read_until(b"a OK")
            client.read_line()
            client.send(b"b APPEND INBOX {%d}\r\n" % len(body))
            client.read_line()  # "+ OK": the server waits for the literal
            return client

        client: RawClient = await in_thread(login_and_append)
        self.addCleanup(client.close)
        info, relay = relay_of(gateway, "imap4")
        shrink_send_buffer(relay._server)
        pipe.stall()
        sending = in_thread(client.send, body + b"\r\n")
        await assert_stalled(self, lambda: info.bytes_from_client, relay._client, len(body))
        pipe.resume()
        await sending

        def read_back() -> tuple[bytes, bytes]:
            appended = client.read_until(b"\r\n")
            client.send(b"c SELECT INBOX\r\n")
            client.read_until(b"c OK")
            client.read_line()
            client.send(b"d FETCH %d (BODY.PEEK[])\r\n" % (len(self.messages) + 1))
            header = client.read_until(b"}\r\n")
            stored = client.read_exactly(int(header[header.rindex(b"{") + 1 : -3]))
            client.read_until(b"d OK")
            client.command(b"e LOGOUT")
            return appended, stored

        appended, stored = await in_thread(read_back)
        self.assertTrue(appended.startswith(b"b OK"), appended)
        self.assertEqual(len(stored), len(body))
        self.assertEqual(stored, body)


class BadInputTests(IMAP4IntegrationBase):
    async def test_badInputThenClose(self) -> None:
        """An 8 KB+ line, a literal announcing 2 GB, broken base64 and unknown
        commands each get BAD; after 10 errors the connection closes; an
        authenticated session in parallel is unaffected."""
        client = await in_thread(self.imaps)
        await in_thread(client.login, "alice", "alice-mail")

        def abuse() -> list[bytes]:
            tls, reader = self.raw_tls()
            answers = []
            with tls:
                tls.sendall(b"a1 NOOP " + b"x" * 9000 + b"\r\n")
                answers.append(reader.readline())
                tls.sendall(b"a2 LOGIN {2147483648}\r\n")
                answers.append(reader.readline())
                tls.sendall(b"a3 AUTHENTICATE PLAIN !!!\r\n")
                answers.append(reader.readline())
                for i in range(4, 11):
                    tls.sendall(b"a%d FROBNICATE\r\n" % i)
                    answers.append(reader.readline())
                answers.append(reader.readline())
                answers.append(reader.read())
            return answers

        answers = await in_thread(abuse)
        self.assertEqual(answers[0], b"* BAD Line too long.\r\n")
        self.assertTrue(answers[1].startswith(b"a2 BAD"), answers[1])
        self.assertIn(b"Literal too big", answers[1])
        self.assertTrue(answers[2].startswith(b"a3 BAD"), answers[2])
        self.assertTrue(all(a.startswith(b"a") and b" BAD " in a for a in answers[3:10]), answers)
        self.assertEqual(answers[10], b"* BYE Too many errors, closing connection.\r\n")
        self.assertEqual(answers[11], b"")
        typ, _ = await in_thread(client.select, "INBOX")
        self.assertEqual(typ, "OK")
        await in_thread(client.logout)

    async def test_serverNotAllowed(self) -> None:
        """A server not in allowed_servers: NO [AUTHENTICATIONFAILED]."""

        def login() -> str:
            client = self.imaps()
            try:
                client.login("alice@mail.example.net", "alice-mail")
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                client.shutdown()
            return "accepted"

        answer = await in_thread(login)
        self.assertIn("AUTHENTICATIONFAILED", answer)
        self.assertTrue(any("is not in allowed_servers" in r for r in self.gateway.reasons()))

    async def test_plaintextLoginDisabled(self) -> None:
        """Before STARTTLS the capability says LOGINDISABLED and LOGIN gets NO."""
        port = self.gateway.port("imap4s", implicit=False)

        def attempt() -> tuple[Any, str]:
            client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
            caps = client.capabilities
            try:
                client.login("alice", "alice-mail")
            except imaplib.IMAP4.error as e:
                return caps, str(e)
            finally:
                client.shutdown()
            return caps, "accepted"

        caps, answer = await in_thread(attempt)
        self.assertIn("LOGINDISABLED", caps)
        self.assertIn("STARTTLS", caps)
        self.assertIn("PRIVACYREQUIRED", answer)


class SessionLimitTests(IMAP4IntegrationBase):
    imap4s_options = {"unauthenticated_session_limit": 2}

    async def test_floodKeepsAuthenticatedSession(self) -> None:
        """The non-authenticated session limit holds for IMAP: a flood of five
        connections closes exactly the three oldest unauthenticated ones (end of file,
        gone from the registry); the two newest stay open and answer, and the
        logged-in session goes on."""
        client = await in_thread(self.imaps)
        await in_thread(client.login, "alice", "alice-mail")
        port = self.gateway.port("imap4s")
        await assert_flood_evicts_oldest(
            self, self.gateway, "imap4", lambda: open_greeted(port, self.context()), 5, b"x NOOP"
        )
        typ, _ = await in_thread(client.select, "INBOX")
        self.assertEqual(typ, "OK")
        await in_thread(client.logout)
