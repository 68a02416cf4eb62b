"""The ``local`` server group: users and password hashes from a TOML users file.

Hashes are verified in the password-hashing thread pool, through a L{FairPool} keyed by
the client address (bcrypt/argon2 cost tens to hundreds of milliseconds of CPU, which
must never run on the reactor thread, and one guessing address must not delay the
others [4.10]).  An unknown user costs the same as a wrong
password, so the answer time does not tell which user names exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.auth.limits import FairPool, PendingLimit
from mailgw.auth.passwords import verify_password
from mailgw.auth.portal import AuthenticatedUser
from mailgw.auth.users import LocalUser, load_users_file

#: bcrypt (cost 12) of a random password nobody knows: unknown users are checked
#: against it so that they take as long as known ones.
_DECOY_HASH = "$2b$12$KHySddgOSZuPB50h8gNbZeRhF0J/izGWoK7Rl/ECj5uvMaaoGWQ/y"


@implementer(ICredentialsChecker)
class LocalUsersChecker:
    """Checks VPN user names and passwords against a local users file."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        group_name: str,
        users: dict[str, LocalUser],
        pool: FairPool,
        limit: PendingLimit | None = None,
    ) -> None:
        self.group_name = group_name
        self._users = users
        self._pool = pool
        #: the group's max_pending [4.10], held until a hash check really ends
        self._limit = limit

    @classmethod
    def from_file(
        cls, group_name: str, path: Path, pool: FairPool, limit: PendingLimit | None = None
    ) -> LocalUsersChecker:
        return cls(group_name, load_users_file(path), pool, limit)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AuthenticatedUser]:  # type: ignore[override]
        return defer.Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> AuthenticatedUser:
        raw_name = credentials.username
        name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else str(raw_name)
        raw_password = credentials.password
        password = raw_password.decode("utf-8", "replace") if isinstance(raw_password, bytes) else str(raw_password)
        user = self._users.get(name)
        stored = user.password_hash if user is not None else _DECOY_HASH
        # Fairness key: the client address where the credentials carry it.
        key = str(getattr(credentials, "client_ip", ""))
        ok = await self._pool.run(key, verify_password, stored, password, limit=self._limit)
        if user is None:
            raise UnauthorizedLogin(f"unknown user in local group {self.group_name!r}")
        if not ok:
            raise UnauthorizedLogin(f"wrong password for local user (group {self.group_name!r})")
        return AuthenticatedUser(name=name, server_group=self.group_name, local_policy=user.group_policy)
