"""Raw-socket clients for the integration tests: what a hostile or a stalled client
does, byte by byte, where a library client (poplib, imaplib, smtplib) would hide it.

L{RawClient} is blocking: run its methods in a thread
(C{twisted.internet.threads.deferToThread}), never in the reactor thread the gateway
runs in.  L{StallingPipe} is the one reactor-side helper: a TCP pipe put between the
gateway and a real mail server, whose reading from the gateway can be stopped (a mail
server that stops reading).

A connection counts as closed only when the peer closed it: end of file (the TLS close
alert included) or a reset.  A read that times out means "still open" -- a test of a
limit that counted a timeout as closed would pass with the limit removed.
"""

from __future__ import annotations

import socket
import ssl
import time

from twisted.internet import defer, task
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTCP, ITransport
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure

__all__ = ["SMALL_BUFFER", "RawClient", "StallingPipe", "connect"]

#: a socket buffer size small enough that the kernel cannot hide a missing pause: the
#: kernel doubles it, and a buffer set before connecting is not autotuned any more
SMALL_BUFFER = 64 * 1024

#: the errors that mean the peer reset the connection
_RESET = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def connect(
    port: int, host: str = "127.0.0.1", *, timeout: float = 30.0, receive_buffer: int | None = None
) -> socket.socket:
    """A TCP connection to C{host}:C{port}.

    @param receive_buffer: when given, C{SO_RCVBUF} is set before connecting, so the
        kernel's receive window stays that small (no autotuning): a client that stops
        reading then holds at most about twice that much in its kernel.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class RawClient:
    """A blocking client connection with its own read buffer (so that a TLS wrap
    after a STARTTLS answer never loses bytes to a file object's buffer)."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buffer = b""
        #: what arrived before the peer closed, as read by L{is_closed}
        self.last_words = b""

    @classmethod
    def open(
        cls,
        port: int,
        context: ssl.SSLContext | None = None,
        *,
        server_hostname: str = "localhost",
        timeout: float = 30.0,
        receive_buffer: int | None = None,
    ) -> RawClient:
        """Connect to C{port} on loopback; with C{context}, implicit TLS."""
        client = cls(connect(port, timeout=timeout, receive_buffer=receive_buffer), timeout)
        if context is not None:
            client.start_tls(context, server_hostname)
        return client

    @property
    def client_address(self) -> str:
        """This end's address as the gateway's registry names it (C{SessionInfo.client})."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def _fill(self, timeout: float) -> bool:
        """Read once into the buffer; False at end of file."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        self._buffer += data
        return bool(data)

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including C{marker}.

        @raise EOFError: the connection closed first.
        @raise TimeoutError: nothing came for C{timeout} seconds.
        """
        while marker not in self._buffer:
            if not self._fill(self.timeout):
                raise EOFError(f"connection closed before {marker!r}; got {self._buffer[-200:]!r}")
        end = self._buffer.index(marker) + len(marker)
        data, self._buffer = self._buffer[:end], self._buffer[end:]
        return data

    def read_line(self) -> bytes:
        """One line, CRLF included."""
        return self.read_until(b"\n")

    def read_exactly(self, count: int) -> bytes:
        """C{count} bytes (L{read_until}'s errors)."""
        while len(self._buffer) < count:
            if not self._fill(self.timeout):
                raise EOFError(f"connection closed after {len(self._buffer)} of {count} bytes")
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def command(self, line: bytes) -> bytes:
        """Send one command line; its first answer line."""
        self.send(line + b"\r\n")
        return self.read_line()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        """TLS handshake on this connection (after a positive STARTTLS answer, or at
        once for implicit TLS).  Bytes already read and not taken are an error: they
        would be plaintext the server sent after its STARTTLS answer."""
        if self._buffer:
            raise AssertionError(f"plaintext after the STARTTLS answer: {self._buffer!r}")
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def is_closed(self, wait: float) -> bool:
        """Whether the peer closes the connection within C{wait} seconds: True on end of
        file (a TLS close alert included) or a reset; False when the wait runs out --
        a connection that merely says nothing is open.  What arrives before the close
        is kept in L{last_words}."""
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                if not self._fill(remaining):
                    break
            except TimeoutError:
                return False
            except ssl.SSLEOFError:
                break  # TCP closed without a close alert: still end of file
            except _RESET:
                break
        self.last_words, self._buffer = self._buffer, b""
        return True

    def is_open(self, wait: float = 1.0) -> bool:
        """The connection is neither closed by the peer nor closing within C{wait}."""
        return not self.is_closed(wait)

    def close(self) -> None:
        self.sock.close()


class _PipeServer(Protocol):
    """The gateway's side of a L{StallingPipe} connection."""

    def __init__(self, pipe: StallingPipe) -> None:
        self.pipe = pipe
        self.peer: _PipeClient | None = None
        self.early = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pipe.connections.append(self)
        self.pipe.open_sides += 1
        if self.pipe.stalled:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.pipe.reactor.connectTCP("127.0.0.1", self.pipe.target_port, _PipeClientFactory(self))

    def dataReceived(self, data: bytes) -> None:
        self.pipe.bytes_from_gateway += len(data)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.pipe.connections.remove(self)
        self.pipe.open_sides -= 1
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _PipeClient(Protocol):
    """The mail server's side of a L{StallingPipe} connection."""

    def __init__(self, server: _PipeServer) -> None:
        self.server = server

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.server.peer = self
        self.server.pipe.open_sides += 1
        if self.server.early:
            self.transport.write(self.server.early)
            self.server.early = b""

    def dataReceived(self, data: bytes) -> None:
        transport = self.server.transport
        if transport is not None:
            transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.pipe.open_sides -= 1
        if self.server.transport is not None:
            self.server.transport.loseConnection()


class _PipeClientFactory(ClientFactory):
    noisy = False

    def __init__(self, server: _PipeServer) -> None:
        self.server = server

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _PipeClient(self.server)


class _PipeServerFactory(ServerFactory):
    noisy = False

    def __init__(self, pipe: StallingPipe) -> None:
        self.pipe = pipe

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _PipeServer(self.pipe)


class StallingPipe:
    """A TCP pipe on loopback from the gateway to a real mail server.  L{stall} makes
    it stop reading what the gateway sends, as a mail server that stops reading would;
    L{resume} lets everything through.  Its sockets have small kernel buffers
    (L{SMALL_BUFFER}), so a stall is felt by the gateway at once.

    The pipe itself buffers without limit: it is the test's stand-in for the server,
    not part of what is tested."""

    def __init__(self, reactor: IReactorTCP, target_port: int) -> None:
        self.reactor = reactor
        self.target_port = target_port
        self.connections: list[_PipeServer] = []
        #: bytes the pipe has read from the gateway so far
        self.bytes_from_gateway = 0
        #: connections (either side) not closed yet
        self.open_sides = 0
        self.stalled = False
        self._port: IListeningPort = reactor.listenTCP(0, _PipeServerFactory(self), interface="127.0.0.1")
        # Accepted sockets inherit the listening socket's buffer size.
        listening = self._port.socket  # type: ignore[attr-defined]
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)

    @property
    def port(self) -> int:
        return int(self._port.getHost().port)  # type: ignore[attr-defined]

    def _gateway_sides(self) -> list[ITransport]:
        return [c.transport for c in self.connections if c.transport is not None]

    def stall(self) -> None:
        """Stop reading from the gateway (every connection through the pipe)."""
        self.stalled = True
        for transport in self._gateway_sides():
            transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        """Read from the gateway again."""
        self.stalled = False
        for transport in self._gateway_sides():
            transport.resumeProducing()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop listening, close the connections through the pipe and wait until both
        sides of each are gone (so trial finds a clean reactor)."""
        self.resume()
        for transport in self._gateway_sides():
            transport.loseConnection()
        await defer.maybeDeferred(self._port.stopListening)
        for _ in range(250):
            if not self.open_sides:
                return
            await task.deferLater(self.reactor, 0.02, lambda: None)  # type: ignore[arg-type]
