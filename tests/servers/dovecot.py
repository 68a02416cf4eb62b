"""A private Dovecot 2.3 (POP3, IMAP, optionally submission) for integration tests.

::

    dovecot = Dovecot.started(self, users={"alice": "alice-password"})
    expected = dovecot.seed_standard("alice")     # what RETR 1.. / FETCH n BODY[] return
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=dovecot.ssl_context())

The instance runs ``dovecot -F -c <base_dir>/dovecot.conf`` from generated configuration:
users in a passwd-file with ``{PLAIN}`` passwords, a maildir per user under
``<base_dir>/home/<user>/Maildir``, the log in :attr:`Dovecot.log_path` (with
``auth_verbose``, so failed logins show), its runtime sockets in a short folder under
``/tmp`` (UNIX socket paths are limited to 107 bytes), and listeners on free
``127.0.0.1`` ports: POP3 (STLS offered), POP3S, IMAP (STARTTLS offered), IMAPS and,
with ``submission=True``, submission (STARTTLS) and submissions, which require AUTH and
relay to a capturing :class:`~tests.servers.smtpsink.SmtpSink`.  Plaintext logins are
allowed on the plain ports (``disable_plaintext_auth = no``).  Failed logins are
answered fast: ``auth_failure_delay`` is 0 unless asked for (Dovecot still sends the
failure on its next 0.5 s tick) and anvil's growing auth penalty per client IP is off.

Byte-identity: Dovecot stores a message file as it is given and sends it with every
bare LF turned into CRLF, by POP3 ``RETR`` as by IMAP ``FETCH BODY[]`` (POP3 also adds a
final CRLF when the message does not end with one, which IMAP does not, and POP3
``LIST`` then reports the size without it).  So a message that uses CRLF throughout and
ends with CRLF comes out byte-identical through both; :func:`wire_form` gives what
clients receive for any message; :meth:`Dovecot.deliver` stores the bytes as given.

Running as root (CI), Dovecot's own ``dovecot``/``dovenull`` users are used for the
internal and login processes and the mail files belong to ``dovecot``; as another user
everything runs as that user (no chroot).
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from tests.servers.base import (
    LOOPBACK,
    ServerProcess,
    ServerStartError,
    free_ports,
    is_root,
    require_binary,
    require_file,
    wait_for,
)
from tests.servers.pki import TestPKI
from tests.servers.smtpsink import SmtpSink

__all__ = [
    "BIG_MESSAGE_SIZE",
    "DEFAULT_USERS",
    "Dovecot",
    "big_message",
    "standard_messages",
    "wire_form",
]

#: Users of an instance created without ``users``.
DEFAULT_USERS: Mapping[str, str] = {"alice": "alice-password", "bob": "bob-password"}

#: Size in bytes of the big standard message: 10 MiB, exactly, as clients receive it.
BIG_MESSAGE_SIZE = 10 * 1024 * 1024

#: Where Debian (and upstream ``/usr/libexec`` builds) keep Dovecot's service binaries.
LIBEXEC_DIRECTORIES = ("/usr/lib/dovecot", "/usr/libexec/dovecot", "/usr/local/libexec/dovecot")

_USER_RE = re.compile(r"^[a-z0-9._%+@-]+$")


# -- messages ----------------------------------------------------------------------------


def wire_form(message: bytes) -> bytes:
    """What a POP3 ``RETR``/IMAP ``FETCH BODY[]`` client receives for a stored message.

    Every bare LF becomes CRLF.  (POP3 also adds a final CRLF to a message that does not
    end with a line break; IMAP does not, so such messages are not byte-identical
    between the two and the standard messages all end with CRLF.)
    """
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def _headers(subject: str, message_id: str, extra: str = "") -> str:
    return (
        "Return-Path: <sender@example.net>\r\n"
        "From: Test Sender <sender@example.net>\r\n"
        "To: Mailbox Owner <owner@example.com>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
        f"Message-ID: <{message_id}@mailgw.test>\r\n"
        "MIME-Version: 1.0\r\n"
        f"{extra}"
    )


def big_message(size: int = BIG_MESSAGE_SIZE) -> bytes:
    """A deterministic message of exactly ``size`` bytes with CRLF line endings.

    The body is made of 76-character lines (78 bytes with CRLF), each starting with
    its line number; every 1000th line starts with a dot (dot-stuffing on the wire).
    The last body line may be shorter, so that the total is exact.
    """
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    padding = ""
    while True:
        head = _headers(
            "10 MiB test message",
            "big-10mib",
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "Content-Transfer-Encoding: 7bit\r\n"
            f"X-Padding: x{padding}\r\n\r\n",
        ).encode("ascii")
        remaining = size - len(head)
        if remaining < 0:
            raise ValueError(f"size {size} is smaller than the headers")
        if remaining % 78 != 1:  # a 1-byte last line cannot end with CRLF
            break
        padding += "x"
    full_lines, tail = divmod(remaining, 78)
    lines = []
    for number in range(full_lines):
        prefix = f".{number:07d} " if number % 1000 == 999 else f"{number:08d} "
        offset = number % len(alphabet)
        text = (alphabet[offset:] + alphabet * 2)[: 76 - len(prefix)]
        lines.append(prefix + text + "\r\n")
    if tail:
        lines.append(("z" * (tail - 2)) + "\r\n")
    message = head + "".join(lines).encode("ascii")
    assert len(message) == size
    return message


@functools.cache
def _standard_messages() -> tuple[bytes, ...]:
    plain = (
        _headers(
            "Plain test message",
            "plain-1",
            "X-Folded-Header: a header value that is long enough to be folded\r\n"
            "\tonto a continuation line\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n",
        )
        + "\r\n"
        + "Hello,\r\n\r\nthis is the first standard test message.\r\n\r\n-- \r\nThe tests\r\n"
    ).encode("ascii")
    dots = (
        _headers("Dots and edge lines", "dots-2", "Content-Type: text/plain\r\n")
        + "\r\n"
        + ".\r\n"
        + "..\r\n"
        + ".leading dot\r\n"
        + "From the start of a line\r\n"
        + "trailing spaces   \r\n"
        + "\r\n"
        + "\ttab-indented\r\n"
        + ". \r\n"
        + "last line\r\n"
    ).encode("ascii")
    mime = (
        _headers(
            "=?utf-8?q?Gr=C3=BC=C3=9Fe?= with an attachment",
            "mime-3",
            'Content-Type: multipart/mixed; boundary="=_mailgw_boundary"\r\n',
        ).encode("ascii")
        + b"\r\nThis is a multi-part message in MIME format.\r\n"
        + b"\r\n--=_mailgw_boundary\r\n"
        + b"Content-Type: text/plain; charset=utf-8\r\n"
        + b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße aus Köln, 日本語のテキスト, ünïcödé.\r\n".encode()
        + b"\r\n--=_mailgw_boundary\r\n"
        + b"Content-Type: application/octet-stream; name=data.bin\r\n"
        + b"Content-Transfer-Encoding: base64\r\n"
        + b'Content-Disposition: attachment; filename="data.bin"\r\n\r\n'
        + b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4\r\n"
        + b"OTo7PD0+P0BBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5fYGFiY2RlZmdoaWprbG1ub3Bx\r\n"
        + b"cnN0dXZ3eHl6e3x9fn8=\r\n"
        + b"\r\n--=_mailgw_boundary--\r\n"
    )
    return (plain, dots, mime, big_message())


def standard_messages() -> list[bytes]:
    """The standard fixture set as clients receive it (CRLF), in mailbox order.

    Three small messages (plain with a folded header; dot and edge lines; MIME
    multipart with an 8-bit UTF-8 part and a base64 attachment) and the
    :data:`BIG_MESSAGE_SIZE` message of :func:`big_message`, last.  They are stored
    exactly like this, so the stored bytes, ``RETR`` and ``FETCH BODY[]`` are identical.
    """
    return list(_standard_messages())


# -- the server --------------------------------------------------------------------------


class Dovecot(ServerProcess):
    """A private Dovecot instance.

    Constructor: ``Dovecot(base_dir=None, users=DEFAULT_USERS, *, host="127.0.0.1",
    submission=False, pki=None, auth_failure_delay=0 (seconds), extra_config="",
    startup_timeout=15.0, stop_timeout=2.0, login_trusted_networks="")``.  ``pki`` is a
    :class:`TestPKI` whose CA signs the server certificate (default: a new one in
    ``<base_dir>/pki``); ``extra_config`` is appended to ``dovecot.conf`` (later
    settings win); ``login_trusted_networks`` (e.g. ``"127.0.0.0/8"``) are the
    networks whose proxies Dovecot believes about the real client (IMAP ``ID``
    ``x-originating-ip``, POP3 and submission ``XCLIENT``): its login lines then show
    that client as ``rip=``.

    Attributes: ``host``, ``pop3_port``, ``pop3s_port``, ``imap_port``,
    ``imaps_port``, ``submission_port``/``submissions_port`` and ``smtp_sink`` (with
    ``submission=True``, else ``None``), ``users`` (name -> password), ``pki``,
    ``ca_path``, ``cert_path``, ``key_path``, ``config_path``, ``log_path``,
    ``base_dir``, ``pid``.
    """

    name: ClassVar[str] = "dovecot"
    # Dovecot's master, told alone to stop, waits seconds for its anvil and log
    # processes; stopping the whole group at once takes milliseconds.
    terminate_whole_group: ClassVar[bool] = True
    # Its master polls for dead children with sleep(1): once they are all gone it has
    # nothing left to do.
    leader_linger_kill_after: ClassVar[float | None] = 0.05

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        users: Mapping[str, str] | None = None,
        *,
        host: str = LOOPBACK,
        submission: bool = False,
        pki: TestPKI | None = None,
        auth_failure_delay: int = 0,
        extra_config: str = "",
        startup_timeout: float = 15.0,
        stop_timeout: float = 2.0,
        login_trusted_networks: str = "",
    ) -> None:
        self.submission = submission
        self.login_trusted_networks = login_trusted_networks
        self.pop3_port = self.pop3s_port = self.imap_port = self.imaps_port = 0
        self.submission_port: int | None = None
        self.submissions_port: int | None = None
        super().__init__(base_dir, host=host, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.users: dict[str, str] = {}
        for user, password in (DEFAULT_USERS if users is None else users).items():
            self._check_user(user, password)
            self.users[user] = password
        self.auth_failure_delay = auth_failure_delay
        self.extra_config = extra_config
        self.config_path = self.base_dir / "dovecot.conf"
        self.passwd_path = self.base_dir / "passwd"
        self.state_dir = self.base_dir / "state"
        self.home_root = self.base_dir / "home"
        self.smtp_sink: SmtpSink | None = None
        self._run_dir: Path | None = None
        self._log_offset = 0
        self._delivery_clock = (0, 0)
        self._delivery_count = 0
        self._set_accounts()
        self.pki = pki if pki is not None else TestPKI(self.base_dir / "pki")
        names = list(dict.fromkeys(["localhost", host]))
        self.cert_path, self.key_path = self.pki.server_cert(names, file_name=f"dovecot-{self.pop3_port}")
        self.ca_path = self.pki.ca_path
        self._prepare_files()

    # -- ServerProcess hooks -------------------------------------------------------------

    def check_requirements(self) -> None:
        self.dovecot_binary = require_binary("dovecot", "dovecot-core")
        packages = {"pop3": "dovecot-pop3d", "imap": "dovecot-imapd"}
        if self.submission:
            packages["submission"] = "dovecot-submissiond"
        for service, package in packages.items():
            require_file([Path(d) / service for d in LIBEXEC_DIRECTORIES], package)

    def allocate_ports(self) -> None:
        count = 6 if self.submission else 4
        ports = free_ports(count, self.host)
        self.pop3_port, self.pop3s_port, self.imap_port, self.imaps_port = ports[:4]
        if self.submission:
            self.submission_port, self.submissions_port = ports[4:]

    def listening_ports(self) -> dict[str, int]:
        ports = {
            "pop3": self.pop3_port,
            "pop3s": self.pop3s_port,
            "imap": self.imap_port,
            "imaps": self.imaps_port,
        }
        if self.submission_port is not None and self.submissions_port is not None:
            ports["submission"] = self.submission_port
            ports["submissions"] = self.submissions_port
        return ports

    @property
    def log_path(self) -> Path:
        return self.base_dir / "dovecot.log"

    def prepare(self) -> None:
        if self.submission and self.smtp_sink is None:
            self.smtp_sink = SmtpSink(self.host).start()
        if self._run_dir is None:
            # Short: UNIX socket paths (base_dir/login/...) must stay under 108 bytes.
            self._run_dir = Path(tempfile.mkdtemp(prefix="mailgw-dc-"))
            os.chmod(self._run_dir, 0o755)  # noqa: S103 - Dovecot's unprivileged processes use it
        self._prepare_files()
        self.config_path.write_text(self._config())
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def command(self) -> list[str]:
        return [self.dovecot_binary, "-F", "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return b" starting up " in log.read()
        except FileNotFoundError:
            return False

    def after_stop(self) -> None:
        if self.smtp_sink is not None:
            self.smtp_sink.stop()
            self.smtp_sink = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    # -- accounts and files --------------------------------------------------------------

    def _set_accounts(self) -> None:
        """Choose the accounts the processes run as (root: Dovecot's own users)."""
        if is_root():
            try:
                internal = pwd.getpwnam("dovecot")
                login = pwd.getpwnam("dovenull")
            except KeyError as error:
                raise ServerStartError(
                    f"running as root, Dovecot needs its system users ({error}): "
                    "apt-get install dovecot-core creates dovecot and dovenull"
                ) from None
            self.internal_user = internal.pw_name
            self.internal_group = grp.getgrgid(internal.pw_gid).gr_name
            self.login_user = login.pw_name
            self.mail_uid, self.mail_gid = internal.pw_uid, internal.pw_gid
        else:
            me = pwd.getpwuid(os.getuid())
            self.internal_user = self.login_user = me.pw_name
            self.internal_group = grp.getgrgid(os.getgid()).gr_name
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()

    def _check_user(self, user: str, password: str) -> None:
        if not _USER_RE.match(user):
            raise ValueError(
                f"user name {user!r}: use lower case letters, digits and ._%+@- "
                "(Dovecot lower-cases login names with the default auth_username_format)"
            )
        if any(character in password for character in ":\r\n\0"):
            raise ValueError("passwords for the passwd-file may not contain ':', CR, LF, NUL")

    def _chown(self, path: Path) -> None:
        if is_root():
            os.chown(path, self.mail_uid, self.mail_gid)

    def _check_traversable(self) -> None:
        """As root, the mail processes (``dovecot``) must reach ``base_dir``."""
        if not is_root():
            return
        os.chmod(self.base_dir, 0o755)  # noqa: S103 - the mail processes must reach it
        for folder in self.base_dir.parents:
            if not folder.stat().st_mode & 0o001:
                raise ServerStartError(
                    f"{folder} is not searchable by others (mode "
                    f"{folder.stat().st_mode & 0o777:o}): Dovecot's mail processes, "
                    f"running as {self.internal_user}, could not reach {self.base_dir}"
                )

    def _prepare_files(self) -> None:
        self._check_traversable()
        self.state_dir.mkdir(exist_ok=True)
        self.home_root.mkdir(exist_ok=True)
        for user in self.users:
            self._make_maildir(user)
        self._write_passwd()

    def _make_maildir(self, user: str) -> None:
        home = self.home_root / user
        for folder in (home, home / "Maildir", *(home / "Maildir" / s for s in ("cur", "new", "tmp"))):
            if not folder.exists():
                folder.mkdir(mode=0o700)
                self._chown(folder)

    def _write_passwd(self) -> None:
        lines = [
            f"{user}:{{PLAIN}}{password}::::{self.home_root / user}::\n"
            for user, password in sorted(self.users.items())
        ]
        temporary = self.passwd_path.with_suffix(".tmp")
        temporary.write_text("".join(lines))
        previous = self.passwd_path.stat().st_mtime if self.passwd_path.exists() else 0.0
        # Dovecot reloads a passwd-file when its mtime (seconds) or size changes.
        stamp = max(time.time(), int(previous) + 1.0)
        os.utime(temporary, (stamp, stamp))
        os.replace(temporary, self.passwd_path)

    def set_user(self, user: str, password: str) -> None:
        """Add a user or change a password, before or while the server runs.

        Dovecot stats its passwd-file at most once per (wall-clock) second, so while it
        runs this returns only once the second of the change is over (up to 1 s):
        from then on every login sees the new password.
        """
        self._check_user(user, password)
        self.users[user] = password
        self._make_maildir(user)
        written = time.time()
        self._write_passwd()
        if self.running:
            wait_for(max(0.0, int(written) + 1.001 - time.time()))

    def maildir(self, user: str) -> Path:
        """The maildir of ``user`` (with ``cur``, ``new`` and ``tmp``)."""
        if user not in self.users:
            raise KeyError(f"no such test user: {user!r}")
        return self.home_root / user / "Maildir"

    def deliver(self, user: str, message: bytes) -> Path:
        """Put ``message`` (stored as given) into the maildir ``new/`` of ``user``.

        Written into ``tmp/`` then renamed, so a running Dovecot never sees a partial
        file; works before and while the server runs.  File names carry strictly
        increasing timestamps, so messages appear in delivery order.  Returns the path.
        """
        maildir = self.maildir(user)
        now = time.time_ns() // 1000
        seconds, micros = divmod(now, 1_000_000)
        if (seconds, micros) <= self._delivery_clock:
            seconds, micros = self._delivery_clock
            micros += 1
            if micros == 1_000_000:
                seconds, micros = seconds + 1, 0
        self._delivery_clock = (seconds, micros)
        self._delivery_count += 1
        name = f"{seconds}.M{micros}P{os.getpid()}Q{self._delivery_count}.{socket.gethostname()}"
        temporary = maildir / "tmp" / name
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(message)
        self._chown(temporary)
        target = maildir / "new" / name
        os.rename(temporary, target)
        return target

    def seed_standard(self, user: str) -> list[bytes]:
        """Deliver :func:`standard_messages` to ``user``; returns them (wire form).

        If the mailbox already held messages, these come after them.
        """
        messages = standard_messages()
        for message in messages:
            self.deliver(user, message)
        return messages

    # -- client helpers ------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this instance's test CA."""
        return ssl.create_default_context(cafile=self.ca_path)

    # -- configuration -------------------------------------------------------------------

    def _config(self) -> str:
        assert self._run_dir is not None
        protocols = "pop3 imap submission" if self.submission else "pop3 imap"
        lines = [
            "# Generated by tests/servers/dovecot.py for one test instance.",
            f"base_dir = {self._run_dir}",
            f"state_dir = {self.state_dir}",
            f"instance_name = mailgw-test-{self.pop3_port}",
            f"protocols = {protocols}",
            f"listen = {self.host}",
            "hostname = localhost",
            'login_greeting = "Dovecot ready."',
            f"log_path = {self.log_path}",
            "auth_verbose = yes",
            "auth_mechanisms = plain login",
            "disable_plaintext_auth = no",
            f"auth_failure_delay = {self.auth_failure_delay} secs",
            "auth_cache_size = 0",
            *([f"login_trusted_networks = {self.login_trusted_networks}"] if self.login_trusted_networks else []),
            "ssl = yes",
            f"ssl_cert = <{self.cert_path}",
            f"ssl_key = <{self.key_path}",
            "ssl_min_protocol = TLSv1.2",
            f"default_internal_user = {self.internal_user}",
            f"default_internal_group = {self.internal_group}",
            f"default_login_user = {self.login_user}",
            f"mail_uid = {self.mail_uid}",
            f"mail_gid = {self.mail_gid}",
            f"first_valid_uid = {self.mail_uid}",
            f"first_valid_gid = {self.mail_gid}",
            "mail_location = maildir:~/Maildir",
            "mail_fsync = never",
            "pop3_uidl_format = %08Xu%08Xv",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN {self.passwd_path}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = {self.passwd_path}",
            "}",
            "protocol pop3 {",
            "  mail_max_userip_connections = 1000",
            "}",
            "protocol imap {",
            "  mail_max_userip_connections = 1000",
            "}",
            "# No auth penalty (growing delays after failures from one IP): tests fail on",
            "# purpose, often, from 127.0.0.1.",
            "service anvil {",
            "  unix_listener anvil-auth-penalty {",
            "    mode = 0",
            "  }",
            "}",
            "service pop3-login {",
            f"  inet_listener pop3 {{\n    port = {self.pop3_port}\n  }}",
            f"  inet_listener pop3s {{\n    port = {self.pop3s_port}\n    ssl = yes\n  }}",
            "}",
            "service imap-login {",
            f"  inet_listener imap {{\n    port = {self.imap_port}\n  }}",
            f"  inet_listener imaps {{\n    port = {self.imaps_port}\n    ssl = yes\n  }}",
            "}",
        ]
        if self.submission:
            assert self.smtp_sink is not None
            lines += [
                f"submission_relay_host = {self.smtp_sink.host}",
                f"submission_relay_port = {self.smtp_sink.port}",
                "submission_relay_trusted = no",
                "submission_relay_ssl = no",
                "service submission-login {",
                f"  inet_listener submission {{\n    port = {self.submission_port}\n  }}",
                f"  inet_listener submissions {{\n    port = {self.submissions_port}\n    ssl = yes\n  }}",
                "}",
            ]
        if not is_root():
            # Without root there is no chroot and no user switching.
            for service in ("anvil", "imap-login", "pop3-login", "submission-login"):
                lines += [f"service {service} {{", "  chroot =", "}"]
        if self.extra_config:
            lines += ["# extra_config", self.extra_config]
        return "\n".join(lines) + "\n"


def main() -> None:
    """``python -m tests.servers.dovecot [--submission]``: run one seeded instance."""
    import argparse
    import json
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--submission", action="store_true")
    parser.add_argument("--base-dir", default=None)
    parser.add_argument("--no-seed", action="store_true")
    arguments = parser.parse_args()
    with Dovecot(arguments.base_dir, submission=arguments.submission) as dovecot:
        if not arguments.no_seed:
            for user in dovecot.users:
                dovecot.seed_standard(user)
        info = {
            "host": dovecot.host,
            "pid": dovecot.pid,
            "ports": dovecot.listening_ports(),
            "users": dovecot.users,
            "ca_path": dovecot.ca_path,
            "log_path": str(dovecot.log_path),
            "base_dir": str(dovecot.base_dir),
        }
        print(json.dumps(info, indent=2), flush=True)
        signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        signal.sigwait(signals)


if __name__ == "__main__":
    main()
