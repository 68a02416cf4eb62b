"""Fakes shipped with the package for protocol tests without sockets.

Each fake keeps the contract of the real object it stands for (the integration tests
run the same scenarios against the real ones): L{StaticChecker} answers like a
server-group checker, L{ScriptedConnector} like L{mailgw.upstream.Connector} but with
the upstream login client on a C{StringTransport} the test feeds by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailgw.auth.portal import AuthenticatedUser
from mailgw.proxy.relay import IStageEnds
from mailgw.upstream import UpstreamProtocol, UpstreamTarget, UpstreamUnavailable


@implementer(ICredentialsChecker)
class StaticChecker:
    """A checker over a dict of user → (password, local group policy)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[str, tuple[str, str | None]], group_name: str = "LOCAL") -> None:
        self.users = users
        self.group_name = group_name

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AuthenticatedUser]:  # type: ignore[override]
        name = credentials.username.decode("utf-8")
        entry = self.users.get(name)
        if entry is None or entry[0] != credentials.password.decode("utf-8"):
            return defer.fail(UnauthorizedLogin(f"bad credentials for {name!r}"))
        return defer.succeed(AuthenticatedUser(name=name, server_group=self.group_name, local_policy=entry[1]))


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    tls_options: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_options = options


class ScriptedConnector:
    """Stands in for L{mailgw.upstream.Connector}: every login gets its upstream
    protocol on a L{TLSStringTransport}; the test answers for the server with
    C{upstreams[-1].dataReceived(...)} (or makes the connection fail)."""

    def __init__(self, *, unreachable: bool = False) -> None:
        self.unreachable = unreachable
        self.upstreams: list[UpstreamProtocol] = []
        self.targets: list[UpstreamTarget] = []

    async def login(
        self,
        target: UpstreamTarget,
        make_protocol: Callable[[UpstreamTarget, IOpenSSLClientConnectionCreator | None], UpstreamProtocol],
        user: str,
        password: str,
    ) -> tuple[UpstreamProtocol, bytes]:
        self.targets.append(target)
        if self.unreachable:
            raise UpstreamUnavailable(f"cannot connect to {target.describe()}: connection refused")
        protocol = make_protocol(target, None)
        protocol.makeConnection(TLSStringTransport())
        self.upstreams.append(protocol)
        answer = await protocol.begin_login(user, password)
        return protocol, answer


@implementer(IStageEnds)
class RecordingEnds:
    """The relay's side of a stage (L{mailgw.proxy.relay.IStageEnds}), recording: what
    the stage writes each way, which sides it holds, and how it ended the session."""

    def __init__(self) -> None:
        self.client: list[bytes] = []
        self.server: list[bytes] = []
        self.client_held = False
        self.server_held = False
        self.ended: tuple[str, bytes] | None = None

    def to_client(self, data: bytes) -> None:
        self.client.append(data)

    def to_server(self, data: bytes) -> None:
        self.server.append(data)

    def hold_client(self, held: bool) -> None:
        self.client_held = held

    def hold_server(self, held: bool) -> None:
        self.server_held = held

    def end(self, reason: str, goodbye: bytes) -> None:
        self.ended = (reason, goodbye)
