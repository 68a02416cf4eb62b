"""Message framing for inspecting sessions [4.9]: where the messages are in a relayed stream.

An inspecting session parses only what it must; this module finds the messages and
leaves everything else as bytes:

  - L{Pop3Framer}: the mail server's answers after login.  The answers to C{RETR} and
    C{TOP} are messages (dot-stuffed, ending with C{.CRLF}); which answer belongs to
    which command is known from the commands the client sent (L{Pop3Framer.feed_commands}).
  - L{SmtpFramer}: the client's stream after login.  The payload of C{DATA} (dot-stuffed,
    once the server has accepted C{DATA} with C{354}: L{SmtpFramer.data_reply}) and the
    chunks of C{BDAT n [LAST]} (RFC 3030) are messages.
  - L{ImapFramer}: the mail server's stream after login.  The literals of C{FETCH}
    answers carrying message content (C{BODY[...]}, which also answers C{BODY.PEEK[...]},
    C{BINARY[...]}, C{RFC822}, C{RFC822.HEADER}, C{RFC822.TEXT}) are messages;
    L{ImapMessageStart.whole} tells a whole message (C{BODY[]}, C{BINARY[]}, C{RFC822})
    from a part or a partial fetch.

Design: I{push bytes, pull events}, like L{mailgw.wire.lines.LineBuffer}::

    framer.append(data)
    while (event := framer.next_event()) is not None:
        match event:
            case Relay(data): ...          # pass on as it is
            case Pop3MessageStart() | SmtpMessageStart() | ImapMessageStart(): ...
            case MessageData(data): ...    # the message's own bytes (dot-stuffing undone)
            case MessageEnd(): ...

Everything outside messages comes out as L{Relay} events whose bytes, concatenated, are
exactly the input outside the messages; a message comes out as a start event (holding
the bytes that introduce it: the POP3 status line, the IMAP literal announcement), its
content in L{MessageData} chunks and a L{MessageEnd}.  To pass a message on unchanged,
write the start's bytes, then the content re-encoded (L{DotStuffer} / L{dot_stuff} for
POP3 and SMTP C{DATA}; as it is for IMAP and C{BDAT}); to replace it, write a
replacement with L{dot_stuff}, L{format_bdat} or L{literal_marker} (an IMAP literal's
announced length is then the new one).

Memory: a framer never holds a message.  What it holds beyond the bytes appended and not
yet pulled is bounded by a line limit (POP3 status lines, SMTP commands), by a few dozen
bytes (IMAP: the end of a partial line, where a literal announcement may be), or, for
SMTP, by C{max_held} octets that a client sends before C{DATA} is answered.  A
L{MessageData} carries at most what one L{append} brought (and so does a L{Relay},
except a POP3 status line or multi-line answer line bounded as above, and IMAP text
held back by a few dozen bytes).  The sequence of events, taken with adjacent
L{Relay} and adjacent L{MessageData} events joined, does not depend on how the input was
split into reads.

Errors: input that cannot be framed raises L{ProtocolError} (or a subclass), and nothing
else, whatever the bytes; the framer then stays failed (every later L{next_event} raises
again) and the session must be closed.  IMAP answers never fail: what is not understood
relays untouched.

Dot-stuffing (RFC 1939, RFC 5321 section 4.5.2): a line start is the start of the
message or the byte after an LF; a C{.} at a line start is removed, except in the
terminator, C{.CRLF} at the start of the message or after a CRLF.  L{DotStuffer} doubles
a C{.} at every line start (also after a bare LF, so that no receiver, whatever its
idea of a line end, finds an early end of data: SMTP smuggling) and ends the message
with CRLF where it does not end so already; C{parse(stuff(m)) == m} for every C{m} that
is empty or ends with CRLF, and C{stuff(parse(s)) == s} for what a conforming server
sends.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NoReturn, TypeAlias

from mailgw.wire import pop3
from mailgw.wire.errors import LineTooLong, ProtocolError
from mailgw.wire.lines import LineBuffer, TooLong

__all__ = [
    "BdatChunk",
    "DotStuffer",
    "ImapEvent",
    "ImapFramer",
    "ImapMessageStart",
    "MessageAborted",
    "MessageData",
    "MessageEnd",
    "Pop3Event",
    "Pop3Framer",
    "Pop3MessageStart",
    "Relay",
    "SmtpCommand",
    "SmtpEvent",
    "SmtpFramer",
    "SmtpMessageStart",
    "dot_stuff",
    "format_bdat",
    "literal_marker",
]

_LF = 0x0A
_CR = 0x0D
_DOT = 0x2E


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Relay:
    """Bytes outside any message, to pass on as they are."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageData:
    """A chunk of the current message's content (dot-stuffing undone)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The current message is complete (its terminator, if any, is consumed)."""


@dataclass(frozen=True, slots=True)
class MessageAborted:
    """SMTP: a C{BDAT} message ended without its C{LAST} chunk (the client sent another
    command, e.g. C{RSET}); the message is not to be delivered."""


@dataclass(frozen=True, slots=True)
class Pop3MessageStart:
    """
    A message starts: the positive answer to C{RETR} or C{TOP}.

    @ivar command: C{"RETR"} or C{"TOP"}.
    @ivar arguments: the command's arguments, e.g. C{("3",)} or C{("3", "10")}.
    @ivar status: the status line as received, with its line end (C{b"+OK 120 octets\\r\\n"}).
    """

    command: str
    arguments: tuple[str, ...]
    status: bytes


@dataclass(frozen=True, slots=True)
class SmtpCommand:
    """
    A command line of the client (not C{BDAT}), as received, with its line end.

    @ivar verb: the upper-cased first word (C{"MAIL"}, C{"RSET"}, C{"DATA"}, ...).
    """

    verb: str
    line: bytes


@dataclass(frozen=True, slots=True)
class SmtpMessageStart:
    """
    A message starts: C{kind} C{"DATA"} (after L{SmtpFramer.data_reply} accepted it) or
    C{"BDAT"} (before the first L{BdatChunk}).
    """

    kind: str


@dataclass(frozen=True, slots=True)
class BdatChunk:
    """
    A C{BDAT} command: C{size} octets of the current message follow (as L{MessageData});
    C{last} for C{BDAT n LAST}.  C{line} is the command line as received.
    """

    size: int
    last: bool
    line: bytes


@dataclass(frozen=True, slots=True)
class ImapMessageStart:
    """
    A literal holding message content starts inside an untagged C{FETCH} answer.

    The answer's text before it, up to and including the item name and its space
    (C{b"* 3 FETCH (UID 7 BODY[] "}), came out as L{Relay}; C{marker} is the literal's
    announcement as received (C{b"{1234}\\r\\n"}), to be written before the content
    when it passes unchanged.

    @ivar sequence: the message sequence number of the C{FETCH} answer.
    @ivar item: the data item name, upper-cased (C{b"BODY[]"}, C{b"BODY[1.2]<0>"},
        C{b"RFC822"}, C{b"BINARY[]"}).
    @ivar section: the section, upper-cased: C{b""} for the whole message, C{b"1.2"},
        C{b"HEADER"}, C{b"TEXT"} (C{RFC822.HEADER} and C{RFC822.TEXT} give the latter two).
    @ivar origin: the start of a partial fetch (C{BODY[]<0>}), or C{None}.
    @ivar size: the literal's length.
    @ivar literal8: whether it is a C{~{n}} literal (RFC 3516 C{BINARY}).
    @ivar uid: the C{UID} item of the answer when it came before the literal, or C{None}.
    """

    sequence: int
    item: bytes
    section: bytes
    origin: int | None
    size: int
    literal8: bool
    uid: int | None
    marker: bytes

    @property
    def whole(self) -> bool:
        """Whether the literal is a whole message (not a part, not a partial fetch)."""
        return self.section == b"" and self.origin is None


#: What each framer's C{next_event} gives.
Pop3Event: TypeAlias = Relay | Pop3MessageStart | MessageData | MessageEnd
SmtpEvent: TypeAlias = SmtpCommand | SmtpMessageStart | BdatChunk | MessageData | MessageEnd | MessageAborted
ImapEvent: TypeAlias = Relay | ImapMessageStart | MessageData | MessageEnd


# -- dot-stuffing -------------------------------------------------------------------------

# Decoder states: at a line start after CRLF or at the message start ("clean": the
# terminator may start here), at a line start after a bare LF, after a "." at either,
# after ".CR" at either, in a line (last byte not CR), in a line after a CR.
_START_CLEAN, _START, _DOT_CLEAN, _DOT_BARE, _DOT_CR_CLEAN, _DOT_CR_BARE, _MID, _MID_CR = range(8)


class _DotDecoder:
    """Undoes dot-stuffing incrementally and finds the terminator (module docstring)."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = _START_CLEAN

    def decode(self, data: bytes | bytearray, pos: int, out: list[bytes | bytearray] | None) -> tuple[int, bool]:
        """
        Read C{data} from C{pos}, appending the content to C{out} (unless C{None}).

        @return: where reading stopped (just after the terminator, or C{len(data)}) and
            whether the terminator was read.
        """
        n = len(data)
        state = self._state
        while pos < n:
            if state == _MID or state == _MID_CR:
                lf = data.find(b"\n.", pos)
                if lf < 0:
                    if out is not None:
                        out.append(data[pos:])
                    last = data[n - 1]
                    if last == _LF:
                        clean = data[n - 2] == _CR if n - 1 > pos else state == _MID_CR
                        state = _START_CLEAN if clean else _START
                    else:
                        state = _MID_CR if last == _CR else _MID
                    pos = n
                    break
                clean = data[lf - 1] == _CR if lf > pos else state == _MID_CR
                if out is not None:
                    out.append(data[pos : lf + 1])
                pos = lf + 2
                state = _DOT_CLEAN if clean else _DOT_BARE
                continue
            byte = data[pos]
            if state == _START_CLEAN or state == _START:
                if byte == _DOT:
                    state = _DOT_CLEAN if state == _START_CLEAN else _DOT_BARE
                    pos += 1
                else:
                    state = _MID
            elif state == _DOT_CLEAN or state == _DOT_BARE:
                if byte == _CR:
                    state = _DOT_CR_CLEAN if state == _DOT_CLEAN else _DOT_CR_BARE
                    pos += 1
                else:
                    state = _MID  # the stuffed dot is dropped
            elif byte == _LF:  # ".CRLF" at a line start
                pos += 1
                if state == _DOT_CR_CLEAN:
                    self._state = _START_CLEAN
                    return pos, True
                if out is not None:
                    out.append(b"\r\n")  # after a bare LF: not the end, the dot goes
                state = _START_CLEAN
            else:
                if out is not None:
                    out.append(b"\r")
                state = _MID_CR
        self._state = state
        return pos, False


class DotStuffer:
    """
    Encodes a message for POP3 or SMTP C{DATA}, incrementally: L{stuff} each chunk of
    content, then L{end} for the (CRLF and) terminator.
    """

    __slots__ = ("_line_start", "_tail")

    def __init__(self) -> None:
        self._line_start = True
        self._tail = b""

    def stuff(self, data: bytes) -> bytes:
        """The encoding of the next chunk of content."""
        if not data:
            return b""
        out = data.replace(b"\n.", b"\n..")
        if self._line_start and data[0] == _DOT:
            out = b"." + out
        self._line_start = data[-1] == _LF
        self._tail = (self._tail + data[-2:])[-2:]
        return out

    def end(self) -> bytes:
        """The end of the message: C{.CRLF}, after a CRLF if the content did not end with one."""
        if self._tail and self._tail != b"\r\n":
            return b"\r\n.\r\n"
        return b".\r\n"


def dot_stuff(message: bytes) -> bytes:
    """A whole message encoded for POP3 or SMTP C{DATA}, terminator included."""
    stuffer = DotStuffer()
    return stuffer.stuff(message) + stuffer.end()


def format_bdat(size: int, last: bool = False) -> bytes:
    """A C{BDAT} command line (RFC 3030) announcing C{size} octets."""
    if size < 0:
        raise ValueError("a chunk size is not negative")
    return b"BDAT %d LAST\r\n" % size if last else b"BDAT %d\r\n" % size


def literal_marker(size: int, literal8: bool = False) -> bytes:
    """The announcement of an IMAP literal of C{size} octets (C{~{n}} for a literal8)."""
    if size < 0:
        raise ValueError("a literal size is not negative")
    return (b"~{%d}\r\n" if literal8 else b"{%d}\r\n") % size


# -- the common machinery ------------------------------------------------------------------


class _Input:
    """Bytes appended and not yet framed (consumed ones are dropped lazily)."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def append(self, data: bytes) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    @property
    def available(self) -> int:
        return len(self.buf) - self.pos

    def take(self, count: int) -> bytes:
        """Up to C{count} octets off the front."""
        end = min(self.pos + count, len(self.buf))
        chunk = bytes(self.buf[self.pos : end])
        self.advance(end)
        return chunk

    def advance(self, pos: int) -> None:
        self.pos = pos
        if pos == len(self.buf):
            self.buf = bytearray()
            self.pos = 0


# -- POP3 ---------------------------------------------------------------------------------

_SINGLE, _MULTI, _MESSAGE = range(3)
_STATUS, _IN_MULTI, _IN_MESSAGE, _FAILED = range(4)
_POSITIVE = re.compile(rb"\+OK(?=[ \r\n]|\Z)")
_NEGATIVE = re.compile(rb"-ERR(?=[ \r\n]|\Z)")


class Pop3Framer:
    """
    Finds the messages in a POP3 server's answers after login.

    L{feed_commands} takes the client's commands as they are sent to the server (before
    the server can answer them); L{append} the server's bytes.  Multi-line answers are
    those to C{RETR}, C{TOP} (messages), C{LIST} and C{UIDL} without argument, C{CAPA}
    and C{AUTH} without argument, when positive.  So that the gateway and the server
    agree on every command, a command line that L{mailgw.wire.pop3.parse_command}
    refuses (NUL, CR in the line, no 3-4 letter keyword, over 255 octets) raises
    L{ProtocolError}, and so does an answer that is not a status line where one is due
    (the answers would be out of step with the commands).

    @param max_status_line: the longest status line accepted, line end included.
    @param max_pipeline: the most commands awaiting an answer.
    """

    def __init__(self, *, max_status_line: int = 4096, max_pipeline: int = 4096) -> None:
        self._lines = LineBuffer(pop3.MAX_COMMAND_LINE)
        self._pending: deque[tuple[int, pop3.Command | None]] = deque()
        self._max_status = max_status_line
        self._max_pipeline = max_pipeline
        self._input = _Input()
        self._state = _STATUS
        self._decoder = _DotDecoder()
        self._ready: deque[Pop3Event] = deque()
        self._error: ProtocolError | None = None

    @property
    def pending_commands(self) -> int:
        """Commands sent and not answered yet."""
        return len(self._pending)

    def feed_commands(self, data: bytes) -> None:
        """
        Take bytes the client sent to the server.

        @raise ProtocolError: for a command line the framer could not agree on with the
            server, or beyond C{max_pipeline} unanswered commands.
        """
        self._check()
        for line in self._lines.feed(data):
            if isinstance(line, TooLong):
                self._fail(LineTooLong("POP3 command line too long"))
            try:
                command = pop3.parse_command(line)
            except ProtocolError as e:
                self._fail(e)
            if len(self._pending) >= self._max_pipeline:
                self._fail(ProtocolError("too many POP3 commands awaiting an answer"))
            self._pending.append((_kind(command), command))

    def append(self, data: bytes) -> None:
        """Take bytes the server sent; pull events with L{next_event}."""
        self._input.append(data)

    def next_event(self) -> Pop3Event | None:
        """
        The next event, or C{None} when more input is needed.

        @raise ProtocolError: for a server stream out of step with the commands.
        """
        self._check()
        while not self._ready:
            if not self._step():
                return None
        return self._ready.popleft()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._error = error
        self._state = _FAILED
        raise error

    def _step(self) -> bool:
        source = self._input
        if not source.available:
            return False
        if self._state == _STATUS:
            buf = source.buf
            lf = buf.find(b"\n", source.pos, source.pos + self._max_status)
            if lf < 0:
                if source.available >= self._max_status:
                    self._fail(LineTooLong("POP3 status line too long"))
                return False
            line = source.take(lf + 1 - source.pos)
            kind, command = self._pending.popleft() if self._pending else (_SINGLE, None)
            if _POSITIVE.match(line):
                if kind == _MESSAGE:
                    assert command is not None
                    self._ready.append(Pop3MessageStart(command.name, command.args, line))
                    self._state = _IN_MESSAGE
                    return True
                if kind == _MULTI:
                    self._state = _IN_MULTI
            elif not _NEGATIVE.match(line):
                self._fail(ProtocolError("not a POP3 status line where an answer was due"))
            self._ready.append(Relay(line))
            return True
        start = source.pos
        if self._state == _IN_MESSAGE:
            pieces: list[bytes | bytearray] = []
            end, done = self._decoder.decode(source.buf, start, pieces)
            source.advance(end)
            content = b"".join(pieces)
            if content:
                self._ready.append(MessageData(content))
            if done:
                self._ready.append(MessageEnd())
                self._state = _STATUS
            return True
        end, done = self._decoder.decode(source.buf, start, None)
        self._ready.append(Relay(source.take(end - start)))
        if done:
            self._state = _STATUS
        return True


def _kind(command: pop3.Command) -> int:
    if command.name in ("RETR", "TOP"):
        return _MESSAGE
    if command.name == "CAPA" or (command.name in ("LIST", "UIDL", "AUTH") and not command.args):
        return _MULTI
    return _SINGLE


# -- SMTP ---------------------------------------------------------------------------------

_COMMAND, _AWAIT_REPLY, _DATA, _CHUNK, _SMTP_FAILED = range(5)
_BDAT = re.compile(rb"BDAT ([0-9]{1,20})( LAST)?\r?\n", re.IGNORECASE)


class SmtpFramer:
    """
    Finds the messages in an SMTP client's stream after login.

    After a C{DATA} command the framer stops until the caller calls L{data_reply}:
    C{True} when the server (or the gateway itself) answered C{354}, and the payload
    follows; C{False} otherwise, and commands follow.  The bytes a client sends before
    that are held, at most C{max_held} (a client must wait for the C{354}, RFC 2920).
    C{BDAT} chunks need no answer: their octets follow the command line at once.  A
    C{BDAT} line that is not C{BDAT <digits> [LAST]} raises L{ProtocolError}: where its
    data ends would not be known.

    @param max_line: the longest command line accepted, line end included.
    @param max_held: the most octets held while waiting for L{data_reply}.
    """

    def __init__(self, *, max_line: int = 4096, max_held: int = 65536) -> None:
        self._max_line = max_line
        self._max_held = max_held
        self._input = _Input()
        self._state = _COMMAND
        self._decoder = _DotDecoder()
        self._ready: deque[SmtpEvent] = deque()
        self._remaining = 0
        self._last = False
        self._in_bdat = False
        self._error: ProtocolError | None = None

    @property
    def awaiting_data_reply(self) -> bool:
        """Whether the framer waits for L{data_reply}."""
        return self._state == _AWAIT_REPLY

    def append(self, data: bytes) -> None:
        """Take bytes the client sent; pull events with L{next_event}."""
        self._input.append(data)

    def data_reply(self, accepted: bool) -> None:
        """Say how C{DATA} was answered: C{True} for C{354}.  Only while L{awaiting_data_reply}."""
        if self._state != _AWAIT_REPLY:
            raise ValueError("no DATA command awaits its reply")
        if accepted:
            self._ready.append(SmtpMessageStart("DATA"))
            self._decoder = _DotDecoder()
            self._state = _DATA
        else:
            self._state = _COMMAND

    def next_event(self) -> SmtpEvent | None:
        """
        The next event, or C{None} when more input (or L{data_reply}) is needed.

        @raise ProtocolError: for a command line over C{max_line}, a malformed C{BDAT},
            or over C{max_held} octets sent before the reply to C{DATA}.
        """
        if self._error is not None:
            raise self._error
        while not self._ready:
            if not self._step():
                return None
        return self._ready.popleft()

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._error = error
        self._state = _SMTP_FAILED
        raise error

    def _step(self) -> bool:
        source = self._input
        state = self._state
        if state == _AWAIT_REPLY:
            if source.available > self._max_held:
                self._fail(ProtocolError("SMTP client sent data before the reply to DATA"))
            return False
        if state == _CHUNK:
            if self._remaining:
                if not source.available:
                    return False
                data = source.take(self._remaining)
                self._remaining -= len(data)
                self._ready.append(MessageData(data))
            if not self._remaining:
                if self._last:
                    self._ready.append(MessageEnd())
                    self._in_bdat = False
                self._state = _COMMAND
            return True
        if not source.available:
            return False
        if state == _DATA:
            start = source.pos
            pieces: list[bytes | bytearray] = []
            end, done = self._decoder.decode(source.buf, start, pieces)
            source.advance(end)
            content = b"".join(pieces)
            if content:
                self._ready.append(MessageData(content))
            if done:
                self._ready.append(MessageEnd())
                self._state = _COMMAND
            return True
        buf = source.buf
        lf = buf.find(b"\n", source.pos, source.pos + self._max_line)
        if lf < 0:
            if source.available >= self._max_line:
                self._fail(LineTooLong("SMTP command line too long"))
            return False
        line = source.take(lf + 1 - source.pos)
        verb = line.split(b" ", 1)[0].rstrip(b"\r\n").upper().decode("ascii", "replace")
        if verb == "BDAT":
            match = _BDAT.fullmatch(line)
            if match is None:
                self._fail(ProtocolError("malformed BDAT command"))
            if not self._in_bdat:
                self._ready.append(SmtpMessageStart("BDAT"))
                self._in_bdat = True
            self._remaining = int(match.group(1))
            self._last = match.group(2) is not None
            self._ready.append(BdatChunk(self._remaining, self._last, line))
            self._state = _CHUNK
            return True
        if self._in_bdat:
            self._ready.append(MessageAborted())
            self._in_bdat = False
        self._ready.append(SmtpCommand(verb, line))
        if verb == "DATA":
            self._state = _AWAIT_REPLY
        return True


# -- IMAP ---------------------------------------------------------------------------------

_RESPONSE, _LINE, _LITERAL = range(3)
# A literal announcement at the end of a line: {n} or ~{n} (server answers have no "+").
_LITERAL_AT_END = re.compile(rb"(~?)\{([0-9]{1,20})\}\r?\n\Z")
#: Octets at the end of a partial line kept back: a whole announcement (without its LF).
_KEEP = 24
_FETCH_HEAD = re.compile(rb"\* ([0-9]{1,10}) FETCH \(", re.IGNORECASE)
_FETCH_HEAD_MAX = 20  # len(b"* 4294967295 FETCH (")
# Every proper prefix of a FETCH head (to know whether to wait for more bytes).
_FETCH_HEAD_PREFIX = re.compile(rb"\*(?: (?:[0-9]{1,10}(?: (?:F(?:E(?:T(?:C(?:H(?: )?)?)?)?)?)?)?)?)?", re.IGNORECASE)
_BODY_ITEM = re.compile(rb"(?:BODY|BINARY)(?:\.PEEK)?\[([^\]]*)\](?:<([0-9]{1,10})>)?")
_RFC822_ITEMS: Mapping[bytes, bytes] = MappingProxyType(
    {b"RFC822": b"", b"RFC822.HEADER": b"HEADER", b"RFC822.TEXT": b"TEXT"}
)
_MAX_ITEM = 256


def _content_item(name: bytes) -> tuple[bytes, int | None] | None:
    """The section and origin of a FETCH data item carrying message content, if it is one."""
    if name in _RFC822_ITEMS:
        return _RFC822_ITEMS[name], None
    match = _BODY_ITEM.fullmatch(name)
    if match is None:
        return None
    origin = match.group(2)
    return match.group(1), int(origin) if origin is not None else None


class _FetchScanner:
    """
    Follows the text of one untagged FETCH answer (outside its literals) far enough to
    know the data item each literal belongs to: parentheses, quoted strings, and atoms
    with their C{[section]} (which may hold parentheses and spaces).
    """

    __slots__ = ("_bracket", "_depth", "_escape", "_expect_name", "_name", "_quoted", "_token", "uid")

    def __init__(self) -> None:
        self._depth = 1  # just after "* n FETCH ("
        self._quoted = False
        self._escape = False
        self._bracket = False
        self._token: bytearray | None = None  # the atom being read at depth 1
        self._expect_name = True
        self._name = b""
        self.uid: int | None = None

    def feed(self, text: bytes) -> None:
        for byte in text:
            if self._quoted:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:
                    self._quoted = False
                    if self._depth == 1:
                        self._item(None)
            elif self._bracket:
                self._add(byte)
                if byte == 0x5D:  # ]
                    self._bracket = False
            elif byte == 0x22:
                self._end_token()
                self._quoted = True
            elif byte == 0x28:  # (
                self._end_token()
                self._depth += 1
            elif byte == 0x29:  # )
                self._end_token()
                if self._depth > 0:
                    self._depth -= 1
                    if self._depth == 1:
                        self._item(None)
            elif byte in b" \r\n":
                self._end_token()
            else:
                if byte == 0x5B:  # [
                    self._bracket = True
                self._add(byte)

    def literal(self) -> bytes | None:
        """A literal starts here: the item name it is the value of, if at the top level."""
        self._end_token()
        if self._depth != 1 or self._expect_name:
            return None
        name = self._name
        self._item(None)
        return name

    def _add(self, byte: int) -> None:
        if self._depth != 1:
            return
        if self._token is None:
            self._token = bytearray()
        if len(self._token) <= _MAX_ITEM:
            self._token.append(byte)

    def _end_token(self) -> None:
        if self._token is not None:
            token, self._token = bytes(self._token), None
            self._item(token)

    def _item(self, token: bytes | None) -> None:
        """A name or a value at the top level ended (C{None}: not an atom)."""
        if self._expect_name:
            self._name = token.upper() if token is not None and len(token) <= _MAX_ITEM else b""
            self._expect_name = False
            return
        if self._name == b"UID" and token is not None and token.isdigit() and len(token) <= 10:
            self.uid = int(token)
        self._expect_name = True


class ImapFramer:
    """
    Finds the message literals in an IMAP server's stream after login (see the module
    docstring); everything else comes out as L{Relay}.

    Framing follows RFC 9051: an answer is a line, continued after every literal
    announced at its end (C{{n}}, C{~{n}}) by the literal's octets and more line.  Only
    untagged C{FETCH} answers are looked into.  Nothing here raises: bytes that do not
    parse relay untouched.
    """

    def __init__(self) -> None:
        self._input = _Input()
        self._state = _RESPONSE
        self._fetch: _FetchScanner | None = None
        self._sequence = 0
        self._remaining = 0
        self._in_message = False
        self._ready: deque[ImapEvent] = deque()

    def append(self, data: bytes) -> None:
        """Take bytes the server sent; pull events with L{next_event}."""
        self._input.append(data)

    def next_event(self) -> ImapEvent | None:
        """The next event, or C{None} when more input is needed."""
        while not self._ready:
            if not self._step():
                return None
        return self._ready.popleft()

    def _relay(self, text: bytes) -> None:
        if text:
            if self._fetch is not None:
                self._fetch.feed(text)
            self._ready.append(Relay(text))

    def _step(self) -> bool:
        source = self._input
        if self._state == _LITERAL:
            if self._remaining:
                if not source.available:
                    return False
                data = source.take(self._remaining)
                self._remaining -= len(data)
                self._ready.append(MessageData(data) if self._in_message else Relay(data))
            if not self._remaining:
                if self._in_message:
                    self._ready.append(MessageEnd())
                    self._in_message = False
                self._state = _LINE
            return True
        if not source.available:
            return False
        buf, pos = source.buf, source.pos
        if self._state == _RESPONSE:
            head = bytes(buf[pos : pos + _FETCH_HEAD_MAX])
            match = _FETCH_HEAD.match(head)
            if match is None and b"\n" not in head and len(head) < _FETCH_HEAD_MAX:
                if _FETCH_HEAD_PREFIX.fullmatch(head):
                    return False  # could still be a FETCH answer
            self._state = _LINE
            if match is not None:
                self._sequence = int(match.group(1))
                self._ready.append(Relay(source.take(match.end())))
                self._fetch = _FetchScanner()
            return True
        lf = buf.find(b"\n", pos)
        if lf < 0:
            keep_from = len(buf) - _KEEP
            if keep_from <= pos:
                return False
            self._relay(source.take(keep_from - pos))
            return True
        marker = _LITERAL_AT_END.search(buf, max(pos, lf - _KEEP), lf + 1)
        if marker is None:
            self._relay(source.take(lf + 1 - pos))
            self._state = _RESPONSE
            self._fetch = None
            return True
        self._relay(source.take(marker.start() - pos))
        announcement = source.take(marker.end() - marker.start())
        self._remaining = int(marker.group(2))
        self._state = _LITERAL
        name = self._fetch.literal() if self._fetch is not None else None
        content = _content_item(name) if name is not None else None
        if content is None:
            self._ready.append(Relay(announcement))
            return True
        section, origin = content
        assert self._fetch is not None and name is not None
        self._ready.append(
            ImapMessageStart(
                sequence=self._sequence,
                item=name,
                section=section,
                origin=origin,
                size=self._remaining,
                literal8=bool(marker.group(1)),
                uid=self._fetch.uid,
                marker=announcement,
            )
        )
        self._in_message = True
        return True
