"""Builds the gateway's service tree from a configuration and a reactor.

Nothing here reads the clock or the reactor from a global: ``build`` gets both, and
every object that needs them gets them passed in.  Shared state (the session registry,
the AAA portals, the TLS context) belongs to the objects created here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailgw.auth.ldap import LdapChecker
from mailgw.auth.local import LocalUsersChecker
from mailgw.auth.pop3 import Pop3Checker
from mailgw.auth.portal import AuthenticatedUser, GatewayRealm, make_portal
from mailgw.auth.radius import RadiusAccounting, RadiusChecker, RadiusClient
from mailgw.config import Config, InterfaceConfig, LdapGroup, LocalGroup, Pop3Group, ProxyConfig, RadiusGroup
from mailgw.logs import make_observer
from mailgw.proxy.core import ProxyEnvironment, ProxyFactory, ProxySession
from mailgw.proxy.gatekeeper import Authorizer, Gatekeeper
from mailgw.proxy.imap4 import IMAP4Session
from mailgw.proxy.pop3 import POP3Session
from mailgw.proxy.proxyprotocol import ProxyHeaderFactory
from mailgw.proxy.registry import SessionRegistry
from mailgw.proxy.smtp import SMTPSession
from mailgw.tls import ServerTLS, ensure_self_signed
from mailgw.upstream import Connector

#: the session class of each proxy section
SESSION_CLASSES: Mapping[str, type[ProxySession]] = {
    "pop3s": POP3Session,
    "imap4s": IMAP4Session,
    "smtps": SMTPSession,
}


class ThreadPoolService(Service):
    """Runs a bounded thread pool for blocking work (password hashes) while the
    service runs."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class Listener(StreamServerEndpointService):
    """One listening port of one proxy, named for logs and the admin channel."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, *, name: str, description: str) -> None:
        super().__init__(endpoint, factory)
        self.setName(name)
        self.description = description
        # Fail startService (and so the daemon's start) when the port cannot be bound.
        self._raiseSynchronously = True


class GatewayService(MultiService):
    """The root of the gateway: listeners, thread pool, shared state."""

    log = Logger()

    def __init__(self, config: Config, reactor: Any, *, failure_delay: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.registry = SessionRegistry(reactor)
        self.log_observer: ILogObserver = make_observer(config.gateway.log_format, sys.stdout)
        self.threadpool = ThreadPool(minthreads=0, maxthreads=4, name="mailgw-aaa")
        ThreadPoolService(self.threadpool).setServiceParent(self)

        if config.gateway.workers > 1:
            self.log.warn(
                "gateway.workers = {workers}: this version runs one process; the extra workers are not started",
                workers=config.gateway.workers,
            )
        _ensure_private_folder(config.gateway.state_dir)
        tls = config.tls
        if tls.generate_self_signed:
            ensure_self_signed(tls.certificate, tls.private_key, config.gateway.node_name)
        self.server_tls = ServerTLS(
            tls.certificate,
            tls.private_key,
            minimum_version=tls.minimum_version,  # type: ignore[arg-type]  # validated by config
            client_certificate=tls.client_certificate,  # type: ignore[arg-type]
            client_ca=tls.client_ca,
        )
        self.connector = Connector(reactor)
        realm = GatewayRealm(config.group_policy)
        self.portals: dict[str, Portal] = {}
        self.checkers: dict[str, Any] = {}
        self.radius = RadiusClient(reactor)
        self.accounting: dict[str, RadiusAccounting] = {}
        #: server groups that can look a user up without a password [5.2]
        self.authorizers: dict[str, Authorizer] = {}
        for group in config.aaa_server_groups:
            checker: Any
            if isinstance(group, LocalGroup):
                checker = LocalUsersChecker.from_file(group.name, group.users_file, reactor, self.threadpool)
            elif isinstance(group, LdapGroup):
                checker = LdapChecker(group, reactor, self.threadpool)
                self.authorizers[group.name] = checker.authorize
            elif isinstance(group, Pop3Group):
                checker = Pop3Checker(group, self.connector)
            else:
                checker = RadiusChecker(group, self.radius, config.gateway.node_name)
                self.authorizers[group.name] = _radius_authorizer(checker)
            self.checkers[group.name] = checker
            self.portals[group.name] = make_portal(checker, realm)

        self.environments: dict[str, ProxyEnvironment] = {}
        for proxy in config.proxies():
            if not proxy.enabled:
                continue
            session_class = SESSION_CLASSES[proxy.protocol]
            accounting = None
            if proxy.accounting_server_group:
                accounting = self.accounting.get(proxy.accounting_server_group)
                if accounting is None:
                    group = config.aaa_group(proxy.accounting_server_group)
                    assert isinstance(group, RadiusGroup)  # checked by the configuration
                    accounting = RadiusAccounting.for_group(self.radius, group, config.gateway.node_name)
                    self.accounting[proxy.accounting_server_group] = accounting
            env = ProxyEnvironment(
                proxy=proxy,
                clock=reactor,
                registry=self.registry,
                gatekeeper=Gatekeeper(
                    proxy, self.portals, self.registry, config.group_policy, authorizers=self.authorizers
                ),
                connector=self.connector,
                server_tls=self.server_tls,
                node_name=config.gateway.node_name,
                failure_delay=failure_delay,
                accounting=accounting,
            )
            self.environments[proxy.protocol] = env
            for interface in config.interfaces:
                if getattr(interface, proxy.protocol):
                    for listener in _listeners(reactor, env, session_class, interface):
                        listener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd creates the Application after makeService and asks it for an
        # ILogObserver before it starts logging: give it the configured format.
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    def startService(self) -> None:
        super().startService()
        for listener in self.listeners():
            self.log.info("Listening: {listener}", listener=listener.description)

    async def _stop(self) -> None:
        # Checkers release their pooled connections while the thread pool (a child
        # service, stopped below) still runs.
        for checker in self.checkers.values():
            close = getattr(checker, "close", None)
            if close is not None:
                await defer.maybeDeferred(close)
        await defer.maybeDeferred(super().stopService)
        for accounting in self.accounting.values():
            accounting.close()
        await self.radius.close()

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())


def _radius_authorizer(checker: RadiusChecker) -> Authorizer:
    """RADIUS authorizes by name only (Authorize-Only has no secondary field)."""

    def authorize(username: str, secondary: str | None) -> defer.Deferred[AuthenticatedUser]:
        return checker.authorize(username)

    return authorize


def _listeners(
    reactor: Any, env: ProxyEnvironment, session_class: type[ProxySession], interface: InterfaceConfig
) -> list[Listener]:
    """The listeners of one proxy on one interface, by C{tls_support} [4.1]."""
    proxy: ProxyConfig = env.proxy
    ports: list[tuple[int, bool]] = []
    if proxy.tls_support in ("enabled", "required"):
        ports.append((proxy.port, True))
    if proxy.tls_support in ("enabled", "disabled") and proxy.starttls_port:
        ports.append((proxy.starttls_port, False))
    result = []
    for port, implicit in ports:
        endpoint: IStreamServerEndpoint
        if ":" in interface.address:
            endpoint = TCP6ServerEndpoint(reactor, port, interface=interface.address)
        else:
            endpoint = TCP4ServerEndpoint(reactor, port, interface=interface.address)
        factory: Factory = ProxyFactory(env, session_class, interface=interface, implicit_tls=implicit)
        if implicit:
            factory = TLSMemoryBIOFactory(env.server_tls, False, factory)  # type: ignore[assignment]
        if interface.proxy_protocol:
            factory = ProxyHeaderFactory(factory, reactor)  # type: ignore[assignment]
        kind = "implicit TLS" if implicit else ("STARTTLS" if proxy.tls_support != "disabled" else "plaintext")
        name = f"{proxy.protocol}/{interface.name}/{port}"
        result.append(Listener(endpoint, factory, name=name, description=f"{name} ({interface.address}, {kind})"))
    return result


def _ensure_private_folder(path: Path) -> None:
    """Create the state folder 0700 if missing."""
    if not path.exists():
        os.makedirs(path, mode=0o700, exist_ok=True)


def build(config: Config, reactor: Any, **options: Any) -> GatewayService:
    """The service tree for C{config}."""
    return GatewayService(config, reactor, **options)


