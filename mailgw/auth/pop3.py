"""The ``pop3`` server group: the mail server's POP3 login is the password check [5.1].

The checker logs in with the gateway's own POP3 login client
(L{mailgw.upstream.pop3.POP3UpstreamLogin}: STLS or implicit TLS with certificate
verification, USER/PASS), then sends QUIT and closes.  With ``strip_domain``,
``user@domain`` is sent (and authenticated) as ``user``.

Servers are tried in order when one is unavailable (unreachable, timed out, TLS
failure, a ``[SYS/TEMP]``/``[IN-USE]`` answer); a rejected login ends the attempt at once
(L{UnauthorizedLogin}).  When no server answered: L{AAAUnavailable}, naming each server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.auth.portal import AAAUnavailable, AuthenticatedUser
from mailgw.config import Pop3Group, Pop3Server
from mailgw.tls import TLSConfigError
from mailgw.upstream import (
    Connector,
    UpstreamLoginRejected,
    UpstreamProtocol,
    UpstreamTarget,
    UpstreamUnavailable,
)
from mailgw.upstream.pop3 import POP3UpstreamLogin

__all__ = ["Pop3Checker", "logout", "pop3_username"]

#: Seconds to wait for the server to close after QUIT before dropping the connection.
QUIT_TIMEOUT = 5.0
_MAX_QUIT_ANSWER = 1024


def pop3_username(name: str, strip_domain: bool) -> str:
    """The user name sent to the POP3 server: C{name}, or with C{strip_domain} the part
    before the last C{@}."""
    if strip_domain and "@" in name:
        return name.rpartition("@")[0]
    return name


async def logout(
    protocol: UpstreamProtocol,
    clock: IReactorTime,
    timeout: float = QUIT_TIMEOUT,
    on_data: Callable[[bytes], None] | None = None,
) -> None:
    """After a successful login: send QUIT, close once the server has answered (or at
    once if it closes first), and drop the connection if that takes more than
    C{timeout} seconds.  The server's answer goes to C{on_data} (bytes as they arrive),
    or nowhere."""
    transport: Any = protocol.transport
    closed: defer.Deferred[None] = defer.Deferred()
    received: bytearray | None = bytearray()

    def lost(reason: object = None) -> None:
        if not closed.called:
            closed.callback(None)

    def answer(data: bytes) -> None:
        nonlocal received
        if on_data is not None:
            on_data(data)
        if received is not None:
            received.extend(data)
            if b"\n" in received or len(received) > _MAX_QUIT_ANSWER:
                received = None
                transport.loseConnection()

    rest = protocol.attach(answer, lost)
    if transport is None or not getattr(transport, "connected", True):
        return
    if rest and on_data is not None:
        on_data(rest)  # bytes the server sent after its login answer, before QUIT
    protocol.send(b"QUIT")
    closed.addTimeout(timeout, clock)
    try:
        await closed
    except defer.TimeoutError:
        transport.abortConnection()


@implementer(ICredentialsChecker)
class Pop3Checker:
    """Checks user names and passwords by logging in to the group's POP3 servers.

    @param group: the group's configuration.
    @param connector: opens the connections (its timeouts apply).
    @param clock: for the QUIT time limit; default: the connector's reactor.
    @param verify_certificate: check the servers' certificates and names (TLS only).
    @param ca: PEM file of CAs for the servers' certificates; None: the system store.
        (The ``[[aaa_server_group]]`` pop3 servers have no such keys yet, so the
        service passes the defaults: verified against the system store.)
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        group: Pop3Group,
        connector: Connector,
        *,
        clock: IReactorTime | None = None,
        verify_certificate: bool = True,
        ca: Path | None = None,
    ) -> None:
        self.group = group
        self.group_name = group.name
        self._connector = connector
        self._clock: IReactorTime = clock if clock is not None else connector.clock
        self._verify = verify_certificate
        self._ca = ca
        for server in group.servers:
            if server.tls == "none":
                self.log.warn(
                    "POP3 group {group}: {server} is used without TLS; passwords cross the network in clear",
                    group=group.name,
                    server=f"{server.host}:{server.port}",
                )

    def target(self, server: Pop3Server) -> UpstreamTarget:
        """The upstream target the checker logs in to for C{server}."""
        return UpstreamTarget(
            server.host, server.port, server.tls, server.verify_certificate and self._verify, server.ca or self._ca
        )

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AuthenticatedUser]:  # type: ignore[override]
        """Fires with an L{AuthenticatedUser} named as sent to the server (domain
        stripped with C{strip_domain}); fails with L{UnauthorizedLogin} or
        L{AAAUnavailable}."""
        return defer.Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> AuthenticatedUser:
        name = pop3_username(_text(credentials.username), self.group.strip_domain)
        try:
            password = _text(credentials.password, strict=True)
        except UnicodeDecodeError:
            raise UnauthorizedLogin("password is not UTF-8") from None
        if not name or not password:
            raise UnauthorizedLogin(f"empty user name or password (POP3 group {self.group_name!r})")
        reasons: list[str] = []
        for server in self.group.servers:
            target = self.target(server)
            try:
                protocol, _ = await self._connector.login(target, POP3UpstreamLogin, name, password)
            except UpstreamLoginRejected as e:
                raise UnauthorizedLogin(f"{e.reason} (POP3 group {self.group_name!r}, {target.describe()})") from None
            except (UpstreamUnavailable, TLSConfigError) as e:
                reason = e.reason if isinstance(e, UpstreamUnavailable) else str(e)
                self.log.warn(
                    "POP3 server {server} of group {group} failed: {reason}",
                    server=target.describe(),
                    group=self.group_name,
                    reason=reason,
                )
                reasons.append(f"{target.describe()}: {reason}")
                continue
            await logout(protocol, self._clock)
            return AuthenticatedUser(name=name, server_group=self.group_name)
        raise AAAUnavailable(f"no POP3 server of group {self.group_name!r} answered: " + "; ".join(reasons))


def _text(value: object, *, strict: bool = False) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "strict" if strict else "replace")
    return str(value)
