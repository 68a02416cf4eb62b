"""Live sessions of the three proxies: states, the non-authenticated session limit
[4.4] and simultaneous logins [5.5].

Pure bookkeeping: no transports, no reactor.  Everything that needs the time gets it
from the clock passed in, so the eviction rules are tested with a ``task.Clock``.
The registry is what the admin channel reads (``mailgwctl sessions``).
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass(eq=False)
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
            "started": self.started,
            "last_activity": self.last_activity,
            "bytes_from_client": self.bytes_from_client,
            "bytes_to_client": self.bytes_to_client,
        }


class LoginRefused(Exception):
    """Simultaneous logins forbid this login (the policy allows 0)."""


class SessionRegistry:
    """All live sessions of one gateway process, shared by the three proxies."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._sessions: dict[str, SessionInfo] = {}
        self._serial = 0

    def __iter__(self) -> Iterator[SessionInfo]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> SessionInfo | None:
        return self._sessions.get(session_id)

    def sessions(self, protocol: str | None = None) -> list[SessionInfo]:
        """Live sessions, oldest first, optionally of one protocol."""
        return [s for s in self if protocol is None or s.protocol == protocol]

    def open(self, protocol: str, client: str, owner: Terminable) -> SessionInfo:
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
        )
        self._sessions[session_id] = info
        return info

    def close(self, info: SessionInfo) -> None:
        """Forget a session (its connection is gone)."""
        self._sessions.pop(info.session_id, None)

    def set_state(self, info: SessionInfo, state: SessionState) -> None:
        if info.state is not state:
            info.state = state
            info.state_since = self._clock.seconds()

    def over_limit(self, protocol: str, limit: int, newcomer: SessionInfo) -> list[SessionInfo]:
        """The sessions to close so that the non-authenticated sessions of C{protocol}
        (unauthenticated plus authenticating, C{newcomer} included) stay within C{limit}
        [4.4]: oldest unauthenticated first, then oldest authenticating; never an
        authenticated one, never the newcomer itself.  C{limit} 0 means no limit.
        """
        if limit <= 0:
            return []
        pending = [
            s
            for s in self._sessions.values()
            if s.protocol == protocol and s.state is not SessionState.AUTHENTICATED and not s.closing
        ]
        excess = len(pending) - limit
        if excess <= 0:
            return []
        candidates = [s for s in pending if s is not newcomer]
        order = {SessionState.UNAUTHENTICATED: 0, SessionState.AUTHENTICATING: 1}
        candidates.sort(key=lambda s: (order[s.state], s.started, s.serial))
        return candidates[:excess]

    def claim_login(self, info: SessionInfo, user: str, limit: int) -> list[SessionInfo]:
        """Count C{info} as an authenticated session of VPN user C{user} and return the
        sessions of that user that must be logged off so that at most C{limit} remain
        [5.5]: the one idle longest first, ties broken by age.  Raises L{LoginRefused}
        when C{limit} is 0.
        """
        if limit <= 0:
            raise LoginRefused(f"simultaneous_logins is 0 for user {user!r}")
        others = [
            s
            for s in self._sessions.values()
            if s is not info and s.user == user and s.state is SessionState.AUTHENTICATED and not s.closing
        ]
        info.user = user
        self.set_state(info, SessionState.AUTHENTICATED)
        excess = len(others) + 1 - limit
        if excess <= 0:
            return []
        others.sort(key=lambda s: (s.last_activity, s.started, s.serial))
        return others[:excess]

    def release_login(self, info: SessionInfo) -> None:
        """Undo L{claim_login} (the mailhost login failed afterwards)."""
        self.set_state(info, SessionState.UNAUTHENTICATED)
        info.user = None
        info.group_policy = None
