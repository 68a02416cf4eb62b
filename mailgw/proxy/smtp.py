"""The SMTPS proxy [4.5]: EHLO/HELO, STARTTLS, AUTH PLAIN and LOGIN (with initial
response), RSET, NOOP, QUIT before login; after AUTH the upstream session is set up
(EHLO, STARTTLS if configured, AUTH if ``mailhost`` is listed) and the client's later
commands relay as bytes.

Clients do not send EHLO again after AUTH, so the EHLO answer before AUTH carries the
default server's SIZE, PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8 and CHUNKING
where it has them (learned by L{mailgw.upstream.smtpprobe}); the server itself answers
what the client then sends: ``MAIL FROM:<…> SIZE=n`` over its limit gets its ``552`` at
once (Postfix ``5.3.4``, Dovecot ``5.2.3``), since nothing is parsed after AUTH [4.8].

When the mail server closes the relayed connection without its goodbye (the ``221``
that answers QUIT, or its own ``421``), a mail transaction may be open and the client
would wait for an answer that never comes: the gateway answers ``421 4.4.2`` for it and
closes at once.  After the server's ``221`` or ``421`` nothing is added.
"""

from __future__ import annotations

import enum

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.proxy.core import ProxySession
from mailgw.proxy.relay import IRelayStage, IStageEnds, Sink
from mailgw.upstream import UpstreamProtocol, UpstreamTarget, client_origin
from mailgw.upstream.smtp import SMTPUpstreamLogin
from mailgw.wire import sasl, smtp
from mailgw.wire.errors import LineTooLong, ProtocolError

_MAIL_COMMANDS = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "ETRN"})


class _Auth(enum.Enum):
    NONE = 0
    PLAIN = 1  # waiting for the PLAIN response
    LOGIN_USER = 2  # waiting for the LOGIN user name
    LOGIN_PASSWORD = 3  # waiting for the LOGIN password


#: bytes of the server's side kept to see its last reply line (RFC 5321: 512 at most)
_TAIL = 512


def _unattached(data: bytes) -> None:
    raise RuntimeError("relay stage used before attach()")


@implementer(IRelayStage)
class GoodbyeWatch:
    """A relay stage that notes whether the mail server's last reply was its goodbye
    (C{221} or C{421}), keeping only the tail of what the server sent.

    The client's direction, where the messages go, is not touched: L{from_client} is
    the next stage's (or the server transport's) own method.  An inner stage (content
    inspection) sits behind it and sees the server's bytes after it."""

    name = "smtp-goodbye-watch"

    def __init__(self, inner: IRelayStage | None = None) -> None:
        self._inner = inner
        #: what the client sends goes straight on (set by L{attach})
        self.from_client: Sink = _unattached
        self._next: Sink = _unattached
        self._tail = b""

    def attach(self, ends: IStageEnds) -> None:
        if self._inner is None:
            self.from_client = ends.to_server
            self._next = ends.to_client
        else:
            self._inner.attach(ends)
            self.from_client = self._inner.from_client
            self._next = self._inner.from_server

    def from_server(self, data: bytes) -> None:
        self._tail = data[-_TAIL:] if len(data) >= _TAIL else (self._tail + data)[-_TAIL:]
        self._next(data)

    def client_writable(self, writable: bool) -> None:
        if self._inner is not None:
            self._inner.client_writable(writable)

    def server_writable(self, writable: bool) -> None:
        if self._inner is not None:
            self._inner.server_writable(writable)

    def closed(self) -> None:
        if self._inner is not None:
            self._inner.closed()

    @property
    def mid_line(self) -> bool:
        """The server's last line was cut off (no line end yet)."""
        return bool(self._tail) and not self._tail.endswith(b"\n")

    @property
    def said_goodbye(self) -> bool:
        """The last complete thing the server sent is a C{221} or C{421} reply."""
        if not self._tail.endswith(b"\n"):
            return False
        last = self._tail[:-1].rstrip(b"\r").rsplit(b"\n", 1)[-1]
        return last[:3] in (b"221", b"421") and last[3:4] in (b" ", b"")


class SMTPSession(ProxySession):
    """One SMTP client connection."""

    protocol_name = "smtp"
    # The pre-login line limit is the proxy's max_login_line (AUTH lines with an
    # initial response can be long); the other commands are held to 512 by the codec.
    upstream_class = SMTPUpstreamLogin

    _greeted = False
    #: the client's EHLO/HELO name, for XCLIENT [4.7]
    client_helo = ""
    _auth = _Auth.NONE
    _login_user = ""
    #: the relay's watch on the server's last reply (set when the relay starts)
    _goodbye: GoodbyeWatch | None = None

    @property
    def _name(self) -> str:
        return self.env.node_name

    def greet(self) -> None:
        self.write(smtp.reply(220, f"{self._name} ESMTP gateway ready"))

    def keywords(self) -> list[str]:
        """The EHLO extensions: the default server's (SIZE, PIPELINING, …) or the
        fallback while they are not known, then STARTTLS and AUTH where offered."""
        learned = self.env.smtp_extensions
        extensions = learned() if learned is not None else smtp.fallback_extensions(self.proxy.fallback_message_size)
        keywords = list(extensions)
        if self.starttls_available:
            keywords.append("STARTTLS")
        if self.login_allowed:
            keywords.append("AUTH PLAIN LOGIN")
        return keywords

    def make_upstream(self, target: UpstreamTarget, tls: IOpenSSLClientConnectionCreator | None) -> UpstreamProtocol:
        authenticate = "mailhost" in self.proxy.authentication
        origin = None
        if self.proxy.default_server.forward_client_address and self.transport is not None and self.info is not None:
            # XCLIENT [4.7]: the client's HELO name (C{client_helo}, kept from its
            # EHLO/HELO) and the name it logged in with (the MAILUSER).
            origin = client_origin(
                self.transport,
                self.info.session_id,
                helo=self.client_helo,
                login=self.info.mail_user or "",
            )
        return SMTPUpstreamLogin(target, tls, helo_name=self._name, authenticate=authenticate, origin=origin)

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
            self.client_helo = command.argument
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

    # -- relay ------------------------------------------------------------------------

    def _start_relay(
        self,
        upstream: UpstreamProtocol,
        answer: bytes,
        policy_idle: int,
        max_session_time: int,
        stage: IRelayStage | None = None,
    ) -> None:
        self._goodbye = GoodbyeWatch(stage)
        super()._start_relay(upstream, answer, policy_idle, max_session_time, self._goodbye)

    def answer_upstream_lost(self, reason: Failure) -> bytes:
        if self._goodbye is not None and self._goodbye.said_goodbye:
            return b""  # the server's 221 (QUIT) or 421 was relayed: its last words
        if reason.check(ConnectionDone) and self.info is not None:
            # A clean close is not logged by the core: say it here.
            self.log.info(
                "Session {session_id}: the mail server closed the connection without a goodbye: {reason}",
                session_id=self.info.session_id,
                protocol=self.protocol_name,
                user=self.info.user,
                upstream=self.info.upstream,
                reason="connection closed by the server",
            )
        # A reply cut off by the close is ended first: the 421 must be a line of its own.
        cut = b"\r\n" if self._goodbye is not None and self._goodbye.mid_line else b""
        return cut + smtp.reply(421, f"{self._name} Connection to the mail server lost, closing connection", "4.4.2")

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
