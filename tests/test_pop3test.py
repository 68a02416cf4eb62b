"""``mailgw-pop3test`` [2]: the console script run as a subprocess against a real Dovecot,
the password on its standard input; and its pure helpers."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.pop3test import Transcript, UsageError, mask_command, parse_hostport, read_password
from tests.servers.base import free_port
from tests.servers.dovecot import Dovecot

PASSWORD = "alice-Secret-9"
USERS = {"alice": PASSWORD}
SCRIPT = Path(sys.executable).parent / "mailgw-pop3test"


class HelperTests(SynchronousTestCase):
    def test_parseHostPort(self) -> None:
        """HOST[:PORT], with IPv6 literals bare or in brackets."""
        self.assertEqual(parse_hostport("mail.example.com"), ("mail.example.com", None))
        self.assertEqual(parse_hostport("127.0.0.1:1110"), ("127.0.0.1", 1110))
        self.assertEqual(parse_hostport("[::1]:995"), ("::1", 995))
        self.assertEqual(parse_hostport("[::1]"), ("::1", None))
        self.assertEqual(parse_hostport("::1"), ("::1", None))
        for bad in ("", "host:", "host:0", "host:65536", "host:x", "[::1", "[::1]x", ":110"):
            self.assertRaises(UsageError, parse_hostport, bad)

    def test_mask(self) -> None:
        """PASS arguments and AUTH payloads are masked, other lines shown as sent."""
        self.assertEqual(mask_command("PASS secret word"), "PASS ********")
        self.assertEqual(mask_command("pass x"), "pass ********")
        self.assertEqual(mask_command("AUTH PLAIN AGFsaWNlAHNlY3JldA=="), "AUTH PLAIN ********")
        self.assertEqual(mask_command("AUTH PLAIN"), "AUTH PLAIN")
        self.assertEqual(mask_command("AGFsaWNlAHNlY3JldA==", in_auth=True), "********")
        self.assertEqual(mask_command("USER alice"), "USER alice")

    def test_transcriptAuthExchange(self) -> None:
        """After AUTH, client lines are masked until the server's final answer."""
        out = io.StringIO()
        transcript = Transcript(out)
        transcript.sent(b"AUTH PLAIN\r\n")
        transcript.received(b"+ ")
        transcript.sent(b"AGFsaWNlAHNlY3JldA==\r\n")
        transcript.received(b"+OK")
        transcript.sent(b"STAT\r\n")
        self.assertEqual(out.getvalue(), "C: AUTH PLAIN\nS: + \nC: ********\nS: +OK\nC: STAT\n")

    def test_readPassword(self) -> None:
        """Not a terminal: one line from stdin, without its line end; nothing: an error."""
        self.assertEqual(read_password(io.StringIO("pw with space\r\nnext\n"), "?"), "pw with space")
        self.assertRaises(UsageError, read_password, io.StringIO(""), "?")


class Pop3TestCommandTests(TestCase):
    """The command against Dovecot (user "alice" only, no domain)."""

    timeout = 60

    def setUp(self) -> None:
        if not SCRIPT.exists():
            self.fail(f"{SCRIPT} is missing: .venv/bin/pip install -e .")
        self.dovecot = Dovecot.started(self, users=USERS)

    async def run_command(self, *args: str, password: str = PASSWORD) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            str(SCRIPT),
            [*args, "--timeout", "5"],
            env=dict(os.environ),
            stdinBytes=(password + "\n").encode(),
        )
        text, errors = out.decode(), err.decode()
        if password:
            self.assertNotIn(password, text)
            self.assertNotIn(password, errors)
        return text, errors, code

    def server(self, implicit: bool = False) -> str:
        return f"127.0.0.1:{self.dovecot.pop3s_port if implicit else self.dovecot.pop3_port}"

    def ca(self) -> list[str]:
        return ["--ca", str(self.dovecot.ca_path)]

    async def test_success(self) -> None:
        """A good login over STLS: the dialogue with PASS masked, verdict OK, exit 0."""
        out, _, code = await self.run_command(self.server(), "alice", *self.ca())
        self.assertEqual(code, 0, out)
        self.assertIn("C: STLS\n", out)
        self.assertIn("C: USER alice\n", out)
        self.assertIn("C: PASS ********\n", out)
        self.assertIn("S: +OK Logged in.\n", out)
        self.assertIn("C: QUIT\n", out)
        self.assertIn("VERDICT: OK", out)

    async def test_implicitTLS(self) -> None:
        """--tls implicit talks TLS from the first byte (no STLS)."""
        out, _, code = await self.run_command(self.server(implicit=True), "alice", "--tls", "implicit", *self.ca())
        self.assertEqual(code, 0, out)
        self.assertNotIn("C: STLS", out)

    async def test_failure(self) -> None:
        """A wrong password: the server's -ERR, verdict FAILED, exit 1."""
        out, _, code = await self.run_command(self.server(), "alice", *self.ca(), password="wrong-password")
        self.assertEqual(code, 1, out)
        self.assertIn("S: -ERR", out)
        self.assertIn("VERDICT: FAILED", out)

    async def test_stripDomainRetry(self) -> None:
        """user@domain rejected, user accepted: the verdict says the server wants the
        name without the domain (strip_domain = true)."""
        out, _, code = await self.run_command(self.server(), "alice@example.com", *self.ca())
        self.assertEqual(code, 0, out)
        self.assertIn("C: USER alice@example.com\n", out)
        self.assertIn("C: USER alice\n", out)
        self.assertEqual(out.count("C: PASS ********\n"), 2)
        verdict = out.split("VERDICT:", 1)[1]
        self.assertIn("accepts 'alice', not 'alice@example.com'", verdict)
        self.assertIn("strip_domain = true", verdict)

    async def test_stripDomainOption(self) -> None:
        """--strip-domain sends the short form only, as the checker would."""
        out, _, code = await self.run_command(self.server(), "alice@example.com", "--strip-domain", *self.ca())
        self.assertEqual(code, 0, out)
        self.assertNotIn("USER alice@example.com", out)
        self.assertEqual(out.count("C: USER alice\n"), 1)

    async def test_bothFormsFail(self) -> None:
        """A wrong password fails with both forms; exit 1."""
        out, _, code = await self.run_command(self.server(), "alice@example.com", *self.ca(), password="nope")
        self.assertEqual(code, 1, out)
        self.assertIn("rejects both 'alice@example.com' and 'alice'", out)

    async def test_untrustedCertificate(self) -> None:
        """Without the test CA the certificate is not trusted: unavailable, exit 1,
        and no USER/PASS is ever sent."""
        out, _, code = await self.run_command(self.server(implicit=True), "alice", "--tls", "implicit")
        self.assertEqual(code, 1, out)
        self.assertIn("unavailable", out)
        self.assertNotIn("C: USER", out)

    async def test_unreachable(self) -> None:
        """A closed port: unavailable, exit 1."""
        out, _, code = await self.run_command(f"127.0.0.1:{free_port()}", "alice", *self.ca())
        self.assertEqual(code, 1, out)
        self.assertIn("VERDICT: FAILED: the server is unavailable", out)

    async def test_usageErrors(self) -> None:
        """Bad arguments and an empty password: exit 2 with a message, nothing sent."""
        for args, password in (
            ((self.server(), "alice", "--tls", "sometimes"), PASSWORD),
            (("127.0.0.1:99999", "alice"), PASSWORD),
            ((self.server(), "alice", "--ca", "/nonexistent.pem"), PASSWORD),
            ((self.server(),), PASSWORD),
            ((self.server(), "alice"), ""),
        ):
            out, err, code = await self.run_command(*args, password=password)
            self.assertEqual(code, 2, (args, out, err))
            self.assertIn("mailgw-pop3test", err)
            self.assertEqual(out, "")
