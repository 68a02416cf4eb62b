"""Start-up failures as administrators meet them [8.4]: ``twistd -n mailgw`` ends with
one line naming the problem and the fix, exit status 1, never a traceback — found
before anything starts (:func:`mailgw.startup.host_problems`) or met while the service
tree starts (:class:`mailgw.startup.StartupGuard`).  The busy proxy port and the
invalid configuration: tests/test_daemon.py."""

from __future__ import annotations

import errno
import gc
import shutil
import socket
from pathlib import Path
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.admin.channel import UnsafeSocketPath
from mailgw.config import Config, load_config
from mailgw.startup import StartupGuard, describe_start_error
from tests.gateway import Gateway
from tests.servers.base import free_ports
from tests.servers.pki import TestPKI
from tests.test_daemon import spawn_twistd


class StartupBase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        self.gateway = Gateway(directory, TestPKI(directory / "pki"), {"alice": ("alice-mail", None)})
        self.addCleanup(shutil.rmtree, self.gateway.socket_dir, True)
        self.data: dict[str, Any] = self.gateway.config_data(
            {"default_server": {"host": "127.0.0.1", "port": 110, "tls": "none"}}
        )

    async def twistd(self) -> tuple[int, str, str]:
        collector, _ = spawn_twistd(self, self.gateway.write_config(self.data), self.gateway.directory)
        code = await collector.ended
        return code, collector.out.decode(), collector.err.decode()


class TwistdStartupTests(StartupBase):
    """twistd -n mailgw on a machine that cannot run the configuration."""

    async def test_stateDirUnderProc(self) -> None:
        """A state_dir that cannot be created (under /proc): exit 1, one line naming
        gateway.state_dir and the fix, nothing else."""
        self.data["gateway"]["state_dir"] = "/proc/mailgw-state"
        code, out, err = await self.twistd()
        self.assertEqual((code, out), (1, ""))
        [line] = err.splitlines()
        self.assertTrue(line.startswith("mailgw: cannot start: gateway.state_dir: cannot create /proc/mailgw-state:"))
        self.assertIn("choose another state_dir", line)

    async def test_portTakenWhileStarting(self) -> None:
        """A listener that fails once twistd runs (the metrics port, taken): one
        critical log line naming admin.metrics and the fix, exit 1, no traceback, and
        the proxy ports bound before it are released."""
        (port,) = free_ports(1)
        self.data["admin"]["metrics"] = f"tcp:{port}:interface=127.0.0.1"
        blocker = reactor.listenTCP(port, protocol.ServerFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(blocker.stopListening)
        code, out, err = await self.twistd()
        self.assertEqual(code, 1, out + err)
        self.assertNotIn("Traceback", out + err)
        errors = [line for line in out.splitlines() if "#critical]" in line or "#error]" in line]
        self.assertEqual(len(errors), 1, out)
        self.assertIn(
            f"Cannot start: admin.metrics: 127.0.0.1:{port} is already in use by another process"
            " (stop that process, or choose another port)",
            errors[0],
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", self.data["pop3s"]["port"]))  # free again


class DescribeStartErrorTests(SynchronousTestCase):
    """describe_start_error: the key path, the problem, the fix."""

    def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        gateway = Gateway(directory, TestPKI(directory / "pki"), {})
        self.addCleanup(shutil.rmtree, gateway.socket_dir, True)
        data = gateway.config_data({"port": 995, "starttls_port": 110})
        self.config: Config = load_config(gateway.write_config(data))

    def test_privilegedPort(self) -> None:
        """EACCES on a proxy port: the capability or a higher port."""
        error = CannotListenError("127.0.0.1", 110, OSError(errno.EACCES, "Permission denied"))
        line = describe_start_error(error, self.config)
        self.assertTrue(line.startswith("pop3s.starttls_port: 127.0.0.1:110 is a privileged port and "), line)
        self.assertIn("CAP_NET_BIND_SERVICE", line)

    def test_unsafeSocket(self) -> None:
        """An unsafe admin socket folder: where to put the socket instead."""
        line = describe_start_error(UnsafeSocketPath("admin socket /tmp/x/s: the folder /tmp/x is bad"), self.config)
        self.assertEqual(
            line,
            "admin.socket: admin socket /tmp/x/s: the folder /tmp/x is bad (put admin.socket in a folder only root"
            " and the daemon's user can write, such as /run/mailgw)",
        )

    def test_stateDir(self) -> None:
        """An I/O error below the state folder names gateway.state_dir."""
        state = self.config.gateway.state_dir / "poller.key"
        line = describe_start_error(PermissionError(errno.EACCES, "Permission denied", str(state)), self.config)
        self.assertEqual(
            line,
            f"gateway.state_dir: {state}: Permission denied (choose a state_dir the daemon's user can create and"
            " write)",
        )


class FreezeTests(SynchronousTestCase):
    def test_startupObjectsFrozen(self) -> None:
        """Once the tree has started under twistd, what the start-up made is out of the
        collector's generations (gc.freeze) [10]; the objects made afterwards are not."""
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        # The configuration names the problem when starting fails; this start does not.
        guard = StartupGuard(Service(), cast(Config, None))
        self.assertEqual(gc.get_freeze_count(), 0)
        guard.startService()
        self.addCleanup(guard.stopService)
        frozen = gc.get_freeze_count()
        self.assertGreater(frozen, 1000)
        later: list[object] = [object() for _ in range(10)]
        self.assertEqual(gc.get_freeze_count(), frozen)
        self.assertTrue(gc.is_tracked(later))
