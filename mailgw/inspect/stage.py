"""What the inspecting relay stages share [4.9]: holding a side, writing with flow
control, and the context (profile, scanner, spool, log, metrics) of a session.

A stage handles one direction's messages in order: while a message's verdict is
pending, and while a passed message is replayed from its spool, it reads nothing more
from the side the messages come from (L{InspectingStage.hold}); what arrives anyway
waits in the framer.  A replay writes one chunk at a time and only while the receiving
side's buffer has room (L{Output}), so a 25 MB message is never in memory at once.
"""

from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.config import InspectionProfile
from mailgw.inspect.check import MessageCheck, Verdict
from mailgw.inspect.clamd import ClamdClient
from mailgw.inspect.notice import padding_lines
from mailgw.inspect.spool import Spool
from mailgw.proxy.registry import SessionInfo
from mailgw.proxy.relay import IRelayStage, IStageEnds, Sink
from mailgw.wire.errors import ProtocolError
from mailgw.wire.framing import (
    DotStuffer,
    ImapFramer,
    ImapMessageStart,
    MessageData,
    MessageEnd,
    Pop3Framer,
    Pop3MessageStart,
    Relay,
)

__all__ = [
    "CLIENT",
    "SERVER",
    "InspectingStage",
    "InspectionContext",
    "Output",
    "ServerMessagesStage",
    "dot_stuffed",
    "raw",
]

CLIENT, SERVER = "client", "server"

#: octets a replay writes at a time
CHUNK = 65536


class InspectionContext(typing.Protocol):
    """What a stage needs from the gateway's inspection service."""

    profile: InspectionProfile
    scanner: ClamdClient | None
    spool_folder: Path
    clock: IReactorTime
    node_name: str

    def record(self, info: SessionInfo, message: MessageCheck, verdict: Verdict, where: str) -> None:
        """Log and count a verdict (C{where} names the message: C{RETR 3}, C{FETCH 7}...)."""


class Output:
    """Writes toward one side: small writes at once, a stream one chunk at a time while
    the side can take more (L{writable}).  L{busy} while a stream is being written."""

    __slots__ = ("_done", "_pumping", "_source", "_write", "writable")

    def __init__(self, write: Sink) -> None:
        self._write = write
        self.writable = True
        self._source: Iterator[bytes] | None = None
        self._done: Callable[[], None] | None = None
        self._pumping = False

    @property
    def busy(self) -> bool:
        return self._source is not None

    def write(self, data: bytes) -> None:
        if data:
            self._write(data)

    def retarget(self, write: Sink) -> None:
        self._write = write

    def stream(self, chunks: Iterator[bytes], done: Callable[[], None]) -> None:
        """Write C{chunks} as the side takes them, then call C{done}."""
        if self._source is not None:
            raise RuntimeError("a stream is already being written")
        self._source = chunks
        self._done = done
        self.pump()

    def set_writable(self, writable: bool) -> None:
        self.writable = writable
        if writable:
            self.pump()

    def pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self.writable and self._source is not None:
                piece = next(self._source, None)
                if piece is None:
                    self._source = None
                    done, self._done = self._done, None
                    if done is not None:
                        done()
                    break
                if piece:
                    self._write(piece)
        finally:
            self._pumping = False

    def drop(self) -> None:
        """Stop the stream (the session ended)."""
        self._source = None
        self._done = None


def dot_stuffed(spool: Spool, padding: int = 0) -> Iterator[bytes]:
    """The spooled message dot-stuffed, padded with C{padding} octets of space lines
    (where at least two are missing), and its terminator."""
    stuffer = DotStuffer()
    for piece in spool.chunks(CHUNK):
        yield stuffer.stuff(piece)
    if padding >= 2:
        yield stuffer.stuff(padding_lines(padding))
    yield stuffer.end()


def raw(spool: Spool) -> Iterator[bytes]:
    """The spooled octets as they are."""
    yield from spool.chunks(CHUNK)


@implementer(IPushProducer)
class _Holder:
    """Holds one side for one reason while paused (e.g. clamd cannot keep up)."""

    __slots__ = ("_reason", "_side", "_stage")

    def __init__(self, stage: InspectingStage, side: str, reason: str) -> None:
        self._stage, self._side, self._reason = stage, side, reason

    def pauseProducing(self) -> None:
        self._stage.hold(self._side, self._reason, True)

    def resumeProducing(self) -> None:
        self._stage.hold(self._side, self._reason, False)

    def stopProducing(self) -> None:
        pass


@implementer(IRelayStage)
class InspectingStage(ABC):
    """The shared part of the POP3, IMAP and SMTP stages."""

    name = "inspection"
    log = Logger()

    def __init__(self, context: InspectionContext, info: SessionInfo) -> None:
        self.context = context
        self.info = info
        self.ends: IStageEnds | None = None
        self.is_closed = False
        self._holds: dict[str, set[str]] = {CLIENT: set(), SERVER: set()}
        self.to_client = Output(_unattached)
        self.to_server = Output(_unattached)
        #: the message being received or judged
        self.check: MessageCheck | None = None
        #: the spool being replayed
        self.replaying: Spool | None = None

    # -- IRelayStage -------------------------------------------------------------------

    def attach(self, ends: IStageEnds) -> None:
        self.ends = ends
        self.to_client.retarget(ends.to_client)
        self.to_server.retarget(ends.to_server)

    @abstractmethod
    def from_client(self, data: bytes) -> None: ...

    @abstractmethod
    def from_server(self, data: bytes) -> None: ...

    def client_writable(self, writable: bool) -> None:
        self.to_client.set_writable(writable)

    def server_writable(self, writable: bool) -> None:
        self.to_server.set_writable(writable)

    def closed(self) -> None:
        self.is_closed = True
        self.to_client.drop()
        self.to_server.drop()
        check, self.check = self.check, None
        if check is not None:
            check.release()
        spool, self.replaying = self.replaying, None
        if spool is not None:
            spool.close()

    # -- for the protocol stages --------------------------------------------------------

    def hold(self, side: str, reason: str, held: bool) -> None:
        """Hold C{side} for C{reason} (or let it go): it is read only when nobody holds it."""
        reasons = self._holds[side]
        before = bool(reasons)
        if held:
            reasons.add(reason)
        else:
            reasons.discard(reason)
        after = bool(reasons)
        if before != after and self.ends is not None and not self.is_closed:
            if side == CLIENT:
                self.ends.hold_client(after)
            else:
                self.ends.hold_server(after)

    def new_check(self, source: str, *, mime: bool = True) -> MessageCheck:
        """A check for a message that comes from C{source}, which is paused while
        clamd cannot keep up."""
        context = self.context
        check = MessageCheck(context.profile, context.scanner, context.spool_folder, context.clock, mime=mime)
        check.registerProducer(_Holder(self, source, "scanner"))
        self.check = check
        return check

    def judge(self, source: str, where: str, then: Callable[[MessageCheck, Verdict], None]) -> None:
        """The current message has ended: hold C{source} until C{then} had the verdict
        (and its log and count)."""
        check = self.check
        assert check is not None
        self.hold(source, "verdict", True)

        def judged(verdict: Verdict) -> None:
            self.check = None
            if self.is_closed:
                _release(verdict)
                return
            self.context.record(self.info, check, verdict, where)
            then(check, verdict)

        def failed(reason: Failure) -> None:
            if reason.check(CancelledError) or self.is_closed:
                return
            self.log.failure("Session {session_id}: inspection failed", reason, session_id=self.info.session_id)
            self.end("inspection failed", b"")

        check.finish().addCallback(judged).addErrback(failed)

    def replay(self, output: Output, spool: Spool, chunks: Iterator[bytes], done: Callable[[], None]) -> None:
        """Write a passed message from its spool, then close it and call C{done}."""
        self.replaying = spool

        def finished() -> None:
            self.replaying = None
            spool.close()
            done()

        output.stream(chunks, finished)

    def end(self, reason: str, goodbye: bytes) -> None:
        if self.ends is not None and not self.is_closed:
            self.ends.end(reason, goodbye)


class ServerMessagesStage(InspectingStage):
    """A stage for messages the server sends (POP3, IMAP): the client's stream goes
    to the server (L{commands} sees it first), the server's through a framer whose
    messages are judged one after the other; what follows a message waits for it."""

    framer: Pop3Framer | ImapFramer

    def __init__(self, context: InspectionContext, info: SessionInfo) -> None:
        super().__init__(context, info)
        self._busy = False
        self._where = ""

    def commands(self, data: bytes) -> bool:
        """The client's bytes, before they go to the server; C{False} to stop them."""
        return True

    def from_client(self, data: bytes) -> None:
        if self.commands(data):
            self.to_server.write(data)

    def from_server(self, data: bytes) -> None:
        self.framer.append(data)
        self.drain()

    @abstractmethod
    def protocol_error(self, error: ProtocolError) -> None:
        """The server's stream cannot be framed: end the session."""

    @abstractmethod
    def message_started(self, event: Pop3MessageStart | ImapMessageStart) -> str:
        """A message starts: make its check; returns the name it has in the log."""

    @abstractmethod
    def deliver(self, check: MessageCheck, verdict: Verdict) -> None:
        """Write the message (or what stands for it), then call L{delivered}."""

    def drain(self) -> None:
        framer = self.framer
        while not self._busy and not self.is_closed:
            try:
                event = framer.next_event()
            except ProtocolError as e:
                self.protocol_error(e)
                return
            if event is None:
                return
            if isinstance(event, Relay):
                self.to_client.write(event.data)
            elif isinstance(event, MessageData):
                assert self.check is not None
                self.check.feed(event.data)
            elif isinstance(event, MessageEnd):
                self._busy = True
                self.judge(SERVER, self._where, self.deliver)
            else:
                self._where = self.message_started(event)

    def delivered(self) -> None:
        self._busy = False
        self.hold(SERVER, "verdict", False)
        self.drain()


def _release(verdict: Verdict) -> None:
    spool = getattr(verdict, "spool", None)
    if isinstance(spool, Spool):
        spool.close()


def _unattached(data: bytes) -> None:
    raise RuntimeError("relay stage used before attach()")
