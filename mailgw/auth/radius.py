"""RADIUS: the ``radius`` server group [5.1], Authorize-Only [5.2] and accounting [5.4, 7].

pyrad encodes and decodes the packets; the transport is ours, a Twisted
C{DatagramProtocol} (pyrad's own clients block or bring their own event loop):

- L{RadiusClient} owns one UDP port per address family (opened on first use, on an
  ephemeral port), hands out the packet identifiers of each server address (0-255,
  never one still awaiting an answer; requests beyond 256 in flight wait in a bounded
  queue), resends a request unchanged on each timeout, and accepts only replies whose
  Response Authenticator and, when present, Message-Authenticator verify with the
  shared secret.  Anything else (forged, wrong secret, late, malformed) is dropped with
  a log line while the request keeps waiting, so a wrong secret ends as a timeout.
- L{RadiusChecker} is the cred checker of a group: PAP Access-Request with a
  Message-Authenticator (RFC 3579; BlastRADIUS), servers tried in order on timeout,
  never after an explicit reject.  L{RadiusChecker.authorize} sends an Authorize-Only
  request (no password) for an C{authorization_server_group}.
- L{RadiusAccounting} sends Accounting-Request Start / Interim-Update / Stop, retried
  until answered (or, for SSO collectors that never answer, a bounded number of times).

Nothing here logs a password or a shared secret: log events carry the user name, the
server address, the group and a reason, never a packet.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import ipaddress
import secrets
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Self

from pyrad import packet as rp
from pyrad.dictionary import Dictionary
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IDelayedCall, IHostResolution, IListeningPort, IResolutionReceiver
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mailgw.auth.portal import AAAUnavailable, AuthenticatedUser
from mailgw.config import RadiusCollector, RadiusGroup, RadiusServer

__all__ = [
    "AccountingOutcome",
    "AccountingSession",
    "IRadiusTransport",
    "RadiusAccounting",
    "RadiusBusy",
    "RadiusChecker",
    "RadiusClient",
    "RadiusClientClosed",
    "RadiusError",
    "RadiusPacketError",
    "RadiusTimeout",
    "RadiusUnreachable",
    "TerminateCause",
    "load_dictionary",
    "verify_reply",
]

#: A server address: (host name or IP address, UDP port).
ServerAddress = tuple[str, int]

#: The most identifiers one server address can have in flight (RFC 2865: one octet).
IDENTIFIERS = 256

#: What a reply to each request code may be; any other code is dropped.
_REPLY_CODES: dict[int, frozenset[int]] = {
    rp.AccessRequest: frozenset({rp.AccessAccept, rp.AccessReject, rp.AccessChallenge}),
    rp.AccountingRequest: frozenset({rp.AccountingResponse}),
    rp.StatusServer: frozenset({rp.AccessAccept, rp.AccountingResponse}),
}

_CODE_NAMES = {
    rp.AccessRequest: "Access-Request",
    rp.AccessAccept: "Access-Accept",
    rp.AccessReject: "Access-Reject",
    rp.AccountingRequest: "Accounting-Request",
    rp.AccountingResponse: "Accounting-Response",
    rp.AccessChallenge: "Access-Challenge",
    rp.StatusServer: "Status-Server",
}

#: Largest integer an RFC 2865 ``integer`` attribute carries.
_UINT32 = 0xFFFFFFFF

#: What pyrad raises for a value it cannot encode.
_ENCODING_ERRORS = (ValueError, TypeError, KeyError, struct.error, rp.PacketError)


def load_dictionary() -> Dictionary:
    """The gateway's RADIUS dictionary (``mailgw/auth/radius.dictionary``, package data)."""
    text = resources.files("mailgw.auth").joinpath("radius.dictionary").read_text(encoding="utf-8")
    return Dictionary(io.StringIO(text))


def code_name(code: int) -> str:
    """``Access-Accept`` for 2, ``code 99`` for codes the gateway does not use."""
    return _CODE_NAMES.get(code, f"code {code}")


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verify_reply(
    raw: bytes,
    request_code: int,
    request_authenticator: bytes,
    secret: bytes,
    *,
    require_message_authenticator: bool = False,
) -> bool:
    """Whether C{raw} is a genuine reply to a request with C{request_authenticator}.

    Checks the Response Authenticator (RFC 2865 section 3, RFC 2866 section 3), the
    attribute framing, and the Message-Authenticator when present (RFC 3579 section
    3.2: HMAC-MD5 over the reply with the Request Authenticator, or 16 zero octets in
    an Accounting-Response to an Accounting-Request, as FreeRADIUS signs it) or when
    C{require_message_authenticator} and the request was an Access-Request or
    Status-Server.  A reply to an Access-Request or Status-Server carrying a
    Proxy-State is refused: the gateway sends none (the BlastRADIUS signature).
    Done here rather than by pyrad, whose checks differ between versions.
    """
    if len(raw) < 20:
        return False
    length = struct.unpack("!H", raw[2:4])[0]
    if length < 20 or length > len(raw) or length > 4096:
        return False
    raw = raw[:length]  # octets beyond Length are padding (RFC 2865 section 3)
    expected = hashlib.md5(raw[:4] + request_authenticator + raw[20:] + secret).digest()  # noqa: S324 - RFC 2865
    if not hmac.compare_digest(expected, raw[4:20]):
        return False
    access = request_code in (rp.AccessRequest, rp.StatusServer)
    signature_at: int | None = None
    offset = 20
    while offset < length:
        if offset + 2 > length:
            return False
        kind, size = raw[offset], raw[offset + 1]
        if size < 2 or offset + size > length:
            return False
        if kind == 80:
            if size != 18 or signature_at is not None:
                return False
            signature_at = offset
        elif kind == 33 and access:
            return False
        offset += size
    if signature_at is None:
        return not (require_message_authenticator and access)
    vector = request_authenticator if access else bytes(16)
    signed = raw[:4] + vector + raw[20 : signature_at + 2] + bytes(16) + raw[signature_at + 18 :]
    digest = hmac.new(secret, signed, "md5").digest()
    return hmac.compare_digest(digest, raw[signature_at + 2 : signature_at + 18])


# -- errors ------------------------------------------------------------------------------


class RadiusError(Exception):
    """A RADIUS request got no usable answer."""


class RadiusTimeout(RadiusError):
    """No verified answer after all tries."""


class RadiusBusy(RadiusError):
    """All 256 identifiers of the server are in flight and its wait queue is full."""


class RadiusUnreachable(RadiusError):
    """The request could not be sent at all: the host name does not resolve, or no UDP
    port of its address family can be opened."""


class RadiusClientClosed(RadiusError):
    """The client was closed before an answer came."""


class RadiusPacketError(RadiusError):
    """The request cannot be encoded (e.g. a value longer than 253 octets)."""


# -- the transport -----------------------------------------------------------------------


class IRadiusTransport(Interface):
    """Sends RADIUS requests and returns their verified replies."""

    dictionary = Attribute("The pyrad Dictionary requests are built with.")
    clock = Attribute("The IReactorTime of timeouts, retries and accounting timestamps.")

    def send(
        server: ServerAddress,  # noqa: N805 - zope.interface declarations have no self
        packet: Any,
        timeout: float,
        retries: int,
        require_message_authenticator: bool = False,
    ) -> Deferred[Any]:
        """Send C{packet} (a pyrad request, its C{secret} set) to C{server}.

        The transport sets the packet's identifier and encodes it; the same datagram is
        sent again after each C{timeout} seconds without a verified reply, C{retries}
        times.  Fires with the reply packet (Response Authenticator and any
        Message-Authenticator verified; required in a reply to an Access-Request when
        C{require_message_authenticator}), or fails with a L{RadiusError}: mostly
        L{RadiusTimeout}.  Cancelling the Deferred frees the identifier.
        """


@dataclass(eq=False)
class _Request:
    key: tuple[str, int]  # (IP address, port): where replies must come from
    version: int  # 4 or 6: which port sends it
    packet: Any
    timeout: float
    retries: int
    require_message_authenticator: bool
    deferred: Deferred[Any] = field(init=False)
    ident: int | None = None
    raw: bytes = b""
    tries: int = 0
    timer: IDelayedCall | None = None

    @property
    def server(self) -> str:
        return _format_address(*self.key)


class _ServerIdentifiers:
    """The identifiers of one server address: who is in flight, who waits for one."""

    def __init__(self, first: int) -> None:
        self.next = first % IDENTIFIERS
        self.in_flight: dict[int, _Request] = {}
        self.waiting: deque[_Request] = deque()

    def allocate(self) -> int | None:
        """The next free identifier after the last one handed out, or None if all 256 are
        in flight.  Cycling through all of them before reusing one makes it unlikely that
        a late answer to a request given up on meets a new request with its identifier
        (and such an answer fails verification anyway: another Request Authenticator)."""
        if len(self.in_flight) >= IDENTIFIERS:
            return None
        ident = self.next
        while ident in self.in_flight:
            ident = (ident + 1) % IDENTIFIERS
        self.next = (ident + 1) % IDENTIFIERS
        return ident


class _RadiusDatagramProtocol(DatagramProtocol):
    """The protocol of one of the client's UDP ports: hands datagrams to the client."""

    noisy = False

    def __init__(self, client: RadiusClient) -> None:
        self._client = client

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._client.datagram_received(datagram, addr)


@implementer(IResolutionReceiver)
class _AddressCollector:
    """Collects the addresses of a host name resolution."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


@implementer(IRadiusTransport)
class RadiusClient:
    """A RADIUS client on the reactor: one UDP port per address family, shared by all
    servers and requests.

    C{reactor} provides C{listenUDP}, C{callLater} and C{seconds} (and C{nameResolver}
    for servers given by host name); C{dictionary} defaults to L{load_dictionary}().
    C{max_waiting}: requests that may wait for an identifier of one server when all 256
    are in flight; more fail with L{RadiusBusy}.  C{interface4}/C{interface6}: the
    local addresses the ports bind to ("" and "::": any).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        dictionary: Dictionary | None = None,
        *,
        max_waiting: int = 1024,
        interface4: str = "",
        interface6: str = "::",
    ) -> None:
        self.clock = reactor
        self.dictionary = dictionary if dictionary is not None else load_dictionary()
        self._reactor = reactor
        self._max_waiting = max_waiting
        self._interfaces = {4: interface4, 6: interface6}
        self._ports: dict[int, IListeningPort] = {}
        self._protocols: dict[int, _RadiusDatagramProtocol] = {}
        self._servers: dict[tuple[str, int], _ServerIdentifiers] = {}
        self._closed = False

    # -- sending -------------------------------------------------------------------------

    def send(
        self,
        server: ServerAddress,
        packet: Any,
        timeout: float,
        retries: int,
        require_message_authenticator: bool = False,
    ) -> Deferred[Any]:
        if self._closed:
            return fail(RadiusClientClosed("the RADIUS client is closed"))
        host, port = server
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return Deferred.fromCoroutine(
                self._send_to_name(host, port, packet, timeout, retries, require_message_authenticator)
            )
        return self._submit(
            (address.compressed, port), address.version, packet, timeout, retries, require_message_authenticator
        )

    async def _send_to_name(
        self, host: str, port: int, packet: Any, timeout: float, retries: int, require_ma: bool
    ) -> Any:
        resolver = getattr(self._reactor, "nameResolver", None)
        if resolver is None:
            raise RadiusUnreachable(f"cannot resolve {host!r}: the reactor has no name resolver")
        collector = _AddressCollector()
        resolver.resolveHostName(collector, host, 0, None, "UDP")
        addresses = await collector.done
        if not addresses:
            raise RadiusUnreachable(f"{host!r} does not resolve")
        address = ipaddress.ip_address(addresses[0].split("%", 1)[0])
        return await self._submit((address.compressed, port), address.version, packet, timeout, retries, require_ma)

    def _submit(
        self,
        key: tuple[str, int],
        version: int,
        packet: Any,
        timeout: float,
        retries: int,
        require_ma: bool,
    ) -> Deferred[Any]:
        if self._closed:
            return fail(RadiusClientClosed("the RADIUS client is closed"))
        try:
            self._open(version)
        except CannotListenError as e:
            return fail(RadiusUnreachable(f"cannot open a UDP port for IPv{version}: {e}"))
        state = self._servers.get(key)
        if state is None:
            # A random first identifier: a restarted gateway does not replay the last one's.
            state = self._servers[key] = _ServerIdentifiers(secrets.randbelow(IDENTIFIERS))
        if len(state.in_flight) >= IDENTIFIERS and len(state.waiting) >= self._max_waiting:
            return fail(
                RadiusBusy(
                    f"{_format_address(*key)}: {IDENTIFIERS} requests in flight and {len(state.waiting)} waiting"
                )
            )
        request = _Request(key, version, packet, timeout, max(0, retries), require_ma)
        request.deferred = Deferred(lambda _: self._cancel(request))
        state.waiting.append(request)
        self._dispatch(state)
        return request.deferred

    def _open(self, version: int) -> _RadiusDatagramProtocol:
        protocol = self._protocols.get(version)
        if protocol is None:
            protocol = _RadiusDatagramProtocol(self)
            port = self._reactor.listenUDP(0, protocol, interface=self._interfaces[version], maxPacketSize=4096)
            self._protocols[version] = protocol
            self._ports[version] = port
        return protocol

    def _dispatch(self, state: _ServerIdentifiers) -> None:
        """Give identifiers to waiting requests and send them."""
        while state.waiting:
            ident = state.allocate()
            if ident is None:
                return
            request = state.waiting.popleft()
            request.ident = ident
            request.packet.id = ident
            try:
                request.raw = request.packet.RequestPacket()
            except _ENCODING_ERRORS as e:
                request.deferred.errback(RadiusPacketError(f"cannot encode the request: {e}"))
                continue
            state.in_flight[ident] = request
            self._transmit(request)

    def _transmit(self, request: _Request) -> None:
        request.tries += 1
        transport = self._protocols[request.version].transport
        try:
            transport.write(request.raw, request.key)  # type: ignore[union-attr]
        except OSError as e:
            # Counts as a lost datagram: the next try may get through (a route comes back).
            self.log.warn("Could not send a RADIUS request to {server}: {reason}", server=request.server, reason=str(e))
        request.timer = self._reactor.callLater(request.timeout, self._expire, request)

    def _expire(self, request: _Request) -> None:
        request.timer = None
        if request.tries <= request.retries:
            self.log.debug(
                "No answer from RADIUS server {server} (identifier {ident}, try {tries}); resending",
                server=request.server,
                ident=request.ident,
                tries=request.tries,
            )
            self._transmit(request)
            return
        self._release(request)
        request.deferred.errback(
            RadiusTimeout(
                f"no answer from {request.server} after {request.tries} "
                f"{'try' if request.tries == 1 else 'tries'} of {request.timeout:g} s"
            )
        )
        self._dispatch_key(request.key)

    def _release(self, request: _Request) -> None:
        """Free the request's identifier and stop its timer."""
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        state = self._servers.get(request.key)
        if state is not None and request.ident is not None and state.in_flight.get(request.ident) is request:
            del state.in_flight[request.ident]

    def _dispatch_key(self, key: tuple[str, int]) -> None:
        state = self._servers.get(key)
        if state is not None and not self._closed:
            self._dispatch(state)

    def _cancel(self, request: _Request) -> None:
        state = self._servers.get(request.key)
        if state is not None and request in state.waiting:
            state.waiting.remove(request)
            return
        self._release(request)
        self._dispatch_key(request.key)

    # -- receiving -----------------------------------------------------------------------

    def datagram_received(self, datagram: bytes, addr: Any) -> None:
        """A datagram arrived on one of the ports: the reply of a request, or dropped."""
        try:
            source = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
            key = (source.compressed, int(addr[1]))
        except (ValueError, IndexError, TypeError):
            return
        server = _format_address(*key)
        if len(datagram) < 20:
            self.log.warn(
                "Ignoring a {size}-octet datagram from {server}: too short", size=len(datagram), server=server
            )
            return
        code, ident = datagram[0], datagram[1]
        state = self._servers.get(key)
        request = state.in_flight.get(ident) if state is not None else None
        if request is None:
            self.log.info(
                "Ignoring a RADIUS {code} from {server} with identifier {ident}: no request awaits it "
                "(a late or duplicate answer, or not from a server we asked)",
                code=code_name(code),
                server=server,
                ident=ident,
            )
            return
        if code not in _REPLY_CODES.get(request.packet.code, frozenset()):
            self.log.warn(
                "Ignoring a RADIUS {code} from {server} (identifier {ident}): not an answer to {request_code}",
                code=code_name(code),
                server=server,
                ident=ident,
                request_code=code_name(request.packet.code),
            )
            return
        verified = verify_reply(
            datagram,
            request.packet.code,
            request.packet.authenticator,
            request.packet.secret,
            require_message_authenticator=request.require_message_authenticator,
        )
        if not verified:
            self.log.warn(
                "Ignoring a RADIUS {code} from {server} (identifier {ident}) that fails verification: "
                "wrong shared secret, a missing or bad Message-Authenticator, or a forged packet",
                code=code_name(code),
                server=server,
                ident=ident,
            )
            return
        try:
            reply = request.packet.CreateReply(packet=datagram)
        except rp.PacketError as e:
            self.log.warn(
                "Ignoring a malformed RADIUS reply from {server} (identifier {ident}): {reason}",
                server=server,
                ident=ident,
                reason=str(e),
            )
            return
        self._release(request)
        request.deferred.callback(reply)
        self._dispatch_key(key)

    # -- closing -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests sent and awaiting an answer (all servers)."""
        return sum(len(state.in_flight) for state in self._servers.values())

    def close(self) -> Deferred[None]:
        """Fail every pending request with L{RadiusClientClosed} and close the ports."""
        self._closed = True
        for state in self._servers.values():
            requests = [*state.in_flight.values(), *state.waiting]
            state.waiting.clear()
            for request in requests:
                self._release(request)
                if not request.deferred.called:
                    request.deferred.errback(RadiusClientClosed("the RADIUS client was closed"))
        ports = list(self._ports.values())
        self._ports.clear()
        self._protocols.clear()
        done = gatherResults([maybeDeferred(port.stopListening) for port in ports], consumeErrors=True)
        return done.addCallback(lambda _: None)


# -- authentication and authorization ----------------------------------------------------

#: What makes a server "not answering": try the next one.
_NO_ANSWER = (RadiusTimeout, RadiusBusy, RadiusUnreachable, RadiusClientClosed)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _reply_text(reply: Any, attribute: str, limit: int = 200) -> str:
    """The values of a text attribute of a reply, for a log line (bounded)."""
    if attribute not in reply:
        return ""
    text = " ".join(_text(value) for value in reply[attribute])
    text = "".join(character if character.isprintable() else "?" for character in text)
    return text[:limit]


def _add_ip_attributes(packet: Any, ip: str | None, v4: str, v6: str) -> None:
    """Set C{v4} or C{v6} (the IPv6 variant of the attribute) from an address."""
    if not ip:
        return
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4:
        packet[v4] = str(address)
    else:
        packet[v6] = str(address)


@implementer(ICredentialsChecker)
class RadiusChecker:
    """The cred checker of a ``protocol = "radius"`` server group [5.1].

    A PAP Access-Request (User-Name, User-Password hidden with the shared secret,
    NAS-Identifier, NAS-IP-Address when given, Service-Type Login-User, NAS-Port-Type
    Virtual, Calling-Station-Id when the credentials carry a C{client_ip}, and a
    Message-Authenticator) goes to the group's servers in order; each gets C{timeout}
    seconds per try and C{retries} retransmissions before the next one is tried.

    Access-Accept: an L{AuthenticatedUser} whose C{radius_class} is the Class attribute
    as text.  Access-Reject: L{UnauthorizedLogin}, and no other server is asked.
    Access-Challenge (one-time codes, next-token): L{UnauthorizedLogin} with the reason
    logged, since no mail protocol can carry the second step.  No server answering (or
    none with a reply that verifies: a wrong secret looks the same): L{AAAUnavailable}.

    C{require_message_authenticator}: accept only replies with a Message-Authenticator
    (the BlastRADIUS recommendation; servers patched in 2024 send one).  A reply that
    has one is always verified.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        group: RadiusGroup,
        client: IRadiusTransport,
        nas_identifier: str,
        *,
        nas_ip_address: str | None = None,
        require_message_authenticator: bool = False,
    ) -> None:
        if not group.servers:
            raise ValueError(f"RADIUS group {group.name!r} has no server")
        self.group = group
        self._client = client
        self._nas_identifier = nas_identifier
        self._nas_ip_address = nas_ip_address
        self._require_ma = require_message_authenticator

    def requestAvatarId(self, credentials: Any) -> Deferred[AuthenticatedUser]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._authenticate(credentials))

    def authorize(self, username: str) -> Deferred[AuthenticatedUser]:
        """Ask the group whether C{username} exists and with which attributes [5.2].

        An Access-Request with Service-Type Authorize-Only (RFC 5176) and no password.
        The server must be configured to accept it: out of the box FreeRADIUS rejects
        a request without credentials (Access-Reject: L{UnauthorizedLogin}); with e.g.
        ``if (&request:Service-Type == Authorize-Only && &control:Cleartext-Password) { update
        control { &Auth-Type := Accept } }`` after ``files`` in ``authorize``, known users
        are accepted with their reply attributes (Class).
        """
        return Deferred.fromCoroutine(self._authorize(username))

    async def _authenticate(self, credentials: Any) -> AuthenticatedUser:
        name = _text(credentials.username)
        raw_password = credentials.password
        password = raw_password if isinstance(raw_password, bytes) else str(raw_password).encode("utf-8")
        self._check_name(name)
        if not password:
            raise UnauthorizedLogin(f"empty password (RADIUS group {self.group.name!r})")
        if len(password) > 128:
            raise UnauthorizedLogin(f"password longer than RADIUS allows (RADIUS group {self.group.name!r})")
        client_ip = getattr(credentials, "client_ip", None)

        def build(server: RadiusServer) -> Any:
            request = self._request(server, name, "Login-User", client_ip if isinstance(client_ip, str) else None)
            request["User-Password"] = request.PwCrypt(password)
            return request

        server, reply = await self._exchange(build, name, "authentication")
        return self._answer(server, reply, name, "authentication")

    async def _authorize(self, username: str) -> AuthenticatedUser:
        self._check_name(username)
        server, reply = await self._exchange(
            lambda server: self._request(server, username, "Authorize-Only", None), username, "authorization"
        )
        return self._answer(server, reply, username, "authorization")

    def _check_name(self, name: str) -> None:
        if not name or len(name.encode("utf-8")) > 253:
            raise UnauthorizedLogin(f"user name empty or longer than RADIUS allows (RADIUS group {self.group.name!r})")

    def _request(self, server: RadiusServer, name: str, service_type: str, client_ip: str | None) -> Any:
        request = rp.AuthPacket(
            code=rp.AccessRequest, id=0, secret=server.secret.reveal().encode("utf-8"), dict=self._client.dictionary
        )
        request["User-Name"] = name
        request["NAS-Identifier"] = self._nas_identifier
        _add_ip_attributes(request, self._nas_ip_address, "NAS-IP-Address", "NAS-IPv6-Address")
        request["Service-Type"] = service_type
        request["NAS-Port-Type"] = "Virtual"
        if client_ip:
            request["Calling-Station-Id"] = client_ip
        # RFC 3579 / BlastRADIUS: signed with the secret; FreeRADIUS's
        # require_message_authenticator drops requests without it.  Its value is
        # computed when the transport encodes the packet with its identifier.
        request.add_message_authenticator()
        return request

    async def _exchange(
        self, build: Callable[[RadiusServer], Any], user: str, purpose: str
    ) -> tuple[RadiusServer, Any]:
        reasons: list[str] = []
        for server in self.group.servers:
            address = (server.host, server.auth_port)
            try:
                reply = await self._client.send(
                    address,
                    build(server),
                    self.group.timeout,
                    self.group.retries,
                    require_message_authenticator=self._require_ma,
                )
            except _NO_ANSWER as e:
                self.log.warn(
                    "RADIUS server {server} of group {group} gave no answer to the {purpose} request for "
                    "{user}: {reason}",
                    server=_format_address(*address),
                    group=self.group.name,
                    purpose=purpose,
                    user=user,
                    reason=str(e),
                )
                reasons.append(str(e))
                continue
            return server, reply
        raise AAAUnavailable(f"no server of RADIUS group {self.group.name!r} answered: {'; '.join(reasons)}")

    def _answer(self, server: RadiusServer, reply: Any, user: str, purpose: str) -> AuthenticatedUser:
        where = f"{_format_address(server.host, server.auth_port)} (RADIUS group {self.group.name!r})"
        if reply.code == rp.AccessAccept:
            radius_class = None
            if "Class" in reply:
                radius_class = _text(reply["Class"][0])
            return AuthenticatedUser(name=user, server_group=self.group.name, radius_class=radius_class)
        message = _reply_text(reply, "Reply-Message")
        if reply.code == rp.AccessChallenge:
            reason = (
                f"Access-Challenge from {where}: challenge-response (one-time code, next token) "
                f"cannot be completed over a mail protocol"
            )
            self.log.warn(
                "RADIUS {purpose} of {user} refused: {reason}; Reply-Message: {reply_message}",
                purpose=purpose,
                user=user,
                reason=reason,
                reply_message=message,
            )
            raise UnauthorizedLogin(reason)
        self.log.info(
            "RADIUS {purpose} of {user} rejected by {server}; Reply-Message: {reply_message}",
            purpose=purpose,
            user=user,
            server=where,
            reply_message=message,
        )
        raise UnauthorizedLogin(f"Access-Reject from {where}")


# -- accounting --------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountingSession:
    """What accounting needs to know of a session.

    C{session_id}: the Acct-Session-Id, the same in Start and Stop, unique for this
    NAS-Identifier.  C{started}: the session's start, in the clock's seconds (UNIX
    time).  C{bytes_in}: octets received from the client (Acct-Input-Octets);
    C{bytes_out}: octets sent to it (Acct-Output-Octets); the high 32 bits go to the
    Gigawords attributes.  C{calling_station_id}: defaults to C{client_ip} (SSO can put
    a MAC address there); C{radius_class}: the Class of the Access-Accept, echoed.
    """

    session_id: str
    user: str
    client_ip: str
    started: float
    bytes_in: int = 0
    bytes_out: int = 0
    calling_station_id: str | None = None
    radius_class: str | bytes | None = None


class TerminateCause(enum.StrEnum):
    """Acct-Terminate-Cause values (RFC 2866 section 5.10)."""

    USER_REQUEST = "User-Request"
    LOST_CARRIER = "Lost-Carrier"
    LOST_SERVICE = "Lost-Service"
    IDLE_TIMEOUT = "Idle-Timeout"
    SESSION_TIMEOUT = "Session-Timeout"
    ADMIN_RESET = "Admin-Reset"
    ADMIN_REBOOT = "Admin-Reboot"
    PORT_ERROR = "Port-Error"
    NAS_ERROR = "NAS-Error"
    NAS_REQUEST = "NAS-Request"
    NAS_REBOOT = "NAS-Reboot"
    PORT_UNNEEDED = "Port-Unneeded"
    PORT_PREEMPTED = "Port-Preempted"
    PORT_SUSPENDED = "Port-Suspended"
    SERVICE_UNAVAILABLE = "Service-Unavailable"
    CALLBACK = "Callback"
    USER_ERROR = "User-Error"
    HOST_REQUEST = "Host-Request"


class AccountingOutcome(enum.Enum):
    """How an accounting record ended."""

    #: a server acknowledged it (Accounting-Response)
    ANSWERED = "answered"
    #: sent C{max_attempts} times without an answer, then given up (logged)
    UNANSWERED = "unanswered"
    #: never sent: dropped from a full queue (never a Stop), or not encodable (logged)
    DROPPED = "dropped"
    #: still pending when the accounting was closed (logged)
    CANCELLED = "cancelled"


@dataclass(eq=False)
class _Record:
    status: str  # Acct-Status-Type
    session: AccountingSession
    cause: TerminateCause | None
    event_time: float
    done: Deferred[AccountingOutcome] = field(default_factory=Deferred)


AccountingTarget = RadiusServer | RadiusCollector


def _acct_port(target: AccountingTarget) -> int:
    return target.acct_port if isinstance(target, RadiusServer) else target.port


class RadiusAccounting:
    """Sends RADIUS accounting for sessions [5.4] or SSO identities [7].

    C{servers} is a failover list: each attempt offers the record to them in order (a
    new Accounting-Request for each: a new identifier, and Acct-Delay-Time counting the
    seconds since the event, RFC 2866 section 5.2) and ends at the first
    Accounting-Response; C{timeout} seconds each.  After an attempt without an answer
    the record waits C{retry_interval} seconds, doubling up to C{max_retry_interval},
    and tries again.  To feed several independent collectors, make one
    L{RadiusAccounting} per collector.

    C{expect_response=True} (an accounting server group): retried until answered, or
    C{max_attempts} if given.  C{expect_response=False} (SSO collectors; FortiGate never
    answers accounting): C{max_attempts} (default 2) and then given up with a log line.

    At most C{max_in_flight} records are being delivered at a time (each holds one
    identifier of a server while it waits), one per session so that a Stop never
    overtakes its Start; the others queue.  The queue holds at most
    C{max_queue} records: beyond that the oldest queued Interim-Update, else the oldest
    Start, is dropped (a Stop carries the session's totals); a Stop is never dropped
    while the daemon runs, so only Stops can take the queue beyond C{max_queue}.

    L{start}, L{interim} and L{stop} return a Deferred that fires with the
    L{AccountingOutcome} and never fails: callers may ignore it.
    """

    log = Logger()

    def __init__(
        self,
        client: IRadiusTransport,
        servers: Sequence[AccountingTarget],
        nas_identifier: str,
        *,
        timeout: float = 3.0,
        expect_response: bool = True,
        max_attempts: int | None = None,
        retry_interval: float = 1.0,
        max_retry_interval: float = 60.0,
        max_queue: int = 10000,
        max_in_flight: int = 32,
        nas_ip_address: str | None = None,
    ) -> None:
        if not servers:
            raise ValueError("RADIUS accounting needs at least one server")
        if max_attempts is None and not expect_response:
            max_attempts = 2
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self._client = client
        self._clock = client.clock
        self._servers = tuple(servers)
        self._nas_identifier = nas_identifier
        self._nas_ip_address = nas_ip_address
        self._timeout = timeout
        self._expect_response = expect_response
        self._max_attempts = max_attempts
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._max_queue = max_queue
        self._max_in_flight = max(1, min(max_in_flight, IDENTIFIERS))
        self._queue: deque[_Record] = deque()
        self._active: dict[_Record, Deferred[AccountingOutcome]] = {}
        self._closed = False

    @classmethod
    def for_group(cls, client: IRadiusTransport, group: RadiusGroup, nas_identifier: str, **options: Any) -> Self:
        """Accounting to an C{accounting_server_group} [5.4]: its servers and timeout,
        retried until answered (the group's C{retries} do not apply: accounting is never
        given up while the daemon runs)."""
        options.setdefault("timeout", group.timeout)
        return cls(client, group.servers, nas_identifier, **options)

    @classmethod
    def for_collector(
        cls, client: IRadiusTransport, collector: RadiusCollector, nas_identifier: str, **options: Any
    ) -> Self:
        """Accounting export to one C{sso.pop3.radius_accounting} collector [7]: an
        answer is welcome but not expected; each record is sent at most twice, waiting a
        second for an answer each time, so a collector that never answers (FortiGate)
        holds a record for about three seconds."""
        options.setdefault("expect_response", False)
        options.setdefault("timeout", 1.0)
        options.setdefault("max_in_flight", 128)
        return cls(client, (collector,), nas_identifier, **options)

    # -- the records ---------------------------------------------------------------------

    def start(self, session: AccountingSession) -> Deferred[AccountingOutcome]:
        """Accounting Start: at login."""
        return self._submit("Start", session, None)

    def interim(self, session: AccountingSession) -> Deferred[AccountingOutcome]:
        """Accounting Interim-Update: the session's totals so far (SSO renewal)."""
        return self._submit("Interim-Update", session, None)

    def stop(
        self, session: AccountingSession, cause: TerminateCause | str = TerminateCause.USER_REQUEST
    ) -> Deferred[AccountingOutcome]:
        """Accounting Stop: at disconnect, with the session's totals; never dropped."""
        return self._submit("Stop", session, TerminateCause(cause))

    @property
    def pending(self) -> int:
        """Records queued or being delivered."""
        return len(self._queue) + len(self._active)

    def close(self) -> None:
        """Stop delivering: pending records end as L{AccountingOutcome.CANCELLED}; the
        number of undelivered records (and Stops among them) is logged."""
        if self._closed:
            return
        self._closed = True
        records = [*self._queue, *self._active]
        if records:
            self.log.warn(
                "RADIUS accounting closed with {count} records undelivered, {stops} of them Stop",
                count=len(records),
                stops=sum(1 for record in records if record.status == "Stop"),
            )
        queued = list(self._queue)
        self._queue.clear()
        for record in queued:
            record.done.callback(AccountingOutcome.CANCELLED)
        for deferred in list(self._active.values()):
            deferred.cancel()

    def _submit(
        self, status: str, session: AccountingSession, cause: TerminateCause | None
    ) -> Deferred[AccountingOutcome]:
        record = _Record(status, session, cause, self._clock.seconds())
        if self._closed:
            self.log.warn(
                "RADIUS accounting {status} for session {session_id} ({user}) not sent: accounting is closed",
                status=status,
                session_id=session.session_id,
                user=session.user,
            )
            record.done.callback(AccountingOutcome.CANCELLED)
            return record.done
        try:
            self._packet(record, self._servers[0]).RequestPacket()
        except _ENCODING_ERRORS as e:
            self.log.error(
                "RADIUS accounting {status} for session {session_id} ({user}) cannot be encoded, dropped: {reason}",
                status=status,
                session_id=session.session_id,
                user=session.user,
                reason=str(e),
            )
            record.done.callback(AccountingOutcome.DROPPED)
            return record.done
        if len(self._queue) >= self._max_queue and not self._make_room(record):
            return record.done
        self._queue.append(record)
        self._pump()
        return record.done

    def _make_room(self, record: _Record) -> bool:
        """The queue is full: drop the oldest Interim-Update, else the oldest Start.
        False if the new record itself is dropped (only Stops are left in the queue)."""
        for status in ("Interim-Update", "Start"):
            victim = next((queued for queued in self._queue if queued.status == status), None)
            if victim is not None:
                self._queue.remove(victim)
                self._dropped(victim)
                return True
        if record.status == "Stop":
            self.log.warn(
                "RADIUS accounting queue holds {count} Stop records (limit {limit}); keeping Stop for session "
                "{session_id} anyway",
                count=len(self._queue),
                limit=self._max_queue,
                session_id=record.session.session_id,
            )
            return True
        self._dropped(record)
        return False

    def _dropped(self, record: _Record) -> None:
        self.log.warn(
            "RADIUS accounting queue full ({limit} records): dropped {status} of session {session_id} ({user})",
            limit=self._max_queue,
            status=record.status,
            session_id=record.session.session_id,
            user=record.session.user,
        )
        record.done.callback(AccountingOutcome.DROPPED)

    # -- delivery ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start delivering queued records, in order, up to C{max_in_flight}; a record
        waits while an earlier one of its session is being delivered (no Stop overtakes
        its Start)."""
        busy = {record.session.session_id for record in self._active}
        held: list[_Record] = []
        while self._queue and len(self._active) < self._max_in_flight and not self._closed:
            record = self._queue.popleft()
            if record.session.session_id in busy:
                held.append(record)
                continue
            busy.add(record.session.session_id)
            delivery = Deferred.fromCoroutine(self._deliver(record))
            self._active[record] = delivery
            delivery.addBoth(self._delivered, record)
        self._queue.extendleft(reversed(held))

    def _delivered(self, result: AccountingOutcome | Failure, record: _Record) -> None:
        self._active.pop(record, None)
        if isinstance(result, Failure):
            if result.check(CancelledError):
                outcome = AccountingOutcome.CANCELLED
            else:
                self.log.failure(
                    "RADIUS accounting {status} for session {session_id} failed",
                    result,
                    status=record.status,
                    session_id=record.session.session_id,
                )
                outcome = AccountingOutcome.DROPPED
        else:
            outcome = result
        record.done.callback(outcome)
        self._pump()

    async def _deliver(self, record: _Record) -> AccountingOutcome:
        attempt = 0
        while True:
            attempt += 1
            reasons: list[str] = []
            for target in self._servers:
                address = (target.host, _acct_port(target))
                try:
                    await self._client.send(address, self._packet(record, target), self._timeout, 0)
                except RadiusClientClosed:
                    return AccountingOutcome.CANCELLED
                except _NO_ANSWER as e:
                    reasons.append(str(e))
                    continue
                self.log.debug(
                    "RADIUS accounting {status} for session {session_id} acknowledged by {server}",
                    status=record.status,
                    session_id=record.session.session_id,
                    server=_format_address(*address),
                )
                return AccountingOutcome.ANSWERED
            if self._max_attempts is not None and attempt >= self._max_attempts:
                log = self.log.warn if self._expect_response else self.log.info
                log(
                    "RADIUS accounting {status} for session {session_id} ({user}) not acknowledged after "
                    "{attempts} attempts; giving up{note}: {reason}",
                    status=record.status,
                    session_id=record.session.session_id,
                    user=record.session.user,
                    attempts=attempt,
                    note="" if self._expect_response else " (the collector is not expected to answer)",
                    reason="; ".join(reasons),
                )
                return AccountingOutcome.UNANSWERED
            interval = min(self._retry_interval * 2 ** min(attempt - 1, 32), self._max_retry_interval)
            log = self.log.warn if self._expect_response and attempt == 1 else self.log.debug
            log(
                "RADIUS accounting {status} for session {session_id} ({user}) not acknowledged (attempt "
                "{attempts}: {reason}); trying again in {interval:g} s",
                status=record.status,
                session_id=record.session.session_id,
                user=record.session.user,
                attempts=attempt,
                reason="; ".join(reasons),
                interval=interval,
            )
            await deferLater(self._clock, interval)

    def _packet(self, record: _Record, target: AccountingTarget) -> Any:
        """A new Accounting-Request for one attempt of a record."""
        session = record.session
        now = self._clock.seconds()
        request = rp.AcctPacket(
            code=rp.AccountingRequest, id=0, secret=target.secret.reveal().encode("utf-8"), dict=self._client.dictionary
        )
        request["Acct-Status-Type"] = record.status
        request["Acct-Session-Id"] = session.session_id
        request["User-Name"] = session.user
        request["NAS-Identifier"] = self._nas_identifier
        _add_ip_attributes(request, self._nas_ip_address, "NAS-IP-Address", "NAS-IPv6-Address")
        request["NAS-Port-Type"] = "Virtual"
        _add_ip_attributes(request, session.client_ip, "Framed-IP-Address", "Framed-IPv6-Address")
        calling_station = session.calling_station_id or session.client_ip
        if calling_station:
            request["Calling-Station-Id"] = calling_station
        if session.radius_class:
            radius_class = session.radius_class
            request["Class"] = radius_class.encode("utf-8") if isinstance(radius_class, str) else radius_class
        request["Event-Timestamp"] = min(max(0, int(record.event_time)), _UINT32)
        request["Acct-Delay-Time"] = min(max(0, int(now - record.event_time)), _UINT32)
        if record.status != "Start":
            request["Acct-Session-Time"] = min(max(0, int(record.event_time - session.started)), _UINT32)
            bytes_in = max(0, session.bytes_in)
            bytes_out = max(0, session.bytes_out)
            request["Acct-Input-Octets"] = bytes_in & _UINT32
            request["Acct-Output-Octets"] = bytes_out & _UINT32
            request["Acct-Input-Gigawords"] = min(bytes_in >> 32, _UINT32)
            request["Acct-Output-Gigawords"] = min(bytes_out >> 32, _UINT32)
        if record.cause is not None:
            request["Acct-Terminate-Cause"] = str(record.cause)
        return request
