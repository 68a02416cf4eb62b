"""The POP3 login client: greeting, STLS where configured, ``XCLIENT`` with the real
client's origin when forwarding it and the server offers it [4.7], USER/PASS.

A server offers ``XCLIENT`` the way Dovecot does, with ``[XCLIENT]`` opening its
greeting (to trusted networks only), or by listing it in its ``CAPA`` answer, which is
asked for only when forwarding and the greeting did not say.

On success the mail server's answer to PASS is what the gateway's client gets, so
the client sees the real server's "+OK Logged in." (and its response codes).
"""

from __future__ import annotations

import enum

from mailgw.upstream import UpstreamLoginRejected, UpstreamProtocol, UpstreamUnavailable
from mailgw.wire import forwarding, pop3
from mailgw.wire.errors import ProtocolError


class _State(enum.Enum):
    GREETING = 1
    STLS = 2
    USER = 3
    PASS = 4
    CAPA = 5
    CAPA_BODY = 6
    XCLIENT = 7


class POP3UpstreamLogin(UpstreamProtocol):
    """Logs in to a POP3 server with USER/PASS (after STLS where configured)."""

    max_line = pop3.MAX_RESPONSE_LINE
    _state = _State.GREETING
    #: the greeting opened with C{[XCLIENT]} (Dovecot, to a trusted network)
    _greeting_xclient = False
    _capa: pop3.MultiLineReader | None = None

    def line_received(self, line: bytes) -> None:
        if self._state is _State.CAPA_BODY:
            self._capa_line(line)
            return
        status = pop3.parse_status(line)
        if self._state is _State.GREETING:
            if not status.ok:
                self.fail(UpstreamUnavailable(f"server greeting is negative: {status.text[:100]}"))
                return
            self._greeting_xclient = status.code == "XCLIENT"
            if self.target.tls == "starttls":
                self._state = _State.STLS
                self.send(b"STLS")
            else:
                self._before_login()
        elif self._state is _State.STLS:
            if not status.ok:
                self.fail(UpstreamUnavailable("server refused STLS"))
                return
            self.start_tls()
            self._before_login()
        elif self._state is _State.CAPA:
            if not status.ok:
                self._send_user()  # no CAPA (RFC 1939 servers): nothing to forward with
                return
            self._state = _State.CAPA_BODY
            self._capa = pop3.MultiLineReader(max_lines=100)
        elif self._state is _State.XCLIENT:
            if not status.ok:
                self.forwarding_refused("XCLIENT", status.text)
            self._send_user()
        elif self._state is _State.USER:
            if not status.ok:
                self._rejected_or_unavailable(status, "USER")
                return
            self._state = _State.PASS
            self._send_credential("PASS", self.password)
        elif self._state is _State.PASS:
            if not status.ok:
                self._rejected_or_unavailable(status, "PASS")
                return
            self.succeed(line + b"\r\n")

    def _before_login(self) -> None:
        """When forwarding: XCLIENT if the greeting offered it, else ask CAPA."""
        if self.origin is None or forwarding.pop3_xclient(self.origin) is None:
            self._send_user()
        elif self._greeting_xclient:
            self._xclient()
        else:
            self._state = _State.CAPA
            self.send(b"CAPA")

    def _capa_line(self, line: bytes) -> None:
        assert self._capa is not None
        if not self._capa.feed(line):
            return
        capabilities = pop3.parse_capa(self._capa.lines)
        self._capa = None
        if "XCLIENT" in capabilities:
            self._xclient()
        else:
            self._send_user()

    def _xclient(self) -> None:
        assert self.origin is not None
        line = forwarding.pop3_xclient(self.origin)
        if line is None:
            self._send_user()
            return
        self._state = _State.XCLIENT
        self.send(line)

    def _send_user(self) -> None:
        self._state = _State.USER
        self._send_credential("USER", self.user)

    def _send_credential(self, command: str, value: str) -> None:
        try:
            line = pop3.format_command(command, value)
        except ProtocolError:
            # CR/LF/NUL, a space in USER, or over the line limit: no server would
            # accept it, and it must never reach the wire.
            self.fail(UpstreamLoginRejected(f"{command} argument cannot be sent to a POP3 server"))
            return
        assert self.transport is not None
        self.transport.write(line)

    def _rejected_or_unavailable(self, status: pop3.Status, command: str) -> None:
        code = pop3.response_code(status.text)
        if code is not None and code.upper().startswith(("SYS/TEMP", "IN-USE")):
            self.fail(UpstreamUnavailable(f"server answered {command} with [{code}]"))
        else:
            self.fail(UpstreamLoginRejected(f"mail server rejected the login ({command})"))
