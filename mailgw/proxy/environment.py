"""What the sessions of one proxy share: the L{ProxyEnvironment} (configuration,
clock, registry, gatekeeper, connector, TLS, accounting, metrics, penalty, SSO), the
pre-login input buffer protocol, and the L{ProxyFactory} that builds sessions with the
environment current when they connect (a reload makes a new one; sessions keep theirs).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol

from mailgw.auth.limits import PenaltyTable
from mailgw.auth.radius import RadiusAccounting
from mailgw.config import InterfaceConfig, ProxyConfig, SSOConfig
from mailgw.memory import LiveConnections
from mailgw.metrics import Metrics
from mailgw.proxy.gatekeeper import Gatekeeper
from mailgw.proxy.registry import SessionInfo, SessionRegistry
from mailgw.proxy.relay import IRelayStage
from mailgw.sso.identity import IdentityTable
from mailgw.sso.neighbours import NeighbourTable
from mailgw.upstream import Connector

if TYPE_CHECKING:
    from mailgw.proxy.core import ProxySession


class StageFactory(typing.Protocol):
    """What the core needs of content inspection [4.9]: a stage per inspected session."""

    def stage_for(self, protocol: str, profile: str, info: SessionInfo) -> IRelayStage | None: ...


class InputBuffer(typing.Protocol):
    """What the core needs of a protocol's pre-login input buffer."""

    def append(self, data: bytes) -> None: ...

    def clear(self) -> None: ...

    def pending(self) -> bytes: ...

    def take_rest(self) -> bytes: ...


@dataclass
class ProxyEnvironment:
    """Everything a proxy's sessions share (one per proxy, built by the service)."""

    proxy: ProxyConfig
    clock: IReactorTime
    registry: SessionRegistry
    gatekeeper: Gatekeeper
    connector: Connector
    #: server TLS context factory (for the implicit port and STARTTLS)
    server_tls: Any
    node_name: str = "mailgw"
    #: seconds before a failed login is answered [4.3]
    failure_delay: float = 1.0
    #: RADIUS accounting of the proxy's sessions [5.4], if configured
    accounting: RadiusAccounting | None = None
    #: Prometheus series [8.3]
    metrics: Metrics | None = None
    #: the failure penalty per client address [4.10], shared by the proxies
    penalty: PenaltyTable | None = None
    #: every session whose connections are not all gone yet (shared by the proxies;
    #: a graceful stop waits for it to empty)
    connections: LiveConnections[ProxySession] | set[ProxySession] = field(default_factory=set)
    #: SMTP: the default server's extensions for the EHLO answer before AUTH, as EHLO
    #: lines (L{mailgw.upstream.smtpprobe.SMTPCapabilities.keywords}); None: the fallback
    smtp_extensions: Callable[[], tuple[str, ...]] | None = None
    #: the SSO identity table [7] (None: SSO off)
    identities: IdentityTable | None = None
    #: C{sso.pop3} where this proxy learns identities inline (the POP3 proxy with
    #: C{mode = "inline"}), else None
    sso_inline: SSOConfig | None = None
    #: the neighbour table, where C{sso.pop3.policy} names MAC addresses
    neighbours: NeighbourTable | None = None
    #: content inspection [4.9]: the stages of sessions whose policy names a profile
    inspection: StageFactory | None = None


class ProxyFactory(Factory):
    """Builds the sessions of one proxy on one listening port.

    C{environment} is the proxy's environment, or a callable returning the current
    one (the service's, replaced on each reload): each session keeps the environment
    it was built with.
    """

    noisy = False

    def __init__(
        self,
        environment: ProxyEnvironment | Callable[[], ProxyEnvironment],
        session_class: type[ProxySession],
        *,
        interface: InterfaceConfig,
        implicit_tls: bool,
    ) -> None:
        if isinstance(environment, ProxyEnvironment):
            fixed = environment
            self.current: Callable[[], ProxyEnvironment] = lambda: fixed
        else:
            self.current = environment
        self.session_class = session_class
        self.interface = interface
        self.implicit_tls = implicit_tls

    @property
    def environment(self) -> ProxyEnvironment:
        """The environment new sessions get."""
        return self.current()

    def buildProtocol(self, addr: Any) -> Protocol:
        session = self.session_class(self.current(), implicit_tls=self.implicit_tls)
        session.factory = self
        return session
