"""Connecting and logging in to the real mail servers [4.7].

A L{Connector} opens the TCP connection (implicit TLS from the first byte where
configured) and hands it to a per-protocol login client (L{UpstreamProtocol}
subclasses in this package) that does the pre-login dialogue: greeting, STARTTLS where
configured, the login with the MAILUSER/MAILPASS.  Once logged in, the protocol turns
into a plain byte pipe for the relay.

Certificates are always verified with service-identity unless the configuration turns
C{verify_certificate} off for a server: Twisted's mail clients verify nothing by default
(SPEC [4.8]), so nothing here uses them.

With C{forward_client_address} [4.7] a login client gets the session's
L{ClientOrigin} and, before logging in, tells a server that advertises it who the real
client is (IMAP C{ID}, POP3 and SMTP C{XCLIENT}; the lines come from
L{mailgw.wire.forwarding}, which validates every value).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.endpoints import tcp_client_endpoint
from mailgw.tls import ClientTLSCache, tune_tcp
from mailgw.wire.errors import ProtocolError
from mailgw.wire.forwarding import ClientOrigin
from mailgw.wire.lines import LineBuffer, TooLong


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One mail server a session logs in to."""

    host: str
    port: int
    tls: str  # "none" | "starttls" | "implicit"
    verify_certificate: bool = True
    ca: Path | None = None

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class UpstreamError(Exception):
    """The upstream login did not succeed.

    C{temporary} distinguishes "the server is down, misbehaves, or failed TLS
    verification" (the client gets a temporary-failure answer at once) from "the server
    rejected the credentials" (the client gets the ordinary authentication failure).
    """

    temporary = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, TLS failure or protocol violation."""


class UpstreamLoginRejected(UpstreamError):
    """The mail server refused the MAILUSER/MAILPASS."""

    temporary = False


P = TypeVar("P", bound="UpstreamProtocol")


class UpstreamProtocol(Protocol, metaclass=ABCMeta):
    """Base of the per-protocol login clients.

    Subclasses implement L{line_received} for the pre-login dialogue and call
    L{succeed} or L{fail}.  After L{succeed}, L{attach} binds the byte pipe.
    """

    #: longest response line accepted from a server before login
    max_line = 8192
    log = Logger()

    def __init__(
        self,
        target: UpstreamTarget,
        tls_options: IOpenSSLClientConnectionCreator | None,
        *,
        origin: ClientOrigin | None = None,
    ) -> None:
        self.target = target
        self._tls_options = tls_options
        #: the real client, to tell the server before the login (C{None}: tell nothing)
        self.origin = origin
        self._lines = LineBuffer(self.max_line)
        self.result: defer.Deferred[bytes] = defer.Deferred(self._cancel)
        self._done = False
        self._sink: Callable[[bytes], None] | None = None
        self._lost: Callable[[Failure], None] | None = None
        self.user = ""
        self.password = ""

    # -- used by the connector and the session --------------------------------------

    def begin_login(self, user: str, password: str) -> defer.Deferred[bytes]:
        """Start the login dialogue; fires with the answer line(s) to pass on to the
        client, or fails with an L{UpstreamError}."""
        self.user = user
        self.password = password
        self._process()
        return self.result

    def attach(self, sink: Callable[[bytes], None], lost: Callable[[Failure], None]) -> bytes:
        """Become a byte pipe into C{sink}; returns bytes that arrived after the
        login answer (to be passed on first).  C{lost} is called when the server
        closes."""
        self._sink = sink
        self._lost = lost
        self.dataReceived = sink  # type: ignore[method-assign,assignment]
        rest = self._lines.take_rest()
        self.release_login_state()
        return rest

    def release_login_state(self) -> None:
        """Drop what only the login needed (the relay keeps this object for the whole
        session [10]): the client's origin and the TLS options (the line framer was
        emptied by L{attach}).  Subclasses drop their own (capabilities, answers) and
        call this."""
        self.origin = None
        self._tls_options = None

    # -- Protocol ------------------------------------------------------------------

    def connectionMade(self) -> None:
        tune_tcp(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._lines.append(data)
        if self.user:
            self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._done:
            self.fail(UpstreamUnavailable(f"connection closed during login: {_describe(reason)}"))
        elif self._lost is not None:
            self._lost(reason)

    # -- for subclasses -------------------------------------------------------------

    def _process(self) -> None:
        while not self._done:
            line = self._lines.next_line()
            if line is None:
                return
            if isinstance(line, TooLong):
                self.fail(UpstreamUnavailable("over-long response line from server"))
                return
            try:
                self.line_received(line)
            except ProtocolError as e:
                self.fail(UpstreamUnavailable(f"unexpected answer from server: {e}"))

    @abstractmethod
    def line_received(self, line: bytes) -> None:
        """One response line of the pre-login dialogue."""

    def _cancel(self, result: defer.Deferred[bytes]) -> None:
        # The session gave up (client gone, login timeout): drop the connection.
        self._done = True
        self.user = self.password = ""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def send(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + b"\r\n")

    def start_tls(self) -> None:
        """Switch this connection to TLS (after a positive STARTTLS answer)."""
        if self._tls_options is None:
            raise ProtocolError("STARTTLS requested without TLS options")
        self._lines.clear()
        self.transport.startTLS(self._tls_options)  # type: ignore[union-attr]

    def forwarding_refused(self, command: str, detail: str) -> None:
        """The server did not take the client's origin: the login goes on (the server
        then sees the gateway as the client), and the log says so."""
        self.log.warn(
            "Session {session_id}: {upstream} refused {command} ({detail}); it sees the gateway as the client",
            session_id=self.origin.session_id if self.origin is not None else None,
            upstream=self.target.describe(),
            command=command,
            detail=detail[:100],
        )

    def succeed(self, answer: bytes) -> None:
        if not self._done:
            self._done = True
            self.user = self.password = ""
            self.result.callback(answer)

    def fail(self, error: UpstreamError) -> None:
        if not self._done:
            self._done = True
            self.user = self.password = ""
            self.result.errback(error)
            if self.transport is not None:
                # A failed login is over: nothing to wait for (a polite TLS close
                # would wait for a server that may not answer) [4.1].
                self.transport.abortConnection()  # type: ignore[attr-defined]


def client_origin(
    transport: object,
    session_id: str,
    *,
    helo: str = "",
    login: str = "",
    client_id: tuple[str | None, ...] = (),
) -> ClientOrigin:
    """The L{ClientOrigin} of a session on C{transport}: its peer is the client (behind
    a load balancer with the PROXY protocol, the header's source, which
    L{mailgw.proxy.proxyprotocol} makes the peer), its host the gateway's address the
    client reached."""
    peer = transport.getPeer()  # type: ignore[attr-defined]
    host = transport.getHost()  # type: ignore[attr-defined]
    return ClientOrigin(
        address=str(getattr(peer, "host", "")),
        port=int(getattr(peer, "port", 0) or 0),
        local_address=str(getattr(host, "host", "")),
        local_port=int(getattr(host, "port", 0) or 0),
        session_id=session_id,
        helo=helo,
        login=login,
        client_id=client_id,
    )


def _describe(reason: Failure) -> str:
    """A short text for a connection failure, without secrets."""
    value = reason.value
    if isinstance(value, (ConnectionDone, ConnectionLost)):
        return "connection closed by server"
    text = str(value) or type(value).__name__
    return text.splitlines()[0][:200] if text else type(value).__name__


class Connector:
    """Opens upstream connections and runs the login clients, with time limits."""

    log = Logger()

    def __init__(
        self,
        reactor: object,
        *,
        connect_timeout: float = 10.0,
        login_timeout: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.connect_timeout = connect_timeout
        self.login_timeout = login_timeout
        self._tls = ClientTLSCache()

    def tls_options(self, target: UpstreamTarget) -> IOpenSSLClientConnectionCreator:
        """Client TLS options for C{target}, built once and reused."""
        return self._tls.get(target.host, verify=target.verify_certificate, ca=target.ca)

    async def login(
        self,
        target: UpstreamTarget,
        make_protocol: Callable[[UpstreamTarget, IOpenSSLClientConnectionCreator | None], P],
        user: str,
        password: str,
    ) -> tuple[P, bytes]:
        """Connect to C{target} and log in; returns the protocol (ready to be
        attached to a relay) and the answer to pass on to the client."""
        tls = self.tls_options(target) if target.tls != "none" else None
        endpoint = tcp_client_endpoint(self._reactor, target.host, target.port, self.connect_timeout)
        if target.tls == "implicit":
            assert tls is not None
            endpoint = wrapClientTLS(tls, endpoint)  # type: ignore[assignment]
        factory = Factory.forProtocol(lambda: make_protocol(target, tls))  # type: ignore[arg-type]
        factory.noisy = False
        try:
            connecting = endpoint.connect(factory)
            connecting.addTimeout(self.connect_timeout + 1, self.clock)
            protocol: P = await connecting  # type: ignore[assignment]
        except (ConnectError, DNSLookupError, defer.TimeoutError, OSError) as e:
            raise UpstreamUnavailable(f"cannot connect to {target.describe()}: {_describe(Failure(e))}") from None
        answer = protocol.begin_login(user, password)
        answer.addTimeout(self.login_timeout, self.clock)
        try:
            text = await answer
        except defer.TimeoutError:
            raise UpstreamUnavailable(f"login to {target.describe()} timed out") from None
        return protocol, text
