"""IMAP4rev1/IMAP4rev2 pre-login codec: RFC 3501, RFC 9051, LITERAL+/LITERAL- (RFC 7888),
SASL-IR (RFC 4959), ID (RFC 2971).

Both directions the gateway speaks before login:

- towards clients (the proxy is the server): :class:`CommandReader` frames and parses
  their commands, literals included; :func:`tagged`, :func:`untagged`,
  :func:`continuation`, :func:`capability_line`, :func:`quote` and :func:`id_response`
  build answers;
- towards mail servers (the gateway's login client): :func:`format_login` and
  :func:`format_authenticate_plain` build commands, :func:`parse_response` reads answers
  (framed by ``LineBuffer(MAX_RESPONSE_LINE)``).

After login nothing is parsed: the proxy takes the unparsed rest with
:meth:`CommandReader.take_rest` and relays.

**Reading commands.**  *Push bytes, pull events*, like :class:`~mailgw.wire.lines.LineBuffer`::

    reader.append(data)
    while (event := reader.next_event()) is not None:
        ...   # Command, NeedContinuation, BadCommand, TooBig or TooLong

A command is one line, or several lines joined by literals: a line ending in ``{n}``
(synchronizing: the client waits for ``+``), ``{n+}`` (non-synchronizing, RFC 7888) is
followed by exactly n octets of literal data, then the command goes on.  Framing comes
first and does not depend on the rest of the syntax, so the reader always knows where the
next command starts.  Client errors are events, never exceptions:

- :class:`BadCommand` — a syntax error; the reader has moved on to the next command.
  Invalid literal syntax is one: a size that is not a string of ASCII digits
  (``{abc}``, ``{-1}``, ``{ 5}``, ``{5x}``, ``{}``, ``{5-}``), and a literal8 (``~{n}``,
  RFC 3516/9051, not allowed before login).
- :class:`TooBig` — a literal announcement was refused before anything was allocated
  because of its size: a number over 4294967295 (``{99999999999}``), a size over
  ``max_literal`` (``{2147483648}``), or a command that would exceed ``max_command``
  octets in all.  A command exceeding ``max_command`` without a literal gives
  :class:`TooBig` too.  The proxy answers it ``BAD [TOOBIG]`` (RFC 7888, RFC 7889).
- :class:`~mailgw.wire.lines.TooLong` — a line over ``max_line`` octets; the command it
  belonged to is abandoned and the reader resumes after the line's LF.

Refused *synchronizing* literals are simple: the client gets no ``+``, sends no data, and
the next line is a new command.  A refused **non-synchronizing** literal is sent anyway,
and so is one that ends a line holding a syntax error (:class:`BadCommand`).
This reader's choice: when the announced size is a valid number it *skips* exactly that
many octets, counting them down without storing them, then discards the rest of the
command (further ``{n+}`` literals in it are skipped the same way) and resumes; the
connection stays usable, as RFC 7888 allows.  When the size of a ``{…+}`` announcement
is not a valid number (not digits, or over 4294967295), the end of the data cannot be
known: the event (:class:`BadCommand` or :class:`TooBig`) has ``fatal=True``, the reader
stops producing events and drops whatever arrives, and the proxy must answer and close
the connection (what nginx does for every oversized literal).  Treating the data as
commands instead would let a literal's contents be executed as commands.

Memory bound: once :meth:`CommandReader.next_event` has returned ``None``, the reader holds
less than ``max_line`` octets of partial line plus the command being assembled, at most
``max_command`` octets (of which a literal in progress is at most ``max_literal``) — never
more, whatever sizes are announced.  The events do not depend on how the input was split
into reads.

**Arguments.**  :data:`Arg` is ``str | None | tuple[Arg, ...]``: atoms come back as
:class:`Atom` (a ``str`` subclass, so that ``NIL`` can be told from ``"NIL"``), quoted strings
and literals as plain ``str`` (UTF-8; anything else is a :class:`BadCommand`; NUL is refused
in literals, CR, LF and NUL in quoted strings), parenthesised lists as tuples.  ``None``
appears only in the value positions of ``ID`` (``NIL``).  Leniencies: runs of spaces
between arguments and trailing spaces are accepted; atoms may hold 8-bit UTF-8 and a
leading ``\\`` (flags).  Tags are strict (RFC 3501 tag characters).

The commands recognised before login are checked and normalised (:class:`Command`):
``CAPABILITY``, ``NOOP``, ``LOGOUT``, ``STARTTLS`` take no arguments; ``LOGIN`` gives
``(user, password)`` as ``str``; ``AUTHENTICATE`` gives ``(MECHANISM,)`` or
``(MECHANISM, initial_response)`` with the response as sent (``=`` is the empty one);
``ID`` gives ``(None,)`` for ``NIL`` or ``((field, value, field, value, …),)`` with ``None``
for a ``NIL`` value.  Every other command comes back generically parsed, for the proxy to
answer ``BAD`` or ``NO``.

A literal may carry CR and LF (that is what literals are for): the login parser of
:mod:`mailgw.wire.login` refuses them in usernames and passwords.

:class:`Command` hides the arguments of ``LOGIN`` and ``AUTHENTICATE`` from its ``repr``,
and no event or error message ever contains client input beyond a tag.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TypeAlias

from mailgw.wire import sasl
from mailgw.wire.errors import ProtocolError
from mailgw.wire.lines import LineBuffer, TooLong

__all__ = [
    "DEFAULT_MAX_COMMAND",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_LITERAL",
    "MAX_LITERAL_SIZE",
    "MAX_RESPONSE_LINE",
    "Arg",
    "Atom",
    "BadCommand",
    "Command",
    "CommandReader",
    "Event",
    "NeedContinuation",
    "Response",
    "TooBig",
    "TooLong",
    "capability_line",
    "continuation",
    "format_authenticate_plain",
    "format_login",
    "id_response",
    "parse_response",
    "quote",
    "tagged",
    "untagged",
]

#: Largest literal size that is a valid ``number`` (RFC 9051: unsigned 32-bit).
MAX_LITERAL_SIZE = 4294967295
#: :class:`CommandReader`'s default limits: a line, one literal, a whole command.
DEFAULT_MAX_LINE = 8192
DEFAULT_MAX_LITERAL = 64 * 1024
DEFAULT_MAX_COMMAND = 64 * 1024
#: A sensible line limit for a server's pre-login responses (greeting, CAPABILITY, tagged).
MAX_RESPONSE_LINE = 16384
#: Commands whose arguments are secret and kept out of ``repr``.
_SECRET_COMMANDS = frozenset({"LOGIN", "AUTHENTICATE"})
_NO_ARGUMENT_COMMANDS = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"})
#: Deepest nesting of parenthesised lists accepted.
_MAX_DEPTH = 16
#: RFC 2971 limits.
_ID_MAX_PAIRS = 30
_ID_MAX_FIELD = 30
_ID_MAX_VALUE = 1024
#: format_login writes longer values as literals: some servers' line limits are small.
_QUOTE_MAX = 1024

# tag = 1*<any ASTRING-CHAR except "+">: CHAR minus SP, CTL, "(", ")", "{", "%", "*",
# '"', "\" and "+" ("]" is allowed).
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
_TAG_TEXT = re.compile(r'[^\x00-\x20\x7f-\U0010ffff(){%*"\\+]+')
# Lenient atom: no CTL, SP, "(", ")", "{", '"', "\" (8-bit allowed); an optional leading
# "\" for flags.
_ATOM = re.compile(rb'\\?[^\x00-\x20\x7f(){"\\]+')
_ATOM_TEXT = re.compile(r'[^\x00-\x20\x7f-\U0010ffff(){"\\%*\]]+')
# Quoted string, unrolled: no CR, LF, NUL; only \" and \\ as escapes.
_QUOTED = re.compile(rb'"([^"\\\x00\r\n]*(?:\\["\\][^"\\\x00\r\n]*)*)"')
_UNESCAPE = re.compile(rb'\\(["\\])')
_FORBIDDEN_IN_TEXT = re.compile(r"[\x00\r\n]")
_RESP_CODE_TEXT = re.compile(r"[A-Za-z0-9.\-_]+(?: [^\]\x00\r\n]+)?")
_SPACE = 0x20
_LPAREN = 0x28
_RPAREN = 0x29
_DQUOTE = 0x22


class Atom(str):
    """An argument sent as an atom (``NIL``, ``PLAIN``, ``alice``), as opposed to a string.

    It compares equal to the plain ``str`` of the same text.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


#: An argument: an atom or string (``str``), ``NIL`` where the syntax allows it (``None``),
#: or a parenthesised list (``tuple``).
Arg: TypeAlias = "str | tuple[Arg, ...] | None"


@dataclass(frozen=True)
class Command:
    """A complete command: tag, upper-cased name and arguments (see the module docstring)."""

    tag: str
    name: str
    args: tuple[Arg, ...]

    def __repr__(self) -> str:
        args = "<hidden>" if self.name in _SECRET_COMMANDS and self.args else repr(self.args)
        return f"Command(tag={self.tag!r}, name={self.name!r}, args={args})"


@dataclass(frozen=True)
class NeedContinuation:
    """A synchronizing literal ``{n}`` was announced and accepted: send
    :func:`continuation` (``+ Ready for literal data``); the reader then waits for n octets."""

    tag: str


@dataclass(frozen=True)
class BadCommand:
    """A syntax error: answer ``tag BAD …`` (``* BAD …`` when ``tag`` is ``None``, the tag
    itself being invalid) and count an error.  ``reason`` never holds client input.

    With ``fatal`` (invalid syntax in a ``{…+}`` announcement: its data follows unasked,
    and where it ends is unknown) the reader has stopped, and the proxy must close the
    connection after answering.
    """

    tag: str | None
    reason: str
    fatal: bool = False


@dataclass(frozen=True)
class TooBig:
    """A literal announcement was refused, or the command exceeds ``max_command``.

    Answer ``tag BAD [TOOBIG] …`` (or ``* BAD``).  With ``fatal`` the reader cannot find
    the end of the command (a ``{…+}`` literal of unknown size): it stops, and the proxy
    must close the connection after answering.
    """

    tag: str | None
    reason: str
    fatal: bool = False


#: What :meth:`CommandReader.next_event` returns (besides ``None``).
Event: TypeAlias = Command | NeedContinuation | BadCommand | TooBig | TooLong


class _State(enum.Enum):
    LINE = 1
    LITERAL = 2
    SKIP = 3
    FAILED = 4


class _SyntaxError(Exception):
    """Raised inside the parser, turned into :class:`BadCommand`."""

    def __init__(self, tag: str | None, reason: str) -> None:
        super().__init__(reason)
        self.tag = tag
        self.reason = reason


class _Parser:
    """Incremental parser of one command, fed segment by segment and literal by literal.

    A segment is a line, or the part of it before a literal announcement, without the
    terminator.  Tokens never span segments: a literal starts an argument.
    """

    def __init__(self) -> None:
        self.tag: str | None = None
        self.name: str | None = None
        self._stack: list[list[Arg]] = [[]]
        self._need_space = False

    def segment(self, seg: bytes, literal_follows: bool) -> None:
        pos = 0
        if self.name is None:
            pos = self._head(seg, literal_follows)
        stack = self._stack
        end = len(seg)
        while pos < end:
            byte = seg[pos]
            if byte == _SPACE:
                pos += 1
                self._need_space = False
                continue
            if byte == _RPAREN:
                if len(stack) == 1:
                    raise _SyntaxError(self.tag, "unbalanced parenthesis")
                items = stack.pop()
                stack[-1].append(tuple(items))
                pos += 1
                self._need_space = True
                continue
            if self._need_space:
                raise _SyntaxError(self.tag, "missing space between arguments")
            if byte == _LPAREN:
                if len(stack) > _MAX_DEPTH:
                    raise _SyntaxError(self.tag, "lists nested too deeply")
                stack.append([])
                pos += 1
                continue
            if byte == _DQUOTE:
                match = _QUOTED.match(seg, pos)
                if match is None:
                    raise _SyntaxError(self.tag, "invalid quoted string")
                stack[-1].append(self._decode(_UNESCAPE.sub(rb"\1", match.group(1))))
                pos = match.end()
            else:
                match = _ATOM.match(seg, pos)
                if match is None:
                    raise _SyntaxError(self.tag, "invalid character in command")
                stack[-1].append(Atom(self._decode(match.group())))
                pos = match.end()
            self._need_space = True
        if literal_follows and self._need_space:
            raise _SyntaxError(self.tag, "a literal must follow a space or parenthesis")

    def _head(self, seg: bytes, literal_follows: bool) -> int:
        """Parse ``tag SP name``; return the position after the name."""
        tag, space, _ = seg.partition(b" ")
        if not _TAG.fullmatch(tag):
            raise _SyntaxError(None, "invalid tag")
        self.tag = tag.decode("ascii")
        pos = len(tag)
        while pos < len(seg) and seg[pos] == _SPACE:
            pos += 1
        match = _ATOM.match(seg, pos)
        if not space or match is None:
            raise _SyntaxError(self.tag, "missing command name")
        name = match.group()
        if not name.isascii() or name.startswith(b"\\"):
            raise _SyntaxError(self.tag, "invalid command name")
        self.name = name.decode("ascii").upper()
        self._need_space = True
        return match.end()

    def literal(self, data: bytes) -> None:
        if b"\x00" in data:
            raise _SyntaxError(self.tag, "NUL in literal")
        self._stack[-1].append(self._decode(data))
        self._need_space = True

    def finish(self) -> Command:
        if self.tag is None or self.name is None:
            raise _SyntaxError(self.tag, "missing command name")
        if len(self._stack) != 1:
            raise _SyntaxError(self.tag, "unbalanced parenthesis")
        return _interpret(self.tag, self.name, tuple(self._stack[0]))

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _SyntaxError(self.tag, "argument is not UTF-8") from None


def _interpret(tag: str, name: str, args: tuple[Arg, ...]) -> Command:
    """Check and normalise the arguments of the commands recognised before login."""
    if name in _NO_ARGUMENT_COMMANDS:
        if args:
            raise _SyntaxError(tag, f"{name} takes no arguments")
    elif name == "LOGIN":
        if len(args) != 2 or not all(isinstance(arg, str) for arg in args):
            raise _SyntaxError(tag, "LOGIN needs a user name and a password")
        args = tuple(str(arg) for arg in args)
    elif name == "AUTHENTICATE":
        if not 1 <= len(args) <= 2 or not all(isinstance(arg, Atom) for arg in args):
            raise _SyntaxError(tag, "AUTHENTICATE needs a mechanism and an optional initial response")
        mechanism, *response = (str(arg) for arg in args)
        args = (mechanism.upper(), *response)
    elif name == "ID":
        args = (_interpret_id(tag, args),)
    return Command(tag=tag, name=name, args=args)


def _interpret_id(tag: str, args: tuple[Arg, ...]) -> Arg:
    if len(args) != 1:
        raise _SyntaxError(tag, "ID needs one parameter list or NIL")
    params = args[0]
    if isinstance(params, Atom) and params.upper() == "NIL":
        return None
    if not isinstance(params, tuple) or len(params) % 2 or len(params) > 2 * _ID_MAX_PAIRS:
        raise _SyntaxError(tag, "invalid ID parameter list")
    result: list[str | None] = []
    for index, item in enumerate(params):
        nil = isinstance(item, Atom) and item.upper() == "NIL"
        if nil and index % 2:
            result.append(None)
            continue
        if nil or not isinstance(item, str):
            raise _SyntaxError(tag, "invalid ID parameter list")
        limit = _ID_MAX_VALUE if index % 2 else _ID_MAX_FIELD
        if len(item.encode("utf-8")) > limit:
            raise _SyntaxError(tag, "ID field or value too long")
        result.append(str(item))
    return tuple(result)


@dataclass(frozen=True)
class _Marker:
    """A literal announcement ending a line: ``{n}``, ``{n+}``, ``~{n}`` or ``~{n+}``."""

    start: int
    size: int | None  # None: not a valid number
    nonsync: bool
    literal8: bool
    numeric: bool  # the size is ASCII digits (maybe too many of them)


def _find_marker(line: bytes) -> _Marker | None:
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start < 0:
        return None
    body = line[start + 1 : -1]
    literal8 = start > 0 and line[start - 1] == 0x7E  # "~"
    nonsync = body.endswith(b"+")
    digits = body[:-1] if nonsync else body
    numeric = digits.isdigit()  # ASCII digits only, and not empty
    size: int | None = None
    if numeric:
        # At most 10 significant digits before int(): the value is client-controlled.
        significant = digits.lstrip(b"0") or b"0"
        if len(significant) <= 10:
            value = int(significant)
            size = value if value <= MAX_LITERAL_SIZE else None
    return _Marker(start - 1 if literal8 else start, size, nonsync, literal8, numeric)


class CommandReader:
    """Frames and parses the client's pre-login commands; see the module docstring.

    ``max_line`` bounds each line (terminator included), ``max_literal`` each literal,
    ``max_command`` a whole command: its lines (counted with CRLF) and literals
    (defaults :data:`DEFAULT_MAX_LINE`, :data:`DEFAULT_MAX_LITERAL`,
    :data:`DEFAULT_MAX_COMMAND`).  A literal is also bounded by ``max_command``.
    """

    __slots__ = (
        "_discarding",
        "_fed",
        "_lines",
        "_literal",
        "_max_command",
        "_max_literal",
        "_parser",
        "_pos",
        "_raw",
        "_size",
        "_state",
        "_tag",
        "_want",
    )

    def __init__(
        self,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
        max_command: int = DEFAULT_MAX_COMMAND,
    ) -> None:
        if max_literal < 0 or max_command < 1:
            raise ValueError("invalid limits")
        # Received bytes go to self._raw; only the bytes up to the next LF are moved into
        # the line framer, so that a literal's octets are taken from self._raw directly,
        # without copying what follows them (linear work, however many literals a read holds).
        self._lines = LineBuffer(max_line)
        self._raw = bytearray()
        self._pos = 0
        self._max_literal = max_literal
        self._max_command = max_command
        self._state = _State.LINE
        self._parser: _Parser | None = None
        self._literal = bytearray()
        #: octets of the literal being read, or left to skip
        self._want = 0
        #: octets of the command so far
        self._size = 0
        #: octets handed to the parser (lines and literals) for the current command
        self._fed = 0
        #: the command was refused; its remaining lines (and {n+} literals) are dropped
        self._discarding = False
        self._tag: str | None = None

    @property
    def max_line(self) -> int:
        """The longest line accepted, terminator included."""
        return self._lines.max_length

    @property
    def max_literal(self) -> int:
        """The largest literal accepted."""
        return self._max_literal

    @property
    def failed(self) -> bool:
        """Whether a fatal :class:`BadCommand` or :class:`TooBig` stopped the reader."""
        return self._state is _State.FAILED

    @property
    def buffered(self) -> int:
        """Octets held: partial line, command being assembled and literal in progress."""
        unread = len(self._raw) - self._pos
        return len(self._lines.pending()) + unread + len(self._literal) + self._fed

    def append(self, data: bytes) -> None:
        """Add bytes received from the client; pull events with :meth:`next_event`."""
        if self._state is not _State.FAILED:
            if self._pos:
                del self._raw[: self._pos]
                self._pos = 0
            self._raw += data

    def next_event(self) -> Event | None:
        """Return the next event, or ``None`` when more input is needed."""
        while True:
            state = self._state
            if state is _State.FAILED:
                return None
            if state is _State.LITERAL:
                if not self._fill_literal():
                    return None
                assert self._parser is not None
                data, self._literal = bytes(self._literal), bytearray()
                self._state = _State.LINE
                self._fed += len(data)
                try:
                    self._parser.literal(data)
                except _SyntaxError as e:
                    # The rest of the command still has to be read past.
                    self._discard()
                    return BadCommand(e.tag, e.reason)
                continue
            if state is _State.SKIP:
                if not self._skip():
                    return None
                self._state = _State.LINE
                continue
            line = self._next_line()
            if line is None:
                return None
            if isinstance(line, TooLong):
                self._reset_command()
                return line
            event = self._line(line)
            if event is not None:
                return event

    def next_raw_line(self) -> bytes | TooLong | None:
        """Take the next line as it is, not as a command: a SASL response to an
        ``AUTHENTICATE`` continuation (base64, or ``*`` to cancel).

        Only between commands (``ValueError`` otherwise).
        """
        self._check_boundary()
        return self._next_line()

    def take_rest(self) -> bytes:
        """Return the unparsed bytes after the last command and empty the reader.

        For the hand-over to the raw relay after login; only between commands
        (``ValueError`` otherwise, which cannot happen right after a :class:`Command`).
        """
        self._check_boundary()
        rest = self.pending()
        self.clear()
        return rest

    def pending(self) -> bytes:
        """The unparsed bytes after the last command (for logging what STARTTLS discards)."""
        return self._lines.pending() + bytes(self._raw[self._pos :])

    def clear(self) -> None:
        """Drop everything buffered and start afresh (after STARTTLS: what was pipelined
        behind it in cleartext must not run inside TLS)."""
        self._lines.clear()
        self._raw = bytearray()
        self._pos = 0
        self._reset_command()
        self._state = _State.LINE

    # -- internals --------------------------------------------------------------------

    def _check_boundary(self) -> None:
        if self._state is not _State.LINE or self._parser is not None or self._discarding:
            raise ValueError("not between commands")

    def _reset_command(self) -> None:
        self._parser = None
        self._literal = bytearray()
        self._want = 0
        self._size = 0
        self._fed = 0
        self._discarding = False
        self._tag = None

    def _discard(self) -> None:
        """Drop the command assembled so far; its remaining lines are read past."""
        self._parser = None
        self._fed = 0
        self._discarding = True

    def _next_line(self) -> bytes | TooLong | None:
        """Move received bytes into the line framer one line at a time and pull a line."""
        raw = self._raw
        while True:
            start = self._pos
            if start == len(raw):
                self._release()
                return self._lines.next_line()
            lf = raw.find(b"\n", start)
            end = len(raw) if lf < 0 else lf + 1
            self._lines.append(bytes(raw[start:end]))
            self._pos = end
            line = self._lines.next_line()
            if line is not None or lf < 0:
                return line
            # The LF ended an over-long line being discarded: go on with the next one.

    def _take(self, count: int) -> memoryview:
        """Take up to ``count`` received octets (the line framer is empty between lines)."""
        start = self._pos
        end = min(start + count, len(self._raw))
        self._pos = end
        return memoryview(self._raw)[start:end]

    def _release(self) -> None:
        if self._pos == len(self._raw):
            self._raw = bytearray()
            self._pos = 0

    def _fill_literal(self) -> bool:
        with self._take(self._want - len(self._literal)) as chunk:
            self._literal += chunk
        self._release()
        return len(self._literal) == self._want

    def _skip(self) -> bool:
        with self._take(self._want) as chunk:
            self._want -= len(chunk)
        self._release()
        return self._want == 0

    def _fail(self, event: BadCommand | TooBig) -> BadCommand | TooBig:
        """Stop for good after ``event``: the end of a ``{…+}`` literal is unknown."""
        self.clear()
        self._state = _State.FAILED
        return replace(event, fatal=True)

    def _refusal(self, marker: _Marker) -> BadCommand | TooBig | None:
        """Why a literal announcement is refused, if it is (nothing allocated yet)."""
        tag = self._tag
        if marker.literal8:
            return BadCommand(tag, "literal8 not allowed before login")
        if not marker.numeric:
            return BadCommand(tag, "invalid literal size")
        if marker.size is None or marker.size > self._max_literal:
            return TooBig(tag, "literal too big")
        if self._size + marker.size > self._max_command:
            return TooBig(tag, "command too long")
        return None

    def _line(self, line: bytes) -> Event | None:
        marker = _find_marker(line)
        if self._discarding:
            if marker is not None and marker.nonsync:
                if marker.size is None:
                    refusal = self._refusal(marker)
                    assert refusal is not None
                    return self._fail(refusal)
                self._want = marker.size
                self._state = _State.SKIP
                return None
            self._reset_command()
            return None

        if self._parser is None:
            self._parser = _Parser()
            head = line.partition(b" ")[0]
            self._tag = head.decode("ascii") if _TAG.fullmatch(head) else None
        parser = self._parser
        self._size += len(line) + 2
        self._fed += len(line)
        if marker is None:
            tag = self._tag
            too_big = self._size > self._max_command
            self._reset_command()
            if too_big:
                return TooBig(tag, "command too long")
            try:
                parser.segment(line, literal_follows=False)
                return parser.finish()
            except _SyntaxError as e:
                return BadCommand(e.tag, e.reason)

        event = self._refusal(marker)
        if event is None:
            try:
                parser.segment(line[: marker.start], literal_follows=True)
            except _SyntaxError as e:
                event = BadCommand(e.tag, e.reason)
        if event is not None:
            if not marker.nonsync:
                self._reset_command()
                return event
            if marker.size is None:
                return self._fail(event)
            self._discard()
            self._want = marker.size
            self._state = _State.SKIP
            return event

        assert marker.size is not None
        self._size += marker.size
        self._want = marker.size
        self._state = _State.LITERAL
        if marker.nonsync:
            return None
        assert parser.tag is not None
        return NeedContinuation(parser.tag)


# -- answers to clients ---------------------------------------------------------------


def tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """A tagged status response: ``tagged("a1", "NO", "Login failed", "AUTHENTICATIONFAILED")``
    gives ``b"a1 NO [AUTHENTICATIONFAILED] Login failed\\r\\n"``.

    ``status`` is ``OK``, ``NO`` or ``BAD``; ``code`` a response code with optional
    arguments (``"CAPABILITY IMAP4rev1 …"``); ``text`` must not be empty, nor start with
    ``[`` without a code (it would be read as one).  Anything else is a programming error
    (``ValueError``).
    """
    if not _TAG_TEXT.fullmatch(tag):
        raise ValueError("invalid tag")
    if status not in ("OK", "NO", "BAD"):
        raise ValueError("status must be OK, NO or BAD")
    return tag.encode("ascii") + b" " + status.encode("ascii") + b" " + _resp_text(text, code) + b"\r\n"


def untagged(text: str) -> bytes:
    """``* text``: ``untagged("BAD Invalid tag")``, ``untagged("OK [CAPABILITY …] ready")``."""
    if not text:
        raise ValueError("empty untagged response")
    return b"* " + _text(text) + b"\r\n"


def continuation(text: str = "") -> bytes:
    """A continuation request: ``+ text`` (``b"+ \\r\\n"`` for an empty SASL challenge)."""
    return b"+ " + _text(text) + b"\r\n"


def capability_line(capabilities: Iterable[str]) -> bytes:
    """``* CAPABILITY …``; the list must name ``IMAP4rev1`` or ``IMAP4rev2``."""
    caps = list(capabilities)
    for cap in caps:
        if not _ATOM_TEXT.fullmatch(cap):
            raise ValueError("invalid capability")
    if not {cap.upper() for cap in caps} & {"IMAP4REV1", "IMAP4REV2"}:
        raise ValueError("the capability list must name IMAP4rev1 or IMAP4rev2")
    return b" ".join([b"* CAPABILITY", *(cap.encode("ascii") for cap in caps)]) + b"\r\n"


def quote(value: str) -> bytes:
    """``value`` as an IMAP string for a response: quoted (``"`` and ``\\`` escaped) when
    it is printable ASCII, else a literal ``{n}\\r\\n`` followed by the UTF-8 octets.

    NUL cannot be sent (``ValueError``).
    """
    data = _encode(value, ValueError)
    if _is_printable_ascii(value):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def id_response(fields: Mapping[str, str | None] | None) -> bytes:
    """``* ID ("name" "mailgw" …)`` (RFC 2971); ``* ID NIL`` for ``None`` or no fields.

    A ``None`` value is written ``NIL``.  More than 30 fields, a field name over 30
    octets or a value over 1024 octets are ``ValueError``.
    """
    if not fields:
        return b"* ID NIL\r\n"
    if len(fields) > _ID_MAX_PAIRS:
        raise ValueError("at most 30 ID fields")
    items = []
    for name, value in fields.items():
        too_long = value is not None and len(value.encode("utf-8")) > _ID_MAX_VALUE
        if too_long or len(name.encode("utf-8")) > _ID_MAX_FIELD:
            raise ValueError("ID field or value too long")
        items.append(quote(name))
        items.append(b"NIL" if value is None else quote(value))
    return b"* ID (" + b" ".join(items) + b")\r\n"


# -- the gateway's login client -------------------------------------------------------


def format_login(tag: str, user: str, password: str, *, literal_plus: bool = False) -> tuple[bytes, ...]:
    """Build ``tag LOGIN user password`` for a mail server, as chunks to send in turn.

    The first chunk is sent at once; each following one only after the server's ``+``
    continuation (a synchronizing literal ends the chunk before it).  A value is a quoted
    string when it is printable ASCII without ``"`` or ``\\`` (and not over 1024 octets),
    else a literal: ``{n+}`` when the server announced ``LITERAL+`` (``literal_plus``; one
    chunk then), else ``{n}``.

    ``user`` and ``password`` come from clients: NUL or a lone surrogate raises
    :class:`ProtocolError`.  A bad ``tag`` is a ``ValueError``.
    """
    if not _TAG_TEXT.fullmatch(tag):
        raise ValueError("invalid tag")
    chunks: list[bytes] = []
    current = tag.encode("ascii") + b" LOGIN"
    for value in (user, password):
        data = _encode(value, ProtocolError)
        if _is_printable_ascii(value) and '"' not in value and "\\" not in value and len(data) <= _QUOTE_MAX:
            current += b' "' + data + b'"'
        elif literal_plus:
            current += b" {%d+}\r\n" % len(data) + data
        else:
            chunks.append(current + b" {%d}\r\n" % len(data))
            current = data
    chunks.append(current + b"\r\n")
    return tuple(chunks)


def format_authenticate_plain(tag: str, user: str, password: str, *, sasl_ir: bool) -> tuple[bytes, ...]:
    """Build ``AUTHENTICATE PLAIN`` for a mail server, as chunks like :func:`format_login`.

    With ``sasl_ir`` (the server announced ``SASL-IR``) one chunk carries the initial
    response; otherwise the response is the second chunk, sent after the server's ``+``.
    An empty user or password, or NUL in either, raises :class:`ProtocolError`.
    """
    if not _TAG_TEXT.fullmatch(tag):
        raise ValueError("invalid tag")
    try:
        response = sasl.encode_plain(user, password)
    except ValueError as e:
        raise ProtocolError("credentials cannot be sent with PLAIN") from e
    command = tag.encode("ascii") + b" AUTHENTICATE PLAIN"
    if sasl_ir:
        return (command + b" " + response + b"\r\n",)
    return (command + b"\r\n", response + b"\r\n")


@dataclass(frozen=True)
class Response:
    """One response line of a mail server.

    ``tag`` is ``"*"`` for untagged responses, ``"+"`` for a continuation request, else
    the command's tag.  ``status`` is ``OK``, ``NO``, ``BAD``, ``PREAUTH`` or ``BYE`` for
    status responses (upper-cased), ``None`` otherwise; ``keyword`` is the upper-cased
    name of untagged data (``CAPABILITY``, ``ID``, ``ENABLED``…), ``None`` otherwise.
    ``code`` and ``code_args`` hold a response code (``[UNAVAILABLE]``,
    ``[CAPABILITY …]``), ``text`` the human text (the data after the keyword for untagged
    data; the challenge for a continuation).  ``capabilities`` is set, upper-cased, from
    ``* CAPABILITY`` data or a ``[CAPABILITY …]`` code.  ``literal`` is n when untagged
    data ends with a literal announcement ``{n}``: n octets follow the line.
    """

    tag: str
    status: str | None = None
    keyword: str | None = None
    code: str | None = None
    code_args: str = ""
    text: str = ""
    capabilities: tuple[str, ...] | None = None
    literal: int | None = None

    @property
    def is_continuation(self) -> bool:
        """Whether this is a ``+`` continuation request."""
        return self.tag == "+"

    @property
    def is_untagged(self) -> bool:
        """Whether this is an untagged (``*``) response."""
        return self.tag == "*"

    @property
    def ok(self) -> bool:
        """Whether this is an ``OK`` (or ``PREAUTH``) status response."""
        return self.status in ("OK", "PREAUTH")


_STATUSES = frozenset({"OK", "NO", "BAD", "PREAUTH", "BYE"})
_TAGGED_STATUSES = frozenset({"OK", "NO", "BAD"})
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9.\-_]*")


def parse_response(line: bytes) -> Response:
    """Parse one response line of a mail server (without CRLF).

    Keywords and statuses are matched case-insensitively; texts are decoded as UTF-8 with
    replacement characters (they are informational).  A NUL, a bad tag, a tagged response
    without ``OK``/``NO``/``BAD`` or an empty line raise :class:`ProtocolError`.
    """
    if b"\x00" in line or b"\r" in line or b"\n" in line:
        raise ProtocolError("NUL, CR or LF in response line")
    if line == b"+" or line.startswith(b"+ "):
        return Response(tag="+", text=_decode_text(line[2:]))
    tag, _, rest = line.partition(b" ")
    word, _, after = rest.partition(b" ")
    if not _KEYWORD.fullmatch(word):
        raise ProtocolError("missing response keyword")
    keyword = word.decode("ascii").upper()
    if tag == b"*":
        if keyword in _STATUSES:
            return _status_response("*", keyword, after)
        text = _decode_text(after)
        capabilities = _capability_tuple(text) if keyword == "CAPABILITY" else None
        marker = _find_marker(after)
        size = marker.size if marker is not None and not marker.nonsync and not marker.literal8 else None
        return Response(tag="*", keyword=keyword, text=text, capabilities=capabilities, literal=size)
    if not _TAG.fullmatch(tag):
        raise ProtocolError("invalid response tag")
    if keyword not in _TAGGED_STATUSES:
        raise ProtocolError("tagged response without OK, NO or BAD")
    return _status_response(tag.decode("ascii"), keyword, after)


def _status_response(tag: str, status: str, rest: bytes) -> Response:
    code = None
    code_args = ""
    if rest.startswith(b"["):
        close = rest.find(b"]")
        name_end = min((i for i in (rest.find(b" "), close) if i >= 0), default=-1)
        if close > 1 and _KEYWORD.fullmatch(rest[1:name_end]):
            code = rest[1:name_end].decode("ascii").upper()
            code_args = _decode_text(rest[name_end + 1 : close]) if name_end < close else ""
            rest = rest[close + 1 :].removeprefix(b" ")
    capabilities = _capability_tuple(code_args) if code == "CAPABILITY" else None
    return Response(
        tag=tag,
        status=status,
        code=code,
        code_args=code_args,
        text=_decode_text(rest),
        capabilities=capabilities,
    )


# -- helpers --------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _capability_tuple(text: str) -> tuple[str, ...]:
    """The upper-cased capabilities of a CAPABILITY list.  A server answers every login
    with the same list: parsed once, and every session shares the one tuple."""
    return tuple(cap.upper() for cap in text.split())


def _resp_text(text: str, code: str | None) -> bytes:
    if not text:
        raise ValueError("empty response text")
    head = b""
    if code is None and text.startswith("["):
        raise ValueError("a response text starting with '[' would be read as a response code")
    if code is not None:
        if not _RESP_CODE_TEXT.fullmatch(code):
            raise ValueError("invalid response code")
        head = b"[" + code.encode("utf-8") + b"] "
    return head + _text(text)


def _text(text: str) -> bytes:
    if _FORBIDDEN_IN_TEXT.search(text):
        raise ValueError("NUL, CR or LF in response text")
    return text.encode("utf-8")


def _encode(value: str, error: type[Exception]) -> bytes:
    if "\x00" in value:
        raise error("NUL cannot be sent in an IMAP string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise error("string cannot be encoded as UTF-8") from None


def _is_printable_ascii(value: str) -> bool:
    return all(" " <= char <= "~" for char in value)


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
