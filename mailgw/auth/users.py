"""The local user file of ``protocol = "local"`` server groups.

Format (TOML)::

    [users.alice]
    password_hash = "$2b$12$..."     # from `mailgwctl hash-password` (bcrypt or argon2)
    group_policy = "MailUsers"       # optional; "" or absent = the proxy's default

Reading the file is a small blocking read: at start-up and reload, or in a thread.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mailgw.auth.passwords import hash_scheme
from mailgw.config import ConfigError, read_toml

__all__ = ["LocalUser", "load_users_file", "parse_users"]

_POLICY_NAME = re.compile(r"[A-Za-z0-9]{4,15}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class LocalUser:
    """A user of the local file.  ``password_hash`` is a bcrypt or argon2 hash."""

    name: str
    # The hash is not the password, but it is what an offline attack needs: no repr.
    password_hash: str = field(repr=False)
    group_policy: str | None = None


def _key(*parts: str) -> str:
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def _type_name(value: object) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _user_name_problem(name: str) -> str | None:
    if not name:
        return "user name must not be empty"
    if len(name) > 255 or any(c.isspace() or not c.isprintable() for c in name):
        return "user name must be at most 255 printable characters without spaces"
    return None


def parse_users(data: Mapping[str, object]) -> tuple[dict[str, LocalUser], list[str]]:
    """
    Validate a parsed users file: the users, and the problems (one line each, starting
    with the key path, e.g. ``users.alice.password_hash: missing``).
    """
    problems: list[str] = []
    users: dict[str, LocalUser] = {}
    problems += [f"{_key(key)}: unknown key" for key in data if key != "users"]
    table = data.get("users", {})
    if not isinstance(table, Mapping):
        problems.append(f"users: must be a table, got {_type_name(table)}")
        return users, problems
    for name, entry in table.items():
        path = _key("users", str(name))
        if not isinstance(entry, Mapping):
            problems.append(f"{path}: must be a table, got {_type_name(entry)}")
            continue
        problem = _user_name_problem(str(name))
        if problem:
            problems.append(f"{path}: {problem}")
        problems += [
            f"{path}.{_key(key)}: unknown key" for key in entry if key not in ("password_hash", "group_policy")
        ]
        password_hash = entry.get("password_hash")
        if password_hash is None:
            problems.append(f"{path}.password_hash: missing")
        elif not isinstance(password_hash, str):
            problems.append(f"{path}.password_hash: must be a string, got {_type_name(password_hash)}")
        elif hash_scheme(password_hash) is None:
            # never echo the value: it might be a password pasted by mistake
            problems.append(
                f"{path}.password_hash: not a bcrypt or argon2 hash (make one with `mailgwctl hash-password`)"
            )
        group_policy = entry.get("group_policy", "")
        if not isinstance(group_policy, str):
            problems.append(f"{path}.group_policy: must be a string, got {_type_name(group_policy)}")
            group_policy = ""
        elif group_policy and not _POLICY_NAME.fullmatch(group_policy):
            problems.append(f"{path}.group_policy: must be 4-15 letters and digits, got {group_policy!r}")
        if isinstance(password_hash, str):
            users[str(name)] = LocalUser(str(name), password_hash, group_policy or None)
    return users, problems


def load_users_file(path: str | os.PathLike[str]) -> dict[str, LocalUser]:
    """
    Read and validate a users file; raises :class:`~mailgw.config.ConfigError` with all
    its problems (a file-level problem names the file).
    """
    users, problems = parse_users(read_toml(path))
    if problems:
        raise ConfigError(problems)
    return users
