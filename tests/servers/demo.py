"""``make run``: the gateway on the sample configuration, in front of a local Dovecot.

Starts a private Dovecot (user ``demo``, password ``demo-password``, three messages)
whose submission service relays to a capturing sink (each message it gets lands in
``run/outbox/``), writes ``run/mailgw.toml`` — the sample ``etc/mailgw.toml`` with only
the ports, the folders, the admin socket and the mail servers changed so that it runs
unprivileged next to the demo Dovecot — and runs ``twistd -n mailgw`` on it until
Ctrl-C.  The banner, with a ready command for each protocol, comes once every port
listens.

One demo per folder: a second ``make run`` in the same checkout refuses at once and
leaves the first alone (a lock in ``run/``).  Everything else in ``run/`` is reset by
each run: mailbox, gateway state, certificate, outbox.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import IO, Any

from twisted.trial.unittest import SkipTest

from tests.servers import tomlwriter
from tests.servers.base import MissingBinaryError, free_port, port_accepts, port_listening
from tests.servers.dovecot import Dovecot, standard_messages
from tests.servers.smtpsink import SinkMessage, SmtpSink

ROOT = Path(__file__).resolve().parent.parent.parent
DEMO_USER, DEMO_PASSWORD = "demo", "demo-password"
#: the gateway's ports when they are free (else any free port)
PORTS = {
    "pop3s": 9995,
    "pop3s_starttls": 9110,
    "imap4s": 9993,
    "imap4s_starttls": 9143,
    "smtps": 9465,
    "smtps_starttls": 9587,
}
LOCK_NAME = ".demo.lock"
#: the line that ends the banner (the demo test waits for it)
READY_LINE = "Ctrl-C stops the gateway and Dovecot."
HELLO = (
    "From: Demo User <demo@example.com>\r\n"
    "To: A Friend <friend@example.net>\r\n"
    "Subject: Hello through mailgw\r\n"
    "\r\n"
    "This message went through the gateway's SMTPS proxy and Dovecot's submission service.\r\n"
)


class DemoRefused(Exception):
    """The demo cannot run; the message says why and what to do."""


class OutboxSink(SmtpSink):
    """The SMTP sink Dovecot's submission service relays to: every message is also
    written to C{outbox/NNNN.eml} and announced on stdout."""

    def __init__(self, outbox: Path) -> None:
        super().__init__()
        self.outbox = outbox
        outbox.mkdir(parents=True, exist_ok=True)

    def add(self, message: SinkMessage) -> None:
        super().add(message)
        path = self.outbox / f"{len(self.messages):04d}.eml"
        path.write_bytes(message.data)
        print(f"demo: a message from {message.mail_from} to {', '.join(message.rcpt_to)} -> {path}", flush=True)


def lock(run_dir: Path) -> IO[str]:
    """Hold this folder's demo lock for the life of the process (released by the
    kernel when it ends, however it ends); L{DemoRefused} if another demo holds it."""
    handle = open(run_dir / LOCK_NAME, "a+")  # held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise DemoRefused(
            f"another demo is already running in {run_dir} (pid {owner}); it keeps running, untouched.\n"
            "Stop it with Ctrl-C in its terminal, or run a second one in its own folder:\n"
            f"    make run DEMO_ARGS='--run-dir /tmp/mailgw-demo-2'"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def reset(run_dir: Path) -> None:
    """Remove what an earlier demo left in C{run_dir} (not the lock)."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def choose_ports() -> dict[str, int]:
    """The standard demo ports, or free ones for those that are taken."""
    chosen: dict[str, int] = {}
    for name, port in PORTS.items():
        while port in chosen.values() or port_accepts("127.0.0.1", port, timeout=0.1) or not _bindable(port):
            port = free_port()
        chosen[name] = port
    return chosen


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def demo_config(
    sample: dict[str, Any], dovecot: Dovecot, sink: SmtpSink, ports: dict[str, int], run_dir: Path, socket: Path
) -> dict[str, Any]:
    """The sample configuration, adjusted to the demo's ports, folders and servers."""
    assert dovecot.submission_port is not None
    config = dict(sample)
    config["gateway"] = {**sample.get("gateway", {}), "state_dir": str(run_dir / "state")}
    config["admin"] = {**sample.get("admin", {}), "socket": str(socket)}
    config["poller"] = {**sample.get("poller", {}), "smtp_host": sink.host, "smtp_port": sink.port}
    upstream = {"pop3s": dovecot.pop3_port, "imap4s": dovecot.imap_port, "smtps": dovecot.submission_port}
    for proxy in ("pop3s", "imap4s", "smtps"):
        section = dict(sample.get(proxy, {}))
        section["port"] = ports[proxy]
        section["starttls_port"] = ports[proxy + "_starttls"]
        section["default_server"] = {
            **section.get("default_server", {}),
            "host": "127.0.0.1",
            "port": upstream[proxy],
            "tls": "starttls",
            "ca": str(dovecot.ca_path),
        }
        config[proxy] = section
    # Dovecot's submission service wants AUTH: log in to it with the mail user.
    config["smtps"]["authentication"] = ["aaa", "mailhost"]
    return config


def _shown(path: Path) -> str:
    """A path as the banner shows it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _command(*words: str | Path) -> str:
    return "    " + " ".join(shlex.quote(_shown(w) if isinstance(w, Path) else w) for w in words)


def banner(ports: dict[str, int], dovecot: Dovecot, run_dir: Path, socket: Path) -> str:
    cert = run_dir / "tls" / "gateway.pem"
    user = f"{DEMO_USER}:{DEMO_PASSWORD}"
    mailgwctl = Path(sys.executable).parent / "mailgwctl"
    submit: list[str | Path] = ["curl", "--cacert", cert, "-u", user, f"smtps://localhost:{ports['smtps']}"]
    submit += ["--mail-from", "demo@example.com", "--mail-rcpt", "friend@example.net"]
    submit += ["--upload-file", run_dir / "hello.eml"]
    return "\n".join(
        [
            "",
            f"mailgw demo: the gateway runs on the sample configuration ({_shown(run_dir / 'mailgw.toml')}),",
            f"in front of a private Dovecot (user {DEMO_USER!r}, password {DEMO_PASSWORD!r}, 3 messages).",
            f"{_shown(run_dir)}/ was reset: a fresh mailbox, state database, certificate and outbox.",
            "",
            "The gateway listens on 127.0.0.1:",
            f"    POP3S {ports['pop3s']}   (POP3 with STLS: {ports['pop3s_starttls']})",
            f"    IMAPS {ports['imap4s']}   (IMAP with STARTTLS: {ports['imap4s_starttls']})",
            f"    SMTPS {ports['smtps']}   (submission with STARTTLS: {ports['smtps_starttls']})",
            f"Dovecot: POP3 {dovecot.pop3_port}, IMAP {dovecot.imap_port}, submission {dovecot.submission_port}"
            f" (relaying to a sink: messages land in {_shown(run_dir / 'outbox')}/).",
            f"The gateway's log: {_shown(run_dir / 'mailgw.log')} (and below).",
            "",
            "Fetch message 1 over POP3S, then over IMAPS; submit a message over SMTPS:",
            "",
            _command("curl", "--cacert", cert, "-u", user, f"pop3s://localhost:{ports['pop3s']}/1"),
            _command("curl", "--cacert", cert, "-u", user, f"imaps://localhost:{ports['imap4s']}/INBOX;UID=1"),
            _command(*submit),
            "",
            "The gateway's listeners, sessions and AAA groups:",
            "",
            _command(mailgwctl, "--socket", socket, "status"),
            "",
            READY_LINE,
            "",
        ]
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Log:
    """Copies twistd's output to C{run/mailgw.log}, and to our stdout once shown."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        self.stream = stream
        self.file = open(path, "ab")  # closed when the stream ends
        self.show = threading.Event()
        self.thread = threading.Thread(target=self._copy, name="twistd-log", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        with self.file:
            for line in self.stream:
                self.file.write(line)
                self.file.flush()
                if self.show.is_set():
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()


def _wait_listening(process: subprocess.Popen[bytes], ports: dict[str, int], socket: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if socket.exists() and all(port_listening("127.0.0.1", port) for port in ports.values()):
            return True
        time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(run_dir: Path) -> int:
    """The demo in C{run_dir}, until Ctrl-C or SIGTERM; the exit status."""
    run_dir.mkdir(parents=True, exist_ok=True)
    held = lock(run_dir)
    try:
        reset(run_dir)
        os.chmod(run_dir, 0o755)  # noqa: S103 - Dovecot's unprivileged processes reach their files below it
        try:
            sink = OutboxSink(run_dir / "outbox")
            dovecot = Dovecot(run_dir / "dovecot", users={DEMO_USER: DEMO_PASSWORD}, submission=True)
        except (SkipTest, MissingBinaryError) as e:
            raise DemoRefused(f"the demo needs Dovecot: {e}") from None
        dovecot.smtp_sink = sink.start()
        for message in standard_messages()[:3]:
            dovecot.deliver(DEMO_USER, message)
        dovecot.start()
        try:
            return _serve(run_dir, dovecot, sink)
        finally:
            dovecot.stop()
    finally:
        held.close()


def _serve(run_dir: Path, dovecot: Dovecot, sink: SmtpSink) -> int:
    ports = choose_ports()
    socket = run_dir / "admin.sock"
    if len(os.fsencode(socket)) > 100:  # UNIX socket paths are short
        short = tempfile.mkdtemp(prefix="mailgw-demo-")
        socket = Path(short) / "admin.sock"
        atexit.register(shutil.rmtree, short, ignore_errors=True)
    with open(ROOT / "etc" / "mailgw.toml", "rb") as f:
        sample = tomllib.load(f)
    config_path = run_dir / "mailgw.toml"
    config_path.write_text(
        "# Generated by `make run` from etc/mailgw.toml: ports, folders and mail servers changed.\n"
        + tomlwriter.dumps(demo_config(sample, dovecot, sink, ports, run_dir, socket))
    )
    shutil.copy(ROOT / "etc" / "users.toml", run_dir / "users.toml")
    (run_dir / "hello.eml").write_text(HELLO, newline="")
    twistd = Path(sys.executable).parent / "twistd"
    # This checkout's code, whatever the venv has installed.
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "mailgw", "--config", str(config_path)],
        cwd=run_dir,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches the demo only, which stops twistd once
    )
    assert process.stdout is not None
    log = _Log(process.stdout, run_dir / "mailgw.log")
    try:
        if not _wait_listening(process, ports, socket, timeout=60):
            _stop(process)
            log.thread.join(timeout=5)
            sys.stderr.write("make run: the gateway did not start; its output:\n")
            sys.stderr.write((run_dir / "mailgw.log").read_text(errors="replace")[-4000:])
            return 1
        print(banner(ports, dovecot, run_dir, socket), flush=True)
        log.show.set()
        return process.wait()
    except KeyboardInterrupt:
        print("\ndemo: stopping the gateway and Dovecot", flush=True)
        return 0
    finally:
        _stop(process)
        log.thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=str(ROOT / "run"), help="folder for the demo's files (default: run/)")
    args = parser.parse_args(argv)
    try:
        return run(Path(args.run_dir).absolute())
    except DemoRefused as e:
        sys.stderr.write(f"make run: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
