"""The supervisor of the worker processes [10] (C{gateway.workers} other than 1).

The supervisor binds every listener (L{mailgw.workers.sockets.HeldSockets}) and
starts N workers (L{mailgw.workers.worker}), each with its end of a UNIX socket pair
as its channel: over it the worker gets the listening sockets, reports its logins,
failures and non-authenticated sessions (kept in the L{Anvil}, so the limits hold
across workers), and answers the supervisor's questions for C{mailgwctl} (sessions,
kill, status, reload, aaa flush).  A worker that exits is started again (after 1 s,
longer when it keeps dying); its sessions are gone and stop counting at once, no
other worker's are touched.  C{READY=1} goes to systemd once every worker serves.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailgw.auth.limits import PenaltyTable
from mailgw.state.directory import DirectorySession
from mailgw.systemd import SystemdNotifier
from mailgw.tlstickets import TicketKeyRotation
from mailgw.workers import commands as c
from mailgw.workers.anvil import Anvil, LogOff, parse_events
from mailgw.workers.sockets import HeldSockets
from mailgw.workers.worker import CHANNEL_FD

__all__ = ["WorkerPool", "WorkerSlot"]

#: a worker that lived shorter than this was crashing: its restart waits longer
STABLE_AFTER = 10.0
#: the longest wait before a worker is started again
MAX_RESTART_DELAY = 10.0
#: how long the supervisor waits for a worker's answer to an admin question
ASK_TIMEOUT = 10.0


@dataclass(eq=False)
class WorkerSlot:
    """One worker's place: the process now in it, and its history."""

    index: int
    process: IProcessTransport | None = None
    channel: SupervisorChannel | None = None
    state: str = "stopped"
    started: float = 0.0
    restarts: int = 0
    last_exit: str | None = None
    #: the listening sockets (their serials) this process was sent
    sent: set[int] = field(default_factory=set)
    ended: defer.Deferred[None] | None = None
    restart_delay: float = 1.0
    _restart: IDelayedCall | None = None

    @property
    def pid(self) -> int | None:
        process = self.process
        return int(process.pid) if process is not None and process.pid is not None else None


class SupervisorChannel(amp.AMP):
    """The supervisor's end of one worker's channel."""

    def __init__(self, pool: WorkerPool, slot: WorkerSlot) -> None:
        super().__init__()
        self.pool = pool
        self.slot = slot

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.slot.channel is self:
            self.slot.channel = None
        super().connectionLost(reason)

    @c.Hello.responder
    def hello(self, index: int, pid: int) -> dict[str, Any]:
        return self.pool.hello(self.slot, self, index, pid)

    @c.Ready.responder
    def ready(self) -> dict[str, Any]:
        self.pool.ready(self.slot)
        return {}

    @c.Claim.responder
    def claim(self, session: dict[str, Any], limit: int, local: list[list[str]]) -> dict[str, Any]:
        self.pool.claim(self.slot, session, limit, local)
        return {}

    @c.Withdraw.responder
    def withdraw(self, session_id: str) -> dict[str, Any]:
        self.pool.anvil.withdraw(self.slot.index, session_id)
        return {}

    @c.Failed.responder
    def failed(self, ip: str) -> dict[str, Any]:
        self.pool.penalty.failed(ip)
        return {}

    @c.Succeeded.responder
    def succeeded(self, ip: str) -> dict[str, Any]:
        self.pool.penalty.succeeded(ip)
        return {}

    @c.Delay.responder
    def delay(self, ip: str) -> dict[str, Any]:
        return {"delay": self.pool.penalty.delay(ip)}

    @c.Pending.responder
    def pending(self, events: object) -> dict[str, Any]:
        self.pool.log_off(self.pool.anvil.pending(self.slot.index, parse_events(events)))
        return {}


class _WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPool, slot: WorkerSlot) -> None:
        self.pool = pool
        self.slot = slot

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self.slot, reason)


class WorkerPool(Service):
    """Starts, restarts and stops the workers, and answers for them.

    @param config_path: the configuration file the workers load (the supervisor's).
    @param held: the supervisor's listening sockets, sent to every worker.
    @param limits: protocol → C{unauthenticated_session_limit} (L{Anvil}).
    """

    log = Logger()
    name = "workers"

    def __init__(
        self,
        count: int,
        config_path: Path,
        held: HeldSockets,
        reactor: Any,
        *,
        node_name: str,
        penalty: PenaltyTable,
        notifier: SystemdNotifier,
        limits: Mapping[str, int],
        ticket_rotation: TicketKeyRotation | None = None,
        environ: Mapping[str, str] = os.environ,
        python: str = sys.executable,
    ) -> None:
        self.count = count
        self.config_path = config_path
        self.held = held
        self.reactor = reactor
        self.node_name = node_name
        self.penalty = penalty
        self.notifier = notifier
        self.anvil = Anvil(limits)
        #: the TLS session-ticket key every worker uses [4.1]; each rotation goes to all
        self.ticket_rotation = ticket_rotation
        if ticket_rotation is not None:
            ticket_rotation.subscribe(self._ticket_key_changed)
        # The workers must not speak to systemd: NotifyAccess=main refuses them.
        self._environ = {k: v for k, v in environ.items() if k != "NOTIFY_SOCKET"}
        self._python = python
        self.slots = [WorkerSlot(i) for i in range(1, count + 1)]
        self.stopping = False
        self._announced = False
        #: fires once every worker serves for the first time
        self.all_ready: defer.Deferred[None] = defer.Deferred()

    @property
    def clock(self) -> IReactorTime:
        return self.reactor  # type: ignore[no-any-return]

    # -- processes ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        slot._restart = None
        if self.stopping:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slot.process = self.reactor.spawnProcess(
                _WorkerProcess(self, slot),
                self._python,
                [
                    self._python,
                    "-m",
                    "mailgw.workers.worker",
                    "--config",
                    str(self.config_path),
                    "--index",
                    str(slot.index),
                ],
                env=self._environ,
                childFDs={1: 1, 2: 2, CHANNEL_FD: child.fileno()},
            )
        except OSError as e:
            parent.close()
            child.close()
            self.log.error("Worker {worker} could not be started: {reason}", worker=slot.index, reason=str(e))
            self._schedule_restart(slot)
            return
        child.close()
        channel = SupervisorChannel(self, slot)
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: channel))
        parent.close()
        slot.channel = channel
        slot.state = "starting"
        slot.started = self.clock.seconds()
        slot.sent = set()
        slot.ended = defer.Deferred()
        self.log.info("Worker {worker} started (pid {pid})", worker=slot.index, pid=slot.pid)

    def hello(self, slot: WorkerSlot, channel: SupervisorChannel, index: int, pid: int) -> dict[str, Any]:
        if index != slot.index:
            self.log.warn("Worker {worker} said it is worker {index}", worker=slot.index, index=index)
        self._send_listeners(slot, channel)
        answer: dict[str, Any] = {"track": self.track}
        if self.ticket_rotation is not None:
            answer["ticket_key"] = self.ticket_rotation.key
        return answer

    def _ticket_key_changed(self, key: bytes) -> None:
        # Every worker with a channel: one that has not said Hello yet gets the same
        # key again in the answer.
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.callRemote(c.TicketKey, key=key)

    def _send_listeners(self, slot: WorkerSlot, channel: SupervisorChannel) -> None:
        for key, port in list(self.held.ports.items()):
            if port.serial not in slot.sent:
                slot.sent.add(port.serial)
                channel.callRemote(c.AdoptListener, key=key, fd=port.socket.fileno(), family=port.family).addErrback(
                    lambda f, k=key: self.log.warn(
                        "Worker {worker} did not take the socket of {key}: {reason}",
                        worker=slot.index,
                        key=k,
                        reason=f.getErrorMessage(),
                    )
                )

    def ready(self, slot: WorkerSlot) -> None:
        slot.state = "ready"
        if slot.restarts:
            self.log.info("Worker {worker} (pid {pid}) serves again", worker=slot.index, pid=slot.pid)
        if not self._announced and all(s.state == "ready" for s in self.slots):
            self._announced = True
            self.log.info("All {count} workers serve", count=self.count)
            self.notifier.ready(f"serving with {self.count} workers")
            self.all_ready.callback(None)

    def ended(self, slot: WorkerSlot, reason: Failure) -> None:
        self.anvil.worker_gone(slot.index)
        lived = self.clock.seconds() - slot.started
        value = reason.value
        code = getattr(value, "exitCode", None)
        signum = getattr(value, "signal", None)
        slot.last_exit = f"signal {signum}" if signum else f"exit status {code}"
        slot.process = None
        slot.state = "stopped"
        ended, slot.ended = slot.ended, None
        if ended is not None:
            ended.callback(None)
        if self.stopping:
            self.log.info("Worker {worker} stopped ({how})", worker=slot.index, how=slot.last_exit)
            return
        slot.restart_delay = 1.0 if lived >= STABLE_AFTER else min(MAX_RESTART_DELAY, slot.restart_delay * 2)
        self.log.warn(
            "Worker {worker} ended ({how}) after {lived:.0f} s: its sessions are gone;"
            " starting it again in {delay:.0f} s",
            worker=slot.index,
            how=slot.last_exit,
            lived=lived,
            delay=slot.restart_delay,
        )
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: WorkerSlot) -> None:
        slot.restarts += 1
        slot.state = "restarting"
        slot._restart = self.clock.callLater(slot.restart_delay, self._spawn, slot)  # type: ignore[attr-defined]

    async def drain(self, timeout: float) -> None:
        """Stop every worker gracefully (each finishes its logged-in sessions within
        its grace period); those still running after C{timeout} are killed."""
        self.stopping = True
        waiting = []
        for slot in self.slots:
            if slot._restart is not None and slot._restart.active():
                slot._restart.cancel()
                slot._restart = None
            if slot.process is None or slot.ended is None:
                continue
            waiting.append(slot.ended)
            if slot.channel is not None:
                slot.channel.callRemote(c.Drain).addErrback(lambda _: None)
            else:
                self._signal(slot, "TERM")
        deadline = time.monotonic() + timeout
        while any(not d.called for d in waiting) and time.monotonic() < deadline:
            await deferLater(self.clock, 0.05)
        for slot in self.slots:
            if slot.process is not None:
                self.log.warn(
                    "Worker {worker} did not stop within {timeout:.0f} s: killed", worker=slot.index, timeout=timeout
                )
                self._signal(slot, "KILL")
        if waiting:
            await defer.DeferredList(waiting)

    @staticmethod
    def _signal(slot: WorkerSlot, signal: str) -> None:
        if slot.process is not None:
            try:
                slot.process.signalProcess(signal)
            except error.ProcessExitedAlready:
                pass

    def stopService(self) -> defer.Deferred[None] | None:  # type: ignore[override]
        super().stopService()
        if all(slot.process is None for slot in self.slots):
            return None
        return defer.Deferred.fromCoroutine(self.drain(5.0))

    # -- the tables ----------------------------------------------------------------------

    @property
    def track(self) -> bool:
        return any(limit > 0 for limit in self.anvil.limits.values())

    def configure(self, limits: Mapping[str, int]) -> None:
        """A reload's C{unauthenticated_session_limit}s."""
        self.anvil.limits = dict(limits)
        for slot in self.slots:
            if slot.channel is not None and slot.state == "ready":
                slot.channel.callRemote(c.Track, track=self.track).addErrback(lambda _: None)

    def claim(self, slot: WorkerSlot, session: Mapping[str, Any], limit: int, local: list[list[str]]) -> None:
        record = DirectorySession(
            str(session["node"]), str(session["session_id"]), str(session["login_id"]), str(session["protocol"]),
            str(session["client"]), str(session["client_ip"]), str(session["user"]), session.get("mail_user"),
            session.get("group_policy"), session.get("upstream"), float(session["started"]),
        )  # fmt: skip
        self.log_off(self.anvil.claim(slot.index, record, limit, [(str(ip), str(p)) for ip, p in local]))

    def log_off(self, requests: list[LogOff]) -> None:
        for request in requests:
            slot = self.slots[request.worker - 1]
            self.log.info(
                "Asking worker {worker} to log off {count} session(s): {reason}",
                worker=request.worker,
                count=len(request.session_ids),
                reason=request.reason,
            )
            if slot.channel is not None:
                slot.channel.callRemote(
                    c.Terminate, session_ids=list(request.session_ids), reason=request.reason, cause=request.cause
                )

    # -- questions for the admin channel -----------------------------------------------

    def _serving(self) -> list[WorkerSlot]:
        return [slot for slot in self.slots if slot.channel is not None and slot.state == "ready"]

    async def _ask_all(self, command: type[amp.Command], **arguments: Any) -> list[tuple[WorkerSlot, Any]]:
        slots = self._serving()
        calls = [
            slot.channel.callRemote(command, **arguments).addTimeout(ASK_TIMEOUT, self.clock)  # type: ignore[union-attr]
            for slot in slots
        ]
        results = await defer.DeferredList(calls, consumeErrors=True)
        answers = []
        for slot, (ok, answer) in zip(slots, results, strict=True):
            if ok:
                answers.append((slot, answer))
            else:
                self.log.warn(
                    "Worker {worker} did not answer {command}: {reason}",
                    worker=slot.index, command=command.__name__, reason=answer.getErrorMessage(),
                )  # fmt: skip
        return answers

    async def sessions(self, protocol: str | None) -> list[dict[str, Any]]:
        """Every worker's live sessions."""
        answers = await self._ask_all(c.Sessions, protocol=protocol)
        return [dict(s, worker=slot.index) for slot, answer in answers for s in answer["sessions"]]

    async def kill(self, session_id: str, reason: str) -> dict[str, Any] | None:
        """Log off C{session_id} on the worker holding it; its view, or C{None}."""
        for slot, answer in await self._ask_all(c.Kill, session_id=session_id, reason=reason):
            if answer["session"] is not None:
                return dict(answer["session"], worker=slot.index)
        return None

    async def status(self) -> list[dict[str, Any]]:
        """Each worker: its process and, when it answers, its own status."""
        answers = {slot.index: answer["status"] for slot, answer in await self._ask_all(c.WorkerStatus)}
        now = self.clock.seconds()
        return [
            {
                "worker": slot.index,
                "pid": slot.pid,
                "state": slot.state,
                "uptime": max(0.0, now - slot.started) if slot.process is not None else None,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                **answers.get(slot.index, {}),
            }
            for slot in self.slots
        ]

    async def flush(self, group: str | None, user: str | None) -> int:
        """C{aaa flush} in every worker's cache; how many entries they forgot."""
        return sum(int(answer["flushed"]) for _, answer in await self._ask_all(c.Flush, group=group, user=user))

    async def metrics(self) -> list[tuple[int, str]]:
        """Each worker's metrics (Prometheus text)."""
        return [(slot.index, str(answer["text"])) for slot, answer in await self._ask_all(c.MetricsText)]

    async def reload(self, path: str) -> list[str]:
        """Every worker loads C{path} again (after getting the sockets of new listeners);
        the problems they met, each naming its worker."""
        for slot in self._serving():
            assert slot.channel is not None
            self._send_listeners(slot, slot.channel)
        problems = []
        for slot, answer in await self._ask_all(c.Reload, path=path):
            problems += [f"worker {slot.index}: {problem}" for problem in answer["problems"]]
        return problems
