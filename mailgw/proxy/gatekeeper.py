"""Who may log in, to which server, with which policy: the decisions of a login [4.2,
4.3, 5.2, 5.5], in one plain object per proxy that gets everything passed in."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from cryptography import x509
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import Logger

from mailgw.auth.certificate import CertificateRejected, identity_from_certificate
from mailgw.auth.limits import PendingLimit, limited
from mailgw.auth.portal import (
    AAAUnavailable,
    AuthenticatedUser,
    ClientCredentials,
    GatewayRealm,
    IVPNIdentity,
    LoginContext,
    VPNIdentity,
)
from mailgw.auth.radius import TerminateCause
from mailgw.config import GroupPolicy, ProxyConfig
from mailgw.proxy.directory import ISessionDirectory, LocalDirectory
from mailgw.proxy.registry import LoginRefused, SessionInfo, SessionRegistry
from mailgw.sso.identity import IdentityTable
from mailgw.upstream import UpstreamTarget
from mailgw.wire.errors import LoginSyntaxError
from mailgw.wire.login import LoginRequest, parse_login

#: looks a user up in an authorization server group: (username, secondary) → attributes
Authorizer = Callable[[str, "str | None"], Awaitable[AuthenticatedUser]]


class LoginFailed(Exception):
    """The login is refused; C{reason} goes to the log, never to the client.

    C{temporary} failures (AAA servers or the mail server unreachable) get the
    protocol's temporary-failure answer at once; the others the ordinary
    authentication failure after the failure delay.
    """

    def __init__(self, reason: str, *, temporary: bool = False, kind: str = "auth_failed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.temporary = temporary
        #: a small fixed set for metrics (see L{mailgw.metrics.LOGIN_FAILURE_KINDS})
        self.kind = kind


def _normalise_host(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


class Gatekeeper:
    """The login decisions of one proxy."""

    log = Logger()

    def __init__(
        self,
        proxy: ProxyConfig,
        portals: Mapping[str, Portal],
        registry: SessionRegistry,
        lookup_policy: Callable[[str], GroupPolicy | None],
        *,
        authorizers: Mapping[str, Authorizer] | None = None,
        limits: Mapping[str, PendingLimit] | None = None,
        identities: IdentityTable | None = None,
        directory: ISessionDirectory | None = None,
    ) -> None:
        self.proxy = proxy
        #: where logins are counted beyond this gateway [11]
        self.directory: ISessionDirectory = directory if directory is not None else LocalDirectory()
        #: the SSO identity table, for the piggyback method [4.3]
        self._identities = identities
        self._authorizers = authorizers or {}
        self._limits = limits or {}
        self._realm = GatewayRealm(lookup_policy)
        self._portals = portals
        self._registry = registry
        self._lookup_policy = lookup_policy
        default = proxy.default_server
        #: normalised name → the name as configured: upstream connections (and their
        #: TLS objects) use the configured spelling, never the client's [4.10]
        self._allowed: dict[str, str] = {_normalise_host(h): h for h in proxy.allowed_servers}
        self._allowed[_normalise_host(default.host)] = default.host

    def target_for(self, request: LoginRequest) -> UpstreamTarget:
        """The mail server of a login: the default, or an allowed named one [4.2].

        A server not in C{allowed_servers} is refused before any connection is
        attempted: the gateway is no open proxy.
        """
        default = self.proxy.default_server
        host = default.host
        if request.server is not None:
            configured = self._allowed.get(_normalise_host(request.server))
            if configured is None:
                raise LoginFailed(f"server {request.server!r} is not in allowed_servers", kind="not_allowed")
            host = configured.strip("[]")
        return UpstreamTarget(
            host=host,
            port=default.port,
            tls=default.tls,
            verify_certificate=default.verify_certificate,
            ca=default.ca,
        )

    async def authenticate(
        self,
        info: SessionInfo,
        request: LoginRequest,
        client_ip: str,
        certificate: x509.Certificate | None = None,
    ) -> VPNIdentity | None:
        """Establish the VPN identity by the proxy's authentication methods [4.3],
        then apply simultaneous logins [5.5].  Raises L{LoginFailed}.

        C{None} means the identity is left to the mailhost login (SMTPS whose only
        method is C{mailhost}): the caller then calls L{mailhost_identity} once the
        mail server accepted the AUTH.  Listed beside other methods, C{mailhost} only
        means "AUTH upstream" and establishes no identity [4.3].
        """
        if tuple(self.proxy.authentication) == ("mailhost",):
            return None
        reasons: list[str] = []
        temporary = False
        identity: VPNIdentity | None = None
        context = LoginContext(
            protocol=self.proxy.protocol,
            client_ip=client_ip,
            default_group_policy=self.proxy.default_group_policy,
        )
        for method in self.proxy.authentication:
            try:
                if method == "aaa":
                    identity = await self._aaa(request, context)
                elif method == "certificate":
                    identity = await self._certificate(certificate, context)
                elif method == "mailhost":
                    # Beside other methods: AUTH upstream only (the proxy does it).
                    continue
                else:
                    identity = self._piggyback(request, replace(context, method="piggyback"))
            except UnauthorizedLogin as e:
                reasons.append(f"{method}: {e}")
            except AAAUnavailable as e:
                reasons.append(f"{method}: {e}")
                temporary = True
            if identity is not None:
                break
        if identity is None:
            raise LoginFailed("; ".join(reasons) or "no authentication method succeeded", temporary=temporary)
        self._claim(info, identity)
        return identity

    async def check_password(self, user: str, password: str, client_ip: str) -> VPNIdentity:
        """The SSO portal's login [7]: this proxy's AAA (authentication group, then
        the authorization group where set) for a user name and password, without a
        mail server and without claiming a simultaneous login.  Raises
        L{LoginFailed} (C{temporary} when the AAA servers are unavailable)."""
        try:
            request = parse_login(
                user,
                password,
                user_delimiter=self.proxy.username_password_delimiter,
                server_delimiter=self.proxy.server_delimiter,
            )
        except LoginSyntaxError as e:
            raise LoginFailed(f"bad login syntax: {e}", kind="syntax") from None
        context = LoginContext(
            protocol="portal", client_ip=client_ip, default_group_policy=self.proxy.default_group_policy
        )
        try:
            return await self._aaa(request, context)
        except UnauthorizedLogin as e:
            raise LoginFailed(f"aaa: {e}") from None
        except AAAUnavailable as e:
            raise LoginFailed(f"aaa: {e}", temporary=True) from None

    def mailhost_identity(self, info: SessionInfo, request: LoginRequest) -> VPNIdentity:
        """The identity of a login the mail server accepted (the C{mailhost}
        method): the VPN user with the proxy's default group policy."""
        name = self.proxy.default_group_policy
        policy = self._lookup_policy(name) if name else None
        if policy is None:
            raise LoginFailed(f"mailhost login of {request.vpn_user!r}: no default group policy", kind="policy")
        identity = VPNIdentity(request.vpn_user, policy, "mailhost")
        self._claim(info, identity)
        return identity

    async def _aaa(self, request: LoginRequest, context: LoginContext) -> VPNIdentity:
        group = self.proxy.authentication_server_group
        portal = self._portals[group]
        credentials = ClientCredentials(
            request.vpn_user.encode("utf-8"), request.vpn_password.encode("utf-8"), context.client_ip
        )
        mind = replace(context, method="aaa")

        def check() -> defer.Deferred[tuple[Any, ...]]:
            return portal.login(credentials, mind, IVPNIdentity)

        limit = self._limits.get(group)
        if limit is not None:
            # At most max_pending checks of the group at once; beyond, a temporary
            # failure at once [4.10].
            _, identity, _ = await limited(limit, check)
        else:
            _, identity, _ = await check()
        assert isinstance(identity, VPNIdentity)
        if self.proxy.authorization_server_group:
            # [5.2]: the user must also be found there, and its attributes decide.
            return await self._authorized(identity.user, None, replace(context, method="aaa"))
        return identity

    def _piggyback(self, request: LoginRequest, context: LoginContext) -> VPNIdentity:
        """The client's address has a live entry in the identity table (a portal or
        SSO login) for the same VPN user: no VPN password needed [4.3]."""
        if self._identities is None:
            raise UnauthorizedLogin("SSO is off (no identity table)")
        entry = self._identities.lookup(context.client_ip)
        if entry is None:
            raise UnauthorizedLogin(f"no identity for {context.client_ip} in the identity table")
        if entry.user != request.vpn_user:
            raise UnauthorizedLogin(f"the identity of {context.client_ip} is another user")
        user = AuthenticatedUser(name=entry.user, server_group="piggyback", local_policy=entry.group_policy)
        return self._identity(user, context)

    async def _certificate(self, certificate: x509.Certificate | None, context: LoginContext) -> VPNIdentity:
        """The VPN identity from the client's verified certificate [4.3, 5.3]."""
        if certificate is None:
            raise UnauthorizedLogin("the client sent no (verified) certificate")
        mapping = self.proxy.authorization
        try:
            found = identity_from_certificate(
                certificate,
                mode=mapping.username_from_certificate,
                primary=mapping.primary_dn_field,
                secondary=mapping.secondary_dn_field,
            )
        except CertificateRejected as e:
            raise UnauthorizedLogin(f"certificate refused: {e.reason}") from None
        context = replace(context, method="certificate")
        if self.proxy.authorization_server_group:
            return await self._authorized(found.username, found.secondary, context)
        user = AuthenticatedUser(name=found.username, server_group="certificate", secondary=found.secondary)
        return self._identity(user, context)

    async def _authorized(self, username: str, secondary: str | None, context: LoginContext) -> VPNIdentity:
        group = self.proxy.authorization_server_group
        authorize = self._authorizers.get(group)
        if authorize is None:
            raise AAAUnavailable(f"authorization group {group!r} cannot authorize")
        try:
            user = await authorize(username, secondary)
        except UnauthorizedLogin as e:
            raise UnauthorizedLogin(f"not authorized by group {group!r}: {e}") from None
        return self._identity(user, context)

    def _identity(self, user: AuthenticatedUser, context: LoginContext) -> VPNIdentity:
        _, identity, _ = self._realm.requestAvatar(user, context, IVPNIdentity)
        assert isinstance(identity, VPNIdentity)
        return identity

    def _claim(self, info: SessionInfo, identity: VPNIdentity) -> None:
        policy = identity.policy
        try:
            victims = self._registry.claim_login(info, identity.user, policy.simultaneous_logins)
        except LoginRefused as e:
            raise LoginFailed(f"{e} (group policy {policy.name!r})", kind="policy") from None
        info.group_policy = policy.name
        for victim in victims:
            self.log.info(
                "Logging off session {victim_session_id} of {user}: simultaneous_logins {limit} "
                "of group policy {policy} reached by session {session_id}",
                victim_session_id=victim.session_id,
                session_id=info.session_id,
                user=identity.user,
                limit=policy.simultaneous_logins,
                policy=policy.name,
            )
            victim.owner.terminate(
                f"logged off: simultaneous_logins reached by session {info.session_id}", TerminateCause.PORT_PREEMPTED
            )
