"""The fail2ban filter and jail in etc/fail2ban/ read the gateway's failed-login log line
(SPEC [4.10]) in both log formats, from a file or the journal, and nothing else.

Python's ``re`` checks the filter's regexes everywhere; where fail2ban is installed
(Debian package ``fail2ban``), ``fail2ban-regex`` and ``fail2ban-client --test`` check
the files as fail2ban itself reads them (missing: skipped, or a failure with ``CI=true``).
"""

from __future__ import annotations

import ast
import configparser
import io
import ipaddress
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.logger import LogEvent, LogLevel, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase

from mailgw.logs import event_as_json
from tests.servers.base import require_binary, require_file

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "mailgw.conf"
JAIL = ROOT / "etc" / "fail2ban" / "jail.d" / "mailgw.conf.example"

#: the message of the gateway's failed-login event (mailgw.proxy.core, ProxySession._login_failed)
LOGIN_FAILED = "Login failed from {client_ip} for {user} ({protocol}, session {session_id}): {reason}"

#: what the test puts for fail2ban's <HOST>: an IP address, checked with ipaddress afterwards
HOST = r"(?P<host>[0-9A-Fa-f:.]+)"

#: 2026-12-02T06:30:00Z and the following seconds
T0 = datetime(2026, 12, 2, 6, 30, tzinfo=UTC).timestamp()

#: words that would mean the filter needs a secret in the log
PASSWORDISH = re.compile(r"pass|secret|credential|token", re.IGNORECASE)


def read_filter() -> configparser.SectionProxy:
    """The filter's [Definition], ``%(name)s`` and ``%%`` resolved as fail2ban does."""
    parser = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(FILTER.read_text())
    return parser["Definition"]


def failregexes() -> list[str]:
    return [line for line in read_filter()["failregex"].splitlines() if line.strip()]


def python_regexes() -> list[re.Pattern[str]]:
    """The failregexes with ``<HOST>`` as a named group (the only tag they use)."""
    patterns = []
    for regex in failregexes():
        without_host = regex.replace("<HOST>", "")
        assert "<" not in re.sub(r"\(\?P?<", "", without_host), f"unknown fail2ban tag in {regex!r}"
        patterns.append(re.compile(regex.replace("<HOST>", HOST)))
    return patterns


def date_regexes() -> list[re.Pattern[str]]:
    """The datepatterns, translated from fail2ban's strptime-like syntax."""
    codes = {
        "%Y": r"\d{4}",
        "%m": r"\d{2}",
        "%d": r"\d{2}",
        "%H": r"\d{2}",
        "%M": r"\d{2}",
        "%S": r"\d{2}",
        "%f": r"\d{1,6}",
        "%z": r"(?:Z|[+-][01]\d(?::?\d{2})?)",
    }
    patterns = []
    for line in read_filter()["datepattern"].splitlines():
        pattern = line.strip().replace("{^LN-BEG}", r"^(?:\W{0,2})?")
        for code, regex in codes.items():
            pattern = pattern.replace(code, regex)
        patterns.append(re.compile(pattern))
    return patterns


def without_date(line: str) -> str:
    """The line as fail2ban matches it when read from a file: the date cut out."""
    for pattern in date_regexes():
        match = pattern.search(line)
        if match:
            group = 1 if pattern.groups else 0
            return line[: match.start(group)] + line[match.end(group) :]
    return line


def failed_host(line: str) -> str | None:
    """The address fail2ban would count for one file line (date cut out), or None."""
    for pattern in python_regexes():
        match = pattern.search(without_date(line))
        if match:
            return match.group("host")
    return None


def event(when: float, **fields: Any) -> LogEvent:
    """A failed-login event as the gateway emits it (after twisted.logger adds log_*)."""
    values = {
        "event": "login_failed",
        "session_id": "3f9a0c21b7d4",
        "protocol": "pop3",
        "client": "192.0.2.7:40000",
        "client_ip": "192.0.2.7",
        "user": "jdoe",
        "mail_user": "jdoe",
        "upstream": "127.0.0.1:110",
        "reason": "aaa: bad credentials for 'jdoe'",
        "temporary": False,
    }
    values.update(fields)
    return {
        "log_format": LOGIN_FAILED,
        "log_level": LogLevel.info,
        "log_namespace": "mailgw.proxy.pop3.POP3Session",
        "log_time": when,
        **values,
    }


def text_line(e: LogEvent) -> str:
    """The event as twisted's textFileLogObserver writes it ([gateway] log_format = "text")."""
    out = io.StringIO()
    textFileLogObserver(out)(e)
    return out.getvalue().rstrip("\n")


def json_line(e: LogEvent) -> str:
    """The event as mailgw.logs writes it (log_format = "json")."""
    return event_as_json(e).rstrip("\n")


def journal(message: str) -> str:
    """A journal entry as fail2ban's systemd backend hands it to the filter."""
    return f"gw1 twistd[812]: {message}"


#: (address as logged, address fail2ban bans): IPv4, IPv6, IPv4-mapped from a "::" listener
ADDRESSES = [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8::7", "2001:db8::7"),
    ("::1", "::1"),
    ("::ffff:198.51.100.9", "198.51.100.9"),
    ("2001:db8:85a3:8d3:1319:8a2e:370:7348", "2001:db8:85a3:8d3:1319:8a2e:370:7348"),
]

#: user names a client may send: empty (logged "-"), with spaces, and ones that imitate
#: the rest of the line or the JSON keys
USERS = [
    "-",
    "jdoe",
    "j doe@example.com",
    "x from 6.6.6.6 for y",
    "y (pop3, session 1): from 6.6.6.6 for",
    '", "client_ip": "6.6.6.6',
    '\\", \\"client_ip\\": \\"6.6.6.6',
]


def sample_lines() -> list[tuple[str, str]]:
    """(log file line, address) for every address, user, protocol and log format."""
    lines: list[tuple[str, str]] = []
    for i, (logged, banned) in enumerate(ADDRESSES):
        for j, user in enumerate(USERS):
            protocol = ("pop3", "imap4", "smtp")[j % 3]
            # one time per line; every other JSON time has a fraction of a second
            e = event(
                T0 + i * 10 + j + 0.25 * (j % 2),
                client_ip=logged,
                client=f"{logged}:5{j}",
                user=user,
                protocol=protocol,
            )
            lines.append((text_line(e), banned))
            lines.append((json_line(e), banned))
    return lines


#: log lines that are not failed logins, or try to pass for one
NOT_FAILURES = [
    "2026-12-02T06:30:00+0000 [mailgw.proxy.pop3.POP3Session#info] New pop3 session 3f9a0c21b7d4 from 6.6.6.6:5000",
    "2026-12-02T06:30:00+0000 [mailgw.proxy.pop3.POP3Session#info] Login succeeded for jdoe from 6.6.6.6",
    # a continuation line of a multi-line event, whose text a client chose
    "\t[mailgw.proxy.pop3.POP3Session#info] Login failed from 6.6.6.6 for x (pop3, session 1): y",
    # another event that quotes client input
    "2026-12-02T06:30:00+0000 [mailgw.proxy.pop3.POP3Session#info] Bad command"
    " '[mailgw.x#info] Login failed from 6.6.6.6 for x (pop3, session 1): y'",
    "2026-12-02T06:30:00+0000 [twisted.internet.tcp#info] Login failed from 6.6.6.6 for x (pop3, session 1): y",
    # a text line that quotes client input looking like the JSON form
    "2026-12-02T06:30:00+0000 [mailgw.proxy.imap4.IMAP4Session#info] Bad command"
    """ '{"event": "login_failed", "client_ip": "6.6.6.6"}'""",
    json.dumps({"time": "2026-12-02T06:30:00+00:00", "event": "session_closed", "client_ip": "6.6.6.6"}),
    json.dumps({"time": "2026-12-02T06:30:00+00:00", "event": "login_failed_x", "client_ip": "6.6.6.6"}),
    json.dumps(
        {
            "time": "2026-12-02T06:30:00+00:00",
            "message": '"event": "login_failed", "client_ip": "6.6.6.6"',
            "event": "login_succeeded",
            "user": '"event": "login_failed", "client_ip": "6.6.6.6"',
        }
    ),
]


class FilterRegexTests(SynchronousTestCase):
    """The filter's regexes, translated for Python's re (no fail2ban needed)."""

    def test_textAndJsonBothCovered(self) -> None:
        """There is one failregex for the text line and one for the JSON object, and
        a datepattern for each."""
        self.assertEqual(len(failregexes()), 2)
        self.assertEqual(len(date_regexes()), 2)

    def test_sampleLines(self) -> None:
        """Every failed login, text or JSON, IPv4 or IPv6, whatever the user name, gives
        exactly the client's address."""
        for line, banned in sample_lines():
            host = failed_host(line)
            self.assertIsNotNone(host, line)
            assert host is not None
            address = ipaddress.ip_address(host)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped  # fail2ban bans the IPv4 address
            self.assertEqual(address, ipaddress.ip_address(banned), line)

    def test_journal(self) -> None:
        """Journal entries (no date cut, a "host identifier[pid]: " prefix) match too."""
        for line, banned in sample_lines():
            if banned != "203.0.113.7":
                continue
            matches = [p.search(journal(line)) for p in python_regexes()]
            hosts = [m.group("host") for m in matches if m]
            self.assertEqual(hosts, [banned], line)

    def test_datesCut(self) -> None:
        """The datepatterns find the timestamp of both formats at its place, so the
        failregexes see the line without it."""
        e = event(T0 + 0.25)
        self.assertTrue(without_date(text_line(e)).startswith(" [mailgw.proxy.pop3.POP3Session#info] Login"))
        self.assertTrue(without_date(json_line(e)).startswith('{"time": "", "level": "info"'))

    def test_otherLinesDoNotMatch(self) -> None:
        """Other events, continuation lines and imitations inside values match nothing."""
        for line in NOT_FAILURES:
            self.assertIsNone(failed_host(line), line)
            self.assertIsNone(failed_host(journal(line)), line)

    def test_noPasswordNeeded(self) -> None:
        """The regexes name no password-like field, and match events that hold only the
        address, the user and the reason (nothing secret)."""
        for regex in failregexes():
            self.assertIsNone(PASSWORDISH.search(regex), regex)
        minimal = {"event": "login_failed", "client_ip": "203.0.113.7", "user": "-", "reason": "x"}
        self.assertEqual(failed_host(json.dumps(minimal)), "203.0.113.7")
        e = event(T0, client_ip="2001:db8::7", user="-", reason="")
        for key in ("mail_user", "upstream", "temporary", "client"):
            del e[key]
        self.assertEqual(failed_host(text_line(e)), "2001:db8::7")
        self.assertEqual(failed_host(json_line(e)), "2001:db8::7")

    def test_gatewayEvent(self) -> None:
        """The event a real failed POP3 login logs, in both formats, names the client."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        from tests.test_proxy_pop3 import POP3Harness, make_config

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        harness = POP3Harness(make_config())
        session, _ = harness.connect()
        session.dataReceived(b"USER alice\r\nPASS not-alice-pw\r\n")
        harness.clock.advance(2)
        failed = [e for e in events if e.get("event") == "login_failed"]
        self.assertEqual(len(failed), 1, [e.get("log_format") for e in events])
        for line in (text_line(failed[0]), json_line(failed[0])):
            self.assertEqual(failed_host(line), "192.0.2.7", line)
            self.assertNotIn("not-alice-pw", line)


class Fail2banTests(SynchronousTestCase):
    """fail2ban itself reads the filter and the jail."""

    def test_fail2banRegex(self) -> None:
        """fail2ban-regex on a log of sample lines finds each failed login once, with
        the client's address and the line's time, and no other line."""
        fail2ban_regex = require_binary("fail2ban-regex", "fail2ban")
        samples = sample_lines()
        log = Path(self.mktemp())
        log.write_text("\n".join([*NOT_FAILURES[:2], *(line for line, _ in samples), *NOT_FAILURES[2:]]) + "\n")
        summary = self.run_fail2ban([fail2ban_regex, str(log), str(FILTER)])
        counts = re.search(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed", summary)
        self.assertIsNotNone(counts, summary)
        assert counts is not None
        total = len(samples) + len(NOT_FAILURES)
        self.assertEqual(counts.groups(), (str(total), "0", str(len(samples)), str(len(NOT_FAILURES))), summary)
        rows = self.run_fail2ban([fail2ban_regex, "--out", "row", str(log), str(FILTER)])
        found = [ast.literal_eval(row.strip().rstrip(","))[:2] for row in rows.splitlines() if row.strip()]
        self.assertEqual([(ip, int(when)) for ip, when in found], [(b, int(_time(line))) for line, b in samples])

    def test_jailExample(self) -> None:
        """The jail example passes fail2ban-client --test, with either log source."""
        client = require_binary("fail2ban-client", "fail2ban")
        system_config = require_file(["/etc/fail2ban/jail.conf"], "fail2ban").parent
        text = JAIL.read_text()
        log = Path(self.mktemp())
        log.write_text("")
        journal_lines = ("backend      = systemd", "journalmatch = _SYSTEMD_UNIT=mailgw.service")
        file_lines = ("#backend = auto", "#logpath = /var/log/mailgw/mailgw.log")
        for line in (*journal_lines, *file_lines):
            self.assertIn(f"\n{line}\n", text)
        file_variant = text
        for line in journal_lines:
            file_variant = file_variant.replace(f"\n{line}\n", f"\n#{line}\n")
        file_variant = file_variant.replace(f"\n{file_lines[0]}\n", f"\n{file_lines[0][1:]}\n")
        file_variant = file_variant.replace(f"\n{file_lines[1]}\n", f"\nlogpath = {log}\n")
        for jail, backend in ((text, "systemd"), (file_variant, "auto")):
            folder = Path(self.mktemp())
            shutil.copytree(system_config, folder, ignore=shutil.ignore_patterns("*.local", "jail.d"))
            (folder / "jail.d").mkdir()
            (folder / "jail.d" / "mailgw.conf").write_text(jail)
            shutil.copy(FILTER, folder / "filter.d" / "mailgw.conf")
            output = self.run_fail2ban([client, "--conf", str(folder), "--test"])
            self.assertIn("OK: configuration test is successful", output)
            dump = self.run_fail2ban([client, "--conf", str(folder), "-d"])
            self.assertIn(f"['add', 'mailgw', '{backend}']", dump)
            self.assertIn("'port', '995,993,988,465'", dump)

    def run_fail2ban(self, command: list[str]) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 0, f"{command}: {result.stdout}{result.stderr}")
        return result.stdout


def _time(line: str) -> float:
    """The time of a sample line (both formats start with it)."""
    stamp = re.search(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[+-]\d{2}:?\d{2})", line)
    assert stamp is not None
    return datetime.fromisoformat(stamp.group(0)).timestamp()
