"""The proxies' listeners: one per port, protocol and interface [4.1], built from the
configuration (the environment of new sessions followed across reloads, so a reload
needs no new listener), with the sockets from wherever this process gets them
(L{mailgw.workers.sockets})."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailgw.config import Config, InterfaceConfig, ProxyConfig
from mailgw.proxy.core import ProxySession
from mailgw.proxy.environment import ProxyEnvironment, ProxyFactory
from mailgw.proxy.imap4 import IMAP4Session
from mailgw.proxy.pop3 import POP3Session
from mailgw.proxy.proxyprotocol import ProxyHeaderFactory
from mailgw.proxy.smtp import SMTPSession
from mailgw.systls import SystemTLSFactory
from mailgw.workers.sockets import ListenSockets

__all__ = ["SESSION_CLASSES", "CurrentEnvironment", "Listener", "pending_limits", "proxy_listeners"]

#: the session class of each proxy section
SESSION_CLASSES: Mapping[str, type[ProxySession]] = {
    "pop3s": POP3Session,
    "imap4s": IMAP4Session,
    "smtps": SMTPSession,
}



class Listener(StreamServerEndpointService):
    """One listening port of one proxy, named for logs and the admin channel."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, *, name: str, description: str) -> None:
        super().__init__(endpoint, factory)
        self.setName(name)
        self.description = description
        #: what identifies the listener across reloads
        self.key: tuple[object, ...] = (name,)
        # Fail startService (and so the daemon's start) when the port cannot be bound.
        self._raiseSynchronously = True


class CurrentEnvironment:
    """The environment a proxy's listeners give new sessions: whatever the running
    configuration made last, so a reload needs no new listener."""

    def __init__(self, environments: Mapping[str, ProxyEnvironment], protocol: str) -> None:
        self._environments = environments
        self._protocol = protocol

    def __call__(self) -> ProxyEnvironment:
        return self._environments[self._protocol]


@implementer(IOpenSSLServerConnectionCreator)
class CurrentServerTLS:
    """The implicit-TLS listeners' connection creator: whatever TLS context the
    current environment has, so a reload that changes the certificate needs no new
    listener."""

    def __init__(self, current: Callable[[], ProxyEnvironment]) -> None:
        self._current = current

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self._current().server_tls.serverConnectionForTLS(tlsProtocol)


def _system_context(current: Callable[[], ProxyEnvironment]) -> ssl.SSLContext:
    context: ssl.SSLContext | None = current().server_tls.system_context
    assert context is not None  # a process that has the library keeps it
    return context


def implicit_tls_factory(current: Callable[[], ProxyEnvironment], factory: Factory) -> Factory:
    """TLS around C{factory}'s connections: on the system's OpenSSL (L{mailgw.systls}),
    or through pyOpenSSL when that cannot be used."""
    if current().server_tls.system_context is not None:
        return SystemTLSFactory(functools.partial(_system_context, current), factory)
    return TLSMemoryBIOFactory(CurrentServerTLS(current), False, factory)  # type: ignore[return-value]


def proxy_listeners(
    reactor: Any,
    current: Callable[[], ProxyEnvironment],
    session_class: type[ProxySession],
    interface: InterfaceConfig,
    backlog: int,
    sockets: ListenSockets,
) -> list[Listener]:
    """The listeners of one proxy on one interface, by C{tls_support} [4.1]."""
    proxy: ProxyConfig = current().proxy
    ports: list[tuple[int, bool]] = []
    if proxy.tls_support in ("enabled", "required"):
        ports.append((proxy.port, True))
    if proxy.tls_support in ("enabled", "disabled") and proxy.starttls_port:
        ports.append((proxy.starttls_port, False))
    result = []
    for port, implicit in ports:
        key = (proxy.protocol, interface.address, port, implicit, interface.proxy_protocol, backlog)
        endpoint = sockets.endpoint(reactor, key, interface.address, port, backlog)
        factory: Factory = ProxyFactory(current, session_class, interface=interface, implicit_tls=implicit)
        if implicit:
            factory = implicit_tls_factory(current, factory)
            library = ssl.OPENSSL_VERSION if isinstance(factory, SystemTLSFactory) else "pyOpenSSL"
            kind = f"implicit TLS, {library}"
        else:
            kind = "STARTTLS" if proxy.tls_support != "disabled" else "plaintext"
        if interface.proxy_protocol:
            factory = ProxyHeaderFactory(factory, reactor)  # type: ignore[assignment]
        name = f"{proxy.protocol}/{interface.name}/{port}"
        listener = Listener(endpoint, factory, name=name, description=f"{name} ({interface.address}, {kind})")
        listener.key = key
        result.append(listener)
    return result


def pending_limits(config: Config) -> dict[str, int]:
    """Each enabled proxy's C{unauthenticated_session_limit}, by the protocol name its
    sessions carry (what the workers' supervisor enforces across them) [4.4, 10]."""
    return {
        SESSION_CLASSES[proxy.protocol].protocol_name: proxy.unauthenticated_session_limit
        for proxy in config.proxies()
        if proxy.enabled
    }
