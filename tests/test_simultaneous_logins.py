"""Simultaneous logins count logins, not connections [5.5], with real IMAP clients
against a real Dovecot: the connections of one user from one address over one
protocol are one login."""

from __future__ import annotations

from typing import Any

from tests.edge import client_port, gone_within, in_thread, read_until, tls_connect
from tests.sockets import held_sockets
from tests.test_edge_close import EdgeBase


class LoginsNotConnectionsTests(EdgeBase):
    def imap_login(self, source: str, user: str = "alice", password: str = "alice-mail") -> Any:  # noqa: S107
        sock = tls_connect(self.gateway.port("imap4s"), self.pki.ca_path, source=source)
        read_until(sock, b"\r\n")
        sock.sendall(f"a LOGIN {user} {password}\r\n".encode())
        answer = read_until(sock, b"a OK")
        assert b"a OK" in answer, answer
        return sock

    async def _five(self, sources: list[str]) -> list[Any]:
        sockets = []
        for source in sources:
            sock = await in_thread(self.imap_login, source)
            self.addCleanup(sock.close)
            sockets.append(sock)
        return sockets

    async def test_fiveConnectionsOneLogin(self) -> None:
        """Five IMAP connections of alice from one address (Thunderbird's way) under
        simultaneous_logins = 3 all stay open, and C{sessions} shows them as one
        login."""
        sockets = await self._five(["127.0.0.2"] * 5)
        port = self.gateway.port("imap4s")
        for sock in sockets:
            sock.sendall(b"n NOOP\r\n")
            self.assertIn(b"n OK", await in_thread(read_until, sock, b"n OK"))
            self.assertEqual(len(held_sockets(local_port=port, remote_port=client_port(sock))), 1)
        logins = {info.login_id for info in self.gateway.service.registry}  # type: ignore[union-attr]
        self.assertEqual(len(logins), 1)

    async def test_fiveAddressesLeaveThreeLogins(self) -> None:
        """The same from five addresses are five logins: three remain, and each
        logged-off connection got C{* BYE} and is gone on the gateway's side."""
        sockets = await self._five([f"127.0.0.{n}" for n in range(1, 6)])
        port = self.gateway.port("imap4s")
        for sock in sockets[:2]:
            await gone_within(3.0, local_port=port, remote_port=client_port(sock))
            sock.settimeout(5)
            self.assertIn(b"* BYE", await in_thread(read_until, sock, b"BYE"))
        for sock in sockets[2:]:
            sock.sendall(b"n NOOP\r\n")
            self.assertIn(b"n OK", await in_thread(read_until, sock, b"n OK"))

    async def test_logOffClosesEveryConnectionOfTheLogin(self) -> None:
        """Logging off a login closes all of its connections, each with C{* BYE}:
        bob (simultaneous_logins = 1) with two connections from one address, then a
        login from another address."""
        first = [await in_thread(self.imap_login, "127.0.0.2", "bob", "bob-mail") for _ in range(2)]
        for sock in first:
            self.addCleanup(sock.close)
        other = await in_thread(self.imap_login, "127.0.0.3", "bob", "bob-mail")
        self.addCleanup(other.close)
        port = self.gateway.port("imap4s")
        for sock in first:
            await gone_within(3.0, local_port=port, remote_port=client_port(sock))
            sock.settimeout(5)
            self.assertIn(b"* BYE", await in_thread(read_until, sock, b"BYE"))
