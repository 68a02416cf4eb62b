"""What the default SMTP server offers, for the gateway's own EHLO answer [4.5].

Clients send EHLO once, before AUTH, and never again: the gateway's answer must already
carry the mail server's C{SIZE}, C{PIPELINING}, C{8BITMIME}, C{ENHANCEDSTATUSCODES},
C{SMTPUTF8} and C{CHUNKING} where it has them (the relay after AUTH passes bytes, so
they keep working).  L{SMTPCapabilities} learns them by connecting to the default
server at start, on each reload and every C{capabilities_refresh} seconds: greeting,
EHLO, STARTTLS and EHLO again where the server is configured with C{tls = "starttls"},
then QUIT.  Nothing waits for it: until the server has answered once (since start, or
since a reload named another server) the gateway advertises the configured
C{fallback_message_size}; a failed refresh keeps what the server said last.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    DNSLookupError,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.config import ProxyConfig
from mailgw.endpoints import tcp_client_endpoint
from mailgw.tls import ssl_error_text, tune_tcp
from mailgw.upstream import UpstreamTarget
from mailgw.wire import smtp
from mailgw.wire.errors import ProtocolError
from mailgw.wire.lines import LineBuffer, TooLong

__all__ = ["EHLOProbe", "ProbeFailed", "SMTPCapabilities"]

#: connects to a target (the TLS options are given for C{implicit} and C{starttls})
EndpointFor = Callable[[UpstreamTarget, IOpenSSLClientConnectionCreator | None], IStreamClientEndpoint]
TLSOptionsFor = Callable[[UpstreamTarget], IOpenSSLClientConnectionCreator]

#: seconds a probe may take, from connecting to the EHLO answer
PROBE_TIMEOUT = 30.0
#: seconds the probe's connection gets to close after QUIT before it is aborted
CLOSE_GRACE = 2.0


class ProbeFailed(Exception):
    """The server could not be asked (closed, refused STARTTLS, misbehaved)."""


class _Step(enum.Enum):
    GREETING = 1
    EHLO = 2
    STARTTLS = 3
    EHLO_TLS = 4
    DONE = 5


class EHLOProbe(Protocol):
    """Reads one mail server's EHLO answer (after STARTTLS when C{starttls} options are
    given), says QUIT and closes.  C{result} fires with the keywords of
    L{smtp.parse_ehlo_keywords}, or fails with L{ProbeFailed}; cancelling it aborts
    the connection."""

    def __init__(
        self, clock: IReactorTime, helo_name: str, starttls: IOpenSSLClientConnectionCreator | None = None
    ) -> None:
        self._clock = clock
        self._helo_name = helo_name
        self._starttls = starttls
        self._lines = LineBuffer(smtp.MAX_REPLY_LINE)
        self._replies = smtp.ReplyReader()
        self._step = _Step.GREETING
        self._abort_timer: IDelayedCall | None = None
        self._connected = False
        self._gone: defer.Deferred[None] = defer.Deferred()
        self.result: defer.Deferred[dict[str, tuple[str, ...]]] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        self._connected = True
        tune_tcp(self.transport)

    def close_now(self) -> defer.Deferred[None]:
        """Abort the connection (at service stop); fires once it is gone."""
        if not self._connected or self._gone.called:
            return defer.succeed(None)
        self._step = _Step.DONE
        self._abort()
        return self._gone

    def dataReceived(self, data: bytes) -> None:
        self._lines.append(data)
        while self._step is not _Step.DONE:
            line = self._lines.next_line()
            if line is None:
                return
            try:
                if isinstance(line, TooLong):
                    raise ProtocolError("over-long reply line")
                reply = self._replies.feed(line)
                if reply is not None:
                    self._reply(reply)
            except ProtocolError as e:
                self._fail(f"unexpected answer: {e}")

    def _reply(self, reply: smtp.Reply) -> None:
        if self._step is _Step.GREETING:
            if reply.code != 220:
                self._fail(f"greeting {reply.code}")
            else:
                self._ehlo(_Step.EHLO)
        elif self._step is _Step.STARTTLS:
            if reply.code != 220:
                self._fail(f"STARTTLS answered {reply.code}")
            else:
                self._lines.clear()
                self.transport.startTLS(self._starttls)  # type: ignore[union-attr]
                self._ehlo(_Step.EHLO_TLS)
        elif reply.code != 250:
            self._fail(f"EHLO answered {reply.code}")
        elif self._step is _Step.EHLO and self._starttls is not None:
            self._step = _Step.STARTTLS
            self._send(b"STARTTLS")
        else:
            keywords = smtp.parse_ehlo_keywords(reply)
            self._step = _Step.DONE
            self._send(b"QUIT")
            self._close()
            self.result.callback(keywords)

    def _ehlo(self, step: _Step) -> None:
        self._step = step
        self._send(b"EHLO " + self._helo_name.encode("ascii", "replace"))

    def _send(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + b"\r\n")

    def _close(self) -> None:
        """Close politely, and abort if the server does not let go (a TLS close that
        is never answered) [4.1]."""
        if self.transport is not None:
            self.transport.loseConnection()
            self._abort_timer = self._clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail(self, reason: str) -> None:
        if self._step is _Step.DONE:
            return
        self._step = _Step.DONE
        self._abort()
        self.result.errback(ProbeFailed(reason))

    def _cancel(self, result: defer.Deferred[dict[str, tuple[str, ...]]]) -> None:
        self._step = _Step.DONE
        self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        if self._step is not _Step.DONE:
            self._step = _Step.DONE
            self.result.errback(ProbeFailed(f"connection closed before the EHLO answer: {_describe(reason)}"))
        self._gone.callback(None)


def _describe(reason: Failure) -> str:
    """A short text for a lost connection (TLS failures by their reason)."""
    value = reason.value
    if isinstance(value, SSL.Error):
        return f"TLS failed: {ssl_error_text(value)}"
    if isinstance(value, (ConnectionDone, ConnectionLost)):
        return "closed by the server"
    text = str(value).strip()
    return text.splitlines()[0][:200] if text else type(value).__name__


class _OneProtocol(Factory):
    """Builds the one protocol instance it was given."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class SMTPCapabilities(Service):
    """The default SMTP server's extensions the gateway's EHLO carries before AUTH.

    L{keywords} is what sessions advertise (EHLO lines such as C{"SIZE 10240000"}):
    what the server said last, or L{smtp.fallback_extensions} of the configured
    C{fallback_message_size} while it has not answered.  L{configure} (at start and
    on each reload) names the server; while the service runs, it is asked at once
    and then every C{capabilities_refresh} seconds, without ever blocking the reactor.
    """

    log = Logger()

    def __init__(self, reactor: object, *, endpoint_for: EndpointFor | None = None) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor  # type: ignore[assignment]
        self._endpoint_for = endpoint_for if endpoint_for is not None else self._endpoint
        self._target: UpstreamTarget | None = None
        self._tls_for: TLSOptionsFor | None = None
        self._helo_name = "mailgw"
        self._interval = 600.0
        self._fallback = smtp.fallback_extensions(10240000)
        self._learned: tuple[str, ...] | None = None
        self._loop: LoopingCall | None = None
        self._probing: defer.Deferred[None] | None = None
        #: the last probe (its connection may still be closing after QUIT)
        self._last_probe: EHLOProbe | None = None

    @property
    def target(self) -> UpstreamTarget | None:
        """The server asked (C{None}: the SMTP proxy is disabled)."""
        return self._target

    @property
    def learned(self) -> bool:
        """Whether L{keywords} come from the server (not the fallback)."""
        return self._learned is not None

    def keywords(self) -> tuple[str, ...]:
        """The EHLO lines to advertise for the server's extensions."""
        return self._learned if self._learned is not None else self._fallback

    def configure(self, proxy: ProxyConfig | None, helo_name: str, tls_for: TLSOptionsFor) -> None:
        """Take a configuration's SMTP proxy (C{None} or disabled: nothing to ask).

        What another server said is forgotten; while running, the server is asked
        again at once (a reload) and the refresh follows the new interval."""
        target: UpstreamTarget | None = None
        if proxy is not None and proxy.enabled:
            server = proxy.default_server
            target = UpstreamTarget(
                host=server.host,
                port=server.port,
                tls=server.tls,
                verify_certificate=server.verify_certificate,
                ca=server.ca,
            )
            self._fallback = smtp.fallback_extensions(proxy.fallback_message_size)
            self._interval = float(proxy.capabilities_refresh)
        if target != self._target:
            self._learned = None
        self._target = target
        self._tls_for = tls_for
        self._helo_name = helo_name
        if self.running:
            self._restart()

    def startService(self) -> None:
        super().startService()
        self._restart()

    def stopService(self) -> defer.Deferred[None]:
        """Stop the timer and abort a probe's connection; fires once it is gone."""
        super().stopService()
        self._stop()
        probe, self._last_probe = self._last_probe, None
        return probe.close_now() if probe is not None else defer.succeed(None)

    def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._probing is not None:
            probing, self._probing = self._probing, None
            probing.cancel()

    def _restart(self) -> None:
        self._stop()
        if self._target is None:
            return
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._clock
        # refresh() never raises: the loop runs until stopped.
        self._loop.start(self._interval, now=True)

    def refresh(self) -> None:
        """Ask the server now, unless a probe is under way."""
        target = self._target
        if target is None or self._probing is not None:
            return
        probing = defer.Deferred.fromCoroutine(self._probe(target))
        if self._probing is None and not probing.called:
            self._probing = probing

    async def _probe(self, target: UpstreamTarget) -> None:
        try:
            keywords = await self._read_ehlo(target)
        except (ProbeFailed, ConnectError, DNSLookupError, defer.TimeoutError, OSError) as e:
            self._probing = None
            if target == self._target:
                self.log.warn(
                    "Cannot read the SMTP extensions of {upstream}: {reason}; the gateway's EHLO offers {keywords}",
                    upstream=target.describe(),
                    reason=str(e) or type(e).__name__,
                    keywords=" ".join(self.keywords()),
                )
            return
        except (defer.CancelledError, ConnectingCancelledError):
            # Stopped (the service stops, or a reload named another server).
            return
        except Exception:  # noqa: BLE001 - the outermost boundary of a periodic task
            self._probing = None
            self.log.failure("Reading the SMTP extensions of {upstream} failed", upstream=target.describe())
            return
        self._probing = None
        if target != self._target:
            return  # a reload named another server meanwhile
        learned = smtp.relayed_extensions(keywords)
        if learned != self._learned:
            self.log.info(
                "SMTP server {upstream} offers {keywords}: the gateway's EHLO passes them on",
                upstream=target.describe(),
                keywords=" ".join(learned) or "none of the relayed extensions",
            )
        self._learned = learned

    async def _read_ehlo(self, target: UpstreamTarget) -> dict[str, tuple[str, ...]]:
        tls = self._tls_for(target) if self._tls_for is not None and target.tls != "none" else None
        probe = self._last_probe = EHLOProbe(self._clock, self._helo_name, tls if target.tls == "starttls" else None)
        connecting = self._endpoint_for(target, tls).connect(_OneProtocol(probe))
        connecting.addTimeout(PROBE_TIMEOUT, self._clock)
        await connecting
        probe.result.addTimeout(PROBE_TIMEOUT, self._clock)
        return await probe.result

    def _endpoint(self, target: UpstreamTarget, tls: IOpenSSLClientConnectionCreator | None) -> IStreamClientEndpoint:
        endpoint = tcp_client_endpoint(self._reactor, target.host, target.port, PROBE_TIMEOUT / 3)
        if target.tls == "implicit" and tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        return endpoint
