"""The daemon's side of the admin channel: AMP commands answered from a backend.

:class:`AdminResponder` only translates: it turns each command of
:mod:`mailgw.admin.commands` into a call on an :class:`IAdminBackend` and the result
into the command's answer, with every secret-named key scrubbed.  The backend is where
the decisions live; :class:`GatewayAdminBackend` answers from the running
:class:`~mailgw.service.GatewayService` (session registry, portals, authentication
cache, SSO identity table, configuration), with the reload and the remote-POP poller
passed in by whoever wires the daemon.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import Interface, implementer

import mailgw
from mailgw.admin.commands import (
    AaaFlush,
    AaaTest,
    AccountsAdd,
    AccountsCheckNow,
    AccountsDelete,
    AccountsEdit,
    AccountsList,
    CheckNowProgress,
    InvalidAccount,
    InvalidArgument,
    Kill,
    NoSuchAccount,
    NoSuchGroup,
    NoSuchIdentity,
    NoSuchSession,
    NotAvailable,
    Reload,
    ReloadFailed,
    ReplayFailed,
    Sessions,
    SsoList,
    SsoLookup,
    SsoRemove,
    SsoReplay,
    Status,
    scrub,
)
from mailgw.auth.portal import AAAUnavailable, AuthenticatedUser, IVPNIdentity, LoginContext, VPNIdentity
from mailgw.config import (
    DEFAULT_GROUP_POLICY,
    AAAServerGroup,
    LdapGroup,
    LocalGroup,
    Pop3Group,
    RadiusGroup,
    SSOConfig,
)
from mailgw.proxy.directory import ISessionDirectory, LocalDirectory
from mailgw.proxy.registry import SessionInfo, SessionState
from mailgw.sso.identity import Identity, IdentitySource, IdentityTable
from mailgw.sso.monitor import Pop3Monitor, replay_in_thread
from mailgw.sso.pcapfile import CaptureFileError
from mailgw.state.directory import DirectorySession

if TYPE_CHECKING:
    from mailgw.service import GatewayService
    from mailgw.workers.supervisor import WorkerPool

__all__ = [
    "AdminResponder",
    "GatewayAdminBackend",
    "IAdminBackend",
    "PollerAdmin",
    "monitored_servers",
    "session_protocol",
]

JSONObject = dict[str, Any]

#: proxy section → the protocol name its sessions carry in the registry
_SESSION_PROTOCOLS: Mapping[str, str] = {"pop3s": "pop3", "imap4s": "imap4", "smtps": "smtp"}


def session_protocol(name: str) -> str:
    """The registry's protocol name for C{name}, which may be a proxy section name
    (``pop3s``) or already a session protocol (``pop3``)."""
    return _SESSION_PROTOCOLS.get(name.lower(), name.lower())


class IAdminBackend(Interface):
    """What the admin channel needs of the daemon.  Methods raise the errors of
    :mod:`mailgw.admin.commands`; those returning a Deferred may fail with them.
    (N805: zope.interface declarations have no self.)"""

    def status() -> JSONObject:
        """Version, uptime, listeners, sessions by protocol and state, AAA groups,
        poller and SSO summary (of this process)."""

    def workers() -> list[JSONObject] | defer.Deferred[list[JSONObject]]:
        """Each worker process's status [10], with its sessions by protocol and state
        (empty: the daemon serves in one process)."""

    def sessions(protocol: str | None) -> list[JSONObject] | defer.Deferred[list[JSONObject]]:  # noqa: N805
        """The live sessions, oldest first, of one protocol or all (with gateways
        sharing a database: every gateway's, each with its C{node})."""

    def kill(session_id: str) -> JSONObject | defer.Deferred[JSONObject]:  # noqa: N805
        """Close a session (on whichever gateway holds it); return it as it was.
        Raises (or fails with) L{NoSuchSession}."""

    def reload() -> defer.Deferred[list[str]]:
        """Reload the configuration; fires with the problems (empty when applied).
        Raises L{NotAvailable} when reloading is not wired."""

    def aaa_test(group: str, user: str, password: str) -> defer.Deferred[JSONObject]:  # noqa: N805
        """Log C{user} in through C{group}; fires with the verdict.  Raises
        L{NoSuchGroup}."""

    def aaa_flush(group: str | None, user: str | None) -> JSONObject | defer.Deferred[JSONObject]:  # noqa: N805
        """Empty the authentication cache: all of it, C{group}'s part or C{user}'s
        entry in C{group}; return how many entries were forgotten (C{flushed}).
        Raises L{NoSuchGroup} (naming the known groups), L{InvalidArgument} for a
        user without a group."""

    def sso_list() -> list[JSONObject]:
        """The live entries of the SSO identity table, by address.  Raises
        L{NotAvailable} when SSO is off."""

    def sso_lookup(ip: str) -> JSONObject:  # noqa: N805
        """The live entry of C{ip}.  Raises L{NoSuchIdentity}, L{InvalidArgument}
        (not an address) or L{NotAvailable}."""

    def sso_remove(ip: str) -> JSONObject:  # noqa: N805
        """End the entry of C{ip}; return it as it was.  Raises as L{sso_lookup}."""

    def sso_replay(path: str) -> defer.Deferred[JSONObject]:  # noqa: N805
        """Feed the capture file at the absolute C{path} through the monitor path,
        learning the logins it shows; fires with the frames read and the logins seen
        and learnt, or fails with L{ReplayFailed}.  Raises L{NotAvailable} or
        L{InvalidArgument} (a relative path)."""

    def accounts_list(domain: str | None) -> defer.Deferred[list[JSONObject]]:  # noqa: N805
        """The remote POP accounts (of one local domain)."""

    def accounts_add(fields: JSONObject) -> defer.Deferred[JSONObject]:  # noqa: N805
        """Create an account; fires with it."""

    def accounts_edit(account_id: str, fields: JSONObject) -> defer.Deferred[JSONObject]:  # noqa: N805
        """Change an account; fires with it."""

    def accounts_delete(account_id: str) -> defer.Deferred[None]:  # noqa: N805
        """Delete an account."""

    def accounts_check_now(
        account_id: str, progress: Callable[[str], None] | None = None  # noqa: N805
    ) -> defer.Deferred[JSONObject]:  # fmt: skip
        """Poll an account now; fires with what happened.  C{progress} gets a line
        after each message of a long poll."""


class AdminResponder(amp.CommandLocator):
    """Answers the admin commands from C{backend}; one per connection."""

    log = Logger()

    def __init__(self, backend: IAdminBackend) -> None:
        self.backend = backend
        #: the connection, to send progress lines back (set by L{admin_protocol})
        self.connection: amp.AMP | None = None

    @Status.responder
    def status(self) -> defer.Deferred[JSONObject]:
        status = self.backend.status()
        return _deferred(self.backend.workers()).addCallback(
            lambda workers: {"status": scrub(with_workers(status, workers))}
        )

    @Sessions.responder
    def sessions(self, protocol: str | None = None) -> defer.Deferred[JSONObject]:
        return _deferred(self.backend.sessions(protocol or None)).addCallback(
            lambda sessions: {"sessions": scrub(sessions)}
        )

    @Kill.responder
    def kill(self, session_id: str) -> defer.Deferred[JSONObject]:
        def killed(session: JSONObject) -> JSONObject:
            self.log.info("Session {session_id} killed from the admin channel", session_id=session_id)
            return {"session": scrub(session)}

        return _deferred(self.backend.kill(session_id)).addCallback(killed)

    @Reload.responder
    def reload(self) -> defer.Deferred[JSONObject]:
        async def run() -> JSONObject:
            problems = await self.backend.reload()
            if problems:
                raise ReloadFailed(problems)
            return {}

        return defer.Deferred.fromCoroutine(run())

    @AaaTest.responder
    def aaa_test(self, group: str, user: str, password: str) -> defer.Deferred[JSONObject]:
        d = self.backend.aaa_test(group, user, password)
        return d.addCallback(lambda result: {"result": scrub(result)})

    @AaaFlush.responder
    def aaa_flush(self, group: str | None = None, user: str | None = None) -> defer.Deferred[JSONObject]:
        def flushed(result: JSONObject) -> JSONObject:
            self.log.info(
                "Authentication cache flushed from the admin channel ({scope}): {count} entries forgotten",
                scope=f"user {user} of group {group}" if user else f"group {group}" if group else "all groups",
                count=result.get("flushed"),
            )
            return {"result": scrub(result)}

        return _deferred(self.backend.aaa_flush(group or None, user or None)).addCallback(flushed)

    @SsoList.responder
    def sso_list(self) -> JSONObject:
        return {"identities": scrub(self.backend.sso_list())}

    @SsoLookup.responder
    def sso_lookup(self, ip: str) -> JSONObject:
        return {"identity": scrub(self.backend.sso_lookup(ip))}

    @SsoRemove.responder
    def sso_remove(self, ip: str) -> JSONObject:
        identity = self.backend.sso_remove(ip)
        self.log.info(
            "SSO identity of {client_ip} ({user}) removed from the admin channel",
            client_ip=identity.get("ip", ip),
            user=identity.get("user"),
        )
        return {"identity": scrub(identity)}

    @SsoReplay.responder
    def sso_replay(self, path: str) -> defer.Deferred[JSONObject]:
        d = self.backend.sso_replay(path)
        return d.addCallback(lambda result: {"result": scrub(result)})

    @AccountsList.responder
    def accounts_list(self, domain: str | None = None) -> defer.Deferred[JSONObject]:
        d = self.backend.accounts_list(domain or None)
        return d.addCallback(lambda accounts: {"accounts": scrub(accounts)})

    @AccountsAdd.responder
    def accounts_add(self, fields: JSONObject) -> defer.Deferred[JSONObject]:
        d = self.backend.accounts_add(fields)
        return d.addCallback(lambda account: {"account": scrub(account)})

    @AccountsEdit.responder
    def accounts_edit(self, id: str, fields: JSONObject) -> defer.Deferred[JSONObject]:
        d = self.backend.accounts_edit(id, fields)
        return d.addCallback(lambda account: {"account": scrub(account)})

    @AccountsDelete.responder
    def accounts_delete(self, id: str) -> defer.Deferred[JSONObject]:
        return self.backend.accounts_delete(id).addCallback(lambda _: {})

    @AccountsCheckNow.responder
    def accounts_check_now(self, id: str) -> defer.Deferred[JSONObject]:
        d = self.backend.accounts_check_now(id, self._progress)
        return d.addCallback(lambda result: {"result": scrub(result)})

    def _progress(self, line: str) -> None:
        connection = self.connection
        if connection is not None and connection.transport is not None:
            connection.callRemote(CheckNowProgress, line=line)


def admin_protocol(backend: IAdminBackend) -> amp.AMP:
    """An AMP connection of the admin channel answering from C{backend}."""
    locator = AdminResponder(backend)
    connection = amp.AMP(locator=locator)
    locator.connection = connection
    return connection


# --- The backend over the running gateway --------------------------------------------


class PollerAdmin(Protocol):
    """What the admin channel needs of the remote POP poller [6] (the shape of
    L{mailgw.poller.accounts.Accounts}).  Results may be plain values, Deferreds or
    coroutines.  An unknown id raises a C{KeyError} (C{AccountNotFound}), refused
    fields a C{ValueError} whose C{problems} lists them (C{AccountInvalid}).  Ids
    arrive as the strings the administrator typed.  Accounts may hold a password
    field: the channel drops it.  An optional C{summary()} method gives the status
    line's details."""

    def list(self, domain: str | None = None) -> Any: ...

    def add(self, fields: Mapping[str, Any]) -> Any: ...

    def edit(self, account_id: str, fields: Mapping[str, Any]) -> Any: ...

    def delete(self, account_id: str) -> Any: ...

    def check_now(self, account_id: str) -> Any: ...


_T = TypeVar("_T")


def with_workers(status: JSONObject, workers: list[JSONObject]) -> JSONObject:
    """C{status} of a supervisor with its C{workers}' statuses: the sessions are
    theirs (the supervisor serves none itself)."""
    if not workers:
        return status
    counts: JSONObject = dict(status.get("sessions") or {"total": 0, "by_protocol": {}})
    by_protocol: dict[str, dict[str, int]] = {k: dict(v) for k, v in counts.get("by_protocol", {}).items()}
    total = int(counts.get("total", 0))
    for worker in workers:
        theirs = worker.get("sessions")
        if not isinstance(theirs, dict):
            continue
        total += int(theirs.get("total", 0))
        for protocol, states in theirs.get("by_protocol", {}).items():
            mine = by_protocol.setdefault(protocol, {})
            for state, count in states.items():
                mine[state] = mine.get(state, 0) + int(count)
    return {**status, "sessions": {"total": total, "by_protocol": by_protocol}, "workers": workers}


def _deferred(result: _T | defer.Deferred[_T]) -> defer.Deferred[_T]:
    return result if isinstance(result, defer.Deferred) else defer.succeed(result)


def _remote_session(session: DirectorySession, now: float) -> JSONObject:
    """Another gateway's session as C{sessions} shows it (its idleness is not known)."""
    return {
        "session_id": session.session_id,
        "protocol": session.protocol,
        "client": session.client,
        "state": "authenticated",
        "user": session.user,
        "mail_user": session.mail_user,
        "group_policy": session.group_policy,
        "upstream": session.upstream,
        "login": session.login_id,
        "started": session.started,
        "last_activity": None,
        "age": max(0.0, now - session.started),
        "idle": None,
        "node": session.node,
    }


@implementer(IRealm)
class _RecordingRealm:
    """Wraps a realm and keeps the avatar id it was given (the checker's
    L{AuthenticatedUser}, whose attributes ``aaa test`` shows)."""

    def __init__(self, realm: IRealm) -> None:
        self.realm = realm
        self.avatar_id: object = None

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        self.avatar_id = avatarId
        return self.realm.requestAvatar(avatarId, mind, *interfaces)


@implementer(IAdminBackend)
class GatewayAdminBackend:
    """The admin channel's view of a running L{GatewayService}.

    @param started: the clock reading when the daemon started (for the uptime).
    @param reload: reloads the configuration; fires with its problems (empty when
        applied).  C{None}: C{reload} answers L{NotAvailable}.
    @param poller: the remote POP poller; C{None}: the C{accounts} commands answer
        L{NotAvailable}.
    """

    log = Logger()

    def __init__(
        self,
        gateway: GatewayService,
        *,
        started: float,
        clock: IReactorTime,
        reload: Callable[[], defer.Deferred[list[str]]] | None = None,
        poller: PollerAdmin | None = None,
    ) -> None:
        self.gateway = gateway
        self.started = started
        self.clock = clock
        self._reload = reload
        self.poller = poller
        #: AAA group name → the result of its last ``aaa test`` (a cheap health signal)
        self._last_tests: dict[str, JSONObject] = {}

    # -- status and sessions ----------------------------------------------------------

    def workers(self) -> list[JSONObject] | defer.Deferred[list[JSONObject]]:
        pool = self._pool()
        if pool is None:
            return []
        return defer.Deferred.fromCoroutine(pool.status())

    def worker_status(self) -> JSONObject:
        """A worker's own part of C{status} (asked by its supervisor)."""
        return {
            "sessions": self._session_counts(),
            "listeners": sum(1 for listener in self.gateway.listeners() if listener.running),
            "auth_cache_entries": len(self.gateway.auth_cache),
        }

    def status(self) -> JSONObject:
        config = self.gateway.config
        now = self.clock.seconds()
        return {
            "version": mailgw.__version__,
            "node_name": config.gateway.node_name,
            "pid": os.getpid(),
            "configuration": str(config.path) if config.path is not None else None,
            "started": self.started,
            "uptime": max(0.0, now - self.started),
            "listeners": [
                {"name": listener.name, "description": listener.description, "running": bool(listener.running)}
                for listener in self.gateway.listeners()
            ],
            "sessions": self._session_counts(),
            "aaa_groups": [self._group_status(group) for group in config.aaa_server_groups],
            "poller": self._poller_status(),
            "sso": self._sso_status(),
            "inspection": self._inspection_status(),
            "reload": "available" if self._reload is not None else "not available",
        }

    def _inspection_status(self) -> list[JSONObject]:
        inspection = getattr(self.gateway, "inspection", None)
        return inspection.status() if inspection is not None else []  # type: ignore[no-any-return]

    def _session_counts(self) -> JSONObject:
        states = [state.value for state in SessionState]
        by_protocol: dict[str, dict[str, int]] = {
            _SESSION_PROTOCOLS[proxy.protocol]: dict.fromkeys(states, 0)
            for proxy in self.gateway.config.proxies()
            if proxy.enabled
        }
        total = 0
        for info in self.gateway.registry:
            counts = by_protocol.setdefault(info.protocol, dict.fromkeys(states, 0))
            counts[info.state.value] += 1
            total += 1
        return {"total": total, "by_protocol": by_protocol}

    def _group_status(self, group: AAAServerGroup) -> JSONObject:
        last = self._last_tests.get(group.name)
        health = "unknown"
        metrics = getattr(self.gateway, "metrics", None)
        seen = metrics.aaa_health.get(group.name) if metrics is not None else None
        if seen is not None:
            health = seen[0]  # the last real login (or aaa test) through the group
        elif last is not None:
            health = "unavailable" if last["result"] == "unavailable" else "reachable"
        return {
            "name": group.name,
            "protocol": group.protocol,
            "servers": _group_servers(group),
            "health": health,
            "last_test": last,
        }

    def _poller_status(self) -> JSONObject:
        enabled = self.gateway.config.poller.enabled
        if self.poller is None:
            return {"enabled": enabled, "running": False, "state": "not configured"}
        summary = getattr(self.poller, "summary", None)
        details = dict(summary()) if callable(summary) else {}
        return {"enabled": enabled, "running": True, "state": "running", **details}

    def _sso_status(self) -> JSONObject:
        sso = self.gateway.config.sso_pop3
        table = self.gateway.identities
        if not sso.enabled or table is None:
            return {"enabled": sso.enabled, "mode": sso.mode, "running": False, "state": "not configured"}
        now = self.clock.seconds()
        return {
            "enabled": True,
            "mode": sso.mode,
            "running": True,
            "state": "running",
            "entries": sum(1 for identity in table if identity.expires > now),
        }

    def _node(self) -> str:
        return str(getattr(self.gateway, "node_label", self.gateway.config.gateway.node_name))

    def _pool(self) -> WorkerPool | None:
        return getattr(self.gateway, "pool", None)

    def _directory(self) -> ISessionDirectory | None:
        directory: ISessionDirectory | None = getattr(self.gateway, "directory", None)
        return None if directory is None or isinstance(directory, LocalDirectory) else directory

    def sessions(self, protocol: str | None) -> list[JSONObject] | defer.Deferred[list[JSONObject]]:
        wanted = session_protocol(protocol) if protocol else None
        now = self.clock.seconds()
        local = [self.session_view(info, now) for info in self.gateway.registry.sessions(wanted)]
        pool, directory = self._pool(), self._directory()
        if pool is None and directory is None:
            return local
        # This gateway's workers answer for their own sessions; the shared directory
        # [11] lists the other gateways' (without this one's workers, listed already).
        mine = f"{self.gateway.config.gateway.node_name}/"

        async def merged() -> list[JSONObject]:
            sessions = list(local)
            if pool is not None:
                sessions += await pool.sessions(wanted)
            if directory is not None:
                others = await directory.sessions()
                sessions += [
                    _remote_session(s, now)
                    for s in others
                    if (wanted is None or s.protocol == wanted) and not s.node.startswith(mine)
                ]
            return sorted(sessions, key=lambda s: float(s["started"]))  # type: ignore[arg-type]

        return defer.Deferred.fromCoroutine(merged())

    def session_view(self, info: SessionInfo, now: float | None = None) -> JSONObject:
        """One of this process's sessions as C{sessions} shows it."""
        now = self.clock.seconds() if now is None else now
        return {**self._session(info, now), "node": self._node()}

    @staticmethod
    def _session(info: SessionInfo, now: float) -> JSONObject:
        return {**info.as_dict(), "age": max(0.0, now - info.started), "idle": max(0.0, now - info.last_activity)}

    def kill(self, session_id: str) -> JSONObject | defer.Deferred[JSONObject]:
        info = self.gateway.registry.get(session_id)
        if info is not None:
            answer = self.session_view(info)
            info.owner.terminate("killed by the administrator")
            return answer
        pool, directory = self._pool(), self._directory()
        if pool is None and directory is None:
            raise NoSuchSession(f"no session {session_id!r}")
        now = self.clock.seconds()

        async def ask() -> JSONObject:
            if pool is not None:
                killed = await pool.kill(session_id, "killed by the administrator")
                if killed is not None:
                    return killed
            if directory is not None:
                found = await directory.kill(session_id)
                if found is not None:
                    return _remote_session(found, now)
                raise NoSuchSession(f"no session {session_id!r} on any gateway")
            raise NoSuchSession(f"no session {session_id!r} in any worker")

        return defer.Deferred.fromCoroutine(ask())

    def reload(self) -> defer.Deferred[list[str]]:
        if self._reload is None:
            raise NotAvailable("reload is not available in this daemon")
        return self._reload()

    # -- aaa test ---------------------------------------------------------------------

    def aaa_test(self, group: str, user: str, password: str) -> defer.Deferred[JSONObject]:
        portal = self.gateway.portals.get(group)
        if portal is None:
            raise NoSuchGroup(f"no AAA server group {group!r}")
        return defer.Deferred.fromCoroutine(self._aaa_test(portal, group, user, password))

    def _default_policy(self, group: str) -> tuple[str, str]:
        """The default group policy a login through C{group} gets: that of the first
        enabled proxy authenticating against it, else the built-in one."""
        for proxy in self.gateway.config.proxies():
            if proxy.enabled and proxy.authentication_server_group == group:
                return proxy.default_group_policy, proxy.protocol
        return DEFAULT_GROUP_POLICY, "built-in"

    async def _aaa_test(self, portal: Portal, group: str, user: str, password: str) -> JSONObject:
        # The group's own checkers and realm, behind a realm that keeps the avatar id.
        realm = _RecordingRealm(portal.realm)
        test_portal = Portal(realm, list(portal.checkers.values()))
        default_policy, source = self._default_policy(group)
        context = LoginContext(protocol="admin", client_ip="admin-channel", default_group_policy=default_policy)
        credentials = UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
        result: JSONObject = {
            "group": group,
            "user": user,
            "default_group_policy": default_policy,
            "default_group_policy_from": source,
        }
        start = self.clock.seconds()
        try:
            _, avatar, logout = await test_portal.login(credentials, context, IVPNIdentity)
        except UnauthorizedLogin as e:  # NoGroupPolicy included: its reason says so
            result.update(result="rejected", reason=_masked(str(e), password))
        except AAAUnavailable as e:
            result.update(result="unavailable", reason=_masked(str(e), password))
        else:
            logout()
            identity = avatar
            assert isinstance(identity, VPNIdentity)
            policy = identity.policy
            result.update(
                result="accepted",
                authenticated_user=identity.user,
                group_policy={
                    "name": policy.name,
                    "simultaneous_logins": policy.simultaneous_logins,
                    "idle_timeout": policy.idle_timeout,
                    "max_session_time": policy.max_session_time,
                },
            )
        if isinstance(realm.avatar_id, AuthenticatedUser):
            avatar = realm.avatar_id
            result["attributes"] = {
                "server_group": avatar.server_group,
                "radius_class": avatar.radius_class,
                "ldap_policies": list(avatar.ldap_policies),
                "local_policy": avatar.local_policy,
            }
        result["latency_ms"] = round((self.clock.seconds() - start) * 1000, 1)
        self._last_tests[group] = {"result": result["result"], "at": self.clock.seconds()}
        self.log.info("AAA test of {user} through {group}: {result}", user=user, group=group, result=result["result"])
        return result

    # -- aaa flush --------------------------------------------------------------------

    def aaa_flush(self, group: str | None, user: str | None) -> JSONObject | defer.Deferred[JSONObject]:
        if user is not None and group is None:
            raise InvalidArgument("a user's cached logins are flushed by group: give the GROUP before the USER")
        groups = {g.name: g for g in self.gateway.config.aaa_server_groups}
        result: JSONObject = {"group": group, "user": user}
        if group is not None:
            if group not in groups:
                raise NoSuchGroup(f"no AAA server group {group!r} (groups: {', '.join(groups) or 'none'})")
            result["cache_ttl"] = groups[group].cache_ttl
        cache = self.gateway.auth_cache
        result["flushed"] = cache.flush(group, user)
        result["remaining"] = len(cache)
        pool = self._pool()
        if pool is None:
            return result

        async def everywhere() -> JSONObject:
            # Each worker keeps its own cache [5.6, 10].
            assert pool is not None
            result["flushed"] = int(result["flushed"]) + await pool.flush(group, user)  # type: ignore[call-overload]
            return result

        return defer.Deferred.fromCoroutine(everywhere())

    # -- POP3 SSO: the identity table -------------------------------------------------

    def _identity_table(self) -> IdentityTable:
        table = self.gateway.identities
        if table is None or not self.gateway.config.sso_pop3.enabled:
            raise NotAvailable("POP3 SSO is off in this daemon (sso.pop3.enabled = false): no identity table")
        return table

    @staticmethod
    def _identity(identity: Identity, now: float) -> JSONObject:
        return {**identity.as_dict(), "expires_in": max(0.0, identity.expires - now)}

    def sso_list(self) -> list[JSONObject]:
        table = self._identity_table()
        now = self.clock.seconds()
        live = [identity for identity in table if identity.expires > now]
        return [self._identity(identity, now) for identity in sorted(live, key=_address_order)]

    def _live_entry(self, table: IdentityTable, ip: str) -> Identity:
        for form in _address_forms(ip):
            identity = table.lookup(form)
            if identity is not None:
                return identity
        raise NoSuchIdentity(f"no SSO identity for {ip}")

    def sso_lookup(self, ip: str) -> JSONObject:
        identity = self._live_entry(self._identity_table(), ip)
        return self._identity(identity, self.clock.seconds())

    def sso_remove(self, ip: str) -> JSONObject:
        table = self._identity_table()
        identity = self._live_entry(table, ip)
        table.remove(identity.ip)
        return self._identity(identity, self.clock.seconds())

    def sso_replay(self, path: str) -> defer.Deferred[JSONObject]:
        table = self._identity_table()
        if not os.path.isabs(path):
            raise InvalidArgument(f"{path}: the capture file must be given by an absolute path")
        sso = self.gateway.config.sso_pop3
        servers = monitored_servers(sso)
        if not servers:
            raise NotAvailable("sso.pop3.servers names no IP address, and a replay watches addresses only")
        return defer.Deferred.fromCoroutine(self._replay(table, sso, servers, path))

    async def _replay(
        self, table: IdentityTable, sso: SSOConfig, servers: list[tuple[str, int]], path: str
    ) -> JSONObject:
        learnt: Counter[str] = Counter()

        def login(client_ip: str, user: str, server: tuple[str, int]) -> None:
            # As the live monitor: only clients inside sso.pop3.policy get entries.
            if sso.applies_to(client_ip):
                table.learn(client_ip, user, IdentitySource.MONITOR)
                learnt["learnt"] += 1
            else:
                learnt["outside_policy"] += 1

        # A monitor of its own: the replay's frame times are the file's.
        monitor = Pop3Monitor(servers, login, self.clock)
        try:
            frames = await replay_in_thread(self.gateway.reactor, path, monitor)
        except CaptureFileError as e:
            raise ReplayFailed(f"{path} is not a capture file this gateway can read: {e}") from None
        except OSError as e:
            raise ReplayFailed(f"cannot read {path}: {e.strerror or e}") from None
        statistics = monitor.statistics()
        self.log.info(
            "Capture {path} replayed: {frames} frames, {logins} logins, {learnt} learnt",
            path=path,
            frames=frames,
            logins=statistics["logins"],
            learnt=learnt["learnt"],
        )
        return {
            "path": path,
            "frames": frames,
            "logins": statistics["logins"],
            "learnt": learnt["learnt"],
            "outside_policy": learnt["outside_policy"],
            "streams_tls": statistics["streams_tls"],
            "statistics": statistics,
        }

    # -- remote POP accounts ----------------------------------------------------------

    def _poller_call(self, method: str, *args: Any) -> defer.Deferred[Any]:
        poller = self.poller
        if poller is None:
            return defer.fail(NotAvailable("the remote POP poller is not running in this daemon"))

        async def call() -> Any:
            try:
                value = getattr(poller, method)(*args)
                if inspect.isawaitable(value):
                    value = await value
            except KeyError as e:
                raise NoSuchAccount(str(e) if type(e) is not KeyError else f"no remote POP account {args[0]}") from None
            except ValueError as e:
                raise InvalidAccount(getattr(e, "problems", None) or [str(e)]) from None
            return value

        return defer.Deferred.fromCoroutine(call())

    def accounts_list(self, domain: str | None) -> defer.Deferred[list[JSONObject]]:
        return self._poller_call("list", domain).addCallback(lambda accounts: [_plain(a) for a in accounts])

    def accounts_add(self, fields: JSONObject) -> defer.Deferred[JSONObject]:
        return self._poller_call("add", fields).addCallback(_plain)

    def accounts_edit(self, account_id: str, fields: JSONObject) -> defer.Deferred[JSONObject]:
        return self._poller_call("edit", account_id, fields).addCallback(_plain)

    def accounts_delete(self, account_id: str) -> defer.Deferred[None]:
        return self._poller_call("delete", account_id).addCallback(lambda _: None)

    def accounts_check_now(
        self, account_id: str, progress: Callable[[str], None] | None = None
    ) -> defer.Deferred[JSONObject]:
        def report(so_far: Any) -> None:
            if progress is not None:
                summary = getattr(so_far, "summary", None)
                progress(summary() if callable(summary) else str(so_far))

        return self._poller_call("check_now", account_id, report).addCallback(_plain)


def monitored_servers(sso: SSOConfig) -> list[tuple[str, int]]:
    """The C{(ip, port)} of C{sso.pop3.servers} that are IP addresses: the monitor
    mode watches addresses, not names."""
    servers = []
    for server in sso.servers:
        host = server.host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            continue
        servers.append((host, server.port))
    return servers


def _address_forms(ip: str) -> list[str]:
    """The forms an address may have in the identity table: canonical, and the
    IPv4-mapped IPv6 form of an IPv4 address (a dual-stack listener sees those), or
    the other way round.

    @raise InvalidArgument: C{ip} is not an IP address.
    """
    try:
        address = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        raise InvalidArgument(f"not an IP address: {ip!r}") from None
    forms = [str(address)]
    if isinstance(address, ipaddress.IPv4Address):
        forms.append(f"::ffff:{address}")
    elif address.ipv4_mapped is not None:
        forms.append(str(address.ipv4_mapped))
    return forms


def _address_order(identity: Identity) -> tuple[int, int, str]:
    """Sort key: IPv4 before IPv6, numerically."""
    try:
        address = ipaddress.ip_address(identity.ip)
    except ValueError:
        return (9, 0, identity.ip)
    return (address.version, int(address), identity.ip)


def _plain(value: object) -> JSONObject:
    """A poller result as a JSON-ready mapping: a mapping, an object with
    C{as_dict()}, or a dataclass."""
    if isinstance(value, Mapping):
        return dict(value)
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return dict(as_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return {"result": str(value)}


#: the password fields of a login dialogue a reason may quote: POP3 PASS and APOP,
#: AUTH's initial response, IMAP LOGIN's second argument
_DIALOGUE_SECRET = re.compile(r"(?i)\b(PASS|APOP|AUTH[ \t]+[A-Z0-9_-]+|LOGIN[ \t]+\S+)([ \t]+)\S+")
_MASK = "********"


def _masked(text: str, password: str) -> str:
    """C{text} with the password fields of any dialogue it quotes masked, and the
    password itself where it stands as a word of its own (a checker's reason should
    never hold it; this makes sure).  A password that is also part of other words
    (C{x} in C{dc1.example.com}) leaves them alone."""
    text = _DIALOGUE_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)
    if not password:
        return text
    standalone = re.compile(rf"(?<![^\s'\"(\[<]){re.escape(password)}(?=$|[\s'\",;:)\]>]|\.(?:\s|$))")
    return standalone.sub(_MASK, text)


def _group_servers(group: AAAServerGroup) -> list[str]:
    """The servers of a group, for display: addresses only, never credentials."""
    if isinstance(group, LocalGroup):
        return [str(group.users_file)]
    if isinstance(group, LdapGroup):
        servers = []
        for url in group.servers:
            parts = urlsplit(url)
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            servers.append(f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else ""))
        return servers
    if isinstance(group, RadiusGroup):
        return [f"{s.host}:{s.auth_port}" for s in group.servers]
    assert isinstance(group, Pop3Group)
    return [f"{s.host}:{s.port} ({s.tls})" for s in group.servers]
