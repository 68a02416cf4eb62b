"""A passive reader of one POP3 connection: who logged in, seen from a mirror port.

The monitor mode of POP3 single sign-on (SPEC [7]) watches both directions of a
connection between a client and a POP3 server and learns "this client IP is this
user" when the server accepts a login.  L{Pop3Dialogue} is fed the two reassembled
byte streams, client to server (L{Pop3Dialogue.client_data}) and server to client
(L{Pop3Dialogue.server_data}), in chunks of any size and in any interleaving, and
returns L{DialogueEvent}s:

  - L{Login}, only when C{+OK} answers C{PASS} after a C{USER} the server accepted,
    or answers C{AUTH PLAIN} (initial response or continuation) or C{AUTH LOGIN}
    (user name and password both given).  Never on C{-ERR}, a continuation or a
    cancelled exchange;
  - L{Ended}, once, when the rest of the connection cannot or need not be read:
    after a successful login (L{AUTHENTICATED}, with or without a L{Login}: C{APOP}
    and other SASL mechanisms end the dialogue without naming a user), after C{STLS}
    answered C{+OK} or when a direction opens with a TLS record (L{TLS}), after
    C{QUIT} (L{QUIT}), or when the greeting is C{-ERR} (L{REFUSED}).

Commands and answers are paired by position, as POP3 is a strict request/response
protocol (pipelined commands are answered in order): the first server line is the
greeting, then each client line gets one answer (a status line, a SASL continuation,
or a dot-terminated multi-line answer for C{CAPA} and a bare C{AUTH}).  A line is
interpreted only once it is paired, so the events depend neither on how the streams
were cut into chunks nor on which direction was fed first.

Memory is bounded: lines longer than C{max_line} are not kept (L{TooLong
<mailgw.wire.lines.TooLong>}), and at most C{max_backlog} complete lines of one
direction wait for their partner.  A stream that is not POP3 raises L{DialogueError}
(a L{ProtocolError}) with a L{DialogueError.reason}: a server line that is not a
status line where one is due (L{NOT_POP3}), an overlong status line
(L{LINE_TOO_LONG}), or too many lines without a partner (L{BACKLOG}).  Nothing else
is ever raised for any input; after an L{Ended} or a L{DialogueError} further data is
ignored.

User names come from the client's own lines (C{USER}, the PLAIN authorization or
authentication identity, the first C{AUTH LOGIN} item); a name that is empty or holds a
control, invisible or separator character yields no L{Login}.  Passwords are never kept
beyond the line that carries them, and no event or error holds one.
"""

from __future__ import annotations

import unicodedata
from collections import deque
from dataclasses import dataclass
from typing import TypeAlias

from mailgw.wire.errors import ProtocolError
from mailgw.wire.lines import Line, LineBuffer, TooLong
from mailgw.wire.pop3 import Command, Status, parse_command, parse_status
from mailgw.wire.sasl import CANCEL, decode_login_username, decode_plain

__all__ = [
    "AUTHENTICATED",
    "BACKLOG",
    "LINE_TOO_LONG",
    "MAX_BACKLOG",
    "MAX_LINE",
    "NOT_POP3",
    "QUIT",
    "REFUSED",
    "TLS",
    "DialogueError",
    "DialogueEvent",
    "Ended",
    "Login",
    "Pop3Dialogue",
]

#: L{Ended} reason: the server accepted a login; what follows is the mailbox.
AUTHENTICATED = "authenticated"
#: L{Ended} reason: C{STLS} was accepted, or a direction opened with a TLS record.
TLS = "tls"
#: L{Ended} reason: C{QUIT} was answered.
QUIT = "quit"
#: L{Ended} reason: the server's greeting was C{-ERR}.
REFUSED = "refused"
#: L{DialogueError} reason: a server line that is not a POP3 status line.
NOT_POP3 = "not-pop3"
#: L{DialogueError} reason: a server status line longer than C{max_line}.
LINE_TOO_LONG = "line-too-long"
#: L{DialogueError} reason: more than C{max_backlog} lines waiting for their partner.
BACKLOG = "backlog"

#: Default longest line kept, terminator included.  RFC 2449 allows 255 octets for
#: commands and 512 for status lines; SASL responses may be longer.
MAX_LINE = 1024
#: Default number of complete lines of one direction that may wait for a partner
#: (pipelined commands, or answers captured before their command).
MAX_BACKLOG = 16

#: The first byte of a TLS record carrying a handshake (a ClientHello or ServerHello).
_TLS_HANDSHAKE = 0x16
#: Commands of the TRANSACTION state: a C{+OK} to one means a login happened unseen.
#: (NOOP and RSET are left out: a lenient server may answer them before a login.)
_TRANSACTION_COMMANDS = frozenset({"STAT", "LIST", "RETR", "DELE", "TOP", "UIDL", "LAST"})
#: Unicode categories that make a user name unusable (as in L{mailgw.wire.login}).
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


@dataclass(frozen=True)
class Login:
    """The server accepted a login of C{user} by C{mechanism}.

    @ivar user: the user name the client gave.
    @ivar mechanism: C{"USER"} (C{USER}/C{PASS}), C{"PLAIN"} or C{"LOGIN"}.
    """

    user: str
    mechanism: str


@dataclass(frozen=True)
class Ended:
    """Nothing more is to be learnt from the connection.

    @ivar reason: L{AUTHENTICATED}, L{TLS}, L{QUIT} or L{REFUSED}.
    """

    reason: str


#: What the feeding methods of L{Pop3Dialogue} return.
DialogueEvent: TypeAlias = Login | Ended


class DialogueError(ProtocolError):
    """The stream is not a POP3 dialogue this reader can follow; it is dropped.

    @ivar reason: L{NOT_POP3}, L{LINE_TOO_LONG} or L{BACKLOG}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"POP3 dialogue dropped: {reason}")
        self.reason = reason


@dataclass
class _Sasl:
    """A SASL exchange in progress: its mechanism and the client's items so far."""

    mechanism: str
    items: list[Line]


class Pop3Dialogue:
    """Follows one POP3 connection from both directions; see the module docstring.

    @param max_line: the longest line kept, terminator included (per direction).
    @param max_backlog: how many complete lines of one direction may wait for their
        partner before the dialogue is dropped (L{BACKLOG}).
    """

    def __init__(self, *, max_line: int = MAX_LINE, max_backlog: int = MAX_BACKLOG) -> None:
        if max_backlog < 1:
            raise ValueError("max_backlog must be at least 1")
        self._max_backlog = max_backlog
        self._client = LineBuffer(max_line)
        self._server = LineBuffer(max_line)
        self._client_lines: deque[Line] = deque()
        self._server_lines: deque[Line] = deque()
        self._client_started = False
        self._server_started = False
        self._greeted = False
        self._in_multiline = False
        self._user: str | None = None
        self._sasl: _Sasl | None = None
        self._ended: str | None = None

    def __repr__(self) -> str:
        # Never the buffers: they may hold a password.
        return f"<Pop3Dialogue ended={self._ended!r}>"

    @property
    def ended(self) -> str | None:
        """Why the dialogue ended (an L{Ended} or L{DialogueError} reason), or C{None}."""
        return self._ended

    def buffered_bytes(self) -> int:
        """How many bytes of the connection this reader holds now (lines and partial
        lines of both directions)."""
        held = len(self._client.pending()) + len(self._server.pending())
        for queue in (self._client_lines, self._server_lines):
            held += sum(len(line) if isinstance(line, bytes) else 0 for line in queue)
        return held

    def client_data(self, data: bytes) -> list[DialogueEvent]:
        """Feed bytes the client sent, in stream order.

        @return: the events these bytes complete.
        @raise DialogueError: the stream is dropped (see the module docstring).
        """
        if self._ended is not None or not data:
            return []
        if not self._client_started:
            self._client_started = True
            if data[0] == _TLS_HANDSHAKE:
                return self._end(TLS)
        return self._receive(self._client, self._client_lines, data)

    def server_data(self, data: bytes) -> list[DialogueEvent]:
        """Feed bytes the server sent, in stream order.

        @return: the events these bytes complete.
        @raise DialogueError: the stream is dropped (see the module docstring).
        """
        if self._ended is not None or not data:
            return []
        if not self._server_started:
            self._server_started = True
            if data[0] == _TLS_HANDSHAKE:
                return self._end(TLS)
        return self._receive(self._server, self._server_lines, data)

    # -- framing and pairing -------------------------------------------------------------

    def _receive(self, buffer: LineBuffer, queue: deque[Line], data: bytes) -> list[DialogueEvent]:
        events: list[DialogueEvent] = []
        buffer.append(data)
        try:
            while self._ended is None and (line := buffer.next_line()) is not None:
                queue.append(line)
                events += self._pair()
                if len(queue) > self._max_backlog:
                    raise DialogueError(BACKLOG)
        except DialogueError as error:
            self._stop(error.reason)
            raise
        if self._ended is not None:
            self._stop(self._ended)
        return events

    def _pair(self) -> list[DialogueEvent]:
        """Consume every pairing the queued lines allow."""
        events: list[DialogueEvent] = []
        server = self._server_lines
        while self._ended is None and server:
            if self._in_multiline:
                # The body of a multi-line answer: skipped up to its terminating dot.
                self._in_multiline = server.popleft() != b"."
            elif not self._greeted:
                status = _status(server.popleft())
                if status.continuation:
                    raise DialogueError(NOT_POP3)
                if not status.ok:
                    events += self._end(REFUSED)
                self._greeted = True
            elif self._client_lines:
                events += self._answer(self._client_lines.popleft(), _status(server.popleft()))
            else:
                break
        return events

    def _answer(self, line: Line, status: Status) -> list[DialogueEvent]:
        """Interpret one client line together with the server's answer to it."""
        if self._sasl is not None:
            # The line answers a continuation: a SASL item, or "*" to cancel.
            return self._sasl_step(self._sasl, line, status)
        command = _command(line)
        name = command.name if command is not None else ""
        if command is None or name == "USER":
            # An unreadable line may have been a USER: forget the accepted name.
            self._user = None
        if status.continuation:
            if name != "AUTH" or not command or not command.args:
                raise DialogueError(NOT_POP3)
            self._sasl = _Sasl(command.args[0].upper(), _initial_response(command))
            return []
        if not status.ok or command is None:
            return []
        if name == "USER":
            self._user = command.args[0] if len(command.args) == 1 else None
            return []
        if name == "PASS":
            return self._authenticated(self._user, "USER")
        if name == "AUTH":
            if not command.args:
                self._in_multiline = True  # the list of mechanisms
                return []
            mechanism = command.args[0].upper()
            return self._authenticated(_sasl_user(mechanism, _initial_response(command)), mechanism)
        if name == "CAPA":
            self._in_multiline = True
            return []
        if name == "STLS":
            return self._end(TLS)
        if name == "QUIT":
            return self._end(QUIT)
        if name == "APOP" or name in _TRANSACTION_COMMANDS:
            return self._authenticated(None, name)
        return []

    def _sasl_step(self, sasl: _Sasl, line: Line, status: Status) -> list[DialogueEvent]:
        if status.continuation:
            if len(sasl.items) >= self._max_backlog:
                raise DialogueError(BACKLOG)
            sasl.items.append(line)
            return []
        self._sasl = None
        if not status.ok:
            return []
        if line == CANCEL:
            # Accepted although cancelled: logged in, as nobody this reader can name.
            return self._authenticated(None, sasl.mechanism)
        sasl.items.append(line)
        return self._authenticated(_sasl_user(sasl.mechanism, sasl.items), sasl.mechanism)

    def _authenticated(self, user: str | None, mechanism: str) -> list[DialogueEvent]:
        events: list[DialogueEvent] = []
        if user is not None and _usable_name(user):
            events.append(Login(user, mechanism))
        return events + self._end(AUTHENTICATED)

    def _end(self, reason: str) -> list[DialogueEvent]:
        self._stop(reason)
        return [Ended(reason)]

    def _stop(self, reason: str) -> None:
        """Give up the connection: keep nothing of it."""
        self._ended = reason
        self._client.clear()
        self._server.clear()
        self._client_lines.clear()
        self._server_lines.clear()
        self._sasl = None
        self._user = None


def _status(line: Line) -> Status:
    if isinstance(line, TooLong):
        raise DialogueError(LINE_TOO_LONG)
    try:
        return parse_status(line)
    except ProtocolError:
        raise DialogueError(NOT_POP3) from None


def _command(line: Line) -> Command | None:
    """The client command on C{line}, or C{None} for a line the server cannot have
    taken as a command either (too long, not a keyword, not UTF-8)."""
    if isinstance(line, TooLong):
        return None
    try:
        return parse_command(line)
    except ProtocolError:
        return None


def _initial_response(command: Command) -> list[Line]:
    """The SASL initial response of an C{AUTH} command, as the first item."""
    if len(command.args) < 2:
        return []
    return [command.args[1].encode("utf-8")]


def _sasl_user(mechanism: str, items: list[Line]) -> str | None:
    """The user a successful exchange of C{mechanism} with these client items logged in:
    the PLAIN authorization identity (else the authentication identity), or the first
    LOGIN item once the password was given.  C{None} when it cannot be told."""
    try:
        if mechanism == "PLAIN" and len(items) == 1 and isinstance(items[0], bytes):
            authzid, authcid, _ = decode_plain(items[0])
            return authzid or authcid
        if mechanism == "LOGIN" and len(items) == 2 and isinstance(items[0], bytes):
            return decode_login_username(items[0])
    except ProtocolError:
        return None
    return None


def _usable_name(user: str) -> bool:
    return bool(user) and not any(unicodedata.category(character) in _FORBIDDEN_CATEGORIES for character in user)
