"""The POP3S proxy [4.5]: CAPA, STLS, USER/PASS, AUTH PLAIN and AUTH LOGIN (both with
or without an initial response, ``*`` cancelling), QUIT before login, pipelined or not;
after the login everything relays.

APOP is not offered: the gateway needs the password to check it and to log in to the
mail server.
"""

from __future__ import annotations

import enum

from mailgw.proxy.core import ProxySession
from mailgw.upstream.pop3 import POP3UpstreamLogin
from mailgw.wire import pop3, sasl
from mailgw.wire.errors import BadBase64, ProtocolError

#: the SASL mechanisms offered (CAPA ``SASL``, the ``AUTH`` listing)
MECHANISMS = ("PLAIN", "LOGIN")


class _Sasl(enum.Enum):
    """What the client's next line answers."""

    NONE = 0  # a command
    PLAIN = 1  # the PLAIN response to "+ "
    LOGIN_USER = 2  # the LOGIN user name
    LOGIN_PASSWORD = 3  # the LOGIN password


def _login_error(error: ProtocolError, item: str) -> str:
    """The -ERR text for an AUTH LOGIN answer that cannot be decoded."""
    if isinstance(error, BadBase64):
        return f"Invalid base64 in the SASL LOGIN {item}."
    return f"Invalid SASL LOGIN {item}."


class POP3Session(ProxySession):
    """One POP3 client connection."""

    protocol_name = "pop3"
    upstream_class = POP3UpstreamLogin

    _user: str | None = None
    #: the SASL continuation the client's next line answers, if any
    _sasl = _Sasl.NONE
    #: the AUTH LOGIN user name, while its password is awaited
    _login_user = ""

    def greet(self) -> None:
        self.write(pop3.ok(f"{self.env.node_name} POP3 gateway ready."))

    def capabilities(self) -> list[str]:
        # PIPELINING (RFC 2449) holds before login: several commands in one read are
        # answered in order, and those sent while a login is under way wait for it
        # (then go to the mail server after a successful one).
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.login_allowed:
            caps += ["USER", "SASL " + " ".join(MECHANISMS)]
        if self.starttls_available:
            caps.append("STLS")
        caps.append("IMPLEMENTATION mailgw")
        return caps

    def line_received(self, line: bytes) -> None:
        if self._sasl is not _Sasl.NONE:
            self._sasl_line(line)
            return
        try:
            command = pop3.parse_command(line)
        except ProtocolError:
            self.protocol_error(pop3.err("Invalid command."))
            return
        handler = getattr(self, "do_" + command.name, None)
        if handler is None:
            if command.name in {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST"}:
                self.protocol_error(pop3.err("Not logged in."))
            else:
                self.protocol_error(pop3.err("Unknown command."))
            return
        handler(command.args)

    # -- commands ---------------------------------------------------------------------

    def do_CAPA(self, args: tuple[str, ...]) -> None:
        self.write(pop3.capa_response(self.capabilities()))

    def do_STLS(self, args: tuple[str, ...]) -> None:
        if self.tls_active:
            self.protocol_error(pop3.err("TLS is already active."))
        elif not self.starttls_available:
            self.protocol_error(pop3.err("STLS is not available."))
        else:
            self.write(pop3.ok("Begin TLS negotiation now."))
            self.start_tls()

    def do_QUIT(self, args: tuple[str, ...]) -> None:
        self.close_with(pop3.ok("Logging out."))

    def do_APOP(self, args: tuple[str, ...]) -> None:
        self.protocol_error(pop3.err("APOP is not supported, use USER/PASS or AUTH."))

    def _refuse_plaintext(self) -> bool:
        if self.login_allowed:
            return False
        self.protocol_error(pop3.err("[AUTH] Plaintext authentication is disabled, use STLS first."))
        return True

    def do_USER(self, args: tuple[str, ...]) -> None:
        if self._refuse_plaintext():
            return
        if len(args) != 1 or not args[0]:
            self.protocol_error(pop3.err("USER needs exactly one argument."))
            return
        self._user = args[0]
        self.username_presented()
        self.write(pop3.ok("Send the password."))

    def do_PASS(self, args: tuple[str, ...]) -> None:
        if self._refuse_plaintext():
            return
        if self._user is None:
            self.protocol_error(pop3.err("USER first."))
            return
        user, self._user = self._user, None
        self.attempt_login(user, args[0] if args else "")

    def do_AUTH(self, args: tuple[str, ...]) -> None:
        if not args:
            # RFC 1734 / 5034: list the mechanisms
            listing = b"".join(mechanism.encode("ascii") + b"\r\n" for mechanism in MECHANISMS)
            self.write(pop3.ok("Supported mechanisms follow.") + listing + b".\r\n")
            return
        if self._refuse_plaintext():
            return
        mechanism = args[0].upper()
        if mechanism not in MECHANISMS:
            self.protocol_error(pop3.err("Unsupported authentication mechanism."))
            return
        if len(args) > 2:
            self.protocol_error(pop3.err("Too many arguments."))
            return
        initial = args[1].encode("ascii", "replace") if len(args) == 2 else None
        if mechanism == "PLAIN":
            if initial is None:
                self._sasl = _Sasl.PLAIN
                self.username_presented()
                self.write(pop3.continuation())
            else:
                self._auth_plain_response(initial)
        elif initial is None:
            self._sasl = _Sasl.LOGIN_USER
            self.username_presented()
            self.write(pop3.continuation(sasl.LOGIN_USERNAME_CHALLENGE.decode("ascii")))
        else:
            self._auth_login_user(initial)

    def _sasl_line(self, line: bytes) -> None:
        """The client's answer to a SASL continuation: the exchange's next step, or
        C{*} to cancel it."""
        state, self._sasl = self._sasl, _Sasl.NONE
        data = line.strip()
        if data == sasl.CANCEL:
            self._login_user = ""
            self.protocol_error(pop3.err("Authentication cancelled."))
        elif state is _Sasl.PLAIN:
            self._auth_plain_response(data)
        elif state is _Sasl.LOGIN_USER:
            self._auth_login_user(data)
        else:
            self._auth_login_password(data)

    def _auth_plain_response(self, data: bytes) -> None:
        if data.strip() == sasl.CANCEL:
            self.protocol_error(pop3.err("Authentication cancelled."))
            return
        try:
            _authzid, authcid, password = sasl.decode_plain(data.strip())
        except ProtocolError:
            self.protocol_error(pop3.err("Invalid SASL PLAIN response."))
            return
        self.attempt_login(authcid, password)

    def _auth_login_user(self, data: bytes) -> None:
        if data.strip() == sasl.CANCEL:
            self.protocol_error(pop3.err("Authentication cancelled."))
            return
        try:
            self._login_user = sasl.decode_login_username(data.strip())
        except ProtocolError as e:
            self.protocol_error(pop3.err(_login_error(e, "user name")))
            return
        self._sasl = _Sasl.LOGIN_PASSWORD
        self.username_presented()
        self.write(pop3.continuation(sasl.LOGIN_PASSWORD_CHALLENGE.decode("ascii")))

    def _auth_login_password(self, data: bytes) -> None:
        user, self._login_user = self._login_user, ""
        try:
            password = sasl.decode_login_item(data)
        except ProtocolError as e:
            self.protocol_error(pop3.err(_login_error(e, "password")))
            return
        self.attempt_login(user, password)

    # -- answers ----------------------------------------------------------------------

    def answer_line_too_long(self) -> bytes:
        # Called exactly when an over-long line was read.  A SASL response that long
        # ends the exchange: the next line is a command again, never a credential.
        if self._sasl is not _Sasl.NONE:
            self._sasl = _Sasl.NONE
            self._login_user = ""
            return pop3.err("Line too long, authentication cancelled.")
        return pop3.err("Line too long.")

    def answer_too_many_errors(self) -> bytes:
        return pop3.err("Too many errors, closing connection.")

    def answer_login_timeout(self) -> bytes:
        return pop3.err("[SYS/TEMP] Login timeout, closing connection.")

    def answer_auth_failed(self) -> bytes:
        return pop3.err("[AUTH] Authentication failed.")

    def answer_temporary_failure(self) -> bytes:
        return pop3.err("[SYS/TEMP] Service temporarily unavailable, try again later.")

    def answer_closing(self) -> bytes:
        return pop3.err("[SYS/TEMP] Connection closed by the gateway.")
