"""The inspecting stage of IMAP sessions [4.9]: message literals of C{FETCH} answers.

The client's stream goes to the server untouched.  In the server's, the literals that
carry a whole message (C{BODY[]}, C{BODY.PEEK[]}'s answer, C{RFC822}, C{BINARY[]}) get
every check; the other content literals (a part, a partial fetch, the header or text
alone) get the size limit and the antivirus scan (a part has no headers of its own to
walk).  A literal that passes is written with its length, the new one when parts were
stripped; a withheld one is replaced by a notice (its own literal length).  When the
message could not be checked now, the literal becomes C{NIL}, the answer is closed
and the session ends with C{* BYE [UNAVAILABLE]}: the command never completes, so the
client does not take the C{NIL} for the message and fetches it again later.
"""

from __future__ import annotations

from mailgw.inspect.check import MessageCheck, Passed, TempFailed, Verdict
from mailgw.inspect.notice import replacement
from mailgw.inspect.stage import SERVER, InspectingStage, InspectionContext, raw
from mailgw.proxy.registry import SessionInfo
from mailgw.wire.errors import ProtocolError
from mailgw.wire.framing import ImapFramer, ImapMessageStart, MessageData, MessageEnd, Relay, literal_marker

__all__ = ["ImapInspectingStage"]

_UNAVAILABLE = b"NIL)\r\n* BYE [UNAVAILABLE] Message not available now: the virus scanner is unavailable\r\n"


class ImapInspectingStage(InspectingStage):
    name = "imap-inspection"

    def __init__(self, context: InspectionContext, info: SessionInfo) -> None:
        super().__init__(context, info)
        self._framer = ImapFramer()
        self._start: ImapMessageStart | None = None
        self._busy = False

    def from_client(self, data: bytes) -> None:
        self.to_server.write(data)

    def from_server(self, data: bytes) -> None:
        self._framer.append(data)
        self._drain()

    def _drain(self) -> None:
        framer = self._framer
        while not self._busy and not self.is_closed:
            try:
                event = framer.next_event()
            except ProtocolError as e:  # the IMAP framer never fails; for safety
                self.end(f"inspection: {e}", b"* BYE [UNAVAILABLE] " + str(e).encode("ascii", "replace") + b"\r\n")
                return
            if event is None:
                return
            if isinstance(event, Relay):
                self.to_client.write(event.data)
            elif isinstance(event, MessageData):
                assert self.check is not None
                self.check.feed(event.data)
            elif isinstance(event, ImapMessageStart):
                self._start = event
                self.new_check(SERVER, mime=event.whole)
            elif isinstance(event, MessageEnd):
                self._busy = True
                start = self._start
                assert start is not None
                where = f"FETCH {start.sequence} {start.item.decode('ascii', 'replace')}"
                self.judge(SERVER, where, self._deliver)

    def _deliver(self, check: MessageCheck, verdict: Verdict) -> None:
        start = self._start
        assert start is not None
        self._start = None
        if isinstance(verdict, Passed):
            spool = verdict.spool
            marker = literal_marker(spool.size, start.literal8) if spool.size != start.size else start.marker
            self.to_client.write(marker)
            self.replay(self.to_client, spool, raw(spool), self._delivered)
            return
        if isinstance(verdict, TempFailed):
            self.end(f"inspection: {verdict.text}", _UNAVAILABLE)
            return
        notice = replacement(check.head, verdict, node=self.context.node_name, size=check.size)
        self.to_client.write(literal_marker(len(notice), start.literal8) + notice)
        self._delivered()

    def _delivered(self) -> None:
        self._busy = False
        self.hold(SERVER, "verdict", False)
        self._drain()
