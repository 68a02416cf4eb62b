"""What the user gets instead of a message the gateway withheld [4.9].

POP3 and IMAP: a short replacement message (L{replacement}) that keeps the original's
Date, Message-ID, From, To and Subject (so the user knows which message it was) and
says what was withheld and why; POP3 pads it to the original's size when it is
smaller (L{pad}), so that C{LIST} sizes still hold.  SMTP: the replies of
L{smtp_refusal} and L{smtp_tempfail}.
"""

from __future__ import annotations

import re
from email.utils import formatdate

from mailgw.inspect.check import TempFailed, Withheld
from mailgw.wire import smtp

__all__ = ["pad", "padding_lines", "replacement", "smtp_refusal", "smtp_tempfail"]

_KEPT = ("date", "message-id", "from", "to", "cc", "subject")
_MAX_VALUE = 300
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$")


def original_fields(head: bytes) -> dict[str, str]:
    """The kept fields of a header block (unfolded, control characters removed,
    shortened): what identifies the message to its reader."""
    fields: dict[str, str] = {}
    current: str | None = None
    for raw in head.replace(b"\r\n", b"\n").split(b"\n"):
        if raw[:1] in (b" ", b"\t") and current is not None:
            fields[current] += " " + raw.strip().decode("utf-8", "replace")
            continue
        match = _FIELD.match(raw)
        current = None
        if match is not None:
            name = match.group(1).decode("ascii").lower()
            if name in _KEPT and name not in fields:
                current = name
                fields[name] = match.group(2).strip().decode("utf-8", "replace")
    return {name: _clean(value) for name, value in fields.items()}


def _clean(value: str) -> str:
    value = "".join(c if c.isprintable() else " " for c in value)
    return value if len(value) <= _MAX_VALUE else value[: _MAX_VALUE - 3] + "..."


def replacement(head: bytes, verdict: Withheld | TempFailed, *, node: str, size: int) -> bytes:
    """The message the user gets instead of the original (CRLF line ends)."""
    fields = original_fields(head)
    subject = fields.get("subject", "")
    reason = verdict.text
    lines = [
        f"Date: {fields.get('date') or formatdate(usegmt=True)}",
        f"From: {fields.get('from') or f'Mail gateway <postmaster@{node}>'}",
    ]
    if "to" in fields:
        lines.append(f"To: {fields['to']}")
    if "message-id" in fields:
        lines.append(f"Message-ID: {fields['message-id']}")
    lines += [
        f"Subject: [withheld] {subject}".rstrip(),
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        f"X-Mailgw-Verdict: {_verdict_field(verdict)}",
        "",
        f"The mail gateway {node} withheld this message: {reason}.",
        "",
        "The original message:",
        f"  From: {fields.get('from', '(none)')}",
        f"  Subject: {subject or '(none)'}",
        f"  Date: {fields.get('date', '(none)')}",
        f"  Size: {size} octets",
        "",
        "Ask your mail administrator if you need it.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def _verdict_field(verdict: Withheld | TempFailed) -> str:
    if isinstance(verdict, TempFailed):
        return "tempfail"
    return _clean(f"withheld; reason={verdict.reason}; rule={verdict.rule}")


def pad(message: bytes, size: int) -> bytes:
    """C{message} (ending with CRLF) made C{size} octets long with lines of spaces at
    its end when it is shorter (it is returned as it is otherwise)."""
    missing = size - len(message)
    if missing <= 0:
        return message
    if missing == 1:
        return message[:-2] + b" \r\n"
    return message + padding_lines(missing)


def padding_lines(octets: int) -> bytes:
    """C{octets} octets of lines of spaces (C{octets} >= 2)."""
    lines: list[bytes] = []
    missing = octets
    while missing > 0:
        n = min(missing, 78)
        if missing - n == 1:
            n -= 1  # never leave a single octet: a line needs two
        lines.append(b" " * (n - 2) + b"\r\n")
        missing -= n
    return b"".join(lines)


def smtp_refusal(verdict: Withheld) -> bytes:
    """The reply refusing a submitted message: C{552} for size, C{550 5.7.1} otherwise."""
    if verdict.reason in ("size", "scan_limit"):
        return smtp.reply(552, f"Message refused: {verdict.text}", "5.3.4")
    return smtp.reply(550, f"Message refused: {verdict.text}", "5.7.1")


def smtp_tempfail(verdict: TempFailed) -> bytes:
    """The reply to a message that could not be checked now."""
    return smtp.reply(451, f"Message not accepted now: {verdict.text}; try again later", "4.7.1")
