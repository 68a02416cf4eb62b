"""Tests for :mod:`mailgw.wire.forwarding`: xtext, the value checks, the XCLIENT and
IMAP ID lines that tell a mail server who the real client is [4.7]."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire import imap4
from mailgw.wire.errors import ProtocolError
from mailgw.wire.forwarding import (
    GATEWAY_ID_FIELDS,
    MAX_ID_PAIRS,
    POP3_XCLIENT_LIMIT,
    SMTP_XCLIENT_LIMIT,
    ClientOrigin,
    client_id_fields,
    format_id,
    id_fields,
    normalise_address,
    pop3_xclient,
    smtp_xclient,
    valid_helo,
    valid_login,
    valid_port,
    valid_session_id,
    xclient_lines,
    xtext_decode,
    xtext_encode,
)

any_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=80)
# Text made of what an attacker would try: separators, quotes, line ends, NUL, '=' and '+'.
hostile_text = st.text(alphabet=st.sampled_from(list(' \r\n\x00"\\=+()[]{}*%:.aAzZ09-_@\x7f\u00e9\u2028')), max_size=40)
hostile = st.one_of(any_text, hostile_text)
# Mostly real addresses (else most examples end at "no valid address"), some hostile.
addresses = st.one_of(st.ip_addresses().map(str), st.ip_addresses().map(str), hostile)

ORIGIN = ClientOrigin(
    address="192.0.2.7",
    port=40001,
    local_address="198.51.100.1",
    local_port=993,
    session_id="5f2c9a0b1d3e",
    helo="client.example.net",
    login="alice@example.com",
)

#: printable ASCII without a space or '=': what an xtext value may hold
_XTEXT_VALUE = re.compile(rb"[!-<>-~]*")


def id_command_fields(line: bytes) -> tuple[str | None, ...] | None:
    """The fields of an ID command line as the gateway's own IMAP parser reads them."""
    reader = imap4.CommandReader()
    reader.append(line)
    event = reader.next_event()
    assert isinstance(event, imap4.Command), event
    assert reader.next_event() is None
    assert event.name == "ID"
    params = event.args[0]
    assert params is None or isinstance(params, tuple)
    return params  # type: ignore[return-value]


class XtextTests(SynchronousTestCase):
    """xtext (RFC 3461 section 4)."""

    def test_knownAnswers(self) -> None:
        """Printable ASCII but '+' and '=' stays; the rest is +XX of the UTF-8 octets."""
        cases = [
            ("", ""),
            ("alice@example.com", "alice@example.com"),
            ("[UNAVAILABLE]", "[UNAVAILABLE]"),
            ("a b", "a+20b"),
            ("a=b+c", "a+3Db+2Bc"),
            ("x\r\nQUIT\x00", "x+0D+0AQUIT+00"),
            ("é", "+C3+A9"),
            ("~!", "~!"),
        ]
        for value, encoded in cases:
            self.assertEqual(xtext_encode(value), encoded, value)
            self.assertEqual(xtext_decode(encoded), value.encode("utf-8"), value)

    @given(any_text)
    def test_roundTrip(self, value: str) -> None:
        """Decoding an encoded value gives its UTF-8 octets back."""
        self.assertEqual(xtext_decode(xtext_encode(value)), value.encode("utf-8"))

    @given(hostile)
    def test_encodedIsOneAttributeValue(self, value: str) -> None:
        """An encoded value is printable ASCII without a space or '=': it can neither
        end the command nor start another attribute."""
        self.assertTrue(_XTEXT_VALUE.fullmatch(xtext_encode(value).encode("ascii")))

    @given(st.text(max_size=20))
    def test_decodeRaisesOnlyProtocolError(self, text: str) -> None:
        """Arbitrary text decodes or raises ProtocolError, nothing else."""
        try:
            xtext_decode(text)
        except ProtocolError:
            pass

    def test_decodeRefuses(self) -> None:
        """Spaces, '=', a bad or lower-case escape, non-ASCII are not xtext."""
        for text in ("a b", "a=b", "+4", "+zz", "+0a", "é", "+"):
            self.assertRaises(ProtocolError, xtext_decode, text)


class ValueCheckTests(SynchronousTestCase):
    """The checks every forwarded value passes."""

    def test_addresses(self) -> None:
        """IP addresses are normalised; mapped IPv6 becomes IPv4; the rest is refused."""
        self.assertEqual(normalise_address("192.0.2.7"), "192.0.2.7")
        self.assertEqual(normalise_address("2001:DB8:0:0::1"), "2001:db8::1")
        self.assertEqual(normalise_address("::ffff:192.0.2.7"), "192.0.2.7")
        for bad in ("", "localhost", "192.0.2.7 ", "192.0.2.7\r\n", "1.2.3.4 PORT=1", "fe80::1%eth0", "[::1]"):
            self.assertIsNone(normalise_address(bad), bad)

    def test_ports(self) -> None:
        """1..65535 only."""
        self.assertEqual(valid_port(1), 1)
        self.assertEqual(valid_port(65535), 65535)
        for bad in (0, -1, 65536, True, "110"):
            self.assertIsNone(valid_port(bad), bad)

    def test_sessionIds(self) -> None:
        """1..64 letters, digits, '.', '-', '_'."""
        self.assertEqual(valid_session_id("5f2c9a0b1d3e"), "5f2c9a0b1d3e")
        for bad in ("", "a b", "a\r\n", "x" * 65, "a=b", "é"):
            self.assertIsNone(valid_session_id(bad), bad)

    def test_heloNames(self) -> None:
        """Domains and address literals pass; anything else does not."""
        for good in ("client.example.net", "localhost", "DESKTOP_7", "mx1.", "[192.0.2.7]", "[IPv6:2001:db8::1]"):
            self.assertEqual(valid_helo(good), good)
        for bad in ("", "a b", "a\r\nQUIT", "x=1", "[999.1.1.1]", "[IPv6:192.0.2.7]", "[2001:db8::1]",
                    "-a.example", "a..b", "é.example", "a" * 64, ".".join(["a"] * 130)):
            self.assertIsNone(valid_helo(bad), bad)

    def test_logins(self) -> None:
        """1..255 characters without control characters (spaces are xtext's job)."""
        for good in ("alice", "alice@example.com", "a b", "jörg"):
            self.assertEqual(valid_login(good), good)
        for bad in ("", "a\rb", "a\nb", "a\x00b", "a\x7fb", "a\u2028b", "x" * 256):
            self.assertIsNone(valid_login(bad), bad)


class XclientLinesTests(SynchronousTestCase):
    """xclient_lines: XCLIENT commands within the line limit."""

    def test_oneLine(self) -> None:
        """Attributes in order, values xtext-encoded."""
        self.assertEqual(
            xclient_lines([("ADDR", "192.0.2.7"), ("LOGIN", "a b")]), [b"XCLIENT ADDR=192.0.2.7 LOGIN=a+20b"]
        )
        self.assertEqual(xclient_lines([]), [])

    def test_split(self) -> None:
        """Attributes that do not fit one line go on to further XCLIENT commands."""
        lines = xclient_lines([("ADDR", "192.0.2.7"), ("LOGIN", "x" * 300), ("HELO", "h" * 200)], limit=512)
        self.assertEqual(lines, [b"XCLIENT ADDR=192.0.2.7 LOGIN=" + b"x" * 300, b"XCLIENT HELO=" + b"h" * 200])

    def test_refused(self) -> None:
        """A bad attribute name, or one attribute longer than a line, is a ValueError."""
        self.assertRaises(ValueError, xclient_lines, [("addr", "1")])
        self.assertRaises(ValueError, xclient_lines, [("AD DR", "1")])
        self.assertRaises(ValueError, xclient_lines, [("ADDR\r\n", "1")])
        self.assertRaises(ValueError, xclient_lines, [("LOGIN", "x" * 600)])

    @given(st.lists(st.tuples(st.sampled_from(["ADDR", "HELO", "LOGIN", "PORT"]), hostile), max_size=8))
    def test_linesWithinLimit(self, attributes: list[tuple[str, str]]) -> None:
        """Every line is at most the limit with CRLF, holds only printable ASCII, and
        the lines together carry exactly the attributes given, in order."""
        lines = xclient_lines(attributes, limit=SMTP_XCLIENT_LIMIT)
        carried = []
        for line in lines:
            self.assertLessEqual(len(line) + 2, SMTP_XCLIENT_LIMIT)
            self.assertTrue(re.fullmatch(rb"XCLIENT( [A-Z]+=[!-<>-~]*)+", line), line)
            for item in line.split(b" ")[1:]:
                name, _, value = item.partition(b"=")
                carried.append((name.decode(), xtext_decode(value.decode()).decode("utf-8")))
        self.assertEqual(carried, attributes)


class POP3XclientTests(SynchronousTestCase):
    """pop3_xclient: Dovecot's POP3 XCLIENT."""

    def test_knownAnswer(self) -> None:
        """ADDR, PORT and SESSION."""
        self.assertEqual(pop3_xclient(ORIGIN), b"XCLIENT ADDR=192.0.2.7 PORT=40001 SESSION=5f2c9a0b1d3e")

    def test_badValuesLeftOut(self) -> None:
        """A bad port or session id is left out; without an address there is no line."""
        origin = ClientOrigin("::ffff:192.0.2.7", 0, "", 0, "bad id\r\n")
        self.assertEqual(pop3_xclient(origin), b"XCLIENT ADDR=192.0.2.7")
        self.assertIsNone(pop3_xclient(ClientOrigin("192.0.2.7\r\nUSER x", 1, "", 0, "s")))

    @given(addresses, st.integers(-2, 70000), hostile)
    def test_hostileValues(self, address: str, port: int, session: str) -> None:
        """Whatever the values, the line is one short POP3 command with known
        attributes, no space inside a value, no CR/LF/NUL."""
        line = pop3_xclient(ClientOrigin(address, port, "", 0, session))
        if line is None:
            return
        self.assertLessEqual(len(line) + 2, POP3_XCLIENT_LIMIT)
        self.assertTrue(re.fullmatch(rb"XCLIENT ADDR=[0-9a-f.:]+( PORT=[0-9]+)?( SESSION=[A-Za-z0-9._-]+)?", line))


class SMTPXclientTests(SynchronousTestCase):
    """smtp_xclient: Postfix's and Dovecot's SMTP XCLIENT."""

    def test_postfix(self) -> None:
        """Postfix's attributes: NAME unavailable (no lookups), HELO and LOGIN from the
        session; PROTO and the rest it lists are not filled."""
        advertised = ("NAME", "ADDR", "PROTO", "HELO", "REVERSE_NAME", "PORT", "LOGIN", "DESTADDR", "DESTPORT")
        self.assertEqual(
            smtp_xclient(ORIGIN, advertised),
            [b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40001 HELO=client.example.net LOGIN=alice@example.com"],
        )

    def test_dovecot(self) -> None:
        """Dovecot's submission lists no NAME but SESSION; LOGIN is left out when the
        gateway authenticates upstream (Postfix would refuse the AUTH)."""
        advertised = ("ADDR", "PORT", "PROTO", "HELO", "LOGIN", "SESSION", "TTL", "TIMEOUT", "FORWARD")
        self.assertEqual(
            smtp_xclient(ORIGIN, advertised, login=False),
            [b"XCLIENT ADDR=192.0.2.7 PORT=40001 HELO=client.example.net SESSION=5f2c9a0b1d3e"],
        )

    def test_bareKeyword(self) -> None:
        """XCLIENT without a list: Postfix's classic set."""
        self.assertEqual(
            smtp_xclient(ORIGIN, ()),
            [b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40001 HELO=client.example.net LOGIN=alice@example.com"],
        )

    def test_ipv6AndBadValues(self) -> None:
        """IPv6 gets Postfix's IPV6: prefix; a bad HELO or login is [UNAVAILABLE]."""
        origin = ClientOrigin("2001:db8::7", 0, "", 0, "s", helo="bad helo\r\nRSET", login="a\x00b")
        self.assertEqual(
            smtp_xclient(origin, ("ADDR", "PORT", "HELO", "LOGIN")),
            [b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=[UNAVAILABLE] HELO=[UNAVAILABLE] LOGIN=[UNAVAILABLE]"],
        )

    def test_nothingWithoutAddress(self) -> None:
        """No valid address, or a server that does not take ADDR: no line."""
        self.assertEqual(smtp_xclient(ClientOrigin("evil", 1, "", 0, "s"), ()), [])
        self.assertEqual(smtp_xclient(ORIGIN, ("HELO", "LOGIN")), [])

    def test_loginIsXtext(self) -> None:
        """A login with spaces and '=' travels xtext-encoded."""
        origin = ClientOrigin("192.0.2.7", 1, "", 0, "s", login="evil user=x ADDR=6.6.6.6")
        (line,) = smtp_xclient(origin, ("ADDR", "LOGIN"))
        self.assertEqual(line, b"XCLIENT ADDR=192.0.2.7 LOGIN=evil+20user+3Dx+20ADDR+3D6.6.6.6")

    @given(addresses, st.integers(-2, 70000), hostile, hostile, hostile, st.booleans())
    def test_hostileValues(
        self, address: str, port: int, session: str, helo: str, login: str, with_login: bool
    ) -> None:
        """Whatever the session's values, the lines are SMTP commands within 512
        octets carrying each advertised attribute once, with ADDR an IP address."""
        origin = ClientOrigin(address, port, "", 0, session, helo=helo, login=login)
        lines = smtp_xclient(origin, ("NAME", "ADDR", "PORT", "HELO", "LOGIN", "SESSION"), login=with_login)
        names = []
        for line in lines:
            self.assertLessEqual(len(line) + 2, SMTP_XCLIENT_LIMIT)
            self.assertTrue(re.fullmatch(rb"XCLIENT( [A-Z]+=[!-<>-~]+)+", line), line)
            for item in line.split(b" ")[1:]:
                name, _, value = item.partition(b"=")
                names.append(name)
                if name == b"ADDR":
                    self.assertIsNotNone(normalise_address(value.decode().removeprefix("IPV6:")))
        if lines:
            expected = [b"NAME", b"ADDR", b"PORT", b"HELO", *([b"LOGIN"] if with_login else []), b"SESSION"]
            self.assertEqual(names, expected)


class IDTests(SynchronousTestCase):
    """The IMAP ID fields: the gateway's, then the client's."""

    def test_gatewayFields(self) -> None:
        """Dovecot's proxy fields, in order, from the origin."""
        self.assertEqual(
            id_fields(ORIGIN),
            [
                ("x-originating-ip", "192.0.2.7"),
                ("x-originating-port", "40001"),
                ("x-connected-ip", "198.51.100.1"),
                ("x-connected-port", "993"),
                ("x-session-id", "5f2c9a0b1d3e"),
            ],
        )
        self.assertEqual(tuple(name for name, _ in id_fields(ORIGIN)), GATEWAY_ID_FIELDS)

    def test_clientFieldsAfterGateway(self) -> None:
        """The client's fields follow the gateway's; its x- fields, bad strings, a
        repeated field and a dangling name are dropped; NIL values are kept."""
        client = (
            "name", "Thunderbird",
            "X-Originating-IP", "6.6.6.6",
            "x-forward-user", "root",
            "version", None,
            "os", 'Mac "OS" \\ X',
            "bad", "line\r\nbreak",
            "é", "x",
            "NAME", "again",
            "dangling",
        )
        origin = ClientOrigin("192.0.2.7", 1, "", 0, "s", client_id=client)
        fields = id_fields(origin)
        self.assertEqual(
            fields,
            [
                ("x-originating-ip", "192.0.2.7"),
                ("x-originating-port", "1"),
                ("x-session-id", "s"),
                ("name", "Thunderbird"),
                ("version", None),
                ("os", 'Mac "OS" \\ X'),
            ],
        )
        self.assertEqual(
            format_id("mgw2", fields),
            b'mgw2 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "1" "x-session-id" "s" '
            b'"name" "Thunderbird" "version" NIL "os" "Mac \\"OS\\" \\\\ X")\r\n',
        )

    def test_thirtyPairsAtMost(self) -> None:
        """The client's fields fill what the gateway's leave of RFC 2971's 30 pairs."""
        client = tuple(item for i in range(40) for item in (f"f{i}", "v"))
        fields = id_fields(ClientOrigin("192.0.2.7", 1, "192.0.2.1", 2, "s", client_id=client))
        self.assertEqual(len(fields), MAX_ID_PAIRS)
        self.assertEqual(fields[-1], ("f24", "v"))
        self.assertEqual(client_id_fields(client, room=2), [("f0", "v"), ("f1", "v")])

    def test_nothingWithoutAddress(self) -> None:
        """Without a valid client address nothing is sent (not even the client's)."""
        self.assertEqual(id_fields(ClientOrigin("", 1, "", 0, "s", client_id=("name", "x"))), [])

    def test_formatRefuses(self) -> None:
        """format_id never writes a CR, LF, NUL or non-ASCII, an over-long field or
        too many pairs: ValueError."""
        for fields in ([("a\r\n", "b")], [("a", "b\x00")], [("a", "é")], [("a" * 31, "b")], [("a", "b" * 1025)]):
            self.assertRaises(ValueError, format_id, "t", fields)
        self.assertRaises(ValueError, format_id, "t", [("a", "b")] * 31)
        self.assertRaises(ValueError, format_id, "t t", [("a", "b")])
        self.assertEqual(format_id("t", []), b"t ID NIL\r\n")

    @given(st.lists(st.one_of(st.none(), hostile), max_size=70), addresses, st.integers(-2, 70000), hostile)
    def test_hostileClientFields(self, client: list[str | None], address: str, port: int, session: str) -> None:
        """Whatever the client sent and whatever the session's values: one ID command
        line that the gateway's own IMAP parser reads back as the fields, the
        gateway's first, no client field named x-…, 30 pairs at most."""
        origin = ClientOrigin(address, port, "198.51.100.1", 993, session, client_id=tuple(client))
        fields = id_fields(origin)
        if not fields:
            return
        line = format_id("mgw2", fields)
        self.assertEqual(line.count(b"\r"), 1)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertNotIn(b"\x00", line)
        self.assertLessEqual(len(fields), MAX_ID_PAIRS)
        flat = tuple(item for pair in fields for item in pair)
        self.assertEqual(id_command_fields(line), flat)
        self.assertEqual(fields[0], ("x-originating-ip", normalise_address(address)))
        gateway = [name for name, _ in fields if name in GATEWAY_ID_FIELDS]
        self.assertEqual(gateway, [name for name, _ in fields[: len(gateway)]])
        for name, _ in fields[len(gateway) :]:
            self.assertFalse(name.lower().startswith("x-"), name)
