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
from twisted.internet.abstract import FileDescriptor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from mailgw.proxy.registry import SessionInfo
from tests.gateway import Gateway, deferLater, start_gateway
from tests.rawclient import SMALL_BUFFER, RawClient
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


def open_greeted(port: int, context: ssl.SSLContext | None = None) -> RawClient:
    """A raw client connection (implicit TLS with C{context}) that has read the greeting."""
    client = RawClient.open(port, context)
    client.read_line()
    return client


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether C{predicate} becomes true within C{timeout} seconds (polled)."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await deferLater(0.02)
    return predicate()


async def assert_flood_evicts_oldest(
    testcase: TestCase,
    gateway: Gateway,
    protocol: str,
    open_client: Callable[[], RawClient],
    count: int,
    probe: bytes,
) -> None:
    """Open C{count} unauthenticated connections one after the other, with the proxy's
    C{unauthenticated_session_limit} at 2 and one authenticated session open [4.4]:
    the C{count} - 2 oldest must be closed by the gateway (end of file or reset, never
    a mere silence), the 2 newest must stay open and answer C{probe}, and the
    registry must hold the survivors and none of the evicted."""
    registry = gateway.service.registry  # type: ignore[union-attr]
    flood: list[RawClient] = []

    def close_all() -> None:
        for c in flood:
            c.close()

    testcase.addCleanup(close_all)
    for _ in range(count):
        flood.append(await in_thread(open_client))
    evicted, survivors = flood[:-2], flood[-2:]

    closed = [await in_thread(c.is_closed, 10.0) for c in evicted]
    testcase.assertEqual(closed, [True] * len(evicted), "the oldest unauthenticated sessions were not closed")
    still_open = [await in_thread(c.is_open, 1.0) for c in survivors]
    testcase.assertEqual(still_open, [True, True], "a newer session was closed")
    for c in survivors:
        answer = await in_thread(c.command, probe)
        testcase.assertFalse(answer.startswith((b"-ERR", b"* BYE", b"421")), answer)

    def live() -> set[str]:
        return {s.client for s in registry.sessions(protocol)}

    evicted_addresses = {c.client_address for c in evicted}
    # Gone from the registry at once, or at the latest when the close completes.
    await wait_for(lambda: not (live() & evicted_addresses))
    testcase.assertEqual(live() & evicted_addresses, set(), "evicted sessions are still registered")
    testcase.assertLessEqual({c.client_address for c in survivors}, live())
    states = sorted(s.state.value for s in registry.sessions(protocol))
    testcase.assertEqual(states, ["authenticated", "unauthenticated", "unauthenticated"])


def assert_discarded(testcase: TestCase, gateway: Gateway, count: int) -> None:
    """The gateway logged that C{count} bytes pipelined after STARTTLS were discarded,
    and nobody logged in [4.1]."""
    discarded = [e.get("count") for e in gateway.events if "pipelined after STARTTLS" in str(e.get("log_format"))]
    testcase.assertEqual(discarded, [count])
    testcase.assertEqual([e for e in gateway.events if "logged in as" in str(e.get("log_format"))], [])


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
        the handshake the first answer is to the client's next command, nobody logs
        in, and the log says how many bytes were discarded."""
        port = self.gateway.port(implicit=False)
        injected = b"USER alice\r\nPASS alice-mail\r\n"

        def inject() -> tuple[bytes, bytes]:
            client = open_greeted(port)
            try:
                client.send(b"STLS\r\n" + injected)
                stls_answer = client.read_line()
                client.start_tls(self.client_context())
                return stls_answer, client.command(b"NOOP")
            finally:
                client.close()

        stls_answer, first = await in_thread(inject)
        self.assertTrue(stls_answer.startswith(b"+OK"), stls_answer)
        self.assertEqual(first, b"-ERR Not logged in.\r\n")
        assert_discarded(self, self.gateway, len(injected))

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
        """With unauthenticated_session_limit = 2, a flood of six connections closes
        exactly the four oldest unauthenticated ones (their clients read end of file,
        the registry forgets them); the two newest stay open and answer, and the
        authenticated session goes on."""
        client = await in_thread(self.pop3s)
        await in_thread(client.user, "alice")
        await in_thread(client.pass_, "alice-mail")
        await assert_flood_evicts_oldest(
            self, self.gateway, "pop3", lambda: open_greeted(self.gateway.port(), self.client_context()), 6, b"CAPA"
        )
        stat = await in_thread(client.stat)
        self.assertEqual(stat[0], len(self.messages))
        await in_thread(client.quit)

    async def test_simultaneousLoginsOne(self) -> None:
        """simultaneous_logins = 1: a second login of the same user (from another
        address: one address is one login [5.5]) logs off the first session (its
        client sees the connection close) and proceeds."""
        first = await in_thread(self.pop3s)
        await in_thread(first.user, "bob")
        await in_thread(first.pass_, "bob-mail")
        context = self.client_context()

        class FromOtherAddress(poplib.POP3_SSL):
            def _create_socket(self, timeout: float) -> socket.socket:
                raw = socket.create_connection((self.host, self.port), timeout, source_address=("127.0.0.2", 0))
                return context.wrap_socket(raw, server_hostname=self.host)

        second = await in_thread(FromOtherAddress, "127.0.0.1", self.gateway.port(), None, None, 30, context)
        await in_thread(second.user, "bob")
        await in_thread(second.pass_, "bob-mail")
        with self.assertRaises((poplib.error_proto, OSError, EOFError)):
            await in_thread(first.stat)
        self.assertEqual((await in_thread(second.stat))[0], 0)
        await in_thread(second.quit)
        first.close()
        await deferLater(0.05)
        self.assertEqual(reactor.running, True)


#: what a relay may hold for a peer that does not read: kernel buffers on both sides
#: plus Twisted's write buffer -- far less than the 10 MB message the tests move
STALL_BOUND = 1024 * 1024


def tcp_of(transport: Any) -> FileDescriptor:
    """The TCP connection under a transport (a TLSMemoryBIOProtocol wraps one)."""
    while not isinstance(transport, FileDescriptor):
        transport = transport.transport
    return transport


def reading(transport: Any) -> bool:
    """Whether the reactor reads from the TCP connection under C{transport}."""
    return tcp_of(transport) in reactor.getReaders()  # type: ignore[attr-defined]


def shrink_send_buffer(transport: Any) -> None:
    """Give the gateway's socket under C{transport} a small kernel send buffer (it is
    autotuned up to C{net.ipv4.tcp_wmem}, megabytes that would hide a missing pause)."""
    tcp_of(transport).socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)  # type: ignore[attr-defined]


def relay_of(gateway: Gateway, protocol: str) -> tuple[SessionInfo, Any]:
    """The one relaying session of C{protocol} and its relay."""
    sessions = [
        s
        for s in gateway.service.registry.sessions(protocol)  # type: ignore[union-attr]
        if getattr(s.owner, "relay", None) is not None
    ]
    assert len(sessions) == 1, sessions
    return sessions[0], sessions[0].owner.relay  # type: ignore[attr-defined,union-attr]


async def assert_stalled(testcase: TestCase, relayed: Callable[[], int], source: Any, total: int) -> None:
    """The receiving side stopped reading [4.6]: two seconds later the bytes relayed
    towards it (C{relayed}) no longer grow, stay far below the C{total} to send, and the
    gateway no longer reads from the sending side (the transport C{source}), which is
    still connected.  Without flow control the gateway would read everything."""
    await deferLater(2.0)
    settled = relayed()
    await deferLater(0.5)
    testcase.assertEqual(relayed(), settled, "the gateway keeps relaying to a side that does not read")
    testcase.assertLess(settled, min(STALL_BOUND, total // 2), "the gateway buffered what the peer did not read")
    testcase.assertTrue(tcp_of(source).connected)
    testcase.assertFalse(reading(source), "the gateway keeps reading from the sending side")


def unstuff(lines: bytes) -> bytes:
    """A POP3 multi-line body (without its terminating dot line), dot-unstuffed."""
    return b"".join(line[1:] if line.startswith(b"..") else line for line in lines.splitlines(keepends=True))


class FlowControlTests(POP3IntegrationBase):
    async def test_slowClientPausesUpstream(self) -> None:
        """A client that stops reading a 10 MB RETR makes the gateway stop reading
        from the mail server instead of buffering the message; when the client reads
        again, the message arrives complete and byte-identical."""
        big_index = max(range(len(self.messages)), key=lambda i: len(self.messages[i]))
        expected = self.messages[big_index]
        port = self.gateway.port()

        def login() -> RawClient:
            # A small receive buffer: the kernel must not swallow the message either.
            client = RawClient.open(port, self.client_context(), timeout=60, receive_buffer=SMALL_BUFFER)
            client.read_line()
            client.send(b"USER alice\r\nPASS alice-mail\r\n")
            client.read_line()
            client.read_line()
            return client

        client: RawClient = await in_thread(login)
        self.addCleanup(client.close)
        info, relay = relay_of(self.gateway, "pop3")
        shrink_send_buffer(relay._client)
        await in_thread(client.send, b"RETR %d\r\n" % (big_index + 1))
        await assert_stalled(self, lambda: info.bytes_to_client, relay._server, len(expected))

        def read_all() -> tuple[bytes, bytes]:
            status = client.read_line()
            body = client.read_until(b"\r\n.\r\n")[: -len(b".\r\n")]
            client.command(b"QUIT")
            return status, unstuff(body)

        status, body = await in_thread(read_all)
        self.assertTrue(status.startswith(b"+OK"), status)
        self.assertEqual(len(body), len(expected))
        self.assertEqual(body, expected)


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
        self.assertTrue(answer.startswith(b"+OK mailgw-test POP3 gateway ready."), answer)
        self.assertIn("203.0.113.9:40001", clients)

    async def test_otherInterfaceTreatsHeaderAsCommand(self) -> None:
        """Elsewhere a PROXY line is just an unknown command from the real peer."""
        answer, clients = await self.session_after_header(False)
        self.assertEqual(answer, b"+OK mailgw-test POP3 gateway ready.\r\n-ERR Invalid command.\r\n")
        self.assertNotIn("203.0.113.9", clients)
