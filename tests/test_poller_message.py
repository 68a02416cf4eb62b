"""The poller's pure parts: listings, the end of a streamed RETR, header blocks,
recipient discovery, the trace header and loop check, MIME boundaries [6]."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.poller import message as msg
from mailgw.wire.errors import ProtocolError


def stuff(data: bytes) -> bytes:
    """A message as a POP3 server sends it after +OK (dot-stuffed, terminated)."""
    lines = data.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def scan(chunks: list[bytes]) -> tuple[bytes, bytes]:
    scanner = msg.DotStreamScanner()
    payload = b""
    for index, chunk in enumerate(chunks):
        part, done, rest = scanner.feed(chunk)
        payload += part
        if done:
            return payload, rest + b"".join(chunks[index + 1 :])
    raise AssertionError("no terminator")


def unstuff_stream(payload: bytes) -> bytes:
    lines = payload.split(b"\r\n")
    return b"\r\n".join(msg.unstuff(line) for line in lines)


class ListingTests(SynchronousTestCase):
    def test_uidlLines(self) -> None:
        """A UIDL line is a message number and a 1-70 character id of 0x21-0x7E;
        anything else is a ProtocolError."""
        self.assertEqual(msg.parse_uidl_line(b"1 whqtswO00WBw418f9t5JxYwZ"), (1, "whqtswO00WBw418f9t5JxYwZ"))
        self.assertEqual(msg.parse_uidl_line(b"12 " + b"x" * 70), (12, "x" * 70))
        for bad in (
            b"",
            b"1",
            b"1 ",
            b"x abc",
            b"0 abc",
            b"-1 abc",
            b"1 a b",
            b"1 " + b"x" * 71,
            b"1 caf\xc3\xa9",
            b"1  abc",
            b"99999999999 abc",
        ):
            self.assertRaises(ProtocolError, msg.parse_uidl_line, bad)

    def test_listLines(self) -> None:
        """A LIST line is a number and a size, possibly followed by more (RFC 1939)."""
        self.assertEqual(msg.parse_list_line(b"3 1200"), (3, 1200))
        self.assertEqual(msg.parse_list_line(b"3 1200 extra"), (3, 1200))
        for bad in (b"", b"3", b"3 x", b"x 3"):
            self.assertRaises(ProtocolError, msg.parse_list_line, bad)

    @given(st.binary(max_size=100))
    def test_listingParsersOnlyRaiseProtocolError(self, line: bytes) -> None:
        """Arbitrary bytes give a value or a ProtocolError, nothing else."""
        for parse in (msg.parse_uidl_line, msg.parse_list_line):
            try:
                parse(line)
            except ProtocolError:
                pass


class DotStreamScannerTests(SynchronousTestCase):
    def test_terminator(self) -> None:
        """The payload stops before the lone dot line; what follows it is returned."""
        self.assertEqual(scan([b"a\r\n..b\r\n.\r\n+OK next\r\n"]), (b"a\r\n..b\r\n", b"+OK next\r\n"))

    def test_emptyMessage(self) -> None:
        """A terminator at once gives an empty payload."""
        self.assertEqual(scan([b".\r\n"]), (b"", b""))

    def test_dotLinesAreNotTerminators(self) -> None:
        """Stuffed dots, a dot followed by text or a space, stay in the payload."""
        payload = b"..\r\n.. \r\n..x\r\n. \r\nend\r\n"
        self.assertEqual(scan([payload + b".\r\n"]), (payload, b""))

    def test_splitTerminator(self) -> None:
        """A terminator split across reads, even byte by byte, is found."""
        data = b"line\r\n.\r\nrest"
        self.assertEqual(scan([bytes([b]) for b in data]), (b"line\r\n", b"rest"))

    def test_bareLF(self) -> None:
        """A bare LF ends lines (and the terminator) too."""
        self.assertEqual(scan([b"a\n.\n"]), (b"a\n", b""))

    def test_heldBackBounded(self) -> None:
        """At most two bytes are held back between reads."""
        scanner = msg.DotStreamScanner()
        payload, done, _ = scanner.feed(b"x" * 1000 + b"\r\n.\r")
        self.assertFalse(done)
        self.assertEqual(len(payload), 1002)

    @given(
        st.lists(st.sampled_from([b"", b".", b"..", b"a", b". ", b".x", b"\r", b"text line"]), max_size=30),
        st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    )
    def test_splitInvariance(self, lines: list[bytes], cuts: list[int]) -> None:
        """Whatever the message and however the stream is split, the payload is the
        stuffed message and un-stuffing it gives the message back."""
        original = b"".join(line + b"\r\n" for line in lines)
        wire = stuff(original) + b"+OK after"
        points = sorted({min(c, len(wire)) for c in cuts})
        chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
        payload, rest = scan(chunks)
        self.assertEqual(rest, b"+OK after")
        self.assertEqual(unstuff_stream(payload), original)


class HeaderTests(SynchronousTestCase):
    def test_unfolding(self) -> None:
        """Folded values are unfolded; names keep their spelling; lookups ignore case."""
        block = msg.parse_header_block([b"To: a@example.com,", b"\tb@example.com", b"subject: hi"])
        self.assertEqual(block.fields, [("To", "a@example.com,\tb@example.com"), ("subject", "hi")])
        self.assertEqual(block.get("SUBJECT"), "hi")

    def test_noHeaders(self) -> None:
        """An empty block, a folded first line or a first line that is no field: the
        message has no headers."""
        for lines in ([], [b" folded"], [b"Hello world"], [b"no colon here"]):
            with self.assertRaises(msg.MalformedMessage) as caught:
                msg.parse_header_block(lines)
            self.assertEqual(caught.exception.kind, "no_headers")

    def test_malformedLine(self) -> None:
        """A later line that is neither a field nor a continuation is malformed."""
        with self.assertRaises(msg.MalformedMessage) as caught:
            msg.parse_header_block([b"To: a@example.com", b"junk line"])
        self.assertEqual(caught.exception.kind, "malformed_header")

    def test_checkHeaderLine(self) -> None:
        """The per-line check agrees with the block parser."""
        msg.check_header_line(b"To: x", first=True)
        msg.check_header_line(b" cont", first=False)
        self.assertRaises(msg.MalformedMessage, msg.check_header_line, b" cont", first=True)
        self.assertRaises(msg.MalformedMessage, msg.check_header_line, b"Hello", first=True)
        self.assertRaises(msg.MalformedMessage, msg.check_header_line, b"Hello", first=False)

    @given(st.lists(st.binary(max_size=40), max_size=8))
    def test_parserOnlyRaisesProtocolError(self, lines: list[bytes]) -> None:
        """Arbitrary header lines give a block or a MalformedMessage."""
        try:
            block = msg.parse_header_block(lines)
        except msg.MalformedMessage:
            return
        msg.find_recipients(block, msg.RecipientRule("example.com", received_parsing=True))
        msg.message_id(block)
        msg.envelope_sender(block)
        try:
            msg.multipart_boundary(block)
        except msg.MalformedMessage:
            pass

    def test_messageId(self) -> None:
        """The Message-ID is read with its brackets, whitespace normalised."""
        block = msg.parse_header_block([b"Message-ID:", b" <abc@example.net>"])
        self.assertEqual(msg.message_id(block), "<abc@example.net>")
        self.assertIsNone(msg.message_id(msg.parse_header_block([b"Subject: x"])))

    def test_envelopeSender(self) -> None:
        """Return-Path gives the bounce address; an odd one gives the null sender."""
        self.assertEqual(
            msg.envelope_sender(msg.parse_header_block([b"Return-Path: <b@example.net>"])), "b@example.net"
        )
        self.assertEqual(msg.envelope_sender(msg.parse_header_block([b"Return-Path: <>"])), "")
        self.assertEqual(msg.envelope_sender(msg.parse_header_block([b"Return-Path: <a@x>, <b@y>"])), "")
        self.assertEqual(msg.envelope_sender(msg.parse_header_block([b"Subject: x"])), "")


def headers(*lines: str) -> msg.HeaderBlock:
    return msg.parse_header_block([line.encode() for line in lines])


class RecipientTests(SynchronousTestCase):
    rule = msg.RecipientRule("example.com")

    def test_order(self) -> None:
        """The first header of the list yielding an address at the domain wins; later
        ones are not read."""
        block = headers("To: alice@example.com", "Delivered-To: mailbox@isp.example", "X-Envelope-To: bob@example.com")
        self.assertEqual(msg.find_recipients(block, self.rule), (["bob@example.com"], "X-Envelope-To"))

    def test_toAndCcTogether(self) -> None:
        """To and Cc are one step: both contribute; duplicates and other domains go."""
        block = headers(
            "To: Alice <alice@example.com>, someone@elsewhere.example",
            "Cc: bob@EXAMPLE.com, ALICE@example.com",
        )
        self.assertEqual(msg.find_recipients(block, self.rule), (["alice@example.com", "bob@EXAMPLE.com"], "To/Cc"))

    def test_nobody(self) -> None:
        """No address at the domain: no recipient."""
        block = headers("To: someone@elsewhere.example", "Delivered-To: box@isp.example")
        self.assertEqual(msg.find_recipients(block, self.rule), ([], None))

    def test_customList(self) -> None:
        """An account's own header list replaces the default."""
        rule = msg.RecipientRule("example.com", headers=("X-Rcpt",))
        block = headers("To: alice@example.com", "X-Rcpt: carol@example.com")
        self.assertEqual(msg.find_recipients(block, rule), (["carol@example.com"], "X-Rcpt"))

    def test_received(self) -> None:
        """With Received parsing on, "for <addr>" is read after the envelope headers
        and before To/Cc, skipping the first N Received headers."""
        block = headers(
            "Received: from a by mx.isp.example for <mailbox@isp.example>; Mon, 1 Jan 2024",
            "Received: from b by relay.example.com with ESMTP id 1 for <dave@example.com>; Mon, 1 Jan 2024",
            "Received: from c by gw for carol@example.com; Mon, 1 Jan 2024",
            "To: alice@example.com",
        )
        self.assertEqual(msg.find_recipients(block, self.rule)[0], ["alice@example.com"])
        rule = msg.RecipientRule("example.com", received_parsing=True)
        self.assertEqual(msg.find_recipients(block, rule), (["dave@example.com", "carol@example.com"], "Received"))
        rule = msg.RecipientRule("example.com", received_parsing=True, skip_received=2)
        self.assertEqual(msg.find_recipients(block, rule)[0], ["carol@example.com"])

    def test_receivedPlacedExplicitly(self) -> None:
        """ "Received" in the header list sets its place; without the option it is
        ignored."""
        plan = msg.recipient_plan(
            msg.RecipientRule("example.com", headers=("Received", "To/Cc"), received_parsing=True)
        )
        self.assertEqual(plan, [("Received",), ("To", "Cc")])
        plan = msg.recipient_plan(msg.RecipientRule("example.com", headers=("Received", "To/Cc")))
        self.assertEqual(plan, [("To", "Cc")])

    def test_validEntries(self) -> None:
        """Header list entries are field names or Name/Name pairs."""
        self.assertTrue(msg.valid_header_entry("To/Cc"))
        self.assertTrue(msg.valid_header_entry("X-Original-To"))
        for bad in ("", "To:", "To Cc", "To//Cc", "Tö"):
            self.assertFalse(msg.valid_header_entry(bad))


class TraceTests(SynchronousTestCase):
    def test_traceHeader(self) -> None:
        """The trace names the remote server, this gateway and the account, folded,
        and is recognised as a loop for the same account only."""
        trace = msg.trace_header("gw1", 7, "pop.isp.example", 1704110400.0)
        self.assertEqual(
            trace,
            b"Received: from pop.isp.example\r\n\tby gw1 (mailgw poller account 7)\r\n"
            b"\twith POP3; Mon, 01 Jan 2024 12:00:00 +0000\r\n",
        )
        lines = trace.rstrip(b"\r\n").split(b"\r\n")
        block = msg.parse_header_block([*lines, b"Subject: x"])
        self.assertTrue(msg.has_loop_trace(block, "gw1", 7))
        self.assertFalse(msg.has_loop_trace(block, "gw1", 8))
        self.assertFalse(msg.has_loop_trace(block, "gw2", 7))

    def test_unsafeNames(self) -> None:
        """Odd node names and server addresses cannot inject header lines."""
        trace = msg.trace_header("gw\r\nBcc: x", 1, "::1", 0.0)
        self.assertEqual(trace.count(b"\r\n"), 3)
        self.assertIn(b"from [IPv6:::1]", trace)
        self.assertIn(b"from unknown", msg.trace_header("gw", 1, "bad host\r\n", 0.0))


class MimeTests(SynchronousTestCase):
    def test_boundary(self) -> None:
        """A multipart type gives its boundary; other types none."""
        self.assertEqual(msg.multipart_boundary(headers('Content-Type: multipart/mixed; boundary="=_b 1"')), b"=_b 1")
        self.assertIsNone(msg.multipart_boundary(headers("Content-Type: text/plain")))
        self.assertIsNone(msg.multipart_boundary(headers("Subject: none")))

    def test_brokenBoundary(self) -> None:
        """A multipart type without a usable boundary is broken MIME."""
        for value in (
            "multipart/mixed",
            'multipart/mixed; boundary=""',
            'multipart/mixed; boundary="a\x01b"',
            'multipart/mixed; boundary="' + "x" * 71 + '"',
        ):
            with self.assertRaises(msg.MalformedMessage) as caught:
                msg.multipart_boundary(headers(f"Content-Type: {value}"))
            self.assertEqual(caught.exception.kind, "broken_mime")

    def test_boundaryLines(self) -> None:
        """Delimiter and close-delimiter lines, with transport padding, are boundaries."""
        self.assertTrue(msg.is_boundary_line(b"--abc", b"abc"))
        self.assertTrue(msg.is_boundary_line(b"--abc--", b"abc"))
        self.assertTrue(msg.is_boundary_line(b"--abc  ", b"abc"))
        self.assertFalse(msg.is_boundary_line(b"--abcd", b"abc"))
        self.assertFalse(msg.is_boundary_line(b"-abc", b"abc"))
