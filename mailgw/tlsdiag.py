"""TLS failures in words an administrator can act on.

The upstream clients report a failed handshake as pyOpenSSL words it:
C{[('SSL routines', '', 'certificate verify failed')]}, or as service-identity's
C{VerificationError(errors=[DNSMismatch(...)])}.  L{explain} turns those into a
sentence with the fix (C{certificate verify failed: self-signed certificate in
certificate chain (set --ca)}); the fix names the option or setting of whoever shows
it (C{hints}).  OpenSSL's reason for a failed verification is not part of that text;
L{verify_detail} finds it by repeating the handshake with the standard library's
C{ssl} (blocking: call it from a command-line tool or a thread, never from the
reactor thread).

Nothing here sees a password: only error texts and server addresses.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Mapping

__all__ = ["explain", "verify_detail"]

# One or more OpenSSL error tuples: [('SSL routines', 'function', 'reason'), ...]
_OPENSSL_ERRORS = re.compile(r"\[\('[^']*', '[^']*', '[^']*'\)(?:, \('[^']*', '[^']*', '[^']*'\))*\]")
_REASON = re.compile(r"\('[^']*', '[^']*', '([^']*)'\)")
_MISMATCH = re.compile(
    r"VerificationError\(errors=\[(?:DNS|IPAddress|URI|SRV)Mismatch\(mismatched_id=\w+\((?:hostname|ip|uri)="
    r"(?:IPv[46]Address\()?b?'([^']*)'[^\]]*\]\)"
)

#: OpenSSL reasons meaning "what answered is not TLS" (a plaintext port, another service)
_NOT_TLS = frozenset(
    {
        "wrong version number",
        "packet length too long",
        "unknown protocol",
        "http request",
        "record layer failure",
        "bad record type",
        "record too long",
    }
)
#: OpenSSL reasons meaning "no protocol version or cipher in common"
_NO_COMMON = frozenset(
    {
        "unsupported protocol",
        "no protocols available",
        "sslv3 alert handshake failure",
        "tlsv1 alert protocol version",
        "no shared cipher",
        "tlsv1 alert insufficient security",
    }
)


#: Twisted's words for the common connection failures, and plainer ones
_CONNECT_ERRORS = (
    ("Connection was refused by other side: 111: Connection refused.", "connection refused (nothing listens there)"),
    ("User timeout caused connection failure.", "no answer (the connection timed out)"),
)


def _hint(hints: Mapping[str, str], key: str) -> str:
    value = hints.get(key)
    return f" ({value})" if value else ""


def _sentence(reasons: list[str], hints: Mapping[str, str], detail: str | None) -> str:
    first = reasons[0] if reasons else ""
    if "certificate verify failed" in reasons:
        why = detail or "the server's certificate is not signed by a CA that is trusted here"
        return f"certificate verify failed: {why}{_hint(hints, 'ca')}"
    if first in _NOT_TLS:
        return f"the server does not speak TLS on this port{_hint(hints, 'tls')}"
    if first in _NO_COMMON:
        return f"the server and the gateway have no TLS version or cipher in common ({first})"
    if first == "tlsv1 unrecognized name":
        return "the server does not know the host name it was asked for (connect by its own name)"
    if first.startswith(("sslv3 alert", "tlsv1 alert")):
        return f"the server refused the TLS handshake ({first.split(' alert ', 1)[1]})"
    return "TLS error: " + "; ".join(reasons)


def explain(text: str, hints: Mapping[str, str] | None = None, *, detail: str | None = None) -> str:
    """
    C{text} with every raw TLS error in it replaced by a sentence (and Twisted's
    words for a refused or timed-out connection by plainer ones).

    @param hints: the fix to suggest, by kind: C{"ca"} (the server's certificate is
        not trusted) and C{"tls"} (the port does not speak TLS), e.g.
        C{{"ca": "set --ca", "tls": "try --tls starttls or none"}}.
    @param detail: OpenSSL's reason for a failed verification (L{verify_detail}), if
        known.
    """
    hints = hints or {}

    def openssl(match: re.Match[str]) -> str:
        return _sentence(_REASON.findall(match.group(0)), hints, detail)

    def mismatch(match: re.Match[str]) -> str:
        return (
            f"the server's certificate is not valid for the name {match.group(1)}"
            " (connect by a name the certificate carries)"
        )

    text = _MISMATCH.sub(mismatch, _OPENSSL_ERRORS.sub(openssl, text))
    for raw, words in _CONNECT_ERRORS:
        text = text.replace(raw, words)
    return text


def verify_detail(
    host: str,
    port: int,
    tls: str,
    *,
    ca: str | None = None,
    check_hostname: bool = True,
    timeout: float = 5.0,
) -> str | None:
    """
    Why the certificate of the POP3 server C{host}:C{port} fails verification, in
    OpenSSL's words (C{self-signed certificate in certificate chain}, C{unable to get
    local issuer certificate}, C{Hostname mismatch, ...}); C{None} when it verifies or
    the question cannot be answered (unreachable, no STLS, not TLS).

    @param tls: C{"implicit"} (TLS from the first byte) or C{"starttls"} (POP3 STLS).
    @param ca: PEM file of the CAs to trust; C{None}: the system's trust store.
    """
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError):
        return None
    context.check_hostname = check_hostname
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if tls == "starttls":
                stream = raw.makefile("rb")
                if not stream.readline(4096).startswith(b"+OK"):
                    return None
                raw.sendall(b"STLS\r\n")
                if not stream.readline(4096).startswith(b"+OK"):
                    return None
            with context.wrap_socket(raw, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as e:
        return str(e.verify_message) if e.verify_message else None
    except (OSError, ssl.SSLError, ValueError):
        return None
