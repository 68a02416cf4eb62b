"""The session directory: logins counted across gateways [5.5, 11].

An L{ISessionDirectory} is told of every login (L{ISessionDirectory.claim}, after the
local registry counted it) and every end (L{ISessionDirectory.withdraw}); it lists
sessions and logs them off wherever they are.

  - L{LocalDirectory}: one gateway; the registry is the whole truth, so claiming and
    withdrawing cost nothing.
  - L{SharedDirectory}: gateways sharing a PostgreSQL database ([state] backend =
    "postgresql").  A login is published as a row (L{mailgw.state.directory}); the
    user's live sessions on the other gateways come back in the same transaction, and
    logins beyond C{simultaneous_logins} there are asked to log off (each gateway
    takes the log-offs asked of it every L{SharedDirectory.poll_interval}).  A
    heartbeat every L{SharedDirectory.heartbeat_interval} keeps a gateway's rows
    counting; L{SharedDirectory.stale_after} after a gateway's last beat (it died)
    they no longer count.  The database down: a login fails with a temporary error
    (L{DirectoryUnavailable}) within the store's call timeout, never hangs, and works
    again once the database is back.

Across gateways a login's idleness is not known: the logins logged off there are the
oldest ones (by their start), where the local registry uses idleness [5.5].
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailgw.auth.limits import PenaltyTable
from mailgw.auth.radius import TerminateCause
from mailgw.proxy.registry import SessionInfo, SessionRegistry, SessionState
from mailgw.state import StateError
from mailgw.state import directory as sql
from mailgw.state.directory import DirectorySession

__all__ = ["DirectoryUnavailable", "ISessionDirectory", "LocalDirectory", "SharedDirectory"]


T = TypeVar("T")


class Transactions(typing.Protocol):
    """What the directory needs of its store (L{mailgw.state.postgresql.PostgreSQLState})."""

    def transaction(self, f: Callable[[Any], T]) -> defer.Deferred[T]: ...


class DirectoryUnavailable(Exception):
    """The shared directory cannot be reached: the login is answered a temporary failure."""


class ISessionDirectory(Interface):
    """Where logins are counted beyond this process."""

    def claim(info: SessionInfo, limit: int) -> defer.Deferred[None]:  # noqa: N805
        """C{info} logged in (the local registry has counted it, with C{limit} for its
        user): publish it and log off logins elsewhere beyond C{limit}.  Fails with
        L{DirectoryUnavailable}."""

    def withdraw(info: SessionInfo) -> None:  # noqa: N805
        """C{info} ended (or its login did not complete)."""

    def sessions() -> defer.Deferred[list[DirectorySession]]:
        """The sessions of the other gateways (this one's are in its registry)."""

    def kill(session_id: str) -> defer.Deferred[DirectorySession | None]:  # noqa: N805
        """Ask the gateway holding C{session_id} (not this one) to log it off; fires
        with it, or C{None} when no live gateway holds it."""

    def failed(ip: str) -> None:  # noqa: N805
        """A login from C{ip} failed (the failure penalty [4.10], across gateways)."""

    def succeeded(ip: str) -> None:  # noqa: N805
        """A login from C{ip} succeeded: its failures are forgotten everywhere."""

    def delay(ip: str) -> defer.Deferred[float]:  # noqa: N805
        """The penalty of C{ip} by the failures every gateway saw (0 when unknown)."""


@implementer(ISessionDirectory)
class LocalDirectory:
    """One gateway: nothing beyond the registry."""

    def claim(self, info: SessionInfo, limit: int) -> defer.Deferred[None]:
        return defer.succeed(None)

    def withdraw(self, info: SessionInfo) -> None:
        pass

    def sessions(self) -> defer.Deferred[list[DirectorySession]]:
        return defer.succeed([])

    def kill(self, session_id: str) -> defer.Deferred[DirectorySession | None]:
        return defer.succeed(None)

    def failed(self, ip: str) -> None:
        pass

    def succeeded(self, ip: str) -> None:
        pass

    def delay(self, ip: str) -> defer.Deferred[float]:
        return defer.succeed(0.0)


def _logins(sessions: Sequence[DirectorySession]) -> list[list[DirectorySession]]:
    """The sessions grouped by login (node, client address, protocol), oldest first."""
    groups: dict[tuple[str, str, str], list[DirectorySession]] = {}
    for s in sessions:
        groups.setdefault((s.node, s.client_ip, s.protocol), []).append(s)
    return sorted(groups.values(), key=lambda group: min(s.started for s in group))


@implementer(ISessionDirectory)
class SharedDirectory(MultiService):
    """The directory in a shared PostgreSQL database (see the module docstring).

    @param store: a L{mailgw.state.postgresql.PostgreSQLState} (its C{transaction}).
    """

    log = Logger()
    heartbeat_interval = 10.0
    stale_after = 30.0
    poll_interval = 1.0

    def __init__(
        self,
        store: Transactions,
        registry: SessionRegistry,
        node: str,
        clock: IReactorTime,
        *,
        penalty: PenaltyTable | None = None,
        heartbeat_interval: float | None = None,
        stale_after: float | None = None,
        poll_interval: float | None = None,
    ) -> None:
        super().__init__()
        self._store = store
        self._registry = registry
        self.node = node
        self._clock = clock
        if heartbeat_interval is not None:
            self.heartbeat_interval = heartbeat_interval
        if stale_after is not None:
            self.stale_after = stale_after
        if poll_interval is not None:
            self.poll_interval = poll_interval
        self._failing = False
        #: the local table's rules (window, cap) apply to the shared failures too
        self._penalty = penalty if penalty is not None else PenaltyTable(clock)
        for interval, call in ((self.heartbeat_interval, self._beat), (self.poll_interval, self._poll)):
            timer = TimerService(interval, call)
            timer.clock = clock
            timer.setServiceParent(self)

    # -- ISessionDirectory -------------------------------------------------------------

    def claim(self, info: SessionInfo, limit: int) -> defer.Deferred[None]:
        assert info.user is not None
        record = DirectorySession(
            self.node, info.session_id, info.login_id or info.session_id, info.protocol, info.client,
            info.client_ip, info.user, info.mail_user, info.group_policy, info.upstream, info.started,
        )  # fmt: skip
        d = self._store.transaction(lambda db: sql.claim(db, record, self.stale_after))
        return d.addCallbacks(lambda others: self._evict(info, limit, others), self._unavailable)

    def withdraw(self, info: SessionInfo) -> None:
        if info.state is not SessionState.AUTHENTICATED or info.user is None:
            return
        node, session_id = self.node, info.session_id
        # A withdraw lost to an outage is made good by the next heartbeat.
        self._store.transaction(lambda db: sql.withdraw(db, node, session_id)).addErrback(lambda _: None)

    def sessions(self) -> defer.Deferred[list[DirectorySession]]:
        d = self._store.transaction(lambda db: sql.live_sessions(db, self.stale_after))
        return d.addCallbacks(lambda rows: [r for r in rows if r.node != self.node], self._unavailable)

    def kill(self, session_id: str) -> defer.Deferred[DirectorySession | None]:
        def find(db: Any) -> DirectorySession | None:
            row = sql.find_session(db, session_id, self.stale_after)
            if row is None or row.node == self.node:
                return None
            sql.request_kill(db, row.node, [session_id], f"killed by the administrator (from {self.node})")
            return row

        return self._store.transaction(find).addErrback(self._unavailable)

    def failed(self, ip: str) -> None:
        window, keep = self._penalty.window, self._penalty.keep
        self._store.transaction(lambda db: sql.record_failure(db, ip, window, keep)).addErrback(lambda _: None)

    def succeeded(self, ip: str) -> None:
        self._store.transaction(lambda db: sql.forget_failures(db, ip)).addErrback(lambda _: None)

    def delay(self, ip: str) -> defer.Deferred[float]:
        window = self._penalty.window

        def delay(count: int) -> float:
            return self._penalty.delay_for(count)

        d = self._store.transaction(lambda db: sql.count_failures(db, ip, window))
        # The database away: the local table's penalty still applies (the login's
        # claim will answer the temporary failure).
        return d.addCallbacks(delay, lambda _: 0.0)

    # -- internals ---------------------------------------------------------------------

    def _unavailable(self, failure: Failure) -> Failure:
        failure.trap(StateError, defer.TimeoutError)
        return Failure(DirectoryUnavailable(f"the session directory is unavailable: {failure.getErrorMessage()}"))

    def _evict(self, info: SessionInfo, limit: int, others: list[DirectorySession]) -> None:
        mine = (info.client_ip, info.protocol)
        remote = [group for group in _logins(others) if (group[0].client_ip, group[0].protocol) != mine]
        local = self._registry.login_count(info.user or "")
        excess = local + len(remote) - limit
        if excess <= 0:
            return
        victims = remote[:excess]
        reason = f"logged off: simultaneous_logins reached by session {info.session_id} on {self.node}"

        def ask(db: Any) -> None:
            for group in victims:
                sql.request_kill(db, group[0].node, [s.session_id for s in group], reason)

        for group in victims:
            for victim in group:
                self.log.info(
                    "Logging off session {victim_session_id} of {user} on {victim_node}: simultaneous_logins "
                    "{limit} reached by session {session_id}",
                    victim_session_id=victim.session_id,
                    victim_node=victim.node,
                    session_id=info.session_id,
                    user=info.user,
                    limit=limit,
                )
        self._store.transaction(ask).addErrback(
            lambda f: self.log.failure("Asking other gateways to log sessions off failed", f)
        )

    def _held(self) -> list[str]:
        return [
            info.session_id
            for info in self._registry.sessions()
            if info.state is SessionState.AUTHENTICATED and info.user is not None and not info.closing
        ]

    def _beat(self) -> defer.Deferred[None]:
        node, held, window = self.node, self._held(), self._penalty.window

        def beat(db: Any) -> None:
            # Also the reset at start: rows an earlier run of this node left are not held.
            sql.heartbeat(db, node, held)
            sql.prune_failures(db, window)

        d = self._store.transaction(beat)

        def done(_: object) -> None:
            if self._failing:
                self._failing = False
                self.log.info("The session directory is reachable again")

        def failed(failure: Failure) -> None:
            if not self._failing:
                self._failing = True
                self.log.warn(
                    "The session directory is unreachable: {reason}", reason=failure.getErrorMessage()
                )

        return d.addCallbacks(done, failed)

    def _poll(self) -> defer.Deferred[None]:
        node = self.node
        d = self._store.transaction(lambda db: sql.take_kills(db, node))

        def kill(requests: list[tuple[str, str]]) -> None:
            for session_id, reason in requests:
                info = self._registry.get(session_id)
                if info is not None and not info.closing:
                    admin = reason.startswith("killed by the administrator")
                    info.owner.terminate(reason, TerminateCause.ADMIN_RESET if admin else TerminateCause.PORT_PREEMPTED)

        return d.addCallbacks(kill, lambda _: None)
