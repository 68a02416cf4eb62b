"""The IMAP login client: greeting, STARTTLS where configured, capabilities, ``ID``
with the real client's origin when forwarding it and the server offers ``ID`` [4.7],
then LOGIN (or AUTHENTICATE PLAIN when the server disables LOGIN).

On success the client gets the server's own tagged OK (re-tagged with the client's
tag by the proxy), carrying the server's capabilities [4.5]: when the server's OK has no
``[CAPABILITY …]`` code, the client asks for them first and adds the code itself.
"""

from __future__ import annotations

import enum
import re

from mailgw.upstream import UpstreamLoginRejected, UpstreamProtocol, UpstreamUnavailable
from mailgw.wire import forwarding, imap4
from mailgw.wire.errors import ProtocolError

_RAW_CAPABILITIES = re.compile(rb"(?:\[CAPABILITY|^\* CAPABILITY) ([^\]\r\n]*)", re.IGNORECASE)


class _State(enum.Enum):
    GREETING = 1
    STARTTLS = 2
    CAPABILITY = 3
    LOGIN = 4
    POST_CAPABILITY = 5
    ID = 6


class IMAP4UpstreamLogin(UpstreamProtocol):
    """Logs in to an IMAP server for a session."""

    max_line = imap4.MAX_RESPONSE_LINE
    _state = _State.GREETING

    def connectionMade(self) -> None:
        super().connectionMade()
        self._serial = 0
        self._tag = ""
        self._capabilities: tuple[str, ...] = ()
        self._raw_capabilities = b""
        self._chunks: list[bytes] = []
        self._ok: imap4.Response | None = None

    def release_login_state(self) -> None:
        self._capabilities = ()
        self._raw_capabilities = b""
        self._chunks = []
        self._ok = None
        super().release_login_state()

    def _command(self, text: bytes) -> None:
        self._serial += 1
        self._tag = f"mgw{self._serial}"
        self.send(self._tag.encode("ascii") + b" " + text)

    def line_received(self, line: bytes) -> None:
        response = imap4.parse_response(line)
        if response.literal is not None:
            raise ProtocolError("server sent a literal before login")
        if response.capabilities is not None:
            self._capabilities = response.capabilities
            # keep the server's own spelling to pass on (the codec upper-cases)
            raw = _RAW_CAPABILITIES.search(line)
            self._raw_capabilities = raw.group(1) if raw else " ".join(response.capabilities).encode()
        if self._state is _State.GREETING:
            self._greeting(response)
        elif response.is_continuation:
            self._continue()
        elif response.tag == "*":
            if response.status == "BYE":
                self.fail(UpstreamUnavailable(f"server said BYE: {response.text[:100]}"))
        elif response.tag != self._tag:
            raise ProtocolError("answer with an unknown tag")
        elif self._state is _State.STARTTLS:
            if not response.ok:
                self.fail(UpstreamUnavailable("server refused STARTTLS"))
                return
            self.start_tls()
            self._capabilities = ()
            self._state = _State.CAPABILITY
            self._command(b"CAPABILITY")
        elif self._state is _State.CAPABILITY:
            if not response.ok:
                self.fail(UpstreamUnavailable("server refused CAPABILITY"))
                return
            self._before_login()
        elif self._state is _State.ID:
            if not response.ok:
                self.forwarding_refused("ID", f"{response.status} {response.text}")
            self._login()
        elif self._state is _State.LOGIN:
            self._logged_in(response)
        elif self._state is _State.POST_CAPABILITY:
            assert self._ok is not None
            self.succeed(self._answer(self._ok, self._raw_capabilities))

    def _greeting(self, response: imap4.Response) -> None:
        if response.tag != "*" or response.status != "OK":
            self.fail(UpstreamUnavailable(f"unexpected server greeting: {response.status} {response.text[:100]}"))
        elif self.target.tls == "starttls":
            self._state = _State.STARTTLS
            self._command(b"STARTTLS")
        elif self._capabilities:
            self._before_login()
        else:
            self._state = _State.CAPABILITY
            self._command(b"CAPABILITY")

    def _before_login(self) -> None:
        """Tell the server who the client is, when forwarding and the server offers
        ``ID`` (RFC 2971); then log in."""
        fields = forwarding.id_fields(self.origin) if self.origin is not None else []
        if not fields or "ID" not in {c.upper() for c in self._capabilities}:
            self._login()
            return
        self._state = _State.ID
        self._serial += 1
        self._tag = f"mgw{self._serial}"
        assert self.transport is not None
        self.transport.write(forwarding.format_id(self._tag, fields))

    def _login(self) -> None:
        caps = {c.upper() for c in self._capabilities}
        self._state = _State.LOGIN
        self._serial += 1
        self._tag = f"mgw{self._serial}"
        try:
            if "LOGINDISABLED" in caps:
                if "AUTH=PLAIN" not in caps:
                    self.fail(UpstreamUnavailable("server disables LOGIN and offers no AUTH=PLAIN"))
                    return
                chunks = imap4.format_authenticate_plain(
                    self._tag, self.user, self.password, sasl_ir="SASL-IR" in caps
                )
            else:
                chunks = imap4.format_login(self._tag, self.user, self.password, literal_plus="LITERAL+" in caps)
        except ProtocolError:
            self.fail(UpstreamLoginRejected("credentials cannot be sent to an IMAP server"))
            return
        assert self.transport is not None
        self.transport.write(chunks[0])
        self._chunks = list(chunks[1:])

    def _continue(self) -> None:
        if self._state is not _State.LOGIN or not self._chunks:
            raise ProtocolError("unexpected continuation request")
        assert self.transport is not None
        self.transport.write(self._chunks.pop(0))

    def _logged_in(self, response: imap4.Response) -> None:
        if response.ok:
            if response.capabilities is not None:
                self.succeed(self._answer(response, self._raw_capabilities))
            else:
                self._ok = response
                self._state = _State.POST_CAPABILITY
                self._command(b"CAPABILITY")
        elif response.code and response.code.upper() in {"UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"}:
            self.fail(UpstreamUnavailable(f"server answered the login with NO [{response.code}]"))
        else:
            self.fail(UpstreamLoginRejected("mail server rejected the login"))

    @staticmethod
    def _answer(response: imap4.Response, capabilities: bytes) -> bytes:
        """The tagged OK's text for the client, without a tag: ``OK [CAPABILITY …] …``."""
        text = (response.text or "Logged in").encode("utf-8", "replace")
        return b"OK [CAPABILITY " + capabilities + b"] " + text + b"\r\n"
