"""Tests for L{mailgw.wire.framing}: where the messages are in POP3, SMTP and IMAP streams."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire.errors import LineTooLong, ProtocolError
from mailgw.wire.framing import (
    BdatChunk,
    DotStuffer,
    ImapFramer,
    ImapMessageStart,
    MessageAborted,
    MessageData,
    MessageEnd,
    Pop3Framer,
    Pop3MessageStart,
    Relay,
    SmtpCommand,
    SmtpFramer,
    SmtpMessageStart,
    dot_stuff,
    format_bdat,
    literal_marker,
)

# -- helpers -------------------------------------------------------------------------------


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """Cut C{data} at the given offsets (clamped, in any order, repeats allowed)."""
    cuts = sorted({min(max(point, 0), len(data)) for point in points})
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def normalise(events: Sequence[Any]) -> list[Any]:
    """The events with adjacent L{Relay}s and adjacent L{MessageData}s joined (how a
    stream was split into reads only changes those)."""
    result: list[Any] = []
    for event in events:
        if result and type(event) in (Relay, MessageData) and type(result[-1]) is type(event):
            result[-1] = type(event)(result[-1].data + event.data)
        else:
            result.append(event)
    return result


def drain(framer: Any, events: list[Any]) -> None:
    while (event := framer.next_event()) is not None:
        events.append(event)


def pop3_events(commands: bytes, chunks: Sequence[bytes]) -> list[Any]:
    """The events of a POP3 server stream fed in C{chunks}, after C{commands}."""
    framer = Pop3Framer()
    framer.feed_commands(commands)
    events: list[Any] = []
    for chunk in chunks:
        framer.append(chunk)
        drain(framer, events)
    return events


def smtp_events(chunks: Sequence[bytes], replies: Sequence[bool] = ()) -> list[Any]:
    """The events of an SMTP client stream fed in C{chunks}; C{replies} answer each DATA in turn."""
    framer = SmtpFramer()
    answers = iter(replies)
    events: list[Any] = []
    for chunk in chunks:
        framer.append(chunk)
        while True:
            drain(framer, events)
            if not framer.awaiting_data_reply:
                break
            accepted = next(answers, None)
            if accepted is None:
                break
            framer.data_reply(accepted)
    return events


def imap_events(chunks: Sequence[bytes]) -> list[Any]:
    framer = ImapFramer()
    events: list[Any] = []
    for chunk in chunks:
        framer.append(chunk)
        drain(framer, events)
    return events


def unstuff_model(stream: bytes) -> tuple[bytes, int] | None:
    """
    An independent, whole-input statement of dot-stuffing: the terminator is the first
    C{.CRLF} at the start or after a CRLF; before it, a C{.} after every line start
    (the start, or an LF) goes.  The content and the end of the terminator, or C{None}.
    """
    if stream.startswith(b".\r\n"):
        return b"", 3
    end = stream.find(b"\r\n.\r\n")
    if end < 0:
        return None
    body = stream[: end + 2]
    return re.sub(rb"(?:\A|(?<=\n))\.", b"", body), end + 5


# Contents rich in dots and line ends, so that stuffing corner cases are common.
_pieces = st.sampled_from(
    [b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"From: x", b"\r\n.\r\n", b".\r\n", b"\x00", b"\xff", b"{3}", b"BDAT"]
)
contents = st.one_of(st.lists(_pieces, max_size=30).map(b"".join), st.binary(max_size=100))
# Contents a conforming sender can send unchanged: empty or ending with CRLF.
messages = contents.map(lambda m: m if not m or m.endswith(b"\r\n") else m + b"\r\n")
points = st.lists(st.integers(min_value=0, max_value=2000), max_size=12)


# -- dot-stuffing --------------------------------------------------------------------------


class DotStuffingTests(SynchronousTestCase):
    """L{dot_stuff}, L{DotStuffer} and the decoding the POP3 and SMTP framers share."""

    # (content, encoding)
    cases: list[tuple[bytes, bytes]] = [
        (b"", b".\r\n"),
        (b"Hi\r\n", b"Hi\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b"no end", b"no end\r\n.\r\n"),
        (b"bare\n", b"bare\n\r\n.\r\n"),
        (b"a\n.\r\n", b"a\n..\r\n.\r\n"),  # a dot after a bare LF is doubled too (smuggling)
        (b"a\r.\r\n", b"a\r.\r\n.\r\n"),
    ]

    def test_knownAnswers(self) -> None:
        """Each content has its exact encoding."""
        for content, encoding in self.cases:
            self.assertEqual(dot_stuff(content), encoding, content)

    @given(contents, points)
    def test_incrementalIsWhole(self, content: bytes, cuts: list[int]) -> None:
        """Stuffing chunk by chunk gives the same bytes as stuffing the whole content."""
        stuffer = DotStuffer()
        encoded = b"".join(stuffer.stuff(chunk) for chunk in split_at(content, cuts)) + stuffer.end()
        self.assertEqual(encoded, dot_stuff(content))

    @given(messages, points)
    def test_roundTrip(self, content: bytes, cuts: list[int]) -> None:
        """Serialise then parse gives the content back, however the encoding is split, for POP3 and SMTP."""
        encoded = dot_stuff(content)
        expected = [MessageData(content)] if content else []
        for chunks in (split_at(encoded, cuts), [encoded]):
            events = normalise(pop3_events(b"RETR 1\r\n", [b"+OK\r\n", *chunks]))
            self.assertEqual(events, [Pop3MessageStart("RETR", ("1",), b"+OK\r\n"), *expected, MessageEnd()])
            events = normalise(smtp_events([b"DATA\r\n", *chunks], [True]))
            self.assertEqual(
                events, [SmtpCommand("DATA", b"DATA\r\n"), SmtpMessageStart("DATA"), *expected, MessageEnd()]
            )

    @given(contents)
    def test_noEarlyEnd(self, content: bytes) -> None:
        """An encoding holds no end of data before its own, by any receiver's idea of a line end:
        every dot after an LF (and at the start) is doubled."""
        body = dot_stuff(content)[:-3]
        self.assertIsNone(re.search(rb"(?:\A|\n)\.(?!\.)", body))
        self.assertNotIn(b"\r\n.\r\n", body[:-2] if body.endswith(b"\r\n") else body)

    @given(st.binary(max_size=200) | contents, points)
    def test_decodingMatchesModel(self, stream: bytes, cuts: list[int]) -> None:
        """Whatever the bytes, the framers find the end and the content the model says."""
        expected = unstuff_model(stream)
        if expected is not None:
            stream = stream[: expected[1]]  # what follows would be read as status lines
        events = normalise(pop3_events(b"RETR 1\r\n", [b"+OK\r\n", *split_at(stream, cuts)]))
        self.assertEqual(events[0], Pop3MessageStart("RETR", ("1",), b"+OK\r\n"))
        content = b"".join(e.data for e in events if isinstance(e, MessageData))
        if expected is None:
            self.assertNotIn(MessageEnd(), events)
        else:
            self.assertEqual(content, expected[0])
            self.assertEqual(events[-1], MessageEnd())

    @given(messages)
    def test_conformingEncodingIsReproduced(self, content: bytes) -> None:
        """Re-encoding what was decoded gives the sender's bytes back (a clean message passes byte-identical)."""
        encoded = dot_stuff(content)
        events = pop3_events(b"RETR 1\r\n", [b"+OK\r\n" + encoded])
        decoded = b"".join(e.data for e in events if isinstance(e, MessageData))
        self.assertEqual(dot_stuff(decoded), encoded)


# -- POP3 ----------------------------------------------------------------------------------


def _retr(status: bytes = b"+OK\r\n", command: str = "RETR", arguments: tuple[str, ...] = ("1",)) -> Pop3MessageStart:
    return Pop3MessageStart(command, arguments, status)


class Pop3KnownAnswerTests(SynchronousTestCase):
    """Tables of client commands, server bytes and the events they give."""

    # (name, commands, server stream, normalised events)
    cases: list[tuple[str, bytes, bytes, list[Any]]] = [
        (
            "retr",
            b"RETR 1\r\n",
            b"+OK 4 octets\r\nHi\r\n.\r\n",
            [_retr(b"+OK 4 octets\r\n"), MessageData(b"Hi\r\n"), MessageEnd()],
        ),
        ("emptyMessage", b"RETR 1\r\n", b"+OK\r\n.\r\n", [_retr(), MessageEnd()]),
        ("stuffedDot", b"RETR 1\r\n", b"+OK\r\n..a\r\n.\r\n", [_retr(), MessageData(b".a\r\n"), MessageEnd()]),
        (
            "stuffedTerminator",
            b"RETR 1\r\n",
            b"+OK\r\na\r\n..\r\nb\r\n.\r\n",
            [_retr(), MessageData(b"a\r\n.\r\nb\r\n"), MessageEnd()],
        ),
        ("unstuffedDotRemoved", b"RETR 1\r\n", b"+OK\r\n.x\r\n.\r\n", [_retr(), MessageData(b"x\r\n"), MessageEnd()]),
        (
            "bareLfDotIsNoEnd",
            b"RETR 1\r\n",
            b"+OK\r\na\n.\r\nb\r\n.\r\n",
            [_retr(), MessageData(b"a\n\r\nb\r\n"), MessageEnd()],
        ),
        (
            "dotLfIsNoEnd",
            b"RETR 1\r\n",
            b"+OK\r\na\r\n.\nb\r\n.\r\n",
            [_retr(), MessageData(b"a\r\n\nb\r\n"), MessageEnd()],
        ),
        (
            "top",
            b"TOP 2 0\r\n",
            b"+OK\r\nSubject: x\r\n\r\n.\r\n",
            [_retr(command="TOP", arguments=("2", "0")), MessageData(b"Subject: x\r\n\r\n"), MessageEnd()],
        ),
        (
            "lowerCaseCommand",
            b"retr 3\r\n",
            b"+OK\r\nx\r\n.\r\n",
            [_retr(arguments=("3",)), MessageData(b"x\r\n"), MessageEnd()],
        ),
        ("retrRefused", b"RETR 9\r\n", b"-ERR no such message\r\n", [Relay(b"-ERR no such message\r\n")]),
        (
            "listIsMultiLine",
            b"LIST\r\nRETR 1\r\n",
            b"+OK 1 messages\r\n1 4\r\n.\r\n+OK\r\nHi\r\n.\r\n",
            [Relay(b"+OK 1 messages\r\n1 4\r\n.\r\n"), _retr(), MessageData(b"Hi\r\n"), MessageEnd()],
        ),
        ("listOneIsSingle", b"LIST 1\r\n", b"+OK 1 4\r\n", [Relay(b"+OK 1 4\r\n")]),
        (
            "uidlIsMultiLine",
            b"UIDL\r\nUIDL 1\r\n",
            b"+OK\r\n1 abc\r\n.\r\n+OK 1 abc\r\n",
            [Relay(b"+OK\r\n1 abc\r\n.\r\n+OK 1 abc\r\n")],
        ),
        (
            "capaIsMultiLineWithStuffing",
            b"CAPA\r\nSTAT\r\n",
            b"+OK\r\nTOP\r\n..X\r\n.\r\n+OK 2 320\r\n",
            [Relay(b"+OK\r\nTOP\r\n..X\r\n.\r\n+OK 2 320\r\n")],
        ),
        ("listRefusedIsSingle", b"LIST\r\nSTAT\r\n", b"-ERR\r\n+OK 0 0\r\n", [Relay(b"-ERR\r\n+OK 0 0\r\n")]),
        (
            "pipelinedRetrs",
            b"RETR 1\r\nRETR 2\r\nQUIT\r\n",
            b"+OK\r\none\r\n.\r\n+OK\r\ntwo\r\n.\r\n+OK bye\r\n",
            [
                _retr(),
                MessageData(b"one\r\n"),
                MessageEnd(),
                _retr(arguments=("2",)),
                MessageData(b"two\r\n"),
                MessageEnd(),
                Relay(b"+OK bye\r\n"),
            ],
        ),
        (
            "messageHoldingAnswers",
            b"RETR 1\r\nNOOP\r\n",
            b"+OK\r\n+OK\r\n-ERR\r\n..\r\n.\r\n+OK\r\n",
            [_retr(), MessageData(b"+OK\r\n-ERR\r\n.\r\n"), MessageEnd(), Relay(b"+OK\r\n")],
        ),
        ("unsolicited", b"", b"-ERR idle for too long\r\n", [Relay(b"-ERR idle for too long\r\n")]),
        ("bareLfStatus", b"RETR 1\n", b"+OK\nx\r\n.\r\n", [_retr(b"+OK\n"), MessageData(b"x\r\n"), MessageEnd()]),
        ("partialAnswer", b"RETR 1\r\n", b"+OK\r\nHel", [_retr(), MessageData(b"Hel")]),
        ("partialStatus", b"RETR 1\r\n", b"+OK 5 oct", []),
    ]

    def test_knownAnswers(self) -> None:
        """Each case gives exactly its events, read whole and byte by byte."""
        for name, commands, stream, expected in self.cases:
            self.assertEqual(normalise(pop3_events(commands, [stream])), expected, name)
            one_by_one = [stream[i : i + 1] for i in range(len(stream))]
            self.assertEqual(normalise(pop3_events(commands, one_by_one)), expected, name)

    def test_commandsFedAsSent(self) -> None:
        """Commands may arrive in pieces, each before its answer."""
        framer = Pop3Framer()
        events: list[Any] = []
        framer.feed_commands(b"RE")
        framer.feed_commands(b"TR 1\r\nLI")
        self.assertEqual(framer.pending_commands, 1)
        framer.append(b"+OK\r\nx\r\n.\r\n")
        drain(framer, events)
        framer.feed_commands(b"ST\r\n")
        framer.append(b"+OK\r\n1 3\r\n.\r\n")
        drain(framer, events)
        self.assertEqual(
            normalise(events), [_retr(), MessageData(b"x\r\n"), MessageEnd(), Relay(b"+OK\r\n1 3\r\n.\r\n")]
        )
        self.assertEqual(framer.pending_commands, 0)

    def test_streamsTheMessage(self) -> None:
        """A big message comes out chunk by chunk as it arrives, never held whole."""
        framer = Pop3Framer()
        framer.feed_commands(b"RETR 1\r\n")
        line = b"x" * 78 + b"\r\n"
        body = dot_stuff(line * 53000)  # about 4 MB
        framer.append(b"+OK\r\n")
        self.assertEqual(framer.next_event(), _retr())
        sizes: list[int] = []
        for chunk in split_at(body, range(65536, len(body), 65536)):
            framer.append(chunk)
            events: list[Any] = []
            drain(framer, events)
            self.assertTrue(events)
            sizes.extend(len(e.data) for e in events if isinstance(e, MessageData))
            self.assertLessEqual(max(sizes), 65536)
        self.assertEqual(events[-1], MessageEnd())
        self.assertEqual(sum(sizes), len(line) * 53000)

    def test_notAStatusLine(self) -> None:
        """An answer that is not +OK or -ERR where one is due raises ProtocolError, and again after."""
        for stream in (b"+OKAY\r\n", b"hello\r\n", b"+ \r\n", b"\r\n", b"* OK\r\n"):
            framer = Pop3Framer()
            framer.feed_commands(b"STAT\r\n")
            framer.append(stream)
            self.assertRaises(ProtocolError, framer.next_event)
            self.assertRaises(ProtocolError, framer.next_event)
            self.assertRaises(ProtocolError, framer.feed_commands, b"NOOP\r\n")

    def test_statusLineTooLong(self) -> None:
        """A status line over max_status_line raises LineTooLong, without waiting for its end."""
        framer = Pop3Framer(max_status_line=16)
        framer.feed_commands(b"STAT\r\n")
        framer.append(b"+OK 0123456789\r\n")  # 16 octets: accepted
        self.assertEqual(framer.next_event(), Relay(b"+OK 0123456789\r\n"))
        framer.append(b"+OK 0123456789A")
        self.assertIsNone(framer.next_event())
        framer.append(b"B")
        self.assertRaises(LineTooLong, framer.next_event)

    def test_commandsTheServerCouldReadOtherwise(self) -> None:
        """Command lines that the gateway and the server might frame differently raise ProtocolError."""
        for line in (
            b"RETR\x001\r\n",
            b"RETR 1\rLIST\r\n",
            b"RE\xffR 1\r\n",
            b"X\r\n",
            b"RETR " + b"1" * 300 + b"\r\n",
        ):
            framer = Pop3Framer()
            self.assertRaises(ProtocolError, framer.feed_commands, line)
            self.assertRaises(ProtocolError, framer.next_event)

    def test_pipelineBound(self) -> None:
        """More than max_pipeline unanswered commands raise ProtocolError."""
        framer = Pop3Framer(max_pipeline=3)
        framer.feed_commands(b"NOOP\r\n" * 3)
        self.assertRaises(ProtocolError, framer.feed_commands, b"NOOP\r\n")


# The answers a POP3 session may give, as (command, answer, events): built so that the
# expected events are known by construction.
def _pop3_retr(content: bytes, top: bool) -> tuple[bytes, bytes, list[Any]]:
    command, start = (b"TOP 1 5\r\n", _retr(command="TOP", arguments=("1", "5"))) if top else (b"RETR 1\r\n", _retr())
    data = [MessageData(content)] if content else []
    return command, b"+OK\r\n" + dot_stuff(content), [start, *data, MessageEnd()]


_pop3_others = st.sampled_from(
    [
        (b"LIST\r\n", b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
        (b"CAPA\r\n", b"+OK\r\nTOP\r\n..odd\r\n.\r\n"),
        (b"STAT\r\n", b"+OK 2 320\r\n"),
        (b"RETR 9\r\n", b"-ERR no such message\r\n"),
        (b"NOOP\r\n", b"+OK\r\n"),
        (b"UIDL 1\r\n", b"+OK 1 abc\r\n"),
    ]
).map(lambda pair: (pair[0], pair[1], [Relay(pair[1])]))
pop3_sessions = st.lists(
    st.one_of(st.builds(_pop3_retr, messages, st.booleans()), _pop3_others),
    max_size=6,
)


class Pop3PropertyTests(SynchronousTestCase):
    """Properties of L{Pop3Framer} over generated sessions and arbitrary bytes."""

    @given(pop3_sessions, points)
    def test_anySplit(self, session: list[tuple[bytes, bytes, list[Any]]], cuts: list[int]) -> None:
        """Any split of the server's stream gives the session's events."""
        commands = b"".join(command for command, _, _ in session)
        stream = b"".join(answer for _, answer, _ in session)
        expected = normalise([event for _, _, events in session for event in events])
        self.assertEqual(normalise(pop3_events(commands, split_at(stream, cuts))), expected)

    @given(pop3_sessions)
    def test_passingOnReproducesTheStream(self, session: list[tuple[bytes, bytes, list[Any]]]) -> None:
        """Relays, status lines and the re-encoded messages give the server's stream back."""
        commands = b"".join(command for command, _, _ in session)
        stream = b"".join(answer for _, answer, _ in session)
        out = bytearray()
        stuffer = DotStuffer()
        for event in pop3_events(commands, [stream]):
            if isinstance(event, Relay):
                out += event.data
            elif isinstance(event, Pop3MessageStart):
                out += event.status
                stuffer = DotStuffer()
            elif isinstance(event, MessageData):
                out += stuffer.stuff(event.data)
            elif isinstance(event, MessageEnd):
                out += stuffer.end()
        self.assertEqual(bytes(out), stream)

    @given(st.binary(max_size=60), st.binary(max_size=300) | contents, points)
    def test_arbitraryBytes(self, commands: bytes, stream: bytes, cuts: list[int]) -> None:
        """Arbitrary commands and answers raise nothing but ProtocolError."""
        framer = Pop3Framer(max_status_line=64)
        try:
            framer.feed_commands(commands)
            for chunk in split_at(stream, cuts):
                framer.append(chunk)
                drain(framer, [])
        except ProtocolError:
            pass


# -- SMTP ----------------------------------------------------------------------------------


class SmtpKnownAnswerTests(SynchronousTestCase):
    """Tables of client streams and the events they give."""

    # (name, client stream, DATA replies, normalised events)
    cases: list[tuple[str, bytes, list[bool], list[Any]]] = [
        (
            "commands",
            b"MAIL FROM:<a@example.com>\r\nrcpt TO:<b@example.com>\r\nNOOP\n",
            [],
            [
                SmtpCommand("MAIL", b"MAIL FROM:<a@example.com>\r\n"),
                SmtpCommand("RCPT", b"rcpt TO:<b@example.com>\r\n"),
                SmtpCommand("NOOP", b"NOOP\n"),
            ],
        ),
        (
            "dataAccepted",
            b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
            [True],
            [
                SmtpCommand("DATA", b"DATA\r\n"),
                SmtpMessageStart("DATA"),
                MessageData(b"Subject: x\r\n\r\n.dot\r\n"),
                MessageEnd(),
                SmtpCommand("QUIT", b"QUIT\r\n"),
            ],
        ),
        (
            "dataRefused",
            b"DATA\r\nRSET\r\n",
            [False],
            [SmtpCommand("DATA", b"DATA\r\n"), SmtpCommand("RSET", b"RSET\r\n")],
        ),
        ("dataAwaitsItsReply", b"DATA\r\nSubject: x\r\n", [], [SmtpCommand("DATA", b"DATA\r\n")]),
        (
            "emptyData",
            b"DATA\r\n.\r\n",
            [True],
            [SmtpCommand("DATA", b"DATA\r\n"), SmtpMessageStart("DATA"), MessageEnd()],
        ),
        (
            "smugglingIsNoEnd",
            b"DATA\r\na\r\n\n.\r\nMAIL FROM:<evil>\r\n.\nRCPT\r\n.\r\n",
            [True],
            [
                SmtpCommand("DATA", b"DATA\r\n"),
                SmtpMessageStart("DATA"),
                MessageData(b"a\r\n\n\r\nMAIL FROM:<evil>\r\n\nRCPT\r\n"),
                MessageEnd(),
            ],
        ),
        (
            "bdat",
            b"BDAT 5\r\nhelloBDAT 3 LAST\r\nabcQUIT\r\n",
            [],
            [
                SmtpMessageStart("BDAT"),
                BdatChunk(5, False, b"BDAT 5\r\n"),
                MessageData(b"hello"),
                BdatChunk(3, True, b"BDAT 3 LAST\r\n"),
                MessageData(b"abc"),
                MessageEnd(),
                SmtpCommand("QUIT", b"QUIT\r\n"),
            ],
        ),
        (
            "bdatIsNotStuffed",
            b"bdat 11 last\r\n.\r\nDATA\r\n..",
            [],
            [
                SmtpMessageStart("BDAT"),
                BdatChunk(11, True, b"bdat 11 last\r\n"),
                MessageData(b".\r\nDATA\r\n.."),
                MessageEnd(),
            ],
        ),
        (
            "bdatEmptyLast",
            b"BDAT 0 LAST\r\nQUIT\r\n",
            [],
            [
                SmtpMessageStart("BDAT"),
                BdatChunk(0, True, b"BDAT 0 LAST\r\n"),
                MessageEnd(),
                SmtpCommand("QUIT", b"QUIT\r\n"),
            ],
        ),
        (
            "bdatAborted",
            b"BDAT 2\r\nabRSET\r\n",
            [],
            [
                SmtpMessageStart("BDAT"),
                BdatChunk(2, False, b"BDAT 2\r\n"),
                MessageData(b"ab"),
                MessageAborted(),
                SmtpCommand("RSET", b"RSET\r\n"),
            ],
        ),
        (
            "twoMessages",
            b"DATA\r\nx\r\n.\r\nBDAT 1 LAST\r\ny",
            [True],
            [
                SmtpCommand("DATA", b"DATA\r\n"),
                SmtpMessageStart("DATA"),
                MessageData(b"x\r\n"),
                MessageEnd(),
                SmtpMessageStart("BDAT"),
                BdatChunk(1, True, b"BDAT 1 LAST\r\n"),
                MessageData(b"y"),
                MessageEnd(),
            ],
        ),
    ]

    def test_knownAnswers(self) -> None:
        """Each case gives exactly its events, read whole and byte by byte."""
        for name, stream, replies, expected in self.cases:
            self.assertEqual(normalise(smtp_events([stream], replies)), expected, name)
            one_by_one = [stream[i : i + 1] for i in range(len(stream))]
            self.assertEqual(normalise(smtp_events(one_by_one, replies)), expected, name)

    def test_dataReplyOnlyWhenAwaited(self) -> None:
        """data_reply without a DATA awaiting it is a programming error (ValueError)."""
        framer = SmtpFramer()
        self.assertRaises(ValueError, framer.data_reply, True)
        framer.append(b"DATA\r\n")
        self.assertEqual(framer.next_event(), SmtpCommand("DATA", b"DATA\r\n"))
        self.assertTrue(framer.awaiting_data_reply)
        framer.data_reply(False)
        self.assertFalse(framer.awaiting_data_reply)
        self.assertRaises(ValueError, framer.data_reply, False)

    def test_heldBytesBound(self) -> None:
        """A client sending more than max_held octets before DATA is answered raises ProtocolError."""
        framer = SmtpFramer(max_held=10)
        framer.append(b"DATA\r\n0123456789")
        self.assertEqual(framer.next_event(), SmtpCommand("DATA", b"DATA\r\n"))
        self.assertIsNone(framer.next_event())
        framer.append(b"A")
        self.assertRaises(ProtocolError, framer.next_event)
        self.assertRaises(ProtocolError, framer.next_event)

    def test_malformedBdat(self) -> None:
        """A BDAT whose size cannot be read raises ProtocolError: where its data ends is unknown."""
        for line in (
            b"BDAT\r\n",
            b"BDAT -1\r\n",
            b"BDAT x\r\n",
            b"BDAT 5 LASTX\r\n",
            b"BDAT 5  LAST\r\n",
            b"BDAT 1" + b"0" * 20 + b"\r\n",
        ):
            framer = SmtpFramer()
            framer.append(line)
            self.assertRaises(ProtocolError, framer.next_event)

    def test_commandLineTooLong(self) -> None:
        """A command line over max_line raises LineTooLong as soon as it is known."""
        framer = SmtpFramer(max_line=10)
        framer.append(b"NOOP 1234\r\n")  # 11 octets
        self.assertRaises(LineTooLong, framer.next_event)

    def test_streamsTheMessage(self) -> None:
        """DATA and BDAT payloads come out chunk by chunk as they arrive."""
        payload = (b"y" * 998 + b"\r\n") * 4000
        for head, body, replies in (
            (b"DATA\r\n", dot_stuff(payload), [True]),
            (format_bdat(len(payload), last=True), payload, []),
        ):
            framer = SmtpFramer()
            framer.append(head)
            drain(framer, [])
            if replies:
                framer.data_reply(True)
            sizes: list[int] = []
            events: list[Any] = []
            for chunk in split_at(body, range(65536, len(body), 65536)):
                framer.append(chunk)
                events = []
                drain(framer, events)
                sizes.extend(len(e.data) for e in events if isinstance(e, MessageData))
                self.assertTrue(sizes)
            self.assertEqual(events[-1], MessageEnd())
            self.assertLessEqual(max(sizes), 65536)
            self.assertEqual(sum(sizes), len(payload))


_smtp_commands = st.sampled_from(
    [b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.com>\r\n", b"RSET\r\n", b"NOOP\n"]
)


def _smtp_data(content: bytes) -> tuple[bytes, list[bool], list[Any]]:
    data = [MessageData(content)] if content else []
    return (
        b"DATA\r\n" + dot_stuff(content),
        [True],
        [SmtpCommand("DATA", b"DATA\r\n"), SmtpMessageStart("DATA"), *data, MessageEnd()],
    )


def _smtp_bdat(chunks: list[bytes]) -> tuple[bytes, list[bool], list[Any]]:
    stream = bytearray()
    events: list[Any] = [SmtpMessageStart("BDAT")]
    for i, chunk in enumerate(chunks):
        line = format_bdat(len(chunk), last=i == len(chunks) - 1)
        stream += line + chunk
        events.append(BdatChunk(len(chunk), i == len(chunks) - 1, line))
        if chunk:
            events.append(MessageData(chunk))
    events.append(MessageEnd())
    return bytes(stream), [], events


smtp_sessions = st.lists(
    st.one_of(
        _smtp_commands.map(lambda line: (line, [], [SmtpCommand(line.split(b" ")[0].strip().decode(), line)])),
        st.builds(_smtp_data, messages),
        st.builds(_smtp_bdat, st.lists(contents, min_size=1, max_size=3)),
        st.just((b"DATA\r\n", [False], [SmtpCommand("DATA", b"DATA\r\n")])),
    ),
    max_size=6,
)


class SmtpPropertyTests(SynchronousTestCase):
    """Properties of L{SmtpFramer} over generated sessions and arbitrary bytes."""

    @given(smtp_sessions, points)
    def test_anySplit(self, session: list[tuple[bytes, list[bool], list[Any]]], cuts: list[int]) -> None:
        """Any split of the client's stream gives the session's events."""
        stream = b"".join(part for part, _, _ in session)
        replies = [reply for _, part_replies, _ in session for reply in part_replies]
        expected = normalise([event for _, _, events in session for event in events])
        self.assertEqual(normalise(smtp_events(split_at(stream, cuts), replies)), expected)

    @given(st.binary(max_size=300) | contents.map(lambda c: b"DATA\r\n" + c), st.lists(st.booleans()), points)
    def test_arbitraryBytes(self, stream: bytes, replies: list[bool], cuts: list[int]) -> None:
        """Arbitrary client bytes raise nothing but ProtocolError."""
        try:
            smtp_events(split_at(stream, cuts), replies)
        except ProtocolError:
            pass


# -- IMAP ----------------------------------------------------------------------------------


def _start(
    size: int,
    item: bytes = b"BODY[]",
    *,
    sequence: int = 1,
    section: bytes = b"",
    origin: int | None = None,
    literal8: bool = False,
    uid: int | None = None,
    marker: bytes | None = None,
) -> ImapMessageStart:
    if marker is None:
        marker = literal_marker(size, literal8)
    return ImapMessageStart(sequence, item, section, origin, size, literal8, uid, marker)


class ImapKnownAnswerTests(SynchronousTestCase):
    """Tables of server streams and the events they give."""

    # (name, server stream, normalised events)
    cases: list[tuple[str, bytes, list[Any]]] = [
        (
            "bodyLiteral",
            b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n",
            [Relay(b"* 1 FETCH (BODY[] "), _start(5), MessageData(b"hello"), MessageEnd(), Relay(b")\r\n")],
        ),
        (
            "uidBefore",
            b"* 12 FETCH (UID 7 FLAGS (\\Seen) BODY[] {2}\r\nhi UID 8)\r\na1 OK done\r\n",
            [
                Relay(b"* 12 FETCH (UID 7 FLAGS (\\Seen) BODY[] "),
                _start(2, sequence=12, uid=7),
                MessageData(b"hi"),
                MessageEnd(),
                Relay(b" UID 8)\r\na1 OK done\r\n"),
            ],
        ),
        (
            "lowerCase",
            b"* 3 fetch (body[] {1}\r\nx)\r\n",
            [Relay(b"* 3 fetch (body[] "), _start(1, sequence=3), MessageData(b"x"), MessageEnd(), Relay(b")\r\n")],
        ),
        (
            "rfc822",
            b"* 1 FETCH (RFC822 {3}\r\nabc RFC822.SIZE 3)\r\n",
            [
                Relay(b"* 1 FETCH (RFC822 "),
                _start(3, b"RFC822"),
                MessageData(b"abc"),
                MessageEnd(),
                Relay(b" RFC822.SIZE 3)\r\n"),
            ],
        ),
        (
            "binaryLiteral8",
            b"* 1 FETCH (BINARY[] ~{2}\r\n\x00\x01)\r\n",
            [
                Relay(b"* 1 FETCH (BINARY[] "),
                _start(2, b"BINARY[]", literal8=True),
                MessageData(b"\x00\x01"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        (
            "partialFetch",
            b"* 1 FETCH (BODY[]<0> {2}\r\nab)\r\n",
            [
                Relay(b"* 1 FETCH (BODY[]<0> "),
                _start(2, b"BODY[]<0>", origin=0),
                MessageData(b"ab"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        (
            "partsAndHeaders",
            b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT FROM)] {4}\r\nS: x BODY[1.2] {1}\nz RFC822.HEADER {0}\r\n)\r\n",
            [
                Relay(b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT FROM)] "),
                _start(4, b"BODY[HEADER.FIELDS (SUBJECT FROM)]", section=b"HEADER.FIELDS (SUBJECT FROM)"),
                MessageData(b"S: x"),
                MessageEnd(),
                Relay(b" BODY[1.2] "),
                _start(1, b"BODY[1.2]", section=b"1.2", marker=b"{1}\n"),
                MessageData(b"z"),
                MessageEnd(),
                Relay(b" RFC822.HEADER "),
                _start(0, b"RFC822.HEADER", section=b"HEADER"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        (
            "envelopeLiteralIsNoMessage",
            b'* 1 FETCH (ENVELOPE ("date" {11}\r\nBODY[] {5}) NIL) BODY[] {1}\r\nx)\r\n',
            [
                Relay(b'* 1 FETCH (ENVELOPE ("date" {11}\r\nBODY[] {5}) NIL) BODY[] '),
                _start(1),
                MessageData(b"x"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        (
            "quotedStringsAreSkipped",
            b'* 1 FETCH (ENVELOPE ("a \\" ) BODY[] (" NIL) RFC822 {1}\r\nx)\r\n',
            [
                Relay(b'* 1 FETCH (ENVELOPE ("a \\" ) BODY[] (" NIL) RFC822 '),
                _start(1, b"RFC822"),
                MessageData(b"x"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        (
            "parenthesesInQuotedStrings",
            b'* 1 FETCH (ENVELOPE ("(" NIL) BODY[] {1}\r\nx)\r\n',
            [
                Relay(b'* 1 FETCH (ENVELOPE ("(" NIL) BODY[] '),
                _start(1),
                MessageData(b"x"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        (
            "escapedQuote",
            b'* 1 FETCH (ENVELOPE ("x\\" (" NIL) BODY[] {1}\r\nx)\r\n',
            [
                Relay(b'* 1 FETCH (ENVELOPE ("x\\" (" NIL) BODY[] '),
                _start(1),
                MessageData(b"x"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        ("bodyNil", b"* 1 FETCH (BODY[] NIL)\r\n", [Relay(b"* 1 FETCH (BODY[] NIL)\r\n")]),
        ("bodyQuoted", b'* 1 FETCH (BODY[] "")\r\n', [Relay(b'* 1 FETCH (BODY[] "")\r\n')]),
        (
            "otherAnswerLiteral",
            b'* LIST () "/" {5}\r\nINBOX\r\n* 2 EXISTS\r\n',
            [Relay(b'* LIST () "/" {5}\r\nINBOX\r\n* 2 EXISTS\r\n')],
        ),
        (
            "answersInsideAMessage",
            b"* 1 FETCH (BODY[] {29}\r\n* 2 FETCH (BODY[] {3}\r\nabc)\r\n)\r\n",
            [
                Relay(b"* 1 FETCH (BODY[] "),
                _start(29),
                MessageData(b"* 2 FETCH (BODY[] {3}\r\nabc)\r\n"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        (
            "notFetch",
            b"* 1 EXPUNGE\r\n+ idling\r\na2 OK [READ-WRITE] BODY[] {1}x\r\n",
            [Relay(b"* 1 EXPUNGE\r\n+ idling\r\na2 OK [READ-WRITE] BODY[] {1}x\r\n")],
        ),
        (
            "tooManyDigitsIsText",
            b"* 1 FETCH (BODY[] {123456789012345678901}\r\n",
            [Relay(b"* 1 FETCH (BODY[] {123456789012345678901}\r\n")],
        ),
        (
            "sequenceTooLongIsNotFetch",
            b"* 12345678901 FETCH (BODY[] {1}\r\nx)\r\n",
            [Relay(b"* 12345678901 FETCH (BODY[] {1}\r\nx)\r\n")],
        ),
        (
            "literalNameIsNoItem",
            b"* 1 FETCH ({1}\r\nx {1}\r\ny)\r\n",
            [Relay(b"* 1 FETCH ({1}\r\nx {1}\r\ny)\r\n")],
        ),
        (
            "nestedLiteralThenBody",
            b'* 1 FETCH (BODYSTRUCTURE ("text" {5}\r\nplain NIL) BODY[TEXT] {2}\r\nhi)\r\n',
            [
                Relay(b'* 1 FETCH (BODYSTRUCTURE ("text" {5}\r\nplain NIL) BODY[TEXT] '),
                _start(2, b"BODY[TEXT]", section=b"TEXT"),
                MessageData(b"hi"),
                MessageEnd(),
                Relay(b")\r\n"),
            ],
        ),
        ("partialLine", b"* 1 FETCH (BODY[] {5}", [Relay(b"* 1 FETCH (")]),
        (
            "partialLiteral",
            b"* 1 FETCH (BODY[] {5}\r\nhel",
            [Relay(b"* 1 FETCH (BODY[] "), _start(5), MessageData(b"hel")],
        ),
    ]

    def test_knownAnswers(self) -> None:
        """Each case gives exactly its events, read whole and byte by byte."""
        for name, stream, expected in self.cases:
            self.assertEqual(normalise(imap_events([stream])), expected, name)
            one_by_one = [stream[i : i + 1] for i in range(len(stream))]
            self.assertEqual(normalise(imap_events(one_by_one)), expected, name)

    def test_wholeOrNot(self) -> None:
        """Only BODY[], BINARY[] and RFC822 without a partial range are whole messages."""
        self.assertTrue(_start(1).whole)
        self.assertTrue(_start(1, b"RFC822").whole)
        self.assertFalse(_start(1, b"BODY[]<0>", origin=0).whole)
        self.assertFalse(_start(1, b"BODY[1]", section=b"1").whole)

    def test_longLinesAreNotHeld(self) -> None:
        """A long answer line relays as it arrives: at most a few octets are held back."""
        framer = ImapFramer()
        framer.append(b"* SEARCH")
        for _ in range(1000):
            framer.append(b" 1234567")
            events: list[Any] = []
            drain(framer, events)
        self.assertTrue(events)
        framer.append(b"\r\n")
        drain(framer, [])

    def test_streamsTheMessage(self) -> None:
        """A big literal comes out chunk by chunk as it arrives."""
        framer = ImapFramer()
        content = b"z" * (4 << 20)
        framer.append(b"* 1 FETCH (BODY[] " + literal_marker(len(content)))
        drain(framer, [])
        sizes: list[int] = []
        for chunk in split_at(content + b")\r\n", range(65536, len(content), 65536)):
            framer.append(chunk)
            events: list[Any] = []
            drain(framer, events)
            sizes.extend(len(e.data) for e in events if isinstance(e, MessageData))
            self.assertTrue(sizes)
        self.assertEqual(sum(sizes), len(content))
        self.assertLessEqual(max(sizes), 65536)


_imap_items = st.sampled_from(
    [
        (b"FLAGS (\\Seen \\Answered)", None),
        (b"UID 42", None),
        (b"RFC822.SIZE 10", None),
        (b'ENVELOPE ("d" {3}\r\nx y NIL ("(" ")") "BODY[] {9}")', None),
        (b"BODY[]", (b"BODY[]", b"", None)),
        (b"BODY[]<10>", (b"BODY[]<10>", b"", 10)),
        (b"RFC822", (b"RFC822", b"", None)),
        (b"BODY[1.2.MIME]", (b"BODY[1.2.MIME]", b"1.2.MIME", None)),
        (b"BINARY[]", (b"BINARY[]", b"", None)),
    ]
)


def _imap_fetch(sequence: int, items: list[tuple[tuple[bytes, Any], bytes]]) -> tuple[bytes, list[Any]]:
    """An untagged FETCH answer and its events."""
    stream = bytearray(b"* %d FETCH (" % sequence)
    events: list[Any] = [Relay(bytes(stream))]
    uid: int | None = None
    for i, ((text, content_item), content) in enumerate(items):
        prefix = (b" " if i else b"") + text
        if content_item is None:
            stream += prefix
            events.append(Relay(prefix))
            if text.startswith(b"UID ") and uid is None:
                uid = int(text[4:])
            continue
        item, section, origin = content_item
        literal8 = item.startswith(b"BINARY")
        marker = literal_marker(len(content), literal8)
        stream += prefix + b" " + marker + content
        events.append(Relay(prefix + b" "))
        events.append(ImapMessageStart(sequence, item, section, origin, len(content), literal8, uid, marker))
        if content:
            events.append(MessageData(content))
        events.append(MessageEnd())
    stream += b")\r\n"
    events.append(Relay(b")\r\n"))
    return bytes(stream), events


_imap_others = st.sampled_from(
    [
        b"a1 OK FETCH completed\r\n",
        b"* 3 EXISTS\r\n",
        b'* LIST () "/" {5}\r\nINBOX\r\n',
        b"+ idling\r\n",
        b"* 1 FETCH (FLAGS ())\r\n",
    ]
).map(lambda line: (line, [Relay(line)]))
imap_sessions = st.lists(
    st.one_of(
        st.builds(
            _imap_fetch,
            st.integers(min_value=1, max_value=4294967295),
            st.lists(st.tuples(_imap_items, contents), max_size=4),
        ),
        _imap_others,
    ),
    max_size=5,
)
imap_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.sampled_from(
            [b"* 1 FETCH (", b"BODY[] ", b"{3}\r\n", b"~{2}\r\n", b"abc", b"\r\n", b'"', b"(", b")", b"UID 5 ", b"["]
        ),
        max_size=30,
    ).map(b"".join),
)


class ImapPropertyTests(SynchronousTestCase):
    """Properties of L{ImapFramer} over generated sessions and arbitrary bytes."""

    @given(imap_sessions, points)
    def test_anySplit(self, session: list[tuple[bytes, list[Any]]], cuts: list[int]) -> None:
        """Any split of the server's stream gives the session's events."""
        stream = b"".join(part for part, _ in session)
        expected = normalise([event for _, events in session for event in events])
        self.assertEqual(normalise(imap_events(split_at(stream, cuts))), expected)

    @given(imap_bytes, points)
    def test_arbitraryBytesRelayUntouched(self, stream: bytes, cuts: list[int]) -> None:
        """Whatever the bytes, nothing is raised, and relays, markers and contents give the stream back."""
        events = imap_events(split_at(stream, cuts))
        out = bytearray()
        for event in events:
            if isinstance(event, Relay | MessageData):
                out += event.data
            elif isinstance(event, ImapMessageStart):
                out += event.marker
        self.assertEqual(bytes(out), stream[: len(out)])
        self.assertEqual(normalise(events), normalise(imap_events([stream])))

    @given(imap_sessions, st.lists(contents, max_size=6))
    def test_replacedLiteralsFrameAgain(
        self, session: list[tuple[bytes, list[Any]]], replacements: list[bytes]
    ) -> None:
        """Messages replaced with a new literal (length rewritten) are found again with their new content."""
        stream = b"".join(part for part, _ in session)
        out = bytearray()
        new = iter(replacements)
        expected: list[bytes] = []
        replacing = False
        for event in imap_events([stream]):
            if isinstance(event, Relay):
                out += event.data
            elif isinstance(event, ImapMessageStart):
                replacement = next(new, None)
                replacing = replacement is not None
                if replacement is not None:
                    out += literal_marker(len(replacement), event.literal8) + replacement
                    expected.append(replacement)
                else:
                    out += event.marker
                    expected.append(b"")
            elif isinstance(event, MessageData) and not replacing:
                out += event.data
                expected[-1] += event.data
        found: list[bytes] = []
        for event in imap_events([bytes(out)]):
            if isinstance(event, ImapMessageStart):
                found.append(b"")
            elif isinstance(event, MessageData):
                found[-1] += event.data
        self.assertEqual(found, expected)


class SerialiserTests(SynchronousTestCase):
    """The helpers that build replacements."""

    cases: list[tuple[Callable[[], bytes], bytes]] = [
        (lambda: format_bdat(0, last=True), b"BDAT 0 LAST\r\n"),
        (lambda: format_bdat(1234), b"BDAT 1234\r\n"),
        (lambda: literal_marker(5), b"{5}\r\n"),
        (lambda: literal_marker(0, literal8=True), b"~{0}\r\n"),
    ]

    def test_knownAnswers(self) -> None:
        """Each helper builds the exact bytes."""
        for build, expected in self.cases:
            self.assertEqual(build(), expected)

    def test_negativeSizes(self) -> None:
        """A negative size is a programming error."""
        self.assertRaises(ValueError, format_bdat, -1)
        self.assertRaises(ValueError, literal_marker, -1)
