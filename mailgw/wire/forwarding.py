"""Telling a mail server who the real client is [4.7], as pure values and command lines:
Postfix's and Dovecot's ``XCLIENT`` (POP3 and SMTP) and the IMAP ``ID`` fields of
Dovecot's own proxy (``x-originating-ip`` …).

A :class:`ClientOrigin` holds what the gateway knows of a session's client; the
formatters below validate every value again, so that nothing the client controls can
carry a command to the server:

- an address must be an IP address (normalised by :mod:`ipaddress`; an IPv4-mapped IPv6
  address is written as IPv4), a port a number in 1..65535, a session id 1..64 letters,
  digits, ``.``, ``-`` or ``_``, a HELO name a domain or an address literal, a login
  1..255 characters without control characters;
- every ``XCLIENT`` value is xtext (RFC 3461) on top, so a space, ``=``, CR, LF or NUL
  could not pass even if a check above were wrong; a value that fails its check is
  ``[UNAVAILABLE]`` (SMTP) or left out (POP3);
- ``ID`` fields are quoted strings of printable ASCII, ``"`` and ``\\`` escaped.  The
  client's own ``ID`` fields come after the gateway's; a client field that is not
  printable ASCII, is too long, or whose name starts with ``x-`` (the names a server
  takes from a trusted proxy: ``x-originating-ip``, ``x-forward-…``) is dropped, so a
  client cannot speak for the gateway.

Nothing here knows sockets: the login clients in :mod:`mailgw.upstream` send the lines.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mailgw.wire.errors import ProtocolError

__all__ = [
    "GATEWAY_ID_FIELDS",
    "MAX_ID_PAIRS",
    "POP3_XCLIENT_LIMIT",
    "SMTP_XCLIENT_LIMIT",
    "UNAVAILABLE",
    "ClientOrigin",
    "client_id_fields",
    "format_id",
    "id_fields",
    "normalise_address",
    "pop3_xclient",
    "smtp_xclient",
    "valid_helo",
    "valid_login",
    "valid_port",
    "valid_session_id",
    "xclient_lines",
    "xtext_decode",
    "xtext_encode",
]

#: the XCLIENT value for "the gateway does not know" (Postfix, Dovecot)
UNAVAILABLE = "[UNAVAILABLE]"

#: the gateway's own ID fields, in the order they are sent
GATEWAY_ID_FIELDS = ("x-originating-ip", "x-originating-port", "x-connected-ip", "x-connected-port", "x-session-id")

#: RFC 2971: at most 30 field/value pairs, field names of 30 octets, values of 1024
MAX_ID_PAIRS = 30
_MAX_ID_FIELD = 30
_MAX_ID_VALUE = 1024

#: longest XCLIENT command line, CRLF included: RFC 2449 (POP3) and RFC 5321 (SMTP)
POP3_XCLIENT_LIMIT = 255
SMTP_XCLIENT_LIMIT = 512

#: the XCLIENT attributes the gateway can fill (Postfix's names; Dovecot adds SESSION)
SMTP_ATTRIBUTES = ("NAME", "ADDR", "PORT", "HELO", "LOGIN", "SESSION")

_SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_ATTRIBUTE = re.compile(r"[A-Z][A-Z0-9_-]*")
_ID_TAG = re.compile(r'[^\x00-\x20\x7f-\U0010ffff(){%*"\\+\]]+')


@dataclass(frozen=True, slots=True)
class ClientOrigin:
    """What the gateway knows of a session's client, for the mail server.

    C{address}/C{port} are the client's (behind a load balancer, the PROXY header's
    source); C{local_address}/C{local_port} the gateway's address the client reached.
    C{helo} is the client's EHLO/HELO name (SMTP), C{login} the name the client logged in
    with (SMTP ``XCLIENT LOGIN``, "" = none), C{client_id} the client's own IMAP ``ID``
    parameters, flat (field, value, field, value …; C{None} for ``NIL``).  Nothing is
    trusted: the formatters check each value.
    """

    address: str
    port: int
    local_address: str
    local_port: int
    session_id: str
    helo: str = ""
    login: str = ""
    client_id: tuple[str | None, ...] = ()

    def __repr__(self) -> str:
        # The client's ID parameters and login are the client's words: not for logs.
        return f"ClientOrigin({self.address!r}, {self.port}, session {self.session_id!r})"


# -- xtext (RFC 3461 section 4) -------------------------------------------------------


def xtext_encode(value: str) -> str:
    """C{value}'s UTF-8 octets as xtext: ``!``..``~`` but ``+`` and ``=`` as they are,
    every other octet ``+XX`` (upper-case hex).  The result never holds a space, a
    control character, ``=`` or a non-ASCII character."""
    out = []
    for octet in value.encode("utf-8", "surrogatepass"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")


def xtext_decode(text: str) -> bytes:
    """The octets of xtext C{text}; :class:`ProtocolError` for anything not xtext
    (upper-case hex, as RFC 3461 writes it)."""
    if not _XTEXT.fullmatch(text):
        raise ProtocolError("not xtext")
    out = bytearray()
    index = 0
    while index < len(text):
        if text[index] == "+":
            out.append(int(text[index + 1 : index + 3], 16))
            index += 3
        else:
            out.append(ord(text[index]))
            index += 1
    return bytes(out)


# -- value checks -----------------------------------------------------------------------


def normalise_address(value: str) -> str | None:
    """C{value} as a normalised IP address, or C{None} when it is not one.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack listener
    reports) is written as IPv4; scoped addresses (``fe80::1%eth0``) are refused.
    """
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)


def valid_port(value: object) -> int | None:
    """C{value} when it is a TCP port number (1..65535), else C{None}."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    return None


def valid_session_id(value: str) -> str | None:
    """C{value} when it is 1..64 letters, digits, ``.``, ``-``, ``_`` (what fits
    Dovecot's session ids), else C{None}."""
    return value if _SESSION_ID.fullmatch(value) else None


def valid_helo(value: str) -> str | None:
    """C{value} when it is a domain name (letters, digits, ``-``, ``_``; at most 255
    octets) or an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), else
    C{None}."""
    if len(value) > 255:
        return None
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1]
        if inner[:5].upper() == "IPV6:":
            return value if isinstance(_ip(inner[5:]), ipaddress.IPv6Address) else None
        return value if isinstance(_ip(inner), ipaddress.IPv4Address) else None
    return value if _DOMAIN.fullmatch(value) else None


def valid_login(value: str) -> str | None:
    """C{value} when it is 1..255 characters without a control character, else C{None}."""
    if not 0 < len(value) <= 255 or any(_is_control(char) for char in value):
        return None
    return value


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code < 0xE000 or code in (0x2028, 0x2029)


# -- XCLIENT --------------------------------------------------------------------------


def xclient_lines(attributes: Iterable[tuple[str, str]], *, limit: int = SMTP_XCLIENT_LIMIT) -> list[bytes]:
    """``XCLIENT NAME=value …`` command lines (without CRLF) carrying C{attributes},
    each value xtext-encoded, each line at most C{limit} octets with its CRLF: as many
    lines as needed (each is a command of its own; the server keeps what the earlier
    ones set).  No attributes give no line.  An attribute name that is not upper-case
    letters, digits, ``-`` and ``_``, or an attribute too long for a line of its own,
    is a C{ValueError}."""
    lines: list[bytes] = []
    current = b"XCLIENT"
    for name, value in attributes:
        if not _ATTRIBUTE.fullmatch(name):
            raise ValueError("invalid XCLIENT attribute name")
        item = b" " + name.encode("ascii") + b"=" + xtext_encode(value).encode("ascii")
        if len(b"XCLIENT") + len(item) + 2 > limit:
            raise ValueError(f"XCLIENT attribute {name} does not fit in a command line")
        if len(current) + len(item) + 2 > limit:
            lines.append(current)
            current = b"XCLIENT"
        current += item
    if current != b"XCLIENT":
        lines.append(current)
    return lines


def pop3_xclient(origin: ClientOrigin) -> bytes | None:
    """The POP3 ``XCLIENT ADDR=… PORT=… SESSION=…`` line (without CRLF) of Dovecot's
    proxy, with the values that pass their checks; C{None} without a valid address
    (then there is nothing worth telling)."""
    address = normalise_address(origin.address)
    if address is None:
        return None
    attributes = [("ADDR", address)]
    port = valid_port(origin.port)
    if port is not None:
        attributes.append(("PORT", str(port)))
    session = valid_session_id(origin.session_id)
    if session is not None:
        attributes.append(("SESSION", session))
    (line,) = xclient_lines(attributes, limit=POP3_XCLIENT_LIMIT)
    return line


def smtp_xclient(origin: ClientOrigin, advertised: Sequence[str], *, login: bool = True) -> list[bytes]:
    """The SMTP ``XCLIENT`` lines (without CRLF) for a server whose EHLO answer listed
    ``XCLIENT`` with the attribute names C{advertised} (Postfix and Dovecot list them;
    an empty list is taken as Postfix's classic set).  Only advertised attributes are
    sent, since Postfix refuses unknown ones: ``NAME`` is ``[UNAVAILABLE]`` (the
    gateway does not look names up), ``ADDR`` is ``IPV6:``-prefixed for IPv6 (Postfix's
    syntax, which Dovecot reads too), ``LOGIN`` only with C{login} (Postfix refuses AUTH
    after an XCLIENT login, so it is sent only when the gateway does not authenticate
    upstream).  A value that fails its check is ``[UNAVAILABLE]``; with no valid
    address there is no line at all."""
    address = normalise_address(origin.address)
    if address is None:
        return []
    offered = {name.upper() for name in advertised} or {"NAME", "ADDR", "PORT", "HELO", "LOGIN"}
    if ":" in address:
        address = "IPV6:" + address
    port = valid_port(origin.port)
    values = {
        "NAME": UNAVAILABLE,
        "ADDR": address,
        "PORT": str(port) if port is not None else UNAVAILABLE,
        "HELO": valid_helo(origin.helo) or UNAVAILABLE,
        "LOGIN": valid_login(origin.login) or UNAVAILABLE,
        "SESSION": valid_session_id(origin.session_id) or UNAVAILABLE,
    }
    attributes = [
        (name, values[name]) for name in SMTP_ATTRIBUTES if name in offered and (login or name != "LOGIN")
    ]
    if not any(name == "ADDR" for name, _ in attributes):
        return []
    return xclient_lines(attributes, limit=SMTP_XCLIENT_LIMIT)


# -- IMAP ID --------------------------------------------------------------------------


def client_id_fields(params: Sequence[str | None], room: int = MAX_ID_PAIRS) -> list[tuple[str, str | None]]:
    """The client's own ``ID`` parameters (flat: field, value, …) that may be passed on,
    at most C{room} of them, in the client's order.

    Dropped: fields whose name starts with ``x-`` (any case: the names a server takes
    from a trusted proxy, which only the gateway may set), fields or values that are
    not printable ASCII or are over RFC 2971's lengths, a field named twice (the first
    counts), and a trailing field without a value.
    """
    fields: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for index in range(0, len(params) - 1, 2):
        name, value = params[index], params[index + 1]
        if len(fields) >= room:
            break
        if not isinstance(name, str) or not _id_string_ok(name, _MAX_ID_FIELD):
            continue
        if name.lower().startswith("x-") or name.lower() in seen:
            continue
        if value is not None and not _id_string_ok(value, _MAX_ID_VALUE):
            continue
        seen.add(name.lower())
        fields.append((name, value))
    return fields


def id_fields(origin: ClientOrigin) -> list[tuple[str, str | None]]:
    """The ``ID`` fields for a server: the gateway's (those whose values pass their
    checks, in L{GATEWAY_ID_FIELDS} order), then what L{client_id_fields} keeps of the
    client's, 30 pairs at most in all.  Empty without a valid client address."""
    address = normalise_address(origin.address)
    if address is None:
        return []
    port = valid_port(origin.port)
    local = normalise_address(origin.local_address)
    local_port = valid_port(origin.local_port)
    session = valid_session_id(origin.session_id)
    candidates: list[tuple[str, str | None]] = [
        ("x-originating-ip", address),
        ("x-originating-port", str(port) if port is not None else None),
        ("x-connected-ip", local),
        ("x-connected-port", str(local_port) if local_port is not None else None),
        ("x-session-id", session),
    ]
    fields = [(name, value) for name, value in candidates if value is not None]
    return fields + client_id_fields(origin.client_id, MAX_ID_PAIRS - len(fields))


def format_id(tag: str, fields: Sequence[tuple[str, str | None]]) -> bytes:
    """``tag ID ("field" "value" …)`` with CRLF (``tag ID NIL`` without fields): quoted
    strings only, ``NIL`` for a C{None} value.  A tag that is not an IMAP tag, more than
    30 pairs, or a field or value that is not printable ASCII or over RFC 2971's
    lengths are a C{ValueError}: the line can never hold a CR, LF or NUL."""
    if not _ID_TAG.fullmatch(tag):
        raise ValueError("invalid IMAP tag")
    if len(fields) > MAX_ID_PAIRS:
        raise ValueError("at most 30 ID fields")
    if not fields:
        return tag.encode("ascii") + b" ID NIL\r\n"
    items = []
    for name, value in fields:
        if not _id_string_ok(name, _MAX_ID_FIELD):
            raise ValueError("invalid ID field name")
        if value is not None and not _id_string_ok(value, _MAX_ID_VALUE):
            raise ValueError("invalid ID value")
        items.append(_quoted(name))
        items.append(b"NIL" if value is None else _quoted(value))
    return tag.encode("ascii") + b" ID (" + b" ".join(items) + b")\r\n"


def _id_string_ok(value: str, limit: int) -> bool:
    return len(value) <= limit and all(" " <= char <= "~" for char in value)


def _quoted(value: str) -> bytes:
    return b'"' + value.encode("ascii").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
