"""``mailgwctl`` as administrators run it: a subprocess talking over the admin socket
to ``twistd -n mailgw`` (another subprocess) in front of a real Dovecot, with
Python's poplib as the mail client (in a thread, so the reactor stays free)."""

from __future__ import annotations

import json
import poplib
import shutil
import ssl
import sys
import tempfile
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
