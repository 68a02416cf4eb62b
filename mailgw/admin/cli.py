"""``mailgwctl``: the administration command.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a help text, a function that
adds its arguments to its parser, and a handler that gets the parsed arguments and the
:class:`Streams` and returns the exit status.  The offline commands (``check-config``,
``hash-password``) need no daemon; commands that talk to the daemon over the AMP admin
socket (``--socket``) are added the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from getpass import getpass as terminal_getpass
from types import MappingProxyType
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

from mailgw.auth.passwords import SCHEMES, hash_password
from mailgw.config import ConfigError, load_config

__all__ = ["COMMANDS", "DEFAULT_SOCKET", "Command", "Streams", "main"]

DEFAULT_SOCKET = "/run/mailgw/admin.sock"

# exit statuses
OK = 0
FAILED = 1
USAGE = 2


@dataclass(frozen=True)
class Streams:
    """
    Where a command reads and writes.  ``getpass`` reads a secret without echo from the
    terminal; it is used only when ``stdin`` is a terminal.
    """

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    getpass: Callable[[str], str] = field(default=terminal_getpass)


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


def build_parser(commands: Mapping[str, Command] = COMMANDS, streams: Streams | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``mailgwctl`` with one subparser per command."""
    parser_class = _parser_class(streams) if streams is not None else argparse.ArgumentParser
    parser = parser_class(prog="mailgwctl", description="Administer a mailgw e-mail security gateway.")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"the daemon's AMP admin socket (default: {DEFAULT_SOCKET})",
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
) -> int:
    """Run ``mailgwctl`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    streams = Streams(
        stdin=stdin if stdin is not None else sys.stdin,
        stdout=stdout if stdout is not None else sys.stdout,
        stderr=stderr if stderr is not None else sys.stderr,
        getpass=getpass,
    )
    parser = build_parser(commands, streams)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports usage errors and --help this way
        return e.code if isinstance(e.code, int) else USAGE
    try:
        return commands[args.command].handler(args, streams)
    except KeyboardInterrupt:
        streams.stderr.write("mailgwctl: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
