"""What a password-guessing client may cost the gateway [4.10].

Three small objects, each owning its state and getting the clock, reactor or thread pool
passed in:

  - L{PenaltyTable}: failed logins per client address in a sliding window, and the delay
    (1, 2, 4 ... s, at most 15 s) that a new attempt from that address waits I{before} any
    AAA work is done.  Bounded in addresses and in timestamps per address.
  - L{PendingLimit} and L{limited}: at most C{max_pending} checks (queued or running) per
    AAA server group; beyond that L{limited} raises L{AAAUnavailable} at once, which the
    proxies answer with a temporary failure.
  - L{FairPool}: a fair front for a L{ThreadPool}, so that one address flooding the
    password checks cannot delay the check of another address.

Nothing here blocks or reads the wall clock; everything but the functions run by
L{FairPool} happens on the reactor thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailgw.auth.portal import AAAUnavailable

__all__ = ["FairPool", "PenaltyTable", "PendingLimit", "limited"]

_T = TypeVar("_T")


class PenaltyTable:
    """
    Failed logins per client address in a sliding window (Dovecot's auth penalty).

    A failure recorded at time C{t} counts while C{clock.seconds() - t < window}.  With
    C{n} counting failures of an address, L{delay} is C{0} for C{n == 0}, else
    C{min(max_delay, 2 ** (n - 1))}: 1, 2, 4, 8, 15, 15 ... s with the defaults.

    Memory is bounded: at most C{max_entries} addresses are held, the one whose last
    failure is the oldest being dropped first; per address only the newest timestamps
    that can still raise the delay are kept.  Expired addresses are dropped lazily, each
    operation costing amortised O(1).  Addresses are used as given (IPv4 or IPv6 text).

    @ivar window: seconds a failure counts.
    @ivar max_delay: the largest delay L{delay} returns, in seconds.
    @ivar max_entries: the most addresses held.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        window: float = 900.0,
        max_delay: float = 15.0,
        max_entries: int = 10_000,
    ) -> None:
        """
        @param clock: the source of C{seconds()}.
        @param window: seconds a failure counts; must be positive.
        @param max_delay: the cap of the delay, in seconds; finite, not negative.
        @param max_entries: the most addresses held; must be positive.
        @raise ValueError: for a parameter out of its range.
        """
        if not window > 0:
            raise ValueError(f"window must be positive, not {window!r}")
        if not (max_delay >= 0 and math.isfinite(max_delay)):
            raise ValueError(f"max_delay must be finite and not negative, not {max_delay!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, not {max_entries!r}")
        self._clock = clock
        self.window = window
        self.max_delay = max_delay
        self.max_entries = max_entries
        # With k failures kept the delay is already 2 ** (k - 1) >= max_delay: older
        # failures cannot change it.
        self._keep = 1 if max_delay <= 1 else math.ceil(math.log2(max_delay)) + 1
        # Ordered by last failure, oldest first: the front is both the next to expire
        # and the least recently failed.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _expire(self, now: float) -> None:
        """
        Drop the addresses whose last failure no longer counts.

        @param now: the current time.
        """
        failures = self._failures
        while failures:
            address, stamps = next(iter(failures.items()))
            if now - stamps[-1] < self.window:
                return
            del failures[address]

    def failed(self, address: str) -> None:
        """
        Record a failed login from C{address} now.

        @param address: the client address.
        """
        now = self._clock.seconds()
        self._expire(now)
        stamps = self._failures.pop(address, None)
        if stamps is None:
            stamps = deque(maxlen=self._keep)
        stamps.append(now)
        self._failures[address] = stamps
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """
        Forget the failures of C{address}: it logged in.

        @param address: the client address.
        """
        self._failures.pop(address, None)
        self._expire(self._clock.seconds())

    def delay(self, address: str) -> float:
        """
        Return how long a new attempt from C{address} waits before any AAA work.

        @param address: the client address.
        @return: seconds: C{0.0} without a counting failure, else
            C{min(max_delay, 2 ** (n - 1))} for C{n} counting failures.
        """
        now = self._clock.seconds()
        self._expire(now)
        stamps = self._failures.get(address)
        if stamps is None:
            return 0.0
        while now - stamps[0] >= self.window:
            # Not empty: _expire left it, so its newest stamp still counts.
            stamps.popleft()
        return self.delay_for(len(stamps))

    @property
    def keep(self) -> int:
        """The most failures of an address that can still raise its delay."""
        return self._keep

    def delay_for(self, failures: int) -> float:
        """The delay of an address with C{failures} counting failures."""
        return 0.0 if failures <= 0 else float(min(self.max_delay, 2.0 ** (failures - 1)))

    def __len__(self) -> int:
        """
        @return: the number of addresses with a failure that still counts.
        """
        self._expire(self._clock.seconds())
        return len(self._failures)


class PendingLimit:
    """
    The C{max_pending} of one AAA server group [4.10]: how many checks may be queued or
    running at once.  Use it through L{limited}, which releases exactly once.

    @ivar name: the server group's name, for the error message.
    @ivar max_pending: the most checks held at once; C{0} or less means no limit.
    """

    def __init__(self, name: str, max_pending: int) -> None:
        """
        @param name: the server group's name.
        @param max_pending: the most checks held at once; C{0} or less means no limit.
        """
        self.name = name
        self.max_pending = max_pending
        self._pending = 0

    @property
    def pending(self) -> int:
        """The number of checks held now."""
        return self._pending

    def try_acquire(self) -> bool:
        """
        Take one place if one is free.

        @return: C{True} if a place was taken (then L{release} it exactly once), C{False}
            if C{max_pending} are already held.
        """
        if 0 < self.max_pending <= self._pending:
            return False
        self._pending += 1
        return True

    def release(self) -> None:
        """
        Give back a place taken by L{try_acquire}.

        @raise RuntimeError: if no place is held (a release without an acquire).
        """
        if self._pending <= 0:
            raise RuntimeError(f"release of {self.name!r} without a matching acquire")
        self._pending -= 1


async def limited(limit: PendingLimit, work: Callable[[], Awaitable[_T]]) -> _T:
    """
    Run C{work} holding a place of C{limit}, or refuse at once when it is full.

    The place is taken before C{work} is called and given back exactly once when the
    awaitable ends, whether it succeeds, fails or is cancelled (cancelling the
    L{Deferred} wrapping this coroutine cancels the awaited one, and the place is given
    back as the L{CancelledError<twisted.internet.defer.CancelledError>} passes).

    @param limit: the server group's limit.
    @param work: starts the check, returning what to await (e.g. a L{Deferred}).
    @return: the result of C{work}.
    @raise AAAUnavailable: at once, without calling C{work}, when C{limit} is full:
        a temporary failure for the client.
    """
    if not limit.try_acquire():
        raise AAAUnavailable(f"server group {limit.name!r} already has {limit.max_pending} checks pending")
    try:
        return await work()
    finally:
        limit.release()


class _Job:
    """One call queued in or handed to a L{FairPool}."""

    __slots__ = ("args", "cancelled", "function", "key", "limit", "result", "started")

    def __init__(
        self, key: _Key, function: Callable[..., Any], args: tuple[Any, ...], limit: PendingLimit | None = None
    ) -> None:
        self.key = key
        self.function = function
        self.args = args
        self.limit = limit
        self.result: Deferred[Any] | None = None
        self.started = False
        self.cancelled = False


class _Key:
    """The queued calls of one key of a L{FairPool} and how many of its calls run."""

    __slots__ = ("name", "queue", "running")

    def __init__(self, name: str) -> None:
        self.name = name
        # FIFO with O(1) removal of a cancelled call
        self.queue: OrderedDict[_Job, None] = OrderedDict()
        self.running = 0


class FairPool:
    """
    A fair front for a L{ThreadPool}: one client address flooding password checks cannot
    delay the checks of another address [4.10].

    At most C{concurrency} calls are handed to the thread pool at a time; the others wait
    in a FIFO queue per key (the client address).  When a slot frees, the next call is
    taken round-robin across the keys with queued calls, keys with fewer calls running
    first: a key with nothing running is served before any key that already holds a
    thread, and among keys holding the same number of threads each gets a turn before any
    gets a second one.  So a quiet address gets the very next free thread however many
    calls a flooding address has queued, and no key waits longer than until its own
    running calls end plus one turn of each key ahead of it.  A running call counts
    against its key until its thread returns, even when it was cancelled.

    Cancelling the L{Deferred} of a queued call removes it from the queue: it never runs.
    Cancelling that of a running call fails the L{Deferred} with L{CancelledError
    <twisted.internet.defer.CancelledError>} at once; the thread's result is discarded
    when it comes and only then is the slot free again.

    Everything but the functions themselves runs on the reactor thread.

    @ivar name: the pool's name, for logs and metrics.
    """

    _log = Logger()

    def __init__(self, reactor: Any, threadpool: ThreadPool, *, concurrency: int, name: str = "") -> None:
        """
        @param reactor: the reactor, for L{deferToThreadPool} (C{callFromThread}).
        @param threadpool: the thread pool that runs the functions.
        @param concurrency: the most calls handed to C{threadpool} at a time; at least 1.
        @param name: the pool's name, for logs and metrics.
        @raise ValueError: if C{concurrency} is less than 1.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency!r}")
        self._reactor = reactor
        self._threadpool = threadpool
        self._concurrency = concurrency
        self.name = name
        # keys with running or queued calls
        self._keys: dict[str, _Key] = {}
        # _waiting[n]: the keys with queued calls and n calls running, in turn order
        self._waiting: list[OrderedDict[str, _Key]] = [OrderedDict() for _ in range(concurrency + 1)]
        self._queued = 0
        self._running = 0
        self._started = 0

    @property
    def threadpool(self) -> ThreadPool:
        """The thread pool behind this front."""
        return self._threadpool

    @property
    def queued(self) -> int:
        """The number of calls waiting for a slot."""
        return self._queued

    @property
    def running(self) -> int:
        """The number of calls handed to the thread pool whose thread has not returned."""
        return self._running

    @property
    def started(self) -> int:
        """The number of calls handed to the thread pool so far."""
        return self._started

    def run(
        self, key: str, function: Callable[..., _T], *args: Any, limit: PendingLimit | None = None
    ) -> Deferred[_T]:
        """
        Call C{function(*args)} in the thread pool when it is C{key}'s turn.

        @param key: whose call it is (the client address).
        @param function: what to call in a thread.
        @param args: its positional arguments.
        @param limit: the server group's C{max_pending}: the call holds a place of it
            from now until it really ends — dropped from the queue, or its thread
            returned (a cancelled call that is running still holds its place, since
            its thread still works) [4.10].
        @return: a L{Deferred} firing with the result of C{function}, or failing with
            what it raised, or with L{CancelledError<twisted.internet.defer.CancelledError>}
            when cancelled, or at once with L{AAAUnavailable} when C{limit} is full.
        """
        if limit is not None and not limit.try_acquire():
            return fail(
                AAAUnavailable(f"server group {limit.name!r} already has {limit.max_pending} checks pending")
            )
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(key)
        job = _Job(state, function, args, limit)
        result: Deferred[_T] = Deferred(lambda _: self._cancel(job))
        job.result = result
        if not state.queue:
            self._waiting[state.running][key] = state
        state.queue[job] = None
        self._queued += 1
        self._pump()
        return result

    def _cancel(self, job: _Job) -> None:
        """
        The canceller of a call's L{Deferred}: the L{Deferred} then fails with
        L{CancelledError<twisted.internet.defer.CancelledError>}.

        @param job: the cancelled call.
        """
        job.cancelled = True
        if job.started:
            # The thread cannot be stopped: its slot frees when it returns.
            return
        state = job.key
        del state.queue[job]
        self._queued -= 1
        if job.limit is not None:
            job.limit.release()
        if not state.queue:
            del self._waiting[state.running][state.name]
            self._forget_if_idle(state)

    def _forget_if_idle(self, state: _Key) -> None:
        """
        Drop the state of a key with nothing queued or running.

        @param state: the key.
        """
        if not state.queue and state.running == 0:
            del self._keys[state.name]

    def _pump(self) -> None:
        """Hand queued calls to the thread pool while slots are free."""
        while self._running < self._concurrency and self._queued:
            # not empty while calls are queued: every key with queued calls is in one
            waiting = next(keys for keys in self._waiting if keys)
            name, state = waiting.popitem(last=False)
            job, _ = state.queue.popitem(last=False)
            self._queued -= 1
            state.running += 1
            if state.queue:
                self._waiting[state.running][name] = state
            self._running += 1
            self._started += 1
            job.started = True
            # The result comes back on the reactor thread (callFromThread), possibly
            # before deferToThreadPool returns: all bookkeeping is done by now.
            deferToThreadPool(self._reactor, self._threadpool, job.function, *job.args).addBoth(self._finished, job)

    def _finished(self, outcome: object, job: _Job) -> None:
        """
        A thread returned: free its slot, start the next call, deliver the outcome.

        @param outcome: the function's result or a L{Failure}.
        @param job: the call that ended.
        """
        state = job.key
        self._running -= 1
        if job.limit is not None:
            job.limit.release()
        if state.queue:
            del self._waiting[state.running][state.name]
            state.running -= 1
            self._waiting[state.running][state.name] = state
        else:
            state.running -= 1
            self._forget_if_idle(state)
        self._pump()
        result = job.result
        assert result is not None
        if job.cancelled:
            if isinstance(outcome, Failure):
                self._log.debug(
                    "Discarded the failure of a cancelled call in pool {pool}: {reason}",
                    pool=self.name,
                    reason=type(outcome.value).__name__,
                )
            return
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)
