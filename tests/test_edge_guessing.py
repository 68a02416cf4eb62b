"""Guessing costs the guesser [4.10]: against the running gateway with bcrypt cost-12
users (what C{mailgwctl hash-password} makes) and a real Dovecot, with the guessing
clients in another process (their CPU is not the gateway's)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.auth.limits import PenaltyTable
from mailgw.testing import TLSStringTransport
from tests.edge import FloodClient, in_thread, read_until, tls_connect
from tests.gateway import Gateway, start_gateway
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI
from tests.sockets import cpu_seconds
from tests.test_proxy_pop3 import POP3Harness, make_config

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail"}
VPN_USERS: dict[str, tuple[str, str | None]] = {
    "alice": ("alice-mail", None),
    "bob": ("bob-mail", None),
}


class GuessingTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=MAIL_USERS)
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        pop3s = {
            "default_server": {
                "host": "127.0.0.1",
                "port": self.dovecot.pop3_port,
                "tls": "starttls",
                "ca": str(self.dovecot.ca_path),
            },
        }
        self.gateway: Gateway = start_gateway(self, self.pki, VPN_USERS, pop3s, hash_cost=12, failure_delay=0.5)

    def login(self, user: str, password: str, source: str) -> tuple[float, str]:
        """A POP3 USER/PASS login from C{source} (raw TLS socket: poplib cannot
        choose its source address); (seconds until answered, "ok" or the -ERR)."""
        start = time.monotonic()
        sock = tls_connect(self.gateway.port(), self.pki.ca_path, source=source)
        with sock:
            read_until(sock, b"\r\n")
            sock.sendall(f"USER {user}\r\n".encode())
            read_until(sock, b"\r\n")
            sock.sendall(f"PASS {password}\r\n".encode())
            answer = read_until(sock, b"\r\n").decode(errors="replace").strip()
            elapsed = time.monotonic() - start
            sock.sendall(b"QUIT\r\n")
        return elapsed, "ok" if answer.startswith("+OK") else answer

    async def test_goodLoginFastWhileAnotherAddressGuesses(self) -> None:
        """While 50 clients on 127.0.0.2 guess alice's password in parallel, a correct
        login from 127.0.0.3 completes in under 2 s each time; afterwards an attempt
        from 127.0.0.2 is answered only after at least 4 s (the penalty)."""
        guessers = FloodClient.start(
            "guess", self.gateway.port(), "--count", "50", "--source", "127.0.0.2",
            "--cafile", str(self.pki.ca_path), "--seconds", "12",
        )
        self.addCleanup(lambda: guessers.ended)
        timings = []
        for _ in range(4):
            elapsed, outcome = await in_thread(self.login, "bob", "bob-mail", "127.0.0.3")
            self.assertEqual(outcome, "ok")
            timings.append(elapsed)
        output = await guessers.ended
        self.assertIn("attempts", output)
        self.assertTrue(all(t < 2.0 for t in timings), f"good logins took {timings}")
        elapsed, outcome = await in_thread(self.login, "alice", "wrong", "127.0.0.2")
        self.assertIn("Authentication failed", outcome)
        self.assertGreaterEqual(elapsed, 4.0)

    async def test_wrongPasswordAndGoneCostsLittle(self) -> None:
        """300 connections (from 150 addresses, so the penalty hardly applies) that
        send a wrong password and close at once cost the gateway few password checks
        and little CPU: a check whose client has gone is dropped before it starts
        (only those already running when the client went are done). Without the drop
        most run their bcrypt cost-12 check (measured: 68 checks, 30 s of CPU;
        with it: 4 checks, 3 s)."""
        pool = self.gateway.service.hash_pool  # type: ignore[union-attr]
        assert pool is not None
        # Warm up (the first TLS handshakes, the thread pool).
        await in_thread(self.login, "bob", "bob-mail", "127.0.0.3")
        before, started_before = cpu_seconds(), pool.started
        client = FloodClient.start(
            "wrong-and-close", self.gateway.port(), "--count", "300", "--parallel", "10",
            "--sources", "150", "--cafile", str(self.pki.ca_path),
        )
        output = await client.ended
        self.assertIn("done", output)
        # Whatever was started or is still waiting (in the pool's queue, or in a
        # penalty delay before it) is finished or dropped by now: the pool has been
        # idle for 3 s, longer than any penalty of two failures.
        idle_since = time.monotonic()
        deadline = idle_since + 120
        while time.monotonic() - idle_since < 3.0 and time.monotonic() < deadline:
            if pool.running or pool.queued:
                idle_since = time.monotonic()
            await in_thread(time.sleep, 0.1)
        checks = pool.started - started_before
        used = cpu_seconds() - before
        self.assertLess(checks, 30, f"{checks} password checks for 300 clients that had gone")
        self.assertLess(used, 15.0, f"{used:.1f} s of CPU for 300 wrong passwords")


class PenaltyTableBoundTests(SynchronousTestCase):
    def test_boundedUnder100000Addresses(self) -> None:
        """Failed logins from 100,000 distinct addresses keep the penalty table at its
        bound, holding the most recent addresses (through the POP3 session)."""
        harness = POP3Harness(make_config())
        clock = harness.clock
        penalty = PenaltyTable(clock, max_entries=1000)
        harness.env.penalty = penalty
        for n in range(100_000):
            session = harness.session_class(harness.env, implicit_tls=True)
            address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            transport = TLSStringTransport(peerAddress=IPv4Address("TCP", address, 40000))
            session.makeConnection(transport)
            session.handshakeCompleted()
            # A syntax failure: refused without any AAA work, but counted.
            session.dataReceived(b"USER a:b@\r\nPASS x\r\n")
            clock.advance(0.001)
            session.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        self.assertEqual(len(penalty), 1000)
        self.assertGreater(penalty.delay("10.1.134.159"), 0)  # the last address
        self.assertEqual(penalty.delay("10.0.0.0"), 0)  # the first, dropped

    def test_penaltyBeforeAnyAAAWork(self) -> None:
        """A penalised address waits (1, 2, 4 … s) before its login reaches the
        checker; a success clears it."""
        harness = POP3Harness(make_config())
        penalty = PenaltyTable(harness.clock)
        harness.env.penalty = penalty
        for _ in range(3):
            penalty.failed("192.0.2.7")
        checked: list[Any] = []
        portal = harness.env.gatekeeper._portals["LOCAL"]
        checker = portal.checkers[next(iter(portal.checkers))]
        original = checker.requestAvatarId

        def counting(credentials: Any) -> Any:
            checked.append(credentials)
            return original(credentials)

        checker.requestAvatarId = counting  # type: ignore[method-assign]
        session, transport = harness.connect()
        transport.clear()
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        self.assertEqual(checked, [])
        harness.clock.advance(3.9)
        self.assertEqual(checked, [])
        harness.clock.advance(0.2)
        self.assertEqual(len(checked), 1)
