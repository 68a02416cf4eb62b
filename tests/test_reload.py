"""Configuration reload and graceful stop [3, 8.1, 8.4]: a valid change is applied
without dropping established sessions; an invalid one is refused with its problems
and the running configuration stays; stopping stops accepting first and lets
logged-in sessions finish."""

from __future__ import annotations

import copy
import os
import poplib
import shutil
import signal
import socket
import ssl
import tempfile
import urllib.request
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, deferLater, start_gateway
from tests.rawclient import RawClient
from tests.servers.base import free_port, port_accepts
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI
from tests.test_daemon import TwistdBase
from tests.test_integration_pop3 import POLICIES, VPN_USERS, in_thread, open_greeted


def probe(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


class ReloadTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users={"alice": "alice-mail"})
        self.dovecot.seed_standard("alice")
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        self.pop3s = {"default_server": {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"}}
        self.gateway: Gateway = start_gateway(self, self.pki, VPN_USERS, self.pop3s, group_policy=POLICIES)
        assert self.gateway.service is not None
        self.service = self.gateway.service
        self.data = self.gateway.config_data(self.pop3s, group_policy=POLICIES)
        # keep the running ports
        self.data["pop3s"]["port"] = self.gateway.port()
        self.data["pop3s"]["starttls_port"] = self.gateway.port(implicit=False)

    def logged_in(self) -> poplib.POP3_SSL:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
        client = poplib.POP3_SSL("127.0.0.1", self.gateway.port(), context=ctx, timeout=30)
        client.user("alice")
        client.pass_("alice-mail")
        return client

    async def test_validChangeApplied(self) -> None:
        """A new listener appears, a removed one goes, a policy change applies to new
        logins, and an established relay keeps working throughout.

        The change: DfltGrpPolicy gets max_session_time = 1 s.  A login after the
        reload is closed by the gateway a second later; the session logged in
        before it, under the old policy, outlives that."""
        client = await in_thread(self.logged_in)
        data = copy.deepcopy(self.data)
        imap_port = free_port()
        data["imap4s"] = {
            "enabled": True,
            "port": imap_port,
            "starttls_port": 0,
            "default_server": {"host": "127.0.0.1", "port": self.dovecot.imap_port, "tls": "none"},
        }
        data["pop3s"]["tls_support"] = "required"  # the STARTTLS port goes away
        data["group_policy"] = [
            {**policy, "max_session_time": 1} if policy["name"] == "DfltGrpPolicy" else policy
            for policy in data["group_policy"]
        ]
        self.gateway.write_config(data)
        self.assertEqual(self.service.reload(), [])
        self.assertTrue(await in_thread(probe, imap_port))
        self.assertFalse(await in_thread(probe, self.data["pop3s"]["starttls_port"]))
        self.assertEqual(self.service.config.imap4s.port, imap_port)
        self.assertEqual(self.service.config.group_policy("DfltGrpPolicy").max_session_time, 1)  # type: ignore[union-attr]

        context = ssl.create_default_context(cafile=str(self.pki.ca_path))

        def new_login() -> RawClient:
            other = open_greeted(self.gateway.port(), context)
            other.send(b"USER alice\r\nPASS alice-mail\r\n")
            other.read_line()
            answer = other.read_line()
            assert answer.startswith(b"+OK"), answer
            return other

        other: RawClient = await in_thread(new_login)
        self.addCleanup(other.close)
        self.assertTrue(await in_thread(other.is_closed, 10.0), "the new policy's max_session_time did not apply")
        self.assertIn("max_session_time 1s reached", self.gateway.reasons())
        # The established relay is past the new limit and still works.
        stat = await in_thread(client.stat)
        self.assertGreater(stat[0], 0)
        await in_thread(client.quit)

    async def test_invalidChangeRefused(self) -> None:
        """An invalid configuration is refused with its key paths; the running one
        (listeners included) stays."""
        before = self.service.config
        listeners = {listener.key for listener in self.service.listeners()}
        data = copy.deepcopy(self.data)
        data["pop3s"]["default_server"]["port"] = 99999
        data["imap4s"] = {"enabled": True, "port": free_port()}
        self.gateway.write_config(data)
        problems = self.service.reload()
        self.assertTrue(any(p.startswith("pop3s.default_server.port:") for p in problems), problems)
        self.assertIs(self.service.config, before)
        self.assertEqual({listener.key for listener in self.service.listeners()}, listeners)
        self.assertTrue(await in_thread(probe, self.gateway.port()))
        self.assertTrue(any("not reloaded" in str(e.get("log_format")) for e in self.gateway.events))

    async def test_gracefulStop(self) -> None:
        """Stopping closes the listeners at once, lets a logged-in session finish
        (its client can still QUIT), then completes."""
        client = await in_thread(self.logged_in)
        stopping = self.service.stopService()
        await deferLater(0.05)
        self.assertFalse(await in_thread(probe, self.gateway.port()))
        self.assertFalse(stopping.called)
        self.assertGreater((await in_thread(client.stat))[0], 0)
        await in_thread(client.quit)
        await stopping
        self.assertEqual(len(self.service.registry), 0)


class SighupTests(TwistdBase):
    """SIGHUP to twistd reloads the configuration."""

    async def test_sighupReloads(self) -> None:
        """After SIGHUP, a listener added to the configuration file accepts."""
        data = self.config()
        collector, process = await self.run_twistd(data)
        await self.wait_listening(data["pop3s"]["port"], collector)
        imap_port = free_port()
        data["imap4s"] = {
            "enabled": True,
            "port": imap_port,
            "starttls_port": 0,
            "default_server": {"host": "127.0.0.1", "port": self.dovecot.imap_port, "tls": "none"},
        }
        self.gateway.write_config(data)
        process.signalProcess("HUP")
        await self.wait_listening(imap_port, collector)
        self.assertTrue(port_accepts("127.0.0.1", data["pop3s"]["port"]))
        process.signalProcess("TERM")
        code = await collector.ended
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertIn("reloaded", collector.out.decode())


class NotifyTests(TwistdBase):
    """Under systemd (Type=notify): READY=1 once listening, RELOADING=1/READY=1
    around a SIGHUP reload, STOPPING=1 on SIGTERM."""

    async def test_notifications(self) -> None:
        """The daemon's sd_notify messages arrive on NOTIFY_SOCKET in order."""
        folder = tempfile.mkdtemp(prefix="mgw-n-", dir="/tmp")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(20)
        self.addCleanup(sock.close)
        data = self.config()
        collector, process = await self.run_twistd(data, NOTIFY_SOCKET=path)
        first = await in_thread(sock.recv, 4096)
        self.assertIn(b"READY=1", first)
        self.assertTrue(port_accepts("127.0.0.1", data["pop3s"]["port"]))
        process.signalProcess("HUP")
        reloading = await in_thread(sock.recv, 4096)
        self.assertIn(b"RELOADING=1", reloading)
        self.assertIn(b"MONOTONIC_USEC=", reloading)
        self.assertIn(b"READY=1", await in_thread(sock.recv, 4096))
        process.signalProcess("TERM")
        messages = [await in_thread(sock.recv, 4096)]
        while b"STOPPING=1" not in messages[-1]:
            messages.append(await in_thread(sock.recv, 4096))
        await collector.ended


class MetricsEndpointTests(TestCase):
    timeout = 60

    async def test_loginsCounted(self) -> None:
        """The metrics endpoint reflects a login success and a failure."""
        dovecot = Dovecot.started(self, users={"alice": "alice-mail"})
        pki = TestPKI(Path(self.mktemp()).absolute())
        port = free_port()
        gateway = start_gateway(
            self,
            pki,
            VPN_USERS,
            {"default_server": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none"}},
            group_policy=POLICIES,
            admin={"metrics": f"tcp:{port}:interface=127.0.0.1"},
        )

        def logins() -> None:
            ctx = ssl.create_default_context(cafile=str(pki.ca_path))
            for password in ("alice-mail", "wrong"):
                client = poplib.POP3_SSL("127.0.0.1", gateway.port(), context=ctx, timeout=30)
                try:
                    client.user("alice")
                    client.pass_(password)
                except poplib.error_proto:
                    pass
                finally:
                    client.quit()

        await in_thread(logins)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                return str(answer.read().decode())

        text = await in_thread(scrape)
        self.assertIn('mailgw_logins_ok_total{protocol="pop3"} 1.0', text)
        self.assertIn('mailgw_logins_failed_total{protocol="pop3",reason="auth_failed"} 1.0', text)
        self.assertIn("mailgw_relayed_bytes_total", text)
        # The same logins give the AAA group's health in `mailgwctl status`.
        assert gateway.service is not None
        groups = {g["name"]: g for g in gateway.service.admin_backend.status()["aaa_groups"]}
        self.assertEqual(groups["LOCAL"]["health"], "reachable")
