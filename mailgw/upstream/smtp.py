"""The SMTP session set-up upstream: greeting, EHLO, STARTTLS where configured (and
EHLO again), ``XCLIENT`` with the real client's origin when forwarding it and the
server offers it [4.7] (then EHLO again, with the client's HELO name), then AUTH PLAIN
with the MAILUSER/MAILPASS when ``mailhost`` is among the proxy's methods [4.3];
without it the gateway relays unauthenticated (the mail server trusts the gateway,
e.g. by its network or XCLIENT)."""

from __future__ import annotations

import enum

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from mailgw.upstream import UpstreamLoginRejected, UpstreamProtocol, UpstreamTarget, UpstreamUnavailable
from mailgw.wire import forwarding, smtp
from mailgw.wire.errors import ProtocolError
from mailgw.wire.forwarding import ClientOrigin


class _State(enum.Enum):
    GREETING = 1
    EHLO = 2
    STARTTLS = 3
    EHLO_TLS = 4
    AUTH = 5
    XCLIENT = 6
    EHLO_XCLIENT = 7


class SMTPUpstreamLogin(UpstreamProtocol):
    """Sets up the upstream SMTP session of a gateway session."""

    max_line = smtp.MAX_REPLY_LINE
    _state = _State.GREETING

    def __init__(
        self,
        target: UpstreamTarget,
        tls_options: IOpenSSLClientConnectionCreator | None,
        *,
        helo_name: str = "mailgw",
        authenticate: bool = True,
        origin: ClientOrigin | None = None,
    ) -> None:
        super().__init__(target, tls_options, origin=origin)
        self.helo_name = helo_name
        self.authenticate = authenticate
        self._replies = smtp.ReplyReader()
        self.keywords: dict[str, tuple[str, ...]] = {}
        #: XCLIENT commands still to send (a long one is split, as Dovecot does)
        self._xclient: list[bytes] = []
        self._xclient_accepted = False

    def line_received(self, line: bytes) -> None:
        reply = self._replies.feed(line)
        if reply is None:
            return
        if self._state is _State.GREETING:
            if reply.code != 220:
                self.fail(UpstreamUnavailable(f"server greeting {reply.code}"))
                return
            self._ehlo(_State.EHLO)
        elif self._state in (_State.EHLO, _State.EHLO_TLS, _State.EHLO_XCLIENT):
            if reply.code != 250:
                self.fail(UpstreamUnavailable(f"server answered EHLO with {reply.code}"))
                return
            self.keywords = smtp.parse_ehlo_keywords(reply)
            if self._state is _State.EHLO and self.target.tls == "starttls":
                self._state = _State.STARTTLS
                self.send(b"STARTTLS")
            elif self._state is not _State.EHLO_XCLIENT and self._start_xclient():
                return
            else:
                self._authenticate()
        elif self._state is _State.STARTTLS:
            if reply.code != 220:
                self.fail(UpstreamUnavailable(f"server answered STARTTLS with {reply.code}"))
                return
            self.start_tls()
            self._ehlo(_State.EHLO_TLS)
        elif self._state is _State.XCLIENT:
            self._xclient_answered(reply)
        elif self._state is _State.AUTH:
            if reply.code == 235:
                self.succeed(b"")
            elif reply.transient:
                self.fail(UpstreamUnavailable(f"server answered AUTH with {reply.code}"))
            else:
                self.fail(UpstreamLoginRejected(f"mail server rejected the login ({reply.code})"))

    def _ehlo(self, state: _State, name: str | None = None) -> None:
        self._state = state
        self.send(b"EHLO " + (name or self.helo_name).encode("ascii", "replace"))

    def _start_xclient(self) -> bool:
        """Send the first XCLIENT command when forwarding and the server offers it;
        whether one was sent."""
        if self.origin is None or "XCLIENT" not in self.keywords:
            return False
        self._xclient = forwarding.smtp_xclient(
            self.origin, self.keywords["XCLIENT"], login=not self.authenticate
        )
        if not self._xclient:
            return False
        self._state = _State.XCLIENT
        self.send(self._xclient.pop(0))
        return True

    def _xclient_answered(self, reply: smtp.Reply) -> None:
        # Postfix and Dovecot answer XCLIENT with a new greeting (220): the session
        # starts again, with EHLO, as the client's HELO name where it has a valid one.
        assert self.origin is not None
        if reply.code != 220:
            self._xclient = []
            self.forwarding_refused("XCLIENT", f"{reply.code} {reply.text}")
            if self._xclient_accepted:
                self._ehlo(_State.EHLO_XCLIENT, forwarding.valid_helo(self.origin.helo))
            else:
                self._authenticate()
            return
        self._xclient_accepted = True
        if self._xclient:
            self.send(self._xclient.pop(0))
        else:
            self._ehlo(_State.EHLO_XCLIENT, forwarding.valid_helo(self.origin.helo))

    def _authenticate(self) -> None:
        if not self.authenticate:
            self.succeed(b"")
            return
        if "PLAIN" not in {m.upper() for m in self.keywords.get("AUTH", ())}:
            self.fail(UpstreamUnavailable("server offers no AUTH PLAIN"))
            return
        try:
            line = smtp.format_auth_plain(self.user, self.password)
        except (ProtocolError, ValueError):
            self.fail(UpstreamLoginRejected("credentials cannot be sent with AUTH PLAIN"))
            return
        self._state = _State.AUTH
        assert self.transport is not None
        self.transport.write(line)
