"""The poller's scheduler [6]: jittered start, one poll per account at a time,
check-now joining a running poll, rescheduling after account changes, a concurrency
limit, counters, and a graceful stop.  Time is a Clock; polls are a fake runner whose
Deferreds the tests fire."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailgw.poller.poll import PollReport, SkippedMessage
from mailgw.poller.service import FIRST_POLL_WINDOW, PollerService
from mailgw.state import AccountRecord, StateError, StateService
from mailgw.state.sqlite import SQLiteState
from mailgw.upstream import Connector
from tests.servers.poller_fixtures import environment

ACCOUNT = {"host": "pop.isp.example", "username": "u", "password": "p", "domain": "example.com"}


class FakeRunner:
    """Records each poll; the test fires it with L{finish}."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Callable[[PollReport], None] | None, Callable[[], bool]]] = []
        self.pending: dict[int, defer.Deferred[PollReport]] = {}

    def __call__(
        self,
        record: AccountRecord,
        password: str,
        progress: Callable[[PollReport], None] | None,
        stopping: Callable[[], bool],
    ) -> defer.Deferred[PollReport]:
        assert password == "p"
        self.calls.append((record.id, progress, stopping))
        d: defer.Deferred[PollReport] = defer.Deferred()
        self.pending[record.id] = d
        return d

    def finish(self, account_id: int, **counts: Any) -> PollReport:
        report = PollReport(account_id, started=0.0, finished=1.0, **counts)
        self.pending.pop(account_id).callback(report)
        return report

    def polled(self) -> list[int]:
        return [call[0] for call in self.calls]


class MetricsSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def poller_delivered(self, account: str, count: int = 1) -> None:
        self.calls.append(("delivered", account, count))

    def poller_deleted(self, account: str, count: int = 1) -> None:
        self.calls.append(("deleted", account, count))

    def forget_account(self, account: str) -> None:
        self.calls.append(("forget", account, 0))


class SchedulerTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        self.folder = folder
        self.state = SQLiteState(folder / "state.sqlite3", reactor)
        await self.state.start()
        self.addCleanup(self.state.close)
        self.clock = Clock()
        self.runner = FakeRunner()
        self.sink = MetricsSink()

    def service(self, **kwargs: Any) -> PollerService:
        enabled = kwargs.pop("enabled", True)
        service = PollerService(
            environment(self.folder, "127.0.0.1", 25, enabled=enabled),
            self.state,
            Connector(reactor),
            reactor,
            clock=self.clock,
            poll_runner=self.runner,
            metrics=self.sink,
            rng=random.Random(7),
            **kwargs,
        )
        return service

    async def start(self, service: PollerService) -> None:
        service.startService()

        def stop() -> defer.Deferred[None]:
            if not service.running:
                return defer.succeed(None)
            stopped = service.stopService()
            self.clock.advance(service.stop_timeout)  # cancels the polls the test left running
            return stopped

        self.addCleanup(stop)
        if service._started is not None:
            await service._started

    async def settle(self) -> None:
        """Let state calls in flight (a thread round trip) complete."""
        await self.state.list_accounts()

    async def test_jitteredStart(self) -> None:
        """Enabled accounts get their first poll at different moments within the first
        minute; disabled ones get none; each next poll comes one interval (+-10 %)
        after the previous one ended."""
        service = self.service()
        for n in range(3):
            await service.accounts.add({**ACCOUNT, "username": f"u{n}", "interval": 600})
        await service.accounts.add({**ACCOUNT, "enabled": False})
        await self.start(service)
        due = {account: service.next_poll(account) for account in (1, 2, 3, 4)}
        self.assertIsNone(due[4])
        times = [t for t in due.values() if t is not None]
        self.assertEqual(len(set(times)), 3)
        self.assertTrue(all(0 <= t < FIRST_POLL_WINDOW for t in times), times)
        self.clock.advance(FIRST_POLL_WINDOW)
        await self.settle()
        self.assertEqual(sorted(self.runner.polled()), [1, 2, 3])
        self.runner.finish(1)
        await self.settle()
        next_due = service.next_poll(1)
        assert next_due is not None
        self.assertTrue(FIRST_POLL_WINDOW + 540 <= next_due <= FIRST_POLL_WINDOW + 660, next_due)

    async def test_onePollAtATime(self) -> None:
        """check-now during a poll joins it: one run, the same report for everyone."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        await self.start(service)
        first = service.poll(1)
        await self.settle()
        second = service.poll(1)
        third = defer.Deferred.fromCoroutine(service.accounts.check_now("1"))
        await self.settle()
        self.assertEqual(self.runner.polled(), [1])
        report = self.runner.finish(1, delivered=2)
        self.assertIs(await first, report)
        self.assertIs(await second, report)
        self.assertIs(await third, report)
        self.assertEqual(service.metrics[1].polls, 1)

    async def test_timerDuringCheckNow(self) -> None:
        """The scheduled time coming while a check-now runs starts no second poll."""
        service = self.service()
        await service.accounts.add({**ACCOUNT, "interval": 60})
        await self.start(service)
        d = service.poll(1)
        await self.settle()
        self.clock.advance(FIRST_POLL_WINDOW)
        self.assertEqual(self.runner.polled(), [1])
        self.runner.finish(1)
        await d

    async def test_progress(self) -> None:
        """check-now's progress callback and the stopping predicate reach the poll."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        seen: list[PollReport] = []
        d = service.poll(1, seen.append)
        await self.settle()
        [(_, progress, stopping)] = self.runner.calls
        assert progress is not None
        progress(PollReport(1, started=0.0))
        self.assertEqual(len(seen), 1)
        self.assertFalse(stopping())
        self.runner.finish(1)
        await d

    async def test_concurrencyLimit(self) -> None:
        """No more than max_concurrent polls run together."""
        service = self.service(max_concurrent=1)
        await service.accounts.add(ACCOUNT)
        await service.accounts.add({**ACCOUNT, "username": "v"})
        a, b = service.poll(1), service.poll(2)
        await self.settle()
        self.assertEqual(self.runner.polled(), [1])
        self.runner.finish(1)
        await a
        await self.settle()
        self.assertEqual(self.runner.polled(), [1, 2])
        self.runner.finish(2)
        await b

    async def test_changesReschedule(self) -> None:
        """An added or edited account is polled soon; a disabled one is unscheduled; a
        deleted one is forgotten (timer and metrics)."""
        service = self.service()
        await self.start(service)
        await service.accounts.add({**ACCOUNT, "interval": 3600})
        await self.settle()
        due = service.next_poll(1)
        assert due is not None
        self.assertLessEqual(due, FIRST_POLL_WINDOW / 6)
        await service.accounts.edit(1, {"enabled": False})
        await self.settle()
        self.assertIsNone(service.next_poll(1))
        await service.accounts.edit(1, {"enabled": True})
        await self.settle()
        self.assertIsNotNone(service.next_poll(1))
        await service.accounts.delete(1)
        await self.settle()
        self.assertIsNone(service.next_poll(1))
        self.assertIn(("forget", "1", 0), self.sink.calls)

    async def test_counters(self) -> None:
        """Reports add up in the account's counters (skips by kind) and in the
        metrics sink."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        for _ in range(2):
            d = service.poll(1)
            await self.settle()
            self.runner.finish(
                1,
                fetched=3,
                delivered=2,
                deleted=2,
                skipped=[SkippedMessage("u3", 3, "broken_mime", "broken MIME structure")],
            )
            await d
        metrics = service.metrics[1]
        self.assertEqual((metrics.polls, metrics.fetched, metrics.delivered, metrics.deleted), (2, 6, 4, 4))
        self.assertEqual(metrics.skipped_by_kind, {"broken_mime": 2})
        self.assertEqual(self.sink.calls.count(("delivered", "1", 2)), 2)
        self.assertEqual(service.summary()["delivered"], 4)
        [listed] = await service.accounts.list()
        self.assertEqual(listed["metrics"]["skipped_by_kind"], {"broken_mime": 2})
        self.assertEqual(listed["last_result"], "2 delivered, 2 deleted, 1 skipped")

    async def test_stopWaitsThenCancels(self) -> None:
        """Stopping tells running polls to stop after their message and waits for
        them; past the time limit they are cancelled."""
        service = self.service(stop_timeout=5)
        await service.accounts.add(ACCOUNT)
        await self.start(service)
        d = service.poll(1)
        await self.settle()
        [(_, _, stopping)] = self.runner.calls
        stopped = service.stopService()
        self.assertTrue(stopping())
        self.assertNoResult(stopped)
        self.clock.advance(5)
        await stopped
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(service.next_poll(1), None)

    async def test_stopAfterPoll(self) -> None:
        """A poll that ends in time lets the stop complete with its report."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        await self.start(service)
        d = service.poll(1)
        await self.settle()
        stopped = service.stopService()
        self.runner.finish(1, delivered=1)
        await stopped
        self.assertEqual((await d).delivered, 1)
        await self.assertFailure(service.poll(1), Exception)

    async def test_disabled(self) -> None:
        """[poller] enabled = false: nothing is scheduled."""
        service = self.service(enabled=False)
        await service.accounts.add(ACCOUNT)
        await self.start(service)
        self.assertIsNone(service.next_poll(1))
        self.clock.advance(3600)
        self.assertEqual(self.runner.calls, [])

    async def test_reconfigure(self) -> None:
        """A reload turning the poller off unschedules every account, turning it on
        schedules them again; the new SMTP server applies to the next polls."""
        service = self.service()
        await service.accounts.add(ACCOUNT)
        await self.start(service)
        self.assertIsNotNone(service.next_poll(1))
        service.reconfigure(environment(self.folder, "127.0.0.1", 25, enabled=False))
        self.assertIsNone(service.next_poll(1))
        service.reconfigure(environment(self.folder, "mx.example", 2525))
        assert service._started is not None
        await service._started
        self.assertIsNotNone(service.next_poll(1))
        self.assertEqual((service.settings.smtp_host, service.settings.smtp_port), ("mx.example", 2525))


class ServiceTreeTests(TestCase):
    async def test_stateThenPoller(self) -> None:
        """As the daemon wires them: a StateService added before the PollerService in
        one MultiService; started together, the poller finds its accounts (the store
        opens first); stopped together, the store closes last."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        path = folder / "state.sqlite3"
        setup = SQLiteState(path, reactor)
        await setup.start()
        clock = Clock()
        first = PollerService(environment(folder, "127.0.0.1", 25), setup, Connector(reactor), reactor, clock=clock)
        await first.accounts.add(ACCOUNT)
        await setup.close()

        state = SQLiteState(path, reactor)
        tree = MultiService()
        StateService(state).setServiceParent(tree)
        poller = PollerService(environment(folder, "127.0.0.1", 25), state, Connector(reactor), reactor, clock=clock)
        poller.setServiceParent(tree)
        tree.startService()
        assert poller._started is not None
        await poller._started
        self.assertIsNotNone(poller.next_poll(1))
        await tree.stopService()
        self.assertIsNone(poller.next_poll(1))
        await self.assertFailure(state.list_accounts(), StateError)
