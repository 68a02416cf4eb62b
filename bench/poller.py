"""The poller scenario: a remote POP3S mailbox of small messages (in the bench's Dovecot)
moved to an SMTP sink, by mailgw's poller (:mod:`bench.poller_worker`, one poll) and by
fetchmail in multidrop mode (``is * here``, ``--smtphost``), the same mailbox refilled
before each, the same sink.  Both run pinned to the proxies' CPU, one after the other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import HOST, POLLER_PASSWORD, POLLER_USER, REPO, log, pinned
from tests.servers.poller_fixtures import DOMAIN, message
from tests.servers.smtpsink import SmtpSink

if TYPE_CHECKING:
    from bench.run import Bench


def fill(bench: Bench, count: int) -> None:
    dovecot = bench.stack.dovecot
    maildir = dovecot.maildir(POLLER_USER)
    for sub in ("new", "cur"):
        for path in (maildir / sub).iterdir():
            path.unlink()
    for index in range(count):
        dovecot.deliver(POLLER_USER, message([("To", f"user{index % 50}@{DOMAIN}")]))


def left(bench: Bench) -> int:
    maildir = bench.stack.dovecot.maildir(POLLER_USER)
    return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())


def run_mailgw(bench: Bench, base: Path, sink: SmtpSink, cpu: int | None, spy: Path | None) -> dict[str, Any]:
    folder = base / "poller-mailgw"
    folder.mkdir(exist_ok=True)
    secret = folder / "password"
    secret.write_text(POLLER_PASSWORD)
    secret.chmod(0o600)
    argv = [sys.executable, "-m", "bench.poller_worker", "--state", str(folder / "state")]
    argv += ["--smtp", f"{sink.host}:{sink.port}", "--port", str(bench.stack.dovecot.pop3s_port)]
    argv += ["--ca", bench.stack.cert, "--user", POLLER_USER, "--password-file", str(secret)]
    argv += ["--log", str(folder / "poller.log")]
    if spy is not None:
        from bench.profile import record_argv

        argv = record_argv(spy) + argv
    result = subprocess.run(pinned(argv, cpu), cwd=REPO, capture_output=True, text=True, timeout=900, check=False)  # noqa: S603
    if result.returncode != 0:
        raise RuntimeError(f"the mailgw poll failed ({result.returncode}): {result.stderr[-2000:]}")
    outcome = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    report = outcome["report"]
    if report.get("error"):
        log(f"mailgw poll error: {report['error']}")
    moved = int(report["delivered"])
    return {
        "messages": moved,
        "seconds": outcome["seconds"],
        "messages_per_second": moved / outcome["seconds"],
        "cpu_ms_per_message": outcome["cpu"] * 1000 / max(moved, 1),
        "system_cpu_ms_per_message": outcome["cpu_system"] * 1000 / max(moved, 1),
        "skipped": len(report.get("skipped", [])),
    }


def run_fetchmail(bench: Bench, base: Path, sink: SmtpSink, cpu: int | None, binary: str) -> dict[str, Any]:
    folder = base / "poller-fetchmail"
    folder.mkdir(exist_ok=True)
    rc = folder / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        "set no syslog\n"
        f"poll {HOST} with protocol POP3 port {bench.stack.dovecot.pop3s_port} uidl\n"
        f"    localdomains {DOMAIN} no envelope\n"
        f'    user "{POLLER_USER}" there with password "{POLLER_PASSWORD}" is * here\n'
        f"    options ssl sslcertck sslcertfile {bench.stack.cert} sslcommonname localhost fetchall\n"
    )
    rc.chmod(0o600)
    argv = [binary, "-f", str(rc), "-N", "--nosyslog", "-s", "--smtphost", f"{sink.host}/{sink.port}"]
    env = dict(os.environ, FETCHMAILHOME=str(folder), HOME=str(folder))
    started = time.monotonic()
    with open(folder / "fetchmail.out", "ab") as output:
        process = subprocess.Popen(pinned(argv, cpu), cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT)  # noqa: S603
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    # 0: mail delivered; 1: no mail
    if process.returncode not in (0, 1):
        log(f"fetchmail exited {process.returncode}: {(folder / 'fetchmail.out').read_text()[-1500:]}")
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime}


def run(bench: Bench, base: Path, cpu: int | None, profile: Path | None = None) -> None:
    """``profile``: also one poll under py-spy (not counted), its stacks in that folder."""
    count = bench.args.messages
    fetchmail = shutil.which("fetchmail")
    if fetchmail is None:
        log("fetchmail missing (apt-get install fetchmail): the poller runs without its reference")
    sink = SmtpSink(HOST).start()
    try:
        for run_index in range(bench.args.runs):
            log(f"poller run {run_index + 1}: mailgw, {count} messages")
            fill(bench, count)
            sink.messages.clear()
            result = run_mailgw(bench, base, sink, cpu, None)
            result["sink_received"] = len(sink.messages)
            result["left_on_server"] = left(bench)
            bench.add("poller", "mailgw", result)
            if fetchmail is None:
                continue
            log(f"poller run {run_index + 1}: fetchmail, {count} messages")
            fill(bench, count)
            sink.messages.clear()
            outcome = run_fetchmail(bench, base, sink, cpu, fetchmail)
            moved = len(sink.messages)
            bench.add(
                "poller",
                "nginx",  # the reference column: fetchmail
                {
                    "tool": "fetchmail",
                    "messages": moved,
                    "seconds": outcome["seconds"],
                    "messages_per_second": moved / outcome["seconds"],
                    "cpu_ms_per_message": outcome["cpu"] * 1000 / max(moved, 1),
                    "left_on_server": left(bench),
                },
            )
        if profile is not None:
            from bench.profile import summarize

            profile.mkdir(parents=True, exist_ok=True)
            stacks = profile / "mailgw-poller.txt"
            log(f"profile: py-spy on mailgw's poller, {count} messages -> {stacks}")
            fill(bench, count)
            sink.messages.clear()
            outcome = run_mailgw(bench, base, sink, cpu, stacks)
            header = f"mailgw poller: {outcome['cpu_ms_per_message']:.3f} ms CPU/message while sampled"
            (profile / "mailgw-poller.summary.txt").write_text(header + "\n" + summarize(stacks) + "\n")
    finally:
        sink.stop()
