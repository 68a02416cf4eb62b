"""The daemon as administrators run it: ``twistd -n mailgw --config PATH`` in a
subprocess, in front of a real Dovecot, with curl as the client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.gateway import Gateway, deferLater
from tests.servers.base import port_accepts
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI

TWISTD = str(Path(sys.executable).parent / "twistd")


class Collector(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        signum = getattr(reason.value, "signal", None)
        # twistd re-raises the signal that stopped it: report it as -signum.
        self.ended.callback(code if code is not None else -(signum or 255))


def spawn_twistd(testcase: TestCase, config: Path, cwd: Path, **environ: str) -> tuple[Collector, Any]:
    """Start ``twistd -n mailgw --config CONFIG``; killed (if still running) on cleanup."""
    collector = Collector()
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        collector,
        TWISTD,
        [TWISTD, "-n", "--pidfile=", "mailgw", "--config", str(config)],
        env=dict(os.environ, **environ),
        path=str(cwd),
    )

    def kill() -> defer.Deferred[int] | None:
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            return None
        return collector.ended

    testcase.addCleanup(kill)
    return collector, process


class PluginTests(SynchronousTestCase):
    def test_pluginFound(self) -> None:
        """getPlugins(IServiceMaker) finds the mailgw plugin."""
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("mailgw", names)


class TwistdBase(TestCase):
    """A real Dovecot and a gateway configuration for twistd to run."""

    timeout = 120

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users={"alice": "alice-mail"})
        self.messages = self.dovecot.seed_standard("alice")
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        self.pki = TestPKI(directory / "pki")
        self.gateway = Gateway(directory, self.pki, {"alice": ("alice-mail", None)})
        self.addCleanup(shutil.rmtree, self.gateway.socket_dir, True)

    def config(self, **gateway: Any) -> dict[str, Any]:
        data = self.gateway.config_data(
            {"default_server": {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"}},
        )
        data["gateway"].update(gateway)
        return data

    async def run_twistd(self, data: dict[str, Any], **environ: str) -> tuple[Collector, Any]:
        return spawn_twistd(self, self.gateway.write_config(data), self.gateway.directory, **environ)

    async def wait_listening(self, port: int, collector: Collector) -> None:
        for _ in range(300):
            if collector.ended.called:
                self.fail(f"twistd exited: {collector.out.decode()} {collector.err.decode()}")
            if port_accepts("127.0.0.1", port, timeout=0.05):
                return
            await deferLater(0.05)
        self.fail("twistd did not start listening")



class TwistdTests(TwistdBase):
    async def test_curlThroughTwistd(self) -> None:
        """twistd -n mailgw starts the gateway; curl fetches a message through it;
        SIGTERM stops it cleanly; the JSON log has the stable fields and no password."""
        data = self.config(log_format="json")
        collector, process = await self.run_twistd(data)
        port = data["pop3s"]["port"]
        await self.wait_listening(port, collector)
        out, err, code = await getProcessOutputAndValue(
            "curl",
            [
                "--silent", "--show-error", "--max-time", "30",
                "--cacert", str(self.pki.ca_path),
                "-u", "alice:alice-mail",
                f"pop3s://localhost:{port}/1",
            ],
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, self.messages[0])
        process.signalProcess("TERM")
        code = await collector.ended
        self.assertIn(code, (0, -signal.SIGTERM), (collector.out + collector.err).decode()[-3000:])
        self.assertIn("Server Shut Down.", collector.out.decode())
        records = [json.loads(line) for line in collector.out.decode().splitlines() if line.startswith("{")]
        logins = [r for r in records if r.get("mail_user") == "alice" and "session_id" in r]
        self.assertTrue(logins, collector.out.decode()[-2000:])
        self.assertEqual(logins[0]["protocol"], "pop3")
        self.assertIn("client", logins[0])
        self.assertEqual(logins[0]["upstream"], f"127.0.0.1:{self.dovecot.pop3_port}")
        self.assertNotIn("alice-mail", collector.out.decode())

    async def test_invalidConfigurationRefused(self) -> None:
        """An invalid configuration stops twistd with every problem named by its key
        path, and nothing listens."""
        data = self.config()
        data["pop3s"]["default_server"]["port"] = 99999
        data["gateway"]["log_format"] = "xml"
        collector, _ = await self.run_twistd(data)
        code = await collector.ended
        self.assertNotEqual(code, 0)
        text = (collector.out + collector.err).decode()
        self.assertIn("pop3s.default_server.port", text)
        self.assertIn("gateway.log_format", text)
        # The problems, not twistd's usage text above them, nor a traceback.
        self.assertNotIn("Usage:", text)
        self.assertNotIn("Traceback", text)
        self.assertFalse(port_accepts("127.0.0.1", data["pop3s"]["port"], timeout=0.2))

    async def test_busyPortRefused(self) -> None:
        """A listening port already in use stops the daemon: exit 1, one line naming the
        port and the fix, no traceback [8.4]."""
        data = self.config()
        port = data["pop3s"]["port"]
        blocker = reactor.listenTCP(port, protocol.ServerFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(blocker.stopListening)
        collector, _ = await self.run_twistd(data)
        code = await collector.ended
        self.assertEqual(code, 1)
        self.assertEqual(collector.out.decode(), "")
        self.assertEqual(
            collector.err.decode().splitlines(),
            [f"mailgw: cannot start: pop3s.port: 127.0.0.1:{port} is already in use by another process"
             " (stop that process, or choose another port)"],
        )  # fmt: skip

