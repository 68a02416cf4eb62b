"""The POP3 login client: greeting, STLS where configured, USER/PASS.

On success the mail server's answer to PASS is what the gateway's client gets, so
the client sees the real server's "+OK Logged in." (and its response codes).
"""

from __future__ import annotations

import enum

from mailgw.upstream import UpstreamLoginRejected, UpstreamProtocol, UpstreamUnavailable
from mailgw.wire import pop3
from mailgw.wire.errors import ProtocolError


class _State(enum.Enum):
    GREETING = 1
    STLS = 2
    USER = 3
    PASS = 4


class POP3UpstreamLogin(UpstreamProtocol):
    """Logs in to a POP3 server with USER/PASS (after STLS where configured)."""

    max_line = pop3.MAX_RESPONSE_LINE
    _state = _State.GREETING

    def line_received(self, line: bytes) -> None:
        status = pop3.parse_status(line)
        if self._state is _State.GREETING:
            if not status.ok:
                self.fail(UpstreamUnavailable(f"server greeting is negative: {status.text[:100]}"))
            elif self.target.tls == "starttls":
                self._state = _State.STLS
                self.send(b"STLS")
            else:
                self._send_user()
        elif self._state is _State.STLS:
            if not status.ok:
                self.fail(UpstreamUnavailable("server refused STLS"))
                return
            self.start_tls()
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
