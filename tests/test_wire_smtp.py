"""Tests for :mod:`mailgw.wire.smtp`."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire import sasl, smtp
from mailgw.wire.errors import LineTooLong, ProtocolError
from mailgw.wire.lines import LineBuffer, TooLong
from mailgw.wire.smtp import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_REPLY_LINE,
    Command,
    Reply,
    ReplyReader,
    ehlo_reply,
    format_auth_plain,
    format_command,
    parse_auth,
    parse_command,
    parse_ehlo_keywords,
    reply,
)

from .test_wire_lines import split_at

_clean_char = st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r\n")
texts = st.text(alphabet=_clean_char, max_size=60)
credentials = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=40
)
codes = st.integers(2, 5).flatmap(
    lambda first: st.integers(0, 5).flatmap(
        lambda second: st.integers(0, 9).map(lambda third: first * 100 + second * 10 + third)
    )
)
keywords = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,10}", fullmatch=True)
params = st.lists(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8), max_size=3
)


class ParseCommandTests(SynchronousTestCase):
    """parse_command: what clients send the gateway."""

    cases: list[tuple[bytes, Command]] = [
        (b"EHLO client.example", Command("EHLO", "client.example")),
        (b"ehlo client.example", Command("EHLO", "client.example")),
        (b"HELO client", Command("HELO", "client")),
        (b"EHLO [192.0.2.1]", Command("EHLO", "[192.0.2.1]")),
        (b"EHLO [IPv6:2001:db8::1]", Command("EHLO", "[IPv6:2001:db8::1]")),
        (b"EHLO my_pc", Command("EHLO", "my_pc")),
        (b"EHLO  client.example  ", Command("EHLO", "client.example")),
        (b"EHLO b\xc3\xbccher.example", Command("EHLO", "bücher.example")),
        (b"STARTTLS", Command("STARTTLS", "")),
        (b"starttls ", Command("STARTTLS", "")),
        (b"AUTH PLAIN", Command("AUTH", "PLAIN")),
        (b"AUTH plain AGFsaWNlAHB3", Command("AUTH", "plain AGFsaWNlAHB3")),
        (b"AUTH PLAIN =", Command("AUTH", "PLAIN =")),
        (b"AUTH LOGIN", Command("AUTH", "LOGIN")),
        (b"AUTH LOGIN YWxpY2U=", Command("AUTH", "LOGIN YWxpY2U=")),
        (b"AUTH SCRAM-SHA-256", Command("AUTH", "SCRAM-SHA-256")),
        (b"MAIL FROM:<a@example.com> SIZE=100", Command("MAIL", "FROM:<a@example.com> SIZE=100")),
        (b"mail from:<>", Command("MAIL", "from:<>")),
        (b"RCPT TO:<b@example.com>", Command("RCPT", "TO:<b@example.com>")),
        (b"DATA", Command("DATA", "")),
        (b"RSET", Command("RSET", "")),
        (b"NOOP", Command("NOOP", "")),
        (b"NOOP anything goes", Command("NOOP", "anything goes")),
        (b"QUIT", Command("QUIT", "")),
        (b"VRFY alice", Command("VRFY", "alice")),
        (b"HELP", Command("HELP", "")),
        (b"HELP AUTH", Command("HELP", "AUTH")),
        (b"XCLIENT ADDR=192.0.2.1", Command("XCLIENT", "ADDR=192.0.2.1")),
        (b"BDAT 100 LAST", Command("BDAT", "100 LAST")),
        (b"VRFY " + b"a" * (MAX_COMMAND_LINE - 7), Command("VRFY", "a" * (MAX_COMMAND_LINE - 7))),
    ]

    errors: list[bytes] = [
        b"",
        b" EHLO x",
        b"-EHLO x",
        b"EH.LO x",
        b"3HLO x",
        b"EHLO",
        b"EHLO ",
        b"HELO a b",
        b"EHLO [192.0.2.1",
        b"EHLO a]b",
        b"EHLO a\tb",
        b"STARTTLS now",
        b"DATA x",
        b"RSET x",
        b"QUIT bye",
        b"AUTH",
        b"AUTH ",
        b"AUTH PLAIN a b",
        b"AUTH PL@IN",
        b"AUTH " + b"A" * 21,
        b"AUTH PLAIN !!!!",
        b"AUTH PLAIN AGFs=aWNl",
        b"MAIL <a@example.com>",
        b"RCPT <b@example.com>",
        b"NOOP \x00",
        b"NOOP a\rb",
        b"NOOP a\nb",
        b"VRFY \xff",
        b"\xffEHLO x",
        b"EHLO\tx",
    ]

    def test_knownAnswers(self) -> None:
        """Each table line parses to its upper-cased verb and stripped argument."""
        for line, expected in self.cases:
            self.assertEqual(parse_command(line), expected, line)

    def test_errors(self) -> None:
        """Each table line raises ProtocolError."""
        for line in self.errors:
            self.assertRaises(ProtocolError, parse_command, line)

    def test_lineLimits(self) -> None:
        """512 octets with CRLF for commands, 12288 for AUTH: LineTooLong beyond."""
        self.assertRaises(LineTooLong, parse_command, b"VRFY " + b"a" * (MAX_COMMAND_LINE - 6))
        self.assertRaises(LineTooLong, parse_command, b"MAIL FROM:<" + b"a" * 600 + b">")
        response = b"A" * (MAX_AUTH_LINE - len(b"AUTH PLAIN ") - 2)
        self.assertEqual(parse_command(b"AUTH PLAIN " + response).verb, "AUTH")
        self.assertRaises(LineTooLong, parse_command, b"AUTH PLAIN " + response + b"A")
        self.assertRaises(LineTooLong, parse_command, b"X" * 20000)
        self.assertTrue(issubclass(LineTooLong, ProtocolError))

    def test_parseAuth(self) -> None:
        """parse_auth gives the upper-cased mechanism and the initial response as sent."""
        self.assertEqual(parse_auth("plain"), ("PLAIN", None))
        self.assertEqual(parse_auth("PLAIN ="), ("PLAIN", "="))
        self.assertEqual(parse_auth("login YWxpY2U="), ("LOGIN", "YWxpY2U="))
        self.assertEqual(parse_auth("PLAIN  AGFsaWNlAHB3 "), ("PLAIN", "AGFsaWNlAHB3"))
        for bad in ["", " ", "PLAIN a b", "PLAIN a=b", "P/AIN"]:
            self.assertRaises(ProtocolError, parse_auth, bad)

    def test_reprHidesSecrets(self) -> None:
        """repr() of an AUTH command does not show its initial response."""
        self.assertNotIn("aHVudGVyMg", repr(parse_command(b"AUTH PLAIN aHVudGVyMg==")))
        self.assertIn("client.example", repr(parse_command(b"EHLO client.example")))

    @given(data=st.binary(max_size=600))
    def test_onlyProtocolError(self, data: bytes) -> None:
        """Arbitrary bytes parse or raise ProtocolError; no CR, LF or NUL survives."""
        try:
            command = parse_command(data)
        except ProtocolError:
            return
        self.assertTrue(command.verb.isascii() and command.verb == command.verb.upper())
        self.assertFalse(set(command.argument) & {"\x00", "\r", "\n"})

    @given(
        data=st.lists(
            st.sampled_from([b"EHLO", b"AUTH", b"PLAIN", b" ", b"[", b"]", b"=", b"a", b"\xc3", b"\r", b"\x00", b":"])
        )
    )
    def test_onlyProtocolErrorNearMisses(self, data: list[bytes]) -> None:
        """Near-valid lines parse or raise ProtocolError, never anything else."""
        try:
            parse_command(b"".join(data))
        except ProtocolError:
            pass

    @given(
        session=st.lists(st.sampled_from([b"EHLO a.example", b"STARTTLS", b"AUTH PLAIN AGEAYg==", b"NOOP", b"QUIT"])),
        points=st.lists(st.integers(0, 300)),
    )
    def test_splitInvariance(self, session: list[bytes], points: list[int]) -> None:
        """Pipelined commands split at any points parse to the same commands as in one read."""
        data = b"".join(line + b"\r\n" for line in session)
        buffer = LineBuffer(MAX_AUTH_LINE)
        parsed = []
        for chunk in split_at(data, points):
            for line in buffer.feed(chunk):
                assert isinstance(line, bytes)
                parsed.append(parse_command(line))
        self.assertEqual(parsed, [parse_command(line) for line in session])


class FormatCommandTests(SynchronousTestCase):
    """format_command and format_auth_plain: what the gateway sends a mail server."""

    def test_knownAnswers(self) -> None:
        """Verb, one space, argument, CRLF."""
        self.assertEqual(format_command("EHLO", "gw.example"), b"EHLO gw.example\r\n")
        self.assertEqual(format_command("STARTTLS"), b"STARTTLS\r\n")
        self.assertEqual(format_command("AUTH", "LOGIN"), b"AUTH LOGIN\r\n")
        self.assertEqual(format_auth_plain("alice", "pw"), b"AUTH PLAIN AGFsaWNlAHB3\r\n")
        self.assertEqual(format_auth_plain("alice", "pw", "admin"), b"AUTH PLAIN YWRtaW4AYWxpY2UAcHc=\r\n")

    def test_refused(self) -> None:
        """Injection, NUL, empty credentials and over-long lines are refused."""
        self.assertRaises(ProtocolError, format_command, "EHLO", "a\r\nRCPT TO:<x>")
        self.assertRaises(ProtocolError, format_command, "VRFY", "\x00")
        self.assertRaises(ProtocolError, format_command, "VRFY", "\udc80")
        self.assertRaises(LineTooLong, format_command, "VRFY", "a" * MAX_COMMAND_LINE)
        self.assertRaises(ValueError, format_command, "E HLO")
        self.assertRaises(ValueError, format_command, "")
        self.assertRaises(ProtocolError, format_auth_plain, "al\x00ice", "pw")
        self.assertRaises(ProtocolError, format_auth_plain, "alice", "")
        self.assertRaises(ProtocolError, format_auth_plain, "", "pw")
        self.assertRaises(LineTooLong, format_auth_plain, "alice", "p" * MAX_AUTH_LINE)

    @given(user=credentials, password=credentials)
    def test_authPlainRoundTrip(self, user: str, password: str) -> None:
        """format_auth_plain, parsed by parse_command and decoded, gives the credentials back."""
        line = format_auth_plain(user, password)
        (framed,) = LineBuffer(MAX_AUTH_LINE).feed(line)
        assert isinstance(framed, bytes)
        command = parse_command(framed)
        mechanism, response = parse_auth(command.argument)
        self.assertEqual(mechanism, "PLAIN")
        assert response is not None
        self.assertEqual(sasl.decode_plain(response.encode("ascii")), ("", user, password))

    @given(verb=st.sampled_from(["VRFY", "NOOP", "HELP", "XFOO"]), argument=texts)
    def test_roundTrip(self, verb: str, argument: str) -> None:
        """format_command parses back to the same verb and (stripped) argument."""
        try:
            line = format_command(verb, argument)
        except LineTooLong:
            assume(False)
            return
        self.assertEqual(parse_command(line[:-2]), Command(verb, argument.strip(" ")))


class ReplyTests(SynchronousTestCase):
    """reply and ehlo_reply: what the gateway answers clients."""

    def test_knownAnswers(self) -> None:
        """Single-line, multi-line and enhanced replies give exact bytes."""
        self.assertEqual(reply(220, "gw.example ESMTP ready"), b"220 gw.example ESMTP ready\r\n")
        self.assertEqual(reply(250), b"250\r\n")
        self.assertEqual(reply(250, ["a", "b", "c"]), b"250-a\r\n250-b\r\n250 c\r\n")
        self.assertEqual(reply(250, ["a", ""]), b"250-a\r\n250\r\n")
        self.assertEqual(reply(250, ["", "b"]), b"250-\r\n250 b\r\n")
        self.assertEqual(reply(334, ""), b"334\r\n")
        self.assertEqual(reply(334, "VXNlcm5hbWU6"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(reply(535, "Authentication failed", "5.7.8"), b"535 5.7.8 Authentication failed\r\n")
        self.assertEqual(reply(250, ["a", "b"], "2.0.0"), b"250-2.0.0 a\r\n250 2.0.0 b\r\n")
        self.assertEqual(reply(250, "", "2.0.0"), b"250 2.0.0\r\n")
        self.assertEqual(reply(454, "TLS not available", "4.7.0"), b"454 4.7.0 TLS not available\r\n")
        self.assertEqual(
            ehlo_reply("gw.example", "Hello", ["PIPELINING", "SIZE 10240000", "AUTH PLAIN LOGIN", "STARTTLS"]),
            b"250-gw.example Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n",
        )
        self.assertEqual(ehlo_reply("gw.example", "", []), b"250 gw.example\r\n")

    def test_badArguments(self) -> None:
        """Bad codes, empty lists, line breaks, mismatched enhanced codes, over-long lines
        and invalid EHLO keywords are ValueError."""
        for code in [199, 600, 260, 1000, 0, -250]:
            self.assertRaises(ValueError, reply, code, "x")
        self.assertRaises(ValueError, reply, 250, [])
        self.assertRaises(ValueError, reply, 250, "a\r\n250 b")
        self.assertRaises(ValueError, reply, 250, ["a", "b\n"])
        self.assertRaises(ValueError, reply, 250, "\x00")
        self.assertRaises(ValueError, reply, 535, "x", "2.7.8")
        self.assertRaises(ValueError, reply, 535, "x", "5.7")
        self.assertRaises(ValueError, reply, 535, "x", "5.07.8")
        self.assertRaises(ValueError, reply, 250, "x" * MAX_REPLY_LINE)
        self.assertRaises(ValueError, ehlo_reply, "gw", "", ["-BAD"])
        self.assertRaises(ValueError, ehlo_reply, "gw", "", [""])
        self.assertRaises(ValueError, ehlo_reply, "gw", "", ["AUTH=PLAIN"])

    @given(code=codes, lines=st.lists(texts, min_size=1, max_size=8), points=st.lists(st.integers(0, 800)))
    def test_replyRoundTrip(self, code: int, lines: list[str], points: list[int]) -> None:
        """reply(), framed at any split points and read by ReplyReader, gives the same
        code and lines."""
        try:
            data = reply(code, lines)
        except ValueError:
            assume(False)
            return
        buffer = LineBuffer(MAX_REPLY_LINE)
        reader = ReplyReader()
        replies = []
        for chunk in split_at(data, points):
            for line in buffer.feed(chunk):
                result = reader.feed(line)
                if result is not None:
                    replies.append(result)
        self.assertEqual(replies, [Reply(code, tuple(lines))])
        self.assertFalse(reader.in_reply)

    @given(extensions=st.dictionaries(keywords.map(str.upper), params, max_size=8))
    def test_ehloRoundTrip(self, extensions: dict[str, list[str]]) -> None:
        """ehlo_reply read back with ReplyReader and parse_ehlo_keywords gives the extensions."""
        data = ehlo_reply("gw.example", "hi", [" ".join([name, *args]) for name, args in extensions.items()])
        reader = ReplyReader()
        results = [reader.feed(line) for line in LineBuffer(MAX_REPLY_LINE).feed(data)]
        answer = results[-1]
        assert answer is not None
        self.assertEqual(parse_ehlo_keywords(answer), {name: tuple(args) for name, args in extensions.items()})


class ReplyReaderTests(SynchronousTestCase):
    """ReplyReader and parse_ehlo_keywords on what servers answer."""

    def test_postfixEhlo(self) -> None:
        """A Postfix EHLO answer gives its extensions; the obsolete AUTH= line is skipped."""
        answer = (
            b"250-mail.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
            b"250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n"
            b"250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n"
        )
        reader = ReplyReader()
        lines = LineBuffer(MAX_REPLY_LINE).feed(answer)
        for line in lines[:-1]:
            self.assertIsNone(reader.feed(line))
            self.assertTrue(reader.in_reply)
        result = reader.feed(lines[-1])
        assert result is not None
        self.assertEqual(result.code, 250)
        self.assertEqual(result.lines[0], "mail.example.com")
        self.assertEqual(
            parse_ehlo_keywords(result),
            {
                "PIPELINING": (),
                "SIZE": ("10240000",),
                "VRFY": (),
                "ETRN": (),
                "STARTTLS": (),
                "AUTH": ("PLAIN", "LOGIN"),
                "ENHANCEDSTATUSCODES": (),
                "8BITMIME": (),
                "DSN": (),
                "SMTPUTF8": (),
            },
        )

    def test_consecutiveReplies(self) -> None:
        """After a complete reply, the reader starts the next one."""
        reader = ReplyReader()
        self.assertEqual(reader.feed(b"220 ready"), Reply(220, ("ready",)))
        self.assertIsNone(reader.feed(b"250-a"))
        self.assertEqual(reader.feed(b"250 b"), Reply(250, ("a", "b")))
        self.assertEqual(reader.feed(b"334 "), Reply(334, ("",)))
        self.assertEqual(reader.feed(b"334"), Reply(334, ("",)))
        self.assertEqual(reader.feed(b"235 2.7.0 ok \xff"), Reply(235, ("2.7.0 ok \ufffd",)))

    def test_errors(self) -> None:
        """Garbage, a changed code inside a multi-line reply, too many lines and TooLong
        raise ProtocolError (LineTooLong for TooLong)."""
        for line in [
            b"",
            b"25",
            b"250x",
            b"2500 x",
            b"199 x",
            b"600 x",
            b"260 x",
            b"abc",
            b"+OK",
            b"250 a\x00",
            b"250\tx",
        ]:
            self.assertRaises(ProtocolError, ReplyReader().feed, line)
        reader = ReplyReader()
        reader.feed(b"250-a")
        self.assertRaises(ProtocolError, reader.feed, b"251 b")
        reader = ReplyReader(max_lines=2)
        reader.feed(b"250-a")
        reader.feed(b"250-b")
        self.assertRaises(ProtocolError, reader.feed, b"250 c")
        self.assertRaises(LineTooLong, ReplyReader().feed, TooLong(512))

    def test_replyProperties(self) -> None:
        """The reply classes and the enhanced status code of the first line."""
        self.assertTrue(Reply(250, ("ok",)).positive)
        self.assertTrue(Reply(334, ("",)).intermediate)
        self.assertTrue(Reply(454, ("x",)).transient)
        self.assertTrue(Reply(535, ("x",)).permanent)
        self.assertEqual(Reply(250, ("a", "b")).text, "a\nb")
        self.assertEqual(Reply(535, ("5.7.8 Authentication failed",)).enhanced, "5.7.8")
        self.assertEqual(Reply(250, ("2.1.0",)).enhanced, "2.1.0")
        self.assertIsNone(Reply(535, ("4.7.8 mismatch",)).enhanced)
        self.assertIsNone(Reply(250, ("2.1.0x",)).enhanced)
        self.assertIsNone(Reply(250, ("hello",)).enhanced)
        self.assertIsNone(Reply(250, ()).enhanced)

    def test_ehloKeywordsRefused(self) -> None:
        """parse_ehlo_keywords needs a 250 answer; blank lines are skipped, names upper-cased,
        the last repeat wins."""
        self.assertRaises(ProtocolError, parse_ehlo_keywords, Reply(502, ("not implemented",)))
        self.assertEqual(
            parse_ehlo_keywords(Reply(250, ("gw", "", "size 100", "SIZE 200", "-bad", "auth plain"))),
            {"SIZE": ("200",), "AUTH": ("plain",)},
        )

    @given(lines=st.lists(st.binary(max_size=40), max_size=20))
    def test_onlyProtocolError(self, lines: list[bytes]) -> None:
        """Arbitrary lines raise only ProtocolError; every reply has a valid code."""
        reader = ReplyReader(max_lines=10)
        try:
            for line in lines:
                result = reader.feed(line)
                if result is not None:
                    self.assertTrue(200 <= result.code <= 559)
                    if result.code == 250:
                        parse_ehlo_keywords(result)
        except ProtocolError:
            pass


class ModuleTests(SynchronousTestCase):
    """The module's constants."""

    def test_constants(self) -> None:
        """RFC 5321 and RFC 4954 limits, CRLF included."""
        self.assertEqual(MAX_COMMAND_LINE, 512)
        self.assertEqual(MAX_AUTH_LINE, 12288)
        self.assertEqual(MAX_REPLY_LINE, 512)
        for name in smtp.__all__:
            self.assertTrue(hasattr(smtp, name), name)


class RelayedExtensionsTests(SynchronousTestCase):
    """relayed_extensions and fallback_extensions: what the gateway's EHLO before AUTH
    carries of the mail server's extensions [4.5]."""

    def test_postfixAndDovecot(self) -> None:
        """Of a Postfix answer, SIZE with its limit, PIPELINING, 8BITMIME,
        ENHANCEDSTATUSCODES, SMTPUTF8, in the fixed order; of Dovecot submission's,
        CHUNKING too; AUTH, STARTTLS, VRFY, ETRN, DSN, BURL are not passed on."""
        postfix = {
            "SMTPUTF8": (), "PIPELINING": (), "SIZE": ("10240000",), "VRFY": (), "ETRN": (), "STARTTLS": (),
            "AUTH": ("PLAIN", "LOGIN"), "ENHANCEDSTATUSCODES": (), "8BITMIME": (), "DSN": (),
        }
        self.assertEqual(
            smtp.relayed_extensions(postfix),
            ("SIZE 10240000", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"),
        )
        dovecot = {
            "8BITMIME": (), "AUTH": ("PLAIN",), "BURL": ("imap",), "CHUNKING": (), "ENHANCEDSTATUSCODES": (),
            "SIZE": ("40000000",), "PIPELINING": (),
        }
        self.assertEqual(
            smtp.relayed_extensions(dovecot),
            ("SIZE 40000000", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING"),
        )
        self.assertEqual(smtp.relayed_extensions({}), ())

    def test_sizeParameter(self) -> None:
        """SIZE keeps a number (leading zeros dropped) and is bare otherwise: nothing
        else the server sent reaches the client."""
        cases = [
            (("0",), "SIZE 0"),
            (("007",), "SIZE 7"),
            ((), "SIZE"),
            (("x\r\n250 EVIL",), "SIZE"),
            (("1" * 21,), "SIZE"),
            (("-5",), "SIZE"),
        ]
        for params, expected in cases:
            self.assertEqual(smtp.relayed_extensions({"SIZE": params}), (expected,), params)

    @given(st.dictionaries(keywords.map(str.upper), st.lists(texts, max_size=3).map(tuple)))
    def test_alwaysValidEhloLines(self, offered: dict[str, tuple[str, ...]]) -> None:
        """Whatever a server offers, the result is a subset of the relayed keywords
        that makes a valid EHLO answer."""
        lines = smtp.relayed_extensions(offered)
        self.assertLessEqual({line.split(" ")[0] for line in lines}, set(smtp.RELAYED_EXTENSIONS))
        ehlo_reply("gw", "hello", lines)

    def test_fallback(self) -> None:
        """The fallback: SIZE of the configured limit (bare for 0), 8BITMIME and
        ENHANCEDSTATUSCODES; never PIPELINING, SMTPUTF8 or CHUNKING."""
        self.assertEqual(smtp.fallback_extensions(10240000), ("SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES"))
        self.assertEqual(smtp.fallback_extensions(0), ("SIZE", "8BITMIME", "ENHANCEDSTATUSCODES"))
