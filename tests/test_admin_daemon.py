"""``mailgwctl`` as administrators run it: a subprocess talking over the admin socket
to ``twistd -n mailgw`` (another subprocess) in front of a real Dovecot, with
Python's poplib as the mail client (in a thread, so the reactor stays free)."""

from __future__ import annotations

import json
import os
import poplib
import pty
import re
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, deferLater
from tests.servers.base import free_ports, port_accepts
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI
from tests.servers.smtpsink import SmtpSink
from tests.test_daemon import Collector, spawn_twistd
from tests.test_sso_admin import SERVER, write_capture

MAILGWCTL = str(Path(sys.executable).parent / "mailgwctl")
PASSWORD = "alice-mail-7391"


class Ctl:
    """The result of one mailgwctl run."""

    def __init__(self, out: bytes, err: bytes, code: int) -> None:
        self.out = out.decode()
        self.err = err.decode()
        self.code = code

    def json(self) -> Any:
        return json.loads(self.out)


class AdminDaemonBase(TestCase):
    """A real Dovecot and a twistd -n mailgw daemon for mailgwctl to talk to."""

    timeout = 120

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users={"alice": PASSWORD})
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        self.pki = TestPKI(directory / "pki")
        self.gateway = Gateway(directory, self.pki, {"alice": (PASSWORD, None)})
        # UNIX socket paths are limited to 107 bytes: a short folder, not the test's.
        short = Path(tempfile.mkdtemp(prefix="mailgw-ctl-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, short, ignore_errors=True)
        self.socket = short / "run" / "admin.sock"
        self.data = self.gateway.config_data(
            {
                "default_server": {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"},
                "allow_plaintext_auth": True,
            }
        )
        self.data["admin"]["socket"] = str(self.socket)

    # -- helpers ----------------------------------------------------------------------

    async def start_daemon(self) -> tuple[Collector, Any]:
        collector, process = spawn_twistd(self, self.gateway.write_config(self.data), self.gateway.directory)
        port = self.data["pop3s"]["port"]
        for _ in range(300):
            if collector.ended.called:
                self.fail(f"twistd exited: {collector.out.decode()} {collector.err.decode()}")
            if self.socket.exists() and port_accepts("127.0.0.1", port, timeout=0.05):
                return collector, process
            await deferLater(0.05)
        self.fail("twistd did not start listening")

    async def ctl(self, *args: str, stdin: bytes = b"", socket: Path | None = None) -> Ctl:
        collector = Collector()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            collector,
            MAILGWCTL,
            [MAILGWCTL, "--socket", str(socket or self.socket), *args],
            env=None,
        )
        if stdin:
            process.write(stdin)
        process.closeStdin()
        code = await collector.ended
        return Ctl(bytes(collector.out), bytes(collector.err), code)

    def pop3_login(self) -> poplib.POP3_SSL:
        """A POP3S client logged in through the gateway (blocking: run in a thread)."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        pop = poplib.POP3_SSL("127.0.0.1", self.data["pop3s"]["port"], context=context, timeout=30)
        pop.user("alice")
        pop.pass_(PASSWORD)
        return pop

    async def logged_in_client(self) -> poplib.POP3_SSL:
        pop = await deferToThread(self.pop3_login)

        def close() -> defer.Deferred[None]:
            return deferToThread(_quietly_close, pop)

        self.addCleanup(close)
        return pop

    # -- tests ------------------------------------------------------------------------



class AdminDaemonTests(AdminDaemonBase):
    """mailgwctl against twistd -n mailgw."""

    async def test_status(self) -> None:
        """status prints version, listeners, sessions and AAA groups; --json parses
        and holds the same; no password anywhere."""
        await self.start_daemon()
        result = await self.ctl("status")
        self.assertEqual(result.code, 0, result.err)
        self.assertIn("mailgw 0.1.0 on mailgw-test", result.out)
        self.assertIn(f"pop3s/loopback/{self.data['pop3s']['port']}", result.out)
        self.assertIn("Sessions: 0", result.out)
        self.assertRegex(result.out, r"LOCAL\s+local\s+unknown")
        result = await self.ctl("--json", "status")
        self.assertEqual(result.code, 0, result.err)
        status = result.json()
        self.assertEqual(status["version"], "0.1.0")
        self.assertEqual(
            sorted(listener["name"] for listener in status["listeners"]),
            sorted(f"pop3s/loopback/{self.data['pop3s'][key]}" for key in ("port", "starttls_port")),
        )
        self.assertEqual([g["name"] for g in status["aaa_groups"]], ["LOCAL"])
        self.assertNotIn(PASSWORD, result.out)

    async def test_sessionsAndKill(self) -> None:
        """A live POP3S session is listed with its user and upstream (table and JSON);
        kill closes it and its client sees the connection close."""
        await self.start_daemon()
        pop = await self.logged_in_client()
        result = await self.ctl("--json", "sessions", "--protocol", "pop3s")
        self.assertEqual(result.code, 0, result.err)
        sessions = result.json()
        self.assertEqual(len(sessions), 1, sessions)
        session = sessions[0]
        upstream = f"127.0.0.1:{self.dovecot.pop3_port}"
        self.assertEqual(
            (session["protocol"], session["state"], session["user"], session["upstream"]),
            ("pop3", "authenticated", "alice", upstream),
        )
        table = await self.ctl("sessions")
        self.assertEqual(table.code, 0, table.err)
        row = next(line for line in table.out.splitlines() if line.startswith(session["session_id"]))
        self.assertIn("alice", row.split())
        self.assertIn(upstream, row.split())
        self.assertEqual((await self.ctl("--json", "sessions", "--protocol", "imap4")).json(), [])

        killed = await self.ctl("kill", session["session_id"])
        self.assertEqual(killed.code, 0, killed.err)
        self.assertIn(f"session {session['session_id']} (pop3, alice,", killed.out)
        outcome = await deferToThread(_noop_outcome, pop)
        self.assertIsInstance(outcome, (poplib.error_proto, OSError), outcome)

        unknown = await self.ctl("kill", "000000000000")
        self.assertEqual((unknown.code, unknown.err), (1, "mailgwctl: no session '000000000000'\n"))

    async def test_aaaTest(self) -> None:
        """aaa test LOCAL alice with the password on stdin: accepted, the password
        never printed; a wrong one: rejected and exit 1."""
        await self.start_daemon()
        result = await self.ctl("aaa", "test", "LOCAL", "alice", stdin=f"{PASSWORD}\n".encode())
        self.assertEqual(result.code, 0, result.err)
        self.assertIn("LOCAL: alice accepted", result.out)
        self.assertIn("group policy: DfltGrpPolicy", result.out)
        self.assertNotIn(PASSWORD, result.out + result.err)
        result = await self.ctl("--json", "aaa", "test", "LOCAL", "alice", stdin=b"not-the-password\n")
        self.assertEqual(result.code, 1)
        self.assertEqual(result.json()["result"], "rejected")
        self.assertNotIn("not-the-password", result.out)
        result = await self.ctl("aaa", "test", "NOPE", "alice", stdin=b"x\n")
        self.assertEqual((result.code, result.err), (1, "mailgwctl: no AAA server group 'NOPE'\n"))

    async def test_accountsRoundTrip(self) -> None:
        """mailgwctl accounts add/list (with --domain)/edit/delete against the
        daemon's state database; the password is never shown, in tables or JSON;
        check-now with the poller disabled says so and exits 1."""
        await self.start_daemon()
        secret = "remote-Secret-42"
        added = []
        for domain in ("example.com", "example.org"):
            result = await self.ctl(
                "--json", "accounts", "add", "--host", "127.0.0.1", "--port", str(self.dovecot.pop3_port),
                "--tls", "none", "--username", "alice", "--domain", domain, "--password-prompt",
                stdin=secret.encode() + b"\n",
            )
            self.assertEqual(result.code, 0, result.err)
            added.append(result.json())
        listing = await self.ctl("--json", "accounts", "list")
        self.assertEqual(sorted(a["domain"] for a in listing.json()), ["example.com", "example.org"])
        only = await self.ctl("--json", "accounts", "list", "--domain", "example.org")
        self.assertEqual([a["domain"] for a in only.json()], ["example.org"])
        table = await self.ctl("accounts", "list")
        self.assertEqual(table.code, 0, table.err)
        self.assertIn("example.com", table.out)
        first = str(added[0]["id"])
        edited = await self.ctl("--json", "accounts", "edit", first, "--interval", "900")
        self.assertEqual(edited.code, 0, edited.err)
        self.assertEqual(edited.json()["interval"], 900)
        bad = await self.ctl("accounts", "edit", first, "--port", "99999")
        self.assertEqual(bad.code, 1)
        self.assertIn("port", bad.err)
        check = await self.ctl("accounts", "check-now", first)
        self.assertEqual(check.code, 1)
        deleted = await self.ctl("accounts", "delete", first)
        self.assertEqual(deleted.code, 0, deleted.err)
        listing = await self.ctl("--json", "accounts", "list")
        self.assertEqual([a["domain"] for a in listing.json()], ["example.org"])
        for output in (listing, only, table, edited):
            self.assertNotIn(secret, output.out + output.err)
        state = (self.gateway.directory / "state" / "state.sqlite3").read_bytes()
        self.assertNotIn(secret.encode(), state)

    async def test_notRunning(self) -> None:
        """No daemon: a message naming the socket, exit 1; after the daemon stops,
        its socket is gone and the same message comes."""
        result = await self.ctl("status")
        self.assertEqual(result.code, 1)
        self.assertIn(f"the admin socket {self.socket} does not exist: is the mailgw daemon running?", result.err)
        self.assertEqual(result.out, "")
        collector, process = await self.start_daemon()
        self.assertEqual((await self.ctl("status")).code, 0)
        process.signalProcess("TERM")
        await collector.ended
        self.assertFalse(self.socket.exists())
        result = await self.ctl("--json", "sessions")
        self.assertEqual(result.code, 1)
        self.assertIn(str(self.socket), result.err)

    async def test_unsafeSocketRefused(self) -> None:
        """A regular file where the socket should be: the daemon refuses to start,
        saying why, and leaves the file alone."""
        self.socket.parent.mkdir(mode=0o750)
        self.socket.write_text("not a socket")
        collector, _ = spawn_twistd(self, self.gateway.write_config(self.data), self.gateway.directory)
        code = await collector.ended
        self.assertNotEqual(code, 0)
        self.assertIn(
            f"admin socket {self.socket}: the path exists and is not a socket", (collector.out + collector.err).decode()
        )
        self.assertEqual(self.socket.read_text(), "not a socket")
        self.assertFalse(port_accepts("127.0.0.1", self.data["pop3s"]["port"], timeout=0.2))

    async def test_reload(self) -> None:
        """mailgwctl reload: a valid change
        (IMAP4S enabled) is applied (a new listener appears) while an established
        POP3 relay keeps working; an invalid one is refused with the key path named
        and the old configuration kept."""
        await self.start_daemon()
        pop = await self.logged_in_client()
        self.data["pop3s"]["default_server"]["port"] = 99999
        self.gateway.write_config(self.data)
        result = await self.ctl("reload")
        self.assertEqual(result.code, 1, result.out)
        self.assertIn("pop3s.default_server.port", result.err)
        self.assertEqual(len((await self.ctl("--json", "status")).json()["listeners"]), 2)

        self.data["pop3s"]["default_server"]["port"] = self.dovecot.pop3_port
        (imap_port,) = free_ports(1)
        self.data["imap4s"] = {
            "port": imap_port,
            "starttls_port": 0,
            "default_server": {"host": "127.0.0.1", "port": self.dovecot.imap_port, "tls": "none"},
            "allow_plaintext_auth": True,
        }
        self.gateway.write_config(self.data)
        result = await self.ctl("reload")
        self.assertEqual((result.code, result.out), (0, "configuration reloaded\n"), result.err)
        names = [listener["name"] for listener in (await self.ctl("--json", "status")).json()["listeners"]]
        self.assertIn(f"imap4s/loopback/{imap_port}", names)
        self.assertIsNone(await deferToThread(_noop_outcome, pop))


def _noop_outcome(pop: poplib.POP3_SSL) -> Exception | None:
    """Send NOOP; the exception it raises (the connection was closed), or None."""
    try:
        pop.noop()
    except (poplib.error_proto, OSError) as e:
        return e
    return None


def _quietly_close(pop: poplib.POP3_SSL) -> None:
    try:
        pop.quit()
    except (poplib.error_proto, OSError):
        pop.close()


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[bytes]:
    """mailgwctl with its stdout a pipe whose reader is gone (blocking: in a thread)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([MAILGWCTL, *args], stdout=write, stderr=subprocess.PIPE, check=False, timeout=30)
    finally:
        os.close(write)


def pty_run(argv: list[str], answers: list[tuple[bytes, bytes]], timeout: float = 30.0) -> tuple[int, bytes]:
    """Run C{argv} on a new pseudo-terminal (its only terminal: no controlling one, as
    under ssh without -t it would be /dev/tty); for each (prompt, answer) wait for the
    prompt and type the answer.  Returns the exit status and everything the terminal
    showed (blocking: in a thread)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    shown = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the program ended and closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            if pending and pending[0][0] in shown:
                shown += b"<typed>"
                os.write(master, pending.pop(0)[1])
            elif process.poll() is not None and not ready:
                break
        return process.wait(timeout=max(1.0, deadline - time.monotonic())), shown
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def without_uptime(status: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in status.items() if key != "uptime"}


#: an epoch time printed as a number: 1796190000, 1796190000.5, 1.79619e+09
EPOCH_NUMBER = re.compile(r"\b1[0-9]{9}(\.[0-9]+)?\b|\b[0-9]\.[0-9]+e\+09\b")


class ConventionsTests(AdminDaemonBase):
    """The command-line conventions of [8.1], the real mailgwctl against twistd."""

    async def test_globalOptionsAnywhere(self) -> None:
        """status --json and --json status print the same JSON; --version prints the
        package's; sessions --protocol bogus exits 2 listing the valid protocols."""
        await self.start_daemon()
        after = await self.ctl("status", "--json")
        before = await self.ctl("--json", "status")
        self.assertEqual((after.code, before.code), (0, 0), after.err + before.err)
        self.assertEqual(without_uptime(after.json()), without_uptime(before.json()))
        version = await self.ctl("--version")
        self.assertEqual((version.code, version.out), (0, "mailgwctl 0.1.0\n"))
        # A bad choice: exit 2 listing the valid ones.
        result = await self.ctl("sessions", "--protocol", "bogus")
        self.assertEqual((result.code, result.out), (2, ""))
        self.assertIn("invalid choice: 'bogus' (choose from 'pop3', 'imap4', 'smtp', 'pop3s', 'imap4s', 'smtps')",
                      result.err)  # fmt: skip

    async def test_noEpochNumbers(self) -> None:
        """status (after an AAA test) and sessions (with a live session) show no
        epoch numbers."""
        await self.start_daemon()
        await self.logged_in_client()
        await self.ctl("aaa", "test", "LOCAL", "alice", stdin=f"{PASSWORD}\n".encode())
        for args in (["status"], ["sessions"]):
            result = await self.ctl(*args)
            self.assertEqual(result.code, 0, result.err)
            self.assertIn("alice" if args == ["sessions"] else "ago)", result.out)
            self.assertIsNone(EPOCH_NUMBER.search(result.out), result.out)

    async def test_closedPipe(self) -> None:
        """mailgwctl --json status | head -1 (the reader gone early): no traceback."""
        await self.start_daemon()
        result = await deferToThread(closed_pipe_run, "--socket", str(self.socket), "--json", "status")
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertEqual((result.returncode, result.stderr), (141, b""))

    async def test_aaaTestMasksOnlyThePassword(self) -> None:
        """A typed password that is part of the answer's words (x, L, e) leaves them
        intact: the group name, 'user'."""
        await self.start_daemon()
        result = await self.ctl("aaa", "test", "LOCAL", "x", stdin=b"x\n")
        self.assertEqual(result.code, 1)
        self.assertTrue(result.out.startswith("LOCAL: x rejected: "), result.out)
        self.assertIn("group 'LOCAL'", result.out)
        for password in ("L", "e"):
            result = await self.ctl("aaa", "test", "LOCAL", "alice", stdin=f"{password}\n".encode())
            self.assertEqual(result.code, 1)
            self.assertIn("LOCAL: alice rejected: wrong password for local user (group 'LOCAL')", result.out)
            self.assertNotIn("*", result.out)

    async def test_accountsAddPrompts(self) -> None:
        """accounts add at a terminal, without --password-prompt: the password is asked
        twice without echo, and the account is added with it."""
        await self.start_daemon()
        secret = b"pty-Secret-9"
        argv = [MAILGWCTL, "--socket", str(self.socket), "accounts", "add", "--host", "127.0.0.1",
                "--tls", "none", "--username", "alice", "--domain", "example.com"]  # fmt: skip
        answers = [(b"Password of alice@127.0.0.1: ", secret + b"\n"), (b"(again): ", secret + b"\n")]
        code, shown = await deferToThread(pty_run, argv, answers)
        self.assertEqual(code, 0, shown)
        self.assertIn(b"Password of alice@127.0.0.1 (again): ", shown)
        self.assertIn(b"account 1 added", shown)
        self.assertNotIn(secret, shown)  # not echoed
        listing = await self.ctl("--json", "accounts", "list")
        self.assertEqual([a["password_set"] for a in listing.json()], [True])


class SSOAndCacheDaemonTests(AdminDaemonBase):
    """mailgwctl sso and aaa flush against twistd with POP3 SSO on."""

    async def test_ssoAndCacheFlush(self) -> None:
        """sso replay (a relative path: the daemon gets it absolute) learns the
        capture's accepted login inside the policy; sso list (table, JSON) and
        lookup show it, with date-times and durations only; aaa flush forgets the
        login aaa test left in the cache, and names the known groups for an unknown
        one; after a restart of the daemon the entry is still there; sso remove
        ends it, after which lookup exits 1."""
        self.data["sso"] = {"pop3": {"enabled": True, "mode": "inline", "servers": [SERVER],
                                     "policy": ["10.0.0.0/8"], "ttl": 3600}}  # fmt: skip
        capture = self.gateway.directory / "capture.pcap"
        write_capture(capture)
        collector, process = await self.start_daemon()
        self.assertEqual((await self.ctl("sso", "list")).out, "no SSO identities\n")
        replay = await self.ctl("sso", "replay", os.path.relpath(capture))
        self.assertEqual(replay.code, 0, replay.err)
        self.assertRegex(replay.out, rf"^{re.escape(str(capture))}: \d+ frames, 2 POP3 logins seen, 1 learnt,"
                                     " 1 outside sso.pop3.policy\n$")  # fmt: skip
        table = await self.ctl("sso", "list")
        self.assertEqual(table.code, 0, table.err)
        _, row = table.out.splitlines()
        self.assertEqual(row.split()[:4], ["10.1.2.3", "alice", "monitor", "-"])
        self.assertRegex(row, r" (59m \d\ds|1h 00m)$")
        lookup = await self.ctl("sso", "lookup", "10.1.2.3")
        self.assertTrue(lookup.out.startswith("10.1.2.3: alice (monitor)\n"), lookup.out)
        for output in (table, lookup):
            self.assertIsNone(EPOCH_NUMBER.search(output.out), output.out)
        (before,) = (await self.ctl("--json", "sso", "list")).json()

        accepted = await self.ctl("aaa", "test", "LOCAL", "alice", stdin=f"{PASSWORD}\n".encode())
        self.assertEqual(accepted.code, 0, accepted.err)
        flush = await self.ctl("aaa", "flush", "LOCAL", "alice")
        self.assertEqual((flush.code, flush.out), (0, "1 cached login forgotten (user alice of group LOCAL)\n"))
        self.assertEqual((await self.ctl("--json", "aaa", "flush")).json()["flushed"], 0)
        unknown = await self.ctl("aaa", "flush", "NOPE")
        self.assertEqual((unknown.code, unknown.err), (1, "mailgwctl: no AAA server group 'NOPE' (groups: LOCAL)\n"))

        process.signalProcess("TERM")
        await collector.ended
        await self.start_daemon()
        (after,) = (await self.ctl("--json", "sso", "list")).json()
        self.assertEqual({k: v for k, v in after.items() if k != "expires_in"},
                         {k: v for k, v in before.items() if k != "expires_in"})  # fmt: skip
        removed = await self.ctl("sso", "remove", "10.1.2.3")
        self.assertEqual((removed.code, removed.out), (0, "SSO identity of alice at 10.1.2.3 removed\n"))
        gone = await self.ctl("sso", "lookup", "10.1.2.3")
        self.assertEqual((gone.code, gone.out, gone.err), (1, "", "mailgwctl: no SSO identity for 10.1.2.3\n"))


class CheckNowTests(AdminDaemonBase):
    """mailgwctl accounts check-now against the daemon's real poller."""

    async def test_checkNowPolls(self) -> None:
        """check-now polls a real Dovecot mailbox into an SMTP server, prints a
        progress line per message and the report, and the messages arrive."""
        sink = SmtpSink.started(self)
        for number in (1, 2):
            self.dovecot.deliver(
                "alice",
                b"From: a@example.net\r\nTo: bob@example.com\r\nSubject: m%d\r\n"
                b"Message-ID: <m%d@example.net>\r\n\r\nbody %d\r\n" % (number, number, number),
            )
        self.data["poller"] = {"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": sink.port}
        await self.start_daemon()
        added = await self.ctl(
            "--json", "accounts", "add", "--host", "127.0.0.1", "--port", str(self.dovecot.pop3_port),
            "--tls", "none", "--username", "alice", "--domain", "example.com", "--password-prompt",
            # Disabled: no scheduled poll races the check-now (which would join it and
            # get no progress lines); check-now polls a disabled account all the same.
            "--disabled",
            stdin=PASSWORD.encode() + b"\n",
        )
        self.assertEqual(added.code, 0, added.err)
        result = await self.ctl("accounts", "check-now", str(added.json()["id"]))
        self.assertEqual(result.code, 0, result.err)
        progress = [line for line in result.out.splitlines() if line.startswith("... ")]
        self.assertEqual(len(progress), 2, result.out)
        self.assertIn("delivered", result.out)
        messages = await deferToThread(sink.wait_for_messages, 2)
        self.assertEqual(sorted(r.strip("<>") for m in messages for r in m.rcpt_to), ["bob@example.com"] * 2)
        self.assertNotIn(PASSWORD, result.out + result.err)

    async def test_checkNowFails(self) -> None:
        """check-now of an account whose server is unreachable, or whose certificate
        is not trusted: FAILED with the reason in words and the fix, exit 1; accounts
        add and list show times as date-times."""
        self.data["poller"] = {"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": free_ports(1)[0]}
        await self.start_daemon()
        (closed,) = free_ports(1)
        added = await self.ctl(
            "accounts", "add", "--host", "127.0.0.1", "--port", str(closed), "--tls", "none",
            "--username", "alice", "--domain", "example.com", stdin=b"whatever\n",
        )  # fmt: skip
        self.assertEqual(added.code, 0, added.err)
        result = await self.ctl("accounts", "check-now", "1")
        self.assertEqual(result.code, 1, result.out)
        self.assertIn(f"FAILED: cannot connect to 127.0.0.1:{closed}: connection refused", result.out)
        # Implicit TLS to Dovecot without its CA: OpenSSL's reason, and the option.
        tls = await self.ctl(
            "accounts", "add", "--host", "127.0.0.1", "--port", str(self.dovecot.pop3s_port), "--tls", "implicit",
            "--username", "alice", "--domain", "example.com", stdin=PASSWORD.encode() + b"\n",
        )  # fmt: skip
        self.assertEqual(tls.code, 0, tls.err)
        result = await self.ctl("accounts", "check-now", "2")
        self.assertEqual(result.code, 1, result.out)
        self.assertIn(
            "FAILED: connection closed during login: certificate verify failed: unable to get local issuer"
            " certificate (set --ca)",
            result.out,
        )
        self.assertNotIn("SSL routines", result.out)
        listing = await self.ctl("accounts", "list")
        self.assertIn("failed: cannot connect", listing.out)
        for output in (added, result, listing):
            self.assertIsNone(EPOCH_NUMBER.search(output.out), output.out)
