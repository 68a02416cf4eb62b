"""The IMAP4S proxy end to end: a real Dovecot behind the gateway, curl, imaplib and
raw TLS sockets in front of it (clients in threads or subprocesses)."""

from __future__ import annotations

import imaplib
import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, deferLater, start_gateway
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI
from tests.test_integration_pop3 import POLICIES, buffered, in_thread

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

    async def test_append3MB(self) -> None:
        """A 3 MB APPEND relays with the gateway's buffers staying bounded, and the
        message reads back byte-identical."""
        body = b"Subject: big append\r\n\r\n" + b"".join(b"%075d\r\n" % i for i in range(40000))
        state: dict[str, Any] = {"done": False}

        def append() -> Any:
            client = self.imaps()
            try:
                client.login("alice", "alice-mail")
                result = client.append("INBOX", None, None, body)
                client.select("INBOX")
                _, data = client.fetch(str(len(self.messages) + 1), "(BODY.PEEK[])")
                return result, data[0][1]  # type: ignore[index]
            finally:
                state["done"] = True
                client.logout()

        appending = in_thread(append)
        most = 0
        while not state["done"]:
            for session in self.gateway.service.registry.sessions("imap4"):  # type: ignore[union-attr]
                relay = session.owner.relay  # type: ignore[attr-defined,union-attr]
                if relay is not None:
                    most = max(most, buffered(relay._server), buffered(relay._client))
            await deferLater(0.005)
        result, stored = await appending
        self.assertEqual(result[0], "OK")
        self.assertEqual(stored, body)
        self.assertGreater(len(body), 3 * 1000 * 1000)
        self.assertLess(most, 1024 * 1024)


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
        """The non-authenticated session limit holds for IMAP: a flood closes the
        oldest unauthenticated connections, never the logged-in one."""
        client = await in_thread(self.imaps)
        await in_thread(client.login, "alice", "alice-mail")
        flood = [await in_thread(self.raw_tls) for _ in range(5)]
        self.addCleanup(lambda: [tls.close() for tls, _ in flood])

        def closed(reader: Any) -> bool:
            try:
                return bool(reader.readline().startswith(b"* BYE") or reader.read() == b"")
            except OSError:
                return True

        self.assertTrue(await in_thread(closed, flood[0][1]))
        typ, _ = await in_thread(client.select, "INBOX")
        self.assertEqual(typ, "OK")
        await in_thread(client.logout)
