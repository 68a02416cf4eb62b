"""The POP3S proxy [4.5]: CAPA, STLS, USER/PASS, AUTH PLAIN (with initial response),
QUIT before login; after the login everything relays.

APOP is not offered: the gateway needs the password to check it and to log in to the
mail server.
"""

from __future__ import annotations

from mailgw.proxy.core import ProxySession
from mailgw.upstream.pop3 import POP3UpstreamLogin
from mailgw.wire import pop3, sasl
from mailgw.wire.errors import ProtocolError


class POP3Session(ProxySession):
    """One POP3 client connection."""

    protocol_name = "pop3"
    max_line = pop3.MAX_COMMAND_LINE
    upstream_class = POP3UpstreamLogin

    _user: str | None = None
    #: waiting for the client's answer to an AUTH PLAIN continuation
    _auth_continuation = False

    def greet(self) -> None:
        self.write(pop3.ok("POP3 gateway ready."))

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"]
        if self.login_allowed:
            caps += ["USER", "SASL PLAIN"]
        if self.starttls_available:
            caps.append("STLS")
        caps.append("IMPLEMENTATION mailgw")
        return caps

    def line_received(self, line: bytes) -> None:
        if self._auth_continuation:
            self._auth_continuation = False
            self._auth_plain_response(line)
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
        self.protocol_error(pop3.err("APOP is not supported, use USER/PASS or AUTH PLAIN."))

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
            self.write(pop3.ok("Supported mechanisms follow.") + b"PLAIN\r\n.\r\n")
            return
        if self._refuse_plaintext():
            return
        mechanism = args[0].upper()
        if mechanism != "PLAIN":
            self.protocol_error(pop3.err("Unsupported authentication mechanism."))
            return
        if len(args) > 2:
            self.protocol_error(pop3.err("Too many arguments."))
            return
        if len(args) == 2:
            self._auth_plain_response(args[1].encode("ascii", "replace"))
        else:
            self._auth_continuation = True
            self.username_presented()
            self.write(pop3.continuation())

    def _auth_plain_response(self, data: bytes) -> None:
        if data.strip() == b"*":
            self.protocol_error(pop3.err("Authentication cancelled."))
            return
        try:
            _authzid, authcid, password = sasl.decode_plain(data.strip())
        except ProtocolError:
            self.protocol_error(pop3.err("Invalid SASL PLAIN response."))
            return
        self.attempt_login(authcid, password)

    # -- answers ----------------------------------------------------------------------

    def answer_line_too_long(self) -> bytes:
        return pop3.err("Line too long.")

    def answer_too_many_errors(self) -> bytes:
        return pop3.err("Too many errors, closing connection.")

    def answer_login_timeout(self) -> bytes:
        return pop3.err("[SYS/TEMP] Login timeout, closing connection.")

    def answer_auth_failed(self) -> bytes:
        return pop3.err("[AUTH] Authentication failed.")

    def answer_temporary_failure(self) -> bytes:
        return pop3.err("[SYS/TEMP] Service temporarily unavailable, try again later.")
