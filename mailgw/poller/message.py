"""Pure helpers of the poller: listings, header blocks, recipients, trace headers and
the end of a streamed ``RETR`` [6].

Nothing here does I/O.  Parsers raise L{ProtocolError} (L{MalformedMessage} for a
message to skip) and nothing else, whatever the bytes.

Messages travel from POP3 to SMTP in their dot-stuffed wire form: both protocols stuff
a line starting with ``.`` the same way and end the data with a lone ``.`` line, so the
body passes through untouched and only the header block (and, for a multipart message,
its preamble) is looked at line by line.
"""

from __future__ import annotations

import email.message
import email.utils
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mailgw.wire.errors import ProtocolError

__all__ = [
    "DEFAULT_RECIPIENT_HEADERS",
    "MAX_HEADER_BLOCK",
    "MAX_HEADER_LINE",
    "MAX_PREAMBLE",
    "MAX_RECIPIENTS",
    "DotStreamScanner",
    "HeaderBlock",
    "MalformedMessage",
    "RecipientRule",
    "envelope_sender",
    "find_recipients",
    "has_loop_trace",
    "message_id",
    "multipart_boundary",
    "parse_header_block",
    "parse_list_line",
    "parse_uidl_line",
    "recipient_plan",
    "trace_header",
    "unstuff",
]

#: the longest header line accepted, CRLF included (RFC 5322 allows 1000; real mail
#: sometimes has longer unfolded lines, never 64 KiB)
MAX_HEADER_LINE = 64 * 1024
#: the largest header block read before the recipients are known
MAX_HEADER_BLOCK = 256 * 1024
#: how much of a multipart body may come before its first boundary
MAX_PREAMBLE = 64 * 1024
#: at most this many recipients per message (RFC 5321's minimum a server must take)
MAX_RECIPIENTS = 100

#: the header list of [6] step 2; ``A/B`` entries are read together
DEFAULT_RECIPIENT_HEADERS: tuple[str, ...] = (
    "Delivered-To",
    "Envelope-To",
    "X-Envelope-To",
    "X-Original-To",
    "Apparently-To",
    "Resent-To/Resent-Cc",
    "To/Cc",
)
#: the pseudo-entry of the header list for ``Received: ... for <addr>`` parsing
RECEIVED = "Received"

# RFC 5322 ftext: printable ASCII but the colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_FIELD_NAME_TEXT = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_UIDL = re.compile(rb"[\x21-\x7e]{1,70}")
_NUMBER = re.compile(rb"[0-9]{1,10}")
_ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@\x00-\x1f\x7f]+(?:\.[^\s<>()\[\]\\,;:\"@\x00-\x1f\x7f]+)*@[A-Za-z0-9.-]+")
_RECEIVED_FOR = re.compile(r"\bfor\s+<?([^\s<>;]+@[^\s<>;]+?)>?(?=[\s;]|$)", re.IGNORECASE)
# RFC 2046 bchars, 1 to 70, not ending with a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_NODE_SAFE = re.compile(r"[^A-Za-z0-9.\-_]")
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class MalformedMessage(ProtocolError):
    """A message the poller cannot deliver as it is: C{kind} is a stable short name
    (``no_headers``, ``malformed_header``, ``header_too_long``, ``header_too_large``,
    ``broken_mime``), C{reason} says why in words."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# -- listings ------------------------------------------------------------------------------


def parse_uidl_line(line: bytes) -> tuple[int, str]:
    """One line of a ``UIDL`` listing: ``msg-number SP unique-id`` (RFC 1939; the id is
    1 to 70 characters of 0x21-0x7E).  Raises L{ProtocolError} otherwise."""
    parts = line.split(b" ")
    if len(parts) != 2 or not _NUMBER.fullmatch(parts[0]) or not _UIDL.fullmatch(parts[1]):
        raise ProtocolError("malformed UIDL line")
    number = int(parts[0])
    if number < 1:
        raise ProtocolError("malformed UIDL line")
    return number, parts[1].decode("ascii")


def parse_list_line(line: bytes) -> tuple[int, int]:
    """One line of a ``LIST`` listing: ``msg-number SP size`` and, as RFC 1939 allows,
    anything after the size.  Raises L{ProtocolError} otherwise."""
    parts = line.split(b" ")
    if len(parts) < 2 or not _NUMBER.fullmatch(parts[0]) or not _NUMBER.fullmatch(parts[1]):
        raise ProtocolError("malformed LIST line")
    number = int(parts[0])
    if number < 1:
        raise ProtocolError("malformed LIST line")
    return number, int(parts[1])


# -- the end of a multi-line answer ------------------------------------------------------


class DotStreamScanner:
    """Finds the terminating ``.`` line of a dot-stuffed stream, chunk by chunk.

    L{feed} returns the payload (still dot-stuffed, terminator excluded), whether the
    terminator was seen, and the bytes after it.  At most two bytes (a line start of
    ``.`` or ``.\\r``) are held back between calls, so memory is bounded whatever the
    line lengths, and the result does not depend on how the stream is split.  A bare
    LF ends a line as CRLF does.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held = b""
        self.done = False

    def feed(self, chunk: bytes) -> tuple[bytes, bool, bytes]:
        if self.done:
            raise ValueError("the stream already ended")
        data = self._held + chunk if self._held else chunk
        self._held = b""
        if not data:
            return b"", False, b""
        index = 0 if self._at_line_start else _next_line(data, 0)
        while index >= 0:
            if data.startswith(b".\r\n", index) or data.startswith(b".\n", index):
                self.done = True
                end = index + (3 if data[index + 1 : index + 2] == b"\r" else 2)
                return data[:index], True, data[end:]
            if data[index:] in (b".", b".\r"):
                self._held = data[index:]
                self._at_line_start = True
                return data[:index], False, b""
            index = _next_dot_line(data, index)
        self._at_line_start = data.endswith(b"\n")
        return data, False, b""


def _next_line(data: bytes, start: int) -> int:
    lf = data.find(b"\n", start)
    return -1 if lf < 0 else lf + 1


def _next_dot_line(data: bytes, start: int) -> int:
    """The next line start after C{start} at which a ``.`` could start a line, or -1."""
    lf = data.find(b"\n.", start)
    if lf >= 0:
        return lf + 1
    return -1


def unstuff(line: bytes) -> bytes:
    """A line of a dot-stuffed stream as it was before stuffing."""
    return line[1:] if line.startswith(b".") else line


# -- header blocks ----------------------------------------------------------------------


@dataclass
class HeaderBlock:
    """The header fields of a message: names as sent, values unfolded and decoded
    (UTF-8, undecodable bytes replaced: only addresses and ids are read from them)."""

    fields: list[tuple[str, str]] = field(default_factory=list)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for field_name, value in self.fields if field_name.lower() == wanted]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None


def parse_header_block(lines: Sequence[bytes]) -> HeaderBlock:
    """Parse the header lines of a message (un-stuffed, without CRLF, up to and not
    including the empty line that ends the block).

    Raises L{MalformedMessage} when the block is empty (a message without headers),
    when the first line is not a header field, or for a line that is neither a field
    nor a folded continuation.
    """
    if not lines:
        raise MalformedMessage("no_headers", "message has no headers")
    block = HeaderBlock()
    name: str | None = None
    parts: list[bytes] = []
    for number, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            if name is None:
                raise MalformedMessage("no_headers", "message has no headers (starts with a folded line)")
            parts.append(line)
            continue
        field_name, colon, value = line.partition(b":")
        field_name = field_name.rstrip(b" \t")  # obsolete syntax allows WSP before the colon
        if not colon or not _FIELD_NAME.fullmatch(field_name):
            if number == 0:
                raise MalformedMessage("no_headers", "message has no headers (first line is not a header field)")
            raise MalformedMessage("malformed_header", f"malformed header line {number + 1}")
        if name is not None:
            block.fields.append((name, _unfold(parts)))
        name = field_name.decode("ascii")
        parts = [value]
    if name is not None:
        block.fields.append((name, _unfold(parts)))
    return block


def check_header_line(line: bytes, first: bool) -> None:
    """Check one line of a header block as it arrives (un-stuffed, not the empty line
    that ends the block), so that a message without headers is recognised at its first
    line rather than after the whole header-block limit."""
    if line[:1] in (b" ", b"\t"):
        if first:
            raise MalformedMessage("no_headers", "message has no headers (starts with a folded line)")
        return
    field_name, colon, _ = line.partition(b":")
    if colon and _FIELD_NAME.fullmatch(field_name.rstrip(b" \t")):
        return
    if first:
        raise MalformedMessage("no_headers", "message has no headers (first line is not a header field)")
    raise MalformedMessage("malformed_header", "malformed header line (neither a field nor a continuation)")


def _unfold(parts: list[bytes]) -> str:
    return b"".join(parts).decode("utf-8", "replace").strip()


def message_id(headers: HeaderBlock) -> str | None:
    """The Message-ID (angle brackets included), or C{None} when absent or empty."""
    value = headers.get("Message-ID")
    if value is None:
        return None
    value = " ".join(value.split())
    return value[:998] or None


def envelope_sender(headers: HeaderBlock) -> str:
    """The bounce address for MAIL FROM: the ``Return-Path`` address when it is one
    plain ASCII address, else C{""} (the null sender)."""
    value = headers.get("Return-Path")
    if value is None:
        return ""
    addresses = [address for _, address in email.utils.getaddresses([value]) if address]
    if len(addresses) != 1 or not _ADDRESS.fullmatch(addresses[0]) or not addresses[0].isascii():
        return ""
    return addresses[0]


# -- recipients ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecipientRule:
    """How an account finds recipients: its header list, domain and Received options."""

    domain: str
    headers: tuple[str, ...] = DEFAULT_RECIPIENT_HEADERS
    received_parsing: bool = False
    skip_received: int = 0


def recipient_plan(rule: RecipientRule) -> list[tuple[str, ...]]:
    """The groups of header names tried in order.  ``Received`` parsing, when on and
    not placed explicitly in the list, comes after the envelope headers (before
    ``Resent-To``/``To``): it is envelope information too."""
    plan: list[tuple[str, ...]] = []
    for entry in rule.headers:
        group = tuple(name.strip() for name in entry.split("/") if name.strip())
        if group == (RECEIVED,) and not rule.received_parsing:
            continue
        plan.append(group)
    if rule.received_parsing and (RECEIVED,) not in plan:
        position = next(
            (i for i, group in enumerate(plan) if {"resent-to", "to", "cc", "resent-cc"} & {n.lower() for n in group}),
            len(plan),
        )
        plan.insert(position, (RECEIVED,))
    return plan


def _addresses(value: str) -> list[str]:
    found = []
    for _, address in email.utils.getaddresses([value]):
        address = address.strip()
        if address and address.isascii() and _ADDRESS.fullmatch(address):
            found.append(address)
    return found


def _received_for(headers: HeaderBlock, skip: int) -> list[str]:
    found: list[str] = []
    for value in headers.get_all("Received")[skip:]:
        for match in _RECEIVED_FOR.finditer(value):
            found.extend(_addresses(match.group(1)))
    return found


def find_recipients(headers: HeaderBlock, rule: RecipientRule) -> tuple[list[str], str | None]:
    """The recipients at the account's domain, from the first header group of the
    plan that yields any, and the name of that group (C{None} when none did).
    Addresses elsewhere are ignored; duplicates (case-insensitive) are dropped."""
    domain = rule.domain.lower()
    for group in recipient_plan(rule):
        if group == (RECEIVED,):
            candidates = _received_for(headers, rule.skip_received)
        else:
            candidates = [address for name in group for value in headers.get_all(name) for address in _addresses(value)]
        matched: list[str] = []
        seen: set[str] = set()
        for address in candidates:
            if address.rpartition("@")[2].lower() != domain:
                continue
            key = address.lower()
            if key not in seen:
                seen.add(key)
                matched.append(address)
        if matched:
            return matched, "/".join(group)
    return [], None


def valid_header_entry(entry: str) -> bool:
    """Whether C{entry} is a usable item of a recipient header list (``Name`` or
    ``Name/Name``)."""
    names = entry.split("/")
    return bool(names) and all(_FIELD_NAME_TEXT.fullmatch(name) for name in names)


# -- trace and loops -------------------------------------------------------------------


def safe_node_name(node_name: str) -> str:
    """The node name as it may appear in a header and an EHLO (unsafe characters
    replaced)."""
    return _NODE_SAFE.sub("-", node_name) or "mailgw"


def _trace_marker(node_name: str, account_id: int) -> str:
    return f"by {safe_node_name(node_name)} (mailgw poller account {account_id})"


def trace_header(node_name: str, account_id: int, server: str, when: float) -> bytes:
    """The ``Received`` header the poller adds: from the remote server, by this
    gateway, naming the account; CRLF-terminated and folded."""
    host = _trace_host(server)
    date = email.utils.format_datetime(datetime.fromtimestamp(when, UTC))
    return (f"Received: from {host}\r\n\t{_trace_marker(node_name, account_id)}\r\n\twith POP3; {date}\r\n").encode(
        "ascii"
    )


def _trace_host(server: str) -> str:
    try:
        address = ipaddress.ip_address(server.strip("[]"))
    except ValueError:
        return server if _HOST_NAME.fullmatch(server) else "unknown"
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def has_loop_trace(headers: HeaderBlock, node_name: str, account_id: int) -> bool:
    """Whether the message already went through this gateway for this account."""
    node = re.escape(safe_node_name(node_name))
    marker = re.compile(rf"\bby\s+{node}\s+\(mailgw\s+poller\s+account\s+{account_id}\)", re.IGNORECASE)
    return any(marker.search(value) for value in headers.get_all("Received"))


# -- MIME -----------------------------------------------------------------------------------


def multipart_boundary(headers: HeaderBlock) -> bytes | None:
    """The boundary of a top-level multipart message, C{None} for any other type.

    Raises L{MalformedMessage} for a multipart type without a boundary or with one
    RFC 2046 does not allow: such a body cannot be split into its parts.
    """
    value = headers.get("Content-Type")
    if value is None:
        return None
    parsed = email.message.Message()
    parsed["Content-Type"] = value
    if parsed.get_content_maintype() != "multipart":
        return None
    boundary = parsed.get_boundary()
    if boundary is None:
        raise MalformedMessage("broken_mime", "broken MIME structure: multipart without a boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise MalformedMessage("broken_mime", "broken MIME structure: invalid multipart boundary")
    return boundary.encode("ascii")


def is_boundary_line(line: bytes, boundary: bytes) -> bool:
    """Whether C{line} (un-stuffed) is a delimiter of C{boundary} (RFC 2046: trailing
    whitespace allowed; the close delimiter counts)."""
    if not line.startswith(b"--" + boundary):
        return False
    rest = line[2 + len(boundary) :]
    if rest.startswith(b"--"):
        rest = rest[2:]
    return not rest.strip(b" \t")


def join_lines(lines: Iterable[bytes]) -> bytes:
    """Lines (without terminators) as CRLF-terminated wire bytes."""
    return b"".join(line + b"\r\n" for line in lines)
