"""Inline POP3 SSO and piggyback authentication [7, 4.3], end to end with a real
Dovecot: a successful POP3 login through the gateway teaches the identity table who
is at the client's address; a failed one teaches nothing; an IMAP proxy with the
piggyback method then lets that user in from that address without a VPN password."""

from __future__ import annotations

import base64
import http.client
import os
import poplib
import re
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.edge import in_thread, read_until, tls_connect
from tests.gateway import deferLater, start_gateway
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail"}
VPN_USERS: dict[str, tuple[str, str | None]] = {"alice": ("alice-mail", None), "bob": ("bob-vpn", None)}


class InlineSSOTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=MAIL_USERS, submission=True)
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        pop3 = {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"}
        imap = {"host": "127.0.0.1", "port": self.dovecot.imap_port, "tls": "none"}
        submission = {"host": "127.0.0.1", "port": self.dovecot.submission_port, "tls": "none"}
        self.gateway = start_gateway(
            self,
            self.pki,
            VPN_USERS,
            {"default_server": pop3},
            imap4s={"default_server": imap, "authentication": ["piggyback"]},
            smtps={"default_server": submission, "authentication": ["piggyback", "mailhost"]},
            sso={"pop3": {"enabled": True, "mode": "inline", "servers": [f"127.0.0.1:{self.dovecot.pop3_port}"],
                          "policy": ["127.0.0.0/29"], "ttl": 600}},
        )
        self.identities = self.gateway.service.identities  # type: ignore[union-attr]
        assert self.identities is not None

    def pop3_login(self, user: str, password: str, source: str) -> bytes:
        with tls_connect(self.gateway.port("pop3s"), self.pki.ca_path, source=source) as sock:
            read_until(sock, b"\r\n")
            sock.sendall(f"USER {user}\r\n".encode())
            read_until(sock, b"\r\n")
            sock.sendall(f"PASS {password}\r\n".encode())
            answer = read_until(sock, b"\r\n")
            sock.sendall(b"QUIT\r\n")
            return answer

    def imap_login(self, user: str, password: str, source: str) -> bytes:
        with tls_connect(self.gateway.port("imap4s"), self.pki.ca_path, source=source) as sock:
            read_until(sock, b"\r\n")
            sock.sendall(f"a LOGIN {user} {password}\r\n".encode())
            answer: bytes = read_until(sock, b"a ")
            answer += read_until(sock, b"\r\n") if not answer.endswith(b"\r\n") else b""
            sock.sendall(b"b LOGOUT\r\n")
            return answer

    async def test_loginTeachesTableAndPiggybackUsesIt(self) -> None:
        """alice's POP3 login from 127.0.0.2 adds an entry; bob's failed one from
        127.0.0.3 adds none, nor does a login from outside the policy (127.0.0.9);
        IMAP piggyback then admits alice from 127.0.0.2 only."""
        answer: Any = await in_thread(self.pop3_login, "alice", "alice-mail", "127.0.0.2")
        self.assertTrue(answer.startswith(b"+OK"), answer)
        entry = self.identities.lookup("127.0.0.2")  # type: ignore[union-attr]
        assert entry is not None
        self.assertEqual((entry.user, entry.source.value, entry.group_policy), ("alice", "inline", "DfltGrpPolicy"))
        self.assertIn(b"-ERR", await in_thread(self.pop3_login, "bob", "wrong", "127.0.0.3"))
        self.assertIsNone(self.identities.lookup("127.0.0.3"))  # type: ignore[union-attr]
        self.assertTrue((await in_thread(self.pop3_login, "alice", "alice-mail", "127.0.0.9")).startswith(b"+OK"))
        self.assertIsNone(self.identities.lookup("127.0.0.9"))  # type: ignore[union-attr]
        self.assertIn(b"a OK", await in_thread(self.imap_login, "alice", "alice-mail", "127.0.0.2"))
        self.assertIn(b"a NO", await in_thread(self.imap_login, "alice", "alice-mail", "127.0.0.4"))
        self.assertIn(b"a NO", await in_thread(self.imap_login, "bob", "bob-mail", "127.0.0.2"))
        self.assertEqual(await in_thread(self.smtp_login, "alice", "alice-mail", "127.0.0.2"), 235)
        self.assertEqual(await in_thread(self.smtp_login, "alice", "alice-mail", "127.0.0.4"), 535)

    def smtp_login(self, user: str, password: str, source: str) -> int:
        """An SMTPS AUTH PLAIN from C{source}; the reply code."""
        with tls_connect(self.gateway.port("smtps"), self.pki.ca_path, source=source) as sock:
            read_until(sock, b"\r\n")
            sock.sendall(b"EHLO client.example\r\n")
            read_until(sock, b"250 ")
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
            answer = read_until(sock, b"\r\n")
            sock.sendall(b"QUIT\r\n")
            return int(answer[:3])


class MonitorSSOTests(TestCase):
    timeout = 60

    async def test_loginSeenOnTheWireTeachesTable(self) -> None:
        """Monitor mode: a POP3 login straight to the mail server (not through the
        gateway), seen by the gateway's capture on the loopback interface, adds an
        entry for the client's address; a failed login adds none."""
        if os.geteuid() != 0:
            self.skipTest("capturing packets needs root (CAP_NET_RAW)")
        dovecot = Dovecot.started(self, users=MAIL_USERS)
        pki = TestPKI(Path(self.mktemp()).absolute())
        gateway = start_gateway(
            self,
            pki,
            VPN_USERS,
            {"default_server": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none"}},
            sso={"pop3": {"enabled": True, "mode": "monitor", "monitor_interface": "lo",
                          "servers": [f"127.0.0.1:{dovecot.pop3_port}"], "policy": ["127.0.0.0/8"]}},
        )
        identities = gateway.service.identities  # type: ignore[union-attr]
        assert identities is not None

        def direct(user: str, password: str) -> None:
            client = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=10)
            try:
                client.user(user)
                client.pass_(password)
            except poplib.error_proto:
                pass
            finally:
                client.quit()

        await in_thread(direct, "bob", "wrong")
        await deferLater(0.5)
        self.assertEqual(len(identities), 0)
        await in_thread(direct, "alice", "alice-mail")
        for _ in range(40):
            if identities.lookup("127.0.0.1") is not None:
                break
            await deferLater(0.05)
        entry = identities.lookup("127.0.0.1")
        assert entry is not None
        self.assertEqual((entry.user, entry.source.value), ("alice", "monitor"))


class PortalWiringTests(TestCase):
    timeout = 60

    async def test_portalLoginThroughTheGateway(self) -> None:
        """The gateway serves the portal with its certificate; a login there with
        the POP3S proxy's AAA adds a portal entry for the visitor's address, which
        piggyback then accepts on the IMAP proxy; a wrong password adds nothing."""
        dovecot = Dovecot.started(self, users=MAIL_USERS)
        pki = TestPKI(Path(self.mktemp()).absolute())
        gateway = start_gateway(
            self,
            pki,
            VPN_USERS,
            {"default_server": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none"},
             "authentication": ["aaa", "piggyback"]},
            imap4s={"default_server": {"host": "127.0.0.1", "port": dovecot.imap_port, "tls": "none"},
                    "authentication": ["piggyback"]},
            sso={"pop3": {"enabled": True, "portal": "ssl:0:interface=127.0.0.1", "policy": ["127.0.0.0/8"]}},
        )
        service = gateway.service
        assert service is not None and service.identities is not None
        port = service._portal.port.getHost().port
        context = ssl.create_default_context(cafile=str(pki.ca_path))

        def portal_login(user: str, password: str) -> int:
            return portal_post("/login", {"user": user, "password": password})

        def portal_post(path: str, fields: dict[str, str]) -> int:
            connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
            connection.request("GET", "/")
            page = connection.getresponse()
            body = page.read().decode()
            cookie = page.getheader("Set-Cookie", "").split(";", 1)[0]
            match = re.search(r'name="csrf" value="([^"]+)"', body)
            assert match is not None, body
            form = urllib.parse.urlencode({"csrf": match.group(1), **fields})
            connection.request(
                "POST", path, body=form,
                headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
            )
            answer = connection.getresponse()
            answer.read()
            connection.close()
            return answer.status

        self.assertEqual(await in_thread(portal_login, "bob", "wrong"), 403)
        self.assertIsNone(service.identities.lookup("127.0.0.1"))
        self.assertEqual(await in_thread(portal_login, "bob", "bob-vpn"), 303)
        entry = service.identities.lookup("127.0.0.1")
        assert entry is not None
        self.assertEqual((entry.user, entry.source.value), ("bob", "portal"))

        def imap_login() -> bytes:
            with tls_connect(gateway.port("imap4s"), pki.ca_path) as sock:
                read_until(sock, b"\r\n")
                sock.sendall(b"a LOGIN bob bob-mail\r\n")
                answer: bytes = read_until(sock, b"\r\n")
                while not answer.split(b"\r\n")[-2].startswith(b"a "):
                    answer += read_until(sock, b"\r\n")
                return answer

        self.assertIn(b"a OK", await in_thread(imap_login))

        async def curl_pop3s() -> tuple[bytes, int]:
            out, err, code = await getProcessOutputAndValue(
                "curl",
                ["--silent", "--show-error", "--max-time", "20", "--cacert", str(pki.ca_path),
                 "-u", "bob:bob-mail", f"pop3s://localhost:{gateway.port('pop3s')}/"],
            )
            return out + err, code

        # bob's VPN password is not his mail password: only the portal session lets
        # "bob:bob-mail" in (piggyback); after logout it is refused.
        output, code = await curl_pop3s()
        self.assertEqual(code, 0, output)
        self.assertEqual(await in_thread(portal_post, "/logout", {}), 303)
        self.assertIsNone(service.identities.lookup("127.0.0.1"))
        output, code = await curl_pop3s()
        self.assertNotEqual(code, 0, output)
