"""SMTP/ESMTP pre-AUTH codec: RFC 5321, STARTTLS (RFC 3207), AUTH (RFC 4954) with PLAIN
(RFC 4616) and LOGIN, enhanced status codes (RFC 2034/3463).

Both directions the gateway speaks before AUTH:

- towards clients (the proxy is the server): :func:`parse_command` reads their commands;
  :func:`reply` and :func:`ehlo_reply` build replies;
- towards mail servers (the gateway's client): :func:`format_command` and
  :func:`format_auth_plain` build commands; :class:`ReplyReader` assembles replies and
  :func:`parse_ehlo_keywords` reads the EHLO extensions.

Lines are framed by :class:`mailgw.wire.lines.LineBuffer`: ``LineBuffer(MAX_AUTH_LINE)``
for clients (an ``AUTH`` line with its initial response may reach 12288 octets; every
other command is held to :data:`MAX_COMMAND_LINE` by :func:`parse_command`),
``LineBuffer(MAX_REPLY_LINE)`` or larger for servers.  The functions here take one line
without its CRLF.  SASL responses after a ``334`` (base64 lines, ``*`` to cancel) are
not commands: the proxy reads them as raw lines and decodes them with
:mod:`mailgw.wire.sasl`.

Leniencies: verbs are case-insensitive, runs of spaces after the verb and trailing
spaces are tolerated.  The ``EHLO``/``HELO`` argument is checked only loosely (one word
of printable characters, an address literal in balanced brackets): many clients send
names such as ``my_pc`` that RFC 5321 does not allow, and refusing them helps nobody.

:class:`Command` hides the argument of ``AUTH`` from its ``repr``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mailgw.wire import sasl
from mailgw.wire.errors import LineTooLong, ProtocolError
from mailgw.wire.lines import TooLong

__all__ = [
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "MAX_REPLY_LINE",
    "RELAYED_EXTENSIONS",
    "Command",
    "Reply",
    "ReplyReader",
    "ehlo_reply",
    "fallback_extensions",
    "format_auth_plain",
    "format_command",
    "parse_auth",
    "parse_command",
    "parse_ehlo_keywords",
    "relayed_extensions",
    "reply",
]

#: Longest command line, CRLF included (RFC 5321 section 4.5.3.1.4).
MAX_COMMAND_LINE = 512
#: Longest AUTH command line with its initial response, CRLF included (RFC 4954 section 4).
MAX_AUTH_LINE = 12288
#: Longest reply line, CRLF included (RFC 5321 section 4.5.3.1.5).
MAX_REPLY_LINE = 512

#: Commands that take no argument.
_NO_ARGUMENT = frozenset({"STARTTLS", "DATA", "RSET", "QUIT"})
_VERB = re.compile(rb"[A-Za-z][A-Za-z0-9-]*")
_FORBIDDEN_IN_LINE = re.compile(rb"[\x00\r\n]")
_FORBIDDEN_IN_TEXT = re.compile(r"[\x00\r\n]")
# RFC 4422 sasl-mech: 1*20 of upper-case letters, digits, "-" and "_" (matched case-insensitively).
_SASL_MECH = re.compile(r"[A-Za-z0-9_-]{1,20}")
# RFC 4954: initial-response = base64 / "="; strict decoding is left to mailgw.wire.sasl.
_INITIAL_RESPONSE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# EHLO/HELO argument, loosely: one word, printable, brackets only around an address literal.
_HELO_NAME = re.compile(r"\[[^\[\]\s]+\]|[^\[\]\s\x00-\x1f\x7f]+")
# RFC 5321 Reply-code = %x32-35 %x30-35 %x30-39.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?\Z", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")
# RFC 5321 ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
_EHLO_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 1870 size-param: 1*20DIGIT.
_SIZE_PARAM = re.compile(r"[0-9]{1,20}")

#: The mail server's extensions that the gateway's own EHLO answer before AUTH carries
#: when the server has them (SPEC [4.5]): clients do not send EHLO again after AUTH, and
#: the relay after AUTH passes bytes, so each of them keeps working end to end.
RELAYED_EXTENSIONS = ("SIZE", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING")


@dataclass(frozen=True)
class Command:
    """A client command: the upper-cased verb and the rest of the line (stripped)."""

    verb: str
    argument: str

    def __repr__(self) -> str:
        argument = "<hidden>" if self.verb == "AUTH" and self.argument else repr(self.argument)
        return f"Command(verb={self.verb!r}, argument={argument})"


def parse_command(line: bytes) -> Command:
    """Parse one client command line (without CRLF).

    Raises :class:`LineTooLong` beyond :data:`MAX_COMMAND_LINE` (:data:`MAX_AUTH_LINE` for
    ``AUTH``), and :class:`ProtocolError` for a NUL, CR or LF in the line, a verb that is
    not a letter followed by letters, digits or ``-``, an argument that is not UTF-8, and
    these per-verb checks: ``EHLO``/``HELO`` need a host name or address literal;
    ``STARTTLS``, ``DATA``, ``RSET`` and ``QUIT`` take no argument; ``AUTH`` needs a
    mechanism and at most an initial response (:func:`parse_auth`); ``MAIL`` starts
    ``FROM:``, ``RCPT`` starts ``TO:``.  Other verbs (``NOOP``, ``HELP``, ``VRFY``,
    unknown ones) take any argument.
    """
    if len(line) + 2 > MAX_AUTH_LINE:
        raise LineTooLong("command line too long")
    if _FORBIDDEN_IN_LINE.search(line):
        raise ProtocolError("NUL, CR or LF in command line")
    raw_verb, _, rest = line.partition(b" ")
    if not _VERB.fullmatch(raw_verb):
        raise ProtocolError("invalid command verb")
    verb = raw_verb.decode("ascii").upper()
    if verb != "AUTH" and len(line) + 2 > MAX_COMMAND_LINE:
        raise LineTooLong("command line too long")
    try:
        argument = rest.decode("utf-8").strip(" ")
    except UnicodeDecodeError as e:
        raise ProtocolError("command argument is not UTF-8") from e
    if verb in ("EHLO", "HELO"):
        if not _HELO_NAME.fullmatch(argument):
            raise ProtocolError(f"{verb} needs a domain or address literal")
    elif verb in _NO_ARGUMENT:
        if argument:
            raise ProtocolError(f"{verb} takes no argument")
    elif verb == "AUTH":
        parse_auth(argument)
    elif verb == "MAIL":
        if not argument[:5].upper() == "FROM:":
            raise ProtocolError("MAIL needs FROM:")
    elif verb == "RCPT" and not argument[:3].upper() == "TO:":
        raise ProtocolError("RCPT needs TO:")
    return Command(verb=verb, argument=argument)


def parse_auth(argument: str) -> tuple[str, str | None]:
    """Split an ``AUTH`` argument into the upper-cased mechanism and the initial response
    (``None`` when absent; ``"="`` is the empty one, kept as sent).

    Raises :class:`ProtocolError` for a missing or malformed mechanism, a response with
    characters outside base64, or more than two words.
    """
    words = argument.split()
    if not 1 <= len(words) <= 2 or not _SASL_MECH.fullmatch(words[0]):
        raise ProtocolError("AUTH needs a mechanism and an optional initial response")
    if len(words) == 2 and not (words[1] == "=" or _INITIAL_RESPONSE.fullmatch(words[1])):
        raise ProtocolError("AUTH initial response is not base64")
    return words[0].upper(), words[1] if len(words) == 2 else None


def format_command(verb: str, argument: str = "") -> bytes:
    """Build a command line with its CRLF, for sending to a mail server.

    ``verb`` must be a valid verb (``ValueError`` otherwise: it comes from code).  An
    argument holding NUL, CR or LF raises :class:`ProtocolError` (it may come from a
    client and must never smuggle a second command upstream), a line over
    :data:`MAX_COMMAND_LINE` (:data:`MAX_AUTH_LINE` for ``AUTH``) :class:`LineTooLong`.
    """
    if not _VERB.fullmatch(verb.encode("ascii", "replace")):
        raise ValueError("invalid SMTP verb")
    if _FORBIDDEN_IN_TEXT.search(argument):
        raise ProtocolError("NUL, CR or LF in argument")
    try:
        line = verb.encode("ascii") + (b" " + argument.encode("utf-8") if argument else b"") + b"\r\n"
    except UnicodeEncodeError as e:
        raise ProtocolError("argument cannot be encoded as UTF-8") from e
    limit = MAX_AUTH_LINE if verb.upper() == "AUTH" else MAX_COMMAND_LINE
    if len(line) > limit:
        raise LineTooLong("command line too long")
    return line


def format_auth_plain(user: str, password: str, authzid: str = "") -> bytes:
    """``AUTH PLAIN <base64>\\r\\n`` with the initial response (RFC 4954, RFC 4616).

    An empty user or password or a NUL in any part raises :class:`ProtocolError`, a line
    over :data:`MAX_AUTH_LINE` :class:`LineTooLong`.
    """
    try:
        response = sasl.encode_plain(user, password, authzid)
    except ValueError as e:
        raise ProtocolError("credentials cannot be sent with PLAIN") from e
    line = b"AUTH PLAIN " + response + b"\r\n"
    if len(line) > MAX_AUTH_LINE:
        raise LineTooLong("AUTH line too long")
    return line


def reply(code: int, text: str | list[str] = "", enhanced: str | None = None) -> bytes:
    """A reply, multi-line when ``text`` is a list: every line but the last is written
    ``code-text``, the last ``code text``.  ``enhanced`` (``"5.7.8"``) opens each line.

    ``reply(250, ["mx.example", "PIPELINING"])`` gives
    ``b"250-mx.example\\r\\n250 PIPELINING\\r\\n"``.  A code outside 200-559, an empty
    list, a line break or NUL in a text, an enhanced code whose class differs from the
    code's, or a line over :data:`MAX_REPLY_LINE` are programming errors (``ValueError``).
    """
    if not 200 <= code <= 559 or (code // 10) % 10 > 5:
        raise ValueError("invalid reply code")
    lines = [text] if isinstance(text, str) else list(text)
    if not lines:
        raise ValueError("a reply needs at least one line")
    prefix = ""
    if enhanced is not None:
        if not _ENHANCED.fullmatch(enhanced) or enhanced[0] != str(code)[0]:
            raise ValueError("invalid enhanced status code")
        prefix = enhanced + " "
    out = []
    for index, line in enumerate(lines):
        if _FORBIDDEN_IN_TEXT.search(line):
            raise ValueError("NUL, CR or LF in reply text")
        last = index == len(lines) - 1
        # An empty last line is the bare code ("250"); an empty continuation "250-".
        body = (prefix + line if line else prefix.rstrip(" ")).encode("utf-8")
        encoded = b"%d" % code + (b" " + body if body else b"") if last else b"%d-" % code + body
        if len(encoded) + 2 > MAX_REPLY_LINE:
            raise ValueError("reply line too long")
        out.append(encoded + b"\r\n")
    return b"".join(out)


def ehlo_reply(domain: str, greeting: str, keywords: Iterable[str]) -> bytes:
    """The answer to ``EHLO``: ``250-domain greeting``, then one extension a line
    (``SIZE 10240000``, ``AUTH PLAIN LOGIN``, ``STARTTLS``…).

    An extension whose keyword is not valid is a ``ValueError``.
    """
    first = f"{domain} {greeting}" if greeting else domain
    lines = [first]
    for keyword in keywords:
        name = keyword.split(" ", 1)[0]
        if not _EHLO_KEYWORD.fullmatch(name):
            raise ValueError("invalid EHLO keyword")
        lines.append(keyword)
    return reply(250, lines)


@dataclass(frozen=True)
class Reply:
    """A complete reply: its code and the text of each line (after ``ddd-``/``ddd ``)."""

    code: int
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        """2xx: the command succeeded."""
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        """3xx: more is expected (``334`` for a SASL challenge, ``354`` for DATA)."""
        return 300 <= self.code < 400

    @property
    def transient(self) -> bool:
        """4xx: a temporary failure."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """5xx: a permanent failure."""
        return 500 <= self.code < 600

    @property
    def text(self) -> str:
        """The lines joined by newlines."""
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code opening the first line, when its class
        matches the reply code's (``"5.7.8"``), else ``None``."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        if match is None or match.group(1) != str(self.code)[0]:
            return None
        end = match.end()
        if end < len(self.lines[0]) and self.lines[0][end] != " ":
            return None
        return match.group()


class ReplyReader:
    """Assembles a server's replies from lines: ``ddd-text`` lines up to ``ddd text``.

    :meth:`feed` returns the :class:`Reply` when its last line arrives, ``None`` before.
    The reader is then ready for the next reply.  A line that is not a reply line, a code
    that changes inside a multi-line reply, or more than ``max_lines`` lines raise
    :class:`ProtocolError`; a :class:`TooLong` marker raises :class:`LineTooLong`.  Texts
    are decoded as UTF-8 with replacement characters (they are informational).
    """

    def __init__(self, max_lines: int = 100) -> None:
        self._max_lines = max_lines
        self._code: int | None = None
        self._lines: list[str] = []

    @property
    def in_reply(self) -> bool:
        """Whether a multi-line reply has started but not ended."""
        return self._code is not None

    def feed(self, line: bytes | TooLong) -> Reply | None:
        """Add one line (without CRLF); return the reply it completes, if any."""
        if isinstance(line, TooLong):
            raise LineTooLong("reply line too long")
        match = _REPLY_LINE.match(line)
        if match is None or _FORBIDDEN_IN_LINE.search(line):
            raise ProtocolError("not an SMTP reply line")
        code = int(match.group(1))
        if self._code is not None and code != self._code:
            raise ProtocolError("reply code changed inside a multi-line reply")
        if len(self._lines) >= self._max_lines:
            raise ProtocolError("reply has too many lines")
        self._code = code
        self._lines.append((match.group(3) or b"").decode("utf-8", "replace"))
        if match.group(2) == b"-":
            return None
        complete = Reply(code=code, lines=tuple(self._lines))
        self._code = None
        self._lines = []
        return complete


def parse_ehlo_keywords(answer: Reply) -> dict[str, tuple[str, ...]]:
    """Map each extension of a ``250`` answer to ``EHLO`` to its parameters.

    The first line (domain and greeting) is skipped; keywords are upper-cased, parameters
    kept as sent (``{"SIZE": ("10240000",), "AUTH": ("PLAIN", "LOGIN"), "STARTTLS": ()}``).
    Lines whose keyword is not a valid ``ehlo-keyword`` (such as the obsolete
    ``AUTH=PLAIN LOGIN`` some servers add for old clients) are skipped; a repeated keyword
    keeps its last parameters.  Any code but 250 raises :class:`ProtocolError`.
    """
    if answer.code != 250:
        raise ProtocolError("EHLO was not accepted")
    keywords: dict[str, tuple[str, ...]] = {}
    for line in answer.lines[1:]:
        words = line.split()
        if not words or not _EHLO_KEYWORD.fullmatch(words[0]):
            continue
        keywords[words[0].upper()] = tuple(words[1:])
    return keywords


def relayed_extensions(keywords: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The EHLO lines of :data:`RELAYED_EXTENSIONS` that a mail server offers, from its
    :func:`parse_ehlo_keywords`, in that order: ``("SIZE 10240000", "PIPELINING", …)``.

    ``SIZE`` keeps the server's limit when it is a number (RFC 1870; ``SIZE 0`` is
    "no fixed limit") and is a bare ``SIZE`` otherwise; the other keywords carry no
    parameters.  Nothing the server sent but these keywords and its digits is passed on.
    """
    lines = []
    for name in RELAYED_EXTENSIONS:
        if name not in keywords:
            continue
        if name == "SIZE":
            params = keywords[name]
            lines.append(f"SIZE {int(params[0])}" if params and _SIZE_PARAM.fullmatch(params[0]) else "SIZE")
        else:
            lines.append(name)
    return tuple(lines)


def fallback_extensions(size: int) -> tuple[str, ...]:
    """The EHLO lines advertised while the mail server's own are not known: ``SIZE``
    with the configured limit (bare for 0, no limit announced), ``8BITMIME`` and
    ``ENHANCEDSTATUSCODES`` (which nearly every server has); not ``PIPELINING``,
    ``SMTPUTF8`` or ``CHUNKING``, which a client must not use with a server that
    lacks them."""
    return (f"SIZE {size}" if size > 0 else "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES")
