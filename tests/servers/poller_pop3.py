"""A scripted POP3 server in the test's reactor, for what Dovecot never does: malformed
UIDL lines, no PIPELINING, no UIDL at all.

::

    server = await FakePop3Server.listening(self, [message1, message2],
                                            uidl_lines=[b"1 abc", b"2 bad uidl with spaces"])
    ... account on 127.0.0.1:server.port, tls "none" ...
    server.deleted      # message numbers deleted by a QUIT

It speaks USER/PASS (any password but ``wrong``), CAPA, STAT, UIDL, LIST, RETR (with
dot-stuffing), DELE, RSET, NOOP and QUIT (which applies the deletions).  Every command
line is kept in :attr:`FakePop3Server.commands`.  With ``dele_delay`` it answers each
DELE late, and counts in :attr:`FakePop3Server.overlapped` the commands a client sent
before reading that answer (a pipelining client does; one that waits does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.trial.unittest import TestCase

__all__ = ["FakePop3Server"]


class _Pop3(LineOnlyReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1024
    factory: FakePop3Server

    def connectionMade(self) -> None:
        self.pending: set[int] = set()
        self.backlog: list[bytes] | None = None
        self.user = ""
        self.logged_in = False
        self.sendLine(b"+OK fake POP3 ready")

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connection_closed()

    def lineReceived(self, line: bytes) -> None:
        server = self.factory
        if self.backlog is not None:
            # A DELE's answer is still held: the client sent this before reading it.
            server.overlapped += 1
            self.backlog.append(line)
            return
        self.answer(line)

    def release(self) -> None:
        """Send the held DELE answer, then answer what arrived meanwhile, in order."""
        backlog, self.backlog = self.backlog or [], None
        self.sendLine(b"+OK deleted")
        while backlog and self.backlog is None:
            self.answer(backlog.pop(0))
        if self.backlog is not None:
            self.backlog[:0] = backlog

    def answer(self, line: bytes) -> None:
        server = self.factory
        server.commands.append(line)
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        messages = server.messages
        if verb == b"CAPA":
            self.multi(b"+OK capabilities", [b"USER", b"UIDL", b"TOP", *server.extra_capabilities])
        elif verb == b"USER":
            self.user = argument.decode()
            self.sendLine(b"+OK")
        elif verb == b"PASS":
            if argument == b"wrong" or not self.user:
                self.sendLine(b"-ERR [AUTH] invalid login")
            else:
                self.logged_in = True
                self.sendLine(b"+OK logged in")
        elif not self.logged_in and verb != b"QUIT":
            self.sendLine(b"-ERR log in first")
        elif verb == b"STAT":
            self.sendLine(b"+OK %d %d" % (len(messages), sum(len(m) for m in messages)))
        elif verb == b"UIDL":
            if server.uidl_lines is None and not server.supports_uidl:
                self.sendLine(b"-ERR UIDL not supported")
            else:
                lines = server.uidl_lines
                if lines is None:
                    lines = [b"%d uid-%d" % (n, n) for n in range(1, len(messages) + 1)]
                self.multi(b"+OK", [line for line in lines if not self._deleted_line(line)])
        elif verb == b"LIST":
            self.multi(
                b"+OK",
                [b"%d %d" % (n, len(m)) for n, m in enumerate(messages, 1) if n not in self.pending],
            )
        elif verb == b"RETR":
            number = int(argument)
            if not 1 <= number <= len(messages) or number in self.pending:
                self.sendLine(b"-ERR no such message")
                return
            data = messages[number - 1]
            lines = data.split(b"\r\n")
            if lines and lines[-1] == b"":
                lines.pop()
            self.multi(b"+OK message follows", lines)
        elif verb == b"DELE":
            self.pending.add(int(argument))
            if server.dele_delay:
                self.backlog = []
                reactor.callLater(server.dele_delay, self.release)  # type: ignore[attr-defined]
            else:
                self.sendLine(b"+OK deleted")
        elif verb == b"RSET":
            self.pending.clear()
            self.sendLine(b"+OK")
        elif verb == b"NOOP":
            self.sendLine(b"+OK")
        elif verb == b"QUIT":
            server.deleted.update(self.pending)
            self.sendLine(b"+OK bye")
            assert self.transport is not None
            self.transport.loseConnection()
        else:
            self.sendLine(b"-ERR unknown command")

    def _deleted_line(self, line: bytes) -> bool:
        head = line.split(b" ", 1)[0]
        return head.isdigit() and int(head) in self.pending

    def multi(self, status: bytes, lines: Sequence[bytes]) -> None:
        body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        assert self.transport is not None
        self.transport.write(status + b"\r\n" + body + b".\r\n")


class FakePop3Server(Factory):
    """The scripted server (a factory: one instance serves all its connections)."""

    protocol = _Pop3  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        messages: Sequence[bytes],
        *,
        uidl_lines: Sequence[bytes] | None = None,
        pipelining: bool = True,
        supports_uidl: bool = True,
        dele_delay: float = 0.0,
    ) -> None:
        self.messages = list(messages)
        self.uidl_lines = None if uidl_lines is None else list(uidl_lines)
        self.supports_uidl = supports_uidl
        self.extra_capabilities = [b"PIPELINING"] if pipelining else []
        self.commands: list[bytes] = []
        #: answer each DELE this many seconds late (0: at once) ...
        self.dele_delay = dele_delay
        #: ... and count the commands that arrived before that answer was sent
        self.overlapped = 0
        self.deleted: set[int] = set()
        self.port = 0
        self._open = 0
        self._idle: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        self._open += 1
        return super().buildProtocol(addr)

    def connection_closed(self) -> None:
        self._open -= 1
        if self._open == 0:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)

    def idle(self) -> defer.Deferred[None]:
        """Fires once no connection is open."""
        if self._open == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle.append(waiter)
        return waiter

    @classmethod
    async def listening(cls, testcase: TestCase, messages: Sequence[bytes], **kwargs: Any) -> Self:
        server = cls(messages, **kwargs)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        server.port = port.getHost().port  # type: ignore[attr-defined]

        async def stop() -> None:
            await server.idle()
            await defer.maybeDeferred(port.stopListening)

        testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        return server
