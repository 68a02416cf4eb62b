"""Eager writes on TCP connections: a write goes to the socket at once when nothing is
queued before it.

Twisted's TCP transport queues every write and sends it on a later turn of the reactor,
once epoll reports the socket writable: per write, an ``epoll_ctl`` to watch for
``EPOLLOUT``, one more event dispatched (with its log context), the ``send``, and an
``epoll_ctl`` to stop watching.  A mail session writes a few small answers per
command, so that is most of the reactor's work for it.  nginx sends at once and
watches the socket only when the kernel does not take everything; so does a
connection made eager here.

L{make_eager} changes a connection's class to a subclass of Twisted's C{tcp.Server}
or C{tcp.Client} whose C{write} tries C{send} first, when

- nothing is queued (the order of the bytes stays what it was),
- TLS was not started on the connection (C{startTLS} routes writes through its
  TLS layer, which then writes through Twisted's own path),
- the connection is not closing or half-closed,
- no pull producer is registered and a streaming one is not paused (Twisted's
  C{doWrite} is what resumes them when the queue empties).

What the kernel does not take (a full socket buffer) is queued as before, and the
producer paused as before; an error other than C{EWOULDBLOCK} queues the data too, so
that the reactor's next write reports the lost connection the way Twisted always does.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType
from typing import Any

from twisted.internet import tcp

__all__ = ["EagerClient", "EagerServer", "make_eager"]


class _EagerWrites(tcp.Connection):
    def write(self, data: bytes) -> None:
        if (
            self.TLS
            or not self.connected
            or self.disconnecting
            or self._writeDisconnecting
            or self._writeDisconnected
            or self._tempDataBuffer
            or len(self.dataBuffer) != self.offset
            or (self.producer is not None and (not self.streamingProducer or self.producerPaused))
            or type(data) is not bytes
        ):
            super().write(data)
            return
        if not data:
            return
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            super().write(data)  # doWrite meets the error again and reports it
            return
        if sent < len(data):
            super().write(data[sent:])

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))


class EagerServer(_EagerWrites, tcp.Server):
    """A C{tcp.Server} with eager writes."""


class EagerClient(_EagerWrites, tcp.Client):
    """A C{tcp.Client} with eager writes."""


_EAGER: MappingProxyType[type, type] = MappingProxyType({tcp.Server: EagerServer, tcp.Client: EagerClient})


def make_eager(transport: Any) -> bool:
    """Give C{transport} eager writes if it is exactly a C{tcp.Server} or
    C{tcp.Client} (or already eager); whether it has them now."""
    kind = type(transport)
    if kind in (EagerServer, EagerClient):
        return True
    eager = _EAGER.get(kind)
    if eager is None:
        return False
    transport.__class__ = eager
    return True
