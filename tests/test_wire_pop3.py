"""Tests for :mod:`mailgw.wire.pop3`."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire import pop3
from mailgw.wire.errors import LineTooLong, ProtocolError
from mailgw.wire.lines import LineBuffer, TooLong
from mailgw.wire.pop3 import (
    MAX_COMMAND_LINE,
    MAX_RESPONSE_LINE,
    Command,
    MultiLineReader,
    Status,
    capa_response,
    continuation,
    err,
    format_command,
    ok,
    parse_capa,
    parse_command,
    parse_status,
    response_code,
)

from .test_wire_lines import split_at

_clean_char = st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r\n")
words = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r\n "),
    min_size=1,
    max_size=12,
)
texts = st.text(alphabet=_clean_char, max_size=60)
keywords = st.sampled_from(
    ["USER", "CAPA", "STLS", "AUTH", "QUIT", "STAT", "LIST", "RETR", "TOP", "UIDL", "NOOP", "XTND"]
)


@st.composite
def commands(draw: st.DrawFn) -> tuple[str, tuple[str, ...]]:
    """A keyword and arguments format_command can write."""
    if draw(st.booleans()):
        return "PASS", tuple(draw(st.lists(texts, max_size=1)))
    return draw(keywords), tuple(draw(st.lists(words, max_size=3)))


capability_names = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12).map(
    str.upper
)
capability_args = st.lists(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8),
    max_size=3,
)


class ParseCommandTests(SynchronousTestCase):
    """parse_command: what clients send the gateway."""

    cases: list[tuple[bytes, str, tuple[str, ...]]] = [
        (b"USER alice", "USER", ("alice",)),
        (b"user alice", "USER", ("alice",)),
        (b"CaPa", "CAPA", ()),
        (b"TOP 1 10", "TOP", ("1", "10")),
        (b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm", "AUTH", ("PLAIN", "AHRpbQB0YW5zdGFhZnRhbnN0YWFm")),
        (b"AUTH", "AUTH", ()),
        (b"USER j\xc3\xb6rg", "USER", ("jörg",)),
        # Runs of spaces and trailing spaces are tolerated.
        (b"STAT ", "STAT", ()),
        (b"TOP  1   10 ", "TOP", ("1", "10")),
        # PASS takes the whole rest of the line, spaces included.
        (b"PASS my secret pass", "PASS", ("my secret pass",)),
        (b"PASS  leading and trailing ", "PASS", (" leading and trailing ",)),
        (b"PASS ", "PASS", ("",)),
        (b"PASS", "PASS", ()),
        (b"pass p\xc3\xa4ss\tword", "PASS", ("päss\tword",)),
        (b"USER " + b"a" * (MAX_COMMAND_LINE - 7), "USER", ("a" * (MAX_COMMAND_LINE - 7),)),
    ]

    errors: list[bytes] = [
        b"",
        b" USER alice",
        b"US",
        b"USERS alice",
        b"US3R alice",
        b"US-R",
        b"\xffUSR",
        b"\xc3\xa9TAT",
        b"USER\talice",
        b"USER al\x00ice",
        b"USER alice\r",
        b"USER al\rice",
        b"USER al\nice",
        b"PASS pass\x00word",
        b"USER \xff",
        b"PASS \xc3",
        b"TOP 1 \xed\xa0\x80",
    ]

    def test_knownAnswers(self) -> None:
        """Each table line parses to its upper-cased keyword and arguments, keeping the raw line."""
        for line, name, args in self.cases:
            self.assertEqual(parse_command(line), Command(name, args, line), line)

    def test_errors(self) -> None:
        """Each table line raises ProtocolError."""
        for line in self.errors:
            self.assertRaises(ProtocolError, parse_command, line)

    def test_lineTooLong(self) -> None:
        """A line over 255 octets with its CRLF raises LineTooLong, a ProtocolError."""
        self.assertRaises(LineTooLong, parse_command, b"USER " + b"a" * (MAX_COMMAND_LINE - 6))
        self.assertRaises(LineTooLong, parse_command, b"PASS " + b"a" * 1000)
        self.assertTrue(issubclass(LineTooLong, ProtocolError))

    def test_reprHidesSecrets(self) -> None:
        """repr() of PASS and AUTH commands shows neither their arguments nor the raw line."""
        for line in [b"PASS hunter2", b"AUTH PLAIN aHVudGVyMg=="]:
            text = repr(parse_command(line))
            self.assertNotIn("hunter2", text)
            self.assertNotIn("aHVudGVyMg", text)
        self.assertIn("alice", repr(parse_command(b"USER alice")))

    @given(data=st.binary(max_size=300))
    def test_onlyProtocolError(self, data: bytes) -> None:
        """Arbitrary bytes parse or raise ProtocolError; a parsed name is 3-4 upper-case letters."""
        try:
            command = parse_command(data)
        except ProtocolError:
            return
        self.assertTrue(command.name.isascii() and command.name.isupper())
        self.assertIn(len(command.name), (3, 4))
        for arg in command.args:
            self.assertFalse(set(arg) & {"\x00", "\r", "\n"})

    @given(data=st.lists(st.sampled_from([b"USER", b"PASS", b" ", b"a", b"\xc3", b"\xa4", b"\r", b"\x00"])))
    def test_onlyProtocolErrorNearMisses(self, data: list[bytes]) -> None:
        """Near-valid lines parse or raise ProtocolError, never anything else."""
        try:
            parse_command(b"".join(data))
        except ProtocolError:
            pass


class FormatCommandTests(SynchronousTestCase):
    """format_command: what the gateway's login client sends a mail server."""

    def test_knownAnswers(self) -> None:
        """Commands are written as keyword, single-space-separated arguments, CRLF."""
        self.assertEqual(format_command("CAPA"), b"CAPA\r\n")
        self.assertEqual(format_command("USER", "alice"), b"USER alice\r\n")
        self.assertEqual(format_command("PASS", "two words"), b"PASS two words\r\n")
        self.assertEqual(format_command("auth", "PLAIN", "AGFsaWNlAHB3"), b"auth PLAIN AGFsaWNlAHB3\r\n")
        self.assertEqual(format_command("USER", "jörg"), b"USER j\xc3\xb6rg\r\n")

    def test_injectionRefused(self) -> None:
        """CR, LF or NUL in an argument, or a space outside PASS, raise ProtocolError."""
        for args in [("USER", "a\r\nDELE 1"), ("PASS", "pw\nQUIT"), ("PASS", "p\x00w"), ("USER", "a b"), ("USER", "")]:
            self.assertRaises(ProtocolError, format_command, *args)

    def test_tooLong(self) -> None:
        """A command over 255 octets raises LineTooLong."""
        self.assertRaises(LineTooLong, format_command, "PASS", "x" * 300)
        self.assertEqual(len(format_command("PASS", "x" * (MAX_COMMAND_LINE - 7))), MAX_COMMAND_LINE)

    def test_badKeyword(self) -> None:
        """A keyword that is not 3-4 ASCII letters, or two PASS arguments, is a ValueError."""
        for name in ["", "US", "USERS", "US3R", "ÜSER", "US R"]:
            self.assertRaises(ValueError, format_command, name)
        self.assertRaises(ValueError, format_command, "PASS", "a", "b")

    @given(command=commands())
    def test_roundTrip(self, command: tuple[str, tuple[str, ...]]) -> None:
        """format_command, framed by LineBuffer, parses back to the same command."""
        name, args = command
        try:
            line = format_command(name, *args)
        except LineTooLong:
            assume(False)
            return
        lines = LineBuffer(MAX_COMMAND_LINE).feed(line)
        self.assertEqual(len(lines), 1)
        raw = lines[0]
        assert isinstance(raw, bytes)
        self.assertEqual(parse_command(raw), Command(name, args, raw))

    @given(
        session=st.lists(commands(), max_size=8),
        points=st.lists(st.integers(0, 2000)),
    )
    def test_splitInvariance(self, session: list[tuple[str, tuple[str, ...]]], points: list[int]) -> None:
        """Pipelined commands split at any points parse to the same commands as in one read."""
        encoded = []
        for name, args in session:
            try:
                encoded.append(format_command(name, *args))
            except LineTooLong:
                pass
        data = b"".join(encoded)
        expected = [parse_command(line) for line in LineBuffer(MAX_COMMAND_LINE).feed(data) if isinstance(line, bytes)]
        self.assertEqual(len(expected), len(encoded))
        buffer = LineBuffer(MAX_COMMAND_LINE)
        parsed = []
        for chunk in split_at(data, points):
            for line in buffer.feed(chunk):
                assert isinstance(line, bytes)
                parsed.append(parse_command(line))
        self.assertEqual(parsed, expected)


class AnswerTests(SynchronousTestCase):
    """The answers the gateway sends clients."""

    def test_knownAnswers(self) -> None:
        """ok, err, continuation and capa_response produce exact wire bytes."""
        self.assertEqual(ok(), b"+OK\r\n")
        self.assertEqual(ok("mailgw ready"), b"+OK mailgw ready\r\n")
        self.assertEqual(err("no such command"), b"-ERR no such command\r\n")
        self.assertEqual(err("try later", code="SYS/TEMP"), b"-ERR [SYS/TEMP] try later\r\n")
        self.assertEqual(err("", code="AUTH"), b"-ERR [AUTH]\r\n")
        self.assertEqual(err(""), b"-ERR\r\n")
        self.assertEqual(continuation(), b"+ \r\n")
        self.assertEqual(continuation("VXNlcm5hbWU6"), b"+ VXNlcm5hbWU6\r\n")
        self.assertEqual(
            capa_response(["USER", "SASL PLAIN", "STLS", ".odd"]),
            b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\n..odd\r\n.\r\n",
        )
        self.assertEqual(capa_response([]), b"+OK Capability list follows\r\n.\r\n")

    def test_badText(self) -> None:
        """A line break or NUL in an answer, a bad response code, an empty capability or an
        over-long status line are programming errors (ValueError)."""
        self.assertRaises(ValueError, ok, "a\r\nb")
        self.assertRaises(ValueError, err, "a\nb")
        self.assertRaises(ValueError, err, "x", code="SYS TEMP")
        self.assertRaises(ValueError, err, "x", code="")
        self.assertRaises(ValueError, continuation, "a\r\n")
        self.assertRaises(ValueError, capa_response, ["USER\r\nSTLS"])
        self.assertRaises(ValueError, capa_response, [" "])
        self.assertRaises(ValueError, ok, "x" * MAX_RESPONSE_LINE)

    @given(text=texts)
    def test_okErrRoundTrip(self, text: str) -> None:
        """ok and err answers parse back to their status and text."""
        self.assertEqual(parse_status(ok(text)[:-2]), Status(ok=True, text=text))
        self.assertEqual(parse_status(err(text)[:-2]), Status(ok=False, text=text))

    @given(
        levels=st.lists(
            st.text(
                alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/]"),
                min_size=1,
                max_size=6,
            ),
            min_size=1,
            max_size=3,
        ),
        text=texts,
    )
    def test_responseCodeRoundTrip(self, levels: list[str], text: str) -> None:
        """err with a response code parses back to that code, upper-cased."""
        code = "/".join(levels)
        status = parse_status(err(text, code=code)[:-2])
        self.assertFalse(status.ok)
        self.assertEqual(status.code, code.upper())

    @given(capabilities=st.dictionaries(capability_names, capability_args, max_size=8))
    def test_capaRoundTrip(self, capabilities: dict[str, list[str]]) -> None:
        """capa_response, framed and read by MultiLineReader and parse_capa, gives the map back."""
        data = capa_response(" ".join([name, *args]) for name, args in capabilities.items())
        lines = LineBuffer(MAX_RESPONSE_LINE).feed(data)
        first = lines[0]
        assert isinstance(first, bytes)
        self.assertTrue(parse_status(first).ok)
        reader = MultiLineReader()
        finished = [reader.feed(line) for line in lines[1:]]
        self.assertEqual(finished, [False] * len(capabilities) + [True])
        self.assertEqual(
            parse_capa(reader.lines),
            {name: tuple(args) for name, args in capabilities.items()},
        )


class ParseStatusTests(SynchronousTestCase):
    """parse_status: what a mail server answers the gateway."""

    cases: list[tuple[bytes, Status]] = [
        (b"+OK", Status(ok=True, text="")),
        (b"+OK Dovecot ready.", Status(ok=True, text="Dovecot ready.")),
        (b"+ok lower case", Status(ok=True, text="lower case")),
        (b"+OK  two spaces", Status(ok=True, text=" two spaces")),
        (b"-ERR", Status(ok=False, text="")),
        (b"-ERR [AUTH] Authentication failed.", Status(ok=False, text="[AUTH] Authentication failed.")),
        (b"-err [IN-USE] locked", Status(ok=False, text="[IN-USE] locked")),
        (b"+ ", Status(ok=False, text="", continuation=True)),
        (b"+", Status(ok=False, text="", continuation=True)),
        (b"+ VXNlcm5hbWU6", Status(ok=False, text="VXNlcm5hbWU6", continuation=True)),
        (b"+OK Gr\xfc\xdfe", Status(ok=True, text="Gr\ufffd\ufffde")),
    ]

    errors: list[bytes] = [
        b"",
        b"OK",
        b"+OKAY",
        b"-ERROR",
        b"-",
        b"* OK IMAP",
        b"220 smtp",
        b"+\tx",
        b"+OK\tx",
        b"\x00",
    ]

    def test_knownAnswers(self) -> None:
        """Each table line parses to its Status."""
        for line, expected in self.cases:
            self.assertEqual(parse_status(line), expected, line)

    def test_errors(self) -> None:
        """Each table line raises ProtocolError."""
        for line in self.errors:
            self.assertRaises(ProtocolError, parse_status, line)

    def test_codes(self) -> None:
        """Status.code gives the RFC 2449/3206 response code; never for a continuation."""
        self.assertEqual(parse_status(b"-ERR [SYS/TEMP] busy").code, "SYS/TEMP")
        self.assertEqual(parse_status(b"-ERR [auth] bad").code, "AUTH")
        self.assertIsNone(parse_status(b"-ERR bad").code)
        self.assertIsNone(parse_status(b"+ [AUTH]").code)

    def test_responseCodeKnownAnswers(self) -> None:
        """response_code reads only a well-formed code at the start of the text."""
        cases: list[tuple[str, str | None]] = [
            ("[SYS/TEMP] try later", "SYS/TEMP"),
            ("[SYS/PERM]", "SYS/PERM"),
            ("[IN-USE] maildrop locked", "IN-USE"),
            ("[LOGIN-DELAY] wait", "LOGIN-DELAY"),
            ("[auth]", "AUTH"),
            ("[sys/temp]", "SYS/TEMP"),
            ("[a/b/c] x", "A/B/C"),
            ("no code", None),
            (" [AUTH] late", None),
            ("[] empty", None),
            ("[SYS/] half", None),
            ("[/TEMP] half", None),
            ("[SYS TEMP] space", None),
            ("[AUTH", None),
            ("", None),
        ]
        for text, expected in cases:
            self.assertEqual(response_code(text), expected, text)

    @given(data=st.binary(max_size=100))
    def test_onlyProtocolError(self, data: bytes) -> None:
        """Arbitrary bytes parse or raise ProtocolError; ok and continuation never both hold."""
        try:
            status = parse_status(data)
        except ProtocolError:
            return
        self.assertFalse(status.ok and status.continuation)
        self.assertIsInstance(status.code, (str, type(None)))

    @given(text=st.text(max_size=40))
    def test_responseCodeNeverRaises(self, text: str) -> None:
        """response_code accepts any text."""
        code = response_code(text)
        if code is not None:
            self.assertTrue(all(code.split("/")))
            self.assertTrue(text.startswith("["))


class CapaTests(SynchronousTestCase):
    """parse_capa and MultiLineReader on real servers' CAPA answers."""

    def test_dovecot(self) -> None:
        """A Dovecot CAPA answer, dot-terminated, gives its capabilities and arguments."""
        answer = (
            b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
            b"STLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
        )
        lines = LineBuffer(MAX_RESPONSE_LINE).feed(answer)
        self.assertEqual(lines[0], b"+OK")
        reader = MultiLineReader()
        for line in lines[1:-1]:
            self.assertFalse(reader.feed(line))
        self.assertTrue(reader.feed(lines[-1]))
        self.assertTrue(reader.done)
        self.assertEqual(
            parse_capa(reader.lines),
            {
                "CAPA": (),
                "TOP": (),
                "UIDL": (),
                "RESP-CODES": (),
                "PIPELINING": (),
                "AUTH-RESP-CODE": (),
                "STLS": (),
                "USER": (),
                "SASL": ("PLAIN", "LOGIN"),
            },
        )

    def test_parseCapaDetails(self) -> None:
        """Names are upper-cased, arguments kept, blank lines skipped, the last repeat wins."""
        capabilities = parse_capa(
            [
                b"sasl PLAIN  LOGIN",
                b"",
                b"  ",
                b"IMPLEMENTATION Cyrus POP3 v3",
                b"EXPIRE 31 USER",
                b"EXPIRE NEVER",
                b"UTF8 USER",
            ]
        )
        self.assertEqual(
            capabilities,
            {
                "SASL": ("PLAIN", "LOGIN"),
                "IMPLEMENTATION": ("Cyrus", "POP3", "v3"),
                "EXPIRE": ("NEVER",),
                "UTF8": ("USER",),
            },
        )

    def test_parseCapaBadName(self) -> None:
        """A capability name outside printable ASCII raises ProtocolError."""
        for line in [b"\xffSTLS", b"ST\x00LS", b"\tSTLS"]:
            self.assertRaises(ProtocolError, parse_capa, [line])

    def test_dotStuffing(self) -> None:
        """MultiLineReader removes one leading dot; '.' alone ends the answer."""
        reader = MultiLineReader()
        for line in [b"..hidden", b"...", b"plain", b". x"]:
            self.assertFalse(reader.feed(line))
        self.assertTrue(reader.feed(b"."))
        self.assertEqual(reader.lines, [b".hidden", b"..", b"plain", b" x"])

    def test_readerLimits(self) -> None:
        """Beyond max_lines, ProtocolError; a TooLong marker raises LineTooLong; feeding a
        finished reader is a ValueError."""
        reader = MultiLineReader(max_lines=2)
        reader.feed(b"a")
        reader.feed(b"b")
        self.assertRaises(ProtocolError, reader.feed, b"c")
        self.assertRaises(LineTooLong, MultiLineReader().feed, TooLong(512))
        done = MultiLineReader()
        done.feed(b".")
        self.assertRaises(ValueError, done.feed, b"x")

    def test_readerLinesIsCopy(self) -> None:
        """Changing the list returned by lines does not change the reader."""
        reader = MultiLineReader()
        reader.feed(b"a")
        reader.lines.append(b"b")
        self.assertEqual(reader.lines, [b"a"])

    @given(lines=st.lists(st.binary(max_size=30), max_size=20))
    def test_onlyProtocolError(self, lines: list[bytes]) -> None:
        """Arbitrary lines through MultiLineReader and parse_capa raise only ProtocolError."""
        reader = MultiLineReader(max_lines=10)
        try:
            for line in lines:
                if reader.feed(line):
                    break
            parse_capa(reader.lines)
        except ProtocolError:
            pass

    @given(
        answer=st.dictionaries(capability_names, capability_args, max_size=6),
        points=st.lists(st.integers(0, 400)),
    )
    def test_splitInvariance(self, answer: dict[str, list[str]], points: list[int]) -> None:
        """A CAPA answer split at any points is read to the same capabilities."""
        data = capa_response(" ".join([name, *args]) for name, args in answer.items())
        buffer = LineBuffer(MAX_RESPONSE_LINE)
        reader = MultiLineReader()
        status = None
        for chunk in split_at(data, points):
            for line in buffer.feed(chunk):
                assert isinstance(line, bytes)
                if status is None:
                    status = parse_status(line)
                else:
                    reader.feed(line)
        self.assertTrue(reader.done)
        self.assertEqual(parse_capa(reader.lines), {n: tuple(a) for n, a in answer.items()})


class ModuleTests(SynchronousTestCase):
    """The module's constants and purity."""

    def test_constants(self) -> None:
        """RFC 2449 limits: 255-octet commands, 512-octet responses, CRLF included."""
        self.assertEqual(MAX_COMMAND_LINE, 255)
        self.assertEqual(MAX_RESPONSE_LINE, 512)
        self.assertEqual(pop3.REST_OF_LINE_COMMANDS, frozenset({"PASS"}))

    def test_pure(self) -> None:
        """The wire modules import nothing from twisted.internet."""
        import ast
        import pathlib

        import mailgw.wire

        for path in pathlib.Path(mailgw.wire.__file__).parent.glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                for name in names:
                    self.assertFalse(name.startswith("twisted"), f"{path.name} imports {name}")
