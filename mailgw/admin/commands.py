"""The admin channel's contract: the AMP commands ``mailgwctl`` sends to the daemon.

Structured answers (status, sessions, accounts, test results) travel as JSON in a
:class:`JSON` argument, so that their fields can grow without a protocol change and
without the 64 KiB limit of one AMP value (a long session list is split over several
keys of the same box).  Each command declares the typed errors it may answer with; the
client gets the same exception class back, its message being the server's description.

Nothing in an answer may carry a secret: the responder drops every key named in
:data:`SECRET_KEYS` from whatever the backend returns (:func:`scrub`), on top of the
backends building their answers field by field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from twisted.protocols import amp

__all__ = [
    "JSON",
    "SECRET_KEYS",
    "AaaFlush",
    "AaaTest",
    "AccountsAdd",
    "AccountsCheckNow",
    "AccountsDelete",
    "AccountsEdit",
    "AccountsList",
    "AdminCommandError",
    "InvalidAccount",
    "InvalidArgument",
    "Kill",
    "NoSuchAccount",
    "NoSuchGroup",
    "NoSuchIdentity",
    "NoSuchSession",
    "NotAvailable",
    "Reload",
    "ReloadFailed",
    "ReplayFailed",
    "Sessions",
    "SsoList",
    "SsoLookup",
    "SsoRemove",
    "SsoReplay",
    "Status",
    "scrub",
]

#: keys that never leave the daemon in an answer, at any depth
SECRET_KEYS = frozenset(
    {
        "password",
        "password_encrypted",
        "password_hash",
        "bind_password",
        "secret",
        "shared_secret",
    }
)


def scrub(value: Any) -> Any:
    """C{value} with every mapping key of L{SECRET_KEYS} removed, recursively."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if str(k).lower() not in SECRET_KEYS}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


# --- Argument types ------------------------------------------------------------------

_CHUNK = amp.MAX_VALUE_LENGTH


class JSON(amp.Argument):
    """
    A JSON-serialisable value, UTF-8 encoded; values longer than one AMP value are
    split over the keys ``NAME``, ``NAME.1``, ``NAME.2``, ...
    """

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: object) -> None:
        value = self.retrieve(objects, name.decode("ascii"), proto)
        if self.optional and value is None:
            return
        data = json.dumps(value, separators=(",", ":"), sort_keys=True, default=str).encode("utf-8")
        chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)]
        strings[name] = chunks[0]
        for index, chunk in enumerate(chunks[1:], 1):
            strings[name + b".%d" % index] = chunk

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: object) -> None:
        first = self.retrieve(strings, name, proto)
        key = name.decode("ascii")
        if first is None:
            objects[key] = None
            return
        parts = [first]
        index = 1
        while (name + b".%d" % index) in strings:
            parts.append(strings.pop(name + b".%d" % index))
            index += 1
        objects[key] = json.loads(b"".join(parts).decode("utf-8"))


# --- Errors --------------------------------------------------------------------------


class AdminCommandError(Exception):
    """Base of the errors a command answers with.  The message is what the
    administrator reads; it never holds a secret."""


class _ProblemsError(AdminCommandError):
    """An error carrying a list of problems, one per line (so that it survives the
    trip through AMP, which carries only the message)."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = problems.splitlines() if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


class NoSuchSession(AdminCommandError):
    """No live session has this id."""


class NoSuchAccount(AdminCommandError):
    """No remote POP account has this id."""


class NoSuchGroup(AdminCommandError):
    """No AAA server group has this name."""


class NoSuchIdentity(AdminCommandError):
    """The SSO identity table has no live entry for this address."""


class NotAvailable(AdminCommandError):
    """The feature is not configured (or not wired) in this daemon."""


class InvalidArgument(AdminCommandError):
    """An argument of the command was refused (not an IP address, a relative path,
    a user without its group); the message says which and why."""


class ReplayFailed(AdminCommandError):
    """A capture file could not be replayed (unreadable, not a capture)."""


class ReloadFailed(_ProblemsError):
    """The new configuration was refused (the old one is kept); ``problems`` says why."""


class InvalidAccount(_ProblemsError):
    """The account fields were refused; ``problems`` says why, one per field."""


# --- Commands ------------------------------------------------------------------------


class Status(amp.Command):
    """Version, uptime, listeners, sessions by protocol and state, AAA groups,
    poller and SSO summary."""

    response = [(b"status", JSON())]


class Sessions(amp.Command):
    """The live sessions (optionally of one protocol: ``pop3``/``pop3s``, ...)."""

    arguments = [(b"protocol", amp.Unicode(optional=True))]
    response = [(b"sessions", JSON())]


class Kill(amp.Command):
    """Close one session (both sides); answers with the session as it was."""

    arguments = [(b"session_id", amp.Unicode())]
    response = [(b"session", JSON())]
    errors = {NoSuchSession: b"NO_SUCH_SESSION"}


class Reload(amp.Command):
    """Reload the configuration: validated first, the old one kept on error."""

    errors = {ReloadFailed: b"RELOAD_FAILED", NotAvailable: b"NOT_AVAILABLE"}


class AaaTest(amp.Command):
    """Log a user in through one AAA server group; answers with the verdict, the
    group policy and the attributes (never the password)."""

    arguments = [(b"group", amp.Unicode()), (b"user", amp.Unicode()), (b"password", amp.Unicode())]
    response = [(b"result", JSON())]
    errors = {NoSuchGroup: b"NO_SUCH_GROUP"}


class AaaFlush(amp.Command):
    """Empty the authentication cache [5.6]: all of it, one server group's part, or
    one user's entry in a group; answers with how many entries were forgotten."""

    arguments = [(b"group", amp.Unicode(optional=True)), (b"user", amp.Unicode(optional=True))]
    response = [(b"result", JSON())]
    errors = {NoSuchGroup: b"NO_SUCH_GROUP", InvalidArgument: b"INVALID_ARGUMENT"}


_ACCOUNT_ERRORS: dict[type[Exception], bytes] = {
    NoSuchAccount: b"NO_SUCH_ACCOUNT",
    InvalidAccount: b"INVALID_ACCOUNT",
    NotAvailable: b"NOT_AVAILABLE",
}


class AccountsList(amp.Command):
    """Remote POP accounts, optionally of one local domain."""

    arguments = [(b"domain", amp.Unicode(optional=True))]
    response = [(b"accounts", JSON())]
    errors = _ACCOUNT_ERRORS


class AccountsAdd(amp.Command):
    """Create an account from a JSON object of fields; answers with the account."""

    arguments = [(b"fields", JSON())]
    response = [(b"account", JSON())]
    errors = _ACCOUNT_ERRORS


class AccountsEdit(amp.Command):
    """Change some fields of an account; answers with the account."""

    arguments = [(b"id", amp.Unicode()), (b"fields", JSON())]
    response = [(b"account", JSON())]
    errors = _ACCOUNT_ERRORS


class AccountsDelete(amp.Command):
    """Delete an account."""

    arguments = [(b"id", amp.Unicode())]
    errors = _ACCOUNT_ERRORS


class CheckNowProgress(amp.Command):
    """Sent by the daemon to mailgwctl during a check-now: one progress line
    (the report so far, after each message).  No answer is expected."""

    arguments = [(b"line", amp.Unicode())]
    requiresAnswer = False


class AccountsCheckNow(amp.Command):
    """Poll an account now (joining a running poll) and answer with what happened."""

    arguments = [(b"id", amp.Unicode())]
    response = [(b"result", JSON())]
    errors = _ACCOUNT_ERRORS


# --- POP3 SSO: the identity table [7] ---------------------------------------------------

_SSO_ERRORS: dict[type[Exception], bytes] = {
    NotAvailable: b"NOT_AVAILABLE",
    NoSuchIdentity: b"NO_SUCH_IDENTITY",
    InvalidArgument: b"INVALID_ARGUMENT",
}


class SsoList(amp.Command):
    """The live entries of the identity table, by address."""

    response = [(b"identities", JSON())]
    errors = _SSO_ERRORS


class SsoLookup(amp.Command):
    """The live entry of one client address."""

    arguments = [(b"ip", amp.Unicode())]
    response = [(b"identity", JSON())]
    errors = _SSO_ERRORS


class SsoRemove(amp.Command):
    """End the entry of one client address (its accounting Stop is sent); answers
    with the entry as it was."""

    arguments = [(b"ip", amp.Unicode())]
    response = [(b"identity", JSON())]
    errors = _SSO_ERRORS


class SsoReplay(amp.Command):
    """Feed a capture file (an absolute path on the daemon's machine, read by the
    daemon) through the monitor mode's path; the logins it shows teach the table.
    Answers with the frames read and the logins seen and learnt."""

    arguments = [(b"path", amp.Unicode())]
    response = [(b"result", JSON())]
    errors = {**_SSO_ERRORS, ReplayFailed: b"REPLAY_FAILED"}
