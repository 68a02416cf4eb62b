"""Shared set-up of the poller tests: a remote mailbox in a real Dovecot, a
:class:`~tests.servers.poller_smtp.PollerSink` as the local domain's SMTP server, a
state folder with its SQLite store, and a :class:`~mailgw.poller.service.PollerService`
(not started: the tests poll with ``check_now``/``poll``).

::

    harness = await PollerHarness.create(self)
    harness.dovecot.deliver("remote", message(...))
    account = await harness.add_account()
    report = await harness.poll(account["id"])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailgw.config import GatewayConfig, PollerConfig
from mailgw.poller.poll import Fault, PollReport
from mailgw.poller.service import PollerService
from mailgw.state.sqlite import SQLiteState
from mailgw.upstream import Connector
from tests.servers.dovecot import Dovecot
from tests.servers.poller_smtp import PollerSink

__all__ = ["DOMAIN", "REMOTE_PASSWORD", "REMOTE_USER", "PollerHarness", "environment", "message"]

DOMAIN = "example.com"
REMOTE_USER = "remote"
REMOTE_PASSWORD = "remote-secret-Pw"
NODE_NAME = "mailgw-test"

_counter = itertools.count(1)


class PollerEnvironmentForTests:
    """The ``[poller]`` and ``[gateway]`` sections without a configuration file."""

    def __init__(self, poller: PollerConfig, gateway: GatewayConfig) -> None:
        self._poller = poller
        self._gateway = gateway

    @property
    def poller(self) -> PollerConfig:
        return self._poller

    @property
    def gateway(self) -> GatewayConfig:
        return self._gateway


def environment(
    state_dir: Path, smtp_host: str, smtp_port: int, node_name: str = NODE_NAME, *, enabled: bool = True
) -> PollerEnvironmentForTests:
    return PollerEnvironmentForTests(
        PollerConfig(enabled=enabled, default_interval=300, smtp_host=smtp_host, smtp_port=smtp_port),
        GatewayConfig(state_dir=state_dir, log_format="json", node_name=node_name, workers=1),
    )


def message(
    headers: list[tuple[str, str]] | None = None,
    body: str = "Hello,\r\n\r\na test message.\r\n",
    *,
    message_id: str | None = None,
    subject: str | None = None,
) -> bytes:
    """A message with CRLF line ends (byte-identical through Dovecot's RETR): From,
    Subject, Date and Message-ID, then ``headers`` as given, then the body."""
    number = next(_counter)
    lines = [
        "Return-Path: <sender@example.net>",
        "From: Sender <sender@example.net>",
        f"Subject: {subject or f'test message {number}'}",
        "Date: Mon, 01 Jan 2024 12:00:00 +0000",
        f"Message-ID: {message_id or f'<poller-{number}@example.net>'}",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or [])]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


def strip_trace(data: bytes) -> tuple[bytes, bytes]:
    """Split what the poller delivered into its ``Received`` trace header (first
    field, with its folded lines) and the original message."""
    assert data.startswith(b"Received: "), data[:100]
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


class PollerHarness:
    """Dovecot, sink, state and poller for one test."""

    def __init__(self, testcase: TestCase, dovecot: Dovecot, sink: PollerSink, state_dir: Path) -> None:
        self.testcase = testcase
        self.dovecot = dovecot
        self.sink = sink
        self.state_dir = state_dir
        self.state = SQLiteState(state_dir / "state.sqlite3", reactor)
        self.service: PollerService | None = None
        self.clock = ShiftedClock()

    @classmethod
    async def create(
        cls,
        testcase: TestCase,
        *,
        dovecot: Dovecot | None = None,
        fault: Fault | None = None,
        node_name: str = NODE_NAME,
    ) -> PollerHarness:
        dovecot = dovecot or Dovecot.started(testcase, users={REMOTE_USER: REMOTE_PASSWORD})
        sink = PollerSink.started(testcase)
        state_dir = Path(testcase.mktemp()).absolute()
        state_dir.mkdir(mode=0o700, parents=True)
        harness = cls(testcase, dovecot, sink, state_dir)
        await harness.state.start()
        testcase.addCleanup(harness.state.close)
        harness.service = harness.make_service(fault=fault, node_name=node_name, clock=harness.clock)
        return harness

    def make_service(self, *, fault: Fault | None = None, node_name: str = NODE_NAME, **kwargs: Any) -> PollerService:
        return PollerService(
            environment(self.state_dir, self.sink.host, self.sink.port, node_name),
            self.state,
            Connector(reactor),
            reactor,
            fault=fault,
            **kwargs,
        )

    def account_fields(self, **fields: Any) -> dict[str, Any]:
        """Fields of an account on the Dovecot mailbox (implicit TLS, verified)."""
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.dovecot.pop3s_port,
            "tls": "implicit",
            "ca": str(self.dovecot.ca_path),
            "username": REMOTE_USER,
            "password": REMOTE_PASSWORD,
            "domain": DOMAIN,
            "description": "test mailbox",
        }
        base.update(fields)
        return base

    async def add_account(self, **fields: Any) -> dict[str, Any]:
        assert self.service is not None
        return await self.service.accounts.add(self.account_fields(**fields))

    async def poll(self, account_id: int) -> PollReport:
        assert self.service is not None
        return await self.service.poll(account_id)

    def remote_count(self) -> int:
        """Messages left in the remote mailbox (files in the maildir)."""
        maildir = self.dovecot.maildir(REMOTE_USER)
        return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())

    def deliver(self, data: bytes) -> None:
        self.dovecot.deliver(REMOTE_USER, data)


@implementer(IReactorTime)
class ShiftedClock:
    """The reactor's clock, moved forward by :attr:`offset` seconds (for "leave on
    the server N days" without waiting days); delayed calls still use real time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def seconds(self) -> float:
        return float(reactor.seconds()) + self.offset  # type: ignore[attr-defined]

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object) -> IDelayedCall:
        return reactor.callLater(delay, callable, *args, **kwargs)  # type: ignore[attr-defined,no-any-return]

    def getDelayedCalls(self) -> Any:
        return reactor.getDelayedCalls()  # type: ignore[attr-defined]
