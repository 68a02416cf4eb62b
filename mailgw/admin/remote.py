"""The ``mailgwctl`` commands answered by the daemon over the admin socket:
``status``, ``sessions``, ``kill``, ``reload``, ``aaa test``/``flush``, ``accounts``
and ``sso``.

Each prints a table or C{key: value} lines (L{mailgw.admin.output}), or the daemon's
answer as JSON with C{--json}, and exits 0 only when what was asked for succeeded: a
rejected or unavailable C{aaa test} and a failed C{check-now} exit 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from collections.abc import Mapping
from typing import Any

from mailgw.admin import commands as cmd
from mailgw.admin.ctl import FAILED, OK, PasswordReadError, Refused, Streams, admin_call, daemon_command, print_json
from mailgw.admin.ctl import read_secret as _read_secret
from mailgw.admin.output import (
    format_aaa_flush,
    format_aaa_result,
    format_accounts,
    format_check_now,
    format_identities,
    format_identity,
    format_mapping,
    format_replay,
    format_sessions,
    format_status,
    text,
)
from mailgw.poller.accounts import FIELD_DEFAULTS, FIELDS, NO_RECIPIENT_ACTIONS, REQUIRED_FIELDS, TLS_MODES

__all__ = [
    "ACCOUNT_FIELD_HELP",
    "SESSION_PROTOCOLS",
    "aaa_arguments",
    "aaa_command",
    "accounts_arguments",
    "accounts_command",
    "kill_arguments",
    "kill_command",
    "reload_command",
    "sessions_arguments",
    "sessions_command",
    "sso_arguments",
    "sso_command",
    "status_command",
]

#: what C{sessions --protocol} accepts: the sessions' protocols and the proxies' names
SESSION_PROTOCOLS = ("pop3", "imap4", "smtp", "pop3s", "imap4s", "smtps")

_STDIN_HINT = "type it when asked at a terminal, or give it as one line on standard input"


# --- status, sessions, kill, reload -----------------------------------------------------


@daemon_command
def status_command(args: argparse.Namespace, streams: Streams) -> int:
    """Print the daemon's status."""
    status = admin_call(args, streams, cmd.Status)["status"]
    if args.json:
        print_json(streams, status)
    else:
        streams.stdout.write(format_status(status))
    return OK


def sessions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocol",
        metavar="P",
        choices=SESSION_PROTOCOLS,
        type=str.lower,
        help="only the sessions of this protocol: pop3, imap4 or smtp (or the proxy's name: pop3s, imap4s, smtps)"
        " (default: all)",
    )


@daemon_command
def sessions_command(args: argparse.Namespace, streams: Streams) -> int:
    """List the live sessions."""
    sessions = admin_call(args, streams, cmd.Sessions, protocol=args.protocol)["sessions"]
    if args.json:
        print_json(streams, sessions)
    else:
        streams.stdout.write(format_sessions(sessions))
    return OK


def kill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", metavar="SESSION", help="the session id (see mailgwctl sessions)")


@daemon_command
def kill_command(args: argparse.Namespace, streams: Streams) -> int:
    """Close one session."""
    session = admin_call(args, streams, cmd.Kill, session_id=args.session)["session"]
    if args.json:
        print_json(streams, session)
    else:
        who = session.get("user") or session.get("mail_user") or "no user"
        streams.stdout.write(
            f"session {session['session_id']} ({session['protocol']}, {who}, {session['client']}) closed\n"
        )
    return OK


@daemon_command
def reload_command(args: argparse.Namespace, streams: Streams) -> int:
    """Reload the daemon's configuration."""
    try:
        admin_call(args, streams, cmd.Reload)
    except cmd.ReloadFailed as e:
        if args.json:
            print_json(streams, {"reloaded": False, "problems": e.problems})
        streams.stderr.write("mailgwctl: the configuration was not reloaded (the old one is kept):\n")
        streams.stderr.write("".join(f"  {problem}\n" for problem in e.problems))
        return FAILED
    if args.json:
        print_json(streams, {"reloaded": True})
    else:
        streams.stdout.write("configuration reloaded\n")
    return OK


# --- aaa test, aaa flush ------------------------------------------------------------------


def aaa_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    test = actions.add_parser(
        "test",
        help="log a user in through an AAA server group and show the verdict",
        description="Log a user in through an AAA server group and show the verdict, the group policy and the "
        "attributes; exit 0 only when accepted.  The password is asked without echo at a terminal, or read as one "
        "line from standard input.",
    )
    test.add_argument("group", metavar="GROUP", help="the AAA server group (a name of [[aaa_server_group]])")
    test.add_argument("user", metavar="USER", help="the user name to log in with")
    flush = actions.add_parser(
        "flush",
        help="empty the authentication cache: all of it, a server group's part, or one user's entry",
        description="Forget the successful logins the authentication cache remembers: all of them, those of GROUP,"
        " or USER's in GROUP.  Their next login is checked by the server group again.",
    )
    flush.add_argument(
        "group", metavar="GROUP", nargs="?", help="only this AAA server group's entries (default: every group's)"
    )
    flush.add_argument("user", metavar="USER", nargs="?", help="only this user's entry in GROUP (default: all users)")


def read_password(streams: Streams, prompt: str, *, confirm: bool = False) -> str:
    """A password the command cannot do without (see L{mailgw.admin.ctl.read_secret})."""
    password = _read_secret(streams, prompt, confirm=confirm)
    if password is None:
        raise PasswordReadError(f"no password on standard input ({_STDIN_HINT})")
    if not password:
        raise PasswordReadError("empty password refused")
    return password


@daemon_command
def aaa_command(args: argparse.Namespace, streams: Streams) -> int:
    """C{aaa test GROUP USER}, C{aaa flush [GROUP [USER]]}."""
    if args.action == "flush":
        flushed = admin_call(args, streams, cmd.AaaFlush, group=args.group, user=args.user)["result"]
        if args.json:
            print_json(streams, flushed)
        else:
            streams.stdout.write(format_aaa_flush(flushed))
        return OK
    password = read_password(streams, f"Password for {args.user}: ")
    result = admin_call(args, streams, cmd.AaaTest, group=args.group, user=args.user, password=password)["result"]
    if args.json:
        print_json(streams, result)
    else:
        streams.stdout.write(format_aaa_result(result))
    return OK if result["result"] == "accepted" else FAILED


# --- accounts ---------------------------------------------------------------------------

#: what each account field is, for the C{--set} list of C{accounts add --help}
ACCOUNT_FIELD_HELP: Mapping[str, str] = {
    "enabled": "poll the account (true/false)",
    "description": "free text",
    "host": "the remote POP3 server",
    "port": "its port",
    "tls": f"TLS to the server: {', '.join(TLS_MODES)}",
    "verify": "verify the server's certificate and name (true/false)",
    "ca": "PEM of the CAs to verify the server with, an absolute path on the daemon's machine (empty: the system's)",
    "username": "the remote mailbox's user name",
    "domain": "the local domain its mail is redistributed to",
    "interval": "seconds between polls (empty: [poller] default_interval)",
    "leave_on_server": "keep messages on the server after delivery (true/false)",
    "leave_days": "with leave_on_server: delete them once this many days old (0: never)",
    "recipient_headers": "headers searched for recipients, in order (a JSON list, or comma-separated)",
    "received_parsing": "also find recipients in 'Received: ... for <addr>' (true/false)",
    "skip_received": "with received_parsing: skip this many Received headers first",
    "no_recipient_action": f"a message without a local recipient: {' or '.join(NO_RECIPIENT_ACTIONS)}",
}


def _field_default(name: str) -> str:
    if name in REQUIRED_FIELDS:
        return "required"
    if name not in FIELD_DEFAULTS:
        return "default: 995 with tls implicit, else 110" if name == "port" else "optional"
    value = FIELD_DEFAULTS[name]
    if value is None:
        return "default: none"
    if isinstance(value, tuple | list):
        return f"default: {','.join(str(v) for v in value)}"
    return f"default: {json.dumps(value)}"


def _set_epilog() -> str:
    lines = ["fields for --set KEY=VALUE (VALUE is JSON, or else a string):"]
    for name in FIELDS:
        if name != "password":
            lines.append(f"  {name:<20} {ACCOUNT_FIELD_HELP[name]} ({_field_default(name)})")
    lines.append("The password is never given on the command line: it is asked for, or read from standard input.")
    return "\n".join(lines)


def _key_value(argument: str) -> tuple[str, object]:
    key, sep, raw = argument.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {argument!r}")
    if key.lower() in cmd.SECRET_KEYS:
        raise argparse.ArgumentTypeError(f"{key} is never given on the command line (use --password-prompt)")
    if key not in FIELDS:
        fields = ", ".join(name for name in FIELDS if name != "password")
        raise argparse.ArgumentTypeError(f"unknown account field {key!r} (fields: {fields})")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _account_field_arguments(parser: argparse.ArgumentParser, *, adding: bool) -> None:
    def default(text: str) -> str:
        return f"(default: {text})" if adding else "(default: unchanged)"

    required = "(required)" if adding else "(default: unchanged)"
    parser.add_argument("--host", required=adding, help=f"the remote POP3 server's name or address {required}")
    parser.add_argument("--port", type=int, help=f"its port {default('995 with --tls implicit, else 110')}")
    parser.add_argument(
        "--tls",
        choices=TLS_MODES,
        type=str.lower,
        help=f"TLS to the server, always verified: none, starttls (POP3 STLS) or implicit {default('implicit')}",
    )
    parser.add_argument(
        "--ca",
        metavar="PEM",
        help="the CA certificates to verify the server with (a PEM file on this machine; '' for the system's)"
        f" {default('the system trust store')}",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"verify the server's certificate and name; --no-verify is insecure {default('--verify')}",
    )
    parser.add_argument("--username", required=adding, help=f"the remote mailbox's user name {required}")
    parser.add_argument(
        "--domain", required=adding, help=f"the local domain its mail is redistributed to {required}"
    )
    parser.add_argument(
        "--interval", type=int, metavar="SECONDS", help=f"seconds between polls {default('[poller] default_interval')}"
    )
    parser.add_argument("--description", help=f"free text {default('none')}")
    parser.add_argument(
        "--leave-on-server",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"keep the messages on the server after delivery {default('no: delete them once delivered')}",
    )
    parser.add_argument(
        "--leave-days",
        type=int,
        metavar="N",
        help=f"with --leave-on-server: delete them once N days old {default('0, never')}",
    )
    enabled = parser.add_mutually_exclusive_group()
    enabled.add_argument(
        "--enabled", dest="enabled", action="store_const", const=True, default=None,
        help=f"poll the account {default('enabled')}",
    )  # fmt: skip
    enabled.add_argument(
        "--disabled", dest="enabled", action="store_const", const=False, help=f"do not poll it {default('enabled')}"
    )
    parser.add_argument(
        "--password-prompt",
        action="store_true",
        help="ask for the account's password (twice, without echo; one line of standard input when it is not a"
        " terminal)"
        + (" (default: asked anyway: an account needs one)" if adding else " (default: the password is unchanged)"),
    )
    parser.add_argument(
        "--set",
        dest="extra",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="any account field (listed below); repeatable (default: none)",
    )


def accounts_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list the accounts", description="List the remote POP accounts.")
    listing.add_argument("--domain", metavar="D", help="only the accounts of this local domain (default: all)")
    epilog, raw = _set_epilog(), argparse.RawDescriptionHelpFormatter
    add = actions.add_parser(
        "add",
        help="add an account",
        description="Add a remote POP account; its password is asked for.",
        epilog=epilog,
        formatter_class=raw,
    )
    _account_field_arguments(add, adding=True)
    edit = actions.add_parser(
        "edit",
        help="change an account",
        description="Change some fields of an account.",
        epilog=epilog,
        formatter_class=raw,
    )
    edit.add_argument("id", metavar="ID", help="the account's id (see accounts list)")
    _account_field_arguments(edit, adding=False)
    delete = actions.add_parser("delete", help="delete an account", description="Delete an account and its journal.")
    delete.add_argument("id", metavar="ID", help="the account's id")
    check = actions.add_parser(
        "check-now",
        help="poll an account now and show what happened",
        description="Poll an account now (or join its running poll) and show what happened; exit 0 only if the poll"
        " succeeded.",
    )
    check.add_argument("id", metavar="ID", help="the account's id")


_ACCOUNT_OPTIONS = ("host", "port", "tls", "ca", "verify", "username", "domain", "interval", "description",
                    "leave_on_server", "leave_days", "enabled")  # fmt: skip


def _account_fields(args: argparse.Namespace, streams: Streams, *, adding: bool) -> dict[str, Any]:
    fields: dict[str, Any] = dict(args.extra)
    for name in _ACCOUNT_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if isinstance(fields.get("ca"), str) and fields["ca"]:
        fields["ca"] = os.path.abspath(fields["ca"])  # the daemon wants an absolute path
    if adding or args.password_prompt:
        who = f"{fields.get('username', 'the account')}@{fields.get('host', '?')}" if adding else f"account {args.id}"
        if args.password_prompt or streams.stdin.isatty():
            fields["password"] = read_password(streams, f"Password of {who}: ", confirm=True)
        else:
            password = _read_secret(streams, "")
            if password:
                fields["password"] = password
            elif password == "":
                raise PasswordReadError("empty password refused")
            # None: no line at all; the daemon says the password is required.
    return fields


def _with_hints(error: cmd.InvalidAccount) -> cmd.InvalidAccount:
    return cmd.InvalidAccount(
        [f"{problem} ({_STDIN_HINT})" if problem == "password: required" else problem for problem in error.problems]
    )


def _verify_detail(args: argparse.Namespace, streams: Streams, account_id: object) -> str | None:
    """OpenSSL's reason why the account's server certificate does not verify."""
    from mailgw.tlsdiag import verify_detail

    try:
        accounts = admin_call(args, streams, cmd.AccountsList, domain=None)["accounts"]
    except (Refused, cmd.AdminCommandError):
        return None
    for account in accounts:
        if str(account.get("id")) == str(account_id) and account.get("tls") in ("implicit", "starttls"):
            return verify_detail(
                str(account["host"]),
                int(account["port"]),
                str(account["tls"]),
                ca=account.get("ca") or None,
                check_hostname=bool(account.get("verify", True)),
                timeout=min(5.0, args.timeout),
            )
    return None


def _check_now(args: argparse.Namespace, streams: Streams) -> int:
    def progress(line: str) -> None:
        if not args.json:
            streams.stdout.write(f"... {line}\n")
            streams.stdout.flush()

    result = admin_call(args, streams, cmd.AccountsCheckNow, id=args.id, on_progress=progress)["result"]
    failed = result.get("ok") is False or bool(result.get("error"))
    detail = None
    if failed and "certificate verify failed" in str(result.get("error")):
        detail = _verify_detail(args, streams, result.get("account_id", args.id))
    if args.json:
        if failed:
            from mailgw.admin.output import ACCOUNT_HINTS
            from mailgw.tlsdiag import explain

            result = {**result, "explanation": explain(str(result.get("error")), ACCOUNT_HINTS, detail=detail)}
        print_json(streams, result)
    else:
        streams.stdout.write(format_check_now(result, detail))
    return FAILED if failed else OK


@daemon_command
def accounts_command(args: argparse.Namespace, streams: Streams) -> int:
    """C{accounts list | add | edit | delete | check-now}."""
    action: str = args.action
    if action == "list":
        accounts = admin_call(args, streams, cmd.AccountsList, domain=args.domain)["accounts"]
        if args.json:
            print_json(streams, accounts)
        else:
            streams.stdout.write(format_accounts(accounts))
        return OK
    if action in ("add", "edit"):
        fields = _account_fields(args, streams, adding=action == "add")
        try:
            if action == "add":
                account = admin_call(args, streams, cmd.AccountsAdd, fields=fields)["account"]
            else:
                if not fields:
                    raise Refused("nothing to change: give at least one field")
                account = admin_call(args, streams, cmd.AccountsEdit, id=args.id, fields=fields)["account"]
        except cmd.InvalidAccount as e:
            raise _with_hints(e) from None
        if args.json:
            print_json(streams, account)
        else:
            streams.stdout.write(f"account {text(account.get('id'))} {'added' if action == 'add' else 'changed'}\n")
            streams.stdout.write(format_mapping(account, "  "))
        return OK
    if action == "delete":
        admin_call(args, streams, cmd.AccountsDelete, id=args.id)
        if args.json:
            print_json(streams, {"deleted": args.id})
        else:
            streams.stdout.write(f"account {args.id} deleted\n")
        return OK
    assert action == "check-now"
    return _check_now(args, streams)


# --- sso ---------------------------------------------------------------------------------


def _ip_address(value: str) -> str:
    """An IP address argument, in its canonical form."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}") from None


def sso_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser(
        "list",
        help="list the live entries of the identity table",
        description="List who is at which client address: the live entries of the POP3 SSO identity table.",
    )
    lookup = actions.add_parser(
        "lookup",
        help="show who is at a client address",
        description="Show the identity table's entry of a client address; exit 1 if it has none.",
    )
    lookup.add_argument("ip", metavar="IP", type=_ip_address, help="the client's IP address")
    remove = actions.add_parser(
        "remove",
        help="end the entry of a client address",
        description="End the identity table's entry of a client address (a RADIUS accounting Stop goes to the"
        " collectors); exit 1 if it has none.",
    )
    remove.add_argument("ip", metavar="IP", type=_ip_address, help="the client's IP address")
    replay = actions.add_parser(
        "replay",
        help="learn from the POP3 logins of a capture file",
        description="Feed a pcap or pcapng capture file through the monitor mode: each login to sso.pop3.servers"
        " that the server accepted, from a client inside sso.pop3.policy, teaches the identity table.  The daemon"
        " reads the file: its user must be able to (a large file may need a longer --timeout).",
    )
    replay.add_argument("file", metavar="FILE.pcap", help="the capture file (a relative path is from here)")


@daemon_command
def sso_command(args: argparse.Namespace, streams: Streams) -> int:
    """C{sso list | lookup IP | remove IP | replay FILE}."""
    action: str = args.action
    if action == "list":
        identities = admin_call(args, streams, cmd.SsoList)["identities"]
        if args.json:
            print_json(streams, identities)
        else:
            streams.stdout.write(format_identities(identities))
        return OK
    if action in ("lookup", "remove"):
        command = cmd.SsoLookup if action == "lookup" else cmd.SsoRemove
        identity = admin_call(args, streams, command, ip=args.ip)["identity"]
        if args.json:
            print_json(streams, identity)
        elif action == "lookup":
            streams.stdout.write(format_identity(identity))
        else:
            streams.stdout.write(f"SSO identity of {identity['user']} at {identity['ip']} removed\n")
        return OK
    assert action == "replay"
    # The daemon reads the file, from its own working folder: give it an absolute path.
    result = admin_call(args, streams, cmd.SsoReplay, path=os.path.abspath(args.file))["result"]
    if args.json:
        print_json(streams, result)
    else:
        streams.stdout.write(format_replay(result))
    return OK
