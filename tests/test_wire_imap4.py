"""Tests for :mod:`mailgw.wire.imap4`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire import imap4, sasl
from mailgw.wire.errors import ProtocolError
from mailgw.wire.imap4 import (
    MAX_LITERAL_SIZE,
    Atom,
    BadCommand,
    Command,
    CommandReader,
    Event,
    NeedContinuation,
    Response,
    TooBig,
    capability_line,
    continuation,
    format_authenticate_plain,
    format_login,
    id_response,
    parse_response,
    quote,
    tagged,
    untagged,
)
from mailgw.wire.lines import TooLong

from .test_wire_lines import split_at

#: Any text a client might use as a user name or password (no NUL, no lone surrogate).
credentials = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
tags = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='(){%*"\\+'),
    min_size=1,
    max_size=8,
)
#: Bytes near the syntax: literal markers, quotes, escapes, parentheses, line ends, NUL.
near_miss_bytes = st.lists(
    st.sampled_from(
        [
            b"a",
            b"A1",
            b" ",
            b"LOGIN",
            b"NOOP",
            b"ID",
            b"NIL",
            b'"',
            b"\\",
            b"(",
            b")",
            b"{",
            b"}",
            b"+",
            b"~",
            b"0",
            b"3",
            b"9",
            b"{2}",
            b"{3+}",
            b"{99999999999+}",
            b"{abc+}",
            b"\r\n",
            b"\n",
            b"\r",
            b"\x00",
            b"\xc3",
            b"\xa4",
            b"*",
        ]
    ),
    max_size=60,
).map(b"".join)


def drain(reader: CommandReader) -> list[Event]:
    """Pull every event the reader can produce now."""
    events: list[Event] = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


def events_for(data: bytes, **limits: int) -> list[Event]:
    """The events a fresh reader gives for ``data`` appended in one read."""
    reader = CommandReader(**limits)
    reader.append(data)
    return drain(reader)


def login(tag: str, user: str, password: str) -> Command:
    return Command(tag, "LOGIN", (user, password))


class CommandReaderKnownAnswerTests(SynchronousTestCase):
    """Tables of client input and the events it gives."""

    cases: list[tuple[bytes, list[Event]]] = [
        (b"a1 CAPABILITY\r\n", [Command("a1", "CAPABILITY", ())]),
        (b"a1 capability\r\n", [Command("a1", "CAPABILITY", ())]),
        (b"a1 NOOP\n", [Command("a1", "NOOP", ())]),
        (b"x LOGOUT\r\n", [Command("x", "LOGOUT", ())]),
        (b"]tag STARTTLS\r\n", [Command("]tag", "STARTTLS", ())]),
        # Pipelined commands in one read.
        (
            b"a CAPABILITY\r\nb NOOP\r\nc LOGOUT\r\n",
            [Command("a", "CAPABILITY", ()), Command("b", "NOOP", ()), Command("c", "LOGOUT", ())],
        ),
        # LOGIN with atoms, quoted strings, escapes, UTF-8 and literals.
        (b"a LOGIN alice secret\r\n", [login("a", "alice", "secret")]),
        (b'a LOGIN "alice" "se cret"\r\n', [login("a", "alice", "se cret")]),
        (b'a LOGIN "a\\"b" "c\\\\d"\r\n', [login("a", 'a"b', "c\\d")]),
        (b'a LOGIN "" ""\r\n', [login("a", "", "")]),
        (b'a LOGIN "j\xc3\xb6rg" p\xc3\xa4ss\r\n', [login("a", "jörg", "päss")]),
        (b"a LOGIN nil NIL\r\n", [login("a", "nil", "NIL")]),
        (
            b"a LOGIN {5}\r\nalice {2}\r\npw\r\n",
            [NeedContinuation("a"), NeedContinuation("a"), login("a", "alice", "pw")],
        ),
        (b'a LOGIN {5}\r\nalice "pw"\r\n', [NeedContinuation("a"), login("a", "alice", "pw")]),
        (b"a LOGIN {5+}\r\nalice {4+}\r\np\r\nw\r\n", [login("a", "alice", "p\r\nw")]),
        (b"a LOGIN {0}\r\n {0}\r\n\r\n", [NeedContinuation("a"), NeedContinuation("a"), login("a", "", "")]),
        (b"a LOGIN {005+}\r\nalice x\r\n", [login("a", "alice", "x")]),
        (b"a login alice  pw  \r\n", [login("a", "alice", "pw")]),
        # AUTHENTICATE, with and without SASL-IR.
        (b"a AUTHENTICATE PLAIN\r\n", [Command("a", "AUTHENTICATE", ("PLAIN",))]),
        (b"a authenticate plain =\r\n", [Command("a", "AUTHENTICATE", ("PLAIN", "="))]),
        (b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n", [Command("a", "AUTHENTICATE", ("PLAIN", "AGFsaWNlAHB3"))]),
        # ID.
        (b"a ID NIL\r\n", [Command("a", "ID", (None,))]),
        (b"a ID nil\r\n", [Command("a", "ID", (None,))]),
        (
            b'a ID ("name" "Thunderbird" "version" NIL)\r\n',
            [Command("a", "ID", (("name", "Thunderbird", "version", None),))],
        ),
        (b'a ID ("name" {3}\r\nx y)\r\n', [NeedContinuation("a"), Command("a", "ID", (("name", "x y"),))]),
        (b"a ID ()\r\n", [Command("a", "ID", ((),))]),
        # Generic commands: atoms, strings, nested lists, flags.
        (b"a SELECT INBOX\r\n", [Command("a", "SELECT", (Atom("INBOX"),))]),
        (b'a LIST "" *\r\n', [Command("a", "LIST", ("", Atom("*")))]),
        (b"a STORE 1 +FLAGS (\\Seen \\Deleted)\r\n", [Command("a", "STORE", ("1", "+FLAGS", ("\\Seen", "\\Deleted")))]),
        (b"a X (a (b ()) ) c\r\n", [Command("a", "X", (("a", ("b", ())), "c"))]),
        (b"a FETCH 1 BODY[HEADER]\r\n", [Command("a", "FETCH", ("1", "BODY[HEADER]"))]),
        (b"a ENABLE\r\n", [Command("a", "ENABLE", ())]),
        # Syntax errors: the tag is kept when it is valid.
        (b"\r\n", [BadCommand(None, "invalid tag")]),
        (b"* NOOP\r\n", [BadCommand(None, "invalid tag")]),
        (b"+ NOOP\r\n", [BadCommand(None, "invalid tag")]),
        (b"a+ NOOP\r\n", [BadCommand(None, "invalid tag")]),
        (b" a NOOP\r\n", [BadCommand(None, "invalid tag")]),
        (b"t\xc3\xa4g NOOP\r\n", [BadCommand(None, "invalid tag")]),
        (b"a\r\n", [BadCommand("a", "missing command name")]),
        (b"a \r\n", [BadCommand("a", "missing command name")]),
        (b"a (x)\r\n", [BadCommand("a", "missing command name")]),
        (b"a N\xc3\xb6OP\r\n", [BadCommand("a", "invalid command name")]),
        (b"a NOOP x\r\n", [BadCommand("a", "NOOP takes no arguments")]),
        (b"a CAPABILITY ()\r\n", [BadCommand("a", "CAPABILITY takes no arguments")]),
        (b"a LOGIN alice\r\n", [BadCommand("a", "LOGIN needs a user name and a password")]),
        (b"a LOGIN a b c\r\n", [BadCommand("a", "LOGIN needs a user name and a password")]),
        (b"a LOGIN (a) b\r\n", [BadCommand("a", "LOGIN needs a user name and a password")]),
        (
            b'a AUTHENTICATE "PLAIN"\r\n',
            [BadCommand("a", "AUTHENTICATE needs a mechanism and an optional initial response")],
        ),
        (b"a AUTHENTICATE\r\n", [BadCommand("a", "AUTHENTICATE needs a mechanism and an optional initial response")]),
        (b"a ID\r\n", [BadCommand("a", "ID needs one parameter list or NIL")]),
        (b'a ID ("name")\r\n', [BadCommand("a", "invalid ID parameter list")]),
        (b"a ID (NIL NIL)\r\n", [BadCommand("a", "invalid ID parameter list")]),
        (b'a ID ("n" ("x"))\r\n', [BadCommand("a", "invalid ID parameter list")]),
        (b'a ID ("' + b"n" * 31 + b'" "x")\r\n', [BadCommand("a", "ID field or value too long")]),
        (b'a LOGIN "alice pw\r\n', [BadCommand("a", "invalid quoted string")]),
        (b'a LOGIN "al\x00ice" pw\r\n', [BadCommand("a", "invalid quoted string")]),
        (b'a LOGIN "al\rice" pw\r\n', [BadCommand("a", "invalid quoted string")]),
        (b'a LOGIN "al\\ice" pw\r\n', [BadCommand("a", "invalid quoted string")]),
        (b'a LOGIN "alice""pw"\r\n', [BadCommand("a", "missing space between arguments")]),
        (b"a LOGIN alice\x00 pw\r\n", [BadCommand("a", "missing space between arguments")]),
        (b"a LOGIN al\tice pw\r\n", [BadCommand("a", "missing space between arguments")]),
        (b"a LOGIN alice {5} pw\r\n", [BadCommand("a", "invalid character in command")]),
        (b"a LOGIN \x00 pw\r\n", [BadCommand("a", "invalid character in command")]),
        (b"a LOGIN \xff pw\r\n", [BadCommand("a", "argument is not UTF-8")]),
        (b'a LOGIN "\xed\xa0\x80" pw\r\n', [BadCommand("a", "argument is not UTF-8")]),
        (b"a X (a\r\n", [BadCommand("a", "unbalanced parenthesis")]),
        (b"a X a)\r\n", [BadCommand("a", "unbalanced parenthesis")]),
        (b"a X " + b"(" * 17 + b")" * 17 + b"\r\n", [BadCommand("a", "lists nested too deeply")]),
        # A literal must start an argument; before a syntax error, no continuation is offered.
        (
            b"a LOGIN{5}\r\nb NOOP\r\n",
            [BadCommand("a", "a literal must follow a space or parenthesis"), Command("b", "NOOP", ())],
        ),
        (b"a {5}\r\nb NOOP\r\n", [BadCommand("a", "missing command name"), Command("b", "NOOP", ())]),
        (b"* LOGIN {5}\r\nb NOOP\r\n", [BadCommand(None, "invalid tag"), Command("b", "NOOP", ())]),
        # A bad literal comes out after it was read; the rest of the command is read past.
        (
            b"a LOGIN {2}\r\n\x00x pw\r\nb NOOP\r\n",
            [NeedContinuation("a"), BadCommand("a", "NUL in literal"), Command("b", "NOOP", ())],
        ),
        (
            b"a LOGIN {1+}\r\n\xff {2+}\r\npw\r\nb NOOP\r\n",
            [BadCommand("a", "argument is not UTF-8"), Command("b", "NOOP", ())],
        ),
    ]

    def test_knownAnswers(self) -> None:
        """Each table input gives its events, in one read and byte by byte."""
        for data, expected in self.cases:
            self.assertEqual(events_for(data), expected, data)
            reader = CommandReader()
            events = []
            for index in range(len(data)):
                reader.append(data[index : index + 1])
                events += drain(reader)
            self.assertEqual(events, expected, data)

    def test_atomsAreMarked(self) -> None:
        """Atoms come back as Atom, strings and literals as plain str; LOGIN and
        AUTHENTICATE arguments are plain str."""
        (command,) = events_for(b'a X atom "quoted" {3+}\r\nlit\r\n')
        assert isinstance(command, Command)
        self.assertEqual([type(arg) for arg in command.args], [Atom, str, str])
        self.assertEqual(repr(command.args[0]), "Atom('atom')")
        for data in [b"a LOGIN alice pw\r\n", b"a AUTHENTICATE plain =\r\n"]:
            (command,) = events_for(data)
            assert isinstance(command, Command)
            self.assertEqual([type(arg) for arg in command.args], [str, str])

    def test_reprHidesSecrets(self) -> None:
        """repr() of LOGIN and AUTHENTICATE commands does not show their arguments."""
        for data in [b"a LOGIN alice hunter2\r\n", b"a AUTHENTICATE PLAIN aHVudGVyMg==\r\n"]:
            (command,) = events_for(data)
            self.assertNotIn("hunter2", repr(command))
            self.assertNotIn("aHVudGVyMg", repr(command))
        (command,) = events_for(b"a SELECT INBOX\r\n")
        self.assertIn("INBOX", repr(command))

    def test_tooLong(self) -> None:
        """A line over max_line gives a TooLong marker; the reader resumes after its LF,
        also when the line came after a literal."""
        self.assertEqual(
            events_for(b"a NOOP " + b"x" * 100 + b"\r\nb NOOP\r\n", max_line=64),
            [TooLong(64), Command("b", "NOOP", ())],
        )
        self.assertEqual(
            events_for(b"a LOGIN {1}\r\nx " + b"y" * 100 + b"\r\nb NOOP\r\n", max_line=64),
            [NeedContinuation("a"), TooLong(64), Command("b", "NOOP", ())],
        )


class LiteralLimitTests(SynchronousTestCase):
    """Literal announcements the client controls: refused before anything is allocated."""

    def test_refusedSynchronizing(self) -> None:
        """A {n} too big gives TooBig with no continuation; the next line is a new command."""
        cases = [
            (b"{99999999999}", "literal too big"),
            (b"{4294967296}", "literal too big"),
            (b"{" + b"9" * 5000 + b"}", "literal too big"),
            (b"{2147483648}", "literal too big"),
            (b"{4294967295}", "literal too big"),
            (b"{65537}", "literal too big"),
            (b"{00000000000000065537}", "literal too big"),
        ]
        for marker, reason in cases:
            data = b"a LOGIN " + marker + b"\r\nb NOOP\r\n"
            self.assertEqual(events_for(data), [TooBig("a", reason), Command("b", "NOOP", ())], data)

    def test_invalidLiteralSyntax(self) -> None:
        """A {…} whose size is not ASCII digits is a BadCommand, not TooBig, with no
        continuation and nothing allocated; the next line is a new command.  So is a
        literal8 before login.  Without a valid tag the BadCommand has none."""
        cases = [
            b"{abc}",
            b"{-1}",
            b"{-100}",
            b"{ 5}",
            b"{5 }",
            b"{5x}",
            b"{x5}",
            b"{}",
            b"{5-}",
            b"{+5}",
            b"{\xd9\xa5}",  # an Arabic-Indic digit: not ASCII
            b"{0x10}",
        ]
        for marker in cases:
            data = b"a LOGIN " + marker + b"\r\nb NOOP\r\n"
            expected = [BadCommand("a", "invalid literal size"), Command("b", "NOOP", ())]
            self.assertEqual(events_for(data), expected, data)
            reader = CommandReader()
            reader.append(b"a LOGIN " + marker + b"\r\n")
            self.assertEqual(drain(reader), expected[:1])
            self.assertEqual(reader.buffered, 0)
            self.assertEqual(len(reader._literal), 0)
        self.assertEqual(
            events_for(b"a LOGIN ~{5}\r\nb NOOP\r\n"),
            [BadCommand("a", "literal8 not allowed before login"), Command("b", "NOOP", ())],
        )
        self.assertEqual(
            events_for(b"*x LOGIN {abc}\r\nb NOOP\r\n"),
            [BadCommand(None, "invalid literal size"), Command("b", "NOOP", ())],
        )

    def test_leadingZeros(self) -> None:
        """A size is a number: leading zeros are allowed and do not count against it."""
        self.assertEqual(
            events_for(b"a LOGIN {000000000000003+}\r\nabc pw\r\n"),
            [login("a", "abc", "pw")],
        )

    def test_limitBoundaries(self) -> None:
        """A literal of exactly max_literal octets is accepted, one more is refused."""
        self.assertEqual(
            events_for(b"a LOGIN {16+}\r\n" + b"u" * 16 + b" pw\r\n", max_literal=16),
            [login("a", "u" * 16, "pw")],
        )
        self.assertEqual(
            events_for(b"a LOGIN {17}\r\nb NOOP\r\n", max_literal=16),
            [TooBig("a", "literal too big"), Command("b", "NOOP", ())],
        )
        self.assertEqual(MAX_LITERAL_SIZE, 2**32 - 1)

    def test_refusedNonSynchronizingIsSkipped(self) -> None:
        """A refused {n+} with a valid size gives TooBig; its n octets and the rest of the
        command (further {m+} literals included) are skipped, then reading resumes."""
        junk = b"x LOGOUT\r\n" * 3
        data = b"a LOGIN {30+}\r\n" + junk + b" {4+}\r\ny\r\nz more\r\nb NOOP\r\n"
        self.assertEqual(events_for(data, max_literal=16), [TooBig("a", "literal too big"), Command("b", "NOOP", ())])
        data = b"a LOGIN ~{4+}\r\n\x00\x00\x00\x00\r\nb NOOP\r\n"
        self.assertEqual(
            events_for(data), [BadCommand("a", "literal8 not allowed before login"), Command("b", "NOOP", ())]
        )
        # A synchronizing literal in the rest of the command ends it: no data follows.
        data = b"a LOGIN {20+}\r\n" + b"z" * 20 + b" {3}\r\nb NOOP\r\n"
        self.assertEqual(events_for(data, max_literal=16), [TooBig("a", "literal too big"), Command("b", "NOOP", ())])

    def test_badSyntaxBeforeNonSynchronizingIsSkipped(self) -> None:
        """A syntax error before an acceptable {n+} gives BadCommand, and its octets are
        skipped, never read as commands."""
        data = b"* LOGIN {10+}\r\nc LOGOUT\r\n b\r\nd NOOP\r\n"
        self.assertEqual(events_for(data), [BadCommand(None, "invalid tag"), Command("d", "NOOP", ())])

    def test_unknownSizeNonSynchronizingIsFatal(self) -> None:
        """A {…+} whose size is not a valid number cannot be skipped: the event is fatal
        (BadCommand for invalid syntax, TooBig for a number over 4294967295), the reader
        stops and drops whatever follows."""
        cases = [
            (b"{abc+}", BadCommand, "invalid literal size"),
            (b"{-1+}", BadCommand, "invalid literal size"),
            (b"{5x+}", BadCommand, "invalid literal size"),
            (b"{ 5+}", BadCommand, "invalid literal size"),
            (b"{+}", BadCommand, "invalid literal size"),
            (b"{5++}", BadCommand, "invalid literal size"),
            (b"~{x+}", BadCommand, "literal8 not allowed before login"),
            (b"{99999999999+}", TooBig, "literal too big"),
            (b"{4294967296+}", TooBig, "literal too big"),
        ]
        for marker, kind, reason in cases:
            reader = CommandReader()
            reader.append(b"a LOGIN " + marker + b"\r\nb NOOP\r\n")
            event = reader.next_event()
            self.assertEqual(event, kind("a", reason, fatal=True), marker)
            self.assertTrue(reader.failed)
            reader.append(b"c NOOP\r\n" * 1000)
            self.assertIsNone(reader.next_event())
            self.assertEqual(reader.buffered, 0)
        # Also when found while skipping the rest of a refused command.
        events = events_for(b"a LOGIN {20+}\r\n" + b"z" * 20 + b" {abc+}\r\nb NOOP\r\n", max_literal=16)
        self.assertEqual(events, [TooBig("a", "literal too big"), BadCommand("a", "invalid literal size", fatal=True)])
        events = events_for(b"a LOGIN {20+}\r\n" + b"z" * 20 + b" {99999999999+}\r\nb NOOP\r\n", max_literal=16)
        self.assertEqual(events, [TooBig("a", "literal too big"), TooBig("a", "literal too big", fatal=True)])

    def test_maxCommand(self) -> None:
        """A command whose lines and literals exceed max_command gives TooBig; with a
        {n+} pending, its rest is skipped."""
        self.assertEqual(
            events_for(b"a LOGIN {20}\r\nb NOOP\r\n", max_command=30),
            [TooBig("a", "command too long"), Command("b", "NOOP", ())],
        )
        self.assertEqual(
            events_for(b"a X " + b"y" * 40 + b"\r\nb NOOP\r\n", max_command=30),
            [TooBig("a", "command too long"), Command("b", "NOOP", ())],
        )
        data = b"a X" + b" {0+}\r\n" * 20 + b"\r\nb NOOP\r\n"
        self.assertEqual(events_for(data, max_command=50), [TooBig("a", "command too long"), Command("b", "NOOP", ())])

    def test_twoGigabytesNotBuffered(self) -> None:
        """After a 2 GB {n+} announcement, megabytes of data leave nothing buffered: the
        octets are counted down, never stored."""
        reader = CommandReader()
        reader.append(b"a LOGIN {2147483648+}\r\n")
        self.assertEqual(drain(reader), [TooBig("a", "literal too big")])
        chunk = b"\x00" * 65536
        for _ in range(64):
            reader.append(chunk)
            self.assertEqual(drain(reader), [])
            self.assertEqual(reader.buffered, 0)
            self.assertEqual(len(reader._literal), 0)
            self.assertEqual(len(reader._lines.pending()), 0)

    def test_twoGigabytesSynchronizingNotBuffered(self) -> None:
        """After a refused 2 GB {n}, data sent anyway is framed as lines: over-long ones
        are dropped, so less than max_line stays buffered."""
        reader = CommandReader(max_line=1024)
        reader.append(b"a LOGIN {2147483648}\r\n")
        self.assertEqual(drain(reader), [TooBig("a", "literal too big")])
        for _ in range(64):
            reader.append(b"y" * 65536)
            self.assertTrue(all(event == TooLong(1024) for event in drain(reader)))
            self.assertLess(reader.buffered, 1024)

    def test_acceptedLiteralGrowsWithData(self) -> None:
        """An accepted literal's buffer grows only with the octets received, up to its size."""
        reader = CommandReader()
        reader.append(b"a LOGIN {60000}\r\n")
        self.assertEqual(drain(reader), [NeedContinuation("a")])
        self.assertEqual(len(reader._literal), 0)
        reader.append(b"u" * 1000)
        self.assertEqual(drain(reader), [])
        self.assertEqual(len(reader._literal), 1000)
        self.assertEqual(reader.buffered, 1000 + len(b"a LOGIN {60000}"))

    def test_manyLiteralsInOneRead(self) -> None:
        """Thousands of pipelined commands with literals in one read are all found, and the
        line framer never holds more than the line being read: literal octets are taken
        from the received bytes without copying what follows them (linear work)."""
        reader = CommandReader()
        reader.append(b"a X {0+}\r\n {1+}\r\nz\r\n" * 5000)
        count = 0
        while (event := reader.next_event()) is not None:
            self.assertEqual(event, Command("a", "X", ("", "z")))
            self.assertEqual(reader._lines.pending(), b"")
            count += 1
        self.assertEqual(count, 5000)
        self.assertEqual(reader.buffered, 0)

    @given(data=st.binary(max_size=2000), points=st.lists(st.integers(0, 2000), max_size=10))
    def test_bufferBounded(self, data: bytes, points: list[int]) -> None:
        """Whatever the input, once next_event returns None the reader holds less than
        max_line octets of line plus at most max_command octets of command."""
        reader = CommandReader(max_line=64, max_literal=100, max_command=200)
        for chunk in split_at(data, points):
            reader.append(chunk)
            drain(reader)
            self.assertLessEqual(reader.buffered, 64 + 200)
            self.assertLessEqual(len(reader._literal), 100)


class CommandReaderPropertyTests(SynchronousTestCase):
    """Properties over arbitrary input."""

    def check_events(self, events: list[Event]) -> None:
        for event in events:
            self.assertIsInstance(event, (Command, NeedContinuation, BadCommand, TooBig, TooLong))
            if isinstance(event, Command):
                self.assertTrue(event.name.isascii() and event.name == event.name.upper())
                self.assertTrue(imap4._TAG.fullmatch(event.tag.encode("ascii")))
            if isinstance(event, Command) and event.name == "LOGIN":
                for arg in event.args:
                    self.assertIsInstance(arg, str)
                    self.assertNotIn("\x00", arg)

    @given(data=st.binary(max_size=500))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """Arbitrary bytes give events, never an exception."""
        self.check_events(events_for(data + b"\r\n", max_literal=64))

    @given(data=near_miss_bytes)
    def test_nearMisses(self, data: bytes) -> None:
        """Near-valid input gives events, never an exception."""
        self.check_events(events_for(data, max_literal=8, max_line=40))

    @given(data=near_miss_bytes, points=st.lists(st.integers(0, 300), max_size=12))
    def test_splitInvarianceNearMisses(self, data: bytes, points: list[int]) -> None:
        """Near-valid input split at any points gives the same events as in one read."""
        expected = events_for(data, max_literal=8, max_line=40)
        reader = CommandReader(max_literal=8, max_line=40)
        events: list[Event] = []
        for chunk in split_at(data, points):
            reader.append(chunk)
            events += drain(reader)
        self.assertEqual(events, expected)

    @given(
        values=st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), min_size=2, max_size=2),
    )
    def test_quotedNeverCarriesControls(self, values: list[bytes]) -> None:
        """A LOGIN from quoted strings holding any bytes either parses with no CR, LF or NUL
        in the user or password, or is a BadCommand."""
        data = b"a LOGIN " + b" ".join(b'"' + value + b'"' for value in values) + b"\r\n"
        (event,) = events_for(data)
        if isinstance(event, Command):
            for arg in event.args:
                assert isinstance(arg, str)
                self.assertFalse(set(arg) & {"\x00", "\r", "\n"})
        else:
            self.assertIsInstance(event, BadCommand)


#: Above any literal sessions() sends except the refused ones (credentials are at most
#: 40 characters of at most 4 octets).
SESSION_MAX_LITERAL = 160


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, int]:
    """A client session mixing commands, literals of every kind and junk; returns the
    bytes and the number of LOGIN commands the reader must find."""
    parts: list[bytes] = []
    logins = 0
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 6))
        tag = draw(tags)
        if kind == 0:
            chunks = format_login(tag, draw(credentials), draw(credentials), literal_plus=draw(st.booleans()))
            parts.append(b"".join(chunks))
            logins += 1
        elif kind == 1:
            parts.append(tag.encode() + b" " + draw(st.sampled_from([b"NOOP", b"CAPABILITY", b"LOGOUT"])) + b"\r\n")
        elif kind == 2:
            fields = draw(
                st.dictionaries(st.text(max_size=5).filter(lambda s: "\x00" not in s), credentials, max_size=3)
            )
            items = b" ".join(quote(name) + b" " + quote(value) for name, value in fields.items())
            parts.append(tag.encode() + b" ID (" + items + b")\r\n")
        elif kind == 3:
            # A refused non-synchronizing literal, sent anyway, with pipelined text in it.
            size = draw(st.integers(SESSION_MAX_LITERAL + 1, 400))
            parts.append(tag.encode() + b" LOGIN {%d+}\r\n" % size + (b"z NOOP\r\n" * 50)[:size] + b" x\r\n")
        elif kind == 4:
            parts.append(tag.encode() + b" LOGIN {%d}\r\n" % draw(st.integers(SESSION_MAX_LITERAL + 1, 2**32 + 5)))
        elif kind == 5:
            # Junk, but no literal announcement: that would swallow the next command.
            parts.append(draw(st.binary(max_size=30)).replace(b"}", b"") + b"\r\n")
        else:
            parts.append(tag.encode() + b" AUTHENTICATE PLAIN " + sasl.encode_plain("u", "p") + b"\r\n")
    return b"".join(parts), logins


class RoundTripTests(SynchronousTestCase):
    """What the gateway writes, read back by the reader."""

    @given(tag=tags, user=credentials, password=credentials, literal_plus=st.booleans())
    def test_formatLoginRoundTrip(self, tag: str, user: str, password: str, literal_plus: bool) -> None:
        """format_login, sent chunk by chunk as a server's continuations allow, gives the
        same user and password back, whatever their characters."""
        chunks = format_login(tag, user, password, literal_plus=literal_plus)
        if literal_plus:
            self.assertEqual(len(chunks), 1)
        reader = CommandReader()
        for chunk in chunks[:-1]:
            reader.append(chunk)
            self.assertEqual(drain(reader), [NeedContinuation(tag)])
        reader.append(chunks[-1])
        self.assertEqual(drain(reader), [login(tag, user, password)])
        self.assertEqual(reader.take_rest(), b"")

    @given(session=sessions(), points=st.lists(st.integers(0, 3000), max_size=12))
    def test_splitInvarianceSessions(self, session: tuple[bytes, int], points: list[int]) -> None:
        """A session with pipelined commands and literals split at any points gives the
        same events as in one read, and every LOGIN is found."""
        data, logins = session
        expected = events_for(data, max_literal=SESSION_MAX_LITERAL)
        found = [e for e in expected if isinstance(e, Command) and e.name == "LOGIN"]
        self.assertEqual(len(found), logins)
        reader = CommandReader(max_literal=SESSION_MAX_LITERAL)
        events: list[Event] = []
        for chunk in split_at(data, points):
            reader.append(chunk)
            events += drain(reader)
        self.assertEqual(events, expected)

    @given(
        fields=st.dictionaries(
            st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=7),
            st.none() | credentials,
            max_size=5,
        )
    )
    def test_idRoundTrip(self, fields: dict[str, str | None]) -> None:
        """id_response's parameter list, sent back as a client's ID command, gives the
        same fields."""
        answer = id_response(fields)
        self.assertTrue(answer.startswith(b"* ID "))
        events = events_for(b"t ID " + answer[len(b"* ID ") :])
        command = events[-1]
        assert isinstance(command, Command)
        if not fields:
            self.assertEqual(command.args, (None,))
            return
        flat: list[str | None] = [item for pair in fields.items() for item in pair]
        self.assertEqual(command.args, (tuple(flat),))

    @given(text=credentials)
    def test_quoteRoundTrip(self, text: str) -> None:
        """quote() gives a string the reader parses back to the same text."""
        events = events_for(b"t X " + quote(text) + b"\r\n")
        command = events[-1]
        assert isinstance(command, Command)
        self.assertEqual(command.args, (text,))

    @given(user=credentials.filter(bool), password=credentials.filter(bool), sasl_ir=st.booleans())
    def test_authenticatePlainRoundTrip(self, user: str, password: str, sasl_ir: bool) -> None:
        """format_authenticate_plain, read as a client's AUTHENTICATE and its raw response
        line, decodes to the same credentials."""
        chunks = format_authenticate_plain("t", user, password, sasl_ir=sasl_ir)
        reader = CommandReader(max_line=16384)
        reader.append(b"".join(chunks))
        command = reader.next_event()
        assert isinstance(command, Command)
        self.assertEqual(command.name, "AUTHENTICATE")
        if sasl_ir:
            self.assertEqual(len(command.args), 2)
            response = command.args[1]
            assert isinstance(response, str)
            data = response.encode("ascii")
        else:
            self.assertEqual(command.args, ("PLAIN",))
            line = reader.next_raw_line()
            assert isinstance(line, bytes)
            data = line
        self.assertEqual(sasl.decode_plain(data), ("", user, password))


class ProxyFlowTests(SynchronousTestCase):
    """How a proxy drives the reader."""

    def test_loginWithSynchronizingLiteral(self) -> None:
        """``a LOGIN {5}``: NeedContinuation (the proxy sends ``+``); the literal and the rest
        of the line give the LOGIN; take_rest returns what was pipelined after it."""
        reader = CommandReader()
        reader.append(b"a LOGIN {5}\r\n")
        self.assertEqual(reader.next_event(), NeedContinuation("a"))
        self.assertIsNone(reader.next_event())
        reader.append(b"ali")
        self.assertIsNone(reader.next_event())
        reader.append(b'ce "pw"\r\nb SELECT INBOX\r\nc FE')
        self.assertEqual(reader.next_event(), login("a", "alice", "pw"))
        # Login succeeded: the rest is relayed unparsed.
        self.assertEqual(reader.take_rest(), b"b SELECT INBOX\r\nc FE")
        self.assertEqual(reader.buffered, 0)

    def test_pipelinedAcrossReads(self) -> None:
        """Commands split across reads, and several in one read, are all found in order."""
        reader = CommandReader()
        events: list[Event] = []
        for chunk in [b"a NO", b"OP\r\nb CAPABILITY\r\nc LOGIN {1+}\r\n", b"x y\r", b"\nd LOGOUT\r\n"]:
            reader.append(chunk)
            events += drain(reader)
        self.assertEqual(
            events,
            [
                Command("a", "NOOP", ()),
                Command("b", "CAPABILITY", ()),
                login("c", "x", "y"),
                Command("d", "LOGOUT", ()),
            ],
        )

    def test_authenticateRawLines(self) -> None:
        """After AUTHENTICATE, the client's response and its cancel ``*`` are raw lines."""
        reader = CommandReader()
        reader.append(b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHB3\r\nb AUTHENTICATE PLAIN\r\n*\r\n")
        self.assertEqual(reader.next_event(), Command("a", "AUTHENTICATE", ("PLAIN",)))
        self.assertEqual(reader.next_raw_line(), b"AGFsaWNlAHB3")
        self.assertEqual(reader.next_event(), Command("b", "AUTHENTICATE", ("PLAIN",)))
        self.assertEqual(reader.next_raw_line(), sasl.CANCEL)
        self.assertIsNone(reader.next_raw_line())
        reader = CommandReader(max_line=16)
        reader.append(b"x" * 40 + b"\r\n")
        self.assertEqual(reader.next_raw_line(), TooLong(16))

    def test_startTLSClear(self) -> None:
        """clear() drops what was pipelined after STARTTLS, including a literal in progress."""
        reader = CommandReader()
        reader.append(b"a STARTTLS\r\nb LOGIN {10}\r\nabc")
        self.assertEqual(reader.next_event(), Command("a", "STARTTLS", ()))
        self.assertEqual(reader.pending(), b"b LOGIN {10}\r\nabc")
        reader.clear()
        self.assertEqual(reader.buffered, 0)
        reader.append(b"c NOOP\r\n")
        self.assertEqual(drain(reader), [Command("c", "NOOP", ())])
        reader.append(b"d LOGIN {10}\r\nabc")
        drain(reader)
        reader.clear()
        reader.append(b"e NOOP\r\n")
        self.assertEqual(drain(reader), [Command("e", "NOOP", ())])

    def test_notBetweenCommands(self) -> None:
        """take_rest and next_raw_line in the middle of a command are ValueError."""
        reader = CommandReader()
        reader.append(b"a LOGIN {5}\r\nal")
        self.assertEqual(reader.next_event(), NeedContinuation("a"))
        self.assertRaises(ValueError, reader.take_rest)
        self.assertRaises(ValueError, reader.next_raw_line)

    def test_badLimits(self) -> None:
        """Unusable limits are a ValueError."""
        self.assertRaises(ValueError, CommandReader, max_line=0)
        self.assertRaises(ValueError, CommandReader, max_literal=-1)
        self.assertRaises(ValueError, CommandReader, max_command=0)

    def test_limitsAreParameters(self) -> None:
        """The line and literal limits are constructor parameters, with the module's
        defaults when not given."""
        reader = CommandReader()
        self.assertEqual((reader.max_line, reader.max_literal), (imap4.DEFAULT_MAX_LINE, imap4.DEFAULT_MAX_LITERAL))
        self.assertEqual((imap4.DEFAULT_MAX_LINE, imap4.DEFAULT_MAX_LITERAL), (8192, 64 * 1024))
        reader = CommandReader(max_line=100, max_literal=4096)
        self.assertEqual((reader.max_line, reader.max_literal), (100, 4096))
        reader.append(b"a LOGIN {4097}\r\nb LOGIN {4096}\r\n")
        self.assertEqual(drain(reader), [TooBig("a", "literal too big"), NeedContinuation("b")])


class AnswerTests(SynchronousTestCase):
    """The answers the gateway sends clients."""

    def test_knownAnswers(self) -> None:
        """tagged, untagged, continuation, capability_line, quote and id_response give exact bytes."""
        self.assertEqual(tagged("a1", "OK", "LOGIN completed"), b"a1 OK LOGIN completed\r\n")
        self.assertEqual(
            tagged("a1", "NO", "Login failed", "AUTHENTICATIONFAILED"),
            b"a1 NO [AUTHENTICATIONFAILED] Login failed\r\n",
        )
        self.assertEqual(
            tagged("a", "OK", "Logged in", "CAPABILITY IMAP4rev1 IDLE"),
            b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
        )
        self.assertEqual(tagged("a", "BAD", "Literal too big", "TOOBIG"), b"a BAD [TOOBIG] Literal too big\r\n")
        self.assertEqual(untagged("BAD Invalid tag"), b"* BAD Invalid tag\r\n")
        self.assertEqual(continuation(), b"+ \r\n")
        self.assertEqual(continuation("Ready for literal data"), b"+ Ready for literal data\r\n")
        self.assertEqual(
            capability_line(["IMAP4rev1", "STARTTLS", "LOGINDISABLED", "AUTH=PLAIN", "SASL-IR", "LITERAL+", "ID"]),
            b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN SASL-IR LITERAL+ ID\r\n",
        )
        self.assertEqual(quote("alice"), b'"alice"')
        self.assertEqual(quote(""), b'""')
        self.assertEqual(quote('a"b\\c'), b'"a\\"b\\\\c"')
        self.assertEqual(quote("j\xf6rg"), b"{5}\r\nj\xc3\xb6rg")
        self.assertEqual(quote("a\r\nb"), b"{4}\r\na\r\nb")
        self.assertEqual(id_response({"name": "mailgw", "version": None}), b'* ID ("name" "mailgw" "version" NIL)\r\n')
        self.assertEqual(id_response(None), b"* ID NIL\r\n")
        self.assertEqual(id_response({}), b"* ID NIL\r\n")

    def test_badArguments(self) -> None:
        """Bad tags, statuses, codes, texts and capability lists are ValueError."""
        self.assertRaises(ValueError, tagged, "a b", "OK", "x")
        self.assertRaises(ValueError, tagged, "*", "OK", "x")
        self.assertRaises(ValueError, tagged, "a+", "OK", "x")
        self.assertRaises(ValueError, tagged, "a", "PREAUTH", "x")
        self.assertRaises(ValueError, tagged, "a", "ok", "x")
        self.assertRaises(ValueError, tagged, "a", "OK", "")
        self.assertRaises(ValueError, tagged, "a", "OK", "x\r\na OK")
        self.assertRaises(ValueError, tagged, "a", "OK", "x", "BAD]CODE")
        self.assertRaises(ValueError, tagged, "a", "OK", "x", "")
        self.assertRaises(ValueError, tagged, "a", "OK", "[0] not a code")
        self.assertEqual(tagged("a", "OK", "[0] text", "ALERT"), b"a OK [ALERT] [0] text\r\n")
        self.assertRaises(ValueError, untagged, "")
        self.assertRaises(ValueError, untagged, "OK\n")
        self.assertRaises(ValueError, continuation, "x\x00")
        self.assertRaises(ValueError, capability_line, ["STARTTLS"])
        self.assertRaises(ValueError, capability_line, ["IMAP4rev1", "A B"])
        self.assertRaises(ValueError, capability_line, ["IMAP4rev1", ""])
        self.assertRaises(ValueError, quote, "a\x00b")
        self.assertRaises(ValueError, quote, "\ud800")
        self.assertRaises(ValueError, id_response, {str(i): "" for i in range(31)})
        self.assertRaises(ValueError, id_response, {"n" * 31: ""})
        self.assertRaises(ValueError, id_response, {"name": "v" * 1025})


class FormatLoginTests(SynchronousTestCase):
    """The gateway's LOGIN and AUTHENTICATE towards mail servers."""

    def test_knownAnswers(self) -> None:
        """Quoted strings when safe, literals ({n} in separate chunks, or {n+}) otherwise."""
        self.assertEqual(format_login("a1", "alice", "secret"), (b'a1 LOGIN "alice" "secret"\r\n',))
        self.assertEqual(format_login("a1", "", "two words"), (b'a1 LOGIN "" "two words"\r\n',))
        self.assertEqual(
            format_login("a1", "alice", 'p"w'),
            (b'a1 LOGIN "alice" {3}\r\n', b'p"w\r\n'),
        )
        self.assertEqual(
            format_login("a1", "j\xf6rg", "a\\b"),
            (b"a1 LOGIN {5}\r\n", b"j\xc3\xb6rg {3}\r\n", b"a\\b\r\n"),
        )
        self.assertEqual(
            format_login("a1", "j\xf6rg", "p\r\nw", literal_plus=True),
            (b"a1 LOGIN {5+}\r\nj\xc3\xb6rg {4+}\r\np\r\nw\r\n",),
        )
        self.assertEqual(format_login("a", "u", "\t"), (b'a LOGIN "u" {1}\r\n', b"\t\r\n"))
        self.assertEqual(format_login("a", "u", "x" * 1025)[0], b'a LOGIN "u" {1025}\r\n')

    def test_refused(self) -> None:
        """NUL or a lone surrogate raise ProtocolError; a bad tag is a ValueError."""
        self.assertRaises(ProtocolError, format_login, "a", "al\x00ice", "pw")
        self.assertRaises(ProtocolError, format_login, "a", "alice", "\x00")
        self.assertRaises(ProtocolError, format_login, "a", "alice", "\udc80")
        self.assertRaises(ValueError, format_login, "a b", "alice", "pw")
        self.assertRaises(ValueError, format_login, "", "alice", "pw")

    def test_authenticatePlain(self) -> None:
        """AUTHENTICATE PLAIN with the initial response (SASL-IR) or after a continuation."""
        self.assertEqual(
            format_authenticate_plain("a", "alice", "pw", sasl_ir=True),
            (b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n",),
        )
        self.assertEqual(
            format_authenticate_plain("a", "alice", "pw", sasl_ir=False),
            (b"a AUTHENTICATE PLAIN\r\n", b"AGFsaWNlAHB3\r\n"),
        )
        self.assertRaises(ProtocolError, format_authenticate_plain, "a", "al\x00ice", "pw", sasl_ir=True)
        self.assertRaises(ProtocolError, format_authenticate_plain, "a", "alice", "", sasl_ir=True)
        self.assertRaises(ValueError, format_authenticate_plain, "*", "alice", "pw", sasl_ir=True)


class ParseResponseTests(SynchronousTestCase):
    """parse_response: what a mail server answers the gateway."""

    dovecot_caps = (
        "IMAP4REV1",
        "SASL-IR",
        "LOGIN-REFERRALS",
        "ID",
        "ENABLE",
        "IDLE",
        "LITERAL+",
        "STARTTLS",
        "AUTH=PLAIN",
    )

    cases: list[tuple[bytes, Response]] = [
        (
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN]"
            b" Dovecot ready.",
            Response(
                tag="*",
                status="OK",
                code="CAPABILITY",
                code_args="IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN",
                text="Dovecot ready.",
                capabilities=dovecot_caps,
            ),
        ),
        (b"* OK IMAP4rev1 ready", Response(tag="*", status="OK", text="IMAP4rev1 ready")),
        (b"* ok [ALERT] hello", Response(tag="*", status="OK", code="ALERT", text="hello")),
        (b"* PREAUTH ready", Response(tag="*", status="PREAUTH", text="ready")),
        (b"* BYE shutting down", Response(tag="*", status="BYE", text="shutting down")),
        (
            b"* CAPABILITY IMAP4rev1 starttls AUTH=PLAIN",
            Response(
                tag="*",
                keyword="CAPABILITY",
                text="IMAP4rev1 starttls AUTH=PLAIN",
                capabilities=("IMAP4REV1", "STARTTLS", "AUTH=PLAIN"),
            ),
        ),
        (b"* CAPABILITY", Response(tag="*", keyword="CAPABILITY", capabilities=())),
        (b"* 3 EXISTS", Response(tag="*", keyword="3", text="EXISTS")),
        (b'* ID ("name" {7}', Response(tag="*", keyword="ID", text='("name" {7}', literal=7)),
        (b"+ Ready for literal data", Response(tag="+", text="Ready for literal data")),
        (b"+ ", Response(tag="+")),
        (b"+", Response(tag="+")),
        (b"+ VXNlcm5hbWU6", Response(tag="+", text="VXNlcm5hbWU6")),
        (
            b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in",
            Response(
                tag="a1",
                status="OK",
                code="CAPABILITY",
                code_args="IMAP4rev1 IDLE",
                text="Logged in",
                capabilities=("IMAP4REV1", "IDLE"),
            ),
        ),
        (
            b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.",
            Response(tag="a1", status="NO", code="AUTHENTICATIONFAILED", text="Authentication failed."),
        ),
        (b"a1 NO [UNAVAILABLE] try later", Response(tag="a1", status="NO", code="UNAVAILABLE", text="try later")),
        (b"a1 bad Error in IMAP command", Response(tag="a1", status="BAD", text="Error in IMAP command")),
        (b"a1 OK", Response(tag="a1", status="OK")),
        (b"a1 OK [ALERT]", Response(tag="a1", status="OK", code="ALERT")),
        (b"a1 OK [unclosed code", Response(tag="a1", status="OK", text="[unclosed code")),
        (b"a1 OK [] empty", Response(tag="a1", status="OK", text="[] empty")),
        (b"a1 OK Gr\xfc\xdfe", Response(tag="a1", status="OK", text="Gr\ufffd\ufffde")),
    ]

    errors: list[bytes] = [
        b"",
        b"*",
        b"* ",
        b"a1",
        b"a1 PREAUTH x",
        b"a1 BYE x",
        b"a1 FETCH x",
        b"a+ OK x",
        b"a(b OK x",
        b"+OK",
        b"a1 OK \x00",
        b"a1 OK x\r",
        b"220 smtp.example ESMTP",
    ]

    def test_knownAnswers(self) -> None:
        """Each table line parses to its Response."""
        for line, expected in self.cases:
            self.assertEqual(parse_response(line), expected, line)

    def test_errors(self) -> None:
        """Each table line raises ProtocolError."""
        for line in self.errors:
            self.assertRaises(ProtocolError, parse_response, line)

    def test_properties(self) -> None:
        """ok holds for OK and PREAUTH; continuation and untagged are told apart."""
        self.assertTrue(parse_response(b"a OK done").ok)
        self.assertTrue(parse_response(b"* PREAUTH x").ok)
        self.assertFalse(parse_response(b"a NO x").ok)
        self.assertFalse(parse_response(b"+ x").ok)
        self.assertTrue(parse_response(b"+ x").is_continuation)
        self.assertTrue(parse_response(b"* OK x").is_untagged)
        self.assertFalse(parse_response(b"a OK x").is_untagged)

    @given(tag=tags, status=st.sampled_from(["OK", "NO", "BAD"]), text=credentials.filter(lambda s: s.strip()))
    def test_taggedRoundTrip(self, tag: str, status: str, text: str) -> None:
        """tagged() parses back to its tag, status and text."""
        text = text.replace("\r", "").replace("\n", "").lstrip("[") or "x"
        response = parse_response(tagged(tag, status, text)[:-2])
        self.assertEqual((response.tag, response.status, response.text, response.code), (tag, status, text, None))

    @given(data=st.binary(max_size=200))
    def test_onlyProtocolError(self, data: bytes) -> None:
        """Arbitrary bytes parse or raise ProtocolError."""
        try:
            response = parse_response(data)
        except ProtocolError:
            return
        self.assertTrue(response.tag)
        self.assertFalse(response.is_continuation and response.status is not None)


class ModuleTests(SynchronousTestCase):
    """Exports."""

    def test_exports(self) -> None:
        """Every name in __all__ exists; TooLong is the line framer's marker."""
        for name in imap4.__all__:
            self.assertTrue(hasattr(imap4, name), name)
        self.assertIs(imap4.TooLong, TooLong)
