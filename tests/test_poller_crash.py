"""Crash safety of the poller [6]: the poller runs in a process of its own
(:mod:`tests.servers.poller_runner`) that kills itself with SIGKILL at one fault point
of the second message's delivery; it is then run again without the fault, and the end
state is checked: every message delivered exactly once and the remote mailbox empty,
except after the SMTP server's ``250`` and before the journal commit, where the second
message arrives twice and the redelivery is detected and logged."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailgw.poller.poll import FAULT_POINTS
from tests.servers.poller_fixtures import PollerHarness, message, strip_trace

ROOT = Path(__file__).resolve().parent.parent


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[tuple[bytes, bytes, int | None, int | None]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        assert isinstance(value, ProcessDone | ProcessTerminated)
        self.ended.callback((bytes(self.out), bytes(self.err), value.exitCode, value.signal))


async def run_poller(
    harness: PollerHarness, account_id: int, log: Path, fault_at: str | None = None, hit: int = 1
) -> tuple[bytes, bytes, int | None, int | None]:
    """Run one poll in a child process: (stdout, stderr, exit code, signal)."""
    args = [
        sys.executable,
        "-m",
        "tests.servers.poller_runner",
        "--state",
        str(harness.state_dir),
        "--smtp",
        f"{harness.sink.host}:{harness.sink.port}",
        "--account",
        str(account_id),
        "--log",
        str(log),
    ]
    if fault_at:
        args += ["--fault-at", fault_at, "--fault-hit", str(hit)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    collect = _Collect()
    reactor.spawnProcess(collect, sys.executable, args, env=env, path=str(ROOT))  # type: ignore[attr-defined]
    return await collect.ended


def log_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class CrashTests(TestCase):
    timeout = 60

    async def crash_and_restart(
        self, point: str
    ) -> tuple[PollerHarness, list[bytes], dict[str, Any], list[dict[str, Any]]]:
        """Three messages; SIGKILL at C{point} on the second; restart; returns the
        harness, the messages, the second run's report and log events."""
        h = await PollerHarness.create(self)
        messages = [
            message([("To", "alice@example.com")]),
            message([("To", "bob@example.com")]),
            message([("To", "alice@example.com"), ("Cc", "bob@example.com")]),
        ]
        for data in messages:
            h.deliver(data)
        account = await h.add_account()
        await h.state.close()  # the child processes own the database now
        folder = h.state_dir
        out, err, code, killed = await run_poller(h, account["id"], folder / "crash.log", point, hit=2)
        self.assertEqual(killed, signal.SIGKILL, f"exit {code}: {err.decode(errors='replace')[-2000:]}")
        out, err, code, killed = await run_poller(h, account["id"], folder / "restart.log")
        self.assertEqual((code, killed), (0, None), (out + err).decode(errors="replace")[-3000:])
        report = json.loads(out.decode().strip().splitlines()[-1])
        return h, messages, report, log_events(folder / "restart.log")

    def assertDeliveredOnce(self, h: PollerHarness, messages: list[bytes], twice: bytes | None = None) -> None:
        """Each message reached the SMTP server once (C{twice} twice), and the remote
        mailbox is empty."""
        originals: Counter[bytes] = Counter()
        for got in h.sink.messages:
            assert got.data is not None
            originals[strip_trace(got.data)[1]] += 1
        for data in messages:
            self.assertEqual(originals[data], 2 if data is twice else 1, data[:200])
        self.assertEqual(sum(originals.values()), len(messages) + (1 if twice is not None else 0))
        self.assertEqual(h.remote_count(), 0)

    async def check_exactly_once(self, point: str, *, redelivery_logged: bool = False) -> None:
        h, messages, report, events = await self.crash_and_restart(point)
        self.assertTrue(report["ok"], report)
        self.assertDeliveredOnce(h, messages)
        duplicates = [e for e in events if e.get("kind") == "possible_duplicate"]
        self.assertEqual(len(duplicates), 1 if redelivery_logged else 0, duplicates)

    async def test_afterRetr(self) -> None:
        """Killed after RETR: nothing was sent; delivered once after the restart."""
        await self.check_exactly_once("after_retr")

    async def test_duringData(self) -> None:
        """Killed during DATA: the SMTP server drops the unfinished transaction; the
        restart delivers the message once, logging the interrupted delivery (and no
        possible duplicate: the end of DATA was never sent)."""
        h, messages, report, events = await self.crash_and_restart("during_data")
        self.assertDeliveredOnce(h, messages)
        self.assertEqual(h.sink.aborted, 1)
        self.assertEqual(report["possible_duplicates"], [])
        self.assertEqual(len([e for e in events if e.get("kind") == "interrupted_delivery"]), 1)

    async def test_after250BeforeCommit(self) -> None:
        """Killed between the 250 and the journal commit, the one window no protocol
        closes: the message arrives twice, and the redelivery is detected and logged
        with its UIDL."""
        h, messages, report, events = await self.crash_and_restart("after_250_before_commit")
        self.assertTrue(report["ok"], report)
        self.assertDeliveredOnce(h, messages, twice=messages[1])
        [uidl] = report["possible_duplicates"]
        [event] = [e for e in events if e.get("kind") == "possible_duplicate"]
        self.assertEqual(event["uidl"], uidl)
        self.assertIn("possible duplicate", event["message"])
        self.assertEqual(event["level"], "warn")

    async def test_afterCommit(self) -> None:
        """Killed after the journal commit, before DELE: no redelivery, deleted after
        the restart."""
        await self.check_exactly_once("after_commit")

    async def test_beforeDele(self) -> None:
        """Killed just before DELE: same as after the commit."""
        await self.check_exactly_once("before_dele")

    async def test_afterDele(self) -> None:
        """Killed after DELE but before QUIT (the server rolls the deletion back): the
        restart deletes it again without delivering it again."""
        await self.check_exactly_once("after_dele")

    def test_everyPointCovered(self) -> None:
        """Every fault point of the poll has its crash test."""
        tests = {
            "after_retr": self.test_afterRetr,
            "during_data": self.test_duringData,
            "after_250_before_commit": self.test_after250BeforeCommit,
            "after_commit": self.test_afterCommit,
            "before_dele": self.test_beforeDele,
            "after_dele": self.test_afterDele,
        }
        self.assertEqual(set(tests), set(FAULT_POINTS))
