"""``mailgwctl``: the administration command [8.1].

Each subcommand is a L{Command} of L{COMMANDS}.  The offline commands
(L{mailgw.admin.offline}: C{check-config}, C{hash-password}, C{sample-config}) need
no daemon; the others (L{mailgw.admin.remote}) send AMP commands over the admin socket
(C{--socket}, or C{admin.socket} of C{--config}, or the default) and print a table,
or JSON with C{--json}.

The conventions an administrator expects of a command line: the global options work
before or after the command (C{mailgwctl status --json}); C{--version}; a needed
password is asked for at a terminal and read from standard input otherwise; exit
status 0 only on success, 1 on a failure, 2 on a usage error (a bad choice is refused
with the valid ones listed); errors are one line, never a traceback, also when the
reader of the output goes away early (C{mailgwctl --json status | head -1}).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from getpass import getpass as terminal_getpass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NoReturn, TextIO

import mailgw
from mailgw.admin import offline, remote
from mailgw.admin.ctl import (
    BROKEN_PIPE,
    DEFAULT_SOCKET,
    DEFAULT_TIMEOUT,
    FAILED,
    INTERRUPTED,
    USAGE,
    AdminCaller,
    Command,
    Streams,
    connect_unix,
)
from mailgw.admin.output import format_duration, format_table
from mailgw.config import ConfigError, read_toml

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = [
    "COMMANDS",
    "DEFAULT_SOCKET",
    "AdminCaller",
    "Command",
    "Streams",
    "build_parser",
    "connect_unix",
    "format_duration",
    "format_table",
    "main",
    "socket_from_config",
]

COMMANDS: Mapping[str, Command] = MappingProxyType(
    {
        "check-config": Command(
            help="validate a configuration file and what it needs of this machine, without starting anything",
            handler=offline.check_config,
            add_arguments=offline.check_config_arguments,
        ),
        "hash-password": Command(
            help="read a password without echo and print a hash for the local users file",
            handler=offline.hash_password_command,
            add_arguments=offline.hash_password_arguments,
        ),
        "sample-config": Command(
            help="write the sample configuration, users file and systemd unit into a folder",
            handler=offline.sample_config,
            add_arguments=offline.sample_config_arguments,
        ),
        "status": Command(
            help="show the daemon's listeners, sessions, AAA groups and poller", handler=remote.status_command
        ),
        "sessions": Command(
            help="list the live sessions", handler=remote.sessions_command, add_arguments=remote.sessions_arguments
        ),
        "kill": Command(help="close a session", handler=remote.kill_command, add_arguments=remote.kill_arguments),
        "reload": Command(
            help="reload the configuration file (the running one is kept if the new one is invalid)",
            handler=remote.reload_command,
        ),
        "aaa": Command(
            help="AAA server groups: aaa test GROUP USER | aaa flush [GROUP [USER]]",
            handler=remote.aaa_command,
            add_arguments=remote.aaa_arguments,
        ),
        "accounts": Command(
            help="remote POP accounts: list | add | edit ID | delete ID | check-now ID",
            handler=remote.accounts_command,
            add_arguments=remote.accounts_arguments,
        ),
        "sso": Command(
            help="POP3 SSO identity table: sso list | lookup IP | remove IP | replay FILE.pcap",
            handler=remote.sso_command,
            add_arguments=remote.sso_arguments,
        ),
    }
)


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("mailgw")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return mailgw.__version__


def _parser_class(streams: Streams) -> type[argparse.ArgumentParser]:
    """An ArgumentParser (and subparsers) that print to C{streams}, not C{sys}."""

    class Parser(argparse.ArgumentParser):
        def print_help(self, file: SupportsWrite[str] | None = None) -> None:
            super().print_help(file or streams.stdout)

        def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
            # --version, help and usage: to the streams, not to sys
            if message:
                target = {id(sys.stdout): streams.stdout, id(sys.stderr): streams.stderr}.get(id(file), file)
                (target or streams.stdout).write(message)

        def error(self, message: str) -> NoReturn:
            self.print_usage(streams.stderr)
            self.exit(USAGE, f"{self.prog}: error: {message}\n")

        def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
            if message:
                streams.stderr.write(message)
            raise SystemExit(status)

    return Parser


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after its name.  Below the top
    parser they default to "not given", so that a value given before the command
    is not reset by the subparser."""
    group = parser.add_argument_group("global options (before or after the command)")

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    group.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help=f"the daemon's admin socket (default: admin.socket of --config, else {DEFAULT_SOCKET})",
    )
    group.add_argument(
        "--config",
        metavar="PATH",
        default=default(None),
        help="the daemon's configuration file, to read admin.socket from (default: none)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        help=f"how long to wait for each answer of the daemon (default: {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON instead of text (default: text)"
    )
    group.add_argument(
        "--version", action="version", version=f"mailgwctl {_version()}", help="print the version and exit"
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def build_parser(commands: Mapping[str, Command] = COMMANDS, streams: Streams | None = None) -> argparse.ArgumentParser:
    """The argument parser of C{mailgwctl}, with one subparser per command."""
    parser_class = _parser_class(streams) if streams is not None else argparse.ArgumentParser
    parser = parser_class(
        prog="mailgwctl",
        description="Administer a mailgw e-mail security gateway.",
        epilog="Run 'mailgwctl COMMAND --help' for a command's options.  Exit status: 0 success, 1 failure,"
        " 2 usage error.",
    )
    _add_global_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    for name, command in commands.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
    for subparser in _subparsers(parser):
        _add_global_options(subparser, top=False)
    return parser


def socket_from_config(path: str | os.PathLike[str]) -> str:
    """C{admin.socket} of the configuration at C{path}, resolved as the daemon
    resolves it (against the file's folder).  Only that key is read, so a
    configuration with problems elsewhere still names its socket."""
    data = read_toml(path)
    admin = data.get("admin", {})
    value = admin.get("socket", DEFAULT_SOCKET) if isinstance(admin, dict) else DEFAULT_SOCKET
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{path}: admin.socket: must be a path")
    return os.path.normpath(Path(path).absolute().parent / value)


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
    """Run C{mailgwctl} with C{argv} (default: C{sys.argv[1:]}); return the exit
    status.  This is also the console script: nothing it meets ends in a traceback
    (C{MAILGWCTL_DEBUG=1} shows one for an unexpected error)."""
    streams = Streams(
        stdin=stdin if stdin is not None else sys.stdin,
        stdout=stdout if stdout is not None else sys.stdout,
        stderr=stderr if stderr is not None else sys.stderr,
        getpass=getpass,
        connect=connect,
    )
    try:
        status = _run(argv, streams, commands)
        streams.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:  # mailgwctl --json status | head -1
        _quiet(streams.stdout)
        return BROKEN_PIPE
    except KeyboardInterrupt:
        streams.stderr.write("mailgwctl: interrupted\n")
        return INTERRUPTED
    except Exception as e:  # the outermost boundary: one line, not a traceback
        if os.environ.get("MAILGWCTL_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0]
        streams.stderr.write(
            f"mailgwctl: unexpected error: {type(e).__name__}{': ' + first if first else ''}"
            " (MAILGWCTL_DEBUG=1 shows where)\n"
        )
        return FAILED
    return status


def _run(argv: Sequence[str] | None, streams: Streams, commands: Mapping[str, Command]) -> int:
    parser = build_parser(commands, streams)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports usage errors, --help and --version this way
        return e.code if isinstance(e.code, int) else USAGE
    if args.timeout <= 0:
        streams.stderr.write("mailgwctl: --timeout must be more than 0 seconds\n")
        return USAGE
    if args.socket is None:
        try:
            args.socket = socket_from_config(args.config) if args.config else DEFAULT_SOCKET
        except ConfigError as e:
            streams.stderr.write(f"mailgwctl: {e}\n")
            return FAILED
    return commands[args.command].handler(args, streams)


def _quiet(stdout: TextIO) -> None:
    """After the reader of stdout went away: send what is still buffered nowhere, so
    that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (a StringIO in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
