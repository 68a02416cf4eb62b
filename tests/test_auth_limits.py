"""Tests for L{mailgw.auth.limits}: the failure penalty, C{max_pending} and the fair
thread-pool front of [4.10]."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.auth.limits import FairPool, PenaltyTable, PendingLimit, limited
from mailgw.auth.portal import AAAUnavailable


class PenaltyTableTests(SynchronousTestCase):
    """L{PenaltyTable}: failures per address in a sliding window, doubling delays."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = PenaltyTable(self.clock)

    def test_noFailureNoDelay(self) -> None:
        """An address without failures waits nothing and is not held."""
        self.assertEqual(self.table.delay("192.0.2.1"), 0.0)
        self.assertEqual(len(self.table), 0)

    def test_doublingSequence(self) -> None:
        """Each failure doubles the delay, 1, 2, 4, 8 s, capped at 15 s."""
        delays = []
        for _ in range(9):
            self.table.failed("192.0.2.1")
            delays.append(self.table.delay("192.0.2.1"))
        self.assertEqual(delays, [1, 2, 4, 8, 15, 15, 15, 15, 15])

    def test_otherCap(self) -> None:
        """C{max_delay} caps the delay, whatever its value."""
        for max_delay, expected in [
            (0.0, [0, 0, 0]),
            (1.0, [1, 1, 1]),
            (3.0, [1, 2, 3, 3]),
            (64.0, [1, 2, 4, 8, 16, 32, 64, 64]),
        ]:
            table = PenaltyTable(self.clock, max_delay=max_delay)
            delays = []
            for _ in expected:
                table.failed("a")
                delays.append(table.delay("a"))
            self.assertEqual(delays, expected, max_delay)

    def test_perAddress(self) -> None:
        """Failures of one address do not delay another."""
        for _ in range(4):
            self.table.failed("192.0.2.1")
        self.table.failed("2001:db8::1")
        self.assertEqual(self.table.delay("192.0.2.1"), 8.0)
        self.assertEqual(self.table.delay("2001:db8::1"), 1.0)
        self.assertEqual(self.table.delay("192.0.2.2"), 0.0)

    def test_windowExpiry(self) -> None:
        """A failure counts for C{window} seconds, then no longer: the window slides."""
        table = PenaltyTable(self.clock, window=900)
        table.failed("a")
        self.clock.advance(100)
        table.failed("a")
        self.clock.advance(100)
        table.failed("a")
        self.assertEqual(table.delay("a"), 4.0)
        self.clock.advance(699)
        self.assertEqual(table.delay("a"), 4.0)
        self.clock.advance(1)  # t=900: the failure at 0 expires
        self.assertEqual(table.delay("a"), 2.0)
        self.clock.advance(100)
        self.assertEqual(table.delay("a"), 1.0)
        self.assertEqual(len(table), 1)
        self.clock.advance(100)
        self.assertEqual(table.delay("a"), 0.0)
        self.assertEqual(len(table), 0)

    def test_expiredAddressesDropped(self) -> None:
        """Addresses whose failures all expired are no longer held."""
        for i in range(100):
            self.table.failed(f"198.51.100.{i}")
        self.assertEqual(len(self.table), 100)
        self.clock.advance(899)
        self.table.failed("a")
        self.assertEqual(len(self.table), 101)
        self.clock.advance(1)
        self.assertEqual(len(self.table), 1)
        self.assertEqual(self.table.delay("a"), 1.0)

    def test_successClears(self) -> None:
        """A success clears the address, and only that address."""
        for _ in range(5):
            self.table.failed("a")
            self.table.failed("b")
        self.table.succeeded("a")
        self.assertEqual(self.table.delay("a"), 0.0)
        self.assertEqual(self.table.delay("b"), 15.0)
        self.assertEqual(len(self.table), 1)
        self.table.failed("a")
        self.assertEqual(self.table.delay("a"), 1.0)

    def test_successOfUnknownAddress(self) -> None:
        """A success of an address never seen changes nothing."""
        self.table.failed("a")
        self.table.succeeded("b")
        self.assertEqual(self.table.delay("a"), 1.0)

    def test_boundedEntries(self) -> None:
        """After 100,000 distinct addresses the table holds at most C{max_entries},
        the most recently failed ones."""
        for i in range(100_000):
            self.table.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
            self.clock.advance(0.001)
        self.assertLessEqual(len(self.table), 10_000)
        self.assertEqual(len(self.table), 10_000)
        recent = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(90_000, 100_000)]
        lost = [a for a in recent if self.table.delay(a) != 1.0]
        self.assertEqual((len(lost), lost[:3]), (0, []))
        self.assertEqual(self.table.delay("10.0.0.0"), 0.0)
        self.assertEqual(self.table.delay("10.1.95.143"), 0.0)  # 89,999

    def test_leastRecentlyFailedDroppedFirst(self) -> None:
        """When full, the address whose last failure is the oldest is dropped."""
        table = PenaltyTable(self.clock, max_entries=2)
        table.failed("a")
        table.failed("a")
        table.failed("b")
        table.failed("a")  # a is now the most recent
        table.failed("c")
        self.assertEqual(len(table), 2)
        self.assertEqual(table.delay("b"), 0.0)
        self.assertEqual(table.delay("a"), 4.0)
        self.assertEqual(table.delay("c"), 1.0)

    def test_timestampsPerAddressBounded(self) -> None:
        """One address failing endlessly keeps only the few timestamps that matter."""
        for _ in range(10_000):
            self.table.failed("a")
        self.assertLessEqual(len(self.table._failures["a"]), 8)
        self.assertEqual(self.table.delay("a"), 15.0)

    def test_invalidParameters(self) -> None:
        """Out-of-range parameters are refused."""
        cases: list[dict[str, Any]] = [
            {"window": 0},
            {"window": -1},
            {"window": float("nan")},
            {"max_delay": -1},
            {"max_delay": float("inf")},
            {"max_entries": 0},
        ]
        for kwargs in cases:
            self.assertRaises(ValueError, PenaltyTable, self.clock, **kwargs)

    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("failed"), st.sampled_from("abc")),
                st.tuples(st.just("succeeded"), st.sampled_from("abc")),
                st.tuples(st.just("advance"), st.sampled_from([0.0, 1.0, 10.0, 49.0, 50.0, 99.0])),
            ),
            max_size=60,
        )
    )
    def test_matchesModel(self, operations: list[tuple[str, Any]]) -> None:
        """For any operations the delays match a naive model keeping every failure."""
        clock = Clock()
        table = PenaltyTable(clock, window=100, max_delay=15)
        model: dict[str, list[float]] = {}
        for operation, argument in operations:
            if operation == "failed":
                table.failed(argument)
                model.setdefault(argument, []).append(clock.seconds())
            elif operation == "succeeded":
                table.succeeded(argument)
                model.pop(argument, None)
            else:
                clock.advance(argument)
            now = clock.seconds()
            for address in "abc":
                n = sum(1 for t in model.get(address, []) if now - t < 100)
                self.assertEqual(table.delay(address), 0 if n == 0 else min(15, 2 ** (n - 1)))
            live = {a for a, stamps in model.items() if any(now - t < 100 for t in stamps)}
            self.assertEqual(len(table), len(live))


class PendingLimitTests(SynchronousTestCase):
    """L{PendingLimit} and L{limited}: at most C{max_pending} checks per server group."""

    def test_refusesBeyondMaxPending(self) -> None:
        """C{max_pending} places can be taken, no more until one is released."""
        limit = PendingLimit("ldap", 3)
        self.assertEqual([limit.try_acquire() for _ in range(4)], [True, True, True, False])
        self.assertEqual(limit.pending, 3)
        limit.release()
        self.assertEqual(limit.pending, 2)
        self.assertTrue(limit.try_acquire())
        self.assertFalse(limit.try_acquire())

    def test_noLimit(self) -> None:
        """C{max_pending} of 0 or less means no limit."""
        for max_pending in (0, -1):
            limit = PendingLimit("local", max_pending)
            self.assertTrue(all(limit.try_acquire() for _ in range(1000)))
            self.assertEqual(limit.pending, 1000)

    def test_releaseWithoutAcquire(self) -> None:
        """Releasing more than was acquired is a programming error."""
        limit = PendingLimit("local", 1)
        self.assertRaises(RuntimeError, limit.release)
        self.assertEqual(limit.pending, 0)

    def test_limitedReleasesOnSuccess(self) -> None:
        """L{limited} holds a place while the work runs and gives it back on success."""
        limit = PendingLimit("ldap", 1)
        work: Deferred[str] = Deferred()
        d = Deferred.fromCoroutine(limited(limit, lambda: work))
        self.assertNoResult(d)
        self.assertEqual(limit.pending, 1)
        work.callback("alice")
        self.assertEqual(self.successResultOf(d), "alice")
        self.assertEqual(limit.pending, 0)

    def test_limitedReleasesOnFailure(self) -> None:
        """L{limited} gives the place back when the work fails."""
        limit = PendingLimit("ldap", 1)
        work: Deferred[str] = Deferred()
        d = Deferred.fromCoroutine(limited(limit, lambda: work))
        work.errback(ValueError("boom"))
        self.failureResultOf(d, ValueError)
        self.assertEqual(limit.pending, 0)

    def test_limitedReleasesOnSynchronousError(self) -> None:
        """L{limited} gives the place back when starting the work raises."""
        limit = PendingLimit("ldap", 1)

        def work() -> Deferred[str]:
            raise ValueError("boom")

        self.failureResultOf(Deferred.fromCoroutine(limited(limit, work)), ValueError)
        self.assertEqual(limit.pending, 0)

    def test_limitedReleasesOnCancellation(self) -> None:
        """Cancelling the check cancels the work and gives the place back once."""
        limit = PendingLimit("ldap", 2)
        cancels: list[object] = []
        work: Deferred[str] = Deferred(cancels.append)
        d = Deferred.fromCoroutine(limited(limit, lambda: work))
        other: Deferred[None] = Deferred.fromCoroutine(limited(limit, lambda: Deferred()))
        self.assertEqual(limit.pending, 2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(cancels, [work])
        self.assertEqual(limit.pending, 1)
        other.cancel()
        self.failureResultOf(other, CancelledError)
        self.assertEqual(limit.pending, 0)

    def test_limitedRefusesWhenFull(self) -> None:
        """When the limit is full L{limited} fails at once with L{AAAUnavailable},
        naming the group, without starting the work."""
        limit = PendingLimit("ldap-corp", 1)
        held: Deferred[None] = Deferred.fromCoroutine(limited(limit, lambda: Deferred()))
        started = []

        def work() -> Deferred[None]:
            started.append(True)
            return succeed(None)

        failure = self.failureResultOf(Deferred.fromCoroutine(limited(limit, work)), AAAUnavailable)
        self.assertIn("ldap-corp", str(failure.value))
        self.assertEqual(started, [])
        self.assertEqual(limit.pending, 1)
        held.cancel()
        self.failureResultOf(held, CancelledError)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(limited(limit, work))), None)
        self.assertEqual(started, [True])
        self.assertEqual(limit.pending, 0)


@dataclass
class _ThreadCall:
    onResult: Callable[[bool, object], None]
    function: Callable[..., object]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class FakeThreadPool:
    """
    Stands for a L{ThreadPool} as L{deferToThreadPool
    <twisted.internet.threads.deferToThreadPool>} uses it: each call is recorded, and
    runs, with its result reported as L{ThreadPool.callInThreadWithCallback} reports it,
    only when the test says that its "thread" finishes.
    """

    #: calls handed over whose thread has not finished, in the order handed over
    calls: list[_ThreadCall] = field(default_factory=list)
    #: the first argument of every call ever handed over, in order
    started: list[Any] = field(default_factory=list)

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, object], None], function: Callable[..., object], *args: Any, **kwargs: Any
    ) -> None:
        self.calls.append(_ThreadCall(onResult, function, args, kwargs))
        self.started.append(args[0] if args else None)

    def finish(self, index: int = 0) -> None:
        """Run the C{index}th waiting call in its "thread" and report its outcome."""
        call = self.calls.pop(index)
        try:
            result = call.function(*call.args, **call.kwargs)
        except Exception:  # noqa: BLE001 -- as ThreadPool does: the failure is the result
            call.onResult(False, Failure())
        else:
            call.onResult(True, result)


class FakeReactor:
    """The C{callFromThread} of a reactor, for calls already on the reactor thread."""

    def callFromThread(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def _identity(label: Any) -> Any:
    return label


def _fail(label: Any) -> Any:
    raise ValueError(f"failed {label}")


def makePool(concurrency: int) -> tuple[FairPool, FakeThreadPool]:
    threads = FakeThreadPool()
    return FairPool(FakeReactor(), cast(ThreadPool, threads), concurrency=concurrency, name="test"), threads


class FairPoolTests(SynchronousTestCase):
    """L{FairPool}: bounded, round-robin across keys, FIFO within a key, cancellable."""

    def test_concurrencyBound(self) -> None:
        """At most C{concurrency} calls are handed to the thread pool; the rest wait."""
        pool, threads = makePool(3)
        results = [pool.run("a", _identity, i) for i in range(5)]
        self.assertEqual(threads.started, [0, 1, 2])
        self.assertEqual((pool.running, pool.queued), (3, 2))
        threads.finish()
        self.assertEqual(threads.started, [0, 1, 2, 3])
        self.assertEqual((pool.running, pool.queued), (3, 1))
        while threads.calls:
            threads.finish()
        self.assertEqual([self.successResultOf(d) for d in results], [0, 1, 2, 3, 4])
        self.assertEqual((pool.running, pool.queued), (0, 0))
        self.assertEqual(pool._keys, {})

    def test_exceptionFailsDeferred(self) -> None:
        """A function raising an exception fails its L{Deferred} with it, and its slot
        is reused."""
        pool, threads = makePool(1)
        failing = pool.run("a", _fail, "x")
        after = pool.run("a", _identity, "y")
        threads.finish()
        failure = self.failureResultOf(failing, ValueError)
        self.assertEqual(str(failure.value), "failed x")
        self.assertEqual(threads.started, ["x", "y"])
        threads.finish()
        self.assertEqual(self.successResultOf(after), "y")

    def test_quietKeyNotDelayedByFlood(self) -> None:
        """With concurrency 2, key A queueing 50 calls and then key B one, B's call starts
        after at most 2 completions, before A's third call."""
        pool, threads = makePool(2)
        flood = [pool.run("A", _identity, f"A{i}") for i in range(1, 51)]
        quiet = pool.run("B", _identity, "B1")
        completions = 0
        while "B1" not in threads.started:
            threads.finish()
            completions += 1
        self.assertLessEqual(completions, 2)
        self.assertNotIn("A3", threads.started[: threads.started.index("B1")])
        while threads.calls:
            threads.finish()
        self.assertEqual(self.successResultOf(quiet), "B1")
        self.assertEqual([self.successResultOf(d) for d in flood], [f"A{i}" for i in range(1, 51)])

    def test_roundRobinAcrossKeys(self) -> None:
        """Each key with queued calls gets a turn before any key gets a second one."""
        pool, threads = makePool(1)
        for key in "ABC":
            for i in range(1, 4):
                pool.run(key, _identity, f"{key}{i}")
        while threads.calls:
            threads.finish()
        self.assertEqual(threads.started, ["A1", "B1", "C1", "A2", "B2", "C2", "A3", "B3", "C3"])

    def test_idleKeyFirst(self) -> None:
        """A key with nothing running gets the next free slot before a key that already
        holds one, so a flood keeps at most the slots others leave free."""
        pool, threads = makePool(2)
        for i in range(1, 5):
            pool.run("A", _identity, f"A{i}")
        pool.run("B", _identity, "B1")
        pool.run("B", _identity, "B2")
        threads.finish()  # A1: B holds nothing, A holds A2
        self.assertEqual(threads.started, ["A1", "A2", "B1"])
        threads.finish()  # A2: A holds nothing now, B holds B1
        self.assertEqual(threads.started, ["A1", "A2", "B1", "A3"])
        threads.finish()  # B1
        self.assertEqual(threads.started, ["A1", "A2", "B1", "A3", "B2"])

    def test_fifoWithinKey(self) -> None:
        """The calls of one key start in the order they were queued."""
        pool, threads = makePool(2)
        for i in range(10):
            pool.run("A", _identity, ("A", i))
            pool.run("B", _identity, ("B", i))
        while threads.calls:
            threads.finish(len(threads.calls) - 1)
        for key in "AB":
            self.assertEqual([i for k, i in threads.started if k == key], list(range(10)))

    def test_cancelQueued(self) -> None:
        """A queued call cancelled is removed: its L{Deferred} fails with
        L{CancelledError} and it never reaches the thread pool."""
        pool, threads = makePool(1)
        first = pool.run("A", _identity, "A1")
        cancelled = pool.run("A", _identity, "A2")
        last = pool.run("B", _identity, "B1")
        self.assertEqual(pool.queued, 2)
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.assertEqual(pool.queued, 1)
        while threads.calls:
            threads.finish()
        self.assertEqual(threads.started, ["A1", "B1"])
        self.successResultOf(first)
        self.successResultOf(last)
        self.assertEqual(pool._keys, {})

    def test_cancelOnlyQueuedCallOfKey(self) -> None:
        """Cancelling the only queued call of a key takes the key out of the turns."""
        pool, threads = makePool(1)
        pool.run("A", _identity, "A1")
        cancelled = pool.run("B", _identity, "B1")
        pool.run("C", _identity, "C1")
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        threads.finish()
        threads.finish()
        self.assertEqual(threads.started, ["A1", "C1"])
        self.assertEqual(pool._keys, {})

    def test_cancelRunning(self) -> None:
        """A running call cancelled fails its L{Deferred} with L{CancelledError} at once;
        its slot is reused only when its thread returns, whose result is discarded."""
        pool, threads = makePool(1)
        running = pool.run("A", _identity, "A1")
        waiting = pool.run("B", _identity, "B1")
        running.cancel()
        self.failureResultOf(running, CancelledError)
        self.assertEqual((pool.running, pool.queued), (1, 1))
        self.assertEqual(threads.started, ["A1"])
        threads.finish()
        self.assertEqual(threads.started, ["A1", "B1"])
        self.assertEqual((pool.running, pool.queued), (1, 0))
        threads.finish()
        self.assertEqual(self.successResultOf(waiting), "B1")

    def test_cancelRunningThatFails(self) -> None:
        """The failure of a cancelled running call is discarded, not left unhandled."""
        pool, threads = makePool(1)
        running = pool.run("A", _fail, "A1")
        running.cancel()
        self.failureResultOf(running, CancelledError)
        threads.finish()
        self.assertEqual(pool.running, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cancelAfterResult(self) -> None:
        """Cancelling a call that already ended changes nothing."""
        pool, threads = makePool(1)
        done = pool.run("A", _identity, "A1")
        threads.finish()
        done.cancel()
        self.assertEqual(self.successResultOf(done), "A1")
        self.assertEqual((pool.running, pool.queued), (0, 0))

    def test_runFromCallback(self) -> None:
        """A call queued from the callback of another one is run in its turn."""
        pool, threads = makePool(1)
        second: list[Deferred[Any]] = []
        first = pool.run("A", _identity, "A1")
        first.addCallback(lambda _: second.append(pool.run("A", _identity, "A2")))
        threads.finish()
        self.assertEqual(threads.started, ["A1", "A2"])
        threads.finish()
        self.assertEqual(self.successResultOf(second[0]), "A2")

    def test_invalidConcurrency(self) -> None:
        """A concurrency below 1 is refused."""
        self.assertRaises(ValueError, FairPool, FakeReactor(), cast(ThreadPool, FakeThreadPool()), concurrency=0)

    @given(
        st.integers(min_value=1, max_value=4),
        st.lists(
            st.one_of(
                st.tuples(st.just("submit"), st.sampled_from("ABCD")),
                st.tuples(st.just("finish"), st.integers(min_value=0, max_value=7)),
                st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=63)),
            ),
            max_size=80,
        ),
    )
    def test_property(self, concurrency: int, operations: list[tuple[str, Any]]) -> None:
        """For any submits, completions and cancellations across keys, running never
        exceeds the concurrency, no slot stays idle while calls wait, every call not
        cancelled before it started runs exactly once, FIFO within its key, and every
        L{Deferred} gets its own outcome."""
        pool, threads = makePool(concurrency)
        ran: list[int] = []
        submitted: list[tuple[str, Deferred[Any]]] = []
        cancelled: set[int] = set()
        cancelled_queued: set[int] = set()

        def work(job: int) -> int:
            ran.append(job)
            return job

        def check() -> None:
            self.assertLessEqual(pool.running, concurrency)
            self.assertEqual(pool.running, len(threads.calls))
            if pool.queued:
                self.assertEqual(pool.running, concurrency)

        for operation, argument in operations:
            if operation == "submit":
                submitted.append((argument, pool.run(argument, work, len(submitted))))
            elif operation == "finish" and threads.calls:
                threads.finish(argument % len(threads.calls))
            elif operation == "cancel" and submitted:
                job = argument % len(submitted)
                if not submitted[job][1].called:
                    cancelled.add(job)
                    if job not in threads.started:
                        cancelled_queued.add(job)
                submitted[job][1].cancel()
            check()
        while threads.calls:
            threads.finish()
            check()
        self.assertEqual(pool.queued, 0)
        self.assertEqual(pool._keys, {})

        started = list(threads.started)
        self.assertEqual(sorted(ran), sorted(started))
        self.assertEqual(len(set(ran)), len(ran))
        self.assertEqual(set(ran), set(range(len(submitted))) - cancelled_queued)
        for job, (_, d) in enumerate(submitted):
            if job in cancelled:
                self.failureResultOf(d, CancelledError)
            else:
                self.assertIn(job, ran)
                self.assertEqual(self.successResultOf(d), job)
        for key in "ABCD":
            of_key = [job for job in started if submitted[job][0] == key]
            self.assertEqual(of_key, sorted(of_key))


class FairPoolThreadPoolTests(TestCase):
    """L{FairPool} over a real L{ThreadPool} and the reactor, as the fake stands for."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.threadpool = ThreadPool(minthreads=0, maxthreads=2, name="test-fairpool")
        self.threadpool.start()
        self.addCleanup(self.threadpool.stop)
        self.pool = FairPool(reactor, self.threadpool, concurrency=2, name="test")

    def test_resultsAndFailures(self) -> Deferred[None]:
        """Results and exceptions of functions run in real threads come back."""

        async def check() -> None:
            results = [self.pool.run(str(i % 3), _identity, i) for i in range(10)]
            failing = self.pool.run("x", _fail, "x")
            self.assertEqual([await d for d in results], list(range(10)))
            with self.assertRaises(ValueError):
                await failing
            self.assertEqual((self.pool.running, self.pool.queued), (0, 0))

        return Deferred.fromCoroutine(check())
