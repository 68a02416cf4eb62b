"""Worker processes [10]: ``twistd -n mailgw`` with ``gateway.workers = 2`` in front
of a real Dovecot, real POP3S/IMAPS clients (poplib, imaplib in threads), and
``mailgwctl`` over the admin socket: both workers serve, the limits hold across them
(simultaneous logins, the unauthenticated-session limit, the failure penalty), a
SIGKILLed worker is replaced and nobody else's sessions go, reload reaches every
worker, sd_notify READY waits for all of them, and a graceful stop drains them."""

from __future__ import annotations

import imaplib
import os
import poplib
import select
import shutil
import signal
import socket
import ssl
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, deferLater
from tests.servers.base import free_port, port_accepts
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI
from tests.test_admin_daemon import MAILGWCTL, Ctl
from tests.test_daemon import Collector, spawn_twistd
from tests.test_integration_pop3 import in_thread

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail", **{f"user{n}": f"user{n}-mail" for n in range(8)}}
VPN_USERS: dict[str, tuple[str, str | None]] = {user: (password, None) for user, password in MAIL_USERS.items()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class FromAddress(poplib.POP3_SSL):
    """poplib over TLS from another loopback address (a login is a user from one
    address over one protocol [5.5])."""

    source = "127.0.0.1"

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined,no-any-return]


class WorkersBase(TestCase):
    timeout = 150

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=MAIL_USERS)
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        self.pki = TestPKI(directory / "pki")
        self.gateway = Gateway(directory, self.pki, VPN_USERS)
        self.addCleanup(shutil.rmtree, self.gateway.socket_dir, True)
        self.data = self.gateway.config_data(self.pop3s())
        self.data["gateway"]["workers"] = 2
        self.data["group_policy"] = [{"name": "DfltGrpPolicy", "simultaneous_logins": 1}]
        self.process: Any = None
        self.collector = Collector()

    def pop3s(self, **options: Any) -> dict[str, Any]:
        return {"default_server": {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"}, **options}

    @property
    def socket_path(self) -> str:
        return str(self.data["admin"]["socket"])

    async def start(self, **environ: str) -> Collector:
        """twistd with the configuration; returns once both workers serve."""
        collector, self.process = spawn_twistd(
            self, self.gateway.write_config(self.data), self.gateway.directory, **environ
        )
        self.collector = collector
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if collector.ended.called:
                self.fail(f"twistd exited: {collector.out.decode()} {collector.err.decode()}")
            if os.path.exists(self.socket_path):
                status = await self.status()
                if status and [w["state"] for w in status.get("workers", [])] == ["ready", "ready"]:
                    return collector
            await deferLater(0.2)
        self.fail(f"the workers did not start: {collector.out.decode()[-3000:]}")

    async def ctl(self, *args: str) -> Ctl:
        collector = Collector()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            collector, MAILGWCTL, [MAILGWCTL, "--socket", self.socket_path, *args], env=None
        )
        process.closeStdin()
        code = await collector.ended
        return Ctl(bytes(collector.out), bytes(collector.err), code)

    async def status(self) -> dict[str, Any]:
        result = await self.ctl("--json", "status")
        return dict(result.json()) if result.code == 0 else {}

    async def sessions(self) -> list[dict[str, Any]]:
        result = await self.ctl("--json", "sessions")
        self.assertEqual(result.code, 0, result.err + self.collector.out.decode()[-5000:])
        return list(result.json())

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_path))

    def login(self, user: str = "alice", source: str = "127.0.0.1") -> poplib.POP3_SSL:
        """A logged-in POP3S client (blocking: in a thread)."""
        kind: type[FromAddress] = type("Client", (FromAddress,), {"source": source})
        client = kind("127.0.0.1", self.data["pop3s"]["port"], context=self.context(), timeout=30)
        client.user(user)
        client.pass_(MAIL_USERS[user])
        return client

    @staticmethod
    def works(client: poplib.POP3_SSL) -> bool:
        try:
            client.noop()
            return True
        except (poplib.error_proto, OSError, EOFError):
            return False

    async def worker_of(self, client: poplib.POP3_SSL) -> int:
        """The worker serving C{client} (by its address in the session list)."""
        port = client.sock.getsockname()[1]
        for session in await self.sessions():
            if session["client"].endswith(f":{port}"):
                return int(session["worker"])
        self.fail(f"no session for client port {port}: {await self.sessions()} {self.collector.out.decode()[-6000:]}")


class WorkersTests(WorkersBase):
    async def test_twoWorkersServe(self) -> None:
        """workers = 2: two serving processes besides the supervisor, each with its
        pid in status; logins land on both; sessions lists them with the worker."""
        await self.start()
        status = await self.status()
        pids = [w["pid"] for w in status["workers"]]
        self.assertEqual(len(set(pids)), 2)
        self.assertNotIn(status["pid"], pids)
        self.assertTrue(all(alive(pid) for pid in pids))
        # Both workers wait on one listening socket and the kernel wakes them in a
        # fixed order, so one-at-a-time logins may all land on the same idle worker;
        # overlapping logins (eight users, 20 ms apart) reach the other while the
        # first is busy, as under real load.

        async def login(n: int) -> poplib.POP3_SSL:
            await deferLater(0.02 * n)
            client: poplib.POP3_SSL = await in_thread(self.login, f"user{n}", f"127.0.0.{20 + n}")
            return client

        for _ in range(3):
            clients = await defer.gatherResults([defer.Deferred.fromCoroutine(login(n)) for n in range(8)])
            listed = await self.sessions()
            for client in clients:
                client.sock.close()
            if {s["node"] for s in listed} == {"mailgw-test/w1", "mailgw-test/w2"}:
                break
        self.assertEqual({s["node"] for s in listed}, {"mailgw-test/w1", "mailgw-test/w2"})
        self.assertEqual({int(s["worker"]) for s in listed}, {1, 2})

    async def test_simultaneousLoginsAcrossWorkers(self) -> None:
        """simultaneous_logins = 1: of six logins or more of one user from different
        addresses, landing on both workers, only the last stays open [5.5]."""
        await self.start()
        clients, seen = [], set()
        for i in range(20):
            clients.append(await in_thread(self.login, "alice", f"127.0.0.{20 + i}"))
            seen.add(await self.worker_of(clients[-1]))
            if len(clients) >= 6 and seen == {1, 2}:
                break
        self.assertEqual(seen, {1, 2})
        await deferLater(0.5)
        states = [await in_thread(self.works, c) for c in clients]
        self.assertEqual(states, [False] * (len(clients) - 1) + [True])
        listed = [s for s in await self.sessions() if s["user"] == "alice"]
        self.assertEqual(len(listed), 1)
        for client in clients:
            client.sock.close()

    async def test_workerKilled(self) -> None:
        """SIGKILL of one worker: the other's sessions go on; the killed one's are
        gone and no longer counted; a new worker serves within 15 s."""
        await self.start()
        # simultaneous_logins = 1: a user's newer login logs off the older one, so
        # only each user's latest client is kept, until the two are on different
        # workers (which worker accepts is the kernel's choice).
        latest: dict[str, tuple[poplib.POP3_SSL, int]] = {}
        for i in range(40):
            user = "alice" if i % 2 else "bob"
            client = await in_thread(self.login, user, f"127.0.0.{40 + i}")
            if user in latest:
                latest[user][0].sock.close()
            latest[user] = (client, await self.worker_of(client))
            if {worker for _, worker in latest.values()} == {1, 2}:
                break
        clients: dict[int, list[poplib.POP3_SSL]] = {1: [], 2: []}
        for client, worker in latest.values():
            clients[worker].append(client)
        self.assertTrue(clients[1] and clients[2])
        status = await self.status()
        victim = status["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        await deferLater(0.5)
        self.assertTrue(all([await in_thread(self.works, c) for c in clients[2]]))
        self.assertFalse(any([await in_thread(self.works, c) for c in clients[1]]))
        while time.monotonic() - started < 15:
            status = await self.status()
            first = status["workers"][0]
            if first["state"] == "ready" and first["pid"] != victim:
                break
            await deferLater(0.25)
        self.assertEqual(first["state"], "ready", f"after {time.monotonic() - started:.1f} s")
        self.assertEqual(first["restarts"], 1)
        self.assertIn("signal 9", first["last_exit"])
        listed = await self.sessions()
        self.assertEqual({s["worker"] for s in listed}, {2})
        # The killed worker's logins no longer count: the same users log in again
        # from new addresses, and the survivors are logged off (limit 1), not them.
        for client in clients[2]:
            self.assertTrue(await in_thread(self.works, client))
        for c in clients[1] + clients[2]:
            c.sock.close()

    async def test_unauthenticatedLimitAcrossWorkers(self) -> None:
        """unauthenticated_session_limit = 3 holds across both workers [4.4]: of 12
        silent connections spread over them, the gateway closes all but 3."""
        self.data["pop3s"]["unauthenticated_session_limit"] = 3
        await self.start()
        port = self.data["pop3s"]["port"]
        socks = []
        for _ in range(12):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            await deferLater(0.05)
        await deferLater(1.0)
        listed = await self.sessions()
        self.assertLessEqual(len(listed), 3, listed)

        def closed_by_gateway() -> int:
            readable, _, _ = select.select(socks, [], [], 2.0)
            count = 0
            for sock in readable:
                try:
                    if sock.recv(1) == b"":
                        count += 1
                except ConnectionResetError:
                    count += 1
            return count

        self.assertEqual(await in_thread(closed_by_gateway), 9)
        # A login still works meanwhile.
        client = await in_thread(self.login)
        self.assertTrue(await in_thread(self.works, client))
        client.sock.close()
        for sock in socks:
            sock.close()

    async def test_penaltyAcrossWorkers(self) -> None:
        """Three wrong passwords from one address, wherever they land: that address
        waits 4 s before its next attempt on any worker [4.10]."""
        await self.start()

        def attempt(password: str) -> tuple[float, int]:
            client = poplib.POP3_SSL("127.0.0.1", self.data["pop3s"]["port"], context=self.context(), timeout=30)
            port = client.sock.getsockname()[1]
            started = time.monotonic()
            try:
                client.user("alice")
                client.pass_(password)
            except poplib.error_proto:
                pass
            finally:
                client.sock.close()
            return time.monotonic() - started, port

        for _ in range(3):
            await in_thread(attempt, "wrong")
        # The next attempts wait, on whichever worker they land.
        for _ in range(2):
            waited, _ = await in_thread(attempt, "wrong-again")
            self.assertGreaterEqual(waited, 3.5)

    async def test_reloadReachesEveryWorker(self) -> None:
        """mailgwctl reload: a proxy added by the reload is served by both workers
        (its socket bound by the supervisor, sent to each); a logged-in session
        survives."""
        await self.start()
        pop = await in_thread(self.login)
        imap_port = self.data["pop3s"]["port"] + 1000
        while not port_free(imap_port):
            imap_port += 1
        self.data["imap4s"] = {
            "port": imap_port,
            "starttls_port": 0,
            "default_server": {"host": "127.0.0.1", "port": self.dovecot.imap_port, "tls": "none"},
        }
        self.gateway.write_config(self.data)
        result = await self.ctl("reload")
        self.assertEqual(result.code, 0, result.out + result.err)

        def imap_login() -> imaplib.IMAP4_SSL:
            client = imaplib.IMAP4_SSL("127.0.0.1", imap_port, ssl_context=self.context(), timeout=30)
            client.login("bob", "bob-mail")
            return client

        clients, seen = [], set()
        for _ in range(20):
            clients.append(await in_thread(imap_login))
            port = clients[-1].sock.getsockname()[1]
            seen |= {s["worker"] for s in await self.sessions() if s["client"].endswith(f":{port}")}
            if seen == {1, 2}:
                break
        self.assertEqual(seen, {1, 2})
        self.assertTrue(await in_thread(self.works, pop))
        pop.sock.close()
        for client in clients:
            client.shutdown()

    async def test_statusPerWorker(self) -> None:
        """status shows each worker (pid, state, its sessions) and the sum;
        `mailgwctl status` prints a line per worker."""
        await self.start()
        client = await in_thread(self.login)
        worker = await self.worker_of(client)
        status = await self.status()
        self.assertEqual(status["sessions"]["total"], 1)
        mine = status["workers"][worker - 1]
        self.assertEqual(mine["sessions"]["total"], 1)
        self.assertEqual(status["workers"][2 - worker]["sessions"]["total"], 0)
        text = await self.ctl("status")
        self.assertIn("Workers: 2", text.out)
        for index, worker in enumerate(status["workers"], 1):
            sessions = 1 if index == mine["worker"] else 0
            self.assertRegex(text.out, rf"\n  {index}\s+{worker['pid']}\s+ready\s+{sessions}\s+\S+\s+0\s+-\n")
        client.sock.close()

    async def test_metricsOfEveryWorker(self) -> None:
        """The supervisor's /metrics has each worker's samples, labelled with the
        worker, in one valid exposition."""
        port = free_port()
        self.data["admin"]["metrics"] = f"tcp:{port}:interface=127.0.0.1"
        await self.start()
        client = await in_thread(self.login)
        worker = await self.worker_of(client)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                return str(answer.read().decode())

        text = await in_thread(scrape)
        self.assertIn(f'mailgw_logins_ok_total{{worker="{worker}",protocol="pop3"}} 1.0', text)
        self.assertIn(f'mailgw_logins_ok_total{{worker="{3 - worker}",protocol="pop3"}} 0.0', text)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = [
            s
            for s in families["mailgw_logins_ok"].samples
            if s.name == "mailgw_logins_ok_total" and s.labels["protocol"] == "pop3"
        ]
        # The supervisor's own (it serves no session: 0) and each worker's.
        self.assertEqual(sorted(s.labels.get("worker", "-") for s in samples), ["-", "1", "2"])
        self.assertEqual(sum(s.value for s in samples), 1.0)
        client.sock.close()

    async def test_killOnAnyWorker(self) -> None:
        """mailgwctl kill ID logs off a session whichever worker holds it."""
        await self.start()
        clients = [await in_thread(self.login, "alice", f"127.0.0.{60 + i}") for i in range(2)]
        clients.append(await in_thread(self.login, "bob"))
        for session in await self.sessions():
            result = await self.ctl("kill", session["session_id"])
            self.assertEqual(result.code, 0, result.err)
        await deferLater(0.5)
        self.assertEqual(await self.sessions(), [])
        for client in clients:
            self.assertFalse(await in_thread(self.works, client))
            client.sock.close()

    async def test_tlsSessionResumesOnTheOtherWorker(self) -> None:
        """The workers share the TLS session-ticket key [4.1]: a session (TLS 1.3
        ticket, Python's ssl client) issued by one worker resumes on the other. Which
        worker accepts is made certain by stopping the other one (SIGSTOP) while
        connecting."""
        await self.start()
        pids = {w["worker"]: w["pid"] for w in (await self.status())["workers"]}
        port = self.data["pop3s"]["port"]
        context = self.context()

        def connect(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            with context.wrap_socket(sock, server_hostname="127.0.0.1", session=session) as tls:
                greeting = tls.recv(1024)  # also reads the tickets sent after the handshake
                self.assertTrue(greeting.startswith(b"+OK"), greeting)
                tls.sendall(b"QUIT\r\n")
                tls.recv(1024)
                assert tls.session is not None
                return tls.session, bool(tls.session_reused)

        async def served_by(index: int, session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
            other = pids[3 - index]
            os.kill(other, signal.SIGSTOP)
            try:
                result: tuple[ssl.SSLSession, bool] = await in_thread(connect, session)
                return result
            finally:
                os.kill(other, signal.SIGCONT)

        session, reused = await served_by(1, None)
        self.assertFalse(reused)
        _, reused = await served_by(1, session)
        self.assertTrue(reused, "no resumption even on the same worker")
        _, reused = await served_by(2, session)
        self.assertTrue(reused, "a session of worker 1 did not resume on worker 2")
        self.assertNotIn("not shared between workers", self.collector.out.decode())


class WorkersLifeTests(WorkersBase):
    async def test_readyAfterEveryWorker(self) -> None:
        """READY=1 reaches systemd only once both workers serve; the workers send
        nothing themselves (NotifyAccess=main)."""
        folder = tempfile.mkdtemp(prefix="mgw-n-", dir="/tmp")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(60)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # The workers take 3 s to start (the supervisor does not): READY=1 must wait.
        site = Path(folder) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            "import sys, time\nif 'mailgw.workers.worker' in sys.orig_argv:\n    time.sleep(3)\n"
        )
        python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        spawned = time.monotonic()
        collector, self.process = spawn_twistd(
            self,
            self.gateway.write_config(self.data),
            self.gateway.directory,
            NOTIFY_SOCKET=path,
            PYTHONPATH=python_path,
        )

        def receive() -> tuple[bytes, int]:
            message, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = 0
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(data[:4], "little")
            return message, pid

        message, pid = await in_thread(receive)
        self.assertIn(b"READY=1", message)
        self.assertGreater(time.monotonic() - spawned, 3.0)
        self.assertEqual(pid, self.process.pid)
        status = await self.status()
        self.assertEqual([w["state"] for w in status["workers"]], ["ready", "ready"])
        self.process.signalProcess("TERM")
        await collector.ended

    async def test_gracefulStopDrains(self) -> None:
        """SIGTERM: no new connection is accepted, a logged-in session may go on
        until its client quits; then every worker and the supervisor exit."""
        self.data["pop3s"]["unauthenticated_session_limit"] = 0
        collector = await self.start()
        pids = [w["pid"] for w in (await self.status())["workers"]]
        client = await in_thread(self.login)
        self.process.signalProcess("TERM")
        await deferLater(1.0)
        self.assertFalse(port_accepts("127.0.0.1", self.data["pop3s"]["port"], timeout=0.5))
        self.assertTrue(await in_thread(self.works, client))
        await in_thread(client.quit)
        code = await collector.ended
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertFalse(any(alive(pid) for pid in pids))
        self.assertIn("stopped", collector.out.decode())


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
