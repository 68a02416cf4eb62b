"""Poller account leases [11] with one SQLite store and a Clock: the poller takes an
account's lease before polling it, renews it during a long poll, keeps it after until
its next poll is due (releases it when it has no next poll: not started, stopping),
does not poll an account another node holds (and tries again when that lease runs
out, taking it over), and stops a poll whose lease renewal fails; two gateways on one
store poll an account about once per interval, never together, and when the holder
dies the other polls it a few seconds after it was due; a real poll (scripted POP3 server,
real SMTP sink) whose lease is lost during DATA cuts the DATA, delivers nothing more
and ends with QUIT."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mailgw.poller.leases import LeaseTiming
from mailgw.poller.poll import PollReport
from mailgw.poller.service import PollerService
from mailgw.state import AccountRecord, JournalState
from mailgw.state.sqlite import SQLiteState
from mailgw.upstream import Connector
from tests.servers.poller_fixtures import environment, message
from tests.servers.poller_pop3 import FakePop3Server
from tests.servers.poller_smtp import PollerSink

ACCOUNT = {"host": "pop.isp.example", "username": "u", "password": "p", "domain": "example.com"}
NODE = "gw-a"
TIMING = LeaseTiming(duration=100.0, renew_every=25.0, margin=30.0, retry=150.0, slack=5.0)


class Runner:
    """A poll runner whose polls the test ends (L{finish})."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Callable[[], bool]]] = []
        self.pending: dict[int, defer.Deferred[PollReport]] = {}

    def __call__(
        self,
        record: AccountRecord,
        password: str,
        progress: Callable[[PollReport], None] | None,
        stopping: Callable[[], bool],
    ) -> defer.Deferred[PollReport]:
        self.calls.append((record.id, stopping))
        d: defer.Deferred[PollReport] = defer.Deferred()
        self.pending[record.id] = d
        return d

    def finish(self, account_id: int) -> None:
        self.pending.pop(account_id).callback(PollReport(account_id, started=0.0, finished=1.0))


def capture(testcase: TestCase) -> EventLoggingObserver:
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    testcase.addCleanup(globalLogPublisher.removeObserver, events)
    return events


def kinds(events: EventLoggingObserver, kind: str) -> list[dict[str, Any]]:
    return [dict(e) for e in events if e.get("kind") == kind]


class LeaseSchedulingTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        self.clock = Clock()
        self.clock.advance(1000)
        # The store's lease clock is the test's: a lease runs out when the Clock says.
        self.state = SQLiteState(self.folder / "state.sqlite3", reactor, clock=self.clock)
        await self.state.start()
        self.addCleanup(self.state.close)
        self.runner = Runner()
        self.events = capture(self)

    def service(self, **kwargs: Any) -> PollerService:
        service = PollerService(
            environment(self.folder, "127.0.0.1", 25, NODE),
            self.state,
            Connector(reactor),
            reactor,
            clock=self.clock,
            poll_runner=self.runner,
            rng=random.Random(3),
            lease_timing=lambda interval: TIMING,
            **kwargs,
        )
        self.addCleanup(self._stop, service)
        return service

    def _stop(self, service: PollerService) -> defer.Deferred[None]:
        for account_id in list(self.runner.pending):
            self.runner.finish(account_id)
        if not service.running:
            return defer.succeed(None)
        return service.stopService()

    async def settle(self) -> None:
        """Let the state calls in flight complete (one thread, first in, first out)."""
        for _ in range(3):
            await self.state.list_accounts()

    async def test_takenRenewedReleased(self) -> None:
        """The lease is taken (for this node) before the poll, renewed every
        C{renew_every} while the poll runs, and released when it ends (the service is
        not started: no next poll to keep it for)."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        self.assertEqual([call[0] for call in self.runner.calls], [1])
        leases = await self.state.leases()
        self.assertEqual((leases[1].node, leases[1].expires), (NODE, 1000 + TIMING.duration))
        for renewal in (1, 2, 3):
            self.clock.advance(TIMING.renew_every)
            await self.settle()
            leases = await self.state.leases()
            self.assertEqual(leases[1].expires, 1000 + renewal * TIMING.renew_every + TIMING.duration)
            self.assertEqual(leases[1].acquired, 1000)
        [(_, stopping)] = self.runner.calls
        self.assertFalse(stopping())
        self.runner.finish(1)
        report = await d
        self.assertTrue(report.ok)
        self.assertEqual(await self.state.leases(), {})
        self.assertEqual(service.metrics[1].polls, 1)

    async def test_heldByAnotherNode(self) -> None:
        """An account whose lease another node holds is not polled (nothing counted);
        the next attempt comes after C{retry}; once that lease has run out the poller
        takes the account over, logging it with the previous node."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        await self.settle()
        self.assertIsNotNone(await self.state.lease_acquire(1, "gw-b", 120.0))
        report = await service.poll(1)
        self.assertEqual(self.runner.calls, [])
        self.assertIn("gw-b", report.error or "")
        self.assertNotIn(1, service.metrics)
        due = service.next_poll(1)
        assert due is not None
        # Just after gw-b's lease runs out by the lease table, not after a fixed retry.
        self.assertTrue(1000 + 120 + 0.1 * TIMING.slack <= due <= 1000 + 120 + 0.5 * TIMING.slack, due)
        self.assertEqual(kinds(self.events, "lease_held")[-1]["holder_node"], "gw-b")
        self.clock.advance(due - self.clock.seconds())  # gw-b's lease ran out meanwhile
        await self.settle()
        self.assertEqual([call[0] for call in self.runner.calls], [1])
        [taken] = kinds(self.events, "lease_taken_over")
        self.assertEqual((taken["account"], taken["node"], taken["previous_node"]), (1, NODE, "gw-b"))
        self.assertEqual((await self.state.leases())[1].node, NODE)

    async def test_notPolledWhileHeld(self) -> None:
        """While another node keeps renewing the lease, the scheduled attempts never
        poll."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        await self.settle()
        for _ in range(4):
            self.assertIsNotNone(await self.state.lease_acquire(1, "gw-b", 1000.0))
            due = service.next_poll(1)
            assert due is not None
            self.clock.advance(due - self.clock.seconds())
            await self.settle()
        self.assertEqual(self.runner.calls, [])
        self.assertGreaterEqual(len(kinds(self.events, "lease_held")), 4)

    async def test_keptUntilNextPoll(self) -> None:
        """A poll that ends (service started) keeps its lease, renewed once to run out
        C{slack} after the next poll is due; that poll takes it again (same node) and
        renews it as usual."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        self.clock.advance(10)
        self.runner.finish(1)
        await d
        await self.settle()
        due = service.next_poll(1)
        assert due is not None
        lease = (await self.state.leases())[1]
        self.assertEqual(lease.node, NODE)
        self.assertAlmostEqual(lease.expires, due + TIMING.slack)
        self.assertEqual(kinds(self.events, "lease_released"), [])
        self.assertEqual(len(kinds(self.events, "lease_kept")), 1)
        self.clock.advance(due - self.clock.seconds())
        await self.settle()
        self.assertEqual(len(self.runner.calls), 2)
        self.assertEqual((await self.state.leases())[1].expires, due + TIMING.duration)

    async def test_keptNotForLostLease(self) -> None:
        """A poll whose lease was lost does not keep it (another node may hold it):
        it is released, the next poll still scheduled."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        self.clock.advance(TIMING.duration - TIMING.margin)
        self.runner.finish(1)
        await d
        await self.settle()
        self.assertIsNotNone(service.next_poll(1))
        self.assertEqual(await self.state.leases(), {})
        self.assertEqual(kinds(self.events, "lease_kept"), [])

    async def test_internalErrorReleases(self) -> None:
        """A poll that failed on an internal error (this gateway's) releases its
        lease, so that another gateway may poll the account at its next attempt; one
        that failed for the remote side keeps it like a successful one."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        self.runner.pending.pop(1).callback(PollReport(1, started=0.0, finished=1.0, error="authentication failed"))
        self.assertFalse((await d).ok)
        await self.settle()
        self.assertIn(1, await self.state.leases())
        d = service.poll(1)
        await self.settle()
        self.runner.pending.pop(1).callback(PollReport(1, started=0.0, finished=1.0, error="internal error: KeyError"))
        await d
        await self.settle()
        self.assertEqual(await self.state.leases(), {})
        self.assertIsNotNone(service.next_poll(1))

    async def test_disabledReleases(self) -> None:
        """Disabling an account releases the lease kept for its next poll."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        self.runner.finish(1)
        await d
        await self.settle()
        self.assertIn(1, await self.state.leases())
        await service.accounts.edit(1, {"enabled": False})
        await self.settle()
        self.assertEqual(await self.state.leases(), {})
        self.assertIsNone(service.next_poll(1))

    async def test_stopReleasesKept(self) -> None:
        """Stopping the service releases the leases kept for the next polls."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        self.runner.finish(1)
        await d
        await self.settle()
        self.assertIn(1, await self.state.leases())
        await service.stopService()
        self.assertEqual(await self.state.leases(), {})
        self.assertEqual(len(kinds(self.events, "lease_released")), 1)

    async def test_renewalRefusedStopsPoll(self) -> None:
        """A renewal answering that this node no longer holds the lease stops the poll
        at once (its stopping predicate turns true) with a lease_lost event."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        [(_, stopping)] = self.runner.calls
        self.assertTrue(await self.state.lease_release(1, NODE))  # as if another node had it now
        self.clock.advance(TIMING.renew_every)
        await self.settle()
        self.assertTrue(stopping())
        [lost] = kinds(self.events, "lease_lost")
        self.assertEqual((lost["account"], lost["node"]), (1, NODE))
        self.runner.finish(1)
        await d

    async def test_renewalOverdueStopsPoll(self) -> None:
        """A renewal not confirmed C{margin} before the lease would run out stops the
        poll (the store's answer came too late to rely on)."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        [(_, stopping)] = self.runner.calls
        # One jump past the deadline: the renewal sent on the way is answered after it.
        self.clock.advance(TIMING.duration - TIMING.margin)
        self.assertTrue(stopping())
        [lost] = kinds(self.events, "lease_lost")
        self.assertIn("in time", lost["reason"])
        self.runner.finish(1)
        await d
        self.assertEqual(await self.state.leases(), {})

    async def test_databaseErrorSkipsRound(self) -> None:
        """The store failing (closed here) skips the round with one lease_unavailable
        event, and the account stays scheduled for the next interval."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        await self.settle()
        await self.state.close()
        report = await service.poll(1)
        self.assertIn("state database", report.error or "")
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(len(kinds(self.events, "lease_unavailable")), 1)
        due = service.next_poll(1)
        assert due is not None
        self.assertGreater(due - self.clock.seconds(), 0.8 * 300)

    async def test_stopReleases(self) -> None:
        """Stopping the service ends the running poll and releases its lease."""
        service = self.service()
        service.startService()
        await service.accounts.add(ACCOUNT)
        d = service.poll(1)
        await self.settle()
        self.assertIn(1, await self.state.leases())
        stopped = service.stopService()
        self.runner.finish(1)
        await stopped
        await d
        self.assertEqual(await self.state.leases(), {})


class TimedRunner:
    """A poll runner whose polls last C{seconds} of their gateway's clock, recording
    (node, start, end) of each in a log shared by the gateways."""

    def __init__(self, node: str, clock: Clock, log: list[tuple[str, float, float]], seconds: float) -> None:
        self.node = node
        self.clock = clock
        self.log = log
        self.seconds = seconds

    def __call__(
        self,
        record: AccountRecord,
        password: str,
        progress: Callable[[PollReport], None] | None,
        stopping: Callable[[], bool],
    ) -> defer.Deferred[PollReport]:
        started = self.clock.seconds()
        d: defer.Deferred[PollReport] = defer.Deferred()

        def end() -> None:
            finished = self.clock.seconds()
            self.log.append((self.node, started, finished))
            d.callback(PollReport(record.id, started=started, finished=finished))

        self.clock.callLater(self.seconds, end)
        return d


class TwoGatewaysTests(TestCase):
    """Two pollers (node names gw-a, gw-b) on one SQLite store, each with its clock
    (a dead gateway's clock stops), the store's lease clock a third, all advanced
    together, with the real lease timing of an interval of L{INTERVAL} seconds."""

    INTERVAL = 60
    POLL = 5.0

    async def setUp(self) -> None:  # type: ignore[override]
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        self.store_clock = Clock()
        self.store_clock.advance(1000)
        self.state = SQLiteState(self.folder / "state.sqlite3", reactor, clock=self.store_clock)
        await self.state.start()
        self.addCleanup(self.state.close)
        self.polls: list[tuple[str, float, float]] = []
        self.clocks: dict[str, Clock] = {}
        self.services: dict[str, PollerService] = {}
        self.alive: set[str] = set()
        for n, node in enumerate(("gw-a", "gw-b")):
            clock = Clock()
            clock.advance(1000)
            self.clocks[node] = clock
            service = PollerService(
                environment(self.folder, "127.0.0.1", 25, node),
                self.state,
                Connector(reactor),
                reactor,
                clock=clock,
                poll_runner=TimedRunner(node, clock, self.polls, self.POLL),
                rng=random.Random(n),
            )
            self.services[node] = service
            self.alive.add(node)
            self.addCleanup(self._stop, node)
        self.events = capture(self)
        await self.services["gw-a"].accounts.add({**ACCOUNT, "interval": self.INTERVAL})
        for service in self.services.values():
            service.startService()
        await self.settle()

    def _stop(self, node: str) -> defer.Deferred[None] | None:
        service = self.services[node]
        if node not in self.alive or not service.running:
            return None
        stopped = service.stopService()
        for _ in range(int(self.POLL) + 1):  # a poll under way ends
            self.clocks[node].advance(1)
        return stopped

    async def settle(self) -> None:
        for _ in range(5):
            await self.state.list_accounts()

    async def run_for(self, seconds: float, step: float = 0.5) -> None:
        """Advance the store's clock and the live gateways' by C{seconds}."""
        for _ in range(round(seconds / step)):
            self.store_clock.advance(step)
            for node in self.alive:
                self.clocks[node].advance(step)
            await self.settle()

    def assertNoOverlap(self) -> None:
        spans = sorted(self.polls, key=lambda p: p[1])
        for (n0, s0, e0), (n1, s1, e1) in itertools.pairwise(spans):
            self.assertLessEqual(e0, s1, f"{n0} polled {s0}-{e0}, {n1} {s1}-{e1}")

    async def test_oncePerInterval(self) -> None:
        """Over ten intervals the account is polled about ten times in all (not about
        twenty, once per gateway per interval), never by both at once; the gateway
        that is refused does not poll while the holder lives."""
        intervals = 10
        await self.run_for(intervals * self.INTERVAL)
        self.assertNoOverlap()
        count = len(self.polls)
        # The first poll within the first interval, then one every 0.9-1.1 interval
        # plus the poll's length.
        self.assertGreaterEqual(count, intervals - 2, self.polls)
        self.assertLessEqual(count, intervals + 1, self.polls)
        self.assertEqual(len({node for node, _, _ in self.polls}), 1, self.polls)
        self.assertTrue(kinds(self.events, "lease_held"))

    async def test_deadHolderTakenOver(self) -> None:
        """The holder dying (its clock stops: no release, no more renewals) right
        after a poll, its lease kept: the other gateway polls the account a few
        seconds after it was due, then keeps polling it once per interval."""
        await self.run_for(3 * self.INTERVAL)
        [holder] = {node for node, _, _ in self.polls}
        [other] = set(self.services) - {holder}
        # Right after the holder's next poll ends.
        count = len(self.polls)
        while len(self.polls) == count:
            await self.run_for(0.5)
        await self.run_for(0.5)
        due = self.services[holder].next_poll(1)
        assert due is not None
        self.assertEqual((await self.state.leases())[1].node, holder)
        self.alive.discard(holder)
        died = len(self.polls)
        await self.run_for(due - self.store_clock.seconds() + 2 * self.POLL)
        takeover = [p for p in self.polls[died:] if p[0] == other]
        self.assertTrue(takeover, self.polls)
        slack = LeaseTiming.for_interval(self.INTERVAL).slack
        self.assertGreaterEqual(takeover[0][1], due)
        self.assertLessEqual(takeover[0][1], due + 2 * slack)
        [taken] = kinds(self.events, "lease_taken_over")
        self.assertEqual((taken["node"], taken["previous_node"]), (other, holder))
        await self.run_for(3 * self.INTERVAL)
        self.assertNoOverlap()
        self.assertIn(len(self.polls[died:]), (3, 4, 5), self.polls)

    async def test_gracefulStopReleases(self) -> None:
        """The holder stopping releases its kept lease (nothing held afterwards by
        it); the other gateway polls the account from its next attempt on."""
        await self.run_for(2 * self.INTERVAL)
        [holder] = {node for node, _, _ in self.polls}
        [other] = set(self.services) - {holder}
        self.assertEqual((await self.state.leases())[1].node, holder)
        stopped = self._stop(holder)
        self.alive.discard(holder)
        assert stopped is not None
        await stopped
        self.assertEqual(await self.state.leases(), {})
        self.assertTrue([e for e in kinds(self.events, "lease_released") if e["node"] == holder])
        count = len(self.polls)
        await self.run_for(2 * self.INTERVAL)
        self.assertTrue([p for p in self.polls[count:] if p[0] == other], self.polls)
        self.assertNoOverlap()


class LostDuringDataTests(TestCase):
    """A real poll whose lease is lost while it relays a message."""

    async def lose_lease_at(self, point: str) -> tuple[PollReport, PollerSink, FakePop3Server, SQLiteState, int]:
        """Poll three messages; the lease is lost (no renewal confirmed in time) when
        the second message's delivery reaches C{point}."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        clock = Clock()
        clock.advance(1000)
        state = SQLiteState(folder / "state.sqlite3", reactor, clock=clock)
        await state.start()
        self.addCleanup(state.close)
        sink = PollerSink.started(self)
        mails = [message([("To", f"user{n}@example.com")], body="line\r\n" * 2000) for n in range(3)]
        pop3 = await FakePop3Server.listening(self, mails)
        seen = {"count": 0}

        def fault(name: str) -> None:
            if name == point:
                seen["count"] += 1
                if seen["count"] == 2:
                    clock.advance(TIMING.duration)  # the deadline passes now

        service = PollerService(
            environment(folder, sink.host, sink.port, NODE),
            state,
            Connector(reactor),
            reactor,
            clock=clock,
            fault=fault,
            lease_timing=lambda interval: TIMING,
        )
        record = await service.accounts.add({**ACCOUNT, "host": "127.0.0.1", "port": pop3.port, "tls": "none"})
        report = await service.poll(record["id"])
        return report, sink, pop3, state, record["id"]

    async def assertStoppedAtSecond(self, point: str) -> None:
        report, sink, pop3, state, account = await self.lose_lease_at(point)
        self.assertIn("lease", report.error or "")
        self.assertEqual(len(sink.messages), 1)
        self.assertIn(b"To: user0@example.com", sink.messages[0].data or b"")
        self.assertEqual(report.delivered, 1)
        self.assertIn("lease_lost", [s.kind for s in report.skipped])
        journal = await state.journal(account)
        self.assertEqual(journal["uid-1"].state, JournalState.DELIVERED)
        self.assertEqual(journal["uid-2"].state, JournalState.SEEN)
        self.assertEqual(journal["uid-3"].state, JournalState.SEEN)
        self.assertIn(b"RETR 2", pop3.commands)
        self.assertNotIn(b"RETR 3", pop3.commands)
        self.assertEqual(pop3.commands[-1], b"QUIT")
        self.assertEqual(pop3.deleted, {1})
        self.assertEqual(await state.leases(), {})

    async def test_lostDuringData(self) -> None:
        """The lease lost during the second message's DATA: that DATA is cut before
        its final dot (nothing delivered, the journal back to "seen"), the third
        message is not touched, and the session ends with QUIT, which applies the
        first message's deletion; the report says why."""
        await self.assertStoppedAtSecond("during_data")

    async def test_lostAfterCommit(self) -> None:
        """The lease lost right after the second message's commit, which marked the
        third "started" ahead: the poll stops before it, and the third goes back to
        "seen" (another gateway may deliver it; nothing claims it was under way)."""
        report, sink, pop3, state, account = await self.lose_lease_at("after_commit")
        self.assertIn("lease", report.error or "")
        self.assertEqual(len(sink.messages), 2)
        journal = await state.journal(account)
        self.assertEqual([journal[f"uid-{n}"].state for n in (1, 2)], [JournalState.DELIVERED] * 2)
        self.assertEqual(journal["uid-3"].state, JournalState.SEEN)
        self.assertNotIn(b"RETR 3", pop3.commands)

    async def test_lostBeforeData(self) -> None:
        """The lease lost once the second message is retrieved, before its DATA: it
        is not delivered, and the poll stops as above."""
        await self.assertStoppedAtSecond("after_retr")
