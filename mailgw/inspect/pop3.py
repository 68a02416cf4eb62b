"""The inspecting stage of POP3 sessions [4.9]: the answers to C{RETR} and C{TOP}.

The client's commands go to the server as they come (and to the framer, which pairs
answers with commands).  The server's answers pass as they come, except messages: a
message is received into a L{MessageCheck} and, once judged, the client gets it (from
the spool, dot-stuffed again; stripped parts replaced, padded back to the original's
size for C{RETR} so that C{LIST} still holds), or a replacement notice saying why it
was withheld, or C{-ERR [SYS/TEMP]} when it could not be checked now.
"""

from __future__ import annotations

from mailgw.inspect.check import MessageCheck, Passed, TempFailed, Verdict
from mailgw.inspect.notice import pad, replacement
from mailgw.inspect.stage import SERVER, InspectionContext, ServerMessagesStage, dot_stuffed
from mailgw.proxy.registry import SessionInfo
from mailgw.wire.errors import ProtocolError
from mailgw.wire.framing import ImapMessageStart, Pop3Framer, Pop3MessageStart, dot_stuff

__all__ = ["Pop3InspectingStage"]


class Pop3InspectingStage(ServerMessagesStage):
    name = "pop3-inspection"

    def __init__(self, context: InspectionContext, info: SessionInfo) -> None:
        super().__init__(context, info)
        self.framer = self._pop3 = Pop3Framer()
        self._start: Pop3MessageStart | None = None

    def commands(self, data: bytes) -> bool:
        try:
            self._pop3.feed_commands(data)
        except ProtocolError as e:
            self.protocol_error(e)
            return False
        return True

    def protocol_error(self, error: ProtocolError) -> None:
        self.end(f"inspection: {error}", b"-ERR [SYS/TEMP] " + str(error).encode("ascii", "replace") + b"\r\n")

    def message_started(self, event: Pop3MessageStart | ImapMessageStart) -> str:
        assert isinstance(event, Pop3MessageStart)
        self._start = event
        self.new_check(SERVER)
        return " ".join((event.command, *event.arguments))

    def deliver(self, check: MessageCheck, verdict: Verdict) -> None:
        start = self._start
        assert start is not None
        self._start = None
        if isinstance(verdict, Passed):
            padding = check.size - verdict.spool.size if verdict.changed and start.command == "RETR" else 0
            self.to_client.write(start.status)
            self.replay(self.to_client, verdict.spool, dot_stuffed(verdict.spool, padding), self.delivered)
            return
        if isinstance(verdict, TempFailed):
            self.to_client.write(b"-ERR [SYS/TEMP] Message not available now: the virus scanner is unavailable\r\n")
        else:
            notice = replacement(check.head, verdict, node=self.context.node_name, size=check.size)
            if start.command == "RETR":
                notice = pad(notice, check.size)
            self.to_client.write(start.status + dot_stuff(notice))
        self.delivered()
