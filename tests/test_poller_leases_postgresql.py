"""Poller account leases across gateways [11], with a real PostgreSQL 15 as the shared
state, a real Dovecot as the remote mailbox and the poller SMTP sink: two gateways
(distinct node names and store connections; one of them a process of its own,
:mod:`tests.servers.poller_gateway`) polling one mailbox of many messages deliver each
message exactly once, never poll it at the same time, and poll it about once per
interval between them (not once each: the lease is kept until the next poll is due);
the gateway holding the lease
dying with SIGKILL in the middle of the mailbox has the account taken over within one
interval, still exactly once; the database down while acquiring skips the round."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailgw.poller.service import PollerService
from mailgw.state.postgresql import PostgreSQLState
from mailgw.upstream import Connector
from tests.servers.dovecot import Dovecot
from tests.servers.poller_fixtures import DOMAIN, REMOTE_PASSWORD, REMOTE_USER, message, strip_trace
from tests.servers.poller_gateway import gateway_environment
from tests.servers.poller_smtp import PollerSink
from tests.servers.postgresql import PostgreSQL

ROOT = Path(__file__).resolve().parent.parent
#: the accounts' interval: a lease lasts 2 s, renewed every 0.5 s, kept after a poll
#: until 1 s after the next is due; refused: retry up to 0.5 s after it runs out
INTERVAL = 4
#: how long the scheduled test runs (from the gateways' start to their stop)
RUN = 6 * INTERVAL


class _Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()
        self.ended_at = 0.0

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        assert isinstance(value, ProcessDone | ProcessTerminated)
        self.ended_at = time.time()
        self.ended.callback((value.exitCode, value.signal))


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def poll_spans(messages: list[tuple[float, str]]) -> list[tuple[float, float]]:
    """The (start, end) times of the polls in a gateway's log (time, message text)."""
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for when, text in messages:
        if text.startswith("Polling account"):
            start = when
        elif text.startswith("Poll of account") and start is not None:
            spans.append((start, when))
            start = None
    return spans


class GatewaysTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.postgres = PostgreSQL.shared(self)
        _, self.dsn = self.postgres.fresh_schema(self)
        self.dovecot = Dovecot.started(self, users={REMOTE_USER: REMOTE_PASSWORD})
        self.sink = PollerSink.started(self)
        self.folder = Path(self.mktemp()).absolute()
        # One poller.key for all the gateways: each decrypts the accounts' passwords.
        self.state_dir = self.folder / "state"
        self.state_dir.mkdir(mode=0o700, parents=True)
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    async def store(self) -> PostgreSQLState:
        store = PostgreSQLState(self.dsn, reactor, password_file=self.postgres.password_file)
        await store.start()
        self.addCleanup(store.close)
        return store

    async def gateway(self, node: str) -> PollerService:
        """A gateway in this process, with its own store connections (not started)."""
        service = PollerService(
            gateway_environment(self.state_dir, self.sink.host, self.sink.port, node, INTERVAL),
            await self.store(),
            Connector(reactor),
            reactor,
        )

        def stop() -> defer.Deferred[None] | None:
            return service.stopService() if service.running else None

        self.addCleanup(stop)
        return service

    async def add_account(self, service: PollerService) -> int:
        account = await service.accounts.add(
            {
                "host": "127.0.0.1",
                "port": self.dovecot.pop3s_port,
                "tls": "implicit",
                "ca": str(self.dovecot.ca_path),
                "username": REMOTE_USER,
                "password": REMOTE_PASSWORD,
                "domain": DOMAIN,
            }
        )
        return int(account["id"])

    def deliver(self, count: int) -> list[bytes]:
        mails = [message([("To", f"user{n % 3}@{DOMAIN}")]) for n in range(count)]
        for data in mails:
            self.dovecot.deliver(REMOTE_USER, data)
        return mails

    def remote_count(self) -> int:
        maildir = self.dovecot.maildir(REMOTE_USER)
        return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())

    def assertExactlyOnce(self, mails: list[bytes]) -> None:
        """Every message reached the SMTP sink once, and nothing else did."""
        got: Counter[bytes] = Counter()
        for received in self.sink.messages:
            assert received.data is not None
            got[strip_trace(received.data)[1]] += 1
        self.assertEqual({m: got[m] for m in mails}, dict.fromkeys(mails, 1))
        self.assertEqual(sum(got.values()), len(mails))

    async def until(self, condition: Any, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"not within {seconds} s: {what}")
            await sleep(0.05)

    def spawn(self, node: str, log: Path, *extra: str) -> _Child:
        """A gateway in a process of its own (L{tests.servers.poller_gateway})."""
        args = [
            sys.executable,
            "-m",
            "tests.servers.poller_gateway",
            "--dsn",
            self.dsn,
            "--password-file",
            str(self.postgres.password_file),
            "--state",
            str(self.state_dir),
            "--smtp",
            f"{self.sink.host}:{self.sink.port}",
            "--node-name",
            node,
            "--interval",
            str(INTERVAL),
            "--log",
            str(log),
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        child = _Child()
        process = reactor.spawnProcess(child, sys.executable, args, env=env, path=str(ROOT))  # type: ignore[attr-defined]

        def reap() -> defer.Deferred[Any] | None:
            if child.ended.called:
                return None
            process.signalProcess("KILL")
            return child.ended

        self.addCleanup(reap)
        return child

    def child_log(self, log: Path) -> list[dict[str, Any]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def child_messages(self, log: Path) -> list[tuple[float, str]]:
        return [(datetime.fromisoformat(e["time"]).timestamp(), e["message"]) for e in self.child_log(log)]

    def own_messages(self) -> list[tuple[float, str]]:
        return [(float(e["log_time"]), formatEvent(e)) for e in self.events]

    def own(self, kind: str, node: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self.events if e.get("kind") == kind and e.get("node") == node]

    # -- the tests ---------------------------------------------------------------------

    async def test_checkNowOnBoth(self) -> None:
        """Both gateways asked to poll at the same moment: one polls (holding the
        lease), the other answers that it is being polled by the first; every message
        is delivered once; the next round goes to whichever comes first."""
        a, b = await self.gateway("gw-a"), await self.gateway("gw-b")
        account = await self.add_account(a)
        mails = self.deliver(12)
        first = await defer.gatherResults([a.poll(account), b.poll(account)])
        polled = [r for r in first if r.ok]
        refused = [r for r in first if not r.ok]
        self.assertEqual((len(polled), len(refused)), (1, 1), [r.summary() for r in first])
        self.assertEqual(polled[0].delivered, 12)
        self.assertRegex(refused[0].error or "", r"being polled by gw-[ab] \(it holds the lease\)")
        self.assertExactlyOnce(mails)
        mails += self.deliver(6)
        second = await defer.gatherResults([b.poll(account), a.poll(account)])
        self.assertEqual(sum(r.delivered for r in second), 6)
        self.assertExactlyOnce(mails)
        self.assertEqual(self.remote_count(), 0)
        self.assertEqual(await (await self.store()).leases(), {})

    async def test_twoGatewaysScheduled(self) -> None:
        """Two gateways, one a process of its own, both running their schedule over
        one mailbox that gets 30 messages in three batches, for L{RUN} seconds: each
        message is delivered once, the remote mailbox ends empty, their polls never
        overlap in time, and there are about as many polls in all as intervals (the
        holder keeps the lease until its next poll; the other is refused); stopping
        releases the lease."""
        b = await self.gateway("gw-b")
        account = await self.add_account(b)
        log = self.folder / "gw-a.log"
        child = self.spawn("gw-a", log)
        b.startService()
        started = time.time()
        mails: list[bytes] = []
        for _ in range(3):
            mails += self.deliver(10)
            await sleep(1.5)
        await self.until(lambda: len(self.sink.messages) >= 30 and self.remote_count() == 0, 3 * INTERVAL, "all 30")
        await sleep(max(0.0, started + RUN - time.time()))
        await b.stopService()
        assert child.transport is not None
        child.transport.signalProcess("TERM")
        await child.ended
        self.assertExactlyOnce(mails)
        theirs, ours = poll_spans(self.child_messages(log)), poll_spans(self.own_messages())
        self.assertTrue(theirs or ours, child.err.decode(errors="replace")[-2000:])
        for a0, a1 in theirs:
            for b0, b1 in ours:
                self.assertFalse(a0 < b1 and b0 < a1, f"gw-a polled {a0}-{a1}, gw-b {b0}-{b1}")
        # The first poll within the first interval, then one every 0.9-1.1 interval
        # after the previous ended (the child process starts a second or so late);
        # releasing after each poll makes it about twice that.
        intervals = (time.time() - started) / INTERVAL
        total = len(theirs) + len(ours)
        self.assertLessEqual(total, intervals + 1, (theirs, ours))
        self.assertGreaterEqual(total, intervals - 3, (theirs, ours))
        released = [e for e in self.child_log(log) if e.get("kind") == "lease_released"] + [
            e for e in self.events if e.get("kind") == "lease_released"
        ]
        self.assertTrue(released)
        self.assertNotIn(account, await (await self.store()).leases())

    async def takeover(self, point: str, hit: int) -> None:
        """gw-a (a process) polls 15 messages and dies with SIGKILL at C{point} of
        message C{hit}, holding the lease; gw-b, refused while the lease runs, takes
        the account over within one interval of the death and finishes the mailbox:
        every message delivered once."""
        b = await self.gateway("gw-b")
        account = await self.add_account(b)
        mails = self.deliver(15)
        log = self.folder / "gw-a.log"
        child = self.spawn("gw-a", log, "--account", str(account), "--fault-at", point, "--fault-hit", str(hit))
        store = await self.store()

        async def held_by_a() -> bool:
            lease = (await store.leases()).get(account)
            return lease is not None and lease.node == "gw-a"

        deadline = time.monotonic() + 15
        while not await held_by_a():
            self.assertLess(time.monotonic(), deadline, child.err.decode(errors="replace")[-2000:])
            await sleep(0.02)
        refused = await b.poll(account)
        self.assertIn("being polled by gw-a", refused.error or "")
        b.startService()
        _, killed = await child.ended
        self.assertEqual(killed, signal.SIGKILL, child.err.decode(errors="replace")[-2000:])
        self.assertGreater(self.remote_count(), 0)
        await self.until(
            lambda: len(self.sink.messages) >= len(mails) and self.remote_count() == 0, 2 * INTERVAL, "takeover"
        )
        taken = [e for e in self.own("lease_acquired", "gw-b") if e["log_time"] > child.ended_at]
        self.assertTrue(taken)
        # At most one lease (2 s) after the last renewal, plus one retry (2 s) after a
        # refusal; the second is for the round trips on a loaded machine.
        self.assertLessEqual(taken[0]["log_time"] - child.ended_at, INTERVAL + 1.0)
        await b.stopService()
        self.assertExactlyOnce(mails)

    async def test_takeoverDuringData(self) -> None:
        """Killed during the DATA of the 6th message (its end never sent): gw-b
        delivers it, and deletes the first five without delivering them again."""
        await self.takeover("during_data", 6)

    async def test_takeoverAfterCommit(self) -> None:
        """Killed after the journal commit of the 8th message, before its DELE: gw-b
        deletes the first eight without delivering them again."""
        await self.takeover("after_commit", 8)

    async def test_databaseDownWhileAcquiring(self) -> None:
        """PostgreSQL stopped: a poll answers at once that the round is skipped (one
        lease_unavailable event, the password never logged) and the account stays
        scheduled; PostgreSQL back: the next poll works, without a restart."""
        a = await self.gateway("gw-a")
        account = await self.add_account(a)
        mails = self.deliver(3)
        await sleep(0.5)  # the rescheduling that follows the account's creation reads it
        self.postgres.stop()
        try:
            started = time.monotonic()
            report = await a.poll(account)
            self.assertLess(time.monotonic() - started, 10)
        finally:
            self.postgres.start()
        self.assertIn("state database unavailable", report.error or "")
        self.assertEqual(len([e for e in self.events if e.get("kind") == "lease_unavailable"]), 1)
        self.assertEqual(self.sink.messages, [])
        for event in self.events:
            self.assertNotIn(self.postgres.password, formatEvent(event))
        deadline = time.monotonic() + 15
        while not (report := await a.poll(account)).ok:
            self.assertLess(time.monotonic(), deadline, report.error)
            await sleep(0.2)
        self.assertEqual(report.delivered, 3)
        self.assertExactlyOnce(mails)
