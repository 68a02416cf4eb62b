"""The IMAP4S proxy [4.5]: CAPABILITY, STARTTLS, LOGIN (atoms, quoted strings,
literals ``{n}`` and ``{n+}``), AUTHENTICATE PLAIN and LOGIN with and without SASL-IR
(RFC 4959; the LOGIN initial response is the user name), ID, NOOP, LOGOUT before
login; after login the upstream's capabilities are passed on in the tagged OK and
everything relays (IDLE, APPEND literals, COMPRESS: just bytes).
"""

from __future__ import annotations

import enum

from mailgw.proxy.core import ProxySession
from mailgw.proxy.environment import InputBuffer
from mailgw.upstream.imap4 import IMAP4UpstreamLogin
from mailgw.wire import imap4, sasl
from mailgw.wire.errors import ProtocolError
from mailgw.wire.lines import TooLong

#: commands that exist only after login: answered with NO rather than BAD
_AUTHENTICATED_COMMANDS = frozenset(
    {
        "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
        "STATUS", "APPEND", "CHECK", "CLOSE", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
        "UID", "IDLE", "ENABLE", "NAMESPACE", "GETQUOTA", "GETQUOTAROOT", "UNSELECT", "COMPRESS",
    }
)


#: the SASL mechanisms offered (``AUTH=…`` capabilities)
MECHANISMS = ("PLAIN", "LOGIN")


class _Sasl(enum.Enum):
    """What the client's next line answers, after a ``+`` continuation."""

    PLAIN = 1  # the PLAIN response
    LOGIN_USER = 2  # the LOGIN user name
    LOGIN_PASSWORD = 3  # the LOGIN password


class IMAP4Session(ProxySession):
    """One IMAP client connection."""

    protocol_name = "imap4"
    upstream_class = IMAP4UpstreamLogin

    #: tag of the command whose login is under way (for the tagged answers)
    _login_tag = "*"
    #: tag of an AUTHENTICATE waiting for the client's response line
    _sasl_tag: str | None = None
    #: which step of the exchange that line answers
    _sasl_step = _Sasl.PLAIN
    #: the AUTHENTICATE LOGIN user name, while its password is awaited
    _login_user = ""

    def make_input(self) -> InputBuffer:
        # The proxy's pre-login limits [4.10]; a whole LOGIN command holds a line and
        # two literals.
        literal = self.proxy.max_login_literal
        return imap4.CommandReader(
            max_line=self.max_line, max_literal=literal, max_command=max(self.max_line, 2 * literal + self.max_line)
        )

    @property
    def reader(self) -> imap4.CommandReader:
        assert isinstance(self.input, imap4.CommandReader)
        return self.input

    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE"]
        if self.starttls_available:
            caps.append("STARTTLS")
        if self.login_allowed:
            caps += [f"AUTH={mechanism}" for mechanism in MECHANISMS]
        else:
            caps.append("LOGINDISABLED")
        return caps

    def greet(self) -> None:
        caps = " ".join(self.capabilities())
        self.write(imap4.untagged(f"OK [CAPABILITY {caps}] {self.env.node_name} IMAP gateway ready."))

    # -- input ------------------------------------------------------------------------

    def handle_next_input(self) -> bool:
        if self._sasl_tag is not None:
            raw = self.reader.next_raw_line()
            if raw is None:
                return False
            tag, self._sasl_tag = self._sasl_tag, None
            if isinstance(raw, TooLong):
                # The exchange ends: the next line is a command, never a credential.
                self._login_user = ""
                self.protocol_error(imap4.tagged(tag, "BAD", "Line too long."))
            else:
                self._sasl_line(tag, raw)
            return True
        event = self.reader.next_event()
        if event is None:
            return False
        if isinstance(event, imap4.NeedContinuation):
            self.write(imap4.continuation("Ready for literal data"))
        elif isinstance(event, (imap4.BadCommand, imap4.TooBig)):
            self._refused(event)
        elif isinstance(event, TooLong):
            self.protocol_error(self.answer_line_too_long())
        else:
            self._command(event)
        return True

    def _refused(self, event: imap4.BadCommand | imap4.TooBig) -> None:
        """A command the reader refused: invalid syntax is C{BAD}, a literal or
        command over the limits C{BAD [TOOBIG]} (RFC 7888, RFC 7889).  After a
        fatal refusal the reader has stopped: the connection closes."""
        if isinstance(event, imap4.TooBig):
            # "Literal too big." or "Command too long."
            answer = self._bad(event.tag, event.reason.capitalize() + ".", code="TOOBIG")
        else:
            answer = self._bad(event.tag, f"Invalid command: {event.reason}.")
        if event.fatal:
            self.close_with(answer + imap4.untagged("BYE Invalid literal."))
        else:
            self.protocol_error(answer)

    @staticmethod
    def _bad(tag: str | None, text: str, code: str | None = None) -> bytes:
        if tag:
            return imap4.tagged(tag, "BAD", text, code=code)
        return imap4.untagged(f"BAD [{code}] {text}" if code else "BAD " + text)

    def _command(self, command: imap4.Command) -> None:
        tag, name = command.tag, command.name
        if name == "CAPABILITY":
            self.write(imap4.capability_line(self.capabilities()) + imap4.tagged(tag, "OK", "CAPABILITY completed."))
        elif name == "NOOP":
            self.write(imap4.tagged(tag, "OK", "NOOP completed."))
        elif name == "LOGOUT":
            self.close_with(imap4.untagged("BYE Logging out.") + imap4.tagged(tag, "OK", "LOGOUT completed."))
        elif name == "ID":
            self._id(tag, command.args)
        elif name == "STARTTLS":
            self._starttls(tag)
        elif name == "LOGIN":
            self._do_login(tag, command.args)
        elif name == "AUTHENTICATE":
            self._authenticate(tag, command.args)
        elif name in _AUTHENTICATED_COMMANDS:
            self.protocol_error(imap4.tagged(tag, "BAD", "Not logged in."))
        else:
            self.protocol_error(imap4.tagged(tag, "BAD", "Unknown command."))

    #: the client's ID parameters (flat: field, value, …; the last ID before login
    #: counts), passed on to the mail server after the gateway's own fields when the
    #: default server has forward_client_address [4.7]
    client_id_fields: tuple[str | None, ...] = ()

    def _id(self, tag: str, args: tuple[imap4.Arg, ...]) -> None:
        params = args[0] if args else None
        if isinstance(params, tuple):
            self.client_id_fields = tuple(p if isinstance(p, str) else None for p in params)
        else:
            self.client_id_fields = ()
        self.write(imap4.id_response({"name": "mailgw"}) + imap4.tagged(tag, "OK", "ID completed."))

    def _starttls(self, tag: str) -> None:
        if self.tls_active:
            self.protocol_error(imap4.tagged(tag, "BAD", "TLS is already active."))
        elif not self.starttls_available:
            self.protocol_error(imap4.tagged(tag, "BAD", "STARTTLS is not available."))
        else:
            self.write(imap4.tagged(tag, "OK", "Begin TLS negotiation now."))
            self.start_tls()

    def _refuse_plaintext(self, tag: str) -> bool:
        if self.login_allowed:
            return False
        self.protocol_error(
            imap4.tagged(tag, "NO", "Plaintext authentication is disabled, use STARTTLS first.", code="PRIVACYREQUIRED")
        )
        return True

    def _do_login(self, tag: str, args: tuple[imap4.Arg, ...]) -> None:
        if self._refuse_plaintext(tag):
            return
        if len(args) != 2 or not all(isinstance(a, str) for a in args):
            self.protocol_error(imap4.tagged(tag, "BAD", "LOGIN needs a user name and a password."))
            return
        user, password = args
        assert isinstance(user, str) and isinstance(password, str)
        self._login_tag = tag
        self.attempt_login(user, password)

    def _authenticate(self, tag: str, args: tuple[imap4.Arg, ...]) -> None:
        if not args or not isinstance(args[0], str):
            self.protocol_error(imap4.tagged(tag, "BAD", "AUTHENTICATE needs a mechanism."))
            return
        if self._refuse_plaintext(tag):
            return
        mechanism = args[0].upper()
        if mechanism not in MECHANISMS:
            self.protocol_error(imap4.tagged(tag, "NO", "Unsupported authentication mechanism."))
            return
        if len(args) > 2 or (len(args) == 2 and not isinstance(args[1], str)):
            self.protocol_error(imap4.tagged(tag, "BAD", "Invalid AUTHENTICATE arguments."))
            return
        initial = args[1].encode("ascii", "replace") if len(args) == 2 and isinstance(args[1], str) else None
        if mechanism == "PLAIN":
            if initial is None:
                self._expect(tag, _Sasl.PLAIN, "")
            else:
                self._plain(tag, initial)
        elif initial is None:
            self._expect(tag, _Sasl.LOGIN_USER, sasl.LOGIN_USERNAME_CHALLENGE.decode("ascii"))
        else:
            # SASL-IR: the LOGIN initial response is the user name (RFC 4959).
            self._login_username(tag, initial)

    def _expect(self, tag: str, step: _Sasl, challenge: str) -> None:
        """Send a continuation; the client's next line answers C{step}."""
        self._sasl_tag = tag
        self._sasl_step = step
        self.username_presented()
        self.write(imap4.continuation(challenge))

    def _sasl_line(self, tag: str, data: bytes) -> None:
        """The client's answer to a continuation, or C{*} to cancel (RFC 9051 6.2.2)."""
        data = data.strip()
        if data == sasl.CANCEL:
            self._login_user = ""
            self.protocol_error(imap4.tagged(tag, "BAD", "Authentication cancelled."))
        elif self._sasl_step is _Sasl.PLAIN:
            self._plain(tag, data)
        elif self._sasl_step is _Sasl.LOGIN_USER:
            self._login_username(tag, data)
        else:
            self._login_password(tag, data)

    def _plain(self, tag: str, data: bytes) -> None:
        data = data.strip()
        if data == sasl.CANCEL:
            self.protocol_error(imap4.tagged(tag, "BAD", "Authentication cancelled."))
            return
        try:
            _authzid, authcid, password = sasl.decode_plain(data)
        except ProtocolError:
            self.protocol_error(imap4.tagged(tag, "BAD", "Invalid SASL PLAIN response."))
            return
        self._login_tag = tag
        self.attempt_login(authcid, password)

    def _login_username(self, tag: str, data: bytes) -> None:
        try:
            self._login_user = sasl.decode_login_username(data.strip())
        except ProtocolError:
            self.protocol_error(imap4.tagged(tag, "BAD", "Invalid SASL LOGIN user name."))
            return
        self._expect(tag, _Sasl.LOGIN_PASSWORD, sasl.LOGIN_PASSWORD_CHALLENGE.decode("ascii"))

    def _login_password(self, tag: str, data: bytes) -> None:
        user, self._login_user = self._login_user, ""
        try:
            password = sasl.decode_login_item(data)
        except ProtocolError:
            self.protocol_error(imap4.tagged(tag, "BAD", "Invalid SASL LOGIN password."))
            return
        self._login_tag = tag
        self.attempt_login(user, password)

    # -- answers ----------------------------------------------------------------------

    def answer_login_ok(self, upstream_answer: bytes) -> bytes:
        return self._login_tag.encode("ascii") + b" " + upstream_answer

    def answer_line_too_long(self) -> bytes:
        return imap4.untagged("BAD Line too long.")

    def answer_too_many_errors(self) -> bytes:
        return imap4.untagged("BYE Too many errors, closing connection.")

    def answer_login_timeout(self) -> bytes:
        return imap4.untagged("BYE Login timeout, closing connection.")

    def answer_auth_failed(self) -> bytes:
        return imap4.tagged(self._login_tag, "NO", "Authentication failed.", code="AUTHENTICATIONFAILED")

    def answer_temporary_failure(self) -> bytes:
        return imap4.tagged(
            self._login_tag, "NO", "Service temporarily unavailable, try again later.", code="UNAVAILABLE"
        )

    def answer_closing(self) -> bytes:
        return imap4.untagged("BYE Connection closed by the gateway.")
