"""Closing means closed [4.1], against the running gateway and a real Dovecot, with
clients that do not cooperate: every way a session ends leaves no socket on the
gateway's side within a few seconds, judged in the socket table (not by a client's
timeout), and the session leaves the registry at once."""

from __future__ import annotations

import resource
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.testing import TLSStringTransport
from tests.edge import FloodClient, client_port, gone_within, held_within, in_thread, read_until, tls_connect
from tests.gateway import Gateway, deferLater, start_gateway
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI
from tests.sockets import held_sockets, rss_kib
from tests.test_proxy_pop3 import POP3Harness, make_config

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail"}
VPN_USERS: dict[str, tuple[str, str | None]] = {
    "alice": ("alice-mail", None),
    "bob": ("bob-mail", "Solo"),
}
POLICIES = [
    {"name": "DfltGrpPolicy", "simultaneous_logins": 3},
    {"name": "Solo", "simultaneous_logins": 1},
]
#: the most a close may take: CLOSE_GRACE (2 s) plus scheduling slack
CLOSED_WITHIN = 3.0


class EdgeBase(TestCase):
    timeout = 120
    login_timeout = 60

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=MAIL_USERS, submission=True)
        self.messages = self.dovecot.seed_standard("alice")
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        self.gateway = self.start()

    def upstream(self, port: int) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": port, "tls": "starttls", "ca": str(self.dovecot.ca_path)}

    def start(self, **overrides: Any) -> Gateway:
        common = {"login_timeout": self.login_timeout, "allowed_servers": ["localhost"]}
        pop3s = {"default_server": self.upstream(self.dovecot.pop3_port), **common, **overrides}
        imap4s = {"default_server": self.upstream(self.dovecot.imap_port), **common, **overrides}
        assert self.dovecot.submission_port is not None
        smtps = {"default_server": self.upstream(self.dovecot.submission_port), **common, **overrides}
        return start_gateway(
            self, self.pki, VPN_USERS, pop3s, imap4s=imap4s, smtps=smtps, group_policy=POLICIES
        )

    def logged_in_pop3(self, source: str = "127.0.0.1") -> Any:
        sock = tls_connect(self.gateway.port("pop3s"), self.pki.ca_path, source=source)
        read_until(sock, b"\r\n")
        sock.sendall(b"USER alice\r\n")
        read_until(sock, b"\r\n")
        sock.sendall(b"PASS alice-mail\r\n")
        answer = read_until(sock, b"\r\n")
        assert answer.startswith(b"+OK"), answer
        return sock

    def session_of(self, port: int) -> str:
        for info in self.gateway.service.registry:  # type: ignore[union-attr]
            if info.client.endswith(f":{port}"):
                return info.session_id
        raise AssertionError(f"no session for client port {port}")


class KillAndTimeoutTests(EdgeBase):
    login_timeout = 2

    async def test_killClosesClientThatReadsNothing(self) -> None:
        """After C{mailgwctl kill}, a logged-in client that reads nothing more (and
        never answers the TLS close alert) has lost its connection on the gateway's
        side within 3 s, and C{sessions} no longer lists it."""
        sock = await in_thread(self.logged_in_pop3)
        self.addCleanup(sock.close)
        port = client_port(sock)
        session_id = self.session_of(port)
        ctl = str(Path(sys.executable).parent / "mailgwctl")
        out, err, code = await getProcessOutputAndValue(
            ctl, ["--socket", str(self.gateway.config.admin.socket), "kill", session_id]
        )
        self.assertEqual(code, 0, err)
        self.assertIsNone(self.gateway.service.registry.get(session_id))  # type: ignore[union-attr]
        out, err, code = await getProcessOutputAndValue(
            ctl, ["--socket", str(self.gateway.config.admin.socket), "sessions", "--json"]
        )
        self.assertNotIn(session_id.encode(), out)
        await gone_within(CLOSED_WITHIN, local_port=self.gateway.port("pop3s"), remote_port=port)

    async def _held_by_flood_client(self, mode: str, port: int) -> None:
        client = FloodClient.start(mode, port, "--count", "5", "--cafile", str(self.pki.ca_path))
        self.addCleanup(lambda: client.ended)
        self.addCleanup(client.release)
        await client.ready
        await held_within(5, 2.0, local_port=port)
        elapsed = await gone_within(self.login_timeout + CLOSED_WITHIN, local_port=port)
        self.assertGreater(elapsed, 1.0)  # the login timeout, not an early accident
        self.assertEqual([s for s in self.gateway.service.registry], [])  # type: ignore[union-attr]

    async def test_loginTimeoutNoClientHello(self) -> None:
        """Connections that never send a ClientHello are closed by the handshake
        and login timeouts (2 s) on the gateway's side."""
        await self._held_by_flood_client("tcp", self.gateway.port("pop3s"))

    async def test_loginTimeoutHalfClientHello(self) -> None:
        """The same for connections that send half of a ClientHello."""
        await self._held_by_flood_client("half-hello", self.gateway.port("imap4s"))

    async def test_loginTimeoutAfterHandshake(self) -> None:
        """The same for connections that complete the handshake, read the greeting
        and say nothing (and never answer the close alert)."""
        await self._held_by_flood_client("tls-idle", self.gateway.port("smtps"))


class HandshakeFirstTests(SynchronousTestCase):
    def test_greetingOnlyAfterHandshake(self) -> None:
        """On the implicit-TLS port the greeting is written only once the TLS
        handshake is done (nothing is buffered for a client that never finishes it);
        on the STARTTLS port at once."""
        harness = POP3Harness(make_config())
        session = harness.session_class(harness.env, implicit_tls=True)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        session.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        session.handshakeCompleted()
        self.assertEqual(transport.value(), b"+OK mailgw POP3 gateway ready.\r\n")
        plain = harness.session_class(harness.env, implicit_tls=False)
        plain_transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40001))
        plain.makeConnection(plain_transport)
        self.assertEqual(plain_transport.value(), b"+OK mailgw POP3 gateway ready.\r\n")

    def test_handshakeTimeout(self) -> None:
        """A TLS handshake not completed within min(10 s, login_timeout) aborts the
        connection (nothing can be said before TLS) and the session leaves the
        registry at once."""
        harness = POP3Harness(make_config())
        session = harness.session_class(harness.env, implicit_tls=True)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        session.makeConnection(transport)
        self.assertEqual(len(harness.registry), 1)
        harness.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(harness.registry), 0)


class GoodbyeTests(EdgeBase):
    async def _quit_without_reading(self, protocol_name: str, command: bytes) -> None:
        port = self.gateway.port(protocol_name)

        def quit_and_stop() -> Any:
            sock = tls_connect(port, self.pki.ca_path)
            read_until(sock, b"\r\n")
            sock.sendall(command)
            return sock  # never read again, never answer the close alert

        sock = await in_thread(quit_and_stop)
        self.addCleanup(sock.close)
        await gone_within(CLOSED_WITHIN, local_port=port, remote_port=client_port(sock))

    async def test_pop3QuitBeforeLogin(self) -> None:
        """POP3 QUIT before login: closed on the gateway's side within 3 s."""
        await self._quit_without_reading("pop3s", b"QUIT\r\n")

    async def test_imapLogoutBeforeLogin(self) -> None:
        """IMAP LOGOUT before login: the same."""
        await self._quit_without_reading("imap4s", b"a LOGOUT\r\n")

    async def test_smtpQuitBeforeLogin(self) -> None:
        """SMTP QUIT before login: the same."""
        await self._quit_without_reading("smtps", b"QUIT\r\n")

    async def test_imapLoggedOffGetsBye(self) -> None:
        """An IMAP session logged off by simultaneous_logins receives C{* BYE} and is
        closed on the gateway's side within 3 s, though it reads nothing more."""
        port = self.gateway.port("imap4s")

        def login(source: str) -> Any:
            sock = tls_connect(port, self.pki.ca_path, source=source)
            read_until(sock, b"\r\n")
            sock.sendall(b"a LOGIN bob bob-mail\r\n")
            answer = read_until(sock, b"a OK")
            assert b"a OK" in answer, answer
            return sock

        first = await in_thread(login, "127.0.0.2")
        self.addCleanup(first.close)
        second = await in_thread(login, "127.0.0.3")
        self.addCleanup(second.close)
        await gone_within(CLOSED_WITHIN, local_port=port, remote_port=client_port(first))
        first.settimeout(5)
        self.assertIn(b"* BYE", await in_thread(read_until, first, b"BYE"))
        # The new login is unaffected.
        self.assertEqual(len(held_sockets(local_port=port, remote_port=client_port(second))), 1)


class FloodTests(EdgeBase):
    login_timeout = 5
    timeout = 180

    def setUp(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 8192:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
        super().setUp()

    async def test_floodOfSilentConnections(self) -> None:
        """2,000 TCP connections that never start TLS are all gone within
        login_timeout + 3 s, a login from another address works meanwhile, and the
        gateway's memory returns to within 20 MiB of where it started."""
        port = self.gateway.port("pop3s")
        # Warm up (first TLS context use, imports) before measuring.
        warm = await in_thread(self.logged_in_pop3)
        warm.close()
        # The test's own log capture keeps every event (and so the sessions they
        # name): it must not count as the gateway's memory.
        globalLogPublisher.removeObserver(self.gateway.events)
        await deferLater(0.5)
        before = rss_kib()
        client = FloodClient.start("tcp", port, "--count", "2000", "--source", "127.0.0.2")
        self.addCleanup(lambda: client.ended)
        self.addCleanup(client.release)
        await client.ready
        started = reactor.seconds()  # type: ignore[attr-defined]
        good = await in_thread(self.logged_in_pop3, "127.0.0.3")
        good.sendall(b"STAT\r\n")
        self.assertTrue((await in_thread(read_until, good, b"\r\n")).startswith(b"+OK"))
        good.close()
        await gone_within(self.login_timeout + CLOSED_WITHIN, local_port=port)
        self.assertLess(reactor.seconds() - started, self.login_timeout + CLOSED_WITHIN + 1)  # type: ignore[attr-defined]
        self.assertEqual(len(self.gateway.service.registry), 0)  # type: ignore[union-attr]
        await deferLater(3.0)
        grown = rss_kib() - before
        self.assertLess(grown, 20 * 1024, f"RSS grew by {grown} KiB")

    async def test_preLoginMemoryPerConnection(self) -> None:
        """An idle TLS connection that has not logged in costs the gateway less than
        32 KiB (RSS, 500 connections held by another process)."""
        port = self.gateway.port("imap4s")
        warm = await in_thread(self.logged_in_pop3)
        warm.close()
        globalLogPublisher.removeObserver(self.gateway.events)
        await deferLater(0.5)
        before = rss_kib()
        count = 500
        client = FloodClient.start("tls-idle", port, "--count", str(count), "--cafile", str(self.pki.ca_path))
        self.addCleanup(lambda: client.ended)
        self.addCleanup(client.release)
        await client.ready
        await held_within(count, 5.0, local_port=port)
        await deferLater(0.5)
        per_connection = (rss_kib() - before) / count
        self.assertLess(per_connection, 32, f"{per_connection:.1f} KiB per pre-login connection")


class DownloadAbortTests(EdgeBase):
    timeout = 240

    async def _abort_mid_download(self, rst: bool) -> None:
        upstream_port = self.dovecot.pop3_port

        def start_and_abort() -> None:
            sock = self.logged_in_pop3()
            sock.sendall(b"RETR 4\r\n")
            received = 0
            while received < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        for _ in range(10):
            await in_thread(start_and_abort)
            await gone_within(CLOSED_WITHIN, remote_port=upstream_port)
        self.assertEqual(len(self.gateway.service.registry), 0)  # type: ignore[union-attr]

    async def test_finMidDownload(self) -> None:
        """A client that closes (FIN) in the middle of a 10 MiB RETR leaves no
        upstream connection, ten times in a row."""
        await self._abort_mid_download(rst=False)

    async def test_rstMidDownload(self) -> None:
        """The same with a reset."""
        await self._abort_mid_download(rst=True)


class _SilentServer(protocol.Protocol):
    """A mail server that accepts and never says a word (what no real one does)."""


class SlowUpstreamTests(EdgeBase):
    login_timeout = 2

    async def test_loginTimeoutDuringUpstreamLogin(self) -> None:
        """login_timeout firing while the mail server does not answer the login:
        the session leaves the registry, and neither the client's connection (no
        CLOSE-WAIT) nor the one to the server is left on the gateway's side."""
        factory = protocol.Factory.forProtocol(_SilentServer)
        silent = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
        self.addCleanup(silent.stopListening)
        silent_port = int(silent.getHost().port)  # type: ignore[attr-defined]
        await self.gateway.stop()
        # POP3 only: the SMTP proxy would read its default server's EHLO there too.
        self.gateway = start_gateway(
            self,
            self.pki,
            VPN_USERS,
            {"default_server": {"host": "127.0.0.1", "port": silent_port, "tls": "none"}, "login_timeout": 2},
            group_policy=POLICIES,
        )
        port = self.gateway.port("pop3s")

        def login() -> Any:
            sock = tls_connect(port, self.pki.ca_path)
            read_until(sock, b"\r\n")
            sock.sendall(b"USER alice\r\nPASS alice-mail\r\n")
            return sock

        sock = await in_thread(login)
        self.addCleanup(sock.close)
        await deferLater(0.5)
        self.assertEqual(len(held_sockets(remote_port=silent_port)), 1)
        await gone_within(self.login_timeout + CLOSED_WITHIN, local_port=port, remote_port=client_port(sock))
        await gone_within(CLOSED_WITHIN, remote_port=silent_port)
        self.assertEqual(len(self.gateway.service.registry), 0)  # type: ignore[union-attr]
        sock.settimeout(5)
        self.assertIn(b"-ERR", await in_thread(read_until, sock, b"timeout"))


class SpellingTests(EdgeBase):
    timeout = 240

    async def test_caseSpellingsOfAServerCostNoMemory(self) -> None:
        """128 case spellings of an allowed server name (with the system trust store,
        which costs about a megabyte per TLS client object) grow the gateway by less
        than 16 MiB: the upstream TLS objects are keyed by the configured name."""
        await self.gateway.stop()
        upstream = {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "starttls"}
        self.gateway = self.start(default_server=upstream)
        port = self.gateway.port("pop3s")
        spellings = []
        for n in range(128):
            name = "".join(c.upper() if n >> i & 1 else c for i, c in enumerate("localhost"))
            spellings.append(name + ("." if n >= 64 * 2 else ""))

        def login(server: str) -> bytes:
            sock = tls_connect(port, self.pki.ca_path)
            with sock:
                read_until(sock, b"\r\n")
                sock.sendall(f"USER alice@{server}\r\nPASS alice-mail\r\n".encode())
                read_until(sock, b"\r\n")
                return read_until(sock, b"\r\n")

        # The system store does not know Dovecot's test CA: each login fails
        # (temporarily), after the TLS client object was made.
        first = await in_thread(login, "localhost")
        self.assertIn(b"[SYS/TEMP]", first)
        await deferLater(0.2)
        before = rss_kib()
        for name in spellings:
            await in_thread(login, name)
        grown = rss_kib() - before
        self.assertLess(grown, 16 * 1024, f"RSS grew by {grown} KiB for 128 spellings")
