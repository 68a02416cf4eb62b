"""Tests for :mod:`mailgw.wire.lines`."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire.lines import Line, LineBuffer, TooLong

# Byte strings rich in terminators, so that lines are short and CR/LF corner cases common.
_pieces = st.sampled_from([b"a", b"bc", b"\r", b"\n", b"\r\n", b"xyzxyzxyz", b"\x00", b"\xff"])
streams = st.one_of(st.lists(_pieces, max_size=60).map(b"".join), st.binary(max_size=300))
max_lengths = st.integers(min_value=1, max_value=24)


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (clamped, in any order, repeats allowed)."""
    cuts = sorted({min(max(point, 0), len(data)) for point in points})
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def model(data: bytes, max_length: int) -> tuple[list[Line], bytes]:
    """What framing ``data`` must give: an independent, whole-input statement of the rules."""
    *complete, last = data.split(b"\n")
    lines: list[Line] = []
    for segment in complete:
        if len(segment) + 1 > max_length:
            lines.append(TooLong(max_length))
        else:
            lines.append(segment[:-1] if segment.endswith(b"\r") else segment)
    if len(last) >= max_length:
        # Cannot end within the limit: reported now, its bytes thrown away.
        return [*lines, TooLong(max_length)], b""
    return lines, last


class LineBufferKnownAnswerTests(SynchronousTestCase):
    """Tables of input chunks and the lines they give."""

    # (max_length, chunks, lines, pending)
    cases: list[tuple[int, list[bytes], list[Line], bytes]] = [
        (100, [b"USER alice\r\n"], [b"USER alice"], b""),
        (100, [b"USER alice\n"], [b"USER alice"], b""),
        (100, [b"A\r\nB\nC\r\n"], [b"A", b"B", b"C"], b""),
        (100, [b"\r\n\n"], [b"", b""], b""),
        (100, [b"US", b"ER a", b"\r", b"\n"], [b"USER a"], b""),
        (100, [b"a\rb\r\n"], [b"a\rb"], b""),
        (100, [b"a\r\r\n"], [b"a\r"], b""),
        (100, [b"STAT\r\nRETR 1"], [b"STAT"], b"RETR 1"),
        (100, [b"no terminator\r"], [], b"no terminator\r"),
        (100, [b""], [], b""),
        # The limit counts the terminator as sent.
        (10, [b"12345678\r\n"], [b"12345678"], b""),
        (10, [b"123456789\n"], [b"123456789"], b""),
        (10, [b"123456789\r\n"], [TooLong(10)], b""),
        (10, [b"1234567890\n"], [TooLong(10)], b""),
        # Detected before the terminator arrives; the rest of the line is thrown away.
        (10, [b"1234567890"], [TooLong(10)], b""),
        (10, [b"12345", b"67890", b"abc"], [TooLong(10)], b""),
        (10, [b"123456789"], [], b"123456789"),
        (10, [b"1234567890123\r\nok\r\n"], [TooLong(10), b"ok"], b""),
        (10, [b"12345", b"67890", b"abc\r", b"\nok\r\nnext"], [TooLong(10), b"ok"], b"next"),
        (10, [b"x" * 1000 + b"\nA\n" + b"y" * 25], [TooLong(10), b"A", TooLong(10)], b""),
        (1, [b"\n\nx\n"], [b"", b"", TooLong(1)], b""),
    ]

    def test_knownAnswers(self) -> None:
        """Each table row's chunks give exactly its lines and leave its pending bytes."""
        for max_length, chunks, expected, pending in self.cases:
            buffer = LineBuffer(max_length)
            lines = [line for chunk in chunks for line in buffer.feed(chunk)]
            self.assertEqual((lines, buffer.pending()), (expected, pending), (max_length, chunks))

    def test_oneMarkerPerLongLine(self) -> None:
        """An overlong line fed one byte at a time gives a single TooLong, then framing resumes."""
        buffer = LineBuffer(8)
        lines: list[Line] = []
        for byte in b"z" * 500 + b"\r\nNOOP\r\n":
            lines.extend(buffer.feed(bytes([byte])))
            self.assertLess(len(buffer.pending()), 8)
        self.assertEqual(lines, [TooLong(8), b"NOOP"])

    def test_maxLengthProperty(self) -> None:
        """max_length reports the limit given; a limit below 1 is a ValueError."""
        self.assertEqual(LineBuffer(255).max_length, 255)
        self.assertRaises(ValueError, LineBuffer, 0)
        self.assertRaises(ValueError, LineBuffer, -5)

    def test_tooLongIsValue(self) -> None:
        """TooLong markers compare by their limit and are immutable."""
        self.assertEqual(TooLong(5), TooLong(5))
        self.assertNotEqual(TooLong(5), TooLong(6))
        self.assertNotEqual(TooLong(5), b"")


class LineBufferPullTests(SynchronousTestCase):
    """append/next_line/take_rest: the stop-after-this-line mode."""

    def test_nextLinePullsOneAtATime(self) -> None:
        """next_line returns the buffered lines in order, then None, leaving the partial rest."""
        buffer = LineBuffer(100)
        buffer.append(b"USER a\r\nPASS b\r\nST")
        self.assertEqual(buffer.next_line(), b"USER a")
        self.assertEqual(buffer.pending(), b"PASS b\r\nST")
        self.assertEqual(buffer.next_line(), b"PASS b")
        self.assertIsNone(buffer.next_line())
        self.assertEqual(buffer.pending(), b"ST")

    def test_takeRestAfterLoginLine(self) -> None:
        """take_rest returns every byte after the last line pulled, verbatim, and empties the buffer."""
        buffer = LineBuffer(100)
        buffer.append(b"USER a\r\nPASS b\r\nSTAT\r\nRETR 1\nLIST")
        self.assertEqual(buffer.next_line(), b"USER a")
        self.assertEqual(buffer.next_line(), b"PASS b")
        self.assertEqual(buffer.take_rest(), b"STAT\r\nRETR 1\nLIST")
        self.assertEqual(buffer.pending(), b"")
        self.assertIsNone(buffer.next_line())
        self.assertEqual(buffer.take_rest(), b"")

    def test_takeRestKeepsOverlongBytes(self) -> None:
        """Bytes not yet pulled are relayed as they are, even a line that would be too long."""
        buffer = LineBuffer(10)
        buffer.append(b"PASS x\r\n" + b"y" * 50)
        self.assertEqual(buffer.next_line(), b"PASS x")
        self.assertEqual(buffer.take_rest(), b"y" * 50)

    def test_appendAfterPartialPull(self) -> None:
        """Appending after pulling only some lines keeps the unpulled ones, in order."""
        buffer = LineBuffer(100)
        buffer.append(b"A\r\nB\r\nC")
        self.assertEqual(buffer.next_line(), b"A")
        buffer.append(b"D\r\nE")
        self.assertEqual(buffer.drain(), [b"B", b"CD"])
        self.assertEqual(buffer.pending(), b"E")

    def test_clearDropsPipelinedCommands(self) -> None:
        """clear() drops complete and partial lines alike (commands pipelined after STLS)."""
        buffer = LineBuffer(100)
        buffer.append(b"STLS\r\nUSER injected\r\nPASS x")
        self.assertEqual(buffer.next_line(), b"STLS")
        buffer.clear()
        self.assertEqual(buffer.pending(), b"")
        self.assertEqual(buffer.feed(b"CAPA\r\n"), [b"CAPA"])

    def test_clearEndsDiscarding(self) -> None:
        """clear() during the discard of an overlong line starts afresh: the next line is kept."""
        buffer = LineBuffer(5)
        self.assertEqual(buffer.feed(b"abcdefgh"), [TooLong(5)])
        buffer.clear()
        self.assertEqual(buffer.feed(b"ok\r\n"), [b"ok"])

    def test_pendingWhileDiscarding(self) -> None:
        """While an overlong line is being discarded nothing of it is pending; what follows it is."""
        buffer = LineBuffer(5)
        buffer.append(b"abcdefgh")
        self.assertEqual(buffer.next_line(), TooLong(5))
        self.assertEqual(buffer.pending(), b"")
        buffer.append(b"ij\nNEXT")
        self.assertEqual(buffer.pending(), b"NEXT")
        self.assertEqual(buffer.drain(), [])
        self.assertEqual(buffer.pending(), b"NEXT")

    def test_idleBufferHoldsOnlyPartialLine(self) -> None:
        """Once next_line returns None, the storage holds only the partial line, not the last read."""
        buffer = LineBuffer(100)
        buffer.feed(b"NOOP\r\n" * 1000 + b"par")
        self.assertEqual(len(buffer._buf), 3)


class LineBufferPropertyTests(SynchronousTestCase):
    """Properties over generated streams, split points and limits."""

    @given(data=streams, max_length=max_lengths)
    def test_matchesModel(self, data: bytes, max_length: int) -> None:
        """Framing the whole input at once gives the lines and pending bytes of the reference model."""
        buffer = LineBuffer(max_length)
        lines = buffer.feed(data)
        self.assertEqual((lines, buffer.pending()), model(data, max_length))

    @given(data=streams, max_length=max_lengths, points=st.lists(st.integers(0, 300)))
    def test_splitInvariance(self, data: bytes, max_length: int, points: list[int]) -> None:
        """The same input split at any points gives the same lines and the same pending bytes."""
        whole = LineBuffer(max_length)
        expected = whole.feed(data)
        split = LineBuffer(max_length)
        lines: list[Line] = []
        for chunk in split_at(data, points):
            lines.extend(split.feed(chunk))
        self.assertEqual(lines, expected)
        self.assertEqual(split.pending(), whole.pending())

    @given(data=streams, max_length=max_lengths, points=st.lists(st.integers(0, 300)))
    def test_boundedBuffer(self, data: bytes, max_length: int, points: list[int]) -> None:
        """After every feed fewer than max_length bytes are held, whatever the input."""
        buffer = LineBuffer(max_length)
        for chunk in split_at(data, points):
            buffer.feed(chunk)
            self.assertLess(len(buffer.pending()), max_length)
            self.assertLess(len(buffer._buf), max_length)

    @given(data=streams, max_length=max_lengths, points=st.lists(st.integers(0, 300)))
    def test_pullEqualsFeed(self, data: bytes, max_length: int, points: list[int]) -> None:
        """append + next_line one at a time gives what feed gives."""
        buffer = LineBuffer(max_length)
        pulled: list[Line] = []
        for chunk in split_at(data, points):
            buffer.append(chunk)
            while (line := buffer.next_line()) is not None:
                pulled.append(line)
        self.assertEqual(pulled, LineBuffer(max_length).feed(data))

    @given(
        lines=st.lists(
            st.tuples(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), st.booleans()),
            max_size=10,
        ),
        tail=st.binary(max_size=30),
        taken=st.integers(0, 10),
        points=st.lists(st.integers(0, 300)),
    )
    def test_takeRestIsExactSuffix(
        self, lines: list[tuple[bytes, bool]], tail: bytes, taken: int, points: list[int]
    ) -> None:
        """Pulling k lines then take_rest gives exactly the input after the k-th terminator."""
        raw = [line + (b"\r\n" if crlf else b"\n") for line, crlf in lines]
        data = b"".join(raw) + tail
        taken = min(taken, len(raw))
        buffer = LineBuffer(100)
        chunks = split_at(data, points)
        pulled: list[Line] = []
        for chunk in chunks:
            buffer.append(chunk)
            while len(pulled) < taken and (line := buffer.next_line()) is not None:
                pulled.append(line)
        self.assertEqual(len(pulled), taken)
        self.assertEqual(buffer.take_rest(), b"".join(raw[taken:]) + tail)
        self.assertEqual(buffer.pending(), b"")
