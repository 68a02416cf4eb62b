"""The poller's SMTP client: delivers to the local domain's mail server
(``poller.smtp_host``) [6].

A small protocol over the codec of L{mailgw.wire.smtp}: commands are sent one at a time,
or several in one write to a server that offers PIPELINING (L{SmtpClient.pipeline}),
and their replies assembled by L{ReplyReader}; during DATA the caller writes the
message (already dot-stuffed) straight to the transport, with a producer registered
so that the transport's buffer paces the POP3 side.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from mailgw.endpoints import tcp_client_endpoint
from mailgw.tls import tune_tcp
from mailgw.wire import smtp
from mailgw.wire.errors import ProtocolError
from mailgw.wire.lines import LineBuffer

__all__ = ["SmtpClient", "SmtpError", "open_smtp"]

#: longest reply line accepted (RFC 5321 says 512; some servers exceed it a little)
MAX_REPLY_LINE = 4096


class SmtpError(Exception):
    """The SMTP connection failed, timed out or broke the protocol (a temporary
    failure for the message being delivered)."""


class SmtpClient(Protocol):
    """One SMTP connection to the local mail server.

    @param timeout: seconds to wait for a reply (RFC 5321 section 4.5.3.2 suggests
        minutes; the final reply to DATA gets L{data_timeout}).
    """

    def __init__(self, clock: IReactorTime, *, timeout: float = 300.0, data_timeout: float = 600.0) -> None:
        self.clock = clock
        self.timeout = timeout
        self.data_timeout = data_timeout
        self._lines = LineBuffer(MAX_REPLY_LINE)
        self._reader = smtp.ReplyReader()
        self._waiting: deque[defer.Deferred[smtp.Reply]] = deque()
        self._timer: IDelayedCall | None = None
        self._error: Exception | None = None
        self.extensions: dict[str, tuple[str, ...]] = {}
        #: between a 354 to DATA and the reply to its end: QUIT would be message text
        self.in_data = False
        self.greeting: defer.Deferred[smtp.Reply] = self._expect(timeout)
        self.closed: defer.Deferred[None] = defer.Deferred()

    @property
    def usable(self) -> bool:
        """Whether the connection is still up and in sync."""
        return self._error is None

    # -- Protocol ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        tune_tcp(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._lines.append(data)
        try:
            while (line := self._lines.next_line()) is not None:
                reply = self._reader.feed(line)
                if reply is None:
                    continue
                if not self._waiting:
                    raise ProtocolError("a reply nobody waited for")
                waiter = self._waiting.popleft()
                self._disarm()
                if self._waiting:
                    self._arm(self.timeout)
                waiter.callback(reply)
        except ProtocolError as e:
            self._fail(SmtpError(f"unexpected answer from the SMTP server: {e}"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._error is None:
            self._error = SmtpError("the SMTP server closed the connection")
        self._disarm()
        self._flush()
        if not self.closed.called:
            self.closed.callback(None)

    # -- commands ---------------------------------------------------------------------------

    def _expect(self, timeout: float) -> defer.Deferred[smtp.Reply]:
        waiter: defer.Deferred[smtp.Reply] = defer.Deferred()
        if self._error is not None:
            waiter.errback(Failure(self._error))
            return waiter
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            self._arm(timeout)
        return waiter

    def command(self, verb: str, argument: str = "") -> defer.Deferred[smtp.Reply]:
        """Send a command; fires with its reply (any code), or fails with
        L{SmtpError} when the connection breaks."""
        if self._error is not None:
            return defer.fail(self._error)
        line = smtp.format_command(verb, argument)
        waiter = self._expect(self.timeout)
        assert self.transport is not None
        self.transport.write(line)
        if verb.upper() == "DATA":
            waiter.addCallback(self._data_started)
        return waiter

    def pipeline(self, commands: list[tuple[str, str]]) -> list[defer.Deferred[smtp.Reply]]:
        """Send several commands in one write (RFC 2920: for a server that offers
        PIPELINING; not DATA, whose reply decides what comes next); one Deferred per
        command, fired in order as by L{command}."""
        if any(verb.upper() == "DATA" for verb, _ in commands):
            raise ValueError("DATA ends a pipelined group only when its reply is awaited alone")
        if self._error is not None:
            return [defer.fail(self._error) for _ in commands]
        waiters = [self._expect(self.timeout) for _ in commands]
        assert self.transport is not None
        self.transport.write(b"".join(smtp.format_command(verb, argument) for verb, argument in commands))
        return waiters

    def _data_started(self, reply: smtp.Reply) -> smtp.Reply:
        self.in_data = reply.code == 354
        return reply

    def write(self, data: bytes) -> None:
        """Raw bytes during DATA (dot-stuffed by the caller)."""
        if self._error is None and self.transport is not None:
            self.transport.write(data)

    def end_data(self) -> defer.Deferred[smtp.Reply]:
        """The final ``.`` of DATA; fires with the server's verdict."""
        if self._error is not None:
            return defer.fail(self._error)
        waiter = self._expect(self.data_timeout)
        assert self.transport is not None
        self.transport.write(b".\r\n")
        waiter.addCallback(self._data_ended)
        return waiter

    def _data_ended(self, reply: smtp.Reply) -> smtp.Reply:
        self.in_data = False
        return reply

    def register_producer(self, producer: IPushProducer) -> None:
        if self._error is None and self.transport is not None:
            self.transport.registerProducer(producer, True)  # type: ignore[attr-defined]

    def unregister_producer(self) -> None:
        if self.transport is not None and getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]

    async def quit(self) -> None:
        """QUIT politely (unless inside DATA: then the connection is just dropped,
        which voids the transaction); the connection is closed whatever the answer."""
        if self._error is None and not self.in_data:
            try:
                await self.command("QUIT")
            except SmtpError:
                pass
        self.abort()

    def abort(self, reason: str = "connection closed by the poller") -> None:
        """Drop the connection (a transaction under way is not completed)."""
        self._fail(SmtpError(reason))

    # -- internals --------------------------------------------------------------------------

    def _arm(self, timeout: float) -> None:
        self._disarm()
        self._timer = self.clock.callLater(timeout, self._timed_out, timeout)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self._fail(SmtpError(f"the SMTP server did not answer within {timeout:g} s"))

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._disarm()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._flush()

    def _flush(self) -> None:
        error = self._error or SmtpError("connection closed")
        while self._waiting:
            self._waiting.popleft().errback(Failure(error))


async def open_smtp(
    reactor: object,
    host: str,
    port: int,
    helo: str,
    *,
    connect_timeout: float = 30.0,
    timeout: float = 300.0,
    data_timeout: float = 600.0,
) -> SmtpClient:
    """Connect, read the greeting and say EHLO (HELO if EHLO is refused).

    Raises L{SmtpError} when the server is unreachable or not ready.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    endpoint = tcp_client_endpoint(reactor, host, port, connect_timeout)
    factory = Factory.forProtocol(lambda: SmtpClient(clock, timeout=timeout, data_timeout=data_timeout))
    factory.noisy = False
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        connecting = endpoint.connect(factory)
        connecting.addTimeout(connect_timeout + 1, clock)
        client: SmtpClient = await connecting  # type: ignore[assignment]
    except (ConnectError, DNSLookupError, defer.TimeoutError, OSError) as e:
        raise SmtpError(f"cannot connect to the SMTP server {target}: {type(e).__name__}") from None
    greeting = await client.greeting
    if greeting.code != 220:
        client.abort()
        raise SmtpError(f"the SMTP server {target} is not ready: {greeting.code}")
    reply = await client.command("EHLO", helo)
    if reply.code == 250:
        client.extensions = smtp.parse_ehlo_keywords(reply)
    else:
        reply = await client.command("HELO", helo)
        if reply.code != 250:
            client.abort()
            raise SmtpError(f"the SMTP server {target} refused HELO: {reply.code}")
    return client
