"""The twisted.cred structure of the gateway's AAA [5].

Each ``[[aaa_server_group]]`` becomes one cred checker (local file now; LDAP, RADIUS
and POP3 plug in the same way).  A checker's avatar id is an L{AuthenticatedUser}: the
name plus the attributes that decide the group policy (RADIUS Class, LDAP groups, the
local user's policy).  The L{GatewayRealm} turns it into a L{VPNIdentity} carrying the
resolved L{GroupPolicy} [5.2], using the L{LoginContext} passed as the cred "mind"
(the proxy's default policy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from zope.interface import Interface, implementer

from mailgw.config import GroupPolicy


class AAAUnavailable(Exception):
    """No server of the group answered (timeout, unreachable): a temporary failure."""


class NoGroupPolicy(UnauthorizedLogin):
    """Authenticated, but no group policy applies (Cisco ASA semantics, [5.2])."""


@dataclass(frozen=True)
class AuthenticatedUser:
    """What a checker returns as the avatar id."""

    name: str
    server_group: str
    #: RADIUS Class attribute, as received ("OU=Name;" or "Name")
    radius_class: str | None = None
    #: group policy names from the LDAP group_policy_attribute via group_policy_map
    ldap_policies: tuple[str, ...] = ()
    #: the local user's group_policy
    local_policy: str | None = None
    #: the certificate's secondary DN field value [5.3], for authorization
    secondary: str | None = None


class IVPNIdentity(Interface):
    """Marker interface of the avatar a proxy asks the portal for."""


@dataclass(frozen=True)
class VPNIdentity:
    """An authenticated VPN user with the group policy of the session."""

    user: str
    policy: GroupPolicy
    method: str
    server_group: str | None = None


@dataclass(frozen=True)
class LoginContext:
    """The cred "mind": what the realm needs to know about the login attempt."""

    protocol: str
    client_ip: str
    default_group_policy: str
    method: str = "aaa"
    extra: Mapping[str, str] = field(default_factory=dict)


class ClientCredentials(UsernamePassword):
    """A user name and password, with the client address they came from (the
    fairness key of the password-hashing pool [4.10]; never part of the check)."""

    def __init__(self, username: bytes, password: bytes, client_ip: str) -> None:
        super().__init__(username, password)
        self.client_ip = client_ip

    def __repr__(self) -> str:
        return f"<ClientCredentials for {self.username!r} from {self.client_ip}>"


def policy_from_radius_class(value: str) -> str | None:
    """The policy name in a RADIUS Class attribute: ``OU=Name;`` or ``Name`` [5.2]."""
    text = value.strip()
    if text.upper().startswith("OU="):
        text = text[3:]
        text = text.split(";", 1)[0]
    text = text.strip()
    return text or None


def choose_group_policy(
    user: AuthenticatedUser,
    default: str,
    lookup: Callable[[str], GroupPolicy | None],
) -> GroupPolicy:
    """The session's group policy by the order of [5.2]; raises L{NoGroupPolicy}."""
    candidates: list[tuple[str, str]] = []
    if user.radius_class:
        name = policy_from_radius_class(user.radius_class)
        if name:
            candidates.append(("RADIUS Class", name))
    if user.ldap_policies:
        candidates.append(("LDAP group", sorted(user.ldap_policies)[0]))
    if user.local_policy:
        candidates.append(("local user", user.local_policy))
    if default:
        candidates.append(("default_group_policy", default))
    if not candidates:
        raise NoGroupPolicy(f"no group policy for user {user.name!r} and no default group policy")
    source, name = candidates[0]
    policy = lookup(name)
    if policy is None:
        raise NoGroupPolicy(f"group policy {name!r} (from {source}) is not defined")
    return policy


@implementer(IRealm)
class GatewayRealm:
    """Resolves the group policy of an authenticated user."""

    def __init__(self, lookup: Callable[[str], GroupPolicy | None]) -> None:
        self._lookup = lookup

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if IVPNIdentity not in interfaces:
            raise TypeError("GatewayRealm only provides IVPNIdentity")
        assert isinstance(avatarId, AuthenticatedUser)
        assert isinstance(mind, LoginContext)
        policy = choose_group_policy(avatarId, mind.default_group_policy, self._lookup)
        identity = VPNIdentity(avatarId.name, policy, mind.method, avatarId.server_group)
        return IVPNIdentity, identity, lambda: None


def make_portal(checker: ICredentialsChecker, realm: GatewayRealm) -> Portal:
    """A portal for one server group."""
    return Portal(realm, [checker])
