"""The SMTPS proxy [4.5]: EHLO/HELO, STARTTLS, AUTH PLAIN and LOGIN (with initial
response), RSET, NOOP, QUIT before login; after AUTH the upstream session is set up
(EHLO, STARTTLS if configured, AUTH if ``mailhost`` is listed) and the client's later
commands relay.  The capabilities advertised before AUTH are the gateway's; after AUTH
a new EHLO reaches the mail server, whose SIZE and PIPELINING the client then sees.
"""

from __future__ import annotations

import enum

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from mailgw.proxy.core import ProxySession
from mailgw.upstream import UpstreamProtocol, UpstreamTarget
from mailgw.upstream.smtp import SMTPUpstreamLogin
from mailgw.wire import sasl, smtp
from mailgw.wire.errors import LineTooLong, ProtocolError

_MAIL_COMMANDS = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "ETRN"})


class _Auth(enum.Enum):
    NONE = 0
    PLAIN = 1  # waiting for the PLAIN response
    LOGIN_USER = 2  # waiting for the LOGIN user name
    LOGIN_PASSWORD = 3  # waiting for the LOGIN password


class SMTPSession(ProxySession):
    """One SMTP client connection."""

    protocol_name = "smtp"
    # The pre-login line limit is the proxy's max_login_line (AUTH lines with an
    # initial response can be long); the other commands are held to 512 by the codec.
    upstream_class = SMTPUpstreamLogin

    _greeted = False
    _auth = _Auth.NONE
    _login_user = ""

    @property
    def _name(self) -> str:
        return self.env.node_name

    def greet(self) -> None:
        self.write(smtp.reply(220, f"{self._name} ESMTP gateway ready"))

    def keywords(self) -> list[str]:
        keywords = ["ENHANCEDSTATUSCODES", "8BITMIME"]
        if self.starttls_available:
            keywords.append("STARTTLS")
        if self.login_allowed:
            keywords.append("AUTH PLAIN LOGIN")
        return keywords

    def make_upstream(self, target: UpstreamTarget, tls: IOpenSSLClientConnectionCreator | None) -> UpstreamProtocol:
        return SMTPUpstreamLogin(
            target, tls, helo_name=self._name, authenticate="mailhost" in self.proxy.authentication
        )

    def line_received(self, line: bytes) -> None:
        if self._auth is not _Auth.NONE:
            self._auth_line(line)
            return
        try:
            command = smtp.parse_command(line)
        except LineTooLong:
            self.protocol_error(self.answer_line_too_long())
            return
        except ProtocolError:
            if line[:5].upper() == b"AUTH ":
                self.protocol_error(smtp.reply(501, "Syntax error in AUTH parameters", "5.5.2"))
            else:
                self.protocol_error(smtp.reply(500, "Syntax error, command unrecognized", "5.5.2"))
            return
        verb = command.verb
        if verb in ("EHLO", "HELO"):
            self._greeted = True
            if verb == "EHLO":
                self.write(smtp.ehlo_reply(self._name, "at your service", self.keywords()))
            else:
                self.write(smtp.reply(250, self._name))
        elif verb == "STARTTLS":
            self._starttls()
        elif verb == "AUTH":
            self._authenticate(command.argument)
        elif verb in ("RSET", "NOOP"):
            self.write(smtp.reply(250, "OK", "2.0.0"))
        elif verb == "QUIT":
            self.close_with(smtp.reply(221, "Bye", "2.0.0"))
        elif verb == "HELP":
            self.write(smtp.reply(214, "Authenticate with AUTH, then send mail", "2.0.0"))
        elif verb in _MAIL_COMMANDS:
            self.protocol_error(smtp.reply(530, "Authentication required", "5.7.0"))
        else:
            self.protocol_error(smtp.reply(500, "Command unrecognized", "5.5.2"))

    def _starttls(self) -> None:
        if self.tls_active:
            self.protocol_error(smtp.reply(503, "TLS already active", "5.5.1"))
        elif not self.starttls_available:
            self.protocol_error(smtp.reply(502, "STARTTLS not available", "5.5.1"))
        else:
            self.write(smtp.reply(220, "Ready to start TLS", "2.0.0"))
            self.start_tls()
            self._greeted = False  # RFC 3207: the client must EHLO again

    def _authenticate(self, argument: str) -> None:
        if not self.login_allowed:
            self.protocol_error(smtp.reply(530, "Must issue a STARTTLS command first", "5.7.0"))
            return
        if not self._greeted:
            self.protocol_error(smtp.reply(503, "Send EHLO first", "5.5.1"))
            return
        try:
            mechanism, initial = smtp.parse_auth(argument)
        except ProtocolError:
            self.protocol_error(smtp.reply(501, "Syntax error in AUTH parameters", "5.5.4"))
            return
        self.username_presented()
        if mechanism == "PLAIN":
            if initial is None:
                self._auth = _Auth.PLAIN
                self.write(b"334 \r\n")
            else:
                self._plain(initial.encode("ascii", "replace"))
        elif mechanism == "LOGIN":
            if initial is None:
                self._auth = _Auth.LOGIN_USER
                self.write(b"334 " + sasl.LOGIN_USERNAME_CHALLENGE + b"\r\n")
            else:
                self._login_name(initial.encode("ascii", "replace"))
        else:
            self.protocol_error(smtp.reply(504, "Unrecognized authentication type", "5.5.4"))

    def _auth_line(self, line: bytes) -> None:
        state, self._auth = self._auth, _Auth.NONE
        if line.strip() == sasl.CANCEL:
            self.protocol_error(smtp.reply(501, "Authentication cancelled", "5.7.0"))
        elif state is _Auth.PLAIN:
            self._plain(line)
        elif state is _Auth.LOGIN_USER:
            self._login_name(line)
        else:
            try:
                password = sasl.decode_login_item(line.strip())
            except ProtocolError:
                self.protocol_error(smtp.reply(501, "Invalid base64 data", "5.5.2"))
                return
            self.attempt_login(self._login_user, password)

    def _plain(self, data: bytes) -> None:
        try:
            _authzid, authcid, password = sasl.decode_plain(data.strip())
        except ProtocolError:
            self.protocol_error(smtp.reply(501, "Invalid base64 data", "5.5.2"))
            return
        self.attempt_login(authcid, password)

    def _login_name(self, data: bytes) -> None:
        try:
            self._login_user = sasl.decode_login_item(data.strip())
        except ProtocolError:
            self.protocol_error(smtp.reply(501, "Invalid base64 data", "5.5.2"))
            return
        self._auth = _Auth.LOGIN_PASSWORD
        self.write(b"334 " + sasl.LOGIN_PASSWORD_CHALLENGE + b"\r\n")

    # -- answers ----------------------------------------------------------------------

    def answer_login_ok(self, upstream_answer: bytes) -> bytes:
        return smtp.reply(235, "Authentication successful", "2.7.0")

    def answer_line_too_long(self) -> bytes:
        # Called exactly when an over-long line was read.  A SASL response that long
        # ends the exchange (RFC 4954 section 4): the next line is a command again.
        if self._auth is not _Auth.NONE:
            self._auth = _Auth.NONE
            self._login_user = ""
            return smtp.reply(500, "Authentication Exchange line is too long", "5.5.6")
        return smtp.reply(500, "Line too long", "5.5.2")

    def answer_too_many_errors(self) -> bytes:
        return smtp.reply(421, f"{self._name} Too many errors, closing connection", "4.7.0")

    def answer_login_timeout(self) -> bytes:
        return smtp.reply(421, f"{self._name} Timeout, closing connection", "4.4.2")

    def answer_auth_failed(self) -> bytes:
        return smtp.reply(535, "Authentication credentials invalid", "5.7.8")

    def answer_temporary_failure(self) -> bytes:
        return smtp.reply(454, "Temporary authentication failure", "4.7.0")

    def answer_closing(self) -> bytes:
        return smtp.reply(421, f"{self._name} Connection closed by the gateway", "4.3.2")
