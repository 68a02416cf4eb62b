"""Incremental line framing for the pre-login dialogues (POP3, IMAP4, SMTP).

Design: *push bytes, pull lines*.  :meth:`LineBuffer.append` only stores bytes;
:meth:`LineBuffer.next_line` takes one line off the front, or returns ``None`` when no
complete line is buffered.  A proxy therefore reads exactly as far as it wants to::

    buffer.append(data)
    while (line := buffer.next_line()) is not None:
        if handle(line) is LOGGED_IN:
            relay.write(buffer.take_rest())   # everything after the login line, unparsed
            break

:meth:`LineBuffer.feed` (append, then pull every complete line) is the shortcut for a
caller that never stops part-way through a read.

Lines end with CRLF; a bare LF is accepted too.  The terminator is not part of the
returned line (a CR before the LF is removed; any other CR stays and is for the protocol
parser to refuse).

Length limit: ``max_length`` counts a line *with its terminator as sent*, the way
RFC 2449 (POP3, 255 octets) and RFC 5321 (SMTP, 512 octets) state their limits, so those
numbers are passed as they are.  A longer line comes out as a single :class:`TooLong`
marker in its place.  It is detected as soon as ``max_length`` bytes without an LF are
buffered; from then on the buffer throws bytes away up to and including the next LF and
then frames normally again.  So after :meth:`feed`, or once :meth:`next_line` has returned
``None``, at most ``max_length - 1`` bytes are held, whatever the peer sends.  Bytes that
were appended but not yet pulled are held until pulled or taken: their amount is bounded
by what the transport hands over in one read.

The sequence of lines and markers does not depend on how the input was split into reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["Line", "LineBuffer", "TooLong"]


@dataclass(frozen=True)
class TooLong:
    """Stands in for one line longer than ``limit`` octets (terminator included).

    The content of the line is not kept.
    """

    limit: int


#: What :meth:`LineBuffer.next_line` yields: a line, or the marker of an overlong one.
Line: TypeAlias = bytes | TooLong


class LineBuffer:
    """Splits a byte stream into lines, bounded by ``max_length``; see the module docstring."""

    __slots__ = ("_buf", "_discarding", "_max", "_scanned", "_start")

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self._max = max_length
        self._buf = bytearray()
        # Unconsumed bytes are self._buf[self._start:]; consumed ones are dropped lazily,
        # on the next append, so that pulling many short lines stays linear.
        self._start = 0
        # Offset up to which self._buf is known to hold no LF (avoids rescanning a long
        # partial line on every byte of a slow peer).
        self._scanned = 0
        # True after a TooLong until the LF that ends the overlong line.
        self._discarding = False

    @property
    def max_length(self) -> int:
        """The longest accepted line, terminator included."""
        return self._max

    def append(self, data: bytes) -> None:
        """Add bytes to the buffer; pull lines with :meth:`next_line`."""
        if self._start:
            del self._buf[: self._start]
            self._scanned = max(self._scanned - self._start, 0)
            self._start = 0
        self._buf += data

    def next_line(self) -> Line | None:
        """Take the next complete line (without its terminator) off the buffer.

        Returns a :class:`TooLong` marker in place of an overlong line, and ``None`` when
        no complete line is buffered (the partial rest stays, see :meth:`pending`).
        """
        buf = self._buf
        if self._discarding:
            lf = buf.find(b"\n", self._start)
            if lf < 0:
                self._reset()
                return None
            self._discarding = False
            self._start = self._scanned = lf + 1
        start = self._start
        # Only the first max_length bytes of the line can hold its LF.
        window_end = min(len(buf), start + self._max)
        lf = buf.find(b"\n", max(self._scanned, start), window_end)
        if lf >= 0:
            end = lf - 1 if lf > start and buf[lf - 1] == 0x0D else lf
            line = bytes(buf[start:end])
            self._start = self._scanned = lf + 1
            if self._start == len(buf):
                self._reset()
            return line
        if window_end - start >= self._max:
            # max_length bytes and no LF: the line cannot end within the limit.
            self._start = self._scanned = window_end
            self._discarding = True
            return TooLong(self._max)
        self._scanned = window_end
        if start:
            # Drop the lines taken from this read now: an idle session keeps only its
            # partial line, never the whole last read.
            del buf[:start]
            self._scanned -= start
            self._start = 0
        return None

    def drain(self) -> list[Line]:
        """Pull every complete line currently buffered."""
        lines: list[Line] = []
        while (line := self.next_line()) is not None:
            lines.append(line)
        return lines

    def feed(self, data: bytes) -> list[Line]:
        """Append ``data`` and pull every complete line: ``append`` then ``drain``."""
        self.append(data)
        return self.drain()

    def pending(self) -> bytes:
        """The bytes appended but not yet taken as lines (nothing of a discarded line)."""
        if self._discarding:
            lf = self._buf.find(b"\n", self._start)
            return b"" if lf < 0 else bytes(self._buf[lf + 1 :])
        return bytes(self._buf[self._start :])

    def take_rest(self) -> bytes:
        """Return :meth:`pending` and empty the buffer (hand-over to the raw relay)."""
        rest = self.pending()
        self.clear()
        return rest

    def clear(self) -> None:
        """Drop everything buffered, including an overlong line being discarded.

        Used after STARTTLS/STLS: what was pipelined behind it in cleartext must not be
        executed inside the TLS session.
        """
        self._reset()
        self._discarding = False

    def _reset(self) -> None:
        self._buf = bytearray()
        self._start = 0
        self._scanned = 0
