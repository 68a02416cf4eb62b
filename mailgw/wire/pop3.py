"""POP3 codec: RFC 1939, CAPA (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034), resp-codes (RFC 3206).

Both directions the gateway speaks:

- towards clients (the proxy is the server): :func:`parse_command` reads their commands;
  :func:`ok`, :func:`err`, :func:`capa_response` and :func:`continuation` build answers;
- towards mail servers (the gateway's login client): :func:`format_command` builds
  commands; :func:`parse_status`, :class:`MultiLineReader`, :func:`parse_capa` and
  :func:`response_code` read answers.

Lines are framed by :class:`mailgw.wire.lines.LineBuffer` (``LineBuffer(MAX_COMMAND_LINE)``
for clients, ``LineBuffer(MAX_RESPONSE_LINE)`` for servers); the functions here take one
line without its CRLF.

Deviation from RFC 1939: the argument of ``PASS`` is the whole rest of the line after the
single space that follows the keyword, spaces included, as most servers (Dovecot,
Cyrus, Courier) take it — passwords may contain spaces.  Other commands' arguments are
separated by spaces; runs of spaces and trailing spaces are tolerated.

:class:`Command` hides the arguments of ``PASS`` and ``AUTH`` from its ``repr`` and never
shows ``raw``: commands can then be logged without leaking a secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailgw.wire.errors import LineTooLong, ProtocolError
from mailgw.wire.lines import TooLong

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_RESPONSE_LINE",
    "REST_OF_LINE_COMMANDS",
    "Command",
    "MultiLineReader",
    "Status",
    "capa_response",
    "continuation",
    "err",
    "format_command",
    "ok",
    "parse_capa",
    "parse_command",
    "parse_status",
    "response_code",
]

#: Longest command line, CRLF included (RFC 2449 section 4).
MAX_COMMAND_LINE = 255
#: Longest status line of a server, CRLF included (RFC 2449 section 4).
MAX_RESPONSE_LINE = 512
#: Commands whose single argument is the whole rest of the line (see the module docstring).
REST_OF_LINE_COMMANDS = frozenset({"PASS"})
#: Commands whose arguments are secret and kept out of ``repr``.
_SECRET_COMMANDS = frozenset({"PASS", "AUTH", "APOP"})

_KEYWORD = re.compile(rb"[A-Za-z]{3,4}\Z")
_FORBIDDEN_IN_LINE = re.compile(rb"[\x00\r\n]")
_FORBIDDEN_IN_TEXT = re.compile(r"[\x00\r\n]")
# RFC 2449: resp-code = "[" resp-level *("/" resp-level) "]",
# resp-level = 1*rchar, rchar = %x21-2E / %x30-5C / %x5E-7F.
_RESP_CODE = re.compile(r"\[([\x21-\x2E\x30-\x5C\x5E-\x7F]+(?:/[\x21-\x2E\x30-\x5C\x5E-\x7F]+)*)\]")


@dataclass(frozen=True)
class Command:
    """A client command: the upper-cased keyword, its arguments and the line as received."""

    name: str
    args: tuple[str, ...]
    raw: bytes = field(repr=False)

    def __repr__(self) -> str:
        args = "<hidden>" if self.name in _SECRET_COMMANDS and self.args else repr(self.args)
        return f"Command(name={self.name!r}, args={args})"


def parse_command(line: bytes) -> Command:
    """Parse one client command line (without CRLF).

    Raises :class:`LineTooLong` beyond :data:`MAX_COMMAND_LINE` and :class:`ProtocolError`
    for a NUL, CR or LF in the line, a keyword that is not 3-4 ASCII letters, or arguments
    that are not UTF-8.
    """
    if len(line) + 2 > MAX_COMMAND_LINE:
        raise LineTooLong("command line too long")
    if _FORBIDDEN_IN_LINE.search(line):
        raise ProtocolError("NUL, CR or LF in command line")
    keyword, space, rest = line.partition(b" ")
    if not _KEYWORD.match(keyword):
        raise ProtocolError("invalid command keyword")
    name = keyword.decode("ascii").upper()
    if name in REST_OF_LINE_COMMANDS:
        raw_args = [rest] if space else []
    else:
        raw_args = [arg for arg in rest.split(b" ") if arg]
    try:
        args = tuple(arg.decode("utf-8") for arg in raw_args)
    except UnicodeDecodeError as e:
        raise ProtocolError("command argument is not UTF-8") from e
    return Command(name=name, args=args, raw=line)


def format_command(name: str, *args: str) -> bytes:
    """Build a command line with its CRLF, for sending to a mail server.

    The inverse of :func:`parse_command`.  ``name`` must be 3-4 ASCII letters
    (``ValueError`` otherwise: it comes from code).  Raises :class:`ProtocolError` for an
    argument holding NUL, CR or LF, or (except for ``PASS``) a space or nothing, and
    :class:`LineTooLong` when the line would exceed :data:`MAX_COMMAND_LINE`: arguments
    come from clients, and must never smuggle a second command upstream.
    """
    keyword = name.encode("ascii", "replace")
    if not _KEYWORD.match(keyword):
        raise ValueError("a POP3 keyword is 3-4 ASCII letters")
    if name.upper() in REST_OF_LINE_COMMANDS:
        if len(args) > 1:
            raise ValueError(f"{name} takes a single argument")
    else:
        for arg in args:
            if not arg or " " in arg:
                raise ProtocolError("empty argument or space in argument")
    for arg in args:
        if _FORBIDDEN_IN_TEXT.search(arg):
            raise ProtocolError("NUL, CR or LF in argument")
    try:
        line = b" ".join([keyword, *(arg.encode("utf-8") for arg in args)]) + b"\r\n"
    except UnicodeEncodeError as e:
        raise ProtocolError("argument cannot be encoded as UTF-8") from e
    if len(line) > MAX_COMMAND_LINE:
        raise LineTooLong("command line too long")
    return line


def ok(text: str = "") -> bytes:
    """``+OK`` with an optional text, CRLF-terminated."""
    return _status_line(b"+OK", text)


def err(text: str, *, code: str | None = None) -> bytes:
    """``-ERR``, an optional RFC 2449 response code (``SYS/TEMP``, ``AUTH``, ``IN-USE``…)
    and a text, CRLF-terminated: ``err("try later", code="SYS/TEMP")`` gives
    ``b"-ERR [SYS/TEMP] try later\\r\\n"``."""
    if code is not None:
        if not _RESP_CODE.fullmatch(f"[{code}]"):
            raise ValueError("invalid response code")
        text = f"[{code}] {text}" if text else f"[{code}]"
    return _status_line(b"-ERR", text)


def continuation(b64: str = "") -> bytes:
    """A SASL server challenge: ``+`` SP base64 CRLF (``b"+ \\r\\n"`` when empty)."""
    return b"+ " + _text(b64) + b"\r\n"


def capa_response(capabilities: Iterable[str]) -> bytes:
    """The whole multi-line answer to ``CAPA``: ``+OK``, one capability a line, ``.``."""
    lines = []
    for capability in capabilities:
        if not capability.strip():
            raise ValueError("empty capability")
        lines.append(_text(capability))
    return _multiline(b"+OK Capability list follows", lines)


@dataclass(frozen=True)
class Status:
    """A server's status line.

    ``ok`` is true only for ``+OK``; a SASL continuation (``+ …``) has ``continuation``
    set and ``ok`` false, so that a caller forgetting the continuation case fails closed.
    ``text`` is what follows the indicator (the base64 challenge for a continuation).
    """

    ok: bool
    text: str
    continuation: bool = False

    @property
    def code(self) -> str | None:
        """The RFC 2449 response code opening the text, upper-cased, e.g. ``"SYS/TEMP"``."""
        return None if self.continuation else response_code(self.text)


def parse_status(line: bytes) -> Status:
    """Parse a server status line (without CRLF): ``+OK``, ``-ERR`` or ``+`` continuation.

    Indicators are matched case-insensitively; a non-UTF-8 text is decoded with
    replacement characters (greetings are informational).  Anything else raises
    :class:`ProtocolError`.
    """
    head = line[:4].upper()
    if head[:3] == b"+OK" and (len(line) == 3 or line[3:4] == b" "):
        return Status(ok=True, text=_decode_text(line[4:]))
    if head == b"-ERR" and (len(line) == 4 or line[4:5] == b" "):
        return Status(ok=False, text=_decode_text(line[5:]))
    if line[:1] == b"+" and (len(line) == 1 or line[1:2] == b" "):
        return Status(ok=False, text=_decode_text(line[2:]), continuation=True)
    raise ProtocolError("not a POP3 status line")


def response_code(text: str) -> str | None:
    """The RFC 2449 response code opening ``text``, brackets removed and upper-cased.

    ``response_code("[sys/temp] busy")`` is ``"SYS/TEMP"``; ``None`` when ``text`` does not
    start with a well-formed code.  Codes are hierarchical: test the levels with
    ``code.split("/")`` or ``code.startswith("SYS/")``.  RFC 3206 defines ``SYS/TEMP``,
    ``SYS/PERM`` and ``AUTH``, RFC 2449 ``IN-USE`` and ``LOGIN-DELAY``.
    """
    match = _RESP_CODE.match(text)
    return None if match is None else match.group(1).upper()


def parse_capa(lines: Iterable[bytes]) -> dict[str, tuple[str, ...]]:
    """Map each capability of a CAPA answer's body (un-dot-stuffed lines) to its arguments.

    ``[b"SASL PLAIN LOGIN", b"STLS"]`` gives ``{"SASL": ("PLAIN", "LOGIN"), "STLS": ()}``.
    Names are upper-cased, arguments kept as sent; blank lines are skipped; a repeated
    capability keeps its last arguments.  A name with a character outside printable ASCII
    raises :class:`ProtocolError`.
    """
    capabilities: dict[str, tuple[str, ...]] = {}
    for line in lines:
        words = [word for word in line.split(b" ") if word]
        if not words:
            continue
        name = words[0]
        if not all(0x21 <= byte <= 0x7E for byte in name):
            raise ProtocolError("invalid capability name")
        capabilities[name.decode("ascii").upper()] = tuple(_decode_text(word) for word in words[1:])
    return capabilities


class MultiLineReader:
    """Collects the body of a dot-terminated multi-line answer, one line at a time.

    Feed it the lines that follow the ``+OK`` status line; :meth:`feed` returns true at the
    terminating ``.``, after which :attr:`lines` holds the body with dot-stuffing removed.
    At most ``max_lines`` lines are kept (:class:`ProtocolError` beyond): the peer does
    not choose how much the gateway buffers.
    """

    def __init__(self, max_lines: int = 1000) -> None:
        self._max_lines = max_lines
        self._lines: list[bytes] = []
        self._done = False

    @property
    def done(self) -> bool:
        """Whether the terminating ``.`` was seen."""
        return self._done

    @property
    def lines(self) -> list[bytes]:
        """The body lines received so far, un-dot-stuffed."""
        return list(self._lines)

    def feed(self, line: bytes | TooLong) -> bool:
        """Add one line (without CRLF); return whether the answer is complete.

        A :class:`TooLong` marker raises :class:`LineTooLong`.  Feeding a complete answer
        again is a programming error (``ValueError``).
        """
        if self._done:
            raise ValueError("multi-line answer already complete")
        if isinstance(line, TooLong):
            raise LineTooLong("line too long in multi-line answer")
        if line == b".":
            self._done = True
            return True
        if len(self._lines) >= self._max_lines:
            raise ProtocolError("multi-line answer too long")
        self._lines.append(line[1:] if line.startswith(b".") else line)
        return False


def _status_line(indicator: bytes, text: str) -> bytes:
    line = indicator + b" " + _text(text) if text else indicator
    if len(line) + 2 > MAX_RESPONSE_LINE:
        raise ValueError("status line too long")
    return line + b"\r\n"


def _multiline(first: bytes, lines: Iterable[bytes]) -> bytes:
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return first + b"\r\n" + body + b".\r\n"


def _text(text: str) -> bytes:
    if _FORBIDDEN_IN_TEXT.search(text):
        raise ValueError("NUL, CR or LF in answer text")
    return text.encode("utf-8")


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
