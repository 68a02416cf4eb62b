"""The inspecting stage of SMTP sessions [4.9]: the messages a client submits.

The mail server sees a message only once it passed: the stage answers the client's
C{DATA} with its own C{354} (once the server has answered every earlier command, and
only with a sender and a recipient accepted) and each C{BDAT} chunk but the last with
its own C{250}; it receives the message into a L{MessageCheck}; then

  - passed: C{DATA} (waiting for the server's C{354}) or C{BDAT n LAST} goes to the
    server with the message from the spool, and the server's reply to it is the
    client's;
  - withheld: the client gets C{550 5.7.1} (C{552 5.3.4} for size) naming the reason;
    temporary failure: C{451 4.7.1}; the server gets C{RSET} (its reply is not passed
    on), so it never sees the message nor the end of its data.

A C{MAIL FROM} whose C{SIZE=} is above C{max_message_size} is answered C{552} at once
and not passed on.  Replies reach the client in the order of its commands: the stage
keeps the list of what each coming server reply answers, and its own replies wait
their turn in it.  Everything else (commands, replies) relays as it is.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from mailgw.inspect.check import MessageCheck, Passed, TempFailed, Verdict
from mailgw.inspect.notice import smtp_refusal, smtp_tempfail
from mailgw.inspect.spool import Spool
from mailgw.inspect.stage import CLIENT, InspectingStage, InspectionContext, dot_stuffed, raw
from mailgw.proxy.registry import SessionInfo
from mailgw.wire import smtp
from mailgw.wire.errors import ProtocolError
from mailgw.wire.framing import (
    BdatChunk,
    MessageAborted,
    MessageData,
    MessageEnd,
    SmtpCommand,
    SmtpFramer,
    SmtpMessageStart,
    format_bdat,
)

__all__ = ["SmtpInspectingStage"]

_SIZE = re.compile(rb"[ \t]SIZE=([0-9]{1,20})(?=[ \t\r\n]|\Z)", re.IGNORECASE)
_REPLY_END = re.compile(rb"[0-9]{3}(?:[ \t]|\r?\n|\Z)")
#: the longest server reply line followed (RFC 5321: 512); longer ones relay in pieces
_MAX_REPLY_LINE = 4096

# what a coming server reply answers
_RELAY = "relay"  # a client command: the reply is the client's
_SWALLOW = "swallow"  # the gateway's RSET: not passed on
_DATA = "data"  # the gateway's DATA: 354 → the message goes; else the client's answer


@dataclass(slots=True)
class _Expect:
    kind: str
    verb: str = ""
    #: for _DATA: the passed message waiting for the server's 354
    spool: Spool | None = None


@dataclass(frozen=True, slots=True)
class _Local:
    """A reply of the gateway's, written when the replies before it are."""

    reply: bytes


class SmtpInspectingStage(InspectingStage):
    name = "smtp-inspection"

    def __init__(self, context: InspectionContext, info: SessionInfo) -> None:
        super().__init__(context, info)
        self._framer = SmtpFramer()
        self._replies = bytearray()
        self._reply: list[bytes] = []
        self._queue: deque[_Expect | _Local] = deque()
        self._busy = False
        self._data_wanted = False
        self._kind = ""
        self._mail_ok = False
        self._recipients = 0
        self._chunks = 0

    # -- the client's stream ------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self._framer.append(data)
        self._drain()

    def _drain(self) -> None:
        framer = self._framer
        while not self._busy and not self.is_closed:
            if self._data_wanted:
                if not self._answer_data():
                    return
                continue
            try:
                event = framer.next_event()
            except ProtocolError as e:
                self.end(f"inspection: {e}", smtp.reply(421, f"{self.context.node_name} {e}", "4.5.0"))
                return
            if event is None:
                return
            if isinstance(event, MessageData):
                assert self.check is not None
                self.check.feed(event.data)
            elif isinstance(event, SmtpCommand):
                self._command(event)
            elif isinstance(event, SmtpMessageStart):
                self._kind = event.kind
                self._chunks = 0
                self.new_check(CLIENT)
            elif isinstance(event, BdatChunk):
                if not event.last:
                    self._chunks += 1
                    self._say(smtp.reply(250, f"{event.size} octets received", "2.0.0"))
            elif isinstance(event, MessageEnd):
                self._busy = True
                self.judge(CLIENT, f"{self._kind} #{self._chunks}" if self._kind == "BDAT" else "DATA", self._deliver)
            elif isinstance(event, MessageAborted):
                check, self.check = self.check, None
                if check is not None:
                    check.release()

    def _command(self, command: SmtpCommand) -> None:
        verb = command.verb
        if verb == "DATA":
            self._data_wanted = True  # answered once the earlier replies are in
            return
        if verb == "MAIL":
            size = _SIZE.search(command.line)
            limit = self.context.profile.max_message_size
            if size is not None and int(size.group(1)) > limit:
                self._say(smtp.reply(552, f"Message size exceeds the limit of {limit} octets", "5.3.4"))
                return
        elif verb in ("RSET", "EHLO", "HELO"):
            self._new_transaction()
        self._queue.append(_Expect(_RELAY, verb))
        self.to_server.write(command.line)

    def _answer_data(self) -> bool:
        """Answer C{DATA} once the server answered everything before it."""
        if self._queue:
            return False
        self._data_wanted = False
        if not self._mail_ok:
            self._say(smtp.reply(503, "Bad sequence of commands: MAIL first", "5.5.1"))
            self._framer.data_reply(False)
        elif not self._recipients:
            self._say(smtp.reply(554, "No valid recipients", "5.5.1"))
            self._framer.data_reply(False)
        else:
            self._say(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            self._framer.data_reply(True)
        return True

    def _new_transaction(self) -> None:
        self._mail_ok = False
        self._recipients = 0

    # -- verdicts -----------------------------------------------------------------------

    def _deliver(self, check: MessageCheck, verdict: Verdict) -> None:
        self._new_transaction()
        if isinstance(verdict, Passed):
            if self._kind == "BDAT":
                spool = verdict.spool
                self._queue.append(_Expect(_RELAY, "BDAT"))
                self.to_server.write(format_bdat(spool.size, last=True))
                self.replay(self.to_server, spool, raw(spool), self._delivered)
            else:
                self._queue.append(_Expect(_DATA, "DATA", verdict.spool))
                self.to_server.write(b"DATA\r\n")
                # the message goes when the server's 354 comes (_server_reply)
            return
        self._say(smtp_tempfail(verdict) if isinstance(verdict, TempFailed) else smtp_refusal(verdict))
        self._queue.append(_Expect(_SWALLOW, "RSET"))
        self.to_server.write(b"RSET\r\n")
        self._delivered()

    def _delivered(self) -> None:
        self._busy = False
        self.hold(CLIENT, "verdict", False)
        self._drain()

    # -- the server's replies -----------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        buf = self._replies
        buf += data
        start = 0
        while (lf := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start : lf + 1])
            start = lf + 1
            self._reply_line(line, final=_REPLY_END.match(line) is not None)
        del buf[:start]
        if len(buf) > _MAX_REPLY_LINE:
            # No SMTP reply line is that long (RFC 5321: 512): passed on as it is.
            self._reply.append(bytes(buf))
            del buf[:]

    def _reply_line(self, line: bytes, *, final: bool) -> None:
        self._reply.append(line)
        if not final:
            return
        reply, self._reply = b"".join(self._reply), []
        head = self._queue[0] if self._queue else None
        expect: _Expect | None = None
        if isinstance(head, _Expect):
            expect = head
            self._queue.popleft()
        if expect is None:
            self.to_client.write(reply)  # unsolicited (a 421 before closing)
        elif expect.kind == _RELAY:
            positive = reply[:1] == b"2"
            if expect.verb == "MAIL" and positive:
                self._mail_ok = True
            elif expect.verb == "RCPT" and positive:
                self._recipients += 1
            self.to_client.write(reply)
        elif expect.kind == _DATA:
            spool = expect.spool
            assert spool is not None
            if reply[:3] == b"354":
                self._queue.appendleft(_Expect(_RELAY, "."))
                self.replay(self.to_server, spool, dot_stuffed(spool), self._delivered)
            else:
                spool.close()
                self.to_client.write(reply)
                self._delivered()
        self._flush_local()
        if self._data_wanted and not self._busy:
            self._drain()

    def _say(self, reply: bytes) -> None:
        """A reply of the gateway's, in its turn."""
        if self._queue:
            self._queue.append(_Local(reply))
        else:
            self.to_client.write(reply)

    def _flush_local(self) -> None:
        queue = self._queue
        while queue and isinstance(queue[0], _Local):
            local = queue.popleft()
            assert isinstance(local, _Local)
            self.to_client.write(local.reply)
