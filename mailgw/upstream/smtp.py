"""The SMTP session set-up upstream: greeting, EHLO, STARTTLS where configured (and
EHLO again), then AUTH PLAIN with the MAILUSER/MAILPASS when ``mailhost`` is among the
proxy's methods [4.3]; without it the gateway relays unauthenticated (the mail server
trusts the gateway, e.g. by its network or XCLIENT)."""

from __future__ import annotations

import enum

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from mailgw.upstream import UpstreamLoginRejected, UpstreamProtocol, UpstreamTarget, UpstreamUnavailable
from mailgw.wire import smtp
from mailgw.wire.errors import ProtocolError


class _State(enum.Enum):
    GREETING = 1
    EHLO = 2
    STARTTLS = 3
    EHLO_TLS = 4
    AUTH = 5


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
    ) -> None:
        super().__init__(target, tls_options)
        self.helo_name = helo_name
        self.authenticate = authenticate
        self._replies = smtp.ReplyReader()
        self.keywords: dict[str, tuple[str, ...]] = {}

    def line_received(self, line: bytes) -> None:
        reply = self._replies.feed(line)
        if reply is None:
            return
        if self._state is _State.GREETING:
            if reply.code != 220:
                self.fail(UpstreamUnavailable(f"server greeting {reply.code}"))
                return
            self._ehlo(_State.EHLO)
        elif self._state in (_State.EHLO, _State.EHLO_TLS):
            if reply.code != 250:
                self.fail(UpstreamUnavailable(f"server answered EHLO with {reply.code}"))
                return
            self.keywords = smtp.parse_ehlo_keywords(reply)
            if self._state is _State.EHLO and self.target.tls == "starttls":
                self._state = _State.STARTTLS
                self.send(b"STARTTLS")
            else:
                self._authenticate()
        elif self._state is _State.STARTTLS:
            if reply.code != 220:
                self.fail(UpstreamUnavailable(f"server answered STARTTLS with {reply.code}"))
                return
            self.start_tls()
            self._ehlo(_State.EHLO_TLS)
        elif self._state is _State.AUTH:
            if reply.code == 235:
                self.succeed(b"")
            elif reply.transient:
                self.fail(UpstreamUnavailable(f"server answered AUTH with {reply.code}"))
            else:
                self.fail(UpstreamLoginRejected(f"mail server rejected the login ({reply.code})"))

    def _ehlo(self, state: _State) -> None:
        self._state = state
        self.send(b"EHLO " + self.helo_name.encode("ascii", "replace"))

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
