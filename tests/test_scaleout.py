"""Two gateways behind HAProxy (round robin, PROXY v2), sharing a real PostgreSQL 15
[11]: simultaneous logins hold across them, each lists both gateways' sessions with the
real client address and can kill any, a SIGKILLed gateway's sessions stop counting
within 35 s, and PostgreSQL stopped makes logins answer a temporary failure, not hang,
until it is back."""

from __future__ import annotations

import poplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailgw.proxy.directory import ISessionDirectory, LocalDirectory, SharedDirectory
from tests.gateway import Gateway, deferLater, start_gateway
from tests.servers.dovecot import Dovecot
from tests.servers.haproxy import HAProxy
from tests.servers.pki import TestPKI
from tests.servers.postgresql import PostgreSQL
from tests.test_daemon import spawn_twistd
from tests.test_integration_pop3 import in_thread

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail"}
VPN_USERS: dict[str, tuple[str, str | None]] = {"alice": ("alice-mail", None), "bob": ("bob-mail", None)}
#: where the clients come from (HAProxy passes it on with PROXY v2)
CLIENT_ADDRESS = "127.0.0.7"
#: the gateways' interface for the balancer (PROXY protocol only there)
BALANCED_ADDRESS = "127.0.0.1"


class FromClientAddress(poplib.POP3_SSL):
    """poplib over TLS from C{source} (another loopback address than HAProxy's)."""

    source = CLIENT_ADDRESS

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined,no-any-return]


class DirectoryInterfaceTests(TestCase):
    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(ISessionDirectory, LocalDirectory()))
        shared = SharedDirectory(object(), None, "n", None)  # type: ignore[arg-type]
        self.assertTrue(verifyObject(ISessionDirectory, shared))


class ScaleOutTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.postgres = PostgreSQL.shared(self)
        if not self.postgres.running:
            self.postgres.start()
        self.dsn = self.postgres.fresh_database(self)
        self.dovecot = Dovecot.started(self, users=MAIL_USERS)
        self.pki = TestPKI(Path(self.mktemp()).absolute())

    def sections(self, node: str, *, balanced: bool = True) -> dict[str, Any]:
        interface = {"name": "balancer", "address": BALANCED_ADDRESS, "proxy_protocol": balanced}
        return {
            "gateway": {"node_name": node},
            "state": {
                "backend": "postgresql",
                "dsn": self.dsn,
                "dsn_password_file": str(self.postgres.password_file),
            },
            "interface": [interface],
            "group_policy": [{"name": "DfltGrpPolicy", "simultaneous_logins": 1}],
        }

    def pop3s(self) -> dict[str, Any]:
        return {
            "default_server": {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"},
            "allowed_servers": [],
        }

    async def two_gateways(self) -> tuple[Gateway, Gateway, Any, HAProxy]:
        """gw-a in this process, gw-b as twistd of its own, HAProxy in front of both."""
        a = start_gateway(self, self.pki, VPN_USERS, self.pop3s(), **self.sections("gw-a"))
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        b = Gateway(directory, self.pki, VPN_USERS)
        data = b.config_data(self.pop3s(), **self.sections("gw-b"))
        collector, process = spawn_twistd(self, b.write_config(data), directory)
        port_b = data["pop3s"]["port"]
        for _ in range(200):
            try:
                socket.create_connection((BALANCED_ADDRESS, port_b), timeout=1).close()
                break
            except OSError:
                await deferLater(0.05)
        else:
            self.fail(f"gw-b did not listen: {collector.err.decode()}")
        haproxy = HAProxy.started(
            self, backends={"pop3s": [(BALANCED_ADDRESS, a.port("pop3s")), (BALANCED_ADDRESS, port_b)]}
        )
        return a, b, process, haproxy

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        context.check_hostname = False
        return context

    def login(self, port: int, user: str = "alice", source: str = CLIENT_ADDRESS) -> poplib.POP3_SSL:
        """A logged-in POP3S client from C{source} (in a thread)."""
        kind: type[FromClientAddress] = type("Client", (FromClientAddress,), {"source": source})
        client = kind("127.0.0.1", port, context=self.context(), timeout=30)
        client.user(user)
        client.pass_(f"{user}-mail")
        return client

    @staticmethod
    def alive(client: poplib.POP3_SSL) -> bool:
        try:
            client.noop()
            return True
        except (poplib.error_proto, OSError, EOFError):
            return False

    async def sessions_of(self, gateway: Gateway) -> list[dict[str, Any]]:
        service = gateway.service
        assert service is not None
        result = service.admin_backend.sessions(None)
        return list(await result) if isinstance(result, defer.Deferred) else list(result)

    async def test_acrossGateways(self) -> None:
        """simultaneous_logins = 1 across both gateways: of six logins of one user (from
        six addresses: a login is a user from one address over one protocol [5.5]),
        spread over both by round robin, only the last stays open; sessions on either
        lists both gateways' sessions (node, real client address); kill works on the
        other gateway's session."""
        a, _, _, haproxy = await self.two_gateways()
        port = haproxy.ports["pop3s"]
        clients = []
        for i in range(6):
            clients.append(await in_thread(self.login, port, "alice", f"127.0.0.{11 + i}"))
            await deferLater(1.5)  # the other gateway takes its log-offs every second
        await deferLater(1.5)
        alive = [await in_thread(self.alive, c) for c in clients]
        self.assertEqual(alive, [False] * 5 + [True])
        bob = await in_thread(self.login, port, "bob")
        await deferLater(0.5)
        listed = await self.sessions_of(a)
        self.assertEqual(sorted(s["user"] for s in listed), ["alice", "bob"])
        self.assertEqual(
            {s["user"]: s["client"].rsplit(":", 1)[0] for s in listed}, {"alice": "127.0.0.16", "bob": CLIENT_ADDRESS}
        )
        self.assertEqual({s["node"] for s in listed}, {"gw-a", "gw-b"})
        remote = next(s for s in listed if s["node"] == "gw-b")
        service = a.service
        assert service is not None
        result = service.admin_backend.kill(remote["session_id"])
        killed = await result if isinstance(result, defer.Deferred) else result
        self.assertEqual(killed["node"], "gw-b")
        await deferLater(1.5)
        victim = bob if remote["user"] == "bob" else clients[-1]
        self.assertFalse(await in_thread(self.alive, victim))
        for c in [*clients, bob]:
            c.sock.close()

    async def test_deadGatewayStopsCounting(self) -> None:
        """SIGKILL of a gateway: its sessions no longer count (nor are listed) within
        35 s; a login elsewhere then logs nothing off on it."""
        a, _, process, haproxy = await self.two_gateways()
        port = haproxy.ports["pop3s"]
        first = await in_thread(self.login, port)
        second = await in_thread(self.login, port, "bob")
        await deferLater(0.5)
        listed = await self.sessions_of(a)
        self.assertEqual({s["node"] for s in listed}, {"gw-a", "gw-b"})
        process.signalProcess("KILL")
        started = time.monotonic()
        while time.monotonic() - started < 35:
            listed = await self.sessions_of(a)
            if {s["node"] for s in listed} == {"gw-a"}:
                break
            await deferLater(1.0)
        self.assertEqual({s["node"] for s in listed}, {"gw-a"}, f"after {time.monotonic() - started:.0f} s")
        for c in (first, second):
            c.sock.close()

    async def test_penaltyAcrossGateways(self) -> None:
        """Three wrong passwords from one address at gw-a: that address waits 4 s
        before its next attempt at gw-b too [4.10]; another address does not."""
        a = start_gateway(self, self.pki, VPN_USERS, self.pop3s(), **self.sections("gw-a", balanced=False))
        b = start_gateway(self, self.pki, VPN_USERS, self.pop3s(), **self.sections("gw-b", balanced=False))

        def attempt(port: int, source: str, password: str) -> float:
            kind: type[FromClientAddress] = type("Client", (FromClientAddress,), {"source": source})
            client = kind("127.0.0.1", port, context=self.context(), timeout=30)
            started = time.monotonic()
            try:
                client.user("alice")
                client.pass_(password)
            except poplib.error_proto:
                pass
            finally:
                client.sock.close()
            return time.monotonic() - started

        for _ in range(3):
            await in_thread(attempt, a.port("pop3s"), "127.0.0.9", "wrong")
        await deferLater(0.5)  # the failures are written asynchronously
        elsewhere = await in_thread(attempt, b.port("pop3s"), "127.0.0.9", "alice-mail")
        self.assertGreaterEqual(elsewhere, 3.5)
        other = await in_thread(attempt, b.port("pop3s"), "127.0.0.10", "alice-mail")
        self.assertLess(other, 1.5)

    async def test_databaseDown(self) -> None:
        """PostgreSQL stopped: a login answers -ERR [SYS/TEMP] within 10 s; back, logins
        work again within 40 s without restarting the gateway."""
        a = start_gateway(self, self.pki, VPN_USERS, self.pop3s(), **self.sections("gw-a", balanced=False))
        port = a.port("pop3s")
        (await in_thread(self.login, port)).sock.close()
        self.postgres.stop()
        self.addCleanup(lambda: None if self.postgres.running else self.postgres.start())
        started = time.monotonic()
        with self.assertRaises(poplib.error_proto) as raised:
            await in_thread(self.login, port)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("[SYS/TEMP]", str(raised.exception))
        self.postgres.start()
        started = time.monotonic()
        while True:
            try:
                (await in_thread(self.login, port)).sock.close()
                break
            except poplib.error_proto:
                self.assertLess(time.monotonic() - started, 40, "logins do not work again")
                await deferLater(1.0)
