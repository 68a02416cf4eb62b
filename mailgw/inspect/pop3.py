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
from mailgw.inspect.stage import SERVER, InspectingStage, InspectionContext, dot_stuffed
from mailgw.proxy.registry import SessionInfo
from mailgw.wire.errors import ProtocolError
from mailgw.wire.framing import MessageData, MessageEnd, Pop3Framer, Pop3MessageStart, Relay, dot_stuff

__all__ = ["Pop3InspectingStage"]


class Pop3InspectingStage(InspectingStage):
    name = "pop3-inspection"

    def __init__(self, context: InspectionContext, info: SessionInfo) -> None:
        super().__init__(context, info)
        self._framer = Pop3Framer()
        self._start: Pop3MessageStart | None = None
        self._busy = False

    def from_client(self, data: bytes) -> None:
        try:
            self._framer.feed_commands(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        self.to_server.write(data)

    def from_server(self, data: bytes) -> None:
        self._framer.append(data)
        self._drain()

    def _protocol_error(self, error: ProtocolError) -> None:
        self.end(f"inspection: {error}", b"-ERR [SYS/TEMP] " + str(error).encode("ascii", "replace") + b"\r\n")

    def _drain(self) -> None:
        framer = self._framer
        while not self._busy and not self.is_closed:
            try:
                event = framer.next_event()
            except ProtocolError as e:
                self._protocol_error(e)
                return
            if event is None:
                return
            if isinstance(event, Relay):
                self.to_client.write(event.data)
            elif isinstance(event, MessageData):
                assert self.check is not None
                self.check.feed(event.data)
            elif isinstance(event, Pop3MessageStart):
                self._start = event
                self.new_check(SERVER)
            elif isinstance(event, MessageEnd):
                self._busy = True
                start = self._start
                assert start is not None
                self.judge(SERVER, " ".join((start.command, *start.arguments)), self._deliver)

    def _deliver(self, check: MessageCheck, verdict: Verdict) -> None:
        start = self._start
        assert start is not None
        self._start = None
        if isinstance(verdict, Passed):
            padding = check.size - verdict.spool.size if verdict.changed and start.command == "RETR" else 0
            self.to_client.write(start.status)
            self.replay(self.to_client, verdict.spool, dot_stuffed(verdict.spool, padding), self._delivered)
            return
        if isinstance(verdict, TempFailed):
            self.to_client.write(b"-ERR [SYS/TEMP] Message not available now: the virus scanner is unavailable\r\n")
        else:
            notice = replacement(check.head, verdict, node=self.context.node_name, size=check.size)
            if start.command == "RETR":
                notice = pad(notice, check.size)
            self.to_client.write(start.status + dot_stuff(notice))
        self._delivered()

    def _delivered(self) -> None:
        self._busy = False
        self.hold(SERVER, "verdict", False)
        self._drain()
