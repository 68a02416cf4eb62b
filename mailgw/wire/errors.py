"""Errors raised by the pure codecs in :mod:`mailgw.wire`.

Every parser in the package raises :class:`ProtocolError` (or a subclass) for bad input,
whatever the bytes, and nothing else: the proxies map it to the protocol's error answer.
Errors raised for a programming mistake (a bad delimiter, a reply text with a line break)
are ordinary ``ValueError``\\ s: they are bugs, not hostile input.

Messages never contain the offending input: it may hold a password.
"""

from __future__ import annotations

__all__ = ["BadBase64", "LineTooLong", "LoginSyntaxError", "ProtocolError"]


class ProtocolError(Exception):
    """Input that does not follow the protocol."""


class LineTooLong(ProtocolError):
    """A line, or a command built for the wire, exceeds the protocol's length limit."""


class BadBase64(ProtocolError):
    """A SASL item is not strict base64 (RFC 4648 alphabet, correct padding)."""


class LoginSyntaxError(ProtocolError):
    """A username or password does not follow the login syntax of SPEC [4.2]."""
