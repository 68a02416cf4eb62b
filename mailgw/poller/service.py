"""The poller's scheduler: each enabled account polled on its interval [6].

L{PollerService} is a Twisted service.  Started, it reads the accounts from the state
store and schedules each enabled one, the first poll at a random moment within its
first minute (so that accounts do not all start together) and the next ones one
interval (+-10 %) after the previous poll ended.  One poll per account runs at a time:
a check-now (or a timer) that finds a poll running joins it and gets its report.  At
most C{max_concurrent} polls run together.

Gateways sharing the state database [11]: each poll holds the account's lease
(L{mailgw.poller.leases}); a poll that ends keeps it until this gateway's next poll of
the account is due, and a gateway refused the lease tries again when it runs out, so
that an account is polled about once per interval whatever the number of gateways.
Kept leases are released when the service stops, the poller is turned off, or the
account is disabled or deleted.

Counters per account (L{AccountMetrics}) are plain objects for the admin status and
the metrics endpoint; when a L{PollerMetricsSink} (L{mailgw.metrics.Metrics}) is given,
delivered and deleted counts are also added to its series.

Its L{accounts} (an L{Accounts}) is what the admin channel's account commands call
(the C{PollerAdmin} of L{mailgw.admin.responder}): C{list}, C{add}, C{edit},
C{delete}, C{check_now} (which joins a running poll) and C{summary}.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.admin.commands import NotAvailable
from mailgw.config import GatewayConfig, PollerConfig
from mailgw.poller.accounts import AccountNotFound, Accounts, PasswordCipher, PasswordUnreadable
from mailgw.poller.leases import AccountLease, LeaseTiming
from mailgw.poller.poll import Fault, Poll, PollReport, PollSettings
from mailgw.state import AccountRecord, IStateStore, Lease, StateError
from mailgw.upstream import Connector

__all__ = ["AccountMetrics", "PollerDisabled", "PollerMetricsSink", "PollerService"]

#: the longest wait for the first poll of an account after start-up or a change
FIRST_POLL_WINDOW = 60.0
#: how the error of a poll that failed on a bug begins (its lease is released)
INTERNAL_ERROR = "internal error: "


class PollerDisabled(NotAvailable):
    """``[poller] enabled = false`` (or the poller stops): no poll runs.  The admin
    channel answers it as C{NOT_AVAILABLE}."""


class PollerEnvironment(Protocol):
    """The parts of the configuration the poller reads (a L{mailgw.config.Config})."""

    @property
    def poller(self) -> PollerConfig: ...

    @property
    def gateway(self) -> GatewayConfig: ...


class PollerMetricsSink(Protocol):
    """Where delivered/deleted counts go besides L{AccountMetrics} (the Prometheus
    series of L{mailgw.metrics.Metrics})."""

    def poller_delivered(self, account: str, count: int = 1) -> None: ...

    def poller_deleted(self, account: str, count: int = 1) -> None: ...

    def forget_account(self, account: str) -> None: ...


@dataclass
class AccountMetrics:
    """Counters of one account since the daemon started."""

    polls: int = 0
    failed_polls: int = 0
    fetched: int = 0
    delivered: int = 0
    deleted: int = 0
    skipped: int = 0
    skipped_by_kind: Counter[str] = field(default_factory=Counter)
    possible_duplicates: int = 0
    last_poll_started: float | None = None
    last_poll_finished: float | None = None
    last_error: str | None = None

    def add(self, report: PollReport) -> None:
        self.polls += 1
        if not report.ok:
            self.failed_polls += 1
        self.fetched += report.fetched
        self.delivered += report.delivered
        self.deleted += report.deleted
        self.skipped += len(report.skipped)
        self.skipped_by_kind.update(skipped.kind for skipped in report.skipped)
        self.possible_duplicates += len(report.possible_duplicates)
        self.last_poll_started = report.started
        self.last_poll_finished = report.finished
        self.last_error = report.error

    def to_dict(self) -> dict[str, Any]:
        return {
            "polls": self.polls,
            "failed_polls": self.failed_polls,
            "fetched": self.fetched,
            "delivered": self.delivered,
            "deleted": self.deleted,
            "skipped": self.skipped,
            "skipped_by_kind": dict(self.skipped_by_kind),
            "possible_duplicates": self.possible_duplicates,
            "last_poll_started": self.last_poll_started,
            "last_poll_finished": self.last_poll_finished,
            "last_error": self.last_error,
        }


#: runs one poll: (account, password, progress callback, "stop soon?" predicate) → report
PollRunner = Callable[
    [AccountRecord, str, Callable[[PollReport], None] | None, Callable[[], bool]], Awaitable[PollReport]
]


class _Running:
    def __init__(self) -> None:
        self.waiters: list[defer.Deferred[PollReport]] = []
        self.deferred: defer.Deferred[PollReport] | None = None


class PollerService(Service):
    """Schedules and runs the polls of the remote POP accounts.

    @param config: the configuration (C{poller} and C{gateway} sections are read).
    @param state: the state store (accounts and journal); started before this service.
    @param connector: opens and logs in to the remote POP3 servers.
    @param cipher: encrypts the passwords; by default from C{state_dir/poller.key}
        (created 0600 if missing).
    @param fault: the crash tests' hook, called at each point of L{FAULT_POINTS}.
    @param metrics: optional Prometheus series (see L{PollerMetricsSink}).
    @param max_concurrent: how many accounts may be polled at the same time.
    @param settings: overrides the L{PollSettings} built from the configuration.
    @param clock: schedules the polls (default: C{reactor}).
    @param poll_runner: runs one poll (default: a L{Poll} over the real servers).
    @param rng: the jitter's random source.
    @param lease_timing: the lease timing of an account polled every so many
        seconds (L{LeaseTiming.for_interval}).
    """

    log = Logger()

    def __init__(
        self,
        config: PollerEnvironment,
        state: IStateStore,
        connector: Connector,
        reactor: Any,
        *,
        cipher: PasswordCipher | None = None,
        fault: Fault | None = None,
        metrics: PollerMetricsSink | None = None,
        max_concurrent: int = 4,
        stop_timeout: float = 30.0,
        settings: PollSettings | None = None,
        clock: IReactorTime | None = None,
        poll_runner: PollRunner | None = None,
        rng: random.Random | None = None,
        lease_timing: Callable[[float], LeaseTiming] = LeaseTiming.for_interval,
    ) -> None:
        self.setName("poller")
        self.config = config.poller
        self.state = state
        self.connector = connector
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self._fixed_settings = settings is not None
        self.settings = settings or PollSettings(
            smtp_host=config.poller.smtp_host,
            smtp_port=config.poller.smtp_port,
            node_name=config.gateway.node_name,
        )
        if cipher is None:
            state_dir = config.gateway.state_dir
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            cipher = PasswordCipher.from_key_file(state_dir / "poller.key")
        self.accounts = Accounts(
            state,
            cipher,
            self.clock,
            default_interval=config.poller.default_interval,
            check_now=self.poll,
            on_change=self._account_changed,
            annotate=self._annotate,
            summary=self.summary,
        )
        self.fault = fault
        self.poll_runner: PollRunner = poll_runner or self._run_poll
        self.metrics_sink = metrics
        self.stop_timeout = stop_timeout
        self._semaphore = defer.DeferredSemaphore(max(1, max_concurrent))
        self._random = rng or random.Random()
        self._timers: dict[int, IDelayedCall] = {}
        self._running: dict[int, _Running] = {}
        self.lease_timing = lease_timing
        #: the lease of each account being polled
        self._leases: dict[int, AccountLease] = {}
        #: the interval of each account as last read (the duration of its next lease)
        self._intervals: dict[int, int] = {}
        #: the node that held the lease of an account at this gateway's last attempt
        self._refused_by: dict[int, str] = {}
        #: the accounts whose lease this node kept after a poll, for its next one
        self._kept: set[int] = set()
        self._stopping = False
        self._started: defer.Deferred[None] | None = None
        #: per-account counters (account id → metrics)
        self.metrics: dict[int, AccountMetrics] = {}
        #: the last report of each account
        self.last_reports: dict[int, PollReport] = {}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def reconfigure(self, config: PollerEnvironment) -> None:
        """Take a reloaded configuration: the SMTP server and node name apply to the
        next polls (running ones finish as they are), the default interval to the next
        scheduling, and turning the poller off or on (un)schedules every account."""
        was_enabled = self.enabled
        self.config = config.poller
        if not self._fixed_settings:
            self.settings = PollSettings(
                smtp_host=config.poller.smtp_host,
                smtp_port=config.poller.smtp_port,
                node_name=config.gateway.node_name,
            )
        self.accounts.default_interval = config.poller.default_interval
        if was_enabled and not self.enabled:
            self._cancel_timers()
            self._release_kept()
            self.log.info("Remote POP poller disabled by the new configuration")
        elif self.enabled and not was_enabled and self.running and not self._stopping:
            self._started = defer.Deferred.fromCoroutine(self._schedule_all())
            self._started.addErrback(lambda f: self.log.failure("Cannot schedule the remote POP accounts", f))

    def _cancel_timers(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if not self.enabled:
            self.log.info("Remote POP poller disabled ([poller] enabled = false)")
            return
        self._started = defer.Deferred.fromCoroutine(self._schedule_all())
        self._started.addErrback(lambda f: self.log.failure("Cannot schedule the remote POP accounts", f))

    async def _schedule_all(self) -> None:
        records = await self.state.list_accounts()
        for record in records:
            self._intervals[record.id] = record.interval or self.config.default_interval
            if record.enabled and self.running:
                interval = record.interval or self.config.default_interval
                self._schedule(record.id, self._random.uniform(0, min(interval, FIRST_POLL_WINDOW)))
        self.log.info("Remote POP poller: {count} account(s) scheduled", count=sum(1 for r in records if r.enabled))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        self._cancel_timers()
        if self._started is not None and not self._started.called:
            self._started.cancel()
        running = [r.deferred for r in self._running.values() if r.deferred is not None]
        if running:
            # Polls stop after their current message (and release their lease); past
            # the time limit they are cancelled (the journal keeps them safe).
            waiting: defer.Deferred[Any] = defer.DeferredList(running, consumeErrors=True)
            waiting.addTimeout(self.stop_timeout, self.clock)
            try:
                await waiting
            except defer.TimeoutError:
                self.log.warn("Remote POP polls still running after {seconds} s: cancelled", seconds=self.stop_timeout)
        # The leases kept for the next polls: another gateway takes the accounts over
        # at its next attempt rather than when they would have run out.
        await self._release_kept()

    def _release_kept(self) -> defer.Deferred[None]:
        """Release the leases this node kept for its next polls (those of accounts
        being polled are the polls' to release or keep)."""
        accounts = [account_id for account_id in self._kept if account_id not in self._running]
        self._kept.difference_update(accounts)
        d = defer.Deferred.fromCoroutine(self._release_leases(accounts))
        d.addErrback(lambda f: self.log.failure("Cannot release the kept leases", f))
        return d

    async def _release_leases(self, accounts: list[int]) -> None:
        node = self.settings.node_name
        for account_id in accounts:
            try:
                await self.state.lease_release(account_id, node)
            except StateError as e:
                self.log.warn(
                    "Account {account}: cannot release the lease of {node} ({reason}); it runs out by itself",
                    account=account_id,
                    node=node,
                    reason=str(e),
                    kind="lease_release_failed",
                )
            else:
                self.log.debug(
                    "Account {account}: lease released by {node}",
                    account=account_id,
                    node=node,
                    kind="lease_released",
                )

    # -- scheduling ---------------------------------------------------------------------------

    def _schedule(self, account_id: int, delay: float) -> None:
        timer = self._timers.pop(account_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        if self._stopping or not self.running or not self.enabled:
            return
        self._timers[account_id] = self.clock.callLater(delay, self._due, account_id)

    def next_poll(self, account_id: int) -> float | None:
        """When the next scheduled poll of an account is due (clock seconds)."""
        timer = self._timers.get(account_id)
        return timer.getTime() if timer is not None and timer.active() else None

    def _due(self, account_id: int) -> None:
        self._timers.pop(account_id, None)
        self._start(account_id)

    def _account_changed(self, account_id: int) -> None:
        d = defer.Deferred.fromCoroutine(self._reschedule(account_id))
        d.addErrback(lambda f: self.log.failure("Cannot reschedule account {account}", f, account=account_id))

    async def _reschedule(self, account_id: int) -> None:
        record = await self.state.get_account(account_id)
        if record is None:
            timer = self._timers.pop(account_id, None)
            if timer is not None and timer.active():
                timer.cancel()
            self.metrics.pop(account_id, None)
            self.last_reports.pop(account_id, None)
            self._intervals.pop(account_id, None)
            self._refused_by.pop(account_id, None)
            self._kept.discard(account_id)  # deleting the account deleted its lease
            if self.metrics_sink is not None:
                self.metrics_sink.forget_account(str(account_id))
            return
        self._intervals[account_id] = record.interval or self.config.default_interval
        if not record.enabled:
            timer = self._timers.pop(account_id, None)
            if timer is not None and timer.active():
                timer.cancel()
            if account_id in self._kept:
                await self._release_kept_lease(account_id)
            return
        if account_id not in self._running:
            interval = record.interval or self.config.default_interval
            self._schedule(account_id, self._random.uniform(0, min(interval, FIRST_POLL_WINDOW) / 6))

    async def _release_kept_lease(self, account_id: int) -> None:
        if account_id in self._running:
            return
        self._kept.discard(account_id)
        await self._release_leases([account_id])

    # -- polls --------------------------------------------------------------------------------

    def poll(self, account_id: int, progress: Callable[[PollReport], None] | None = None) -> defer.Deferred[PollReport]:
        """Poll an account now, or join its running poll; fires with the report.

        Fails with L{PollerDisabled} when the poller is disabled, and with
        L{AccountNotFound} for an unknown account.
        """
        if not self.enabled:
            return defer.fail(PollerDisabled("the remote POP poller is disabled ([poller] enabled = false)"))
        if self._stopping:
            return defer.fail(PollerDisabled("the remote POP poller is stopping"))
        waiter: defer.Deferred[PollReport] = defer.Deferred()
        running = self._running.get(account_id)
        if running is not None:
            running.waiters.append(waiter)
        else:
            # The waiter first: a poll that ends at once (a store failing
            # synchronously) must still answer it.
            self._start(account_id, progress, waiter)
        return waiter

    def _start(
        self,
        account_id: int,
        progress: Callable[[PollReport], None] | None = None,
        waiter: defer.Deferred[PollReport] | None = None,
    ) -> _Running:
        running = self._running.get(account_id)
        if running is not None:
            return running
        running = self._running[account_id] = _Running()
        if waiter is not None:
            running.waiters.append(waiter)
        running.deferred = defer.Deferred.fromCoroutine(self._poll(account_id, progress))
        running.deferred.addBoth(self._done, account_id, running)
        return running

    def _done(self, result: Any, account_id: int, running: _Running) -> None:
        if self._running.get(account_id) is running:
            del self._running[account_id]
        if not running.waiters and not isinstance(result, PollReport):
            if not result.check(defer.CancelledError):
                self.log.failure("Poll of account {account} failed", result, account=account_id)
            return
        for waiter in running.waiters:
            if isinstance(result, PollReport):
                waiter.callback(result)
            else:
                waiter.errback(result)

    async def _poll(self, account_id: int, progress: Callable[[PollReport], None] | None) -> PollReport:
        await self._semaphore.acquire()
        try:
            return await self._leased_poll(account_id, progress)
        finally:
            self._semaphore.release()

    async def _leased_poll(self, account_id: int, progress: Callable[[PollReport], None] | None) -> PollReport:
        """Take the account's lease [11], poll, then keep the lease until this
        gateway's next poll of the account (L{_end_lease}).  The lease is asked for
        together with the account (one round trip, not two), for the duration of the
        interval last read; the timing is corrected once the account is read."""
        node = self.settings.node_name
        # A lease kept for this poll is taken again below; from now on it is the poll's.
        self._kept.discard(account_id)
        interval = self._intervals.get(account_id) or self.config.default_interval
        lease = AccountLease(self.state, account_id, node, self.lease_timing(interval), self.clock)
        acquiring = defer.Deferred.fromCoroutine(lease.acquire())
        taken: defer.Deferred[Lease | Exception | None] = acquiring.addErrback(_exception)
        try:
            record = await self.state.get_account(account_id)
        except StateError as e:
            await taken
            await lease.release()
            return self._unavailable(account_id, interval, e)
        except BaseException:
            await taken
            await lease.release()
            raise
        held = await taken
        if record is None:
            await lease.release()
            raise AccountNotFound(account_id)
        interval = self._intervals[account_id] = record.interval or self.config.default_interval
        if isinstance(held, Exception):
            if not isinstance(held, StateError):
                raise held
            return self._unavailable(account_id, interval, held, record.enabled)
        timing = self.lease_timing(interval)
        if held is None:
            return await self._refused(record, interval, timing)
        lease.retime(timing)
        previous = self._refused_by.pop(account_id, None)
        if previous is not None and previous != node:
            self.log.info(
                "Account {account}: lease taken over by {node} from {previous_node}, which held it at the last attempt",
                account=account_id,
                node=node,
                previous_node=previous,
                kind="lease_taken_over",
            )
        self._leases[account_id] = lease
        local_failure = False
        try:
            try:
                password = self.accounts.password(record)
            except PasswordUnreadable as e:
                now = self.clock.seconds()
                report = PollReport(account_id, started=now, finished=now, error=str(e))
                self.log.error("Account {account}: {reason}", account=account_id, reason=report.error)
                local_failure = True
            else:
                report = await self.poll_runner(
                    record, password, progress, lambda: self._stopping or lease.lost is not None
                )
                local_failure = (report.error or "").startswith(INTERNAL_ERROR)
        except BaseException:
            del self._leases[account_id]
            await lease.release()
            raise
        del self._leases[account_id]
        self._record(report)
        await self._end_lease(record, interval, timing, lease, local_failure)
        return report

    async def _end_lease(
        self, record: AccountRecord, interval: int, timing: LeaseTiming, lease: AccountLease, local_failure: bool
    ) -> None:
        """The poll ended: schedule the next one and keep the lease until slightly
        after it is due, so that the other gateways leave the account alone until
        then; release it instead when this gateway will not poll the account next
        (stopping, account disabled, the lease lost) or when the poll failed for a
        reason of this gateway's own (another gateway may do better)."""
        account_id = record.id
        if record.enabled:
            self._schedule(account_id, interval * self._random.uniform(0.9, 1.1))
        timer = self._timers.get(account_id)
        if timer is None or not timer.active() or lease.lost is not None or local_failure:
            await lease.release()
            return
        delay = timer.getTime() - self.clock.seconds()
        if await lease.keep(timing.kept_for(delay)):
            if self._stopping or self._timers.get(account_id) is not timer or not timer.active():
                # Stopped or unscheduled while the store answered: give it up after all.
                await lease.release()
            else:
                self._kept.add(account_id)

    def _unavailable(self, account_id: int, interval: int, error: StateError, enabled: bool = True) -> PollReport:
        """The state database failed the lease or the account: skip this round."""
        now = self.clock.seconds()
        report = PollReport(account_id, started=now, finished=now, error=f"state database unavailable: {error}")
        self.log.warn(
            "Account {account}: not polled this round, the state database failed: {reason}; next attempt in "
            "{interval} s",
            account=account_id,
            reason=str(error),
            interval=interval,
            kind="lease_unavailable",
        )
        self._record(report)
        if enabled:
            self._schedule(account_id, interval * self._random.uniform(0.9, 1.1))
        return report

    async def _refused(self, record: AccountRecord, interval: int, timing: LeaseTiming) -> PollReport:
        """Another node holds the lease: no poll (nothing counted); try again just
        after the lease runs out by the lease table (L{LeaseTiming.refused_retry};
        after C{timing.retry} if the table cannot be read), so that the account is
        taken over a few seconds after it was due if that node is dead, and left to
        it if it is alive (it takes its lease again before it runs out)."""
        self._kept.discard(record.id)
        try:
            holder = (await self.state.leases()).get(record.id)
        except StateError:
            holder = None
        # The lease table's times are on the store's clock: with clocks in step (NTP)
        # the difference is when the lease runs out from now.
        remaining = holder.expires - self.clock.seconds() if holder is not None else None
        node = holder.node if holder is not None else "another gateway"
        self._refused_by[record.id] = node
        self.log.debug(
            "Account {account}: not polled by {node}, {holder_node} holds its lease",
            account=record.id,
            node=self.settings.node_name,
            holder_node=node,
            kind="lease_held",
        )
        now = self.clock.seconds()
        if record.enabled:
            self._schedule(record.id, timing.refused_retry(remaining, interval, self._random.random()))
        return PollReport(record.id, started=now, finished=now, error=f"being polled by {node} (it holds the lease)")

    async def _run_poll(
        self,
        record: AccountRecord,
        password: str,
        progress: Callable[[PollReport], None] | None,
        stopping: Callable[[], bool],
    ) -> PollReport:
        poll = Poll(
            record,
            password,
            state=self.state,
            connector=self.connector,
            reactor=self.reactor,
            settings=self.settings,
            fault=self.fault,
            progress=progress,
            stopping=stopping,
            clock=self.clock,
            lease=self._leases.get(record.id),
        )
        try:
            return await poll.run()
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - outermost boundary of a poll: log it, keep the poller alive
            self.log.failure("Poll of account {account} failed", account=record.id)
            report = poll.report
            report.error = f"{INTERNAL_ERROR}{type(e).__name__}"
            report.finished = self.clock.seconds()
            return report

    def _record(self, report: PollReport) -> None:
        self.last_reports[report.account_id] = report
        metrics = self.metrics.setdefault(report.account_id, AccountMetrics())
        metrics.add(report)
        if self.metrics_sink is not None:
            if report.delivered:
                self.metrics_sink.poller_delivered(str(report.account_id), report.delivered)
            if report.deleted:
                self.metrics_sink.poller_deleted(str(report.account_id), report.deleted)

    # -- what the admin channel shows ---------------------------------------------------

    def summary(self) -> Mapping[str, Any]:
        """Totals for ``mailgwctl status``."""
        totals = AccountMetrics()
        for metrics in self.metrics.values():
            for name in ("polls", "failed_polls", "fetched", "delivered", "deleted", "skipped", "possible_duplicates"):
                setattr(totals, name, getattr(totals, name) + getattr(metrics, name))
        return {
            "state": "running" if self.running and self.enabled else "disabled" if not self.enabled else "stopped",
            "scheduled_accounts": len(self._timers),
            "polls_running": len(self._running),
            "polls": totals.polls,
            "failed_polls": totals.failed_polls,
            "fetched": totals.fetched,
            "delivered": totals.delivered,
            "deleted": totals.deleted,
            "skipped": totals.skipped,
            "possible_duplicates": totals.possible_duplicates,
        }

    def _annotate(self, account: dict[str, Any]) -> None:
        """Add the run-time details to an account's dict."""
        account_id = account["id"]
        account["next_poll"] = self.next_poll(account_id)
        account["polling"] = account_id in self._running
        metrics = self.metrics.get(account_id)
        report = self.last_reports.get(account_id)
        account["last_poll"] = report.finished if report is not None else None
        account["last_result"] = _last_result(report) if report is not None else None
        account["metrics"] = (metrics or AccountMetrics()).to_dict()


def _exception(failure: Failure) -> Exception:
    """A failure's exception, as a result (to be looked at later)."""
    error = failure.value
    return error if isinstance(error, Exception) else RuntimeError(repr(error))


def _last_result(report: PollReport) -> str:
    if report.error:
        return f"failed: {report.error}"
    text = f"{report.delivered} delivered, {report.deleted} deleted"
    if report.skipped:
        text += f", {len(report.skipped)} skipped"
    return text
