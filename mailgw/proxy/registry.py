"""Live sessions of the three proxies: states, the non-authenticated session limit
[4.4] and simultaneous logins [5.5].

Pure bookkeeping: no transports, no reactor.  Everything that needs the time gets it
from the clock passed in, so the eviction rules are tested with a ``task.Clock``.
The registry is what the admin channel reads (``mailgwctl sessions``).
"""

from __future__ import annotations

import enum
import heapq
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from twisted.internet.interfaces import IReactorTime


class SessionState(enum.Enum):
    """Where a connection is on its way to the relay [4.4]."""

    UNAUTHENTICATED = "unauthenticated"  # connected, no username yet
    AUTHENTICATING = "authenticating"  # a username was presented
    AUTHENTICATED = "authenticated"  # VPN identity established


class Terminable(Protocol):
    """What the registry needs of a session to log it off."""

    def terminate(self, reason: str, cause: str = "Admin-Reset") -> None:
        """Close the session (both sides), logging C{reason}; C{cause} is the RADIUS
        Acct-Terminate-Cause its accounting Stop carries."""


@dataclass(eq=False, slots=True)
class SessionInfo:
    """One live session, as ``mailgwctl sessions`` shows it."""

    session_id: str
    protocol: str
    client: str
    started: float
    owner: Terminable
    state: SessionState = SessionState.UNAUTHENTICATED
    state_since: float = 0.0
    user: str | None = None
    mail_user: str | None = None
    group_policy: str | None = None
    upstream: str | None = None
    last_activity: float = 0.0
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    #: being closed (no longer counted by the session limit)
    closing: bool = False
    #: the sequence number of insertion: breaks ties between equal clock readings
    serial: int = field(default=0)
    #: the client's address (without the port): one login is one VPN user from one
    #: address over one protocol [5.5]
    client_ip: str = ""
    #: the login this connection belongs to (the session id of its first connection)
    login_id: str | None = None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view without the owner object."""
        return {
            "session_id": self.session_id,
            "protocol": self.protocol,
            "client": self.client,
            "state": self.state.value,
            "user": self.user,
            "mail_user": self.mail_user,
            "group_policy": self.group_policy,
            "upstream": self.upstream,
            "login": self.login_id,
            "started": self.started,
            "last_activity": self.last_activity,
            "bytes_from_client": self.bytes_from_client,
            "bytes_to_client": self.bytes_to_client,
        }


class RegistryObserver(Protocol):
    """Told of each change of the registry's sessions."""

    def changed(self, info: SessionInfo, live: bool) -> None:
        """C{info} arrived or changed state (C{live}), or is gone (not C{live})."""


class LoginRefused(Exception):
    """Simultaneous logins forbid this login (the policy allows 0)."""


class Aged(Protocol):
    """What L{Oldest} orders by."""

    @property
    def started(self) -> float: ...

    @property
    def serial(self) -> int: ...


A = TypeVar("A", bound=Aged)


class Oldest(Generic[A]):
    """The sessions of one protocol in one non-authenticated state, oldest first:
    a set with a heap of (started, serial) beside it (stale heap entries are dropped
    lazily), so the limit of [4.4] finds its victims without a scan.  (Also the
    supervisor's view of every worker's sessions, L{mailgw.workers.anvil}.)"""

    __slots__ = ("_heap", "members")

    def __init__(self) -> None:
        self.members: set[A] = set()
        self._heap: list[tuple[float, int, A]] = []

    def add(self, info: A) -> None:
        self.members.add(info)
        heap = self._heap
        if len(heap) > 2 * len(self.members) + 64:
            # Mostly stale entries (sessions that left the state): rebuild.
            heap[:] = [(m.started, m.serial, m) for m in self.members if m is not info]
            heapq.heapify(heap)
        heapq.heappush(heap, (info.started, info.serial, info))

    def discard(self, info: A) -> None:
        self.members.discard(info)
        if not self.members:
            self._heap.clear()

    def oldest(self, count: int, skip: A | frozenset[A] | None) -> list[A]:
        """Up to C{count} oldest members other than C{skip} (one, or a set)."""
        found: list[A] = []
        popped: list[tuple[float, int, A]] = []
        heap = self._heap
        skipped = skip if isinstance(skip, frozenset) else frozenset(() if skip is None else (skip,))
        while heap and len(found) < count:
            entry = heapq.heappop(heap)
            info = entry[2]
            if info not in self.members or any(info is e[2] for e in popped):
                continue  # stale (left the state, or re-entered: a newer entry exists)
            popped.append(entry)
            if info not in skipped:
                found.append(info)
        for entry in popped:
            heapq.heappush(heap, entry)
        return found


class SessionRegistry:
    """All live sessions of one gateway process, shared by the three proxies.

    Indexed: the non-authenticated sessions per protocol and state (oldest first),
    the authenticated ones per VPN user, so that no connection or login scans every
    session.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._sessions: dict[str, SessionInfo] = {}
        self._serial = 0
        self._pending: dict[tuple[str, SessionState], Oldest[SessionInfo]] = {}
        #: told of every session's arrival, change of state and end (the worker
        #: processes' supervisor counts the non-authenticated sessions of all) [10]
        self.observer: RegistryObserver | None = None
        self._by_user: dict[str, dict[SessionInfo, None]] = {}

    def __iter__(self) -> Iterator[SessionInfo]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> SessionInfo | None:
        return self._sessions.get(session_id)

    def sessions(self, protocol: str | None = None) -> list[SessionInfo]:
        """Live sessions, oldest first, optionally of one protocol."""
        return [s for s in self if protocol is None or s.protocol == protocol]

    def _bucket(self, protocol: str, state: SessionState) -> Oldest[SessionInfo]:
        bucket = self._pending.get((protocol, state))
        if bucket is None:
            bucket = self._pending[(protocol, state)] = Oldest()
        return bucket

    def open(self, protocol: str, client: str, owner: Terminable, client_ip: str | None = None) -> SessionInfo:
        """Register a new, unauthenticated session."""
        now = self._clock.seconds()
        self._serial += 1
        session_id = secrets.token_hex(6)
        while session_id in self._sessions:
            session_id = secrets.token_hex(6)
        info = SessionInfo(
            session_id=session_id,
            protocol=protocol,
            client=client,
            started=now,
            owner=owner,
            state_since=now,
            last_activity=now,
            serial=self._serial,
            client_ip=client_ip if client_ip is not None else client.rsplit(":", 1)[0],
        )
        self._sessions[session_id] = info
        self._bucket(protocol, SessionState.UNAUTHENTICATED).add(info)
        if self.observer is not None:
            self.observer.changed(info, True)
        return info

    def close(self, info: SessionInfo) -> None:
        """Forget a session (its connection is gone)."""
        if self._sessions.pop(info.session_id, None) is None:
            return
        self._unindex(info)
        if self.observer is not None:
            self.observer.changed(info, False)

    def _unindex(self, info: SessionInfo) -> None:
        if info.state is SessionState.AUTHENTICATED:
            if info.user is not None:
                sessions = self._by_user.get(info.user)
                if sessions is not None:
                    sessions.pop(info, None)
                    if not sessions:
                        del self._by_user[info.user]
        else:
            self._bucket(info.protocol, info.state).discard(info)

    def set_state(self, info: SessionInfo, state: SessionState) -> None:
        if info.state is state:
            return
        live = self._sessions.get(info.session_id) is info
        if live:
            self._unindex(info)
        info.state = state
        info.state_since = self._clock.seconds()
        if live:
            if state is SessionState.AUTHENTICATED:
                if info.user is not None:
                    self._by_user.setdefault(info.user, {})[info] = None
            else:
                self._bucket(info.protocol, state).add(info)
            if self.observer is not None:
                self.observer.changed(info, True)

    def over_limit(self, protocol: str, limit: int, newcomer: SessionInfo) -> list[SessionInfo]:
        """The sessions to close so that the non-authenticated sessions of C{protocol}
        (unauthenticated plus authenticating, C{newcomer} included) stay within C{limit}
        [4.4]: oldest unauthenticated first, then oldest authenticating; never an
        authenticated one, never the newcomer itself.  C{limit} 0 means no limit.
        """
        if limit <= 0:
            return []
        unauthenticated = self._bucket(protocol, SessionState.UNAUTHENTICATED)
        authenticating = self._bucket(protocol, SessionState.AUTHENTICATING)
        excess = len(unauthenticated.members) + len(authenticating.members) - limit
        if excess <= 0:
            return []
        victims = unauthenticated.oldest(excess, newcomer)
        if len(victims) < excess:
            victims += authenticating.oldest(excess - len(victims), newcomer)
        return victims

    def claim_login(self, info: SessionInfo, user: str, limit: int) -> list[SessionInfo]:
        """Count C{info} as an authenticated session of VPN user C{user} and return the
        sessions that must be logged off so that at most C{limit} logins of that user
        remain [5.5].  A login is one VPN user from one client address over one
        protocol: the connections of a login count once, and a log-off takes all of
        them.  The login idle longest goes first (its most recent activity is the
        oldest), ties broken by age.  Raises L{LoginRefused} when C{limit} is 0.
        """
        if limit <= 0:
            raise LoginRefused(f"simultaneous_logins is 0 for user {user!r}")
        logins: dict[tuple[str, str], list[SessionInfo]] = {}
        for other in self._by_user.get(user, ()):
            if other is not info and not other.closing:
                logins.setdefault((other.client_ip, other.protocol), []).append(other)
        info.user = user
        self.set_state(info, SessionState.AUTHENTICATED)
        mine = logins.get((info.client_ip, info.protocol))
        if mine is not None:
            # Another connection of a login already counted.
            info.login_id = mine[0].login_id or mine[0].session_id
            return []
        info.login_id = info.session_id
        excess = len(logins) + 1 - limit
        if excess <= 0:
            return []

        def idleness(sessions: list[SessionInfo]) -> tuple[float, float, int]:
            return (
                max(s.last_activity for s in sessions),
                min(s.started for s in sessions),
                min(s.serial for s in sessions),
            )

        ordered = sorted(logins.values(), key=idleness)
        return [s for sessions in ordered[:excess] for s in sorted(sessions, key=lambda s: s.serial)]

    def login_count(self, user: str) -> int:
        """How many logins (client address and protocol) VPN user C{user} has here."""
        return len(self.login_keys(user))

    def login_keys(self, user: str) -> set[tuple[str, str]]:
        """The logins of VPN user C{user} here, as (client address, protocol)."""
        return {(s.client_ip, s.protocol) for s in self._by_user.get(user, ()) if not s.closing}

    def release_login(self, info: SessionInfo) -> None:
        """Undo L{claim_login} (the mailhost login failed afterwards)."""
        self.set_state(info, SessionState.UNAUTHENTICATED)
        info.user = None
        info.group_policy = None
        info.login_id = None
