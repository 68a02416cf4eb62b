"""Password hashes for the local user file: bcrypt and argon2.

Both functions are CPU-bound on purpose (tens to hundreds of milliseconds) and
synchronous: callers on the reactor thread run them in a thread pool.

A stored hash names its own scheme by its prefix (``$2b$`` for bcrypt, ``$argon2id$``
for argon2), so one user file may mix both and a scheme change needs no migration.
"""

from __future__ import annotations

import re

import argon2
import bcrypt

__all__ = [
    "BCRYPT_MAX_PASSWORD_BYTES",
    "SCHEMES",
    "hash_password",
    "hash_scheme",
    "verify_password",
]

SCHEMES = ("bcrypt", "argon2")

# bcrypt only ever looked at the first 72 bytes of a password; bcrypt >= 5 refuses
# longer ones instead of truncating them silently.
BCRYPT_MAX_PASSWORD_BYTES = 72

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")

# argon2-cffi's defaults follow RFC 9106's "low memory" recommendation (t=3, 64 MiB, p=4).
_argon2 = argon2.PasswordHasher()


def hash_scheme(stored_hash: str) -> str | None:
    """
    Return the scheme of a stored hash, ``"bcrypt"`` or ``"argon2"``, or ``None`` if the
    string is not a well-formed hash of either.
    """
    if _BCRYPT_HASH.fullmatch(stored_hash):
        return "bcrypt"
    if stored_hash.startswith(_ARGON2_PREFIXES):
        try:
            argon2.extract_parameters(stored_hash)
        except argon2.exceptions.InvalidHashError:
            return None
        return "argon2"
    return None


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """
    Hash ``password`` with ``scheme`` (``"bcrypt"``, cost 12, or ``"argon2"``, argon2id).

    Raises ``ValueError`` for an unknown scheme, an empty password, a password that is not
    encodable as UTF-8, or one longer than bcrypt's 72 bytes with bcrypt.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown password scheme {scheme!r}, expected one of {SCHEMES}")
    if not password:
        raise ValueError("empty password")
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("password is not valid Unicode text") from None
    if scheme == "bcrypt":
        if len(secret) > BCRYPT_MAX_PASSWORD_BYTES:
            raise ValueError(
                f"bcrypt uses at most {BCRYPT_MAX_PASSWORD_BYTES} bytes of a password;"
                " use the argon2 scheme for longer ones"
            )
        return bcrypt.hashpw(secret, bcrypt.gensalt(rounds=12)).decode("ascii")
    return _argon2.hash(secret)


def verify_password(stored_hash: str, password: str) -> bool:
    """
    Tell whether ``password`` matches ``stored_hash``.

    The scheme comes from the hash's prefix. An unknown scheme, a malformed hash or a
    password that the scheme cannot have hashed gives ``False``; this never raises.
    """
    try:
        secret = password.encode("utf-8")
        stored = stored_hash.encode("ascii")
    except UnicodeEncodeError:
        return False
    if _BCRYPT_HASH.fullmatch(stored_hash):
        if len(secret) > BCRYPT_MAX_PASSWORD_BYTES:
            # hash_password refuses such passwords, so none can match; older tools that
            # truncated silently would make a prefix match, which is not a match.
            return False
        try:
            return bcrypt.checkpw(secret, stored)
        except ValueError:
            return False
    if stored_hash.startswith(_ARGON2_PREFIXES):
        try:
            return _argon2.verify(stored_hash, secret)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    return False
