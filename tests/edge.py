"""Shared pieces of the edge tests [4.1, 4.10]: the hostile client run as its own
process (tests/floodclient.py), raw TLS clients in threads, and waiting for the
gateway's side of a connection to be gone (judged in the socket table)."""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, threads
from twisted.python.failure import Failure

from tests.gateway import deferLater
from tests.sockets import HeldSocket, held_sockets

ROOT = Path(__file__).resolve().parent.parent


class FloodClient(protocol.ProcessProtocol):
    """tests/floodclient.py in a child process: C{ready} fires with the first output
    line starting with "ready"; C{ended} with all output once it exits."""

    #: the modes that hold their connections and say "ready"
    HOLDING = frozenset({"tcp", "half-hello", "tls-idle"})

    def __init__(self, holding: bool = True) -> None:
        self.holding = holding
        self.output = b""
        self.ready: defer.Deferred[str] = defer.Deferred()
        self.ended: defer.Deferred[str] = defer.Deferred()

    @classmethod
    def start(cls, mode: str, port: int, *args: str) -> FloodClient:
        client = cls(holding=mode in cls.HOLDING)
        argv = [sys.executable, "-m", "tests.floodclient", mode, "--port", str(port), *args]
        reactor.spawnProcess(client, sys.executable, argv, env=None, path=str(ROOT))  # type: ignore[attr-defined]
        return client

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called:
            for line in self.output.decode(errors="replace").splitlines():
                if line.startswith("ready"):
                    self.ready.callback(line)
                    break

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def release(self) -> None:
        """Let a holding client close its connections and exit."""
        if self.transport is not None:
            self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        text = self.output.decode(errors="replace")
        if not self.ready.called:
            if self.holding:
                self.ready.errback(RuntimeError(f"flood client ended before ready: {text}"))
            else:
                self.ready.callback(text)
        self.ended.callback(text)


async def gone_within(seconds: float, *, local_port: int | None = None, remote_port: int | None = None) -> float:
    """Wait until the gateway holds no socket with these ports; returns the time it
    took, or fails the test (with what is still held) after C{seconds}."""
    start = reactor.seconds()  # type: ignore[attr-defined]
    held: list[HeldSocket] = []
    while True:
        held = held_sockets(local_port=local_port, remote_port=remote_port)
        elapsed = float(reactor.seconds() - start)  # type: ignore[attr-defined]
        if not held:
            return elapsed
        if elapsed > seconds:
            raise AssertionError(f"still held after {elapsed:.1f}s: {held[:5]} ({len(held)} in all)")
        await deferLater(0.05)


async def held_within(count: int, seconds: float, *, local_port: int | None = None) -> None:
    """Wait until the gateway holds C{count} sockets on C{local_port} (it accepts
    them at its own pace); fails the test after C{seconds}."""
    start = reactor.seconds()  # type: ignore[attr-defined]
    while len(held_sockets(local_port=local_port)) != count:
        if reactor.seconds() - start > seconds:  # type: ignore[attr-defined]
            raise AssertionError(f"{len(held_sockets(local_port=local_port))} sockets held, expected {count}")
        await deferLater(0.05)


def in_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(f, *args)


def tls_connect(port: int, cafile: Path | str, *, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS client socket to the gateway (blocking; call from a thread)."""
    context = ssl.create_default_context(cafile=str(cafile))
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return context.wrap_socket(raw, server_hostname="localhost")


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read until C{marker} is in what was read (blocking; from a thread)."""
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def client_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])
