"""The command-line conventions of ``mailgwctl`` [8.1] that need no daemon: global
options anywhere, ``--version``, choices, help texts, readable times, TLS errors in
words, and the masking of a typed password in an AAA test's reason.  (The same
conventions against a real daemon: tests/test_admin_daemon.py.)"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import mailgw
from mailgw.admin.cli import COMMANDS, Command, Streams, build_parser, main
from mailgw.admin.offline import HASH_SCHEMES
from mailgw.admin.output import format_accounts, format_check_now, format_sessions, format_status
from mailgw.admin.remote import ACCOUNT_FIELD_HELP
from mailgw.admin.responder import _masked
from mailgw.auth.passwords import SCHEMES
from mailgw.poller.accounts import FIELDS
from mailgw.tlsdiag import explain

MAILGWCTL = str(Path(sys.executable).parent / "mailgwctl")
#: an epoch time printed as a number: 1796190000, 1796190000.5, 1.79619e+09
EPOCH_NUMBER = re.compile(r"\b1[0-9]{9}(\.[0-9]+)?\b|\b[0-9]\.[0-9]+e\+09\b")


def run(argv: list[str], commands: dict[str, Command] | None = None) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    status = main(argv, stdin=StringIO(""), stdout=out, stderr=err, commands=commands or COMMANDS)
    return status, out.getvalue(), err.getvalue()


def parsers(parser: argparse.ArgumentParser, name: str = "mailgwctl") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the tree, with its command line."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                found += parsers(child, f"{name} {sub}")
    return found


class GlobalOptionTests(SynchronousTestCase):
    """--json, --socket, --config and --timeout before or after the command."""

    def seen(self, argv: list[str]) -> tuple[object, ...]:
        got: list[tuple[object, ...]] = []

        def handler(args: argparse.Namespace, streams: Streams) -> int:
            got.append((args.json, args.socket, args.timeout, args.action))
            return 0

        def add_arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_subparsers(dest="action", required=True).add_parser("list")

        status, _, err = run(argv, {"accounts": Command("accounts", handler, add_arguments)})
        self.assertEqual(status, 0, err)
        return got[0]

    def test_anywhere(self) -> None:
        """The same options give the same arguments wherever they stand."""
        expected = (True, "/tmp/s.sock", 7.0, "list")
        for argv in (
            ["--json", "--socket", "/tmp/s.sock", "--timeout", "7", "accounts", "list"],
            ["accounts", "--json", "--socket", "/tmp/s.sock", "list", "--timeout", "7"],
            ["accounts", "list", "--json", "--socket", "/tmp/s.sock", "--timeout", "7"],
            ["--socket", "/tmp/s.sock", "accounts", "list", "--timeout", "7", "--json"],
        ):
            self.assertEqual(self.seen(argv), expected, argv)

    def test_defaultsNotReset(self) -> None:
        """A value given before the command is not reset by the command's parser."""
        self.assertEqual(self.seen(["--json", "accounts", "list"])[:3], (True, "/run/mailgw/admin.sock", 60.0))

    def test_timeoutDefault(self) -> None:
        """A hung daemon holds the command for a minute at most by default."""
        self.assertEqual(self.seen(["accounts", "list"])[2], 60.0)

    def test_version(self) -> None:
        """--version, before or after a command, prints the package version."""
        for argv in (["--version"], ["status", "--version"]):
            self.assertEqual(run(argv), (0, f"mailgwctl {mailgw.__version__}\n", ""))


class ChoiceTests(SynchronousTestCase):
    """Bad choices are usage errors that list the valid values."""

    def test_protocol(self) -> None:
        """sessions --protocol bogus: exit 2, the valid protocols listed, nothing sent."""
        status, out, err = run(["sessions", "--protocol", "bogus"])
        self.assertEqual((status, out), (2, ""))
        self.assertIn("invalid choice: 'bogus' (choose from 'pop3', 'imap4', 'smtp', 'pop3s', 'imap4s', 'smtps')", err)

    def test_tls(self) -> None:
        """accounts add --tls sometimes: the TLS modes listed."""
        status, _, err = run(["accounts", "add", "--host", "h", "--username", "u", "--domain", "d", "--tls", "x"])
        self.assertEqual(status, 2)
        self.assertIn("(choose from 'none', 'starttls', 'implicit')", err)

    def test_setField(self) -> None:
        """--set of an unknown field: the fields listed."""
        status, _, err = run(["accounts", "edit", "1", "--set", "colour=red"])
        self.assertEqual(status, 2)
        self.assertIn("unknown account field 'colour' (fields: enabled, description, host,", err)


class HelpTests(SynchronousTestCase):
    """Help texts: a line per command, every option described with its default."""

    def test_everyOptionDescribed(self) -> None:
        """Every option of every (sub)command has a help text that names its default
        (or says it is required)."""
        for name, parser in parsers(build_parser()):
            for action in parser._actions:
                if not action.option_strings or action.dest in ("help", "version"):
                    continue
                self.assertTrue(action.help, f"{name} {action.option_strings}")
                expected = "required" if action.required else "default"
                self.assertIn(expected, str(action.help), f"{name} {action.option_strings}")

    def test_commandLines(self) -> None:
        """mailgwctl --help has one line per command, with its help."""
        _, out, _ = run(["--help"])
        for name, command in COMMANDS.items():
            self.assertRegex(out, rf"\n    {re.escape(name)} +{re.escape(command.help[:30])}")

    def test_accountsAdd(self) -> None:
        """accounts add --help: --tls defaults to implicit, --ca exists, and the --set
        fields are listed with no_recipient_action's default."""
        _, out, _ = run(["accounts", "add", "--help"])
        flat = " ".join(out.split())
        self.assertIn("or implicit (default: implicit)", flat)
        self.assertIn("--ca PEM", out)
        for field in FIELDS:
            if field != "password":
                self.assertRegex(out, rf"\n  {field} ")
        self.assertRegex(out, r"no_recipient_action .*delete or postmaster \(default: \"delete\"\)")

    def test_fieldHelpComplete(self) -> None:
        """Every account field has a description (none is forgotten when one is added)."""
        self.assertEqual(set(ACCOUNT_FIELD_HELP), set(FIELDS) - {"password"})

    def test_schemes(self) -> None:
        """hash-password's choices are the password module's schemes."""
        self.assertEqual(HASH_SCHEMES, SCHEMES)


STATUS = {
    "version": "0.1.0", "node_name": "gw1", "pid": 42, "configuration": "/etc/mailgw/mailgw.toml",
    "started": 1796190000.25, "uptime": 3725.5,
    "listeners": [
        {"name": "pop3s/lo/995", "description": "pop3s/lo/995 (127.0.0.1, implicit TLS)", "running": True},
        {"name": "pop3s/lo/110", "description": "pop3s/lo/110 (127.0.0.1, STARTTLS)", "running": False},
    ],
    "sessions": {"total": 0, "by_protocol": {}},
    "aaa_groups": [{"name": "LOCAL", "protocol": "local", "servers": ["/etc/mailgw/users.toml"], "health": "reachable",
                    "last_test": {"result": "accepted", "at": 1796193600.0}}],
    "poller": {"enabled": True, "running": True, "state": "running", "scheduled_accounts": 2, "polls_running": 0,
               "polls": 7, "failed_polls": 1, "fetched": 3, "delivered": 3, "deleted": 3, "skipped": 0,
               "possible_duplicates": 0},
    "sso": {"enabled": False, "mode": "inline", "running": False, "state": "not configured"},
    "reload": "available",
}  # fmt: skip


class OutputTests(SynchronousTestCase):
    """Times as local date-times or durations, never epoch numbers; status readable."""

    def test_status(self) -> None:
        """The listener table has one column per fact (the name is not repeated), the
        poller line names its counters, the last AAA test says how long ago."""
        text = format_status(STATUS)
        self.assertIsNone(EPOCH_NUMBER.search(text), text)
        self.assertRegex(text, r"NAME +ADDRESS +TLS +STATE\n +pop3s/lo/995 +127\.0\.0\.1 +implicit TLS +listening\n")
        self.assertEqual(text.count("pop3s/lo/995"), 1)
        self.assertIn("Poller: running\n  accounts scheduled 2, polls running 0, polls 7, failed 1,", text)
        self.assertRegex(text, r"LOCAL +local +reachable +accepted \(2m 05s ago\)")
        self.assertIn("up 1h 02m (since ", text)

    def test_sessionsAndAccounts(self) -> None:
        """sessions and accounts list show times readably."""
        session = {"session_id": "a1", "protocol": "pop3", "state": "authenticated", "user": "alice",
                   "client": "127.0.0.1:5", "upstream": "127.0.0.1:110", "started": 1796190000.0,
                   "last_activity": 1796190100.0, "age": 3725.0, "idle": 12.0,
                   "bytes_from_client": 1, "bytes_to_client": 2}  # fmt: skip
        account = {"id": 1, "enabled": True, "domain": "example.com", "username": "u", "host": "h", "port": 995,
                   "tls": "implicit", "interval": None, "effective_interval": 300, "leave_on_server": False,
                   "last_poll": 1796190000.5, "last_result": "failed: connection closed during login:"
                   " [('SSL routines', '', 'certificate verify failed')]", "created": 1796190000.0}  # fmt: skip
        for text in (format_sessions([session]), format_accounts([account])):
            self.assertIsNone(EPOCH_NUMBER.search(text), text)
        listing = format_accounts([account])
        self.assertIn("5m 00s", listing)
        self.assertIn("certificate verify failed: ", listing)
        self.assertNotIn("SSL routines", listing)

    def test_checkNow(self) -> None:
        """A failed check-now starts with FAILED and the reason in words."""
        report = {"account_id": 3, "started": 1796190000.0, "finished": 1796190001.5, "fetched": 0,
                  "error": "connection closed during login: [('SSL routines', '', 'wrong version number')]",
                  "ok": False}  # fmt: skip
        text = format_check_now(report)
        self.assertTrue(
            text.startswith("FAILED: connection closed during login: the server does not speak TLS on this port"
                            " (try --tls starttls or none)\n"), text)  # fmt: skip
        self.assertIn("took: 1.5 s\n", text)
        self.assertIsNone(EPOCH_NUMBER.search(text), text)


class TLSWordsTests(SynchronousTestCase):
    """Raw TLS errors become sentences with the fix."""

    hints = {"ca": "set --ca", "tls": "try --tls starttls or none"}

    def test_knownAnswers(self) -> None:
        """pyOpenSSL's error tuples and service-identity's mismatch, in words."""
        for raw, words in [
            ("x: [('SSL routines', '', 'certificate verify failed')]",
             "x: certificate verify failed: the server's certificate is not signed by a CA that is trusted here"
             " (set --ca)"),
            ("[('SSL routines', 'ssl3_get_record', 'wrong version number')]",
             "the server does not speak TLS on this port (try --tls starttls or none)"),
            ("[('SSL routines', '', 'sslv3 alert handshake failure')]",
             "the server and the gateway have no TLS version or cipher in common (sslv3 alert handshake failure)"),
            ("[('SSL routines', '', 'tlsv1 alert internal error')]",
             "the server refused the TLS handshake (internal error)"),
            ("[('SSL routines', '', 'something new'), ('x', 'y', 'z')]", "TLS error: something new; z"),
            ("VerificationError(errors=[IPAddressMismatch(mismatched_id=IPAddress_ID(ip=IPv4Address('10.0.0.1')))])",
             "the server's certificate is not valid for the name 10.0.0.1 (connect by a name the certificate carries)"),
            ("VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID(hostname='pop.example'))])",
             "the server's certificate is not valid for the name pop.example (connect by a name the certificate"
             " carries)"),
            ("cannot connect to h:1: Connection was refused by other side: 111: Connection refused.",
             "cannot connect to h:1: connection refused (nothing listens there)"),
            ("no TLS here", "no TLS here"),
        ]:  # fmt: skip
            self.assertEqual(explain(raw, self.hints), words)

    def test_detail(self) -> None:
        """OpenSSL's own reason, when known, replaces the generic one."""
        self.assertEqual(
            explain("[('SSL routines', '', 'certificate verify failed')]", self.hints,
                    detail="self-signed certificate in certificate chain"),
            "certificate verify failed: self-signed certificate in certificate chain (set --ca)",
        )  # fmt: skip


class MaskTests(SynchronousTestCase):
    """aaa test masks the typed password, not every string that contains it."""

    def test_words(self) -> None:
        """A password that is part of other words leaves them alone; one that stands
        as a word, or in a dialogue's password field, is masked."""
        for text, password, expected in [
            ("no LDAP server answered: ldaps://dc1.example.com:636", "x",
             "no LDAP server answered: ldaps://dc1.example.com:636"),
            ("wrong password for local user (group 'LOCAL')", "L", "wrong password for local user (group 'LOCAL')"),
            ("the server said: -ERR bad password after PASS hunter2", "other",
             "the server said: -ERR bad password after PASS ********"),
            ("a1 LOGIN alice s3cret", "zz", "a1 LOGIN alice ********"),
            ("leaked: hunter2.", "hunter2", "leaked: ********."),
            ("'hunter2' is wrong", "hunter2", "'********' is wrong"),
        ]:  # fmt: skip
            self.assertEqual(_masked(text, password), expected)


class BrokenPipeTests(SynchronousTestCase):
    """The real program, its reader gone: no traceback."""

    def test_closedPipe(self) -> None:
        """Output into a pipe nobody reads any more: no traceback, SIGPIPE's status."""
        read, write = os.pipe()
        os.close(read)
        try:
            result = subprocess.run(
                [MAILGWCTL, "accounts", "add", "--help"], stdout=write, stderr=subprocess.PIPE, check=False
            )
        finally:
            os.close(write)
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertEqual((result.returncode, result.stderr), (141, b""))
