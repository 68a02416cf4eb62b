"""Where the proxies' listening sockets come from [10].

  - L{DirectSockets}: one process binds and serves its own (C{gateway.workers = 1}).
  - L{HeldSockets}: the supervisor binds every listener and keeps the socket, never
    accepting on it; each worker gets a copy of the descriptor.
  - L{AdoptedSockets}: a worker serves the descriptors its supervisor sent.

Why descriptors passed by the supervisor and not SO_REUSEPORT: the sockets are bound
once, so connections waiting in the backlog of a worker that dies are taken by the
others instead of being reset (with SO_REUSEPORT each worker has its own accept queue,
lost with it); a reload that adds a port binds it once and fails once, in the
process that answers C{mailgwctl reload}; and no second process can bind the ports
by accident.
"""

from __future__ import annotations

import json
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

__all__ = ["AdoptedSockets", "DirectSockets", "HeldSockets", "ListenSockets", "key_text"]


def key_text(key: Sequence[object]) -> str:
    """A listener's key (L{mailgw.service.Listener.key}) as the workers name it."""
    return json.dumps(list(key), separators=(",", ":"))


class ListenSockets(ABC):
    """Makes the endpoint of each listener."""

    @abstractmethod
    def endpoint(
        self, reactor: Any, key: Sequence[object], address: str, port: int, backlog: int
    ) -> IStreamServerEndpoint:
        """The endpoint of the listener C{key} on C{address}:C{port}."""


class DirectSockets(ListenSockets):
    """This process binds its own listening sockets."""

    def endpoint(
        self, reactor: Any, key: Sequence[object], address: str, port: int, backlog: int
    ) -> IStreamServerEndpoint:
        if ":" in address:
            return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=address)
        return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=address)


@implementer(IListeningPort)
class HeldPort:
    """A bound, listening socket the supervisor keeps for its workers (it never
    accepts on it)."""

    def __init__(self, held: HeldSockets, key: str, sock: socket.socket, serial: int) -> None:
        self._held = held
        self.key = key
        self.socket = sock
        #: tells this socket from an earlier one of the same key (a reload rebound it)
        self.serial = serial

    @property
    def family(self) -> int:
        return int(self.socket.family)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        if self._held.ports.get(self.key) is self:
            del self._held.ports[self.key]
        self.socket.close()

    def getHost(self) -> IPv4Address | IPv6Address:
        host, port = self.socket.getsockname()[:2]
        return (
            IPv6Address("TCP", host, port) if self.socket.family == socket.AF_INET6 else IPv4Address("TCP", host, port)
        )


@implementer(IStreamServerEndpoint)
class _HeldEndpoint:
    def __init__(self, held: HeldSockets, key: str, address: str, port: int, backlog: int) -> None:
        self._held, self._key, self._address, self._port, self._backlog = held, key, address, port, backlog

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        family = socket.AF_INET6 if ":" in self._address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self._address, self._port))
            sock.listen(self._backlog)
            # Non-blocking for the workers' reactors (the flag belongs to the socket,
            # which every copy of the descriptor shares).
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            return defer.fail(CannotListenError(self._address, self._port, e))
        self._held.serial += 1
        port = HeldPort(self._held, self._key, sock, self._held.serial)
        self._held.ports[self._key] = port
        return defer.succeed(port)


class HeldSockets(ListenSockets):
    """The supervisor's listening sockets, by listener key (L{key_text})."""

    def __init__(self) -> None:
        self.ports: dict[str, HeldPort] = {}
        self.serial = 0

    def endpoint(
        self, reactor: Any, key: Sequence[object], address: str, port: int, backlog: int
    ) -> IStreamServerEndpoint:
        return _HeldEndpoint(self, key_text(key), address, port, backlog)


@implementer(IStreamServerEndpoint)
class _AdoptedEndpoint:
    def __init__(self, sockets: AdoptedSockets, reactor: Any, key: str, address: str, port: int) -> None:
        self._sockets, self._reactor, self._key, self._address, self._port = sockets, reactor, key, address, port

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        given = self._sockets.descriptors.pop(self._key, None)
        if given is None:
            return defer.fail(
                CannotListenError(self._address, self._port, "the supervisor sent no socket for this listener")
            )
        fd, family = given
        try:
            port = self._reactor.adoptStreamPort(fd, family, protocolFactory)
        finally:
            # adoptStreamPort keeps a copy of its own.
            os.close(fd)
        return defer.succeed(port)


class AdoptedSockets(ListenSockets):
    """The descriptors a worker was sent (L{mailgw.workers.commands.AdoptListener}),
    by listener key; each is used once, by the listener of that key."""

    def __init__(self) -> None:
        self.descriptors: dict[str, tuple[int, int]] = {}

    def give(self, key: str, fd: int, family: int) -> None:
        old = self.descriptors.pop(key, None)
        if old is not None:
            os.close(old[0])
        self.descriptors[key] = (fd, family)

    def close_unused(self) -> None:
        """Close the descriptors no listener took (after a configuration was applied)."""
        for fd, _ in self.descriptors.values():
            os.close(fd)
        self.descriptors.clear()

    def endpoint(
        self, reactor: Any, key: Sequence[object], address: str, port: int, backlog: int
    ) -> IStreamServerEndpoint:
        return _AdoptedEndpoint(self, reactor, key_text(key), address, port)
