"""Content inspection end to end [4.9]: a real clamd (with the EICAR signature the
fixture writes), a real Dovecot (POP3, IMAP, submission relaying to a sink), the gateway
in between, and real clients (poplib, imaplib, smtplib, curl, swaks)."""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import smtplib
import ssl
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from mailgw.admin.output import format_status
from tests.gateway import Gateway, deferLater, start_gateway
from tests.rawclient import SMALL_BUFFER, RawClient
from tests.servers.base import require_binary
from tests.servers.clamd import EICAR, EICAR_SIGNATURE, Clamd
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI
from tests.test_integration_pop3 import in_thread, reading, relay_of, shrink_send_buffer, tcp_of, unstuff

USERS = ("alice", "bob", "carol", "dave", "erin")
MAIL_USERS = {name: f"{name}-mail" for name in USERS}
#: alice: the strict profile; bob: none (zero-parsing); carol: a small size limit;
#: dave / erin: a clamd that is down, tempfail / pass
VPN_USERS: dict[str, tuple[str, str | None]] = {
    "alice": ("alice-mail", None),
    "bob": ("bob-mail", "Plain"),
    "carol": ("carol-mail", "Small"),
    "dave": ("dave-mail", "DownTemp"),
    "erin": ("erin-mail", "DownPass"),
}


def message(subject: str, *parts: bytes, message_id: str = "") -> bytes:
    head = (
        b"From: Alice <alice@example.com>\r\n"
        b"To: Bob <bob@example.com>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + (message_id or subject.replace(" ", "-")).encode() + b"@example.com>\r\n"
        b"Date: Wed, 02 Dec 2026 12:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
    )
    if not parts:
        return head + b"Content-Type: text/plain\r\n\r\nHello Bob,\r\n.leading dot\r\nBye.\r\n"
    body = b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\nThis is MIME.\r\n'
    for part in parts:
        body += b"--b1\r\n" + part
    return head + body + b"--b1--\r\n"


TEXT_PART = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSee the attachment.\r\n"


def attachment(name: str, content: bytes, content_type: str = "application/octet-stream") -> bytes:
    encoded = base64.encodebytes(content).replace(b"\n", b"\r\n")
    return (
        f'Content-Type: {content_type}; name="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'
    ).encode() + encoded


CLEAN = message("clean mail", TEXT_PART, attachment("notes.txt", b"just notes\n" * 20))
INFECTED = message("infected mail", TEXT_PART, attachment("eicar.com", EICAR))
EXE = message("exe mail", TEXT_PART, attachment("tool.exe", b"MZ\x90\x00" + os.urandom(300)))
EXE_BASE64 = base64.encodebytes(EXE.split(b"filename=\"tool.exe\"\r\n\r\n")[1][:20])[:8]


def big_message(size: int, subject: str = "big mail") -> bytes:
    line = b"x" * 76 + b"\r\n"
    return message(subject) + line * (size // len(line))


class InspectionBase(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.clamd = Clamd.started(self)
        # A clamd that is not there: a real one started and stopped, its port closed.
        down = Clamd.started(self)
        self.down_address = str(down.tcp_address)
        down.stop()
        self.dovecot = Dovecot.started(self, users=MAIL_USERS, submission=True)
        assert self.dovecot.smtp_sink is not None
        self.sink = self.dovecot.smtp_sink
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        self.gateway = self.start_gateway()

    def profiles(self) -> list[dict[str, Any]]:
        clamd = str(self.clamd.address)
        return [
            {"name": "strict", "clamd": clamd, "clamd_timeout": 10, "max_message_size": 20_000_000},
            {"name": "small", "clamd": clamd, "max_message_size": 20_000},
            {"name": "down-temp", "clamd": self.down_address, "clamd_timeout": 3},
            {"name": "down-pass", "clamd": self.down_address, "clamd_timeout": 3, "on_scanner_failure": "pass"},
        ]

    def start_gateway(self, state: Path | None = None) -> Gateway:
        upstream = {"host": "127.0.0.1", "tls": "starttls", "ca": str(self.dovecot.ca_path)}
        policies = [
            {"name": "DfltGrpPolicy", "simultaneous_logins": 20, "inspection": "strict"},
            {"name": "Plain", "simultaneous_logins": 20},
            {"name": "Small", "inspection": "small"},
            {"name": "DownTemp", "inspection": "down-temp"},
            {"name": "DownPass", "inspection": "down-pass"},
        ]
        sections: dict[str, Any] = {
            "imap4s": {"default_server": {**upstream, "port": self.dovecot.imap_port}, "allowed_servers": []},
            "smtps": {
                "default_server": {**upstream, "port": self.dovecot.submission_port},
                "allowed_servers": [],
                "authentication": ["aaa", "mailhost"],
            },
            "group_policy": policies,
            "inspection": self.profiles(),
        }
        if state is not None:
            sections["gateway"] = {"state_dir": str(state)}
        pop3s = {"default_server": {**upstream, "port": self.dovecot.pop3_port}, "allowed_servers": []}
        return start_gateway(self, self.pki, VPN_USERS, pop3s, **sections)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_path))

    def retr(self, user: str, count: int) -> defer.Deferred[list[bytes | str]]:
        """RETR 1..count over POP3S (poplib); each message as sent on the wire
        (CRLF line ends), or the -ERR text."""

        def fetch() -> list[bytes | str]:
            client = poplib.POP3_SSL("127.0.0.1", self.gateway.port("pop3s"), context=self.context(), timeout=60)
            out: list[bytes | str] = []
            try:
                client.user(user)
                client.pass_(f"{user}-mail")
                for number in range(1, count + 1):
                    try:
                        _, lines, _ = client.retr(number)
                        out.append(b"\r\n".join(lines) + b"\r\n")
                    except poplib.error_proto as e:
                        out.append(str(e))
            finally:
                try:
                    client.quit()
                except (OSError, poplib.error_proto):
                    pass
            return out

        return in_thread(fetch)  # type: ignore[no-any-return]

    def fetch(self, user: str, count: int, item: str = "BODY.PEEK[]") -> defer.Deferred[list[bytes | str]]:
        """FETCH n (item) over IMAPS (imaplib) for 1..count; the literal, or the error."""

        def run() -> list[bytes | str]:
            client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap4s"), ssl_context=self.context(), timeout=60)
            out: list[bytes | str] = []
            try:
                client.login(user, f"{user}-mail")
                client.select("INBOX")
                for number in range(1, count + 1):
                    try:
                        status, data = client.fetch(str(number), f"({item})")
                    except (imaplib.IMAP4.abort, OSError) as e:
                        out.append(f"abort: {e}")
                        return out
                    literal = next((d[1] for d in data if isinstance(d, tuple)), None)
                    out.append(literal if status == "OK" and literal is not None else f"{status} {data!r}")
                client.logout()
            except (imaplib.IMAP4.abort, OSError):
                pass
            return out

        return in_thread(run)  # type: ignore[no-any-return]

    def submit(self, user: str, data: bytes, *, announce_size: bool = True) -> defer.Deferred[str]:
        """Submit over SMTPS (smtplib; C{MAIL FROM} with C{SIZE=} unless told);
        "accepted" or the refusal's code and text."""

        def run() -> str:
            with smtplib.SMTP_SSL("127.0.0.1", self.gateway.port("smtps"), context=self.context(), timeout=60) as c:
                c.login(user, f"{user}-mail")
                try:
                    if announce_size:
                        c.sendmail("alice@example.com", ["bob@example.com"], data)
                    else:
                        c.mail("alice@example.com")
                        c.rcpt("bob@example.com")
                        code, text = c.data(data)
                        return "accepted" if code == 250 else f"{code} {bytes(text).decode()}"
                except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as e:
                    error = e.smtp_error
                    return f"{e.smtp_code} {error.decode() if isinstance(error, bytes) else error}"
                return "accepted"

        return in_thread(run)  # type: ignore[no-any-return]

    def inspection_events(self) -> list[dict[str, Any]]:
        return [e for e in self.gateway.events if e.get("event") == "inspection"]


class FetchTests(InspectionBase):
    async def test_pop3(self) -> None:
        """POP3 RETR: clean byte-identical; EICAR replaced naming the signature;
        tool.exe stripped with the text part intact and the notice naming it; each
        verdict one log event."""
        for m in (CLEAN, INFECTED, EXE):
            self.dovecot.deliver("alice", m)
        clean, infected, exe = await self.retr("alice", 3)
        self.assertEqual(clean, CLEAN)
        assert isinstance(infected, bytes) and isinstance(exe, bytes)
        self.assertIn(EICAR_SIGNATURE.encode(), infected)
        self.assertNotIn(base64.encodebytes(EICAR)[:40], infected)
        self.assertIn(b"Subject: [withheld] infected mail", infected)
        self.assertIn(TEXT_PART, exe)
        self.assertIn(b'"tool.exe"', exe)
        self.assertNotIn(EXE.split(b'filename="tool.exe"\r\n\r\n')[1][:40], exe)
        self.assertGreaterEqual(len(exe), len(EXE))  # padded: LIST still holds
        events = self.inspection_events()
        self.assertEqual([e["verdict"] for e in events], ["clean", "replaced", "stripped"])
        self.assertEqual(events[1]["rule"], EICAR_SIGNATURE)
        self.assertEqual(events[1]["message_id"], "<infected-mail@example.com>")
        self.assertEqual(events[2]["rule"], "*.exe")
        self.assertEqual({e["user"] for e in events}, {"alice"})
        metrics = self.gateway.service.metrics  # type: ignore[union-attr]
        counted = metrics.value("mailgw_inspected_messages_total", protocol="pop3", verdict="replaced", reason="virus")
        self.assertEqual(counted, 1)

    async def test_imap(self) -> None:
        """IMAP FETCH BODY.PEEK[] and RFC822: the same verdicts, literal lengths right
        (imaplib parses them)."""
        for m in (CLEAN, INFECTED, EXE):
            self.dovecot.deliver("alice", m)
        clean, infected, exe = await self.fetch("alice", 3)
        self.assertEqual(clean, CLEAN)
        assert isinstance(infected, bytes) and isinstance(exe, bytes)
        self.assertIn(EICAR_SIGNATURE.encode(), infected)
        self.assertIn(TEXT_PART, exe)
        self.assertIn(b'"tool.exe"', exe)
        self.assertNotIn(EXE.split(b'filename="tool.exe"\r\n\r\n')[1][:40], exe)
        (again,) = await self.fetch("alice", 1, "RFC822")
        self.assertEqual(again, CLEAN)

    async def test_sizeLimit(self) -> None:
        """Over max_message_size: withheld, saying so (POP3 and IMAP)."""
        self.dovecot.deliver("carol", big_message(30_000))
        (pop,) = await self.retr("carol", 1)
        (imap,) = await self.fetch("carol", 1)
        for got in (pop, imap):
            assert isinstance(got, bytes)
            self.assertIn(b"larger than the limit of 20000 octets", got)
            self.assertNotIn(b"x" * 76, got)

    async def test_noProfileZeroParsing(self) -> None:
        """A policy naming no profile: the EICAR message byte-identical."""
        self.dovecot.deliver("bob", INFECTED)
        self.assertEqual(await self.retr("bob", 1), [INFECTED])
        self.assertEqual(await self.fetch("bob", 1), [INFECTED])
        self.assertEqual(self.inspection_events(), [])

    async def test_scannerDown(self) -> None:
        """clamd down: POP3 -ERR [SYS/TEMP] and IMAP a session ended with BYE
        [UNAVAILABLE] under tempfail; the message itself under pass."""
        self.dovecot.deliver("dave", CLEAN)
        self.dovecot.deliver("erin", CLEAN)
        (pop,) = await self.retr("dave", 1)
        self.assertIsInstance(pop, str)
        self.assertIn("[SYS/TEMP]", str(pop))
        (imap,) = await self.fetch("dave", 1)
        self.assertIsInstance(imap, str)
        self.assertIn("UNAVAILABLE", str(imap))
        self.assertEqual(await self.retr("erin", 1), [CLEAN])
        self.assertEqual(await self.fetch("erin", 1), [CLEAN])


class SubmitTests(InspectionBase):
    async def test_smtplib(self) -> None:
        """SMTP: a clean message arrives intact; EICAR gets 550 5.7.1 and nothing
        reaches the sink; SIZE= above the limit gets 552 at MAIL FROM; a stripped
        attachment arrives stripped."""
        self.assertEqual(await self.submit("alice", CLEAN), "accepted")
        (received,) = await in_thread(self.sink.wait_for_messages, 1, 30)
        self.assertTrue(received.data.endswith(CLEAN), received.data[-200:])
        refused = await self.submit("alice", INFECTED)
        self.assertTrue(refused.startswith("550 5.7.1 "), refused)
        self.assertIn(EICAR_SIGNATURE, refused)
        big = big_message(30_000)
        at_mail = await self.submit("carol", big)  # smtplib announces SIZE=
        self.assertEqual(at_mail, "552 5.3.4 Message size exceeds the limit of 20000 octets")
        after_data = await self.submit("carol", big, announce_size=False)
        self.assertTrue(after_data.startswith("552 5.3.4 Message refused: it is larger than the limit"), after_data)
        self.assertEqual(await self.submit("alice", EXE), "accepted")
        messages = await in_thread(self.sink.wait_for_messages, 2, 30)
        self.assertEqual(len(messages), 2)
        self.assertIn(b'"tool.exe"', messages[1].data)
        self.assertIn(TEXT_PART, messages[1].data)
        await deferLater(0.5)
        self.assertEqual(len(self.sink.messages), 2)  # the refused ones never arrived

    async def test_curlAndSwaks(self) -> None:
        """curl and swaks: clean accepted, EICAR refused with 550."""
        require_binary("swaks", "swaks")
        mail = Path(self.mktemp())
        mail.write_bytes(INFECTED)
        url = f"smtps://127.0.0.1:{self.gateway.port('smtps')}"
        common = ["--silent", "--show-error", "--cacert", str(self.pki.ca_path), "--user", "alice:alice-mail"]
        args = [*common, "--mail-from", "alice@example.com", "--mail-rcpt", "bob@example.com", url]
        trace = Path(self.mktemp())
        traced = ["--trace-ascii", str(trace), *args, "--upload-file", str(mail)]
        out, err, code = await getProcessOutputAndValue("curl", traced)
        self.assertNotEqual(code, 0)  # curl says "Weird server reply" for a refused DATA
        self.assertIn(b"550 5.7.1 Message refused: it contains the virus", trace.read_bytes())
        mail.write_bytes(CLEAN)
        out, err, code = await getProcessOutputAndValue("curl", [*args, "--upload-file", str(mail)])
        self.assertEqual(code, 0, err)
        swaks = [
            "--server", "127.0.0.1", "--port", str(self.gateway.port("smtps")), "--tls-on-connect",
            "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "alice-mail",
            "--from", "alice@example.com", "--to", "bob@example.com",
        ]  # fmt: skip
        mail.write_bytes(INFECTED)
        out, err, code = await getProcessOutputAndValue("swaks", [*swaks, "--data", "@" + str(mail)])
        self.assertNotEqual(code, 0)
        self.assertIn(b"<~* 550 5.7.1 Message refused: it contains the virus", out, err)
        mail.write_bytes(CLEAN)
        out, err, code = await getProcessOutputAndValue("swaks", [*swaks, "--data", "@" + str(mail)])
        self.assertEqual(code, 0, out)
        messages = await in_thread(self.sink.wait_for_messages, 2, 30)
        self.assertTrue(messages[0].data.endswith(CLEAN), messages[0].data[-300:])
        # swaks ends the data with a CRLF of its own before the "." (its transcript shows it)
        self.assertTrue(messages[1].data.endswith(CLEAN + b"\r\n"), messages[1].data[-300:])

    async def test_scannerDown(self) -> None:
        """clamd down: 451 under tempfail; accepted under pass."""
        answer = await self.submit("dave", CLEAN)
        self.assertTrue(answer.startswith("451 4.7.1 "), answer)
        self.assertEqual(await self.submit("erin", CLEAN), "accepted")
        self.assertEqual(len(await in_thread(self.sink.wait_for_messages, 1, 30)), 1)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryAndSpoolTests(InspectionBase):
    async def test_parallelLargeRetrs(self) -> None:
        """Eight parallel inspected RETRs of a 4 MB message (curl, each its own
        process) grow the gateway's RSS by less than 24 MiB: messages are spooled to
        0600 files, removed afterwards."""
        big = big_message(4 * 1024 * 1024)
        self.dovecot.deliver("alice", big)
        url = f"pop3s://127.0.0.1:{self.gateway.port('pop3s')}/1"
        args = ["--silent", "--show-error", "--max-time", "120", "--cacert", str(self.pki.ca_path)]
        args += ["-u", "alice:alice-mail"]
        out, err, code = await getProcessOutputAndValue("curl", [*args, url])  # warm up
        self.assertEqual((code, out == big), (0, True), err)
        spool = Path(self.gateway.directory) / "state" / "spool"
        outputs = Path(self.mktemp())
        outputs.mkdir()
        before = rss()
        peak = before
        modes: set[int] = set()

        def sample() -> None:
            nonlocal peak
            peak = max(peak, rss())
            for entry in spool.iterdir():
                try:
                    modes.add(entry.stat().st_mode & 0o777)
                except FileNotFoundError:
                    pass

        sampler = task.LoopingCall(sample)
        sampler.start(0.02)
        try:
            results = await defer.gatherResults(
                [getProcessOutputAndValue("curl", [*args, "-o", str(outputs / str(i)), url]) for i in range(8)]
            )
        finally:
            sampler.stop()
        for i, (_, err, code) in enumerate(results):
            self.assertEqual(code, 0, err)
            self.assertEqual((outputs / str(i)).read_bytes(), big)
        self.assertLess(peak - before, 24 * 1024 * 1024, f"RSS grew by {(peak - before) / 2**20:.1f} MiB")
        self.assertEqual(modes, {0o600})
        self.assertEqual(list(spool.iterdir()), [])

    async def test_slowClientFlowControl(self) -> None:
        """A client that stops reading an inspected 10 MB RETR: the message is spooled
        (the server is read to its end), then the replay stops with the client's buffer:
        the gateway holds little in memory and no longer reads from the server; read
        again, the message arrives byte-identical."""
        big = big_message(10 * 1024 * 1024)
        self.dovecot.deliver("alice", big)
        port = self.gateway.port("pop3s")

        def login() -> RawClient:
            client = RawClient.open(port, self.context(), timeout=60, receive_buffer=SMALL_BUFFER)
            client.read_line()
            client.send(b"USER alice\r\nPASS alice-mail\r\n")
            client.read_line()
            client.read_line()
            return client

        client: RawClient = await in_thread(login)
        self.addCleanup(client.close)
        _, relay = relay_of(self.gateway, "pop3")
        shrink_send_buffer(relay._client)
        await in_thread(client.send, b"RETR 1\r\n")
        await deferLater(3.0)
        tcp = tcp_of(relay._client)
        buffered = len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
        self.assertLess(buffered, 512 * 1024, "the replay ignores the client's full buffer")
        self.assertFalse(reading(relay._server), "the gateway keeps reading from the server")
        self.assertTrue(tcp_of(relay._server).connected)

        def read_all() -> bytes:
            client.read_line()
            body = client.read_until(b"\r\n.\r\n")[: -len(b".\r\n")]
            client.command(b"QUIT")
            return unstuff(body)

        self.assertEqual(await in_thread(read_all), big)

    async def test_leftoversRemovedAtStart(self) -> None:
        """Spool files a crashed gateway left are removed at the next start."""
        state = Path(self.mktemp()).absolute()
        (state / "spool").mkdir(parents=True)
        left = state / "spool" / "message-left-by-crash"
        left.write_bytes(b"secret mail")
        self.start_gateway(state)
        self.assertFalse(left.exists())

    async def test_statusShowsClamd(self) -> None:
        """mailgwctl status shows each profile's clamd and its health."""
        service = self.gateway.service
        assert service is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = service.admin_backend.status()
            health = {p["profile"]: p.get("health") for p in status["inspection"]}
            if health.get("strict") == "reachable" and health.get("down-temp") == "unavailable":
                break
            await deferLater(0.1)
        self.assertEqual(health["strict"], "reachable")
        self.assertEqual(health["down-temp"], "unavailable")
        text = format_status(status)
        self.assertIn("Inspection profiles: 4", text)
        self.assertIn(str(self.clamd.address), text)
