"""The identity table of POP3 single sign-on [7]: client address → user.

An entry is learnt from a successful POP3 login (the proxy's own, inline; or one seen
on a mirror port, monitor; or a portal login), renewed by each new login, and ends
after C{ttl} seconds without renewal, by a logout or by C{mailgwctl sso remove}.  Every
change is told to the listeners: the RADIUS accounting export (Start / Interim-Update
/ Stop to the C{sso.pop3.radius_accounting} collectors) and the persistence through
the state interface.  Pure bookkeeping: the time comes from the clock passed in.
"""

from __future__ import annotations

import enum
import ipaddress
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from mailgw.config import SSOConfig


class _Server(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def sso_applies(sso: SSOConfig, client_ip: str, server: _Server, mac: str | None = None) -> bool:
    """Whether a POP3 login of a client at C{client_ip} (with C{mac}, where the
    neighbour table knows it) to C{server} counts for SSO: the client is inside
    C{sso.pop3.policy} and the server in C{sso.pop3.servers}."""
    if not sso.applies_to(client_ip, mac):
        return False
    host = _normalise(server.host)
    return any(s.port == server.port and _normalise(s.host) == host for s in sso.servers)


def _normalise(host: str) -> str:
    host = host.strip("[]").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class IdentitySource(enum.StrEnum):
    """How an entry was learnt."""

    INLINE = "inline"
    MONITOR = "monitor"
    PORTAL = "portal"


class Change(enum.Enum):
    """What happened to an entry (told to the listeners)."""

    START = "start"
    RENEW = "renew"
    #: ended by a logout, a removal or a replacement
    STOP = "stop"
    #: ended because it was not renewed within the ttl (or dropped by the bound)
    EXPIRE = "expire"


@dataclass(frozen=True, slots=True)
class Identity:
    """One entry: who is at C{ip} (and C{mac}, where known) until C{expires}."""

    ip: str
    user: str
    source: IdentitySource
    group_policy: str | None
    first_seen: float
    renewed: float
    expires: float
    #: the Acct-Session-Id of the entry's accounting export (the same in its Start,
    #: Interim-Updates and Stop)
    session_id: str
    mac: str | None = None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view (C{mailgwctl sso list})."""
        return {
            "ip": self.ip,
            "mac": self.mac,
            "user": self.user,
            "source": self.source.value,
            "group_policy": self.group_policy,
            "first_seen": self.first_seen,
            "renewed": self.renewed,
            "expires": self.expires,
            "session_id": self.session_id,
        }


Listener = Callable[[Change, Identity], object]


class IdentityTable:
    """The live entries, one per client address, bounded (the entry renewed
    longest ago is dropped first beyond C{max_entries}).

    @param clock: the time of renewals and expiries.
    @param ttl: seconds an entry lives without renewal.
    """

    def __init__(self, clock: IReactorTime, ttl: float, *, max_entries: int = 100_000) -> None:
        self._clock = clock
        self.ttl = ttl
        self._max = max_entries
        # ordered by last renewal (oldest first), so expiry and the bound are cheap
        self._entries: OrderedDict[str, Identity] = OrderedDict()
        self._listeners: list[Listener] = []
        #: entries ended by their ttl (or dropped by the bound), for the metrics
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Identity]:
        return iter(list(self._entries.values()))

    def subscribe(self, listener: Listener) -> None:
        """Tell C{listener} of every change from now on."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Tell C{listener} nothing more."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _tell(self, change: Change, identity: Identity) -> None:
        if change is Change.EXPIRE:
            self.expirations += 1
        for listener in self._listeners:
            listener(change, identity)

    def learn(
        self,
        ip: str,
        user: str,
        source: IdentitySource,
        *,
        group_policy: str | None = None,
        mac: str | None = None,
    ) -> Identity:
        """A successful login of C{user} from C{ip}: add the entry, or renew it (the
        same user); another user at that address replaces the entry (a Stop for the
        old one, a Start for the new)."""
        now = self._clock.seconds()
        old = self._entries.pop(ip, None)
        if old is not None and old.user == user:
            identity = replace(
                old,
                renewed=now,
                expires=now + self.ttl,
                source=source,
                group_policy=group_policy if group_policy is not None else old.group_policy,
                mac=mac if mac is not None else old.mac,
            )
            self._entries[ip] = identity
            self._tell(Change.RENEW, identity)
            return identity
        if old is not None:
            self._tell(Change.STOP, old)
        identity = Identity(
            ip=ip,
            user=user,
            source=source,
            group_policy=group_policy,
            first_seen=now,
            renewed=now,
            expires=now + self.ttl,
            session_id=secrets.token_hex(8),
            mac=mac,
        )
        self._entries[ip] = identity
        self._tell(Change.START, identity)
        while len(self._entries) > self._max:
            _, dropped = self._entries.popitem(last=False)
            self._tell(Change.EXPIRE, dropped)
        return identity

    def restore(self, identity: Identity) -> None:
        """Put back an entry read from the state database at start (no Start is
        sent again; an expired one is dropped)."""
        if identity.expires > self._clock.seconds():
            self._entries[identity.ip] = identity
            self._entries.move_to_end(identity.ip)

    def lookup(self, ip: str) -> Identity | None:
        """The live entry for C{ip}, if any (an expired one ends now)."""
        identity = self._entries.get(ip)
        if identity is not None and identity.expires <= self._clock.seconds():
            del self._entries[ip]
            self._tell(Change.EXPIRE, identity)
            return None
        return identity

    def remove(self, ip: str) -> Identity | None:
        """End the entry for C{ip} (logout, C{mailgwctl sso remove})."""
        identity = self._entries.pop(ip, None)
        if identity is not None:
            self._tell(Change.STOP, identity)
        return identity

    def expire(self) -> list[Identity]:
        """End every entry not renewed within C{ttl}; returns them."""
        now = self._clock.seconds()
        ended = []
        while self._entries:
            ip, identity = next(iter(self._entries.items()))
            if identity.expires > now:
                break
            del self._entries[ip]
            ended.append(identity)
            self._tell(Change.EXPIRE, identity)
        return ended
