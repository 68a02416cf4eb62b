"""Start-up failures as one line naming the problem and the fix [8.4].

Two halves:

- L{host_problems} finds, without starting anything, what would stop a valid
  configuration from starting on this machine as this user: a state folder that
  cannot be created or written, input files that cannot be read, an unsafe admin
  socket folder, listening ports that are taken or privileged.  C{mailgwctl
  check-config} reports them with the file's problems; the daemon checks them before
  it builds anything.
- L{describe_start_error} words an exception met while building or starting the
  service tree (a port taken meanwhile, a socket that cannot be bound, a state folder
  that vanished) the same way, and L{StartupGuard} wraps the tree so that such a
  failure under twistd is one critical log line and exit status 1, never a
  traceback.

Every line has the form C{key.path: problem (fix)}.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger

from mailgw.admin.channel import AdminSocketError, socket_answers, socket_path_problem
from mailgw.config import Config, ConfigError, LdapGroup, LocalGroup, Pop3Group
from mailgw.memory import freeze_startup_objects

__all__ = [
    "START_ERRORS",
    "StartupFailed",
    "StartupGuard",
    "describe_start_error",
    "host_problems",
    "refuse_to_start",
]

#: CAP_NET_BIND_SERVICE's bit in /proc/self/status CapEff
_CAP_NET_BIND_SERVICE = 10
_UNIT_HINT = "AmbientCapabilities=CAP_NET_BIND_SERVICE, as etc/mailgw.service has it"


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def _may_bind_privileged() -> bool:
    """Whether this process may listen on ports below the unprivileged start."""
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError):
        pass
    return False


def _unprivileged_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _privileged_port_problem(key: str, address: str, port: int) -> str:
    return (
        f"{key}: {address}:{port} is a privileged port and {_user()} may not listen on it"
        f" (run the daemon with the CAP_NET_BIND_SERVICE capability ({_UNIT_HINT}), or choose a port of"
        f" {_unprivileged_start()} or above)"
    )


def _port_in_use_problem(key: str, address: str, port: int) -> str:
    return (
        f"{key}: {address}:{port} is already in use by another process"
        " (stop that process, or choose another port)"
    )


# --- What can be checked before starting -----------------------------------------------


def _writable_folder_problem(key: str, folder: Path, what: str) -> str | None:
    """Whether this user can create C{folder} (or write in it, when it exists), found
    by creating and removing a temporary entry: the only answer that also holds for
    root and for file systems such as /proc."""
    target = folder
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        return f"{key}: cannot create {folder}: {target} is not a folder (choose another {what})"
    try:
        probe = tempfile.mkdtemp(prefix=".mailgw-check-", dir=target)
        os.rmdir(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if target == folder:
            return (
                f"{key}: {folder} is not writable by {_user()} ({reason})"
                f" (give the daemon's user write access to it, or choose another {what})"
            )
        return (
            f"{key}: cannot create {folder}: {target} does not accept new folders for {_user()} ({reason})"
            f" (create {folder} for the daemon's user, or choose another {what})"
        )
    return None


def _input_files(config: Config) -> Iterator[tuple[str, Path | None]]:
    tls = config.tls
    if not tls.generate_self_signed or tls.certificate.exists() or tls.private_key.exists():
        yield "tls.certificate", tls.certificate
        yield "tls.private_key", tls.private_key
    yield "tls.client_ca", tls.client_ca
    for proxy in config.proxies():
        yield f"{proxy.protocol}.default_server.ca", proxy.default_server.ca
    for index, group in enumerate(config.aaa_server_groups):
        path = f"aaa_server_group[{index}]"
        if isinstance(group, LocalGroup):
            yield f"{path}.users_file", group.users_file
        elif isinstance(group, LdapGroup):
            yield f"{path}.ca", group.ca
        elif isinstance(group, Pop3Group):
            for number, server in enumerate(group.servers):
                yield f"{path}.servers[{number}].ca", server.ca
    if config.admin.manhole:
        yield "admin.manhole_authorized_keys", config.admin.manhole_authorized_keys


def listening_ports(config: Config) -> Iterator[tuple[str, str, int]]:
    """(key path, address, port) of every proxy listener C{config} opens."""
    for proxy in config.proxies():
        if not proxy.enabled:
            continue
        for interface in config.interfaces_for(proxy.protocol):
            for listener in proxy.listen_ports():
                key = "port" if listener.implicit_tls else "starttls_port"
                yield f"{proxy.protocol}.{key}", interface.address, listener.port


def _bind_problem(key: str, address: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listeners
        try:
            probe.bind((address, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return _port_in_use_problem(key, address, port)
            if e.errno == errno.EACCES:
                return _privileged_port_problem(key, address, port)
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{key}: {address} is not an address of this machine (fix the interface's address)"
            return f"{key}: cannot listen on {address}:{port}: {e.strerror or e}"
    return None


def host_problems(config: Config, *, daemon: bool = False, may_bind_privileged: bool | None = None) -> list[str]:
    """
    What stops C{config} from starting here, as this user, one line per problem.

    @param daemon: checking for a daemon about to start (a daemon already answering
        on the admin socket is then a problem).  Otherwise (C{check-config}) a running
        daemon is expected: its socket and its ports are not checked.
    @param may_bind_privileged: whether this process may listen on privileged ports
        (default: root, or the CAP_NET_BIND_SERVICE capability).
    """
    if may_bind_privileged is None:
        may_bind_privileged = _may_bind_privileged()
    problems: list[str] = []
    state_dir = config.gateway.state_dir
    if state_dir.exists() and not state_dir.is_dir():
        problems.append(f"gateway.state_dir: {state_dir} exists and is not a folder (choose another state_dir)")
    elif problem := _writable_folder_problem("gateway.state_dir", state_dir, "state_dir"):
        problems.append(problem)
    tls = config.tls
    if tls.generate_self_signed and not tls.certificate.exists() and not tls.private_key.exists():
        folders: dict[Path, str] = {}
        for key, pem in (("tls.certificate", tls.certificate), ("tls.private_key", tls.private_key)):
            folders.setdefault(pem.parent, key)
        for folder, key in folders.items():  # the pair is generated on first start
            if problem := _writable_folder_problem(key, folder, "path"):
                problems.append(problem)
    for key, file in _input_files(config):
        if file is not None and file.exists() and not os.access(file, os.R_OK):
            problems.append(f"{key}: {file} is not readable by {_user()} (let the daemon's user read it)")
    running = not daemon and socket_answers(config.admin.socket)
    if not running:
        socket_problem = socket_path_problem(config.admin.socket)
        if socket_problem:
            problems.append(f"admin.socket: {socket_problem} ({_socket_fix(socket_problem)})")
        elif problem := _writable_folder_problem("admin.socket", config.admin.socket.parent, "admin.socket"):
            problems.append(problem)
        unprivileged = _unprivileged_start()
        for key, address, port in listening_ports(config):
            if port < unprivileged and not may_bind_privileged:
                problems.append(_privileged_port_problem(key, address, port))
            elif problem := _bind_problem(key, address, port):
                problems.append(problem)
    return problems


# --- Failures while building or starting ------------------------------------------------


def _socket_fix(message: str) -> str:
    if "already running" in message:
        return "stop the other daemon first, or give this one another admin.socket"
    if "too long" in message:
        return "choose a shorter admin.socket path"
    return "put admin.socket in a folder only root and the daemon's user can write, such as /run/mailgw"


def _listener_key(config: Config, port: object) -> str:
    for key, _, number in listening_ports(config):
        if number == port:
            return key
    if str(port) == str(config.admin.socket):
        return "admin.socket"
    for key in ("metrics", "manhole"):
        endpoint = getattr(config.admin, key)
        if endpoint and f":{port}" in f"{endpoint}:":
            return f"admin.{key}"
    return "listener"


def _path_key(config: Config, filename: object) -> str:
    if filename is None:
        return "(start-up)"
    path = Path(os.fsdecode(filename))  # type: ignore[arg-type]
    if path == config.gateway.state_dir or config.gateway.state_dir in path.parents:
        return "gateway.state_dir"
    if path == config.admin.socket or path in config.admin.socket.parents:
        return "admin.socket"
    for key, pem in (("tls.certificate", config.tls.certificate), ("tls.private_key", config.tls.private_key)):
        if path == pem or path in pem.parents:
            return key
    for key, file in _input_files(config):
        if file is not None and path == file:
            return key
    return str(path)


def describe_start_error(error: BaseException, config: Config) -> str:
    """One line C{key.path: problem (fix)} for an exception of L{START_ERRORS}."""
    from mailgw.poller.accounts import KeyFileError
    from mailgw.tls import TLSConfigError

    if isinstance(error, CannotListenError):
        key = _listener_key(config, error.port)
        cause = error.socketError
        number = getattr(cause, "errno", None)
        address = error.interface or "*"
        if isinstance(error.port, int):
            if number == errno.EADDRINUSE:
                return _port_in_use_problem(key, address, error.port)
            if number == errno.EACCES:
                return _privileged_port_problem(key, address, error.port)
        reason = getattr(cause, "strerror", None) or str(cause)
        return f"{key}: cannot listen on {address}:{error.port}: {reason}"
    if isinstance(error, AdminSocketError):
        return f"admin.socket: {error} ({_socket_fix(str(error))})"
    if isinstance(error, ConfigError):
        return "; ".join(error.problems)
    if isinstance(error, KeyFileError):
        return f"gateway.state_dir: {error}"
    if isinstance(error, TLSConfigError):
        key = _path_key(config, getattr(error, "path", None))
        return f"{key}: {error}"
    if isinstance(error, OSError):
        key = _path_key(config, error.filename)
        where = f"{os.fsdecode(error.filename)}: " if error.filename is not None else ""
        fix = "give the daemon's user access to it, or change the setting"
        if key == "gateway.state_dir":
            fix = "choose a state_dir the daemon's user can create and write"
        return f"{key}: {where}{error.strerror or error} ({fix})"
    return f"{type(error).__name__}: {error}"


def _start_errors() -> tuple[type[BaseException], ...]:
    from mailgw.poller.accounts import KeyFileError
    from mailgw.tls import TLSConfigError

    return (CannotListenError, AdminSocketError, ConfigError, TLSConfigError, KeyFileError, OSError)


#: the exceptions a build or start of the service tree may fail with for reasons of
#: this machine or of the files a configuration names (not bugs)
START_ERRORS: tuple[type[BaseException], ...] = _start_errors()


def refuse_to_start(problems: list[str], stderr: Any = None) -> NoReturn:
    """Before twistd starts logging: one line per problem on stderr, exit status 1."""
    out = stderr if stderr is not None else sys.stderr
    for problem in problems:
        out.write(f"mailgw: cannot start: {problem}\n")
    out.flush()
    raise SystemExit(1)


class StartupFailed(Exception):
    """The daemon cannot start; C{str()} is the line that says why."""


def _quiet_startup_failures(previous: Callable[..., Any]) -> Callable[..., Any]:
    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(value, StartupFailed):  # already logged in one line
            previous(kind, value, tb)

    return hook


class StartupGuard(MultiService):
    """
    The root service under twistd: the gateway's tree as its only child.  A failure of
    L{START_ERRORS} while the tree starts is logged as one critical line and raised as
    L{StartupFailed}, which twistd reports (daemonizing: through its status pipe) and
    which leaves the process with status 1 and no traceback.
    """

    log = Logger()

    def __init__(self, gateway: Any, config: Config) -> None:
        super().__init__()
        self.gateway = gateway
        self.config = config
        gateway.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # What GatewayService does for itself: give twistd the configured log format.
        set_component = getattr(parent, "setComponent", None)
        observer = getattr(self.gateway, "log_observer", None)
        if set_component is not None and observer is not None:
            set_component(ILogObserver, observer)
        super().setServiceParent(parent)

    def _failed(self, error: BaseException) -> NoReturn:
        line = describe_start_error(error, self.config)
        self.log.critical("Cannot start: {reason}", reason=line)
        sys.excepthook = _quiet_startup_failures(sys.excepthook)
        raise StartupFailed(line) from None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except START_ERRORS as e:
            self._failed(e)

    def startService(self) -> None:
        try:
            super().startService()
        except START_ERRORS as e:
            self._failed(e)
        freeze_startup_objects()
