"""An SMTP receiver for the poller tests: like :class:`tests.servers.smtpsink.SmtpSink`
(a blocking server in threads, outside the reactor) but it can refuse recipients
(``550``), fail them temporarily (``450``), fail the end of DATA temporarily (``451``)
a number of times, and it keeps big messages as a digest only, so that a test can
measure the poller's memory in the same process.

::

    sink = PollerSink.started(self, reject={"nobody@example.com"})
    ...
    sink.messages_for("alice@example.com")

Every message is stored before the ``250`` goes out, so once the poll that delivered it
has finished, :attr:`PollerSink.messages` holds it.
"""

from __future__ import annotations

import hashlib
import socketserver
import threading
from dataclasses import dataclass, field

from tests.servers.base import LOOPBACK
from tests.servers.smtpsink import ThreadedServer

__all__ = ["PollerSink", "PollerSinkMessage"]

MAX_LINE = 4096


@dataclass
class PollerSinkMessage:
    """One accepted message.  ``data`` is ``None`` for one larger than the sink's
    ``keep_limit``: ``size``, ``sha256`` and ``head`` (its first 64 KiB) describe it."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes | None
    size: int
    sha256: str
    head: bytes
    commands: list[str] = field(default_factory=list)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        sink = self.server.sink
        with sink.lock:
            sink.connections += 1
        self.reply("220 poller-sink.test ESMTP")
        mail_from: str | None = None
        rcpt_to: list[str] = []
        commands: list[str] = []
        while True:
            raw = self.rfile.readline(MAX_LINE)
            if not raw:
                return
            command = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            argument = command[len(verb) :].strip()
            if verb == "EHLO":
                self.reply("250-poller-sink.test")
                self.reply("250-PIPELINING")
                self.reply("250-8BITMIME")
                self.reply("250 SIZE 104857600")
            elif verb == "HELO":
                self.reply("250 poller-sink.test")
            elif verb == "MAIL" and argument.upper().startswith("FROM:"):
                mail_from = _address(argument[5:])
                rcpt_to = []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT" and argument.upper().startswith("TO:"):
                address = _address(argument[3:])
                if mail_from is None:
                    self.reply("503 5.5.1 MAIL first")
                elif address.lower() in sink.reject:
                    self.reply("550 5.1.1 No such user")
                elif address.lower() in sink.tempfail:
                    self.reply("450 4.2.1 Mailbox busy, try later")
                else:
                    rcpt_to.append(address)
                    self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpt_to:
                    self.reply("503 5.5.1 MAIL and RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                received = self.read_data()
                if received is None:
                    with sink.lock:
                        sink.aborted += 1
                    return
                data, size, digest, head = received
                with sink.lock:
                    if sink.data_tempfail > 0:
                        sink.data_tempfail -= 1
                        self.reply("451 4.3.0 Temporary failure, try later")
                    else:
                        sink.messages.append(PollerSinkMessage(mail_from, rcpt_to, data, size, digest, head, commands))
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

    def read_data(self) -> tuple[bytes | None, int, str, bytes] | None:
        """The message (un-stuffed), its size, SHA-256 and head; ``None`` when the
        connection ends before the final dot (the transaction is void)."""
        keep = self.server.sink.keep_limit
        digest = hashlib.sha256()
        kept: list[bytes] | None = []
        head = bytearray()
        size = 0
        while True:
            line = self.rfile.readline()
            if not line:
                return None
            if line in (b".\r\n", b".\n"):
                data = b"".join(kept) if kept is not None else None
                return data, size, digest.hexdigest(), bytes(head)
            if line.startswith(b"."):
                line = line[1:]
            digest.update(line)
            size += len(line)
            if len(head) < 65536:
                head += line[: 65536 - len(head)]
            if kept is not None:
                kept.append(line)
                if size > keep:
                    kept = None


def _address(argument: str) -> str:
    argument = argument.strip()
    if argument.startswith("<"):
        return argument[1 : argument.find(">")] if ">" in argument else argument[1:]
    return argument.split(" ", 1)[0]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    sink: PollerSink


class PollerSink(ThreadedServer):
    """The configurable SMTP receiver; attributes may be changed while it runs."""

    thread_name = "poller-sink"

    def __init__(self, host: str = LOOPBACK, *, keep_limit: int = 4 * 1024 * 1024) -> None:
        self.host = host
        self.keep_limit = keep_limit
        self.lock = threading.Lock()
        self.messages: list[PollerSinkMessage] = []
        #: recipients (lower case) answered 550
        self.reject: set[str] = set()
        #: recipients (lower case) answered 450
        self.tempfail: set[str] = set()
        #: how many ends of DATA to answer 451
        self.data_tempfail = 0
        #: connections accepted, and transactions cut before the final dot
        self.connections = 0
        self.aborted = 0
        self._server = _Server((host, 0), _Handler, bind_and_activate=True)
        self._server.sink = self
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def messages_for(self, recipient: str) -> list[PollerSinkMessage]:
        with self.lock:
            return [m for m in self.messages if recipient.lower() in (r.lower() for r in m.rcpt_to)]

