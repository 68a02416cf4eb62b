"""The supervisor's tables of what every worker process does [10] (the role of
Dovecot's anvil): the logins of all workers, so that simultaneous logins [5.5] hold
across them, and their non-authenticated sessions, so that each proxy's
C{unauthenticated_session_limit} [4.4] does.  The failure penalty [4.10] is a
L{PenaltyTable} the supervisor keeps beside these.

Pure bookkeeping: what must be logged off comes back as L{LogOff}s for the caller to
send to the workers; nothing here talks to a process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mailgw.proxy.registry import Oldest
from mailgw.state.directory import DirectorySession

__all__ = ["Anvil", "LogOff", "PendingSession", "parse_events"]

#: the two non-authenticated states, as the workers report them
UNAUTHENTICATED, AUTHENTICATING = "u", "a"


@dataclass(frozen=True)
class LogOff:
    """Ask worker C{worker} to end C{session_ids} for C{reason}."""

    worker: int
    session_ids: tuple[str, ...]
    reason: str
    #: the RADIUS Acct-Terminate-Cause of their accounting Stops
    cause: str = "Port-Preempted"


@dataclass(eq=False, slots=True)
class PendingSession:
    """A worker's session that has not logged in (yet)."""

    worker: int
    session_id: str
    protocol: str
    started: float
    state: str
    serial: int = field(default=0)


def parse_events(report: object) -> list[tuple[str, ...]]:
    """The events of one C{Pending} report (a JSON list): C{["+", id, protocol,
    started, state]} (arrived or changed state) and C{["-", id]} (logged in or gone);
    anything else is left out."""
    events: list[tuple[str, ...]] = []
    for item in report if isinstance(report, list) else ():
        if not isinstance(item, list) or not all(isinstance(f, str | int | float) for f in item):
            continue
        fields = [str(f) for f in item]
        if fields and ((fields[0] == "+" and len(fields) == 5) or (fields[0] == "-" and len(fields) == 2)):
            if fields[0] == "-" or fields[4] in (UNAUTHENTICATED, AUTHENTICATING):
                events.append(tuple(fields))
    return events


class Anvil:
    """Every worker's logins and non-authenticated sessions.

    @param limits: protocol (as the registry names it) → its proxy's
        C{unauthenticated_session_limit} (0 or missing: none).
    """

    def __init__(self, limits: Mapping[str, int] | None = None) -> None:
        self.limits: dict[str, int] = dict(limits or {})
        #: worker → session id → its login
        self._logins: dict[int, dict[str, DirectorySession]] = {}
        #: VPN user → the (worker, session id) of their logins
        self._by_user: dict[str, set[tuple[int, str]]] = {}
        self._pending: dict[tuple[str, str], Oldest[PendingSession]] = {}
        self._pending_by_id: dict[tuple[int, str], PendingSession] = {}
        self._serial = 0

    # -- logins [5.5] -----------------------------------------------------------------

    def claim(
        self, worker: int, session: DirectorySession, limit: int, local: Iterable[tuple[str, str]]
    ) -> list[LogOff]:
        """Worker C{worker} counted C{session} (its local logins of that user, by client
        address and protocol, are C{local}, this one included): record it and return
        the log-offs of other workers' logins beyond C{limit}, oldest first.  A login
        is one user from one address over one protocol, wherever its connections are:
        another worker's connection of a login this worker holds too is not another
        login."""
        self._logins.setdefault(worker, {})[session.session_id] = session
        self._by_user.setdefault(session.user, set()).add((worker, session.session_id))
        mine = set(local) | {(session.client_ip, session.protocol)}
        remote: dict[tuple[str, str], list[tuple[int, DirectorySession]]] = {}
        for other_worker, session_id in self._by_user.get(session.user, ()):
            if other_worker == worker:
                continue
            other = self._logins[other_worker][session_id]
            key = (other.client_ip, other.protocol)
            if key not in mine:
                remote.setdefault(key, []).append((other_worker, other))
        excess = len(mine) + len(remote) - limit
        if excess <= 0:
            return []
        oldest = sorted(remote.values(), key=lambda group: min(s.started for _, s in group))
        reason = f"logged off: simultaneous_logins reached by session {session.session_id} on {session.node}"
        per_worker: dict[int, list[str]] = {}
        for group in oldest[:excess]:
            for other_worker, other in group:
                per_worker.setdefault(other_worker, []).append(other.session_id)
                self.withdraw(other_worker, other.session_id)
        return [LogOff(w, tuple(ids), reason) for w, ids in sorted(per_worker.items())]

    def withdraw(self, worker: int, session_id: str) -> None:
        """A login ended (or did not complete)."""
        session = self._logins.get(worker, {}).pop(session_id, None)
        if session is None:
            return
        keys = self._by_user.get(session.user)
        if keys is not None:
            keys.discard((worker, session_id))
            if not keys:
                del self._by_user[session.user]

    def logins(self) -> list[DirectorySession]:
        """Every worker's logins, oldest first."""
        return sorted((s for sessions in self._logins.values() for s in sessions.values()), key=lambda s: s.started)

    def login_count(self, user: str) -> int:
        """How many logins (address and protocol) C{user} has across the workers."""
        return len(
            {(self._logins[w][sid].client_ip, self._logins[w][sid].protocol) for w, sid in self._by_user.get(user, ())}
        )

    # -- non-authenticated sessions [4.4] -----------------------------------------------

    def _bucket(self, protocol: str, state: str) -> Oldest[PendingSession]:
        bucket = self._pending.get((protocol, state))
        if bucket is None:
            bucket = self._pending[(protocol, state)] = Oldest()
        return bucket

    def pending(self, worker: int, events: Iterable[tuple[str, ...]]) -> list[LogOff]:
        """Apply worker C{worker}'s report (L{parse_events}) and return the log-offs
        that keep each protocol within its limit: the oldest unauthenticated sessions
        first, then the oldest authenticating ones, never one that arrived in this
        report (the worker itself kept its own within the limit)."""
        arrived: dict[str, set[PendingSession]] = {}
        for event in events:
            key = (worker, event[1])
            known = self._pending_by_id.get(key)
            if known is not None:
                self._bucket(known.protocol, known.state).discard(known)
            if event[0] == "-":
                self._pending_by_id.pop(key, None)
                continue
            _, session_id, protocol, started, state = event
            if known is None:
                self._serial += 1
                try:
                    known = PendingSession(worker, session_id, protocol, float(started), state, self._serial)
                except ValueError:
                    continue
                self._pending_by_id[key] = known
                arrived.setdefault(protocol, set()).add(known)
            known.state = state
            self._bucket(protocol, state).add(known)
        result: list[LogOff] = []
        for protocol, newcomers in arrived.items():
            limit = self.limits.get(protocol, 0)
            if limit <= 0:
                continue
            unauthenticated = self._bucket(protocol, UNAUTHENTICATED)
            authenticating = self._bucket(protocol, AUTHENTICATING)
            excess = len(unauthenticated.members) + len(authenticating.members) - limit
            if excess <= 0:
                continue
            skip = frozenset(newcomers)
            victims = unauthenticated.oldest(excess, skip)
            if len(victims) < excess:
                victims += authenticating.oldest(excess - len(victims), skip)
            per_worker: dict[int, list[PendingSession]] = {}
            for victim in victims:
                per_worker.setdefault(victim.worker, []).append(victim)
                self._bucket(protocol, victim.state).discard(victim)
                del self._pending_by_id[(victim.worker, victim.session_id)]
            for w, gone in sorted(per_worker.items()):
                reason = (
                    f"unauthenticated_session_limit {limit} reached across the workers"
                    f" ({len(gone)} {protocol} session(s) closed for newer ones)"
                )
                result.append(LogOff(w, tuple(v.session_id for v in gone), reason, "Admin-Reset"))
        return result

    def pending_count(self, protocol: str) -> int:
        """The non-authenticated sessions of C{protocol} across the workers."""
        return sum(len(self._bucket(protocol, state).members) for state in (UNAUTHENTICATED, AUTHENTICATING))

    # -- workers --------------------------------------------------------------------------

    def worker_gone(self, worker: int) -> None:
        """Worker C{worker} exited: none of its sessions counts any more."""
        for session_id in list(self._logins.get(worker, {})):
            self.withdraw(worker, session_id)
        self._logins.pop(worker, None)
        for key, pending in list(self._pending_by_id.items()):
            if key[0] == worker:
                self._bucket(pending.protocol, pending.state).discard(pending)
                del self._pending_by_id[key]
