"""The POP3S proxy end to end: a real Dovecot behind the gateway, real clients (curl,
poplib, raw TLS sockets) in front of it.  Clients run in threads or subprocesses so the
reactor the gateway runs in stays free."""

from __future__ import annotations

import poplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, deferLater, start_gateway
from tests.servers.base import free_port
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI

T = TypeVar("T")

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail"}
#: VPN users of the gateway's local group: (password, group policy)
VPN_USERS: dict[str, tuple[str, str | None]] = {
    "alice": ("alice-mail", None),  # same password serves both
    "jdoe": ("jdoe-vpn", None),
    "bob": ("bob-mail", "Solo"),
}
POLICIES = [
    {"name": "DfltGrpPolicy", "simultaneous_logins": 3},
    {"name": "Solo", "simultaneous_logins": 1},
]


def in_thread(f: Callable[..., T], *args: Any) -> Any:
    return threads.deferToThread(f, *args)


class POP3IntegrationBase(TestCase):
    timeout = 120
    pop3s_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=MAIL_USERS)
        self.messages = self.dovecot.seed_standard("alice")
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        self.gateway = self.start(self.pop3s_options)

    def start(self, options: dict[str, Any], upstream: dict[str, Any] | None = None) -> Gateway:
        pop3s = {
            "default_server": upstream
            or {
                "host": "127.0.0.1",
                "port": self.dovecot.pop3_port,
                "tls": "starttls",
                "ca": str(self.dovecot.ca_path),
            },
            "allowed_servers": ["localhost"],
            **options,
        }
        return start_gateway(self, self.pki, VPN_USERS, pop3s, group_policy=POLICIES)

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        return context

    def pop3s(self, gateway: Gateway | None = None) -> poplib.POP3_SSL:
        gateway = gateway or self.gateway
        return poplib.POP3_SSL("127.0.0.1", gateway.port(), context=self.client_context(), timeout=30)

    async def curl(self, *args: str) -> tuple[bytes, bytes, int]:
        out, err, code = await getProcessOutputAndValue(
            "curl", ["--silent", "--show-error", "--max-time", "30", "--cacert", str(self.pki.ca_path), *args]
        )
        return out, err, code


    async def failing_login(self, user: str, password: str, gateway: Gateway | None = None) -> str:
        """A USER/PASS login in a thread; the -ERR text, or "accepted"."""

        def attempt() -> str:
            client = self.pop3s(gateway)
            try:
                client.user(user)
                client.pass_(password)
            except poplib.error_proto as e:
                return str(e)
            finally:
                client.quit()
            return "accepted"

        return str(await in_thread(attempt))


class CurlAndPoplibTests(POP3IntegrationBase):
    async def test_curlListsAndRetrieves(self) -> None:
        """curl pop3s:// through the gateway lists the mailbox and retrieves a message
        byte-identical."""
        url = f"pop3s://127.0.0.1:{self.gateway.port()}/"
        out, err, code = await self.curl("-u", "alice:alice-mail", url)
        self.assertEqual(code, 0, err)
        listing = out.decode().split("\r\n")
        self.assertEqual(len([line for line in listing if line]), len(self.messages))
        self.assertEqual(listing[0].split()[0], "1")
        out, err, code = await self.curl("-u", "alice:alice-mail", url + "1")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, self.messages[0])

    async def test_poplibStlsBigMessage(self) -> None:
        """poplib over the STLS port retrieves the 10 MB message byte-identical."""
        port = self.gateway.port(implicit=False)
        big_index = max(range(len(self.messages)), key=lambda i: len(self.messages[i]))

        def fetch() -> bytes:
            client = poplib.POP3("127.0.0.1", port, timeout=60)
            try:
                client.stls(self.client_context())
                client.user("alice")
                client.pass_("alice-mail")
                _, lines, _ = client.retr(big_index + 1)
                return b"\r\n".join(lines) + b"\r\n"
            finally:
                client.quit()

        body = await in_thread(fetch)
        self.assertGreaterEqual(len(self.messages[big_index]), 10 * 1024 * 1024)
        self.assertEqual(body, self.messages[big_index])

    async def test_plaintextLoginRefusedBeforeStls(self) -> None:
        """On the plaintext port, USER before STLS gets -ERR (allow_plaintext_auth off)."""
        port = self.gateway.port(implicit=False)

        def attempt() -> str:
            client = poplib.POP3("127.0.0.1", port, timeout=30)
            try:
                client.user("alice")
            except poplib.error_proto as e:
                return str(e)
            finally:
                client.quit()
            return "accepted"

        answer = await in_thread(attempt)
        self.assertIn("Plaintext authentication is disabled", answer)

    async def test_pipelinedAfterStlsDiscarded(self) -> None:
        """Commands pipelined after STLS in the same write are not executed: after
        the handshake the first answer is to the client's next command."""
        port = self.gateway.port(implicit=False)
        context = self.client_context()

        def inject() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                reader = raw.makefile("rb")
                reader.readline()  # greeting
                raw.sendall(b"STLS\r\nUSER alice\r\nPASS alice-mail\r\n")
                stls_answer = reader.readline()
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"NOOP\r\n")
                    first = tls.makefile("rb").readline()
                return stls_answer, first

        stls_answer, first = await in_thread(inject)
        self.assertTrue(stls_answer.startswith(b"+OK"))
        self.assertEqual(first, b"-ERR Not logged in.\r\n")
        self.assertEqual([e for e in self.gateway.events if "logged in as" in str(e.get("log_format"))], [])

    async def test_vpnSyntaxSplitPasswords(self) -> None:
        """vpnuser:mailuser@server with vpnpass:mailpass: VPN user checked by the
        local group, mail user logged in at the allowed named server."""

        def login() -> tuple[bytes, Any]:
            client = self.pop3s()
            try:
                client.user("jdoe:alice@localhost")
                answer = client.pass_("jdoe-vpn:alice-mail")
                return answer, client.stat()
            finally:
                client.quit()

        answer, stat = await in_thread(login)
        self.assertTrue(answer.startswith(b"+OK"))
        self.assertEqual(stat[0], len(self.messages))
        logins = [e for e in self.gateway.events if e.get("mail_user") == "alice" and e.get("user") == "jdoe"]
        self.assertTrue(logins)
        self.assertEqual(logins[0]["upstream"], f"localhost:{self.dovecot.pop3_port}")

    async def test_serverNotAllowed(self) -> None:
        """A server not in allowed_servers is refused without connecting to it."""
        answer = await self.failing_login("alice@mail.example.net", "alice-mail")
        self.assertIn("-ERR [AUTH]", answer)
        self.assertTrue(any("is not in allowed_servers" in r for r in self.gateway.reasons()))

    async def test_wrongVpnPassword(self) -> None:
        """A wrong VPN password gets -ERR and a logged reason."""
        answer = await self.failing_login("jdoe:alice", "wrong:alice-mail")
        self.assertIn("-ERR [AUTH]", answer)
        self.assertTrue(any("wrong password" in r for r in self.gateway.reasons()))

    async def test_wrongMailPassword(self) -> None:
        """A wrong mail password (Dovecot says no) gets -ERR and a logged reason;
        no password appears in the log."""
        answer = await self.failing_login("jdoe:alice", "jdoe-vpn:not-the-mail-pw")
        self.assertIn("-ERR [AUTH]", answer)
        self.assertTrue(any("mail server rejected" in r for r in self.gateway.reasons()))
        for secret in ("jdoe-vpn", "not-the-mail-pw", "alice-mail"):
            self.assertNotIn(secret, self.gateway.log_text())


class TLSSupportModeTests(TestCase):
    """tls_support opens exactly the ports of [4.1]."""

    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(Path(self.mktemp()).absolute())

    async def listening(self, mode: str) -> tuple[bool, bool]:
        gateway = start_gateway(
            self,
            self.pki,
            VPN_USERS,
            {
                "tls_support": mode,
                "allow_plaintext_auth": mode == "disabled",
                "default_server": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
            },
            group_policy=POLICIES,
        )

        def probe(port: int) -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError:
                return False
            return True

        implicit = await in_thread(probe, gateway.port(implicit=True))
        plain = await in_thread(probe, gateway.port(implicit=False))
        return implicit, plain

    async def test_enabled(self) -> None:
        """enabled: implicit-TLS and plaintext (STLS) ports."""
        self.assertEqual(await self.listening("enabled"), (True, True))

    async def test_required(self) -> None:
        """required: the implicit-TLS port only."""
        self.assertEqual(await self.listening("required"), (True, False))

    async def test_disabled(self) -> None:
        """disabled: the plaintext port only, STLS not offered."""
        self.assertEqual(await self.listening("disabled"), (False, True))


class UpstreamFailureTests(POP3IntegrationBase):
    async def test_upstreamDown(self) -> None:
        """An unreachable mail server gives -ERR [SYS/TEMP] at once."""
        gateway = self.start({}, upstream={"host": "127.0.0.1", "port": free_port(), "tls": "none"})
        answer = await self.failing_login("alice", "alice-mail", gateway)
        self.assertIn("-ERR [SYS/TEMP]", answer)
        self.assertTrue(any("cannot connect" in r for r in gateway.reasons()))

    async def test_upstreamCertificateNotTrusted(self) -> None:
        """A mail server whose certificate fails verification gives -ERR [SYS/TEMP]."""
        other = TestPKI(Path(self.mktemp()).absolute())
        gateway = self.start(
            {},
            upstream={
                "host": "127.0.0.1",
                "port": self.dovecot.pop3s_port,
                "tls": "implicit",
                "ca": str(other.ca_path),
            },
        )
        answer = await self.failing_login("alice", "alice-mail", gateway)
        self.assertIn("-ERR [SYS/TEMP]", answer)

    async def test_upstreamImplicitTLS(self) -> None:
        """tls = "implicit" with the right CA logs in over POP3S."""
        gateway = self.start(
            {},
            upstream={
                "host": "127.0.0.1",
                "port": self.dovecot.pop3s_port,
                "tls": "implicit",
                "ca": str(self.dovecot.ca_path),
            },
        )

        def stat() -> Any:
            client = self.pop3s(gateway)
            try:
                client.user("alice")
                client.pass_("alice-mail")
                return client.stat()
            finally:
                client.quit()

        self.assertEqual((await in_thread(stat))[0], len(self.messages))

class SessionRulesTests(POP3IntegrationBase):
    pop3s_options = {"unauthenticated_session_limit": 2}

    async def test_floodKeepsAuthenticatedSession(self) -> None:
        """With unauthenticated_session_limit = 2, a flood of new connections closes
        the oldest unauthenticated ones and never the authenticated session."""
        context = self.client_context()
        port = self.gateway.port()
        client = await in_thread(self.pop3s)
        await in_thread(client.user, "alice")
        await in_thread(client.pass_, "alice-mail")

        def open_raw() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.recv(100)  # greeting
            return tls

        flood = [await in_thread(open_raw) for _ in range(6)]
        self.addCleanup(lambda: [s.close() for s in flood])

        def closed(s: ssl.SSLSocket) -> bool:
            s.settimeout(10)
            try:
                return s.recv(100) == b""
            except OSError:
                return True

        self.assertTrue(await in_thread(closed, flood[0]))
        self.assertTrue(await in_thread(closed, flood[3]))
        stat = await in_thread(client.stat)
        self.assertEqual(stat[0], len(self.messages))
        await in_thread(client.quit)

    async def test_simultaneousLoginsOne(self) -> None:
        """simultaneous_logins = 1: a second login of the same user logs off the
        first session (its client sees the connection close) and proceeds."""
        first = await in_thread(self.pop3s)
        await in_thread(first.user, "bob")
        await in_thread(first.pass_, "bob-mail")
        second = await in_thread(self.pop3s)
        await in_thread(second.user, "bob")
        await in_thread(second.pass_, "bob-mail")
        with self.assertRaises((poplib.error_proto, OSError, EOFError)):
            await in_thread(first.stat)
        self.assertEqual((await in_thread(second.stat))[0], 0)
        await in_thread(second.quit)
        first.close()
        await deferLater(0.05)
        self.assertEqual(reactor.running, True)


def buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds for writing (test introspection)."""
    tcp = getattr(transport, "transport", None) or transport
    offset = getattr(tcp, "offset", 0)
    return int(len(tcp.dataBuffer) - offset + tcp._tempDataLen)


class FlowControlTests(POP3IntegrationBase):
    async def test_slowClientPausesUpstream(self) -> None:
        """A client that stops reading a 10 MB RETR makes the gateway stop reading
        from the mail server instead of buffering the message; when the client reads
        again, the message arrives complete and byte-identical."""
        big_index = max(range(len(self.messages)), key=lambda i: len(self.messages[i]))
        expected = self.messages[big_index]
        context = self.client_context()
        port = self.gateway.port()
        tls = await in_thread(
            lambda: context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=60), server_hostname="localhost"
            )
        )
        self.addCleanup(tls.close)
        reader = tls.makefile("rb")

        def login_and_request() -> None:
            reader.readline()
            tls.sendall(b"USER alice\r\nPASS alice-mail\r\n")
            reader.readline()
            reader.readline()
            tls.sendall(b"RETR %d\r\n" % (big_index + 1))

        await in_thread(login_and_request)
        sessions = self.gateway.service.registry.sessions("pop3")  # type: ignore[union-attr]
        relay = sessions[0].owner.relay  # type: ignore[attr-defined,union-attr]
        upstream_tcp = relay._server
        client_transport = relay._client
        paused = False
        most = 0
        for _ in range(500):
            await deferLater(0.01)
            most = max(most, buffered(client_transport))
            if upstream_tcp not in reactor.getReaders():  # type: ignore[attr-defined]
                paused = True
                break
        self.assertTrue(paused, "the gateway kept reading from the mail server")
        for _ in range(20):
            await deferLater(0.01)
            most = max(most, buffered(client_transport))
        self.assertLess(most, 2 * 1024 * 1024)
        self.assertLess(sessions[0].bytes_to_client, len(expected))

        def read_all() -> bytes:
            status = reader.readline()
            assert status.startswith(b"+OK"), status
            lines = []
            while True:
                line = reader.readline()
                if line == b".\r\n":
                    break
                lines.append(line[1:] if line.startswith(b"..") else line)
            tls.sendall(b"QUIT\r\n")
            return b"".join(lines)

        self.assertEqual(await in_thread(read_all), expected)


class ProxyProtocolTests(TestCase):
    """PROXY protocol headers are accepted only on interfaces configured for them [4.8]."""

    timeout = 60

    async def session_after_header(self, proxy_protocol: bool) -> tuple[bytes, str]:
        pki = TestPKI(Path(self.mktemp()).absolute())
        gateway = start_gateway(
            self,
            pki,
            VPN_USERS,
            {
                "allow_plaintext_auth": True,
                "default_server": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
            },
            interface=[{"name": "lb", "address": "127.0.0.1", "proxy_protocol": proxy_protocol}],
            group_policy=POLICIES,
        )
        port = gateway.port(implicit=False)

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 110\r\n")
                reader = raw.makefile("rb")
                first = reader.readline()
                raw.sendall(b"QUIT\r\n")
                return first + reader.readline()

        clients: list[str] = []

        def record() -> None:
            clients.extend(s.client for s in gateway.service.registry)  # type: ignore[union-attr]

        answer = await in_thread(talk)
        record()
        return answer, " ".join(clients) or " ".join(
            str(e.get("client")) for e in gateway.events if e.get("client")
        )

    async def test_configuredInterfaceTakesClientAddress(self) -> None:
        """On a proxy_protocol interface the session's client is the one the header
        names, and the header is not seen as a command."""
        answer, clients = await self.session_after_header(True)
        self.assertTrue(answer.startswith(b"+OK POP3 gateway ready."), answer)
        self.assertIn("203.0.113.9:40001", clients)

    async def test_otherInterfaceTreatsHeaderAsCommand(self) -> None:
        """Elsewhere a PROXY line is just an unknown command from the real peer."""
        answer, clients = await self.session_after_header(False)
        self.assertEqual(answer, b"+OK POP3 gateway ready.\r\n-ERR Invalid command.\r\n")
        self.assertNotIn("203.0.113.9", clients)
