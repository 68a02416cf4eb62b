"""What every ``mailgwctl`` command shares: the streams, the command record, exit
statuses, reading a secret, and calling the daemon.

A command is a L{Command}: a help line, a function adding its arguments to its
parser, and a handler that gets the parsed arguments and the L{Streams} and returns
the exit status.  Handlers of daemon commands are wrapped by L{daemon_command}: a
L{Refused} condition, a secret that could not be read and the daemon's typed errors
all become one C{mailgwctl: ...} line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from getpass import getpass as terminal_getpass
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from mailgw.admin import commands as cmd

if TYPE_CHECKING:
    from twisted.protocols import amp

__all__ = [
    "BROKEN_PIPE",
    "DEFAULT_SOCKET",
    "DEFAULT_TIMEOUT",
    "FAILED",
    "INTERRUPTED",
    "OK",
    "USAGE",
    "AdminCaller",
    "Command",
    "Handler",
    "PasswordReadError",
    "Refused",
    "Streams",
    "admin_call",
    "connect_unix",
    "daemon_command",
    "print_json",
    "read_secret",
]

#: where the daemon listens unless the configuration says otherwise (SPEC [3])
DEFAULT_SOCKET = "/run/mailgw/admin.sock"

#: seconds to wait for each answer of the daemon (a progress line counts as one):
#: long enough for an AAA test through slow servers with retries, short enough that
#: a hung daemon does not hold a script for minutes
DEFAULT_TIMEOUT = 60.0

# exit statuses
OK = 0
FAILED = 1
USAGE = 2
INTERRUPTED = 130
#: the status of a program killed by SIGPIPE (128 + 13): the reader went away
BROKEN_PIPE = 141


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
    Where a command reads and writes.  C{getpass} reads a secret without echo from the
    terminal; it is used only when C{stdin} is a terminal.  C{connect} opens the admin
    channel (socket path, timeout).
    """

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    getpass: Callable[[str], str] = field(default=terminal_getpass)
    connect: Callable[[str, float | None], AdminCaller] = field(default=connect_unix)


Handler = Callable[[argparse.Namespace, Streams], int]


@dataclass(frozen=True)
class Command:
    """One C{mailgwctl} subcommand: its help line, its handler and the function that
    adds its arguments."""

    help: str
    handler: Handler
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


class Refused(Exception):
    """The command cannot go on; the message is for the administrator."""


class PasswordReadError(Refused):
    """A secret could not be read; the message says why."""


def read_secret(streams: Streams, prompt: str, *, confirm: bool = False, what: str = "password") -> str | None:
    """
    A secret: without echo from the terminal (asked twice with C{confirm}, for a new
    secret), or else one line of standard input.

    @return: the secret, or C{None} when standard input is not a terminal and ends
        before any line (the caller decides whether that is an error).
    @raise PasswordReadError: the terminal gave no answer, or the two differ.
    """
    if streams.stdin.isatty():
        try:
            first = streams.getpass(prompt)
            if confirm:
                second = streams.getpass(f"{prompt.rstrip(': ')} (again): ")
                if first != second:
                    raise PasswordReadError(f"the {what}s do not match")
        except EOFError:
            raise PasswordReadError(f"no {what} read") from None
        return first
    # Not a terminal: one line from stdin, for scripts (printf '%s\n' "$pw" | ...).
    line = streams.stdin.readline()
    if not line:
        return None
    return line.removesuffix("\n").removesuffix("\r")


def admin_call(args: argparse.Namespace, streams: Streams, command: type[amp.Command], **arguments: Any) -> Any:
    """Send C{command} to the daemon of C{args.socket}; the answer's fields.  An
    unreachable daemon or a broken answer is L{Refused} (naming the socket); the
    command's own errors are raised as the daemon sent them."""
    from mailgw.admin.channel import AdminProtocolError, AdminUnavailable

    try:
        return streams.connect(args.socket, args.timeout).call(command, **arguments)
    except AdminUnavailable as e:
        raise Refused(str(e)) from None
    except AdminProtocolError as e:
        raise Refused(f"admin socket {args.socket}: {e}") from None


def daemon_command(handler: Handler) -> Handler:
    """C{handler} with its refusals and the daemon's typed errors turned into lines
    on stderr and exit status 1."""

    def run(args: argparse.Namespace, streams: Streams) -> int:
        try:
            return handler(args, streams)
        except Refused as e:
            streams.stderr.write(f"mailgwctl: {e}\n")
        except cmd.AdminCommandError as e:
            lines = str(e).splitlines() or [type(e).__name__]
            streams.stderr.write("".join(f"mailgwctl: {line}\n" for line in lines))
        return FAILED

    run.__doc__ = handler.__doc__
    return run


def print_json(streams: Streams, value: object) -> None:
    """C{value} as indented JSON, one document per command."""
    json.dump(value, streams.stdout, indent=2, sort_keys=True)
    streams.stdout.write("\n")
