"""Poller account leases [11]: one gateway at a time polls an account, about once per
interval across all the gateways.

Gateways sharing one state database (PostgreSQL) each run a poller over the same
accounts.  Before polling an account a poller takes the account's lease in the store
(L{mailgw.state.IStateStore.lease_acquire}) under its node name and renews it while the
poll runs.  A poller that finds the lease held by another node does not poll.

One poll per interval, not one per gateway.  Every gateway keeps its own schedule, so
if the lease were released when a poll ends, the next gateway due would take it at
once and each account would be polled about N times per interval by N gateways (each
poll exclusive, but N times the logins at the remote server).  So a poll that ends
normally does not release its lease: it I{keeps} it (L{AccountLease.keep}), renewed
once to run out L{LeaseTiming.slack} seconds after this gateway's next poll of the
account is due (one interval, +-10 %, after the poll ended).  When that poll comes the
same node's C{lease_acquire} succeeds (it renews the lease it holds) and the lease is
renewed as usual while it runs.  A gateway refused the lease reads when it runs out
(L{mailgw.state.Lease.expires}, from the lease table) and tries again just after
(L{LeaseTiming.refused_retry}: up to half a slack later), not sooner.  So with a live
holder the others are refused once or twice per interval and never poll, and when the
holder dies (between polls or during one) its lease runs out by itself and the account
is polled by another gateway at most about 1.5 slack after it was due (during a poll,
within one lease duration of the last renewal, as before).  The lease table's times
are on the store's clock, the retry on the gateway's: clocks out of step (no NTP) only
delay a takeover, by the difference, never beyond one interval and two slacks.

The lease is released for real (L{AccountLease.release}) when this gateway will not
poll the account next: the service stops (its running polls end, then every kept lease
is released) or the poller is turned off, the account is disabled or deleted, the
lease was lost during the poll (another node may hold it), and the poll failed for a
reason that belongs to this gateway (its password key cannot decrypt the account, or
an internal error), so that another gateway may try at its next attempt.  A poll that
fails for the remote side (connection, login, POP3 errors) or the SMTP relay keeps the
lease like a successful one: retrying at every gateway would multiply the failed logins
the remote server sees, and those failures are the same from any gateway.

Timing while a poll runs (L{LeaseTiming.for_interval}): a lease lasts half the
account's interval (at least L{MIN_DURATION} seconds) and is renewed every quarter of
that.  When a gateway dies holding a lease during a poll, the lease runs out at most
one duration after its last renewal, and the other gateways, which try again when
they saw it would run out, take the account over within one interval of the death.

Safety.  The store's clock decides when a lease runs out; the poller's own clock only
ever shortens it: a renewal sent at local time I{t} for I{d} seconds makes the store
hold the lease until at least I{t + d} (the store's "now" comes after I{t}).  The
poller considers the lease lost at I{t + d - margin} unless a later renewal was
confirmed, and when a renewal answers that another node holds the lease, or fails.
A lost lease stops the poll at once (L{AccountLease.on_lost}): an SMTP DATA under way
is cut before its final dot (the SMTP server voids it, the journal goes back to
"seen"), no further message is started, and the POP3 session ends with QUIT, which
applies only the deletions of messages the journal records as delivered or dropped.
A DATA whose final dot has gone out is left to finish: its "delivered" commit is what
the next holder needs to read (cutting it would only turn it into a possible
duplicate).  So no
message is delivered by a gateway after the lease could have passed to another, and
the delivery journal [6] keeps its exactly-once guarantee across a takeover: the new
holder reads the journal its predecessor committed.  A kept lease changes none of
this: between polls nothing is delivered, and the next poll starts by taking the lease
again (a kept lease that ran out meanwhile may have gone to another node).  (A gateway
frozen longer than the margin between its check and its next write, with no fencing in
POP3 or SMTP, is the limit of any lease scheme.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.state import IStateStore, Lease, StateError

__all__ = ["MIN_DURATION", "AccountLease", "LeaseLost", "LeaseTiming", "PollLease"]

#: the shortest lease, whatever the interval (a few round trips to the database)
MIN_DURATION = 2.0


class LeaseLost(Exception):
    """The poller no longer holds the lease of the account it polls: the poll stops.
    The message is the reason, for the poll report."""


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """How long a lease lasts and when it is renewed, in seconds.

    @ivar duration: what a lease is taken or renewed for.
    @ivar renew_every: the time between renewals while a poll runs.
    @ivar margin: the lease counts as lost this long before it would run out
        unrenewed (from the sending of the last confirmed renewal).
    @ivar retry: the wait before trying again when another node holds the lease and
        its end is not known (the lease table could not be read).
    @ivar slack: how long a kept lease outlasts the holder's next due poll (for that
        poll to take it again before it runs out), and the most the other nodes wait
        past its end (half of it) before trying again.
    """

    duration: float
    renew_every: float
    margin: float
    retry: float
    slack: float = MIN_DURATION

    def kept_for(self, delay: float) -> float:
        """What a lease is renewed for when a poll ends and the next is due in
        C{delay} seconds."""
        return delay + self.slack

    def refused_retry(self, remaining: float | None, interval: float, jitter: float) -> float:
        """When to try again after a refusal: C{jitter} (0 to 1) of half a slack after
        the lease runs out (C{remaining} seconds from now by the lease table, C{None}
        if unknown: then after L{retry}), at most one interval and two slacks away."""
        if remaining is None:
            return self.retry * (0.9 + 0.1 * jitter)
        longest = interval * 1.1 + 2 * self.slack
        return min(max(0.0, remaining) + self.slack * (0.1 + 0.4 * jitter), longest)

    @classmethod
    def for_interval(cls, interval: float) -> LeaseTiming:
        """The timing of an account polled every C{interval} seconds: a dead
        gateway's account is taken over within C{duration + retry = interval} (for
        intervals of at least 2 L{MIN_DURATION})."""
        duration = max(MIN_DURATION, interval / 2)
        return cls(
            duration=duration,
            renew_every=duration / 4,
            margin=duration / 3,
            retry=max(MIN_DURATION, interval - duration),
            slack=min(MIN_DURATION, interval / 4),
        )


class PollLease(Protocol):
    """What a poll sees of its lease (an L{AccountLease})."""

    @property
    def lost(self) -> LeaseLost | None:
        """Why the lease was lost, or C{None} while it is held."""

    def on_lost(self, callback: Callable[[LeaseLost], None]) -> None:
        """Call C{callback} (once) when the lease is lost."""


class AccountLease:
    """The lease of one account for one poll by one node.

    L{acquire} takes it; from then on it is renewed every C{timing.renew_every}
    seconds until L{release} (given up) or L{keep} (renewed once more, for the node's
    next poll of the account, and no longer renewed).  It is lost (L{lost} set, L{on_lost} callbacks called)
    when a renewal answers that the node no longer holds it, when a renewal fails, or
    when no renewal was confirmed in time.

    @param store: the state store holding the leases.
    @param account_id: the account.
    @param node: this gateway's node name (C{[gateway] node_name}).
    @param timing: durations and periods (L{LeaseTiming.for_interval}).
    @param clock: schedules the renewals and the deadline.
    """

    log = Logger()

    def __init__(
        self, store: IStateStore, account_id: int, node: str, timing: LeaseTiming, clock: IReactorTime
    ) -> None:
        self.store = store
        self.account_id = account_id
        self.node = node
        self.timing = timing
        self.clock = clock
        #: the lease as last confirmed by the store (its times on the store's clock)
        self.lease: Lease | None = None
        self._lost: LeaseLost | None = None
        self._callbacks: list[Callable[[LeaseLost], None]] = []
        self._renewal: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._renewing = False
        self._released = False

    @property
    def lost(self) -> LeaseLost | None:
        return self._lost

    def on_lost(self, callback: Callable[[LeaseLost], None]) -> None:
        if self._lost is not None:
            callback(self._lost)
        else:
            self._callbacks.append(callback)

    async def acquire(self) -> Lease | None:
        """Take the lease: fires with it, or with C{None} when another node holds it;
        fails with L{StateError} when the store cannot answer."""
        sent = self.clock.seconds()
        duration = self.timing.duration
        lease = await self.store.lease_acquire(self.account_id, self.node, duration)
        if lease is None:
            return None
        self.lease = lease
        self.log.debug(
            "Account {account}: lease taken by {node} for {duration} s",
            account=self.account_id,
            node=self.node,
            duration=duration,
            kind="lease_acquired",
        )
        self._confirmed(sent, duration)
        if self._lost is None:
            self._arm_renewal()
        return lease

    def retime(self, timing: LeaseTiming) -> None:
        """Use C{timing} from the next renewal on (the account's interval, read after
        the lease was taken, differs from the one the lease was taken for)."""
        if timing == self.timing:
            return
        self.timing = timing
        if self._renewal is not None:
            self._arm_renewal()

    async def keep(self, duration: float) -> bool:
        """Stop renewing and renew the lease once for C{duration} seconds, to be
        taken again by this node's next poll (see the module docstring); fires with
        whether the store confirmed it (never fails: a lease that cannot be kept runs
        out by itself, and another node may take it).  A lost lease is not kept."""
        self._released = True
        self._cancel()
        if self.lease is None or self._lost is not None:
            return False
        try:
            lease = await self.store.lease_renew(self.account_id, self.node, duration)
        except StateError as e:
            self.log.warn(
                "Account {account}: cannot keep the lease of {node} ({reason}); it runs out by itself",
                account=self.account_id,
                node=self.node,
                reason=str(e),
                kind="lease_keep_failed",
            )
            return False
        if lease is None:
            return False
        self.lease = lease
        self.log.debug(
            "Account {account}: lease kept by {node} for {duration} s, until its next poll",
            account=self.account_id,
            node=self.node,
            duration=duration,
            kind="lease_kept",
        )
        return True

    async def release(self) -> None:
        """Stop renewing and give the lease up (never fails: a lease that cannot be
        released runs out by itself)."""
        self._released = True
        self._cancel()
        if self.lease is None:
            return
        try:
            await self.store.lease_release(self.account_id, self.node)
        except StateError as e:
            self.log.warn(
                "Account {account}: cannot release the lease of {node} ({reason}); it runs out by itself",
                account=self.account_id,
                node=self.node,
                reason=str(e),
                kind="lease_release_failed",
            )
        else:
            self.log.debug(
                "Account {account}: lease released by {node}",
                account=self.account_id,
                node=self.node,
                kind="lease_released",
            )

    # -- renewals ------------------------------------------------------------------------

    def _arm_renewal(self) -> None:
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = self.clock.callLater(self.timing.renew_every, self._renew)

    def _renew(self) -> None:
        self._renewal = None
        if self._lost is not None or self._released or self._renewing:
            return
        self._renewing = True
        sent = self.clock.seconds()
        duration = self.timing.duration
        d = self.store.lease_renew(self.account_id, self.node, duration)
        d.addCallbacks(self._renewed, self._renewal_failed, callbackArgs=(sent, duration))
        d.addErrback(lambda f: self.log.failure("Account {account}: lease renewal", f, account=self.account_id))

    def _renewed(self, lease: Lease | None, sent: float, duration: float) -> None:
        self._renewing = False
        if self._lost is not None or self._released:
            return
        if lease is None:
            self._lose("the lease was lost: another gateway holds it or it was released")
            return
        self.lease = lease
        self._confirmed(sent, duration)
        if self._lost is None:
            self._arm_renewal()

    def _renewal_failed(self, failure: Failure) -> None:
        self._renewing = False
        if self._lost is not None or self._released:
            return
        if failure.check(StateError):
            self._lose(f"the lease could not be renewed: {failure.getErrorMessage()}")
        else:
            self.log.failure("Account {account}: lease renewal failed", failure, account=self.account_id)
            self._lose("the lease could not be renewed: internal error")

    def _confirmed(self, sent: float, duration: float) -> None:
        """A request sent at C{sent} for C{duration} seconds succeeded: move the
        deadline to C{margin} before the earliest the store can let the lease go."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        remaining = sent + duration - self.timing.margin - self.clock.seconds()
        if remaining <= 0:
            self._lose("the lease was confirmed too late to rely on")
            return
        self._deadline = self.clock.callLater(remaining, self._overdue)

    def _overdue(self) -> None:
        self._deadline = None
        self._lose("no renewal of the lease was confirmed in time")

    def _lose(self, reason: str) -> None:
        if self._lost is not None:
            return
        self._cancel()
        self._lost = LeaseLost(reason)
        self.log.warn(
            "Account {account}: {node} stops polling it: {reason}",
            account=self.account_id,
            node=self.node,
            reason=reason,
            kind="lease_lost",
        )
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self._lost)

    def _cancel(self) -> None:
        for call in (self._renewal, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._renewal = self._deadline = None
