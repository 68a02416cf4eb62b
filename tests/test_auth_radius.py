"""RADIUS: the client's identifiers, retransmissions and reply verification on a
L{Clock} with a fake UDP transport; the checker, Authorize-Only and accounting against a
real FreeRADIUS (and UDP ports that never answer) on loopback."""

from __future__ import annotations

import hashlib
import itertools
import secrets
import struct
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pyrad import packet as rp
from pyrad.dictionary import Dictionary
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.auth.portal import AAAUnavailable, AuthenticatedUser
from mailgw.auth.radius import (
    AccountingOutcome,
    AccountingSession,
    IRadiusTransport,
    RadiusAccounting,
    RadiusBusy,
    RadiusChecker,
    RadiusClient,
    RadiusClientClosed,
    RadiusTimeout,
    RadiusUnreachable,
    TerminateCause,
    load_dictionary,
    verify_reply,
)
from mailgw.config import RadiusCollector, RadiusGroup, RadiusServer, Secret
from tests.servers.freeradius import CHALLENGE_PROMPT, DICTIONARY_DIRECTORY, FreeRadius, silent_udp_port

SECRET = "s3cret-" + secrets.token_hex(6)
PASSWORDS = ("alice-password", "bob-password", "carol-password", "dave-password")
SERVER = ("192.0.2.10", 1812)
SERVER2 = ("192.0.2.11", 1812)
ACCT = ("192.0.2.10", 1813)
NOW = 1_700_000_000.0
GIB = 2**30


# -- a UDP reactor without sockets ---------------------------------------------------------


class FakeDatagramTransport:
    """What a protocol sees of a UDP port: writes are recorded, or fail on request."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.listening = True
        self.write_error: OSError | None = None

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.listening = False


class FakeResolver:
    """An IHostnameResolver over a fixed table."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any) -> Any:
        receiver.resolutionBegan(None)
        for host in self.table.get(hostName, []):
            receiver.addressResolved((IPv6Address if ":" in host else IPv4Address)("UDP", host, 0))
        receiver.resolutionComplete()
        return receiver


class FakeUDPReactor(Clock):
    """A Clock whose listenUDP connects the protocol to a L{FakeDatagramTransport}."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[tuple[DatagramProtocol, FakeDatagramTransport]] = []
        self.nameResolver = FakeResolver({"radius.example.com": ["192.0.2.10"]})

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeDatagramTransport:
        transport = FakeDatagramTransport(interface)
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        self.ports.append((protocol, transport))
        return transport

    def sent(self) -> list[tuple[bytes, tuple[str, int]]]:
        return [written for _, transport in self.ports for written in transport.written]

    def deliver(self, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram from C{addr} arrives at the port of its address family."""
        for protocol, transport in self.ports:
            if (":" in addr[0]) == (transport.interface == "::"):
                protocol.datagramReceived(data, addr)
                return
        raise AssertionError(f"no port for {addr}")


def decode_request(raw: bytes, secret: str, dictionary: Dictionary) -> Any:
    kind = rp.AcctPacket if raw[0] == rp.AccountingRequest else rp.AuthPacket
    return kind(packet=raw, secret=secret.encode(), dict=dictionary)


def answer(
    raw: bytes,
    code: int,
    dictionary: Dictionary,
    *,
    secret: str = SECRET,
    message_authenticator: bool | None = None,
    **attributes: Any,
) -> bytes:
    """A server's reply to C{raw}, signed with C{secret}."""
    request = decode_request(raw, secret, dictionary)
    reply = request.CreateReply()
    reply.code = code
    for name, value in attributes.items():
        reply[name.replace("_", "-")] = value
    if message_authenticator is not None:
        reply.message_authenticator = message_authenticator
    return bytes(reply.ReplyPacket())


def access_request(dictionary: Dictionary, secret: str = SECRET, user: str = "alice") -> Any:
    request = rp.AuthPacket(code=rp.AccessRequest, id=0, secret=secret.encode(), dict=dictionary)
    request["User-Name"] = user
    request["User-Password"] = request.PwCrypt(b"alice-password")
    request.add_message_authenticator()
    return request


def radius_group(
    *servers: tuple[str, int], timeout: float = 0.3, retries: int = 1, secret: str = SECRET
) -> RadiusGroup:
    return RadiusGroup(
        name="corp-radius",
        protocol="radius",
        servers=tuple(RadiusServer(host, port, port + 1, Secret(secret)) for host, port in servers),
        timeout=timeout,
        retries=retries,
    )


def session(session_id: str = "mailgw-1", **changes: Any) -> AccountingSession:
    fields: dict[str, Any] = {
        "session_id": session_id,
        "user": "alice",
        "client_ip": "198.51.100.7",
        "started": NOW - 3600,
    }
    fields.update(changes)
    return AccountingSession(**fields)


def messages(events: EventLoggingObserver) -> list[str]:
    return [formatEvent(event) for event in events]


def assert_no_secrets(testcase: SynchronousTestCase, events: EventLoggingObserver, *extra: str) -> None:
    """No captured event, formatted or in any field, contains a secret or password."""
    for event in events:
        text = formatEvent(event) + repr(event)
        for secret in (SECRET, *PASSWORDS, *extra):
            testcase.assertNotIn(secret, text)


# -- the dictionary ------------------------------------------------------------------------


class DictionaryTests(SynchronousTestCase):
    def test_packageData(self) -> None:
        """The dictionary ships with the package and defines every attribute the gateway uses."""
        dictionary = load_dictionary()
        for name in (
            "User-Name",
            "User-Password",
            "NAS-IP-Address",
            "NAS-Port",
            "Service-Type",
            "Framed-IP-Address",
            "Reply-Message",
            "State",
            "Class",
            "Session-Timeout",
            "Idle-Timeout",
            "Called-Station-Id",
            "Calling-Station-Id",
            "NAS-Identifier",
            "Acct-Status-Type",
            "Acct-Delay-Time",
            "Acct-Input-Octets",
            "Acct-Output-Octets",
            "Acct-Session-Id",
            "Acct-Authentic",
            "Acct-Session-Time",
            "Acct-Input-Packets",
            "Acct-Output-Packets",
            "Acct-Terminate-Cause",
            "Acct-Input-Gigawords",
            "Acct-Output-Gigawords",
            "Event-Timestamp",
            "NAS-Port-Type",
            "Message-Authenticator",
        ):
            self.assertIn(name, dictionary.attributes)
        self.assertEqual(getattr(dictionary, "skipped_attributes", set()), set())

        def value(attribute: str, name: str) -> int:
            encoded = dictionary.attributes[attribute].values.GetForward(name)
            return int(struct.unpack("!I", encoded)[0])

        self.assertEqual(value("Service-Type", "Authorize-Only"), 17)
        statuses = ("Start", "Stop", "Interim-Update", "Accounting-On", "Accounting-Off")
        self.assertEqual([value("Acct-Status-Type", name) for name in statuses], [1, 2, 3, 7, 8])
        self.assertEqual([value("Acct-Terminate-Cause", cause.value) for cause in TerminateCause], list(range(1, 19)))

    def test_matchesFreeRadius(self) -> None:
        """Codes, types and values agree with FreeRADIUS's own dictionaries."""
        folder = Path(DICTIONARY_DIRECTORY)
        names = ["rfc2865", "rfc2866", "rfc2869", "rfc3162", "rfc6911", "rfc3576"]
        files = [folder / f"dictionary.{name}" for name in names]
        if not all(path.exists() for path in files):
            raise SkipTest("FreeRADIUS dictionaries not installed")
        attributes: dict[str, tuple[int, str]] = {}
        values: dict[tuple[str, str], int] = {}
        for path in files:
            for line in path.read_text().splitlines():
                tokens = line.split("#", 1)[0].split()
                if len(tokens) >= 4 and tokens[0] == "ATTRIBUTE":
                    attributes[tokens[1]] = (int(tokens[2], 0), tokens[3])
                elif len(tokens) >= 4 and tokens[0] == "VALUE":
                    values[(tokens[1], tokens[2])] = int(tokens[3], 0)
        ours = load_dictionary()
        for name, attribute in ours.attributes.items():
            self.assertEqual((attribute.code, attribute.type), attributes.get(name), name)
            for value_name, encoded in attribute.values.forward.items():
                self.assertEqual(struct.unpack("!I", encoded)[0], values.get((name, value_name)), value_name)


# -- reply verification --------------------------------------------------------------------


class VerifyReplyTests(SynchronousTestCase):
    """verify_reply against replies signed by pyrad (as a server would sign them)."""

    def setUp(self) -> None:
        self.dictionary = load_dictionary()
        self.request = access_request(self.dictionary)
        self.request.id = 7
        self.raw = self.request.RequestPacket()

    def verify(self, reply: bytes, request: bytes | None = None, **kw: Any) -> bool:
        request = request or self.raw
        return verify_reply(reply, request[0], request[4:20], SECRET.encode(), **kw)

    def test_accessReplies(self) -> None:
        """Accept, Reject and Challenge, signed or not, verify with the right secret only."""
        for code in (rp.AccessAccept, rp.AccessReject, rp.AccessChallenge):
            for signed in (True, False):
                reply = answer(self.raw, code, self.dictionary, message_authenticator=signed, Reply_Message="hi")
                self.assertTrue(self.verify(reply))
                self.assertEqual(self.verify(reply, require_message_authenticator=True), signed)
                wrong = answer(self.raw, code, self.dictionary, secret="other", message_authenticator=signed)
                self.assertFalse(self.verify(wrong))

    def test_accountingResponse(self) -> None:
        """An Accounting-Response, with or without a Message-Authenticator (zero vector)."""
        request = rp.AcctPacket(code=rp.AccountingRequest, id=3, secret=SECRET.encode(), dict=self.dictionary)
        request["Acct-Status-Type"] = "Start"
        raw = request.RequestPacket()
        for signed in (True, False):
            reply = answer(raw, rp.AccountingResponse, self.dictionary, message_authenticator=signed)
            self.assertTrue(self.verify(reply, raw, require_message_authenticator=True))
        self.assertFalse(self.verify(answer(raw, rp.AccountingResponse, self.dictionary, secret="x"), raw))

    def test_padding(self) -> None:
        """Octets beyond the Length field are padding."""
        self.assertTrue(self.verify(answer(self.raw, rp.AccessAccept, self.dictionary) + b"\0junk"))

    def resign(self, reply: bytes) -> bytes:
        """C{reply} with a valid Response Authenticator over whatever it contains."""
        reply = reply[:2] + struct.pack("!H", len(reply)) + reply[4:]
        authenticator = hashlib.md5(reply[:4] + self.raw[4:20] + reply[20:] + SECRET.encode()).digest()  # noqa: S324
        return reply[:4] + authenticator + reply[20:]

    def test_framing(self) -> None:
        """Broken attribute framing, a second Message-Authenticator or a Proxy-State the
        gateway never sent fail even with a valid Response Authenticator."""
        reply = answer(self.raw, rp.AccessAccept, self.dictionary, message_authenticator=False)
        self.assertTrue(self.verify(self.resign(reply)))
        self.assertFalse(self.verify(self.resign(reply + b"\x12\x01")))
        self.assertFalse(self.verify(self.resign(reply + b"\x12\x09ab")))
        self.assertFalse(self.verify(self.resign(reply + b"\x50\x05abc")))
        self.assertFalse(self.verify(self.resign(reply + b"\x21\x05abc")))
        signed = answer(self.raw, rp.AccessAccept, self.dictionary, message_authenticator=True)
        self.assertFalse(self.verify(self.resign(signed + signed[20:38])))
        self.assertFalse(self.verify(b"\x02\x07\x00\x14"))

    @given(st.data())
    def test_anyChangeFails(self, data: st.DataObject) -> None:
        """Changing any octet of a signed reply makes it fail."""
        reply = bytearray(answer(self.raw, rp.AccessAccept, self.dictionary, Class=b"OU=Finance;"))
        index = data.draw(st.integers(0, len(reply) - 1))
        reply[index] ^= data.draw(st.integers(1, 255))
        self.assertFalse(self.verify(bytes(reply)))


# -- the client on a Clock -----------------------------------------------------------------


class ClientProtocolTests(SynchronousTestCase):
    """RadiusClient without sockets: identifiers, retransmission, reply verification."""

    def setUp(self) -> None:
        self.reactor = FakeUDPReactor()
        self.dictionary = load_dictionary()
        self.client = RadiusClient(self.reactor, self.dictionary)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def send(
        self, server: tuple[str, int] = SERVER, timeout: float = 1.0, retries: int = 0, **kw: Any
    ) -> Deferred[Any]:
        return self.client.send(server, access_request(self.dictionary), timeout, retries, **kw)

    def test_interface(self) -> None:
        """RadiusClient provides IRadiusTransport."""
        self.assertTrue(verifyObject(IRadiusTransport, self.client))

    def test_portPerAddressFamily(self) -> None:
        """One port per address family, opened on first use and shared by all servers."""
        self.assertEqual(self.reactor.ports, [])
        self.send(SERVER)
        self.send(SERVER2)
        self.assertEqual([transport.interface for _, transport in self.reactor.ports], [""])
        self.send(("2001:db8::1", 1812))
        self.assertEqual([transport.interface for _, transport in self.reactor.ports], ["", "::"])
        self.assertEqual(self.reactor.ports[1][1].written[0][1], ("2001:db8::1", 1812))

    def test_ipv6Reply(self) -> None:
        """A reply from an IPv6 server (a 4-tuple address) is matched to its request."""
        d = self.send(("2001:db8::1", 1812))
        raw, _ = self.reactor.sent()[0]
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary), ("2001:db8:0::1", 1812, 0, 0))  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(d).code, rp.AccessAccept)

    def test_hostName(self) -> None:
        """A server given by name is resolved; an unknown name fails as unreachable."""
        d = self.send(("radius.example.com", 1812))
        raw, addr = self.reactor.sent()[0]
        self.assertEqual(addr, ("192.0.2.10", 1812))
        self.reactor.deliver(answer(raw, rp.AccessReject, self.dictionary), addr)
        self.assertEqual(self.successResultOf(d).code, rp.AccessReject)
        self.failureResultOf(self.send(("nowhere.example.com", 1812)), RadiusUnreachable)

    def test_identifiersNotReusedWhileInFlight(self) -> None:
        """256 requests in flight to one server get 256 distinct identifiers; the 257th
        waits for one and gets the first identifier to be freed."""
        pending = [self.send() for _ in range(256)]
        sent = self.reactor.sent()
        identifiers = [raw[1] for raw, _ in sent]
        self.assertEqual(sorted(identifiers), list(range(256)))
        waiting = self.send()
        self.assertEqual(len(self.reactor.sent()), 256)
        self.assertNoResult(waiting)
        freed = sent[100][0]
        self.reactor.deliver(answer(freed, rp.AccessReject, self.dictionary), SERVER)
        self.successResultOf(pending[100])
        self.assertEqual(self.reactor.sent()[-1][0][1], freed[1])
        self.assertEqual(self.client.in_flight, 256)

    def test_identifiersPerServer(self) -> None:
        """Each server address has its own 256 identifiers."""
        for _ in range(256):
            self.send(SERVER)
            self.send(SERVER2)
            self.send((SERVER[0], 1645))
        self.assertEqual(len(self.reactor.sent()), 3 * 256)

    def test_identifiersWrapAround(self) -> None:
        """Identifiers go round all 256 values before one is used again, wrapping from 255 to 0."""
        identifiers = []
        for _ in range(300):
            d = self.send()
            raw, _ = self.reactor.sent()[-1]
            identifiers.append(raw[1])
            self.reactor.deliver(answer(raw, rp.AccessReject, self.dictionary), SERVER)
            self.successResultOf(d)
        for previous, following in itertools.pairwise(identifiers):
            self.assertEqual(following, (previous + 1) % 256)
        self.assertIn((255, 0), list(itertools.pairwise(identifiers)))

    def test_waitQueueBounded(self) -> None:
        """Beyond 256 in flight and max_waiting waiting, sending fails with RadiusBusy."""
        client = RadiusClient(self.reactor, self.dictionary, max_waiting=2)
        for _ in range(258):
            client.send(SERVER, access_request(self.dictionary), 1.0, 0)
        failure = self.failureResultOf(client.send(SERVER, access_request(self.dictionary), 1.0, 0), RadiusBusy)
        self.assertIn("256 requests in flight", failure.getErrorMessage())

    def test_retransmission(self) -> None:
        """Without an answer the same datagram (identifier, authenticator) is sent again every
        C{timeout} seconds, C{retries} times; then the request fails with RadiusTimeout."""
        d = self.send(timeout=0.3, retries=2)
        self.assertEqual(len(self.reactor.sent()), 1)
        self.reactor.advance(0.29)
        self.assertEqual(len(self.reactor.sent()), 1)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.sent()), 2)
        self.reactor.advance(0.3)
        self.assertEqual(len(self.reactor.sent()), 3)
        self.assertEqual(len({raw for raw, _ in self.reactor.sent()}), 1)
        self.assertNoResult(d)
        self.reactor.advance(0.3)
        failure = self.failureResultOf(d, RadiusTimeout)
        self.assertEqual(failure.getErrorMessage(), "no answer from 192.0.2.10:1812 after 3 tries of 0.3 s")
        self.assertEqual(len(self.reactor.sent()), 3)
        self.assertEqual(self.client.in_flight, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_answerToRetransmission(self) -> None:
        """An answer after a resend ends the request; nothing is sent after it."""
        d = self.send(timeout=0.3, retries=2)
        self.reactor.advance(0.3)
        raw, _ = self.reactor.sent()[-1]
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary), SERVER)
        self.assertEqual(self.successResultOf(d).code, rp.AccessAccept)
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.sent()), 2)

    def test_forgedReplyIgnored(self) -> None:
        """A reply signed with another secret is dropped with a log line; the request keeps
        waiting and takes the genuine reply."""
        d = self.send()
        raw, _ = self.reactor.sent()[0]
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, secret="guessed"), SERVER)
        self.assertNoResult(d)
        self.assertTrue(any("fails verification" in message for message in messages(self.events)))
        self.reactor.deliver(answer(raw, rp.AccessReject, self.dictionary), SERVER)
        self.assertEqual(self.successResultOf(d).code, rp.AccessReject)

    def test_tamperedReplyIgnored(self) -> None:
        """A reply whose attributes were changed in transit fails the Response Authenticator."""
        d = self.send()
        raw, _ = self.reactor.sent()[0]
        genuine = answer(raw, rp.AccessAccept, self.dictionary, Class=b"OU=Finance;")
        self.reactor.deliver(genuine.replace(b"Finance", b"Admins!"), SERVER)
        self.assertNoResult(d)

    def test_badMessageAuthenticatorIgnored(self) -> None:
        """A reply with a valid Response Authenticator but a wrong Message-Authenticator is dropped."""
        d = self.send()
        raw, _ = self.reactor.sent()[0]
        reply = bytearray(answer(raw, rp.AccessAccept, self.dictionary, message_authenticator=True))
        offset = 20
        while reply[offset] != 80:
            offset += reply[offset + 1]
        reply[offset + 2 : offset + 18] = bytes(16)
        # re-sign the Response Authenticator over the broken attribute
        reply[4:20] = hashlib.md5(bytes(reply[:4]) + raw[4:20] + bytes(reply[20:]) + SECRET.encode()).digest()  # noqa: S324
        self.reactor.deliver(bytes(reply), SERVER)
        self.assertNoResult(d)
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, message_authenticator=True), SERVER)
        self.successResultOf(d)

    def test_requireMessageAuthenticator(self) -> None:
        """With require_message_authenticator a reply without one is dropped."""
        d = self.send(require_message_authenticator=True)
        raw, _ = self.reactor.sent()[0]
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, message_authenticator=False), SERVER)
        self.assertNoResult(d)
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, message_authenticator=True), SERVER)
        self.successResultOf(d)

    def test_replyFromElsewhereIgnored(self) -> None:
        """A genuine-looking reply from another address or port does not match the request."""
        d = self.send()
        raw, _ = self.reactor.sent()[0]
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary), ("192.0.2.99", 1812))
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary), (SERVER[0], 1645))
        self.assertNoResult(d)
        self.assertEqual(sum("no request awaits it" in message for message in messages(self.events)), 2)

    def test_wrongReplyCodeIgnored(self) -> None:
        """An Accounting-Response is no answer to an Access-Request."""
        d = self.send()
        raw, _ = self.reactor.sent()[0]
        self.reactor.deliver(answer(raw, rp.AccountingResponse, self.dictionary), SERVER)
        self.assertNoResult(d)

    def test_lateReplyIgnored(self) -> None:
        """An answer after the request timed out is logged and dropped."""
        d = self.send(timeout=0.3)
        raw, _ = self.reactor.sent()[0]
        self.reactor.advance(0.3)
        self.failureResultOf(d, RadiusTimeout)
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary), SERVER)
        self.assertTrue(any("no request awaits it" in message for message in messages(self.events)))

    @given(garbage=st.binary(max_size=120), code=st.sampled_from([2, 3, 11, 5, 0]))
    def test_malformedRepliesIgnored(self, garbage: bytes, code: int) -> None:
        """Arbitrary datagrams with the request's identifier never raise and never answer it."""
        fake = FakeUDPReactor()
        client = RadiusClient(fake, self.dictionary)
        d = client.send(SERVER, access_request(self.dictionary), 1.0, 0)
        raw, _ = fake.sent()[0]
        fake.deliver(bytes([code, raw[1]]) + garbage, SERVER)
        fake.deliver(bytes([code, raw[1]]) + struct.pack("!H", 4 + len(garbage)) + garbage, SERVER)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)

    def test_cancelFreesIdentifier(self) -> None:
        """Cancelling a request stops its timer and frees its identifier; cancelling a
        waiting request takes it out of the queue."""
        pending = [self.send() for _ in range(256)]
        waiting = self.send()
        waiting.cancel()
        self.failureResultOf(waiting)
        pending[0].cancel()
        self.failureResultOf(pending[0])
        self.assertEqual(self.client.in_flight, 255)
        self.assertEqual(len(self.reactor.sent()), 256)
        for d in pending[1:]:
            d.cancel()
            self.failureResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_writeErrorIsALostDatagram(self) -> None:
        """A send error is logged and the request retried after its timeout."""
        d = self.send(timeout=0.3, retries=1)
        transport = self.reactor.ports[0][1]
        self.assertEqual(len(transport.written), 1)
        transport.write_error = OSError(101, "Network is unreachable")
        self.reactor.advance(0.3)
        self.assertTrue(any("Could not send" in message for message in messages(self.events)))
        self.reactor.advance(0.3)
        self.failureResultOf(d, RadiusTimeout)

    def test_close(self) -> None:
        """Closing fails pending requests, stops the ports and refuses new requests."""
        d = self.send()
        self.successResultOf(self.client.close())
        self.failureResultOf(d, RadiusClientClosed)
        self.assertFalse(self.reactor.ports[0][1].listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.failureResultOf(self.send(), RadiusClientClosed)


# -- the checker on a Clock ----------------------------------------------------------------


class CheckerProtocolTests(SynchronousTestCase):
    """RadiusChecker's requests, failover timing and answers, without sockets."""

    def setUp(self) -> None:
        self.reactor = FakeUDPReactor()
        self.dictionary = load_dictionary()
        self.client = RadiusClient(self.reactor, self.dictionary)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def checker(self, *servers: tuple[str, int], **kw: Any) -> RadiusChecker:
        return RadiusChecker(radius_group(*servers, **kw), self.client, "mailgw-gw1", nas_ip_address="192.0.2.1")

    def login(self, checker: RadiusChecker, user: str = "alice", password: str = PASSWORDS[0]) -> Deferred[Any]:
        return checker.requestAvatarId(UsernamePassword(user.encode(), password.encode()))

    def test_accessRequest(self) -> None:
        """The Access-Request: PAP password hidden with the secret, NAS attributes and a valid
        Message-Authenticator; Access-Accept gives the Class as text."""
        d = self.login(self.checker(SERVER))
        raw, addr = self.reactor.sent()[0]
        self.assertEqual(addr, SERVER)
        self.assertNotIn(b"alice-password", raw)
        request = decode_request(raw, SECRET, self.dictionary)
        self.assertEqual(request.code, rp.AccessRequest)
        self.assertEqual(request["User-Name"], ["alice"])
        self.assertEqual(request.PwDecrypt(request["User-Password"][0]), "alice-password")
        self.assertEqual(request["NAS-Identifier"], ["mailgw-gw1"])
        self.assertEqual(request["NAS-IP-Address"], ["192.0.2.1"])
        self.assertEqual(request["Service-Type"], ["Login-User"])
        self.assertTrue(request.message_authenticator)
        self.assertTrue(request.verify_message_authenticator())
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, Class=b"OU=Finance;"), SERVER)
        self.assertEqual(
            self.successResultOf(d),
            AuthenticatedUser(name="alice", server_group="corp-radius", radius_class="OU=Finance;"),
        )

    def test_failoverTiming(self) -> None:
        """A silent server gets C{retries + 1} tries of C{timeout} seconds; then the next server."""
        d = self.login(self.checker(SERVER, SERVER2, timeout=0.3, retries=2))
        self.assertEqual([addr for _, addr in self.reactor.sent()], [SERVER])
        self.reactor.pump([0.3, 0.3])
        self.assertEqual([addr for _, addr in self.reactor.sent()], [SERVER] * 3)
        self.reactor.advance(0.3)
        self.assertEqual([addr for _, addr in self.reactor.sent()], [SERVER] * 3 + [SERVER2])
        raw, _ = self.reactor.sent()[-1]
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary), SERVER2)
        self.assertEqual(self.successResultOf(d).radius_class, None)
        self.assertTrue(
            any("192.0.2.10:1812" in message and "no answer" in message for message in messages(self.events))
        )

    def test_allSilent(self) -> None:
        """No server answering is AAAUnavailable after timeout x (retries + 1) per server."""
        d = self.login(self.checker(SERVER, SERVER2, timeout=0.3, retries=1))
        self.reactor.pump([0.3, 0.3, 0.3, 0.29])
        self.assertNoResult(d)
        self.reactor.advance(0.02)
        failure = self.failureResultOf(d, AAAUnavailable)
        self.assertIn("no server of RADIUS group 'corp-radius' answered", failure.getErrorMessage())
        self.assertEqual(len(self.reactor.sent()), 4)

    def test_acceptWithWrongSecretNotTrusted(self) -> None:
        """Access-Accepts signed with another secret are dropped: the login ends as
        AAAUnavailable, never as accepted."""
        d = self.login(self.checker(SERVER, timeout=0.3, retries=1))
        for _ in range(2):
            raw, _ = self.reactor.sent()[-1]
            self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, secret="not-the-secret"), SERVER)
            self.reactor.advance(0.3)
        self.failureResultOf(d, AAAUnavailable)
        self.assertEqual(sum("fails verification" in m for m in messages(self.events)), 2)

    def test_rejectIsFinal(self) -> None:
        """An explicit Access-Reject is UnauthorizedLogin; the next server is not asked."""
        d = self.login(self.checker(SERVER, SERVER2))
        raw, _ = self.reactor.sent()[0]
        self.reactor.deliver(answer(raw, rp.AccessReject, self.dictionary, Reply_Message="Bad password"), SERVER)
        self.failureResultOf(d, UnauthorizedLogin)
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.sent()), 1)
        self.assertTrue(any("Bad password" in message for message in messages(self.events)))

    def test_challengeRefused(self) -> None:
        """An Access-Challenge is UnauthorizedLogin, and the log says why."""
        d = self.login(self.checker(SERVER, SERVER2))
        raw, _ = self.reactor.sent()[0]
        reply = answer(raw, rp.AccessChallenge, self.dictionary, State=b"x1", Reply_Message="Enter code")
        self.reactor.deliver(reply, SERVER)
        failure = self.failureResultOf(d, UnauthorizedLogin)
        self.assertIn("Access-Challenge", failure.getErrorMessage())
        self.assertTrue(any("Access-Challenge" in m and "Enter code" in m for m in messages(self.events)))
        self.assertEqual(len(self.reactor.sent()), 1)

    def test_unusableCredentials(self) -> None:
        """Empty or over-long passwords and names are refused without asking a server."""
        checker = self.checker(SERVER)
        self.failureResultOf(self.login(checker, password=""), UnauthorizedLogin)
        self.failureResultOf(self.login(checker, password="x" * 129), UnauthorizedLogin)
        self.failureResultOf(self.login(checker, user="u" * 254), UnauthorizedLogin)
        self.assertEqual(self.reactor.sent(), [])

    def test_longPassword(self) -> None:
        """Passwords up to 128 octets are hidden in several 16-octet blocks."""
        password = "p" * 128
        d = self.login(self.checker(SERVER), password=password)
        raw, _ = self.reactor.sent()[0]
        request = decode_request(raw, SECRET, self.dictionary)
        self.assertEqual(request.PwDecrypt(request["User-Password"][0]), password)
        d.cancel()
        self.failureResultOf(d)

    def test_cancel(self) -> None:
        """Cancelling a login (the client went away) cancels the request: no timer, no
        identifier left, no next server asked."""
        d = self.login(self.checker(SERVER, SERVER2))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.client.in_flight, 0)
        self.assertEqual(len(self.reactor.sent()), 1)

    def test_authorizeOnly(self) -> None:
        """authorize sends Service-Type Authorize-Only without a password."""
        d = self.checker(SERVER).authorize("bob")
        raw, _ = self.reactor.sent()[0]
        request = decode_request(raw, SECRET, self.dictionary)
        self.assertEqual(request["Service-Type"], ["Authorize-Only"])
        self.assertNotIn("User-Password", request)
        self.assertTrue(request.verify_message_authenticator())
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, Class=b"Engineering"), SERVER)
        self.assertEqual(self.successResultOf(d).radius_class, "Engineering")

    def test_noSecretsLogged(self) -> None:
        """Neither the password nor the shared secret appear in any log event."""
        checker = self.checker(SERVER, SERVER2, timeout=0.3, retries=0)
        d = self.login(checker)
        self.reactor.advance(0.3)
        raw, _ = self.reactor.sent()[-1]
        self.reactor.deliver(answer(raw, rp.AccessAccept, self.dictionary, secret="other"), SERVER2)
        self.reactor.deliver(answer(raw, rp.AccessReject, self.dictionary), SERVER2)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertTrue(len(self.events) >= 3)
        assert_no_secrets(self, self.events)


# -- accounting on a Clock -----------------------------------------------------------------


class AccountingProtocolTests(SynchronousTestCase):
    """RadiusAccounting's records, retries and queue, without sockets."""

    def setUp(self) -> None:
        self.reactor = FakeUDPReactor()
        self.reactor.advance(NOW)
        self.dictionary = load_dictionary()
        self.client = RadiusClient(self.reactor, self.dictionary)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.servers = [RadiusServer(ACCT[0], 1812, ACCT[1], Secret(SECRET))]

    def accounting(self, **kw: Any) -> RadiusAccounting:
        accounting = RadiusAccounting(self.client, self.servers, "mailgw-gw1", **kw)
        self.addCleanup(accounting.close)
        return accounting

    def requests(self) -> list[Any]:
        return [decode_request(raw, SECRET, self.dictionary) for raw, _ in self.reactor.sent()]

    def ack(self, index: int = -1) -> None:
        raw, addr = self.reactor.sent()[index]
        self.reactor.deliver(answer(raw, rp.AccountingResponse, self.dictionary), addr)

    def test_startAndStop(self) -> None:
        """Start and Stop carry the same Acct-Session-Id; Stop has session time, octets with
        Gigawords for the high 32 bits, and the terminate cause."""
        accounting = self.accounting()
        s = session(bytes_in=5 * 2**32 + 7, bytes_out=3 * GIB, radius_class="OU=Finance;")
        started = accounting.start(s)
        self.ack()
        self.assertEqual(self.successResultOf(started), AccountingOutcome.ANSWERED)
        stopped = accounting.stop(s, TerminateCause.IDLE_TIMEOUT)
        self.ack()
        self.assertEqual(self.successResultOf(stopped), AccountingOutcome.ANSWERED)
        start, stop = self.requests()
        self.assertTrue(start.VerifyAcctRequest())
        self.assertEqual(start["Acct-Status-Type"], ["Start"])
        self.assertEqual(stop["Acct-Status-Type"], ["Stop"])
        self.assertEqual(start["Acct-Session-Id"], stop["Acct-Session-Id"])
        for request in (start, stop):
            self.assertEqual(request["User-Name"], ["alice"])
            self.assertEqual(request["Framed-IP-Address"], ["198.51.100.7"])
            self.assertEqual(request["NAS-Identifier"], ["mailgw-gw1"])
            self.assertEqual(request["Class"], [b"OU=Finance;"])
            self.assertEqual(request["Event-Timestamp"], [int(NOW)])
            self.assertEqual(request["Acct-Delay-Time"], [0])
        self.assertNotIn("Acct-Session-Time", start)
        self.assertEqual(stop["Acct-Session-Time"], [3600])
        self.assertEqual(stop["Acct-Input-Octets"], [7])
        self.assertEqual(stop["Acct-Input-Gigawords"], [5])
        self.assertEqual(stop["Acct-Output-Octets"], [3 * GIB])
        self.assertEqual(stop["Acct-Output-Gigawords"], [0])
        self.assertEqual(stop["Acct-Terminate-Cause"], ["Idle-Timeout"])

    def test_ipv6Client(self) -> None:
        """An IPv6 client goes in Framed-IPv6-Address; an IPv4-mapped one in Framed-IP-Address."""
        accounting = self.accounting()
        accounting.start(session("v6", client_ip="2001:db8::7"))
        accounting.start(session("mapped", client_ip="::ffff:198.51.100.8"))
        v6, mapped = self.requests()
        self.assertEqual(v6["Framed-IPv6-Address"], ["2001:db8::7"])
        self.assertNotIn("Framed-IP-Address", v6)
        self.assertEqual(mapped["Framed-IP-Address"], ["198.51.100.8"])

    def test_retriedUntilAnswered(self) -> None:
        """Unanswered, a record is sent again as a new packet (new identifier, growing
        Acct-Delay-Time) after a doubling interval, bounded by max_retry_interval."""
        accounting = self.accounting(timeout=1.0, retry_interval=1.0, max_retry_interval=4.0)
        done = accounting.stop(session(), "Admin-Reset")
        for _ in range(6):
            self.reactor.advance(1)
            self.reactor.advance(self.reactor.getDelayedCalls()[0].getTime() - self.reactor.seconds())
        requests = self.requests()
        self.assertEqual([r["Acct-Delay-Time"][0] for r in requests], [0, 2, 5, 10, 15, 20, 25])
        self.assertEqual(len({r.id for r in requests}), 7)
        self.assertEqual({r["Event-Timestamp"][0] for r in requests}, {int(NOW)})
        self.assertNoResult(done)
        self.ack()
        self.assertEqual(self.successResultOf(done), AccountingOutcome.ANSWERED)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(accounting.pending, 0)

    def test_failover(self) -> None:
        """Each attempt offers the record to the servers in order."""
        self.servers.append(RadiusServer("192.0.2.11", 1812, 1813, Secret(SECRET)))
        accounting = self.accounting(timeout=1.0)
        done = accounting.start(session())
        self.reactor.advance(1)
        self.assertEqual([addr for _, addr in self.reactor.sent()], [ACCT, ("192.0.2.11", 1813)])
        self.ack()
        self.assertEqual(self.successResultOf(done), AccountingOutcome.ANSWERED)

    def test_boundedAttempts(self) -> None:
        """expect_response=False gives up after max_attempts with a log line."""
        accounting = self.accounting(expect_response=False, timeout=1.0, retry_interval=1.0)
        done = accounting.start(session())
        self.reactor.advance(1)
        self.reactor.advance(1)
        self.reactor.advance(1)
        self.assertEqual(self.successResultOf(done), AccountingOutcome.UNANSWERED)
        self.assertEqual(len(self.reactor.sent()), 2)
        self.assertTrue(any("giving up" in message for message in messages(self.events)))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_forCollector(self) -> None:
        """An SSO collector: one server, no answer expected, at most two sends."""
        collector = RadiusCollector(ACCT[0], ACCT[1], Secret(SECRET))
        accounting = RadiusAccounting.for_collector(self.client, collector, "mailgw-gw1")
        self.addCleanup(accounting.close)
        done = accounting.interim(session(calling_station_id="00:11:22:33:44:55"))
        self.reactor.pump([1] * 10)
        self.assertEqual(self.successResultOf(done), AccountingOutcome.UNANSWERED)
        requests = self.requests()
        self.assertEqual(len(requests), 2)
        self.assertEqual(requests[0]["Acct-Status-Type"], ["Interim-Update"])
        self.assertEqual(requests[0]["Calling-Station-Id"], ["00:11:22:33:44:55"])

    def test_forGroup(self) -> None:
        """An accounting group's servers and timeout; retried past the group's retries."""
        group = radius_group(("192.0.2.10", 1812), timeout=2.0, retries=0)
        accounting = RadiusAccounting.for_group(self.client, group, "mailgw-gw1")
        self.addCleanup(accounting.close)
        done = accounting.start(session())
        self.assertEqual(self.reactor.sent()[0][1], ("192.0.2.10", 1813))
        self.reactor.advance(2)
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.sent()), 2)
        self.ack()
        self.assertEqual(self.successResultOf(done), AccountingOutcome.ANSWERED)

    def test_stopNeverDropped(self) -> None:
        """A full queue drops the oldest Interim-Update, else Start, never a Stop."""
        accounting = self.accounting(max_queue=2, max_in_flight=1)
        first = accounting.start(session("s1"))  # in flight
        s2 = accounting.start(session("s2"))
        s3 = accounting.start(session("s3"))
        stop1 = accounting.stop(session("s1"))
        self.assertEqual(self.successResultOf(s2), AccountingOutcome.DROPPED)
        s4 = accounting.interim(session("s4"))
        self.assertEqual(self.successResultOf(s3), AccountingOutcome.DROPPED)
        stop5 = accounting.stop(session("s5"))
        self.assertEqual(self.successResultOf(s4), AccountingOutcome.DROPPED)
        stop6 = accounting.stop(session("s6"))
        s7 = accounting.start(session("s7"))
        self.assertEqual(self.successResultOf(s7), AccountingOutcome.DROPPED)
        self.assertEqual(accounting.pending, 4)
        for d in (first, stop1, stop5, stop6):
            self.assertNoResult(d)
            self.ack()
            self.assertEqual(self.successResultOf(d), AccountingOutcome.ANSWERED)
        sent = [(r["Acct-Status-Type"][0], r["Acct-Session-Id"][0]) for r in self.requests()]
        self.assertEqual(sent, [("Start", "s1"), ("Stop", "s1"), ("Stop", "s5"), ("Stop", "s6")])

    def test_inFlightWindow(self) -> None:
        """At most max_in_flight records are outstanding at once."""
        accounting = self.accounting(max_in_flight=3)
        for n in range(10):
            accounting.start(session(f"s{n}"))
        self.assertEqual(len(self.reactor.sent()), 3)
        self.ack(0)
        self.assertEqual(len(self.reactor.sent()), 4)

    def test_sessionOrder(self) -> None:
        """A session's Stop waits until its Start is acknowledged; other sessions go ahead."""
        accounting = self.accounting(max_in_flight=5)
        start = accounting.start(session("s1"))
        stop = accounting.stop(session("s1"))
        other = accounting.start(session("s2"))
        sent = [(r["Acct-Status-Type"][0], r["Acct-Session-Id"][0]) for r in self.requests()]
        self.assertEqual(sent, [("Start", "s1"), ("Start", "s2")])
        self.ack(0)
        self.assertEqual(self.successResultOf(start), AccountingOutcome.ANSWERED)
        self.assertEqual(self.requests()[-1]["Acct-Status-Type"], ["Stop"])
        self.assertNoResult(stop)
        self.assertNoResult(other)

    def test_close(self) -> None:
        """Closing cancels pending records (logged) and leaves no timer."""
        accounting = self.accounting(max_in_flight=1)
        active = accounting.stop(session("s1"))
        queued = accounting.stop(session("s2"))
        accounting.close()
        self.assertEqual(self.successResultOf(active), AccountingOutcome.CANCELLED)
        self.assertEqual(self.successResultOf(queued), AccountingOutcome.CANCELLED)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.client.in_flight, 0)
        self.assertTrue(any("2 records undelivered, 2 of them Stop" in m for m in messages(self.events)))
        self.assertEqual(self.successResultOf(accounting.start(session())), AccountingOutcome.CANCELLED)

    def test_unencodable(self) -> None:
        """A record that cannot be encoded is dropped at once with an error, not retried."""
        accounting = self.accounting()
        done = accounting.start(session(user="u" * 300))
        self.assertEqual(self.successResultOf(done), AccountingOutcome.DROPPED)
        self.assertEqual(self.reactor.sent(), [])

    def test_terminateCause(self) -> None:
        """Terminate causes are checked against RFC 2866's list."""
        accounting = self.accounting()
        self.assertRaises(ValueError, accounting.stop, session(), "Bored")

    def test_noSecretsLogged(self) -> None:
        """The shared secret appears in no log event."""
        accounting = self.accounting(expect_response=False, timeout=1.0)
        accounting.stop(session())
        self.reactor.pump([1] * 5)
        self.assertTrue(len(self.events) >= 1)
        assert_no_secrets(self, self.events)


# -- against FreeRADIUS --------------------------------------------------------------------


class FreeRadiusTestCase(TestCase):
    """A FreeRADIUS instance with L{SECRET}, a client on the real reactor, log capture
    and, at cleanup, a check that no secret or password was logged."""

    timeout = 60

    def setUp(self) -> None:
        self.radius = self.start_radius()
        self.client = RadiusClient(reactor)
        self.addCleanup(self.client.close)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.addCleanup(lambda: assert_no_secrets(self, self.events))

    def start_radius(self) -> FreeRadius:
        return FreeRadius.started(self, secret=SECRET)

    @property
    def address(self) -> tuple[str, int]:
        return (self.radius.host, self.radius.auth_port)

    def checker(self, *servers: tuple[str, int], timeout: float = 2.0, retries: int = 0, **kw: Any) -> RadiusChecker:
        group = radius_group(*(servers or (self.address,)), timeout=timeout, retries=retries, **kw)
        return RadiusChecker(group, self.client, "mailgw-test")

    async def login(self, checker: RadiusChecker, user: str, password: str) -> AuthenticatedUser:
        result = await checker.requestAvatarId(UsernamePassword(user.encode(), password.encode()))
        assert isinstance(result, AuthenticatedUser)
        return result


class RadiusCheckerTests(FreeRadiusTestCase):
    async def test_accept(self) -> None:
        """alice and bob are accepted with their Class as text, in both forms."""
        checker = self.checker()
        alice = await self.login(checker, "alice", "alice-password")
        self.assertEqual(alice, AuthenticatedUser("alice", "corp-radius", radius_class="OU=Finance;"))
        bob = await self.login(checker, "bob", "bob-password")
        self.assertEqual(bob.radius_class, "Engineering")
        carol = await self.login(checker, "carol", "carol-password")
        self.assertIsNone(carol.radius_class)
        self.assertIn("Login OK: [alice]", self.radius.log_text())

    async def test_reject(self) -> None:
        """A wrong password and an unknown user are rejected."""
        checker = self.checker()
        with self.assertRaises(UnauthorizedLogin):
            await self.login(checker, "alice", "bob-password")
        with self.assertRaises(UnauthorizedLogin):
            await self.login(checker, "mallory", "alice-password")

    async def test_challenge(self) -> None:
        """dave's Access-Challenge is a refused login with the reason and prompt logged."""
        with self.assertRaises(UnauthorizedLogin) as raised:
            await self.login(self.checker(), "dave", "dave-password")
        self.assertIn("Access-Challenge", str(raised.exception))
        logged = [m for m in messages(self.events) if "Access-Challenge" in m]
        self.assertEqual(len(logged), 1)
        self.assertIn(CHALLENGE_PROMPT, logged[0])
        self.assertIn("dave", logged[0])

    async def test_failover(self) -> None:
        """With the first server silent, the second answers after timeout x (retries + 1)."""
        silent = silent_udp_port(self)
        checker = self.checker((silent.host, silent.port), self.address, timeout=0.3, retries=1)
        began = reactor.seconds()
        alice = await self.login(checker, "alice", "alice-password")
        elapsed = reactor.seconds() - began
        self.assertEqual(alice.radius_class, "OU=Finance;")
        self.assertGreaterEqual(elapsed, 0.6)
        self.assertLess(elapsed, 0.6 + 1.0)
        received = silent.wait_for_datagrams(2)
        self.assertEqual(len(received), 2)
        self.assertEqual(received[0], received[1])  # a retransmission: same identifier and authenticator

    async def test_rejectNoFailover(self) -> None:
        """After an explicit reject the next server is not asked."""
        silent = silent_udp_port(self)
        checker = self.checker(self.address, (silent.host, silent.port), timeout=0.3)
        with self.assertRaises(UnauthorizedLogin):
            await self.login(checker, "alice", "wrong")
        self.assertEqual(silent.received, [])

    async def test_allSilent(self) -> None:
        """No server answering is AAAUnavailable."""
        first, second = silent_udp_port(self), silent_udp_port(self)
        checker = self.checker((first.host, first.port), (second.host, second.port), timeout=0.2, retries=1)
        began = reactor.seconds()
        with self.assertRaises(AAAUnavailable):
            await self.login(checker, "alice", "alice-password")
        self.assertGreaterEqual(reactor.seconds() - began, 0.8)
        self.assertEqual(len(first.wait_for_datagrams(2)), 2)
        self.assertEqual(len(second.wait_for_datagrams(2)), 2)

    async def test_wrongSecret(self) -> None:
        """With a wrong shared secret nothing is accepted: FreeRADIUS drops the request (its
        Message-Authenticator fails) and the login is AAAUnavailable."""
        checker = self.checker(timeout=0.3, secret="not-the-secret")
        with self.assertRaises(AAAUnavailable):
            await self.login(checker, "alice", "alice-password")
        self.assertIn("Message-Authenticator", self.radius.log_text())

    async def test_noSecretsLogged(self) -> None:
        """Logins that succeed, fail, are challenged or time out log no password or secret."""
        checker = self.checker(timeout=0.3)
        await self.login(checker, "alice", "alice-password")
        for user, password in (("alice", "bob-password"), ("dave", "dave-password")):
            with self.assertRaises(UnauthorizedLogin):
                await self.login(checker, user, password)
        with self.assertRaises(AAAUnavailable):
            await self.login(self.checker(timeout=0.3, secret="wrong-" + SECRET), "carol", "carol-password")
        self.assertGreaterEqual(len(self.events), 3)
        assert_no_secrets(self, self.events, "wrong-" + SECRET)


class UnsignedFreeRadiusTests(FreeRadiusTestCase):
    """A FreeRADIUS that answers requests without a Message-Authenticator."""

    def start_radius(self) -> FreeRadius:
        return FreeRadius.started(self, secret=SECRET, require_message_authenticator=False)

    async def test_replyWithWrongSecretNotAccepted(self) -> None:
        """Replies signed with another secret fail verification and are dropped: a timeout,
        never an answer."""
        request = rp.AuthPacket(code=rp.AccessRequest, id=0, secret=b"not-the-secret", dict=self.client.dictionary)
        request["User-Name"] = "alice"
        request["User-Password"] = request.PwCrypt(b"alice-password")
        with self.assertRaises(RadiusTimeout):
            await self.client.send(self.address, request, 0.5, 0)
        self.assertTrue(any("fails verification" in message for message in messages(self.events)))
        self.assertIn("Login incorrect", self.radius.log_text())


class AuthorizeOnlyFreeRadius(FreeRadius):
    """FreeRADIUS configured to answer Authorize-Only for users it knows (with their reply
    attributes), the configuration L{RadiusChecker.authorize} documents."""

    RULE = """\
    if (&request:Service-Type == Authorize-Only && &control:Cleartext-Password) {
      update control {
        &Auth-Type := Accept
      }
    }
"""

    def _config(self) -> str:
        config = super()._config()
        anchor = "    pap\n  }\n  authenticate {"
        if anchor not in config:
            raise AssertionError("the FreeRADIUS fixture's authorize section changed")
        return config.replace(anchor, "    pap\n" + self.RULE + "  }\n  authenticate {", 1)


class AuthorizeTests(FreeRadiusTestCase):
    async def test_rejectedByDefault(self) -> None:
        """Out of the box FreeRADIUS rejects an Authorize-Only request (no credentials)."""
        with self.assertRaises(UnauthorizedLogin):
            await self.checker().authorize("alice")

    async def test_configuredServer(self) -> None:
        """A server configured for it accepts known users with their Class, rejects others."""
        radius = AuthorizeOnlyFreeRadius.started(self, secret=SECRET)
        checker = self.checker((radius.host, radius.auth_port))
        alice = await checker.authorize("alice")
        self.assertEqual(alice, AuthenticatedUser("alice", "corp-radius", radius_class="OU=Finance;"))
        self.assertEqual((await checker.authorize("bob")).radius_class, "Engineering")
        with self.assertRaises(UnauthorizedLogin):
            await checker.authorize("mallory")


class RadiusAccountingTests(FreeRadiusTestCase):
    def accounting(self, **kw: Any) -> RadiusAccounting:
        group = radius_group((self.radius.host, self.radius.acct_port - 1), timeout=1.0)
        accounting = RadiusAccounting.for_group(self.client, group, "mailgw-test", **kw)
        self.addCleanup(accounting.close)
        return accounting

    async def test_startStop(self) -> None:
        """Start and Stop reach FreeRADIUS with the same Acct-Session-Id, the session time,
        octets and Gigawords (byte counts beyond 4 GiB) and the terminate cause."""
        accounting = self.accounting()
        now = reactor.seconds()
        s = AccountingSession("gw1-0001", "alice", "198.51.100.7", now - 125.4)
        self.assertEqual(await accounting.start(s), AccountingOutcome.ANSWERED)
        ended = AccountingSession(
            "gw1-0001", "alice", "198.51.100.7", now - 125.4, bytes_in=5 * 2**32 + 1234, bytes_out=2 * 2**32
        )
        self.assertEqual(await accounting.stop(ended, TerminateCause.SESSION_TIMEOUT), AccountingOutcome.ANSWERED)
        start, stop = self.radius.accounting_records()
        self.assertEqual((start["Acct-Status-Type"], stop["Acct-Status-Type"]), ("Start", "Stop"))
        self.assertEqual(start["Acct-Session-Id"], "gw1-0001")
        self.assertEqual(stop["Acct-Session-Id"], "gw1-0001")
        for record in (start, stop):
            self.assertEqual(record["User-Name"], "alice")
            self.assertEqual(record["Framed-IP-Address"], "198.51.100.7")
            self.assertEqual(record["NAS-Identifier"], "mailgw-test")
            self.assertEqual(record["Acct-Delay-Time"], "0")
            self.assertIn("Event-Timestamp", record)
        self.assertIn(stop["Acct-Session-Time"], ("125", "126"))
        self.assertEqual(stop["Acct-Input-Octets"], "1234")
        self.assertEqual(stop["Acct-Input-Gigawords"], "5")
        self.assertEqual(stop["Acct-Output-Octets"], "0")
        self.assertEqual(stop["Acct-Output-Gigawords"], "2")
        self.assertEqual(stop["Acct-Terminate-Cause"], "Session-Timeout")
        self.assertNotIn("Acct-Terminate-Cause", start)

    async def test_terminateCauses(self) -> None:
        """Each terminate cause arrives by its RFC 2866 name."""
        accounting = self.accounting()
        causes = list(TerminateCause)
        for n, cause in enumerate(causes):
            self.assertEqual(await accounting.stop(session(f"c{n}"), cause), AccountingOutcome.ANSWERED)
        records = self.radius.accounting_records()
        self.assertEqual([r["Acct-Terminate-Cause"] for r in records], [c.value for c in causes])

    async def test_interimAndClass(self) -> None:
        """Interim-Update with Class and Calling-Station-Id (the SSO export's attributes)."""
        accounting = self.accounting()
        s = session("sso-1", calling_station_id="00:11:22:33:44:55", radius_class="OU=Finance;")
        self.assertEqual(await accounting.interim(s), AccountingOutcome.ANSWERED)
        (record,) = self.radius.accounting_records()
        self.assertEqual(record["Acct-Status-Type"], "Interim-Update")
        self.assertEqual(record["Calling-Station-Id"], "00:11:22:33:44:55")
        self.assertIn(record["Class"], ("OU=Finance;", "0x" + b"OU=Finance;".hex()))

    async def test_failover(self) -> None:
        """With the first accounting server silent, the second acknowledges."""
        silent = silent_udp_port(self)
        servers = [
            RadiusServer(silent.host, 1812, silent.port, Secret(SECRET)),
            RadiusServer(self.radius.host, self.radius.auth_port, self.radius.acct_port, Secret(SECRET)),
        ]
        accounting = RadiusAccounting(self.client, servers, "mailgw-test", timeout=0.3)
        self.addCleanup(accounting.close)
        self.assertEqual(await accounting.stop(session()), AccountingOutcome.ANSWERED)
        self.assertEqual(len(silent.wait_for_datagrams(1)), 1)
        self.assertEqual(len(self.radius.accounting_records()), 1)

    async def test_collectorNeverAnswers(self) -> None:
        """A collector that never answers gets a bounded number of sends, each a new packet
        with its Acct-Delay-Time, then a logged give-up."""
        silent = silent_udp_port(self)
        collector = RadiusCollector(silent.host, silent.port, Secret(SECRET))
        accounting = RadiusAccounting.for_collector(
            self.client, collector, "mailgw-test", timeout=0.2, retry_interval=0.1, max_attempts=3
        )
        self.addCleanup(accounting.close)
        self.assertEqual(await accounting.start(session()), AccountingOutcome.UNANSWERED)
        received = silent.wait_for_datagrams(3)
        self.assertEqual(len(received), 3)
        self.assertEqual(len({datagram[1] for datagram in received}), 3)  # new identifiers
        self.assertTrue(any("giving up" in message for message in messages(self.events)))
        self.assertEqual(accounting.pending, 0)

    async def test_wrongSecretRetried(self) -> None:
        """With a wrong secret FreeRADIUS drops the requests (bad Request Authenticator):
        the Stop stays pending, retried until answered, until the accounting is closed."""
        accounting = RadiusAccounting(
            self.client,
            [RadiusServer(self.radius.host, 1812, self.radius.acct_port, Secret("not-the-secret"))],
            "mailgw-test",
            timeout=0.2,
            retry_interval=0.1,
        )
        done = accounting.stop(session())
        deadline = reactor.seconds() + 10
        while sum("not acknowledged" in m for m in messages(self.events)) < 3 and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.05)
        self.assertEqual(sum("not acknowledged" in m for m in messages(self.events)), 3)
        self.assertFalse(done.called)
        self.assertEqual(self.radius.accounting_records(), [])
        accounting.close()
        self.assertEqual(await done, AccountingOutcome.CANCELLED)
