"""A worker process [10]: serves the proxies on the listening sockets its supervisor
sent, and counts its logins, failures and non-authenticated sessions in the
supervisor's tables (L{mailgw.workers.anvil}), so the limits hold across workers.

Started by the supervisor (L{mailgw.workers.supervisor}) as
C{python -m mailgw.workers.worker --config PATH --index N}, with its end of a UNIX
socket pair to the supervisor as descriptor 3.  It stops (gracefully: logged-in
sessions may finish within the grace period) on SIGTERM, on the supervisor's
L{Drain}, and when the supervisor is gone.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.admin.commands import scrub
from mailgw.memory import freeze_startup_objects
from mailgw.proxy.directory import DirectoryUnavailable, ISessionDirectory
from mailgw.proxy.registry import SessionInfo, SessionRegistry, SessionState
from mailgw.state.directory import DirectorySession
from mailgw.workers import commands as c
from mailgw.workers.sockets import AdoptedSockets

__all__ = ["CHANNEL_FD", "PendingReporter", "SupervisorDirectory", "WorkerChannel", "WorkerRole", "main", "worker_node"]

#: the descriptor of the worker's end of the channel to its supervisor
CHANNEL_FD = 3
#: how long a login waits for the supervisor's tables before answering a temporary failure
CALL_TIMEOUT = 10.0
#: the most addresses remembered as having no failure in the supervisor
_CLEAN_ADDRESSES = 4096

_STATES = {SessionState.UNAUTHENTICATED: "u", SessionState.AUTHENTICATING: "a"}


@dataclass(frozen=True)
class WorkerRole:
    """What makes a gateway service a worker: its number, the sockets its
    supervisor sent, the channel to it, and whether to report the non-authenticated
    sessions at start."""

    index: int
    sockets: AdoptedSockets
    channel: WorkerChannel
    track: bool = False
    #: the supervisor's TLS session-ticket key at the start (None: the worker's own)
    ticket_key: bytes | None = None


def worker_node(node_name: str, index: int) -> str:
    """How worker C{index} of gateway C{node_name} is named in session lists."""
    return f"{node_name}/w{index}"


class WorkerChannel(amp.AMP):
    """The worker's end of the channel: calls the supervisor, answers its commands
    from L{gateway} (a L{mailgw.service.GatewayService} in the worker role)."""

    log = Logger()

    def __init__(self, sockets: AdoptedSockets, clock: IReactorTime, on_lost: Callable[[], None]) -> None:
        super().__init__()
        self.sockets = sockets
        self.clock = clock
        self._on_lost = on_lost
        self.gateway: Any = None
        self.reporter: PendingReporter | None = None
        self.connected = False
        #: what the supervisor said before the gateway existed
        self.track = False
        self.ticket_key: bytes | None = None
        self.drain: Callable[[], None] = lambda: None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connected = True

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.connected = False
        super().connectionLost(reason)
        self._on_lost()

    def call(self, command: type[amp.Command], **arguments: Any) -> defer.Deferred[Any]:
        """C{command} to the supervisor, failing after L{CALL_TIMEOUT}."""
        if not self.connected:
            return defer.fail(DirectoryUnavailable("the worker lost its supervisor"))
        d = self.callRemote(command, **arguments)
        if command.requiresAnswer:
            d.addTimeout(CALL_TIMEOUT, self.clock)  # type: ignore[arg-type]
        return d  # type: ignore[no-any-return]

    def send(self, command: type[amp.Command], **arguments: Any) -> None:
        """C{command} without an answer (nothing happens when the supervisor is gone)."""
        if self.connected:
            self.callRemote(command, **arguments)

    # -- the supervisor's commands ------------------------------------------------------

    @c.AdoptListener.responder
    def adopt_listener(self, key: str, fd: int, family: int) -> dict[str, Any]:
        self.sockets.give(key, fd, family)
        return {}

    @c.Track.responder
    def set_track(self, track: bool) -> dict[str, Any]:
        self.track = track
        if self.reporter is not None:
            self.reporter.enabled = track
        return {}

    @c.TicketKey.responder
    def ticket_key_changed(self, key: bytes) -> dict[str, Any]:
        self.ticket_key = key
        if self.gateway is not None:
            self.gateway.ticket_keys.set(key)
        return {}

    @c.Reload.responder
    def reload(self, path: str) -> dict[str, Any]:
        problems = self.gateway.reload(path)
        self.sockets.close_unused()
        return {"problems": problems}

    @c.Drain.responder
    def drain_now(self) -> dict[str, Any]:
        self.clock.callLater(0, self.drain)  # type: ignore[attr-defined]
        return {}

    @c.Sessions.responder
    def sessions(self, protocol: str | None = None) -> dict[str, Any]:
        backend = self.gateway.admin_backend
        now = self.clock.seconds()
        registry: SessionRegistry = self.gateway.registry
        return {"sessions": scrub([backend.session_view(info, now) for info in registry.sessions(protocol)])}

    @c.Kill.responder
    def kill(self, session_id: str, reason: str) -> dict[str, Any]:
        registry: SessionRegistry = self.gateway.registry
        info = registry.get(session_id)
        if info is None:
            return {"session": None}
        answer = self.gateway.admin_backend.session_view(info)
        info.owner.terminate(reason)
        return {"session": scrub(answer)}

    @c.Terminate.responder
    def terminate(self, session_ids: list[str], reason: str, cause: str) -> dict[str, Any]:
        registry: SessionRegistry = self.gateway.registry
        for session_id in session_ids:
            info = registry.get(session_id)
            if info is not None and not info.closing:
                info.owner.terminate(reason, cause)
        return {}

    @c.WorkerStatus.responder
    def status(self) -> dict[str, Any]:
        return {"status": scrub(self.gateway.admin_backend.worker_status())}

    @c.Flush.responder
    def flush(self, group: str | None = None, user: str | None = None) -> dict[str, Any]:
        return {"flushed": self.gateway.auth_cache.flush(group, user)}

    @c.MetricsText.responder
    def metrics_text(self) -> dict[str, Any]:
        return {"text": self.gateway.metrics.exposition()[0].decode("utf-8")}


@implementer(ISessionDirectory)
class SupervisorDirectory:
    """Logins and failures counted in the supervisor's tables [10]: a login beyond
    C{simultaneous_logins} across the workers logs off the oldest elsewhere (the
    supervisor asks their workers); the penalty counts every worker's failures.
    Session lists and kills go through the supervisor, which asks each worker."""

    def __init__(self, channel: WorkerChannel, registry: SessionRegistry, node: str) -> None:
        self._channel = channel
        self._registry = registry
        self.node = node
        # addresses the supervisor answered "no failure" for (their success is not sent)
        self._clean: OrderedDict[str, None] = OrderedDict()

    def claim(self, info: SessionInfo, limit: int) -> defer.Deferred[None]:
        assert info.user is not None
        session = {
            "node": self.node,
            "session_id": info.session_id,
            "login_id": info.login_id or info.session_id,
            "protocol": info.protocol,
            "client": info.client,
            "client_ip": info.client_ip,
            "user": info.user,
            "mail_user": info.mail_user,
            "group_policy": info.group_policy,
            "upstream": info.upstream,
            "started": info.started,
        }
        local = sorted(self._registry.login_keys(info.user))
        d = self._channel.call(c.Claim, session=session, limit=limit, local=local)

        def unavailable(failure: Failure) -> Failure:
            return Failure(DirectoryUnavailable(f"the workers' supervisor did not answer: {failure.getErrorMessage()}"))

        return d.addCallbacks(lambda _: None, unavailable)

    def withdraw(self, info: SessionInfo) -> None:
        if info.state is SessionState.AUTHENTICATED and info.user is not None:
            self._channel.send(c.Withdraw, session_id=info.session_id)

    def sessions(self) -> defer.Deferred[list[DirectorySession]]:
        return defer.succeed([])

    def kill(self, session_id: str) -> defer.Deferred[DirectorySession | None]:
        return defer.succeed(None)

    def failed(self, ip: str) -> None:
        self._clean.pop(ip, None)
        self._channel.send(c.Failed, ip=ip)

    def succeeded(self, ip: str) -> None:
        # Every login asks for the delay first: when the supervisor had no failure of
        # the address then, there is nothing to forget (a failure another worker
        # reports meanwhile keeps counting, as if it came after this login).
        if ip in self._clean:
            del self._clean[ip]
            return
        self._channel.send(c.Succeeded, ip=ip)

    def delay(self, ip: str) -> defer.Deferred[float]:
        d = self._channel.call(c.Delay, ip=ip)

        def answered(answer: dict[str, Any]) -> float:
            delay = float(answer["delay"])
            if delay > 0:
                self._clean.pop(ip, None)
            else:
                self._clean[ip] = None
                self._clean.move_to_end(ip)
                if len(self._clean) > _CLEAN_ADDRESSES:
                    self._clean.popitem(last=False)
            return delay

        return d.addCallbacks(answered, lambda _: 0.0)


class PendingReporter:
    """Reports the registry's non-authenticated sessions to the supervisor (when some
    proxy has an C{unauthenticated_session_limit}), the changes of one reactor turn
    in one message."""

    def __init__(self, channel: WorkerChannel, clock: IReactorTime, *, enabled: bool) -> None:
        self._channel = channel
        self._clock = clock
        self.enabled = enabled
        self._events: list[list[object]] = []
        self._reported: set[str] = set()
        self._scheduled = False

    def changed(self, info: SessionInfo, live: bool) -> None:
        if not self.enabled:
            return
        state = _STATES.get(info.state) if live else None
        if state is not None:
            self._reported.add(info.session_id)
            self._events.append(["+", info.session_id, info.protocol, info.started, state])
        elif info.session_id in self._reported:
            self._reported.discard(info.session_id)
            self._events.append(["-", info.session_id])
        else:
            return
        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        events, self._events = self._events, []
        if events:
            self._channel.send(c.Pending, events=events)


def _observer(log_format: str, index: int) -> ILogObserver:
    from mailgw.logs import make_observer

    inner = make_observer(log_format, sys.stdout)

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        event.setdefault("worker", index)
        inner(event)

    return cast(ILogObserver, observe)


def main(argv: list[str] | None = None) -> int:
    """Run worker C{--index} of the configuration C{--config} until it stops."""
    parser = argparse.ArgumentParser(prog="mailgw-worker", description="A mailgw worker process (started by mailgw).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    options = parser.parse_args(argv)

    from twisted.internet import reactor

    from mailgw.config import load_config
    from mailgw.service import build

    config = load_config(options.config)
    globalLogBeginner.beginLoggingTo([_observer(config.gateway.log_format, options.index)], redirectStandardIO=False)
    log = Logger(namespace="mailgw.worker")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the supervisor
    sockets = AdoptedSockets()
    state: dict[str, Any] = {"stopping": False, "code": 0}

    def stop() -> None:
        if not state["stopping"]:
            state["stopping"] = True
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    channel = WorkerChannel(sockets, reactor, stop)  # type: ignore[arg-type]
    channel.drain = stop
    factory = Factory.forProtocol(lambda: channel)
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, factory)  # type: ignore[attr-defined]
    os.close(CHANNEL_FD)

    async def start() -> None:
        answer = await channel.call(c.Hello, index=options.index, pid=os.getpid())
        # The newest key: a rotation's TicketKey sent before this answer is older.
        channel.ticket_key = answer.get("ticket_key")
        role = WorkerRole(options.index, sockets, channel, track=bool(answer["track"]), ticket_key=channel.ticket_key)
        gateway = build(config, reactor, worker=role)
        channel.gateway = gateway
        reactor.addSystemEventTrigger("before", "shutdown", gateway.stopService)  # type: ignore[attr-defined]
        gateway.startService()
        sockets.close_unused()
        freeze_startup_objects()
        log.info(
            "Worker {worker} (pid {pid}) serves {count} listeners",
            worker=options.index,
            pid=os.getpid(),
            count=len(gateway.listeners()),
        )
        await channel.call(c.Ready)

    def failed(failure: Failure) -> None:
        log.failure("Worker {worker} could not start", failure, worker=options.index)
        state["code"] = 1
        stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(start()).addErrback(failed))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return int(state["code"])


if __name__ == "__main__":
    sys.exit(main())
