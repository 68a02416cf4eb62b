"""The authentication cache [5.6]: a successful check remembered for C{cache_ttl}.

A mail client opens many connections (Thunderbird up to five per account) and
reconnects all day; a bcrypt cost-12 check costs about 250 ms of CPU.  Like Dovecot's
C{auth_cache_ttl}, each server group remembers a successful check: the key is the
group and the VPN user, the entry holds an HMAC-SHA-256 of the password under a random
key made when the process starts (never the password) and what the check returned
(the identity and its policy attributes).  A different password for a cached user goes
to the real check — a changed password works at once — and, if that fails, the entry
is dropped.  Failures are never cached.

The cache is bounded (least recently used dropped first) and belongs to the service
that made it: no module state.  With several worker processes each keeps its own.
"""

from __future__ import annotations

import hmac
import os
from collections import OrderedDict
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.auth.portal import AuthenticatedUser


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    avatar: AuthenticatedUser
    expires: float


class AuthCache:
    """Remembered successful checks, per server group and VPN user.

    @param clock: for the entries' expiry.
    @param max_entries: the most entries held (all groups).
    @ivar hits: lookups answered from the cache, per group.
    @ivar misses: lookups that went to the real check, per group.
    """

    def __init__(self, clock: IReactorTime, *, max_entries: int = 100_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._key = os.urandom(32)
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, group: str, user: str, password: bytes) -> bytes:
        message = group.encode("utf-8", "surrogatepass") + b"\0" + user.encode("utf-8", "surrogatepass") + b"\0"
        return hmac.new(self._key, message + password, sha256).digest()

    def lookup(self, group: str, user: str, password: bytes) -> AuthenticatedUser | None:
        """The remembered identity for this user and password, or C{None} (no entry,
        expired, or another password: the caller checks for real)."""
        entry = self._entries.get((group, user))
        if entry is not None and entry.expires <= self._clock.seconds():
            del self._entries[(group, user)]
            entry = None
        if entry is not None and hmac.compare_digest(entry.digest, self._digest(group, user, password)):
            self._entries.move_to_end((group, user))
            self.hits[group] = self.hits.get(group, 0) + 1
            return entry.avatar
        self.misses[group] = self.misses.get(group, 0) + 1
        return None

    def store(self, group: str, user: str, password: bytes, avatar: AuthenticatedUser, ttl: float) -> None:
        """Remember a successful check for C{ttl} seconds."""
        if ttl <= 0:
            return
        key = (group, user)
        self._entries[key] = _Entry(self._digest(group, user, password), avatar, self._clock.seconds() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def failed(self, group: str, user: str) -> None:
        """A real check of this user failed: forget what was remembered."""
        self._entries.pop((group, user), None)

    def flush(self, group: str | None = None, user: str | None = None) -> int:
        """Forget the entries of C{user} in C{group}, of C{group}, or all; returns
        how many were forgotten."""
        if group is None:
            count = len(self._entries)
            self._entries.clear()
            return count
        if user is not None:
            return 1 if self._entries.pop((group, user), None) is not None else 0
        keys = [key for key in self._entries if key[0] == group]
        for key in keys:
            del self._entries[key]
        return len(keys)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


@implementer(ICredentialsChecker)
class CachingChecker:
    """A server group's checker with the authentication cache in front.

    @param checker: the real checker.
    @param group: the server group's name.
    @param cache: the gateway's cache.
    @param ttl: the group's C{cache_ttl} (0: the cache is not used).
    """

    def __init__(self, checker: ICredentialsChecker, group: str, cache: AuthCache, ttl: float) -> None:
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces
        self._group = group
        self._cache = cache
        self._ttl = ttl

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        user = _text(credentials.username)
        password = _bytes(credentials.password)
        group, cache = self._group, self._cache
        cached = cache.lookup(group, user, password)
        if cached is not None:
            return defer.succeed(cached)
        checked: defer.Deferred[Any] = defer.maybeDeferred(self.checker.requestAvatarId, credentials)

        def remember(avatar: object) -> object:
            if isinstance(avatar, AuthenticatedUser):
                cache.store(group, user, password, avatar, self._ttl)
            return avatar

        def forget(failure: Failure) -> Failure:
            if failure.check(UnauthorizedLogin):
                cache.failed(group, user)
            return failure

        return checked.addCallbacks(remember, forget)
