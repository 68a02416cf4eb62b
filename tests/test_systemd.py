"""Tests for :mod:`mailgw.systemd` and ``etc/mailgw.service`` (SPEC [8.4])."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.systemd import SystemdNotifier, notify_address, sd_notify
from tests.servers.base import require_binary

UNIT = Path(__file__).resolve().parent.parent / "etc" / "mailgw.service"
TWISTD = str(Path(sys.executable).parent / "twistd")


def capture_events(testcase: SynchronousTestCase) -> EventLoggingObserver:
    """The log events emitted during the test."""
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    testcase.addCleanup(globalLogPublisher.removeObserver, events)
    return events


class NotifySocket:
    """A datagram socket standing in for systemd's, at a path or in the abstract
    namespace."""

    def __init__(self, testcase: SynchronousTestCase, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testcase.addCleanup(self.sock.close)
        if abstract:
            name = f"mailgw-test-{secrets.token_hex(8)}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            # A short folder: socket paths are limited to 108 bytes.
            folder = tempfile.mkdtemp(prefix="mailgw-sd-")
            testcase.addCleanup(shutil.rmtree, folder, True)
            self.address = os.path.join(folder, "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.environ = {"NOTIFY_SOCKET": self.address}

    def received(self) -> list[str]:
        """The datagrams waiting, oldest first."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


class SdNotifyTests(SynchronousTestCase):
    """sd_notify speaks systemd's datagram protocol, quietly does nothing outside it."""

    def test_pathSocket(self) -> None:
        """A datagram reaches a NOTIFY_SOCKET given as a file path."""
        listener = NotifySocket(self)
        self.assertTrue(sd_notify("READY=1", environ=listener.environ))
        self.assertEqual(listener.received(), ["READY=1"])

    def test_abstractSocket(self) -> None:
        """A NOTIFY_SOCKET starting with C{@} is in the abstract namespace."""
        listener = NotifySocket(self, abstract=True)
        self.assertTrue(sd_notify("STOPPING=1", environ=listener.environ))
        self.assertEqual(listener.received(), ["STOPPING=1"])

    def test_noSocket(self) -> None:
        """Without NOTIFY_SOCKET (not run by systemd) nothing is sent and nothing is
        logged."""
        events = capture_events(self)
        self.assertFalse(sd_notify("READY=1", environ={}))
        self.assertFalse(sd_notify("READY=1", environ={"NOTIFY_SOCKET": ""}))
        self.assertEqual(len(events), 0)

    def test_unsupportedAddress(self) -> None:
        """Addresses of other kinds (vsock) are not used."""
        self.assertIsNone(notify_address({"NOTIFY_SOCKET": "vsock:2:9999"}))
        self.assertFalse(sd_notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:9999"}))

    def test_goneSocket(self) -> None:
        """A socket that is gone makes sd_notify return False and log a warning, never
        raise."""
        events = capture_events(self)
        folder = tempfile.mkdtemp(prefix="mailgw-sd-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.assertFalse(sd_notify("READY=1", environ={"NOTIFY_SOCKET": os.path.join(folder, "gone")}))
        self.assertEqual(len(events), 1)
        self.assertIn("failed", events[0]["log_format"])

    def test_neverBlocks(self) -> None:
        """When systemd does not read (its queue is full), sd_notify returns False at
        once instead of blocking the reactor."""
        listener = NotifySocket(self)
        events = capture_events(self)
        for _ in range(100_000):
            if not sd_notify("STATUS=" + "x" * 1000, environ=listener.environ):
                break
        else:
            self.fail("the receiver's queue never filled up")
        self.assertTrue(events)


class SystemdNotifierTests(SynchronousTestCase):
    """The notifier's messages, as systemd receives them."""

    def setUp(self) -> None:
        self.listener = NotifySocket(self, abstract=True)
        self.notifier = SystemdNotifier(environ=self.listener.environ, monotonic_usec=lambda: 123456789)

    def test_lifecycle(self) -> None:
        """READY=1 when started; RELOADING=1 with MONOTONIC_USEC then READY=1 around a
        reload; STOPPING=1 when stopped."""
        self.notifier.startService()
        self.notifier.reloading()
        self.notifier.ready()
        self.notifier.stopService()
        self.assertEqual(
            self.listener.received(),
            [
                "READY=1\nSTATUS=serving",
                "RELOADING=1\nMONOTONIC_USEC=123456789",
                "READY=1",
                "STOPPING=1\nSTATUS=stopping: finishing sessions",
            ],
        )
        self.assertEqual(list(self.notifier.sent)[-1], "STOPPING=1\nSTATUS=stopping: finishing sessions")

    def test_stoppingOnce(self) -> None:
        """STOPPING=1 is sent once, whether the stop was announced early or not."""
        self.notifier.startService()
        self.assertTrue(self.notifier.stopping("draining"))
        self.assertFalse(self.notifier.stopping())
        self.notifier.stopService()
        self.assertEqual(self.listener.received(), ["READY=1\nSTATUS=serving", "STOPPING=1\nSTATUS=draining"])

    def test_status(self) -> None:
        """A status is one line: a newline cannot smuggle in another assignment."""
        self.assertTrue(self.notifier.status("reload failed:\nREADY=1"))
        self.notifier.reloading("reloading")
        self.assertEqual(
            self.listener.received(),
            ["STATUS=reload failed: READY=1", "RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=reloading"],
        )

    def test_monotonicClock(self) -> None:
        """By default MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds, as systemd
        compares it with its own."""
        notifier = SystemdNotifier(environ=self.listener.environ)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        [message] = self.listener.received()
        match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", message)
        assert match is not None
        self.assertTrue(before <= int(match.group(1)) <= after)

    def test_readyAfterSiblings(self) -> None:
        """Added last to the root service, the notifier sends READY=1 after the other
        services started, and STOPPING=1 before they stop."""
        root = MultiService()
        order: list[str] = []

        class Recorder(Service):
            def startService(self) -> None:
                super().startService()
                order.append("listener started")

            def stopService(self) -> None:
                order.append("listener stopped")
                super().stopService()

        class Notifier(SystemdNotifier):
            def notify(self, *assignments: str) -> bool:
                order.append(assignments[0])
                return super().notify(*assignments)

        Recorder().setServiceParent(root)
        Notifier(environ=self.listener.environ).setServiceParent(root)
        root.startService()
        root.stopService()
        self.assertEqual(order, ["listener started", "READY=1", "STOPPING=1", "listener stopped"])

    def test_outsideSystemd(self) -> None:
        """Outside systemd the notifier works and sends nothing."""
        notifier = SystemdNotifier(environ={})
        self.assertFalse(notifier.enabled)
        self.assertTrue(self.notifier.enabled)
        notifier.startService()
        self.assertFalse(notifier.reloading())
        notifier.stopService()
        self.assertEqual(len(notifier.sent), 3)


def unit_settings(text: str) -> dict[str, list[str]]:
    """C{Section.Key} → values of a unit file (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


class UnitFileTests(TestCase):
    """etc/mailgw.service is a valid, hardened Type=notify unit."""

    def setUp(self) -> None:
        self.text = UNIT.read_text()
        self.settings = unit_settings(self.text)

    def setting(self, key: str) -> str:
        values = self.settings.get(key)
        self.assertIsNotNone(values, f"{key} missing from {UNIT}")
        assert values is not None
        return values[-1]

    def test_contract(self) -> None:
        """The unit runs twistd in the foreground with sd_notify readiness and reloads
        with SIGHUP, as a non-root user."""
        self.assertEqual(self.setting("Service.Type"), "notify")
        self.assertEqual(self.setting("Service.NotifyAccess"), "main")
        exec_start = self.setting("Service.ExecStart").split()
        self.assertEqual(exec_start[0], "/usr/bin/twistd")
        self.assertIn("--nodaemon", exec_start)
        self.assertIn("--pidfile=", exec_start)
        self.assertEqual(exec_start[-3:], ["mailgw", "--config", "/etc/mailgw/mailgw.toml"])
        self.assertEqual(self.setting("Service.ExecReload"), "/bin/kill -HUP $MAINPID")
        self.assertEqual(self.setting("Service.User"), "mailgw")
        self.assertEqual(self.setting("Service.Group"), "mailgw")
        self.assertEqual(self.setting("Service.Restart"), "on-failure")
        self.assertEqual(self.setting("Install.WantedBy"), "multi-user.target")

    def test_hardening(self) -> None:
        """Privileged ports by capability only, and the file system read-only but for
        the state and runtime folders."""
        expected = {
            "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "ReadWritePaths": "/var/lib/mailgw /run/mailgw",
            "StateDirectory": "mailgw",
            "RuntimeDirectory": "mailgw",
            "RuntimeDirectoryMode": "0750",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
            "SystemCallArchitectures": "native",
            "LockPersonality": "yes",
        }
        for key, value in expected.items():
            self.assertEqual(self.setting(f"Service.{key}"), value, key)
        # It breaks pyOpenSSL's cffi callbacks, so TLS (see the unit's comment).
        self.assertNotIn("Service.MemoryDenyWriteExecute", self.settings)

    def test_stopTimeout(self) -> None:
        """systemd waits longer than the graceful stop's grace period (30 s) before it
        kills the daemon."""
        self.assertGreater(int(self.setting("Service.TimeoutStopSec")), 30)

    def runnable_copy(self, text: str | None = None) -> Path:
        """The unit with ExecStart pointing at this virtualenv's twistd: verify checks
        that the command exists, and /usr/bin/twistd is not installed here."""
        folder = Path(self.mktemp())
        folder.mkdir()
        copy = folder / "mailgw.service"
        copy.write_text((text or self.text).replace("/usr/bin/twistd", TWISTD))
        return copy

    async def verify(self, unit: Path) -> tuple[int, list[str]]:
        """systemd-analyze verify's exit code and its complaints about C{unit} (those
        about the machine's other units are left out)."""
        analyze = require_binary("systemd-analyze", "systemd")
        out, err, code = await getProcessOutputAndValue(analyze, ["verify", str(unit)], env=dict(os.environ))
        lines = (out + err).decode(errors="replace").splitlines()
        return code, [line for line in lines if str(unit) in line or unit.name in line]

    async def test_systemdAnalyzeVerify(self) -> None:
        """C{systemd-analyze verify} accepts the unit without a complaint (on a copy whose
        ExecStart names this virtualenv's twistd)."""
        code, complaints = await self.verify(self.runnable_copy())
        self.assertEqual((code, complaints), (0, []))

    async def test_verifyCatchesMistakes(self) -> None:
        """The check above is meaningful: a misspelled value or key is caught."""
        broken = re.sub("^Type=notify$", "Type=notifyy\nProtectSytem=strict", self.text, flags=re.MULTILINE)
        _, complaints = await self.verify(self.runnable_copy(broken))
        self.assertEqual(len(complaints), 2, complaints)

    async def test_missingCommand(self) -> None:
        """verify checks the command: the unit as shipped is refused where twistd is
        not at /usr/bin/twistd (which is why the test above verifies a copy)."""
        if os.path.exists("/usr/bin/twistd"):
            self.skipTest("/usr/bin/twistd exists here")
        code, complaints = await self.verify(UNIT)
        self.assertNotEqual(code, 0)
        self.assertTrue(any("/usr/bin/twistd" in line for line in complaints), complaints)

    async def test_securityExposure(self) -> None:
        """C{systemd-analyze security} rates the unit's exposure low (below 3 of 10)."""
        analyze = require_binary("systemd-analyze", "systemd")
        unit = self.runnable_copy()
        out, err, _ = await getProcessOutputAndValue(
            analyze, ["security", "--offline=yes", "--no-pager", str(unit)], env=dict(os.environ)
        )
        text = (out + err).decode(errors="replace")
        match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text)
        self.assertIsNotNone(match, text[-2000:])
        assert match is not None
        self.assertLess(float(match.group(1)), 3.0, text)
