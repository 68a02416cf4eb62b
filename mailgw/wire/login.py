"""The login syntax of SPEC [4.2]: ``[VPNUSER<d1>]MAILUSER[<d2>SERVER]`` / ``[VPNPASS<d1>]MAILPASS``.

d1 is ``username_password_delimiter`` (``user_delimiter`` here), d2 ``server_delimiter``.

Rules, applied in this order:

1. **Characters.**  The username must be non-empty and contain no control character
   (Unicode category Cc: C0 including NUL, CR, LF, TAB; DEL; C1), no invisible format
   character (Cf: U+200B zero width space, U+202E right-to-left override, U+FEFF byte
   order mark, soft hyphen …), no line or paragraph separator (Zl U+2028, Zp U+2029) and
   no lone surrogate: the VPN user, the mail user and the server are all cut from it, and
   none of them may look like something else in a log, an admin listing or upstream.
   The error names the character by its code point, never raw.
   The password may contain anything except NUL, CR, LF and lone surrogates.
2. **Server** — split off at the *last* d2, when what follows it is a server candidate:
   non-empty and made only of host characters (ASCII letters, digits, ``.``, ``-``,
   ``:``, ``[``, ``]``).  A candidate must then be a valid host: a DNS name (labels of
   1-63 letters, digits and inner hyphens, 253 characters at most, the last label not
   numeric), a dotted-quad IPv4 address, an IPv6 address, or either address in brackets;
   otherwise :class:`LoginSyntaxError`.  A name that only the C library would read as an
   address (``127.1``, ``0x7f.0.0.1``, ``010.0.0.1``) is refused, so that what is compared
   with ``allowed_servers`` is what gets connected to.  ``server`` is returned as typed,
   brackets removed.
3. **No server** — when the username has no d2, when nothing follows the last d2
   (``alice@``), or when what follows contains a non-host character (``alice@foo bar``,
   ``alice@exämple.com``, ``alice@fe80::1%eth0``): there is no server part, and the whole
   username (VPN part aside) is the mail user, to be used with the default server.
4. **VPN user** — the rest is split at the *first* d1: ``VPNUSER<d1>MAILUSER``.  Both
   parts must be non-empty.  Without d1, VPNUSER = MAILUSER.
5. **Password** — split at the first d1 only when the username carried a VPN part:
   ``VPNPASS<d1>MAILPASS`` (either may be empty: certificate and piggyback logins need no
   VPN password).  Without a VPN part, or when the password holds no d1, the same password
   serves both.

The ambiguous case: a mail user that is itself an e-mail address (``john@example.com``)
with ``@`` as d2 and no server named.  The parser cannot tell a domain from a server and
always reads the text after the last ``@`` as the server (``example.com``), which then has
to be an allowed server or the login fails, as [4.2] requires — it never quietly falls back
to the default server.  Such users name the server explicitly
(``john@example.com@mail.example.com``), or the administrator picks a d2 that cannot
occur in mail user names (``%``, ``#``).  For the same reason a mail user cannot contain
d1 unless a VPN part is given (``vpn:a:b`` has mail user ``a:b``).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field

from mailgw.wire.errors import LoginSyntaxError

__all__ = ["LoginRequest", "format_login", "parse_login"]

_HOST_CHARACTERS = re.compile(r"[A-Za-z0-9.:\[\]-]+\Z")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
# A part of an address as inet_aton(3) reads it: decimal, octal or hexadecimal.
_INET_ATON_PART = re.compile(r"(?:0[xX][0-9A-Fa-f]*|[0-9]+)\Z")
_PASSWORD_FORBIDDEN = frozenset("\x00\r\n")
#: Unicode categories refused in a username, with the words the error uses for them.
_FORBIDDEN_IN_USERNAME = {
    "Cc": "control character",
    "Cf": "invisible character",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Cs": "lone surrogate",
}


@dataclass(frozen=True)
class LoginRequest:
    """A parsed login.  The passwords are left out of ``repr`` so they cannot reach a log."""

    vpn_user: str
    vpn_password: str = field(repr=False)
    mail_user: str
    mail_password: str = field(repr=False)
    server: str | None


def parse_login(
    username: str,
    password: str,
    *,
    user_delimiter: str = ":",
    server_delimiter: str = "@",
) -> LoginRequest:
    """Parse a client's username and password; see the module docstring for the rules.

    Raises :class:`LoginSyntaxError` for input that breaks them, and ``ValueError`` for
    unusable delimiters (a configuration error, caught by the configuration checks).
    """
    _check_delimiters(user_delimiter, server_delimiter)
    if not username:
        raise LoginSyntaxError("empty username")
    for char in username:
        kind = _FORBIDDEN_IN_USERNAME.get(unicodedata.category(char))
        if kind is not None:
            raise LoginSyntaxError(f"user name contains the {kind} U+{ord(char):04X}")
    for char in password:
        if char in _PASSWORD_FORBIDDEN or unicodedata.category(char) == "Cs":
            raise LoginSyntaxError("forbidden character in password")

    rest, server = _split_server(username, server_delimiter)

    vpn_user, d1, mail_user = rest.partition(user_delimiter)
    if d1:
        if not vpn_user:
            raise LoginSyntaxError("empty VPN user")
        if not mail_user:
            raise LoginSyntaxError("empty mail user")
        vpn_password, p1, mail_password = password.partition(user_delimiter)
        if not p1:
            vpn_password = mail_password = password
    else:
        mail_user = vpn_user
        if not mail_user:
            raise LoginSyntaxError("empty mail user")
        vpn_password = mail_password = password
    return LoginRequest(
        vpn_user=vpn_user,
        vpn_password=vpn_password,
        mail_user=mail_user,
        mail_password=mail_password,
        server=server,
    )


def format_login(
    request: LoginRequest,
    *,
    user_delimiter: str = ":",
    server_delimiter: str = "@",
) -> tuple[str, str]:
    """Build the ``(username, password)`` a client types for ``request``: the inverse of
    :func:`parse_login` for parts free of delimiters.

    The VPN part is written only when the VPN user or password differs from the mail
    ones; an IPv6 server is written in brackets.
    """
    _check_delimiters(user_delimiter, server_delimiter)
    if request.vpn_user == request.mail_user and request.vpn_password == request.mail_password:
        username, password = request.mail_user, request.mail_password
    else:
        username = request.vpn_user + user_delimiter + request.mail_user
        password = request.vpn_password + user_delimiter + request.mail_password
    if request.server is not None:
        server = f"[{request.server}]" if ":" in request.server else request.server
        username += server_delimiter + server
    return username, password


def _check_delimiters(user_delimiter: str, server_delimiter: str) -> None:
    if not user_delimiter or not server_delimiter:
        raise ValueError("login delimiters must not be empty")
    if user_delimiter == server_delimiter:
        raise ValueError("the user and server delimiters must differ")
    for char in user_delimiter + server_delimiter:
        if unicodedata.category(char) in _FORBIDDEN_IN_USERNAME:
            raise ValueError("login delimiters must not contain control or invisible characters")


def _split_server(username: str, server_delimiter: str) -> tuple[str, str | None]:
    """Split ``username`` into the part before the server and the server, if any."""
    head, d2, tail = username.rpartition(server_delimiter)
    if not d2 or not _HOST_CHARACTERS.match(tail):
        return username, None
    return head, _check_host(tail)


def _check_host(candidate: str) -> str:
    """Return the host named by ``candidate`` (brackets removed) or raise."""
    if candidate.startswith("[") and candidate.endswith("]"):
        inner = candidate[1:-1]
        if "[" in inner or "]" in inner or not _is_ip_address(inner):
            raise LoginSyntaxError("invalid server address literal")
        return inner
    if "[" in candidate or "]" in candidate:
        raise LoginSyntaxError("invalid server name")
    if ":" in candidate:
        if not _is_ipv6_address(candidate):
            raise LoginSyntaxError("invalid server address")
        return candidate
    if len(candidate) > 253:
        raise LoginSyntaxError("server name too long")
    labels = candidate.split(".")
    if all(_INET_ATON_PART.match(label) for label in labels):
        # Numeric: only a canonical dotted quad (no octal, hex or short forms).
        if not _is_ipv4_address(candidate):
            raise LoginSyntaxError("invalid server address")
        return candidate
    if not all(_DNS_LABEL.match(label) for label in labels) or _DIGITS.match(labels[-1]):
        raise LoginSyntaxError("invalid server name")
    return candidate


def _is_ip_address(text: str) -> bool:
    return _is_ipv4_address(text) or _is_ipv6_address(text)


def _is_ipv4_address(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_ipv6_address(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
