"""The ``ldap`` server group: search the user as the service account, bind as the user.

Authentication [5.1]: the ``user_filter`` template, with ``{username}`` (and
``{secondary}``) escaped per RFC 4515, is searched under ``base_dn`` as ``bind_dn``
(anonymously when ``bind_dn`` is empty); exactly one entry must match; then a new
connection binds as that entry's DN with the user's password.  The values of
``group_policy_attribute`` (e.g. ``memberOf``) are mapped through ``group_policy_map``
(DNs compared case-insensitively) into L{AuthenticatedUser.ldap_policies} [5.2].
Authorization (L{LdapChecker.authorize}) is the search alone.

ldap3 is synchronous: every call runs in the thread pool given to the checker, never on
the reactor thread.  The service-account connections are kept in a small bounded pool
(per server) and reused; a connection is used by one thread at a time.

Servers are tried in order when one is unreachable, times out, fails TLS verification
or answers with a server-side error; an explicit reject (no such user, ambiguous user,
wrong password) ends the attempt at once.  When no server answered, the checker raises
L{AAAUnavailable} (the client gets a temporary failure) with a reason that names each
server; it never contains the password.
"""

from __future__ import annotations

import math
import re
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPResponseTimeoutError
from ldap3.utils.conv import escape_filter_chars
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailgw.auth.limits import FairPool, PendingLimit
from mailgw.auth.portal import AAAUnavailable, AuthenticatedUser
from mailgw.config import LdapGroup

__all__ = ["LdapChecker", "build_filter", "normalize_dn"]

T = TypeVar("T")

#: Result codes (RFC 4511) that say the server, not the user, has a problem: the next
#: server is tried.  operationsError, timeLimitExceeded, busy, unavailable, other.
_SERVER_SIDE_RESULTS = frozenset({1, 3, 51, 52, 80})
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4
_ADMIN_LIMIT_EXCEEDED = 11
_NO_SUCH_OBJECT = 32
_INVALID_CREDENTIALS = 49

_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")

#: Idle service-account connections kept per server.
DEFAULT_POOL_SIZE = 4


def build_filter(template: str, username: str, secondary: str | None = None) -> str:
    """The search filter: C{template} with C{{username}} and C{{secondary}} replaced by
    their RFC 4515-escaped values.

    @raise UnauthorizedLogin: the template uses C{{secondary}} and none was given (the
        filter would otherwise match without the condition the administrator wrote).
    """
    fields = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    if "secondary" in fields and secondary is None:
        raise UnauthorizedLogin("the LDAP user_filter needs a secondary value, and the login has none")
    return template.format(
        username=escape_filter_chars(username),
        secondary=escape_filter_chars(secondary or ""),
    )


def normalize_dn(value: str) -> str:
    """A form of C{value} for case-insensitive DN comparison: RDNs split at unescaped
    commas, attribute types and values lower-cased, spaces around them dropped (servers
    return C{cn=Mail,ou=Groups}, administrators write C{CN=mail, OU=groups}).  A value
    that is not a DN is just lower-cased and stripped."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for character in value:
        if escaped:
            escaped = False
        elif character == "\\":
            escaped = True
        elif character in ",;":
            parts.append("".join(current))
            current = []
            continue
        current.append(character)
    parts.append("".join(current))
    rdns = []
    for part in parts:
        attribute, equals, rdn_value = part.partition("=")
        if not equals or not attribute.strip():
            return value.strip().lower()
        rdns.append(f"{attribute.strip().lower()}={rdn_value.strip().lower()}")
    return ",".join(rdns)


class _VerifiedTls(ldap3.Tls):  # type: ignore[misc]
    """ldap3 TLS with an L{ssl.SSLContext} of ours: certificate and host name verified
    during the handshake (Python's own checks, not ldap3's), TLS 1.2 or later."""

    def __init__(self, context: ssl.SSLContext, hostname: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = context
        self._hostname = hostname

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=do_handshake,
            server_hostname=self._hostname,
        )


def _tls_context(ca: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class _ServerDown(Exception):
    """One server of the group did not answer usefully; the next one is tried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Server:
    url: str
    server: Any  # ldap3.Server
    start_tls: bool
    encrypted: bool


@dataclass(frozen=True)
class _Found:
    dn: str
    policies: tuple[str, ...]


def _short(error: BaseException) -> str:
    """One line about an ldap3 or socket error, for the log (never a secret: no call
    here is made with the user's password in its message)."""
    # ldap3 wraps the socket/SSL error's text in nested tuples: dig the message out.
    value: object = error
    for _ in range(8):
        if isinstance(value, BaseException) and value.args:
            value = value.args[0]
        elif isinstance(value, tuple) and value:
            value = value[0]
        else:
            break
    text = _SSL_SOURCE.sub("", str(value)).strip().strip("()'\",").strip()
    text = text or type(error).__name__
    return text.splitlines()[0][:200]


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, TimeoutError | LDAPResponseTimeoutError)


class _ConnectionPool:
    """Idle service-account connections, at most C{size} per server, thread-safe."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._idle: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, url: str) -> Any | None:
        with self._lock:
            idle = self._idle.get(url)
            return idle.pop() if idle else None

    def give(self, url: str, connection: Any) -> None:
        with self._lock:
            idle = self._idle.setdefault(url, [])
            if not self._closed and len(idle) < self._size:
                idle.append(connection)
                return
        _close(connection)

    def drain(self) -> None:
        with self._lock:
            self._closed = True
            connections = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for connection in connections:
            _close(connection)


def _close(connection: Any) -> None:
    try:
        connection.unbind()
    except (LDAPException, OSError):
        pass  # closing anyway: a connection already broken has nothing to unbind


class _Directory:
    """The blocking half: runs in the checker's thread pool only."""

    log = Logger()

    def __init__(self, group: LdapGroup, pool_size: int) -> None:
        self.group = group
        self._pool = _ConnectionPool(pool_size)
        self._policy_map = {normalize_dn(key): policy for key, policy in group.group_policy_map.items()}
        context: ssl.SSLContext | None = None
        servers = []
        for url in group.servers:
            parts = urlsplit(url)
            secure = parts.scheme == "ldaps"
            host = parts.hostname or ""
            port = parts.port or (636 if secure else 389)
            tls = None
            if secure or group.start_tls:
                if context is None:
                    context = _tls_context(group.ca)
                tls = _VerifiedTls(context, host)
            server = ldap3.Server(
                host,
                port=port,
                use_ssl=secure,
                tls=tls,
                get_info=ldap3.NONE,
                connect_timeout=group.timeout,
                allowed_referral_hosts=[],
            )
            name = f"ldaps://{host}:{port}" if secure else f"ldap://{host}:{port}"
            if ":" in host:
                name = f"{parts.scheme}://[{host}]:{port}"
            servers.append(_Server(name, server, start_tls=group.start_tls and not secure, encrypted=tls is not None))
        self.servers: tuple[_Server, ...] = tuple(servers)

    # -- the two operations ------------------------------------------------------------

    def authenticate(self, username: str, password: str, secondary: str | None) -> _Found:
        search_filter = build_filter(self.group.user_filter, username, secondary)

        def attempt(server: _Server) -> _Found:
            found = self._search(server, search_filter)
            self._bind_user(server, found.dn, password)
            return found

        return self._each_server(attempt)

    def authorize(self, username: str, secondary: str | None) -> _Found:
        search_filter = build_filter(self.group.user_filter, username, secondary)
        return self._each_server(lambda server: self._search(server, search_filter))

    def close(self) -> None:
        self._pool.drain()

    # -- failover ----------------------------------------------------------------------

    def _each_server(self, attempt: Callable[[_Server], T]) -> T:
        reasons: list[str] = []
        for server in self.servers:
            try:
                return attempt(server)
            except _ServerDown as e:
                self.log.warn(
                    "LDAP server {server} of group {group} failed: {reason}",
                    server=server.url,
                    group=self.group.name,
                    reason=e.reason,
                )
                reasons.append(f"{server.url}: {e.reason}")
        raise AAAUnavailable(f"no LDAP server of group {self.group.name!r} answered: " + "; ".join(reasons))

    # -- connections -------------------------------------------------------------------

    def _open(self, server: _Server, user: str | None, password: str | None) -> Any:
        """A new connection, TLS started where configured, bound as C{user} (anonymous
        when None).  Returns the connection, or raises L{_ServerDown} when the server
        is unreachable, and L{_Rejected} when the bind is refused."""
        connection = ldap3.Connection(
            server.server,
            user=user,
            password=password,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            # ldap3 packs it into SO_RCVTIMEO as whole seconds: an int, rounded up
            receive_timeout=math.ceil(self.group.timeout),
            auto_referrals=False,
            raise_exceptions=False,
            read_only=True,
            return_empty_attributes=False,
        )
        try:
            connection.open()
            if server.start_tls and not connection.start_tls():
                _close(connection)
                raise _ServerDown("StartTLS failed")
            if user is None:
                return connection
            if connection.bind():
                return connection
            result = dict(connection.result)
        except (LDAPException, OSError) as e:
            _close(connection)
            raise self._down(server, "connection", e) from None
        _close(connection)
        raise _Rejected(int(result.get("result", -1)), str(result.get("description", "")))

    def _down(self, server: _Server, what: str, error: BaseException) -> _ServerDown:
        if _is_timeout(error):
            return _ServerDown(f"{what}: timed out after {self.group.timeout:g} s")
        if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
            return _ServerDown(f"{what}: TLS certificate verification failed ({_short(error)})")
        return _ServerDown(f"{what}: {_short(error)}")

    def _service_connection(self, server: _Server) -> tuple[Any, bool]:
        """A service-account connection (from the pool when one is idle) and whether it
        was reused."""
        connection = self._pool.take(server.url)
        if connection is not None:
            return connection, True
        bind_dn = self.group.bind_dn or None
        password = self.group.bind_password.reveal() if bind_dn else None
        try:
            return self._open(server, bind_dn, password), False
        except _Rejected as e:
            if e.code in _SERVER_SIDE_RESULTS:
                raise _ServerDown(f"service bind: {e.description}") from None
            raise _ServerDown(f"service bind as {bind_dn!r} refused: {e.description}") from None

    def _search(self, server: _Server, search_filter: str) -> _Found:
        attribute = self.group.group_policy_attribute
        while True:
            connection, reused = self._service_connection(server)
            try:
                connection.search(
                    self.group.base_dn,
                    search_filter,
                    search_scope=ldap3.SUBTREE,
                    attributes=[attribute] if attribute else [ldap3.NO_ATTRIBUTES],
                    size_limit=2,
                    time_limit=math.ceil(self.group.timeout),
                )
                result = dict(connection.result or {})
                response = list(connection.response or [])
            except (LDAPException, OSError) as e:
                _close(connection)
                # An idle pooled connection the server has since closed fails at once
                # (not by a timeout): try once more on a new one.
                if reused and not _is_timeout(e):
                    continue
                raise self._down(server, "search", e) from None
            break
        code = int(result.get("result", -1))
        entries = [item for item in response if item.get("type") == "searchResEntry"]
        if code in (_SIZE_LIMIT_EXCEEDED, _ADMIN_LIMIT_EXCEEDED) or len(entries) > 1:
            self._pool.give(server.url, connection)
            raise UnauthorizedLogin(f"ambiguous: the user filter matches several entries in group {self.group.name!r}")
        if code not in (_SUCCESS, _NO_SUCH_OBJECT):
            # busy, unavailable, insufficient access of the service account, ...: not
            # the user's fault, and perhaps not the next server's.
            _close(connection)
            raise _ServerDown(f"search: {result.get('description') or 'no result'}")
        self._pool.give(server.url, connection)
        if code == _NO_SUCH_OBJECT:
            self.log.warn(
                "LDAP group {group}: base_dn {base_dn} does not exist on {server}",
                group=self.group.name,
                base_dn=self.group.base_dn,
                server=server.url,
            )
        if not entries:
            raise UnauthorizedLogin(f"no such user in LDAP group {self.group.name!r}")
        entry = entries[0]
        return _Found(str(entry["dn"]), self._policies(entry.get("attributes") or {}))

    def _policies(self, attributes: Any) -> tuple[str, ...]:
        name = self.group.group_policy_attribute
        if not name:
            return ()
        values: Sequence[Any] = ()
        for key, value in attributes.items():
            if key.lower() == name.lower():
                values = value if isinstance(value, list | tuple) else [value]
        found = {self._policy_map[v] for v in (normalize_dn(str(value)) for value in values) if v in self._policy_map}
        return tuple(sorted(found))

    def _bind_user(self, server: _Server, dn: str, password: str) -> None:
        if not password or not dn:
            # An empty password makes a simple bind "unauthenticated" (RFC 4513 5.1.2):
            # many servers answer it with success.  Never send one.
            raise UnauthorizedLogin("empty password")
        try:
            connection = self._open(server, dn, password)
        except _Rejected as e:
            if e.code in _SERVER_SIDE_RESULTS:
                raise _ServerDown(f"user bind: {e.description}") from None
            if e.code == _INVALID_CREDENTIALS:
                raise UnauthorizedLogin(f"invalid credentials (LDAP group {self.group.name!r})") from None
            raise UnauthorizedLogin(f"bind refused ({e.description}) (LDAP group {self.group.name!r})") from None
        _close(connection)


class _Rejected(Exception):
    """A bind answered with a non-success result."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{code} {description}")
        self.code = code
        self.description = description


@implementer(ICredentialsChecker)
class LdapChecker:
    """Checks user names and passwords against an LDAP server group.

    @param group: the group's configuration.
    @param reactor: the reactor (for L{deferToThreadPool}).
    @param threadpool: where every ldap3 call runs; it must be started (and stopped by
        its owner, after L{close}).  A L{FairPool} in front of it shares it fairly
        between client addresses, drops the work of clients that went away before it
        starts, and holds the group's C{limit} place until an ldap3 call really ends.
    @param pool_size: idle service-account connections kept per server.
    @param limit: the group's C{max_pending} [4.10].
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        group: LdapGroup,
        reactor: Any,
        threadpool: ThreadPool | FairPool,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        limit: PendingLimit | None = None,
    ) -> None:
        self.group = group
        self.group_name = group.name
        self._reactor = reactor
        if isinstance(threadpool, FairPool):
            self._pool = threadpool
            self._threadpool = threadpool.threadpool
        else:
            self._threadpool = threadpool
            self._pool = FairPool(reactor, threadpool, concurrency=max(1, threadpool.max), name=f"ldap {group.name}")
        self._limit = limit
        self._directory = _Directory(group, pool_size)
        for server in self._directory.servers:
            if not server.encrypted:
                self.log.warn(
                    "LDAP group {group}: {server} is neither ldaps:// nor StartTLS: passwords cross the network"
                    " in clear",
                    group=group.name,
                    server=server.url,
                )

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AuthenticatedUser]:  # type: ignore[override]
        """Fires with an L{AuthenticatedUser}; fails with L{UnauthorizedLogin} (unknown
        or ambiguous user, wrong or empty password) or L{AAAUnavailable}."""
        return defer.Deferred.fromCoroutine(self._authenticate(credentials))

    def authorize(self, username: str, secondary: str | None = None) -> defer.Deferred[AuthenticatedUser]:
        """Search only: the user must exist (exactly once); fires with its attributes as
        an L{AuthenticatedUser}, for C{authorization_server_group} and the certificate
        method [5.2], [5.3].  Fails like L{requestAvatarId}."""
        return defer.Deferred.fromCoroutine(self._authorize(username, secondary))

    def close(self) -> defer.Deferred[None]:
        """Unbind the pooled service-account connections (in the thread pool)."""
        return deferToThreadPool(self._reactor, self._threadpool, self._directory.close)

    async def _authenticate(self, credentials: Any) -> AuthenticatedUser:
        name = _text(credentials.username)
        try:
            password = _text(credentials.password, strict=True)
        except UnicodeDecodeError:
            raise UnauthorizedLogin("password is not UTF-8") from None
        if not name:
            raise UnauthorizedLogin("empty user name")
        if not password:
            raise UnauthorizedLogin("empty password")
        key = str(getattr(credentials, "client_ip", ""))
        found = await self._pool.run(key, self._directory.authenticate, name, password, None, limit=self._limit)
        return AuthenticatedUser(name=name, server_group=self.group_name, ldap_policies=found.policies)

    async def _authorize(self, username: str, secondary: str | None) -> AuthenticatedUser:
        if not username:
            raise UnauthorizedLogin("empty user name")
        found = await self._pool.run(
            "", self._directory.authorize, username, secondary, limit=self._limit
        )
        return AuthenticatedUser(
            name=username, server_group=self.group_name, ldap_policies=found.policies, secondary=secondary
        )


def _text(value: object, *, strict: bool = False) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "strict" if strict else "replace")
    return str(value)
