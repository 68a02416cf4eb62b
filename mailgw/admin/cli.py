"""``mailgwctl``: the administration command.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a help text, a function that
adds its arguments to its parser, and a handler that gets the parsed arguments and the
:class:`Streams` and returns the exit status.  The offline commands (``check-config``,
``hash-password``) need no daemon; the others send one AMP command of
:mod:`mailgw.admin.commands` over the admin socket (``--socket``, or ``admin.socket``
of ``--config``, or the default) and print the answer as a table, or as JSON with
``--json``.  A daemon that cannot be reached is a message naming the socket and exit
status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from getpass import getpass as terminal_getpass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TextIO

if TYPE_CHECKING:
    from _typeshed import SupportsWrite
    from twisted.protocols import amp

from mailgw.admin import commands as cmd
from mailgw.auth.passwords import SCHEMES, hash_password
from mailgw.config import ConfigError, load_config, read_toml

__all__ = ["COMMANDS", "DEFAULT_SOCKET", "AdminCaller", "Command", "Streams", "connect_unix", "main"]

DEFAULT_SOCKET = "/run/mailgw/admin.sock"

DEFAULT_TIMEOUT = 300.0

# exit statuses
OK = 0
FAILED = 1
USAGE = 2


class AdminCaller(Protocol):
    """One connection to the daemon's admin channel (L{mailgw.admin.channel.AdminClient})."""

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """Send C{command}; return the answer's fields or raise the command's error."""


def connect_unix(path: str, timeout: float | None) -> AdminCaller:
    """The admin channel on the UNIX socket C{path}."""
    from mailgw.admin.channel import AdminClient

    return AdminClient(path, timeout)


@dataclass(frozen=True)
class Streams:
    """
    Where a command reads and writes.  ``getpass`` reads a secret without echo from the
    terminal; it is used only when ``stdin`` is a terminal.  ``connect`` opens the
    admin channel (socket path, timeout).
    """

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    getpass: Callable[[str], str] = field(default=terminal_getpass)
    connect: Callable[[str, float | None], AdminCaller] = field(default=connect_unix)


Handler = Callable[[argparse.Namespace, Streams], int]


@dataclass(frozen=True)
class Command:
    """One ``mailgwctl`` subcommand."""

    help: str
    handler: Handler
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


# --- check-config --------------------------------------------------------------------


def _check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="the TOML configuration file")


def check_config(args: argparse.Namespace, streams: Streams) -> int:
    """Validate a configuration file; one line per problem, exit status 1 if any."""
    path: str = args.path
    try:
        load_config(path)
    except ConfigError as e:
        problems = e.problems
    else:
        problems = []
    if args.json:
        json.dump({"path": path, "valid": not problems, "problems": problems}, streams.stdout)
        streams.stdout.write("\n")
    elif problems:
        for problem in problems:
            streams.stdout.write(f"{problem}\n")
    else:
        streams.stdout.write(f"{path}: configuration is valid\n")
    return FAILED if problems else OK


# --- hash-password -------------------------------------------------------------------


def _hash_password_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheme",
        choices=SCHEMES,
        default="bcrypt",
        help="hash scheme (default: bcrypt; argon2 means argon2id)",
    )


class _PasswordReadError(Exception):
    """The password could not be read; the message says why."""


def _read_password(streams: Streams) -> str:
    if streams.stdin.isatty():
        try:
            first = streams.getpass("Password: ")
            second = streams.getpass("Password (again): ")
        except EOFError:
            raise _PasswordReadError("no password read") from None
        if first != second:
            raise _PasswordReadError("the passwords do not match")
        return first
    # Not a terminal: one line from stdin, for scripts (`printf '%s\n' "$pw" | ...`).
    return streams.stdin.readline().removesuffix("\n").removesuffix("\r")


def hash_password_command(args: argparse.Namespace, streams: Streams) -> int:
    """Read a password (twice, without echo, on a terminal) and print its hash."""
    try:
        password = _read_password(streams)
    except _PasswordReadError as e:
        streams.stderr.write(f"mailgwctl: {e}\n")
        return FAILED
    if not password:
        streams.stderr.write("mailgwctl: empty password refused\n")
        return FAILED
    try:
        hashed = hash_password(password, args.scheme)
    except ValueError as e:
        streams.stderr.write(f"mailgwctl: {e}\n")
        return FAILED
    if args.json:
        json.dump({"scheme": args.scheme, "hash": hashed}, streams.stdout)
        streams.stdout.write("\n")
    else:
        streams.stdout.write(f"{hashed}\n")
    return OK


# --- Commands answered by the daemon ---------------------------------------------------


class _Refused(Exception):
    """The command cannot go on; the message is for the administrator."""


def _admin_call(args: argparse.Namespace, streams: Streams, command: type[amp.Command], **arguments: Any) -> Any:
    from mailgw.admin.channel import AdminProtocolError, AdminUnavailable

    try:
        return streams.connect(args.socket, args.timeout).call(command, **arguments)
    except AdminUnavailable as e:
        raise _Refused(str(e)) from None
    except AdminProtocolError as e:
        raise _Refused(f"admin socket {args.socket}: {e}") from None


def _daemon_command(handler: Handler) -> Handler:
    """A handler whose refusals and the daemon's typed errors become a message on
    stderr and exit status 1."""

    def run(args: argparse.Namespace, streams: Streams) -> int:
        try:
            return handler(args, streams)
        except (_Refused, _PasswordReadError) as e:
            streams.stderr.write(f"mailgwctl: {e}\n")
        except cmd.AdminCommandError as e:
            lines = str(e).splitlines() or [type(e).__name__]
            streams.stderr.write("".join(f"mailgwctl: {line}\n" for line in lines))
        return FAILED

    return run


def _print_json(streams: Streams, value: object) -> None:
    json.dump(value, streams.stdout, indent=2, sort_keys=True)
    streams.stdout.write("\n")


def _text(value: object) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """A plain text table: one header line, columns padded to the widest cell."""
    cells = [[_text(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *cells]:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def format_duration(seconds: float) -> str:
    """C{3d 4h}, C{2h 03m}, C{5m 07s}, C{12s}."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def format_status(status: Mapping[str, Any]) -> str:
    """The text form of C{mailgwctl status}."""
    out = [
        f"mailgw {status.get('version', '?')} on {status.get('node_name', '?')}"
        f" (pid {status.get('pid', '?')}), up {format_duration(float(status.get('uptime', 0)))}\n"
    ]
    if status.get("configuration"):
        out.append(f"Configuration: {status['configuration']}\n")
    listeners = status.get("listeners", [])
    out.append(f"\nListeners: {len(listeners)}\n")
    rows: list[Sequence[object]]
    if listeners:
        rows = [
            (item["name"], item["description"], "listening" if item["running"] else "stopped") for item in listeners
        ]
        out.append(format_table(("NAME", "DESCRIPTION", "STATE"), rows, indent="  "))
    sessions = status.get("sessions", {})
    out.append(f"\nSessions: {sessions.get('total', 0)}\n")
    by_protocol: Mapping[str, Mapping[str, int]] = sessions.get("by_protocol", {})
    if by_protocol:
        states = ["unauthenticated", "authenticating", "authenticated"]
        rows = [(protocol, *(counts.get(s, 0) for s in states)) for protocol, counts in by_protocol.items()]
        out.append(format_table(("PROTOCOL", *(s.upper() for s in states)), rows, indent="  "))
    groups = status.get("aaa_groups", [])
    out.append(f"\nAAA server groups: {len(groups)}\n")
    if groups:
        rows = []
        for group in groups:
            last = group.get("last_test") or {}
            rows.append((group["name"], group["protocol"], group["health"], last.get("result"), group["servers"]))
        out.append(format_table(("NAME", "PROTOCOL", "HEALTH", "LAST TEST", "SERVERS"), rows, indent="  "))
    out.append("\n")
    for name, key in (("Poller", "poller"), ("SSO", "sso")):
        summary = dict(status.get(key) or {})
        state = summary.pop("state", None) or ("running" if summary.get("running") else "not running")
        details = ", ".join(f"{k.replace('_', ' ')} {_text(v)}" for k, v in sorted(summary.items()))
        out.append(f"{name}: {state}" + (f" ({details})" if details else "") + "\n")
    if status.get("reload"):
        out.append(f"Reload: {status['reload']}\n")
    return "".join(out)


def format_sessions(sessions: Sequence[Mapping[str, Any]]) -> str:
    """The text form of C{mailgwctl sessions}."""
    if not sessions:
        return "no sessions\n"
    rows = [
        (
            s["session_id"],
            s["protocol"],
            s["state"],
            s.get("user") or s.get("mail_user"),
            s["client"],
            s.get("upstream"),
            format_duration(float(s.get("age", 0))),
            format_duration(float(s.get("idle", 0))),
            format_bytes(int(s.get("bytes_from_client", 0))),
            format_bytes(int(s.get("bytes_to_client", 0))),
        )
        for s in sessions
    ]
    headers = ("ID", "PROTOCOL", "STATE", "USER", "CLIENT", "UPSTREAM", "AGE", "IDLE", "IN", "OUT")
    return format_table(headers, rows)


@_daemon_command
def status_command(args: argparse.Namespace, streams: Streams) -> int:
    """Print the daemon's status."""
    status = _admin_call(args, streams, cmd.Status)["status"]
    if args.json:
        _print_json(streams, status)
    else:
        streams.stdout.write(format_status(status))
    return OK


def _sessions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", metavar="P", help="only sessions of this protocol (pop3, imap4, smtp)")


@_daemon_command
def sessions_command(args: argparse.Namespace, streams: Streams) -> int:
    """List the live sessions."""
    sessions = _admin_call(args, streams, cmd.Sessions, protocol=args.protocol)["sessions"]
    if args.json:
        _print_json(streams, sessions)
    else:
        streams.stdout.write(format_sessions(sessions))
    return OK


def _kill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", metavar="SESSION", help="the session id (see `mailgwctl sessions`)")


@_daemon_command
def kill_command(args: argparse.Namespace, streams: Streams) -> int:
    """Close one session."""
    session = _admin_call(args, streams, cmd.Kill, session_id=args.session)["session"]
    if args.json:
        _print_json(streams, session)
    else:
        who = session.get("user") or session.get("mail_user") or "no user"
        streams.stdout.write(
            f"session {session['session_id']} ({session['protocol']}, {who}, {session['client']}) closed\n"
        )
    return OK


@_daemon_command
def reload_command(args: argparse.Namespace, streams: Streams) -> int:
    """Reload the daemon's configuration."""
    try:
        _admin_call(args, streams, cmd.Reload)
    except cmd.ReloadFailed as e:
        if args.json:
            _print_json(streams, {"reloaded": False, "problems": e.problems})
        streams.stderr.write("mailgwctl: the configuration was not reloaded (the old one is kept):\n")
        streams.stderr.write("".join(f"  {problem}\n" for problem in e.problems))
        return FAILED
    if args.json:
        _print_json(streams, {"reloaded": True})
    else:
        streams.stdout.write("configuration reloaded\n")
    return OK


# --- aaa test ------------------------------------------------------------------------


def _aaa_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    test = actions.add_parser(
        "test",
        help="log a user in through an AAA server group (the password is read without echo)",
        description="Log a user in through an AAA server group and show the verdict, the group policy and "
        "the attributes.  The password is read without echo, or as one line from stdin when it is not a terminal.",
    )
    test.add_argument("group", metavar="GROUP", help="the AAA server group")
    test.add_argument("user", metavar="USER", help="the user name")


def _read_secret(streams: Streams, prompt: str, *, confirm: bool = False) -> str:
    """A secret: without echo from a terminal (twice with C{confirm}), else one line of stdin."""
    if streams.stdin.isatty():
        if confirm:
            return _read_password(streams)
        try:
            return streams.getpass(prompt)
        except EOFError:
            raise _PasswordReadError("no password read") from None
    line = streams.stdin.readline()
    if not line:
        raise _PasswordReadError("no password read from stdin")
    return line.removesuffix("\n").removesuffix("\r")


def format_aaa_result(result: Mapping[str, Any]) -> str:
    """The text form of C{mailgwctl aaa test}."""
    verdict = result["result"]
    out = [f"{result['group']}: {result['user']} {verdict}"]
    if result.get("reason"):
        out[0] += f": {result['reason']}"
    out[0] += f" ({_text(result.get('latency_ms'))} ms)\n"
    policy = result.get("group_policy")
    if policy:
        out.append(
            f"  group policy: {policy['name']} (simultaneous logins {policy['simultaneous_logins']},"
            f" idle timeout {policy['idle_timeout']} s, max session time {policy['max_session_time']} s)\n"
        )
    if result.get("authenticated_user") and result["authenticated_user"] != result["user"]:
        out.append(f"  authenticated as: {result['authenticated_user']}\n")
    for key, value in sorted((result.get("attributes") or {}).items()):
        if value and key != "server_group":
            out.append(f"  {key.replace('_', ' ')}: {_text(value)}\n")
    out.append(
        f"  default group policy: {result['default_group_policy']} (from {result['default_group_policy_from']})\n"
    )
    return "".join(out)


@_daemon_command
def aaa_command(args: argparse.Namespace, streams: Streams) -> int:
    """``aaa test GROUP USER``."""
    password = _read_secret(streams, f"Password for {args.user}: ")
    result = _admin_call(args, streams, cmd.AaaTest, group=args.group, user=args.user, password=password)["result"]
    if args.json:
        _print_json(streams, result)
    else:
        streams.stdout.write(format_aaa_result(result))
    return OK if result["result"] == "accepted" else FAILED


# --- accounts ------------------------------------------------------------------------

_ACCOUNT_COLUMNS = (
    ("id", "ID"),
    ("enabled", "ENABLED"),
    ("domain", "DOMAIN"),
    ("username", "USERNAME"),
    ("host", "HOST"),
    ("port", "PORT"),
    ("tls", "TLS"),
    ("interval", "INTERVAL"),
    ("leave_on_server", "LEAVE"),
    ("last_poll", "LAST POLL"),
    ("last_result", "LAST RESULT"),
    ("description", "DESCRIPTION"),
)


def _account_cell(account: Mapping[str, Any], key: str) -> object:
    if key == "interval":  # the interval in force (the default when unset)
        return account.get("effective_interval", account.get("interval"))
    if key == "leave_on_server" and account.get("leave_on_server") and account.get("leave_days"):
        return f"{account['leave_days']}d"
    return account.get(key)


def format_accounts(accounts: Sequence[Mapping[str, Any]]) -> str:
    """The text form of C{mailgwctl accounts list}: the known columns that any
    account has."""
    if not accounts:
        return "no accounts\n"
    columns = [(key, title) for key, title in _ACCOUNT_COLUMNS if any(key in a for a in accounts)]
    rows = [[_account_cell(a, key) for key, _ in columns] for a in accounts]
    return format_table([title for _, title in columns], rows)


def format_mapping(value: Mapping[str, Any], indent: str = "") -> str:
    """One C{key: value} line per field; nested mappings and lists indented below
    their key."""
    out = []
    for key, item in value.items():
        label = f"{indent}{key.replace('_', ' ')}:"
        if isinstance(item, Mapping) and item:
            out.append(f"{label}\n{format_mapping(item, indent + '  ')}")
        elif isinstance(item, list) and item:
            out.append(f"{label}\n")
            for element in item:
                if isinstance(element, Mapping):
                    lines = format_mapping(element).splitlines() or ["-"]
                    out.append(f"{indent}  - {lines[0]}\n")
                    out.extend(f"{indent}    {line}\n" for line in lines[1:])
                else:
                    out.append(f"{indent}  - {_text(element)}\n")
        else:
            out.append(f"{label} {_text(item)}\n")
    return "".join(out)


def _key_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key.lower() in cmd.SECRET_KEYS:
        raise argparse.ArgumentTypeError(f"{key} is never given on the command line (use --password-prompt)")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _account_field_arguments(parser: argparse.ArgumentParser, *, adding: bool) -> None:
    parser.add_argument("--host", required=adding, help="the remote POP3 server")
    parser.add_argument("--port", type=int, help="its port (default: by --tls)")
    parser.add_argument("--tls", choices=("none", "starttls", "implicit"), help="TLS to the server (verified)")
    parser.add_argument("--username", required=adding, help="the remote mailbox's user name")
    parser.add_argument("--domain", required=adding, help="the local domain its mail is redistributed to")
    parser.add_argument("--interval", type=int, metavar="SECONDS", help="polling interval")
    parser.add_argument("--description", help="free text")
    parser.add_argument(
        "--leave-on-server",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the messages on the server after delivery",
    )
    parser.add_argument("--leave-days", type=int, metavar="N", help="with --leave-on-server: delete them after N days")
    enabled = parser.add_mutually_exclusive_group()
    enabled.add_argument("--enabled", dest="enabled", action="store_const", const=True, default=None)
    enabled.add_argument("--disabled", dest="enabled", action="store_const", const=False)
    parser.add_argument(
        "--password-prompt",
        action="store_true",
        help="read the account's password (without echo; from stdin when it is not a terminal)",
    )
    parser.add_argument(
        "--set",
        dest="extra",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="any other account field (VALUE is JSON, or else a string); repeatable",
    )


def _accounts_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list the accounts")
    listing.add_argument("--domain", metavar="D", help="only the accounts of this local domain")
    add = actions.add_parser("add", help="add an account")
    _account_field_arguments(add, adding=True)
    edit = actions.add_parser("edit", help="change an account")
    edit.add_argument("id", metavar="ID")
    _account_field_arguments(edit, adding=False)
    delete = actions.add_parser("delete", help="delete an account")
    delete.add_argument("id", metavar="ID")
    check = actions.add_parser("check-now", help="poll an account now and show what happened")
    check.add_argument("id", metavar="ID")


_ACCOUNT_FIELDS = (
    "host",
    "port",
    "tls",
    "username",
    "domain",
    "interval",
    "description",
    "leave_on_server",
    "leave_days",
    "enabled",
)


def _account_fields(args: argparse.Namespace, streams: Streams) -> dict[str, Any]:
    fields: dict[str, Any] = dict(args.extra)
    for name in _ACCOUNT_FIELDS:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.password_prompt:
        password = _read_secret(streams, "Account password: ", confirm=True)
        if not password:
            raise _PasswordReadError("empty password refused")
        fields["password"] = password
    return fields


@_daemon_command
def accounts_command(args: argparse.Namespace, streams: Streams) -> int:
    """``accounts list | add | edit | delete | check-now``."""
    action: str = args.action
    if action == "list":
        accounts = _admin_call(args, streams, cmd.AccountsList, domain=args.domain)["accounts"]
        if args.json:
            _print_json(streams, accounts)
        else:
            streams.stdout.write(format_accounts(accounts))
        return OK
    if action in ("add", "edit"):
        fields = _account_fields(args, streams)
        if action == "add":
            account = _admin_call(args, streams, cmd.AccountsAdd, fields=fields)["account"]
        else:
            if not fields:
                raise _Refused("nothing to change: give at least one field")
            account = _admin_call(args, streams, cmd.AccountsEdit, id=args.id, fields=fields)["account"]
        if args.json:
            _print_json(streams, account)
        else:
            streams.stdout.write(f"account {_text(account.get('id'))} {'added' if action == 'add' else 'changed'}\n")
            streams.stdout.write(format_mapping(account, "  "))
        return OK
    if action == "delete":
        _admin_call(args, streams, cmd.AccountsDelete, id=args.id)
        if args.json:
            _print_json(streams, {"deleted": args.id})
        else:
            streams.stdout.write(f"account {args.id} deleted\n")
        return OK
    assert action == "check-now"
    def progress(line: str) -> None:
        if not args.json:
            streams.stdout.write(f"... {line}\n")
            streams.stdout.flush()

    result = _admin_call(args, streams, cmd.AccountsCheckNow, id=args.id, on_progress=progress)["result"]
    if args.json:
        _print_json(streams, result)
    else:
        streams.stdout.write(format_mapping(result))
    return OK


# --- The command table and main ------------------------------------------------------

COMMANDS: Mapping[str, Command] = MappingProxyType(
    {
        "check-config": Command(
            help="validate a configuration file without starting anything",
            handler=check_config,
            add_arguments=_check_config_arguments,
        ),
        "hash-password": Command(
            help="read a password without echo and print a hash for the local user file",
            handler=hash_password_command,
            add_arguments=_hash_password_arguments,
        ),
        "status": Command(help="show the daemon's status", handler=status_command),
        "sessions": Command(help="list the live sessions", handler=sessions_command, add_arguments=_sessions_arguments),
        "kill": Command(help="close a session", handler=kill_command, add_arguments=_kill_arguments),
        "reload": Command(help="reload the configuration (the old one is kept if invalid)", handler=reload_command),
        "aaa": Command(
            help="AAA server groups: aaa test GROUP USER", handler=aaa_command, add_arguments=_aaa_arguments
        ),
        "accounts": Command(
            help="remote POP accounts: list | add | edit ID | delete ID | check-now ID",
            handler=accounts_command,
            add_arguments=_accounts_arguments,
        ),
    }
)


def _parser_class(streams: Streams) -> type[argparse.ArgumentParser]:
    """An ArgumentParser (and subparsers) that print to ``streams``, not ``sys``."""

    class Parser(argparse.ArgumentParser):
        def print_help(self, file: SupportsWrite[str] | None = None) -> None:
            super().print_help(file or streams.stdout)

        def error(self, message: str) -> NoReturn:
            self.print_usage(streams.stderr)
            self.exit(USAGE, f"{self.prog}: error: {message}\n")

        def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
            if message:
                streams.stderr.write(message)
            raise SystemExit(status)

    return Parser


def socket_from_config(path: str | os.PathLike[str]) -> str:
    """``admin.socket`` of the configuration at C{path}, resolved as the daemon
    resolves it (against the file's folder).  Only that key is read, so a
    configuration with problems elsewhere still names its socket."""
    data = read_toml(path)
    admin = data.get("admin", {})
    value = admin.get("socket", DEFAULT_SOCKET) if isinstance(admin, dict) else DEFAULT_SOCKET
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{path}: admin.socket: must be a path")
    return os.path.normpath(Path(path).absolute().parent / value)


def build_parser(commands: Mapping[str, Command] = COMMANDS, streams: Streams | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``mailgwctl`` with one subparser per command."""
    parser_class = _parser_class(streams) if streams is not None else argparse.ArgumentParser
    parser = parser_class(prog="mailgwctl", description="Administer a mailgw e-mail security gateway.")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help=f"the daemon's AMP admin socket (default: admin.socket of --config, else {DEFAULT_SOCKET})",
    )
    parser.add_argument("--config", metavar="PATH", help="read the admin socket's path from this configuration")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"how long to wait for the daemon's answer (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in commands.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    getpass: Callable[[str], str] = terminal_getpass,
    commands: Mapping[str, Command] = COMMANDS,
    connect: Callable[[str, float | None], AdminCaller] = connect_unix,
) -> int:
    """Run ``mailgwctl`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    streams = Streams(
        stdin=stdin if stdin is not None else sys.stdin,
        stdout=stdout if stdout is not None else sys.stdout,
        stderr=stderr if stderr is not None else sys.stderr,
        getpass=getpass,
        connect=connect,
    )
    parser = build_parser(commands, streams)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports usage errors and --help this way
        return e.code if isinstance(e.code, int) else USAGE
    if args.socket is None:
        try:
            args.socket = socket_from_config(args.config) if args.config else DEFAULT_SOCKET
        except ConfigError as e:
            streams.stderr.write(f"mailgwctl: {e}\n")
            return FAILED
    try:
        return commands[args.command].handler(args, streams)
    except KeyboardInterrupt:
        streams.stderr.write("mailgwctl: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
