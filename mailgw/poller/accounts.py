"""Remote POP accounts: validation, encrypted passwords, and the API the admin channel
calls (``mailgwctl accounts list | add | edit | delete | check-now``) [6].

An account as the API shows it is a plain dict (JSON-ready)::

    {"id": 3, "enabled": True, "description": "Sales mailbox at the ISP",
     "host": "pop.isp.example", "port": 995, "tls": "implicit", "verify": True,
     "ca": None, "username": "sales", "password_set": True,
     "domain": "example.com", "interval": None, "effective_interval": 300,
     "leave_on_server": False, "leave_days": 0,
     "recipient_headers": ["Delivered-To", "Envelope-To", ..., "To/Cc"],
     "received_parsing": False, "skip_received": 0, "no_recipient_action": "delete",
     "created": 1714000000.0, "updated": 1714000000.0}

The password is never part of it.  It is stored encrypted with Fernet (AES-128-CBC and
HMAC-SHA256) under a key kept in ``state_dir/poller.key``, created 0600 on first use;
losing the key file means entering the passwords again, nothing worse.
"""

from __future__ import annotations

import builtins
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailgw.poller.message import DEFAULT_RECIPIENT_HEADERS, valid_header_entry
from mailgw.state import ACCOUNT_COLUMNS, AccountRecord, IStateStore

if TYPE_CHECKING:
    from mailgw.poller.poll import PollReport

__all__ = [
    "FIELDS",
    "FIELD_DEFAULTS",
    "NO_RECIPIENT_ACTIONS",
    "REQUIRED_FIELDS",
    "TLS_MODES",
    "AccountInvalid",
    "AccountNotFound",
    "Accounts",
    "KeyFileError",
    "PasswordCipher",
    "PasswordUnreadable",
    "account_dict",
    "validate_fields",
]

TLS_MODES = ("none", "starttls", "implicit")
NO_RECIPIENT_ACTIONS = ("delete", "postmaster")
#: the fields an account has (``password`` is write-only)
FIELDS: tuple[str, ...] = ACCOUNT_COLUMNS

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# -- errors ---------------------------------------------------------------------------------


class AccountNotFound(KeyError):
    """No account has this id."""

    def __init__(self, account_id: object) -> None:
        super().__init__(account_id)
        self.account_id = account_id

    def __str__(self) -> str:
        return f"no remote POP account {self.account_id}"


class AccountInvalid(ValueError):
    """Refused account fields; C{problems} holds one line per problem, each starting
    with the field it concerns (``port: must be 1..65535, got 99999``)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


class KeyFileError(Exception):
    """The password key file is unusable (the message names it)."""


class PasswordUnreadable(Exception):
    """A stored password cannot be decrypted (the key file was replaced)."""


# -- passwords -----------------------------------------------------------------------------


class PasswordCipher:
    """Encrypts account passwords for storage."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_key_file(cls, path: Path) -> PasswordCipher:
        """The cipher of the key in C{path}, created (0600, atomically) if missing.

        Start-up only: this reads and may write a small file.  A key file readable
        by group or others is refused.
        """
        return cls(load_or_create_key(Path(path)))

    def encrypt(self, password: str) -> bytes:
        return self._fernet.encrypt(password.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode("utf-8")
        except (InvalidToken, UnicodeDecodeError):
            raise PasswordUnreadable("the stored password cannot be decrypted with the current key") from None


def load_or_create_key(path: Path) -> bytes:
    """Read the Fernet key in C{path}, or create it: written to a private temporary
    file, synced, then linked into place (so two processes starting together agree on
    one key and nobody ever reads a partial file)."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process won: use its key
    finally:
        os.unlink(temporary)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(f"{path}: readable by group or others (mode {info.st_mode & 0o777:o}); chmod 600 it")
        with os.fdopen(descriptor, "rb") as handle:
            descriptor = -1
            key = handle.read(1024).strip()
    finally:
        if descriptor >= 0:
            os.close(descriptor)
    try:
        Fernet(key)
    except ValueError:
        raise KeyFileError(f"{path}: not a Fernet key") from None
    return key


# -- validation ----------------------------------------------------------------------------


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"must be true or false, got {value!r}")


def _int(value: object, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, got {value!r}")
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"must be {low}..{high}, got {value}")
    return value


def _text(value: object, *, limit: int, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters")
    if not empty and not value:
        raise ValueError("must not be empty")
    return value


def _host(value: object) -> str:
    text = _text(value, limit=253, empty=False).strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"must be a host name or IP address, got {text!r}")
    return text.rstrip(".").lower()


def _domain(value: object) -> str:
    text = _text(value, limit=253, empty=False).strip().rstrip(".")
    labels = text.split(".")
    if len(labels) < 1 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"must be a domain name, got {text!r}")
    return text.lower()


def _choice(value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
    return value.strip().lower()


def _username(value: object) -> str:
    text = _text(value, limit=200, empty=False)
    if " " in text:
        raise ValueError("must not contain spaces (POP3 USER takes one word)")
    return text


def _password(value: object) -> str:
    text = _text(value, limit=200, empty=False)
    return text


def _ca(value: object) -> str | None:
    if value is None or value == "":
        return None
    text = _text(value, limit=4096, empty=False)
    if not os.path.isabs(text):
        raise ValueError(f"must be an absolute path, got {text!r}")
    if not os.path.isfile(text):
        raise ValueError(f"no such file: {text}")
    return text


def _interval(value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default")):
        return None
    return _int(value, 10, 7 * 86400)


def _headers(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list | tuple):
        items = [item.strip() if isinstance(item, str) else item for item in value]
    else:
        raise ValueError("must be a list of header names (or a comma-separated string)")
    if not items or items == [""]:
        raise ValueError("must name at least one header")
    for item in items:
        if not isinstance(item, str) or not valid_header_entry(item):
            raise ValueError(f"not a header name (or Name/Name pair): {item!r}")
    return tuple(items)


_VALIDATORS: dict[str, Callable[[object], object]] = {
    "enabled": _bool,
    "description": lambda v: _text(v, limit=200),
    "host": _host,
    "port": lambda v: _int(v, 1, 65535),
    "tls": lambda v: _choice(v, TLS_MODES),
    "verify": _bool,
    "ca": _ca,
    "username": _username,
    "password": _password,
    "domain": _domain,
    "interval": _interval,
    "leave_on_server": _bool,
    "leave_days": lambda v: _int(v, 0, 3650),
    "recipient_headers": _headers,
    "received_parsing": _bool,
    "skip_received": lambda v: _int(v, 0, 100),
    "no_recipient_action": lambda v: _choice(v, NO_RECIPIENT_ACTIONS),
}

_DEFAULTS: dict[str, object] = {
    "enabled": True,
    "description": "",
    "tls": "implicit",
    "verify": True,
    "ca": None,
    "interval": None,
    "leave_on_server": False,
    "leave_days": 0,
    "recipient_headers": DEFAULT_RECIPIENT_HEADERS,
    "received_parsing": False,
    "skip_received": 0,
    "no_recipient_action": "delete",
}
_REQUIRED = ("host", "username", "password", "domain")
#: what an added account gets for the fields it does not give (read-only)
FIELD_DEFAULTS: Mapping[str, object] = MappingProxyType(_DEFAULTS)
#: the fields an added account must give
REQUIRED_FIELDS: tuple[str, ...] = _REQUIRED


def validate_fields(fields: Mapping[str, Any], *, existing: AccountRecord | None = None) -> dict[str, object]:
    """Check and normalise account fields; returns the values to store (the password
    still in clear).

    With no C{existing} account this is an ``add``: C{host}, C{username},
    C{password} and C{domain} are required, the rest defaults (C{port} by C{tls}: 995
    for implicit TLS, 110 otherwise).  With one, only the given fields change.  All
    problems are reported together in one L{AccountInvalid}.
    """
    if not isinstance(fields, Mapping):
        raise AccountInvalid(["fields: must be a mapping of field names to values"])
    problems: list[str] = []
    values: dict[str, object] = {}
    for name, value in fields.items():
        validator = _VALIDATORS.get(name)
        if validator is None:
            problems.append(f"{name}: unknown field (fields: {', '.join(FIELDS)})")
            continue
        try:
            values[name] = validator(value)
        except ValueError as e:
            problems.append(f"{name}: {e}")
    if existing is None:
        for name in _REQUIRED:
            if name not in fields:
                problems.append(f"{name}: required")
        for name, default in _DEFAULTS.items():
            values.setdefault(name, default)
        if "port" not in fields and isinstance(values.get("tls"), str):
            values["port"] = 995 if values["tls"] == "implicit" else 110
    leave = values.get("leave_on_server", existing.leave_on_server if existing else False)
    days = values.get("leave_days", existing.leave_days if existing else 0)
    if days and not leave and "leave_days" in fields:
        problems.append("leave_days: only meaningful with leave_on_server = true")
    if problems:
        raise AccountInvalid(problems)
    return values


def account_dict(record: AccountRecord, default_interval: int) -> dict[str, Any]:
    """The API form of an account: every field but the password."""
    return {
        "id": record.id,
        "enabled": record.enabled,
        "description": record.description,
        "host": record.host,
        "port": record.port,
        "tls": record.tls,
        "verify": record.verify,
        "ca": record.ca,
        "username": record.username,
        "password_set": bool(record.password),
        "domain": record.domain,
        "interval": record.interval,
        "effective_interval": record.interval or default_interval,
        "leave_on_server": record.leave_on_server,
        "leave_days": record.leave_days,
        "recipient_headers": builtins.list(record.recipient_headers),
        "received_parsing": record.received_parsing,
        "skip_received": record.skip_received,
        "no_recipient_action": record.no_recipient_action,
        "created": record.created,
        "updated": record.updated,
    }


# -- the API ----------------------------------------------------------------------------------


class Accounts:
    """The account API over a state store.

    @param check_now: runs (or joins) a poll of an account; set by the
        L{mailgw.poller.service.PollerService} that owns this object.
    @param on_change: called with an account id after an add, edit or delete (the
        scheduler reschedules it).
    @param annotate: adds run-time details (next poll, last result, counters) to an
        account's dict; set by the scheduler.
    @param summary: the poller's totals for L{summary}; set by the scheduler.

    This object is what the admin channel gets (the C{PollerAdmin} of
    L{mailgw.admin.responder}): its errors are a C{KeyError} (L{AccountNotFound})
    and a C{ValueError} with C{problems} (L{AccountInvalid}), and account ids may
    be the strings the administrator typed.
    """

    log = Logger()

    def __init__(
        self,
        state: IStateStore,
        cipher: PasswordCipher,
        clock: IReactorTime,
        *,
        default_interval: int = 300,
        check_now: Callable[[int, Callable[[PollReport], None] | None], Awaitable[PollReport]] | None = None,
        on_change: Callable[[int], None] | None = None,
        annotate: Callable[[dict[str, Any]], None] | None = None,
        summary: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.state = state
        self.cipher = cipher
        self.clock = clock
        self.default_interval = default_interval
        self.check_now_runner = check_now
        self.on_change = on_change
        self.annotate = annotate
        self.summary_source = summary

    @staticmethod
    def _id(account_id: object) -> int:
        if isinstance(account_id, bool):
            raise AccountNotFound(account_id)
        if isinstance(account_id, int):
            return account_id
        if isinstance(account_id, str) and account_id.strip().isdigit():
            return int(account_id.strip())
        raise AccountNotFound(account_id)

    def _to_store(self, values: dict[str, object]) -> dict[str, object]:
        if "password" in values:
            values["password"] = self.cipher.encrypt(str(values["password"]))
        return values

    def _changed(self, account_id: int) -> None:
        if self.on_change is not None:
            self.on_change(account_id)

    def _dict(self, record: AccountRecord) -> dict[str, Any]:
        account = account_dict(record, self.default_interval)
        if self.annotate is not None:
            self.annotate(account)
        return account

    def summary(self) -> Mapping[str, Any]:
        """The poller's totals (for ``mailgwctl status``)."""
        return self.summary_source() if self.summary_source is not None else {}

    async def list(self, domain: str | None = None) -> builtins.list[dict[str, Any]]:
        """All accounts, or those of one local domain; never a password."""
        records = await self.state.list_accounts(domain.strip().rstrip(".") if domain else None)
        return [self._dict(record) for record in records]

    async def get(self, account_id: int | str) -> dict[str, Any]:
        """One account (L{AccountNotFound} if none)."""
        return self._dict(await self.record(account_id))

    async def record(self, account_id: int | str) -> AccountRecord:
        """The stored record of an account (password encrypted)."""
        number = self._id(account_id)
        record = await self.state.get_account(number)
        if record is None:
            raise AccountNotFound(account_id)
        return record

    async def add(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Create an account (L{AccountInvalid} with every problem if refused)."""
        values = self._to_store(validate_fields(fields))
        record = await self.state.add_account(values, self.clock.seconds())
        self.log.info(
            "Remote POP account {account} added ({username} at {host}:{port} for {domain})",
            account=record.id,
            username=record.username,
            host=record.host,
            port=record.port,
            domain=record.domain,
        )
        self._changed(record.id)
        return self._dict(record)

    async def edit(self, account_id: int | str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Change some fields of an account (the password only when given)."""
        existing = await self.record(account_id)
        values = self._to_store(validate_fields(fields, existing=existing))
        record = await self.state.update_account(existing.id, values, self.clock.seconds())
        if record is None:
            raise AccountNotFound(account_id)
        self.log.info(
            "Remote POP account {account} changed: {fields}", account=record.id, fields=", ".join(sorted(values))
        )
        self._changed(record.id)
        return self._dict(record)

    async def delete(self, account_id: int | str) -> None:
        """Delete an account and its journal."""
        number = self._id(account_id)
        if not await self.state.delete_account(number):
            raise AccountNotFound(account_id)
        self.log.info("Remote POP account {account} deleted", account=number)
        self._changed(number)

    async def check_now(
        self, account_id: int | str, progress: Callable[[PollReport], None] | None = None
    ) -> PollReport:
        """Poll an account now, or join its running poll; fires with the report.
        C{progress} is called with the report so far after each message (for a
        progress line during a long poll)."""
        record = await self.record(account_id)
        if self.check_now_runner is None:
            raise RuntimeError("no poller runs these accounts")
        return await self.check_now_runner(record.id, progress)

    def password(self, record: AccountRecord) -> str:
        """The clear password of an account (for the login only)."""
        return self.cipher.decrypt(record.password)
