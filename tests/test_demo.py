"""``make run`` as a new user meets it: in a fresh copy of this checkout, the banner's
commands work for POP3S, IMAPS and SMTPS (the message reaches the demo's sink), and a
second ``make run`` in the same checkout refuses at once while the first one goes on
serving.

The copy holds the checkout's files as they are now (tracked and new ones, not the
ignored ones); ``make`` runs with this test's venv and without its install steps
(``-o demo-deps -o venv``): the test is about what ``run`` does, not about apt or pip.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.servers.base import require_binary, require_file
from tests.servers.demo import READY_LINE
from tests.servers.dovecot import LIBEXEC_DIRECTORIES

ROOT = Path(__file__).resolve().parent.parent


def copy_checkout(target: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, into C{target}."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listing.decode().split("\0")):
        source, destination = ROOT / name, target / name
        if not os.path.lexists(source):
            continue  # deleted in the working tree
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            destination.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, destination)


class Output:
    """Collects a process's output in a thread; C{wait_for} blocks until a text shows."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.text = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.stream:
            with self.changed:
                self.text += line.decode(errors="replace")
                self.changed.notify_all()

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self.changed:
            while needle not in self.text:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{needle!r} not shown within {timeout:g} s:\n{self.text[-4000:]}")
                self.changed.wait(remaining)
            return self.text


class MakeRunTests(SynchronousTestCase):
    """make run in a temporary copy of the checkout."""

    def setUp(self) -> None:
        require_binary("make", "make")
        require_binary("curl", "curl")
        require_binary("dovecot", "dovecot-core")
        for service, package in (("pop3", "dovecot-pop3d"), ("imap", "dovecot-imapd"),
                                 ("submission", "dovecot-submissiond")):  # fmt: skip
            require_file([Path(d) / service for d in LIBEXEC_DIRECTORIES], package)
        if not (ROOT / ".git").exists() or shutil.which("git") is None:
            raise SkipTest("make run is tested from a git checkout (with git installed)")
        # Short and reachable by Dovecot's unprivileged processes.
        self.clone = Path(tempfile.mkdtemp(prefix="mgw-demo-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.clone, ignore_errors=True)
        os.chmod(self.clone, 0o755)  # noqa: S103 - Dovecot's processes reach their files below it
        copy_checkout(self.clone)
        self.make = ["make", "--no-print-directory", "-o", "demo-deps", "-o", "venv", "run", f"VENV={sys.prefix}"]

    def start(self) -> subprocess.Popen[bytes]:
        """make run, in its own process group (stopped, with all it started, at the
        end of the test)."""
        process = subprocess.Popen(
            self.make, cwd=self.clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )

        def stop() -> None:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # the demo stops twistd and Dovecot
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()

        self.addCleanup(stop)
        return process

    def sh(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.clone, capture_output=True, text=True, timeout=40, check=False)

    def test_makeRun(self) -> None:
        """The banner comes once the gateway listens; its curl commands fetch a
        message over POP3S and IMAPS and submit one over SMTPS that reaches the
        sink; its mailgwctl command works; a second make run fails at once saying
        why, and the first still serves."""
        first = self.start()
        output = Output(first)
        banner = output.wait_for(READY_LINE, timeout=60)
        commands = [shlex.split(line) for line in banner.splitlines() if line.startswith("    ")]
        curls = {argv[argv.index("-u") + 2].split(":", 1)[0]: argv for argv in commands if argv[0] == "curl"}
        self.assertEqual(sorted(curls), ["imaps", "pop3s", "smtps"], banner)
        options = ["--silent", "--show-error", "--max-time", "30"]

        def curl(scheme: str) -> subprocess.CompletedProcess[str]:
            return self.sh(["curl", *options, *curls[scheme][1:]])

        for scheme in ("pop3s", "imaps"):
            result = curl(scheme)
            self.assertEqual(result.returncode, 0, f"{scheme}: {result.stderr}\n{output.text[-3000:]}")
            self.assertIn("Subject: Plain test message", result.stdout)
        result = curl("smtps")
        self.assertEqual(result.returncode, 0, f"smtps: {result.stderr}\n{output.text[-3000:]}")
        output.wait_for("-> ", timeout=20)  # the sink announces the message
        outbox = sorted((self.clone / "run" / "outbox").glob("*.eml"))
        self.assertEqual(len(outbox), 1, output.text[-2000:])
        self.assertIn(b"Subject: Hello through mailgw", outbox[0].read_bytes())
        [ctl] = [argv for argv in commands if argv[0].endswith("mailgwctl")]
        status = self.sh(ctl)
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertIn("Listeners: 6", status.stdout)

        started = time.monotonic()
        second = self.start()
        try:
            shown, _ = second.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("a second make run did not refuse: it runs")
        self.assertNotEqual(second.returncode, 0)
        self.assertIn("another demo is already running in", shown.decode())
        self.assertLess(time.monotonic() - started, 15)
        self.assertIsNone(first.poll())
        result = curl("pop3s")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Subject: Plain test message", result.stdout)
