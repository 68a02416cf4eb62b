"""A small framework for running real servers (Dovecot, slapd, FreeRADIUS, ...) in tests.

Every server runs as a private instance: configuration generated into a temporary folder,
listeners on free loopback high ports, the process started in the foreground in a new
session (so that it and all its children form one process group) with stdout/stderr in a
log file of that folder, and stopped by PID.  Nothing here touches the system services.

A server is a subclass of :class:`ServerProcess` that implements four hooks::

    class Slapd(ServerProcess):
        name = "slapd"

        def check_requirements(self) -> None:
            self.slapd = require_binary("slapd", "slapd")

        def allocate_ports(self) -> None:        # called again on a port clash
            self.ldap_port, self.ldaps_port = free_ports(2)

        def listening_ports(self) -> dict[str, int]:
            return {"ldap": self.ldap_port, "ldaps": self.ldaps_port}

        def prepare(self) -> None:               # write config, create folders
            ...

        def command(self) -> list[str]:
            return [self.slapd, "-d", "0", "-f", str(self.config_path), ...]

Blocking use (scripts, ``setUp``)::

    server = Slapd(directory).start()
    ...
    server.stop()

From a trial test case (starts it in a fresh ``self.mktemp()`` folder and registers
``stop`` as a cleanup)::

    server = Slapd.started(self)

Readiness is polled with short waits; that is fixture set-up, not test logic.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Self

from twisted.trial.unittest import SkipTest, SynchronousTestCase

__all__ = [
    "LOOPBACK",
    "MissingBinaryError",
    "ServerProcess",
    "ServerStartError",
    "free_port",
    "free_ports",
    "group_members",
    "is_root",
    "port_accepts",
    "port_listening",
    "require_binary",
    "require_file",
    "test_directory",
    "wait_for",
]

LOOPBACK = "127.0.0.1"

#: Folders searched for server binaries besides ``$PATH`` (daemons live in sbin).
SBIN_DIRECTORIES: Sequence[str] = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class MissingBinaryError(RuntimeError):
    """A server needed by a test is not installed and ``CI=true``: the test must fail."""


class ServerStartError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def is_root() -> bool:
    return os.geteuid() == 0


# -- ports -------------------------------------------------------------------------------


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now.

    All sockets are held open until every port has been read, so the ports are
    distinct; another process may still take one before the server binds it, which
    :meth:`ServerProcess.start` detects and retries with new ports.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    """A port that is free on ``host`` right now (bind to port 0, read it, close)."""
    return free_ports(1, host)[0]


def port_accepts(host: str, port: int, timeout: float = 0.25) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds (it is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _proc_net_listening(host: str, port: int) -> bool | None:
    """Whether a TCP socket listens on ``host:port`` per ``/proc/net/tcp*``.

    ``None`` when that cannot be told (no ``/proc``, or not an IPv4/IPv6 literal).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 4:
        table = Path("/proc/net/tcp")
        # Little-endian hex of the address as the kernel prints it.
        wanted = {address.packed[::-1].hex().upper(), "00000000"}
    else:
        table = Path("/proc/net/tcp6")
        packed = address.packed
        wanted = {
            b"".join(packed[i : i + 4][::-1] for i in range(0, 16, 4)).hex().upper(),
            "0" * 32,
        }
    try:
        rows = table.read_text().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        local, state = fields[1], fields[3]
        local_address, _, local_port = local.partition(":")
        if state == "0A" and int(local_port, 16) == port and local_address in wanted:
            return True
    return False


def port_listening(host: str, port: int) -> bool:
    """Whether a TCP listener is bound on ``host:port``.

    On Linux this reads ``/proc/net/tcp`` so that no probe connection reaches the
    server (a probe makes e.g. Dovecot fork a login process and log a disconnect);
    elsewhere it connects (:func:`port_accepts`).
    """
    listening = _proc_net_listening(host, port)
    return port_accepts(host, port) if listening is None else listening


def wait_for(seconds: float) -> None:
    """Block the calling thread for ``seconds`` (fixture polling only)."""
    threading.Event().wait(seconds)


# -- requirements ------------------------------------------------------------------------


def _missing(what: str, debian_package: str) -> Exception:
    message = f"{what} not found: apt-get install {debian_package}"
    if os.environ.get("CI", "").lower() == "true":
        return MissingBinaryError(
            f"{message} (CI=true: integration tests must run, so this is a failure, "
            "not a skip; install the package in the CI set-up script)"
        )
    return SkipTest(message)


def set_environ(testcase: SynchronousTestCase, name: str, value: str | None) -> None:
    """Set (or with ``None`` remove) an environment variable for one test."""
    old = os.environ.get(name)

    def restore() -> None:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

    testcase.addCleanup(restore)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def require_binary(name: str, debian_package: str) -> str:
    """The absolute path of executable ``name``, searched in ``$PATH`` and the sbin folders.

    When it is missing, raise :class:`~twisted.trial.unittest.SkipTest` (the test is
    skipped on a developer machine without the package) or, when the environment has
    ``CI=true``, :class:`MissingBinaryError`, which fails the test.
    """
    search = os.pathsep.join([*os.environ.get("PATH", os.defpath).split(os.pathsep), *SBIN_DIRECTORIES])
    found = shutil.which(name, path=search)
    if found is None:
        raise _missing(name, debian_package)
    return os.path.abspath(found)


def require_file(candidates: Iterable[str | os.PathLike[str]], debian_package: str) -> Path:
    """The first existing path of ``candidates`` (e.g. a plugin or helper binary).

    Missing: skip, or fail under ``CI=true``, exactly like :func:`require_binary`.
    """
    paths = [Path(candidate) for candidate in candidates]
    for path in paths:
        if path.exists():
            return path
    raise _missing(" or ".join(str(path) for path in paths), debian_package)


# -- processes ---------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``.

    Zombies are left out: once their parent is gone only PID 1 can reap them, and in
    some containers it never does.  Without ``/proc``, any member counts.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


_RUNNING: set[ServerProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Safety net: stop servers a crashed test or script did not stop."""
    for server in list(_RUNNING):
        server.stop()


def test_directory(testcase: SynchronousTestCase) -> Path:
    """A new empty folder from ``testcase.mktemp()``, reachable by other users.

    trial's ``mktemp`` puts a private (0700) random folder in the path; it is opened
    to search by others (0711) so that servers dropping root privileges (Dovecot's mail
    processes, slapd -u openldap, ...) can reach their files below it.
    """
    mktemp: Callable[[], str] = testcase.mktemp  # trial leaves it unannotated
    path = Path(mktemp()).absolute()
    path.mkdir(parents=True)
    os.chmod(path.parent, 0o711)  # noqa: S103 - search only, for dropped-privilege servers
    return path


class ServerProcess:
    """Base class of a real server process run from generated configuration.

    Subclasses set :attr:`name` and implement :meth:`check_requirements`,
    :meth:`allocate_ports`, :meth:`listening_ports`, :meth:`prepare` and
    :meth:`command`; optional hooks are :meth:`environment`, :meth:`is_ready`,
    :meth:`after_start` and :meth:`after_stop`.

    Attributes:
        base_dir: the instance's folder (configuration, data, logs).
        host: the loopback address it listens on.
        output_path: the file receiving the process's stdout and stderr.
        log_path: the server's own log file (defaults to :attr:`output_path`).
        pid: the PID of the started process (``None`` before :meth:`start`).
    """

    #: Short name used for file names and messages.
    name: ClassVar[str] = "server"
    #: How many times :meth:`start` retries with new ports after a port clash.
    port_clash_retries: ClassVar[int] = 3
    #: Text in the output that means a listener could not bind its port.
    port_clash_markers: ClassVar[Sequence[str]] = ("Address already in use",)
    #: Whether :meth:`stop` sends SIGTERM to the whole process group at once rather than
    #: to the server process only (which then stops its children itself; whatever is
    #: left of the group afterwards is terminated, then killed).
    terminate_whole_group: ClassVar[bool] = False
    #: When stopping, SIGKILL the server process once it has been the only process of
    #: its group for this many seconds (``None``: never; for servers that sleep while
    #: waiting for children that are already gone).
    leader_linger_kill_after: ClassVar[float | None] = None

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = LOOPBACK,
        startup_timeout: float = 15.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._owns_base_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix=f"mailgw-{self.name}-")
        self.base_dir = Path(base_dir).absolute()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.output_path = self.base_dir / f"{self.name}.out"
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self.check_requirements()
        self.allocate_ports()

    # -- hooks ---------------------------------------------------------------------------

    def check_requirements(self) -> None:
        """Find binaries (:func:`require_binary`); skips or fails the test if missing."""

    def allocate_ports(self) -> None:
        """Choose the listening ports (:func:`free_ports`); called again on a clash."""
        raise NotImplementedError

    def listening_ports(self) -> Mapping[str, int]:
        """The TCP ports (by name) that listen once the server is up."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write the configuration and create folders; runs before every start."""
        raise NotImplementedError

    def command(self) -> list[str]:
        """The argument vector that runs the server in the foreground."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The server's environment (``None``: inherit ours)."""
        return None

    def is_ready(self) -> bool:
        """Extra readiness check, once all :meth:`listening_ports` are listening."""
        return True

    def after_start(self) -> None:
        """Called once the server is ready."""

    def after_stop(self) -> None:
        """Called after the process group is gone (e.g. stop helper threads)."""

    @property
    def log_path(self) -> Path:
        return self.output_path

    # -- life cycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the server and block until it accepts connections; returns ``self``.

        Raises :class:`ServerStartError` (with the log tail) when it exits or is not
        ready within :attr:`startup_timeout` seconds.
        """
        if self._process is not None:
            raise RuntimeError(f"{self.name} already started (pid {self.pid})")
        for attempt in range(self.port_clash_retries + 1):
            if attempt:
                self.allocate_ports()
            try:
                self._start_once()
            except ServerStartError:
                clash = any(marker in self.log_tail(200) for marker in self.port_clash_markers)
                self._terminate()
                if clash and attempt < self.port_clash_retries:
                    continue
                raise
            return self
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.prepare()
        self._output = open(self.output_path, "ab")
        argv = self.command()
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.base_dir,
            env=self.environment(),
            start_new_session=True,
        )
        self.pid = self._process.pid
        _RUNNING.add(self)
        deadline = time.monotonic() + self.startup_timeout
        pending = dict(self.listening_ports())
        while True:
            status = self._process.poll()
            if status is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {status} during start-up "
                    f"({' '.join(argv)}); log {self.log_path}:\n{self.log_tail()}"
                )
            for label, port in list(pending.items()):
                if port_listening(self.host, port):
                    del pending[label]
            if not pending and self.is_ready():
                # A clash can let another process answer on "our" port while the
                # server is exiting: make sure it still runs.
                if self._process.poll() is None:
                    self.after_start()
                    return
                continue
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{label} {port}" for label, port in pending.items())
                raise ServerStartError(
                    f"{self.name} (pid {self.pid}) not ready after "
                    f"{self.startup_timeout:g} s (waiting for: {waiting or 'is_ready'}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            wait_for(0.01)

    def stop(self) -> None:
        """Stop the server and all its children: SIGTERM, wait, then SIGKILL.

        Idempotent; safe to call when the start failed half-way.  A base folder that
        the instance created itself (``base_dir=None``) is removed.
        """
        self._terminate()
        self.after_stop()
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _terminate(self) -> None:
        process = self._process
        if process is not None:
            pgid = process.pid  # start_new_session: the server leads its own group
            group_signalled = self.terminate_whole_group
            if process.poll() is None:
                if group_signalled:
                    _signal_group(pgid, signal.SIGTERM)
                else:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            alone_since: float | None = None
            while (members := group_members(pgid)) or process.poll() is None:
                if process.poll() is not None and not group_signalled:
                    # Children that outlive the server still form its group.
                    _signal_group(pgid, signal.SIGTERM)
                    group_signalled = True
                if self.leader_linger_kill_after is not None and members == [pgid]:
                    now = time.monotonic()
                    alone_since = alone_since or now
                    if now - alone_since >= self.leader_linger_kill_after:
                        process.kill()
                if time.monotonic() > deadline:
                    break
                wait_for(0.01)
            else:
                deadline = 0.0
            if deadline:
                _signal_group(pgid, signal.SIGKILL)
                process.wait()
                deadline = time.monotonic() + 5.0
                while (left := group_members(pgid)) and time.monotonic() < deadline:
                    wait_for(0.01)
                if left:
                    raise RuntimeError(f"{self.name}: processes {left} survived SIGKILL")
            self._process = None
        _RUNNING.discard(self)
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> Self:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @classmethod
    def started(cls, testcase: SynchronousTestCase, /, **kwargs: Any) -> Self:
        """Start an instance in a fresh ``testcase.mktemp()`` folder; stop it on cleanup.

        Keyword arguments go to the constructor (``base_dir`` defaults to the temp
        folder).
        """
        if "base_dir" not in kwargs:
            kwargs["base_dir"] = test_directory(testcase)
        server = cls(**kwargs)
        # Registered before start so that a half-started server is cleaned up too.
        testcase.addCleanup(server.stop)
        return server.start()

    # -- diagnostics ---------------------------------------------------------------------

    def log_text(self) -> str:
        """The whole server log so far (``""`` before it exists)."""
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> str:
        """Block until a log line contains ``needle``; returns that line.

        Servers write their logs asynchronously (Dovecot through its log process), so
        a test that checks the log after a client saw the result polls for the line.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not in the {self.name} log after {timeout:g} s:\n{self.log_tail()}")
            wait_for(0.02)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log (and of its output, if different)."""
        paths = [self.log_path]
        if self.output_path != self.log_path:
            paths.append(self.output_path)
        parts: list[str] = []
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            text = data.decode("utf-8", "replace").splitlines()[-lines:]
            if text:
                parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no log output)"

    def __repr__(self) -> str:
        ports = ", ".join(f"{k}={v}" for k, v in self.listening_ports().items())
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host} {ports} {state} in {self.base_dir}>"
