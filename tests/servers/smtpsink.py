"""A capturing SMTP sink: a tiny blocking SMTP server in a thread, for relay tests.

It accepts every sender and recipient and keeps each message (un-dot-stuffed, line
endings as received) in :attr:`SmtpSink.messages`.  It runs in its own threads, not in
the Twisted reactor, so blocking clients in the reactor thread can talk to it (and to a
server that relays to it, such as Dovecot's submission service).

::

    sink = SmtpSink().start()
    ...  # something sends mail to sink.host:sink.port
    [message] = sink.wait_for_messages(1)
    sink.stop()

It advertises ``8BITMIME``, ``SIZE`` and ``PIPELINING`` (not ``CHUNKING``); commands
it does not know get ``502``.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Self

from twisted.trial.unittest import SynchronousTestCase

from tests.servers.base import LOOPBACK

__all__ = ["SinkMessage", "SmtpSink"]

MAX_LINE = 4096


@dataclass
class SinkMessage:
    """One message received by the sink."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes
    helo: str = ""
    commands: list[str] = field(default_factory=list)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def setup(self) -> None:
        # Each reply is flushed as it is made; without this, the second of two
        # replies to pipelined commands (RFC 2920) would wait for the client's
        # delayed ACK (Nagle).  Servers that batch their replies need no such thing.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def read_command(self) -> str | None:
        line = self.rfile.readline(MAX_LINE)
        if not line:
            return None
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def handle(self) -> None:
        sink = self.server.sink
        self.reply(f"220 {sink.hostname} ESMTP mailgw test sink")
        helo = ""
        mail_from: str | None = None
        rcpt_to: list[str] = []
        commands: list[str] = []
        while True:
            command = self.read_command()
            if command is None:
                return
            commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            argument = command[len(verb) :].strip()
            if verb == "EHLO":
                helo = argument
                self.reply(f"250-{sink.hostname}")
                self.reply("250-PIPELINING")
                self.reply("250-8BITMIME")
                self.reply(f"250 SIZE {sink.max_size}")
            elif verb == "HELO":
                helo = argument
                self.reply(f"250 {sink.hostname}")
            elif verb == "MAIL" and argument.upper().startswith("FROM:"):
                mail_from = _address(argument[5:])
                rcpt_to = []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT" and argument.upper().startswith("TO:"):
                if mail_from is None:
                    self.reply("503 5.5.1 MAIL first")
                    continue
                rcpt_to.append(_address(argument[3:]))
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpt_to:
                    self.reply("503 5.5.1 MAIL and RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self.read_data()
                if data is None:
                    return
                sink.add(SinkMessage(mail_from, rcpt_to, data, helo, commands))
                self.reply("250 2.0.0 Ok: queued")
                mail_from, rcpt_to, commands = None, [], []
            elif verb == "RSET":
                mail_from, rcpt_to = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not implemented")

    def read_data(self) -> bytes | None:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline()
            if not line:
                return None
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]
            lines.append(line)


def _address(argument: str) -> str:
    """The address in ``<addr> PARAMS`` (the path, without parameters)."""
    argument = argument.strip()
    if argument.startswith("<"):
        return argument[1 : argument.find(">")] if ">" in argument else argument[1:]
    return argument.split(" ", 1)[0]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    sink: SmtpSink


class ThreadedServer:
    """A C{socketserver} server run in a daemon thread while a test needs it.

    Subclasses set C{_server} (with C{server_address}), C{port} and C{_thread = None}
    in their constructor; C{thread_name} names the thread."""

    thread_name = "test-server"
    _server: socketserver.BaseServer
    _thread: threading.Thread | None
    port: int

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{self.thread_name}-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    @classmethod
    def started(cls, testcase: SynchronousTestCase, **kwargs: object) -> Self:
        """Started now, stopped when C{testcase} cleans up."""
        server = cls(**kwargs)
        testcase.addCleanup(server.stop)
        return server.start()


class SmtpSink(ThreadedServer):
    """A capturing SMTP server on ``host`` (port 0: a free port, see :attr:`port`)."""

    thread_name = "smtp-sink"

    def __init__(self, host: str = LOOPBACK, port: int = 0, *, hostname: str = "sink.test") -> None:
        self.host = host
        self.hostname = hostname
        self.max_size = 64 * 1024 * 1024
        self.messages: list[SinkMessage] = []
        self._condition = threading.Condition()
        self._server = _Server((host, port), _Handler, bind_and_activate=True)
        self._server.sink = self
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def add(self, message: SinkMessage) -> None:
        with self._condition:
            self.messages.append(message)
            self._condition.notify_all()

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Block until at least ``count`` messages arrived; returns them all."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"SMTP sink got {len(self.messages)} of {count} messages in {timeout} s")
                self._condition.wait(remaining)
            return list(self.messages)

