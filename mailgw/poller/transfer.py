"""Streaming one message from POP3 to SMTP (SPEC [6] steps 2-3).

L{MessageTransfer} consumes a RETR answer: it reads the header block (and a multipart
preamble), pauses the POP3 connection while the caller decides, then either throws
the rest away or relays it to the SMTP connection as it arrives, the SMTP
transport's buffer pausing the POP3 socket.  L{_Watchdog} drops an SMTP connection
that stops taking the message during DATA.
"""

from __future__ import annotations

import enum

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mailgw.poller import message as msg
from mailgw.poller.pop3 import ReadGate
from mailgw.poller.smtp import SmtpClient, SmtpError
from mailgw.wire.lines import LineBuffer, TooLong

__all__ = ["MessageTransfer"]


class _Phase(enum.Enum):
    HEADERS = 1
    PREAMBLE = 2
    WAIT = 3
    RELAY = 4
    DISCARD = 5
    DONE = 6


class MessageTransfer:
    """Carries one message from a RETR answer to an SMTP DATA (a
    L{mailgw.poller.pop3.RetrConsumer}).

    L{decided} fires once the header block (and a multipart preamble) is read: with
    the L{msg.HeaderBlock}, with a L{msg.MalformedMessage} (the rest is then read and
    thrown away), or with the exception that broke the POP3 connection.  Reading is
    paused at that point; the caller either L{discard}s the message or calls
    L{start_relay}.  L{finished} fires when the RETR answer ended (and everything was
    written), with C{None} or the exception that broke a connection.
    """

    def __init__(self, gate: ReadGate) -> None:
        self._gate = gate
        self._phase = _Phase.HEADERS
        self._lines = LineBuffer(msg.MAX_HEADER_LINE)
        self._header_lines: list[bytes] = []
        self._header_size = 0
        self._headers: msg.HeaderBlock | None = None
        self._boundary = b""
        self._preamble: list[bytes] = []
        self._preamble_size = 0
        self._pending: list[bytes] = []
        self._ended = False
        self._smtp: SmtpClient | None = None
        #: set when the SMTP connection broke during the relay
        self.smtp_error: SmtpError | None = None
        #: bytes written to SMTP (for tests and logs)
        self.relayed = 0
        self.decided: defer.Deferred[msg.HeaderBlock | msg.MalformedMessage | Exception] = defer.Deferred()
        self.finished: defer.Deferred[Exception | None] = defer.Deferred()

    # -- RetrConsumer ------------------------------------------------------------------------

    def payload(self, data: bytes) -> None:
        phase = self._phase
        if phase is _Phase.RELAY:
            assert self._smtp is not None
            self._smtp.write(data)
            self.relayed += len(data)
        elif phase is _Phase.WAIT:
            self._pending.append(data)
        elif phase in (_Phase.HEADERS, _Phase.PREAMBLE):
            self._lines.append(data)
            self._read_lines()

    def end(self) -> None:
        self._ended = True
        phase = self._phase
        if phase is _Phase.HEADERS:
            rest = self._lines.pending()
            if rest:  # cannot happen on the wire: the terminator starts a line
                self._header_lines.append(rest)
            if not self._header_lines:
                self._malformed(msg.MalformedMessage("no_headers", "empty message"))
            else:
                self._end_of_headers(complete=True)
        elif phase is _Phase.PREAMBLE:
            self._malformed(
                msg.MalformedMessage("broken_mime", "broken MIME structure: the multipart boundary never appears")
            )
        elif phase in (_Phase.RELAY, _Phase.DISCARD):
            self._finish(None)

    def failed(self, reason: Exception) -> None:
        self._phase = _Phase.DONE
        self._stop_relay()
        if not self.decided.called:
            self.decided.callback(reason)
        if not self.finished.called:
            self.finished.callback(reason)

    # -- the caller's decisions ----------------------------------------------------------------

    def discard(self) -> None:
        """Do not deliver: read the rest of the message and throw it away."""
        if self._phase is _Phase.DONE:
            return
        self._pending = []
        self._stop_relay()
        self._phase = _Phase.DISCARD
        self._gate.resume("decide")
        if self._ended:
            self._finish(None)

    def start_relay(self, smtp: SmtpClient, prefix: bytes) -> None:
        """DATA was accepted: write C{prefix} (the trace header), the header block, the
        preamble read so far, and from now on the message as it arrives."""
        if self._phase is _Phase.DONE:
            return
        self._smtp = smtp
        self._phase = _Phase.RELAY
        head = prefix + msg.join_lines(self._header_lines) + msg.join_lines(self._preamble)
        head += b"".join(self._pending)
        self._pending = []
        self._header_lines = []
        self._preamble = []
        smtp.write(head)
        self.relayed += len(head)
        smtp.closed.addCallback(self._smtp_closed, smtp)
        if self._ended:
            self._finish(None)
            return
        smtp.register_producer(self._gate)
        self._gate.resume("decide")

    # -- internals ---------------------------------------------------------------------------

    def _read_lines(self) -> None:
        while self._phase in (_Phase.HEADERS, _Phase.PREAMBLE):
            line = self._lines.next_line()
            if line is None:
                return
            if self._phase is _Phase.HEADERS:
                self._header_line(line)
            else:
                self._preamble_line(line)

    def _header_line(self, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            self._malformed(msg.MalformedMessage("header_too_long", "header line longer than 64 KiB"))
            return
        self._header_size += len(line) + 2
        if self._header_size > msg.MAX_HEADER_BLOCK:
            self._malformed(msg.MalformedMessage("header_too_large", "header block larger than 256 KiB"))
            return
        self._header_lines.append(line)
        if line == b"":
            self._end_of_headers(complete=False)
            return
        try:
            msg.check_header_line(msg.unstuff(line), first=len(self._header_lines) == 1)
        except msg.MalformedMessage as e:
            self._malformed(e)

    def _end_of_headers(self, *, complete: bool) -> None:
        lines = self._header_lines[:-1] if self._header_lines[-1:] == [b""] else self._header_lines
        try:
            headers = msg.parse_header_block([msg.unstuff(line) for line in lines])
            boundary = msg.multipart_boundary(headers)
        except msg.MalformedMessage as e:
            self._malformed(e)
            return
        self._headers = headers
        if boundary is not None:
            if complete:
                self._malformed(
                    msg.MalformedMessage("broken_mime", "broken MIME structure: multipart message without a body")
                )
                return
            self._boundary = boundary
            self._phase = _Phase.PREAMBLE
            return
        self._decide(headers)

    def _preamble_line(self, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            self._malformed(
                msg.MalformedMessage("broken_mime", "broken MIME structure: no multipart boundary in the first 64 KiB")
            )
            return
        self._preamble.append(line)
        self._preamble_size += len(line) + 2
        if msg.is_boundary_line(msg.unstuff(line), self._boundary):
            assert self._headers is not None
            self._decide(self._headers)
        elif self._preamble_size > msg.MAX_PREAMBLE:
            self._malformed(
                msg.MalformedMessage("broken_mime", "broken MIME structure: no multipart boundary in the first 64 KiB")
            )

    def _decide(self, headers: msg.HeaderBlock) -> None:
        self._phase = _Phase.WAIT
        rest = self._lines.take_rest()
        if rest:
            self._pending.append(rest)
        if not self._ended:
            self._gate.pause("decide")
        self.decided.callback(headers)

    def _malformed(self, error: msg.MalformedMessage) -> None:
        self._phase = _Phase.DISCARD
        self._lines.clear()
        self._header_lines = []
        self._preamble = []
        if not self.decided.called:
            self.decided.callback(error)
        if self._ended:
            self._finish(None)

    def _smtp_closed(self, _: object, smtp: SmtpClient) -> None:
        if self._smtp is smtp and self._phase is _Phase.RELAY:
            self.smtp_error = SmtpError("the SMTP connection broke during DATA")
            self._stop_relay()
            self._phase = _Phase.DISCARD
            if self._ended:
                self._finish(None)

    def _stop_relay(self) -> None:
        if self._smtp is not None:
            self._smtp.unregister_producer()
        self._gate.resume("smtp")

    def _finish(self, result: Exception | None) -> None:
        self._stop_relay()
        self._gate.resume("decide")
        self._phase = _Phase.DONE
        if not self.finished.called:
            self.finished.callback(result)


class _Watchdog:
    """Drops the SMTP connection when the relay of a message makes no progress for
    C{timeout} seconds (an SMTP server that stops reading during DATA; a silent POP3
    server is caught earlier by the POP3 session's own time limit)."""

    def __init__(self, clock: IReactorTime, timeout: float, transfer: MessageTransfer, smtp: SmtpClient) -> None:
        self._clock = clock
        self._timeout = timeout
        self._transfer = transfer
        self._smtp = smtp
        self._last = transfer.relayed
        self._call: IDelayedCall | None = clock.callLater(timeout, self._check)

    def _check(self) -> None:
        self._call = None
        if self._transfer.relayed == self._last:
            self._smtp.abort(f"no progress during DATA for {self._timeout:g} s")
            return
        self._last = self._transfer.relayed
        self._call = self._clock.callLater(self._timeout, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
