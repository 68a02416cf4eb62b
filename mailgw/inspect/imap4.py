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
from mailgw.inspect.stage import SERVER, InspectionContext, ServerMessagesStage, raw
from mailgw.proxy.registry import SessionInfo
from mailgw.wire.errors import ProtocolError
from mailgw.wire.framing import ImapFramer, ImapMessageStart, Pop3MessageStart, literal_marker

__all__ = ["ImapInspectingStage"]

_UNAVAILABLE = b"NIL)\r\n* BYE [UNAVAILABLE] Message not available now: the virus scanner is unavailable\r\n"


class ImapInspectingStage(ServerMessagesStage):
    name = "imap-inspection"

    def __init__(self, context: InspectionContext, info: SessionInfo) -> None:
        super().__init__(context, info)
        self.framer = ImapFramer()
        self._start: ImapMessageStart | None = None

    def protocol_error(self, error: ProtocolError) -> None:  # the IMAP framer never fails
        self.end(f"inspection: {error}", b"* BYE [UNAVAILABLE] " + str(error).encode("ascii", "replace") + b"\r\n")

    def message_started(self, event: Pop3MessageStart | ImapMessageStart) -> str:
        assert isinstance(event, ImapMessageStart)
        self._start = event
        self.new_check(SERVER, mime=event.whole)
        return f"FETCH {event.sequence} {event.item.decode('ascii', 'replace')}"

    def deliver(self, check: MessageCheck, verdict: Verdict) -> None:
        start = self._start
        assert start is not None
        self._start = None
        if isinstance(verdict, Passed):
            spool = verdict.spool
            marker = literal_marker(spool.size, start.literal8) if spool.size != start.size else start.marker
            self.to_client.write(marker)
            self.replay(self.to_client, spool, raw(spool), self.delivered)
            return
        if isinstance(verdict, TempFailed):
            self.end(f"inspection: {verdict.text}", _UNAVAILABLE)
            return
        notice = replacement(check.head, verdict, node=self.context.node_name, size=check.size)
        self.to_client.write(literal_marker(len(notice), start.literal8) + notice)
        self.delivered()
