"""SASL PLAIN (RFC 4616) and the base64 items of AUTH LOGIN.

Base64 is decoded strictly (RFC 4648 alphabet, exact padding, no whitespace), as
``binascii.a2b_base64(..., strict_mode=True)`` does.  A lone ``=`` is the empty response
(RFC 4954, RFC 5034, RFC 9051 SASL-IR), and so is an empty item.  A client cancels an
exchange with ``*`` (:data:`CANCEL`): callers check for it before decoding.

The decoded names are returned as they are: CR, LF and other controls in them are
refused by :func:`mailgw.wire.login.parse_login`, which every login goes through.
"""

from __future__ import annotations

import binascii

from mailgw.wire.errors import BadBase64, ProtocolError

__all__ = [
    "CANCEL",
    "LOGIN_PASSWORD_CHALLENGE",
    "LOGIN_USERNAME_CHALLENGE",
    "decode_b64",
    "decode_login_item",
    "decode_login_username",
    "decode_plain",
    "encode_b64",
    "encode_plain",
]

#: The client's answer that cancels a SASL exchange.
CANCEL = b"*"
#: The server's challenges of AUTH LOGIN (draft-murchison-sasl-login): base64 of
#: ``Username:`` and ``Password:``, the texts clients expect.
LOGIN_USERNAME_CHALLENGE = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_CHALLENGE = b"UGFzc3dvcmQ6"


def decode_b64(data: bytes) -> bytes:
    """Decode one strict base64 item; ``=`` and ``b""`` give ``b""``.

    Raises :class:`BadBase64` for anything else that is not strict base64.
    """
    if data == b"=":
        return b""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise BadBase64("invalid base64") from e


def decode_plain(data: bytes) -> tuple[str, str, str]:
    """Decode a base64 PLAIN message into ``(authzid, authcid, password)``.

    ``authzid`` is ``""`` when absent.  Raises :class:`BadBase64` for bad base64 and
    :class:`ProtocolError` for a message that is not ``[authzid] NUL authcid NUL passwd``
    in UTF-8 with a non-empty authcid and password.
    """
    parts = decode_b64(data).split(b"\x00")
    if len(parts) != 3:
        raise ProtocolError("PLAIN message must hold exactly two NUL separators")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError as e:
        raise ProtocolError("PLAIN message is not UTF-8") from e
    if not authcid:
        raise ProtocolError("PLAIN message has an empty authentication identity")
    if not password:
        raise ProtocolError("PLAIN message has an empty password")
    return authzid, authcid, password


def encode_plain(authcid: str, password: str, authzid: str = "") -> bytes:
    """Encode a PLAIN message as base64, without a line break.

    Raises ``ValueError`` for an empty authcid or password or a NUL in any part (such a
    message cannot be decoded back), and ``UnicodeEncodeError`` (a ``ValueError``) for a
    lone surrogate.
    """
    if not authcid or not password:
        raise ValueError("PLAIN needs a non-empty authcid and password")
    if "\x00" in authzid + authcid + password:
        raise ValueError("PLAIN parts must not contain NUL")
    return encode_b64(f"{authzid}\x00{authcid}\x00{password}")


def decode_login_item(data: bytes) -> str:
    """Decode one AUTH LOGIN answer (a username or a password) from base64 UTF-8.

    Raises :class:`BadBase64` for bad base64 and :class:`ProtocolError` for an item
    that is not UTF-8.
    """
    try:
        return decode_b64(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("AUTH LOGIN item is not UTF-8") from e


def decode_login_username(data: bytes) -> str:
    """Decode the first AUTH LOGIN answer, the username, as :func:`decode_login_item`
    does; an empty username (``=`` or an empty line) is a :class:`ProtocolError` too,
    answered at once rather than after a failed login."""
    username = decode_login_item(data)
    if not username:
        raise ProtocolError("AUTH LOGIN username is empty")
    return username


def encode_b64(text: str) -> bytes:
    """Base64 of the UTF-8 of ``text``, without a line break (``b""`` for ``""``).

    Where a protocol needs the empty *initial response*, send ``=`` instead.  A lone
    surrogate raises ``UnicodeEncodeError``.
    """
    return binascii.b2a_base64(text.encode("utf-8"), newline=False)
