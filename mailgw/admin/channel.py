"""The admin channel's transport: AMP over a UNIX socket (SPEC [8.1]).

The daemon's end is :func:`admin_service`, a service listening on ``admin.socket``
with mode 0660.  Before listening it refuses an unsafe place (:class:`UnsafeSocketPath`):
a parent folder anyone may write to without the sticky bit, or that another
(non-root) user owns; a path that exists and is not a socket, or is a socket another
user owns, or one a running daemon still answers on.  A stale socket (nothing answers)
is removed; a missing parent folder is created 0750; a path longer than a UNIX
socket's (107 bytes) is an :class:`AdminSocketError`.  The socket is bound under a
restrictive umask and then opened to the group, so it is never reachable by others,
not even for an instant; Twisted removes it when the service stops.

``mailgwctl``'s end is :class:`AdminClient`: a small blocking AMP client (one command,
one answer) that needs no reactor.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import amp

from mailgw.admin.commands import CheckNowProgress
from mailgw.admin.responder import IAdminBackend, admin_protocol
from mailgw.config import AdminConfig

__all__ = [
    "MAX_SOCKET_PATH",
    "SOCKET_MODE",
    "AdminChannelService",
    "AdminClient",
    "AdminProtocolError",
    "AdminSocketError",
    "AdminUnavailable",
    "UnsafeSocketPath",
    "admin_service",
    "check_socket_path",
    "socket_answers",
    "socket_path_problem",
]

#: the admin socket's mode: owner and group may connect
SOCKET_MODE = 0o660
#: the mode of the socket's folder when the daemon creates it
FOLDER_MODE = 0o750
#: the umask the socket is bound under (it is opened to SOCKET_MODE right after)
_BIND_UMASK = 0o177


#: the longest UNIX socket path Linux accepts, in bytes
MAX_SOCKET_PATH = 107


class AdminSocketError(Exception):
    """The admin socket cannot be set up; the message says why."""


class UnsafeSocketPath(AdminSocketError):
    """The admin socket's path is not safe to listen on; the message says why."""


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_folder(folder: Path, socket_path: Path) -> None:
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocketPath(f"admin socket {socket_path}: {folder} is not a folder")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise UnsafeSocketPath(
            f"admin socket {socket_path}: the folder {folder} is writable by everyone (without the sticky bit)"
        )
    if not _trusted_owner(info.st_uid):
        raise UnsafeSocketPath(
            f"admin socket {socket_path}: the folder {folder} belongs to another user (uid {info.st_uid})"
        )


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the UNIX socket C{path}."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise UnsafeSocketPath(f"admin socket {path}: cannot check the existing socket: {e.strerror}") from None
    finally:
        probe.close()
    return True


def check_socket_path(path: Path) -> None:
    """
    Make C{path} ready to listen on, or raise L{UnsafeSocketPath}: check its folder
    (creating it 0750 when missing, below a safe ancestor) and remove a stale socket.
    A path longer than a UNIX socket's is L{AdminSocketError}.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise AdminSocketError(f"admin socket {path}: the path is too long ({size} bytes, at most {MAX_SOCKET_PATH})")
    folder = path.parent
    if not folder.exists():
        ancestor = folder
        while not ancestor.exists():
            ancestor = ancestor.parent
        _check_folder(ancestor, path)
        os.makedirs(folder, mode=FOLDER_MODE, exist_ok=True)
        os.chmod(folder, FOLDER_MODE)  # makedirs' mode is filtered by the umask
    _check_folder(folder, path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafeSocketPath(f"admin socket {path}: the path exists and is not a socket")
    if not _trusted_owner(info.st_uid):
        raise UnsafeSocketPath(f"admin socket {path}: an existing socket belongs to another user (uid {info.st_uid})")
    if _answers(path):
        raise UnsafeSocketPath(f"admin socket {path}: another process answers on it (is mailgw already running?)")
    path.unlink()


def socket_path_problem(path: Path, *, running_is_problem: bool = True) -> str | None:
    """
    What L{check_socket_path} would refuse about C{path}, found without changing
    anything (no folder created, no stale socket removed), or C{None}.  For
    C{mailgwctl check-config} and the daemon's checks before it starts.

    @param running_is_problem: whether a daemon answering on the socket is a problem
        (for a daemon about to start) or not (for checking a configuration while it
        runs).
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        return f"admin socket {path}: the path is too long ({size} bytes, at most {MAX_SOCKET_PATH})"
    ancestor = path.parent
    try:
        while not ancestor.exists():
            ancestor = ancestor.parent
        _check_folder(ancestor, path)
        info = path.lstat()
    except FileNotFoundError:
        return None
    except UnsafeSocketPath as e:
        return str(e)
    except OSError as e:
        return f"admin socket {path}: cannot check {ancestor}: {e.strerror or e}"
    if not stat.S_ISSOCK(info.st_mode):
        return f"admin socket {path}: the path exists and is not a socket"
    if not _trusted_owner(info.st_uid):
        return f"admin socket {path}: an existing socket belongs to another user (uid {info.st_uid})"
    try:
        answers = _answers(path)
    except UnsafeSocketPath as e:
        return str(e)
    if answers and running_is_problem:
        return f"admin socket {path}: another process answers on it (is mailgw already running?)"
    return None


def socket_answers(path: Path) -> bool:
    """Whether a process (a running daemon) accepts connections on the socket C{path}."""
    try:
        return stat.S_ISSOCK(path.lstat().st_mode) and _answers(path)
    except (OSError, UnsafeSocketPath):
        return False


class AdminChannelService(StreamServerEndpointService):
    """Listens on the admin socket, after L{check_socket_path}."""

    log = Logger()

    def __init__(self, path: Path, factory: Factory, reactor: Any) -> None:
        super().__init__(UNIXServerEndpoint(reactor, str(path), mode=SOCKET_MODE, wantPID=False), factory)
        self.path = path
        self.setName("admin")
        # A socket that cannot be bound stops the daemon's start.
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        check_socket_path(self.path)
        # Bound 0600 whatever the process umask, then opened to the group by the
        # endpoint's chmod: never reachable by anyone else in between.
        previous = os.umask(_BIND_UMASK)
        try:
            super().privilegedStartService()
        finally:
            os.umask(previous)
        self.log.info("Admin channel listening on {path}", path=str(self.path))

    def stopService(self) -> defer.Deferred[None]:
        if self._waitingForPort is None:  # refused to start: nothing to stop
            self.running = False
            return defer.succeed(None)
        d: defer.Deferred[None] = super().stopService()
        return d


class _AdminFactory(Factory):
    def __init__(self, backend: IAdminBackend) -> None:
        self.backend = backend

    def buildProtocol(self, addr: Any) -> Protocol:
        return admin_protocol(self.backend)


def admin_service(config: AdminConfig, backend: IAdminBackend, reactor: Any) -> IService:
    """The admin channel of C{config}: AMP on the UNIX socket C{config.socket},
    answered by C{backend}."""
    return AdminChannelService(config.socket, _AdminFactory(backend), reactor)


# --- The client end ------------------------------------------------------------------


class AdminUnavailable(Exception):
    """The daemon cannot be reached over the admin socket; the message says why and
    names the socket."""


class AdminProtocolError(Exception):
    """The daemon answered something the client cannot use (connection lost
    mid-answer, an unexpected error)."""


class AdminClient:
    """A blocking AMP client of the admin socket: one connection per command."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = 300.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise AdminUnavailable(
                f"the admin socket {self.path} does not exist: is the mailgw daemon running?"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise AdminUnavailable(
                f"nothing answers on the admin socket {self.path}: is the mailgw daemon running?"
            ) from None
        except PermissionError:
            sock.close()
            raise AdminUnavailable(
                f"permission denied on the admin socket {self.path} (run as root or as a member of its group)"
            ) from None
        except OSError as e:
            sock.close()
            raise AdminUnavailable(f"cannot connect to the admin socket {self.path}: {e.strerror or e}") from None
        return sock

    def call(
        self, command: type[amp.Command], *, on_progress: Callable[[str], None] | None = None, **arguments: Any
    ) -> dict[str, Any]:
        """Send C{command} and return its answer's fields; raises the command's
        errors as the daemon reported them, L{AdminUnavailable} or
        L{AdminProtocolError}.  Progress lines the daemon sends meanwhile
        (L{CheckNowProgress}) go to C{on_progress}."""
        box = command.makeArguments(arguments, None)
        box[amp.COMMAND] = command.commandName
        box[amp.ASK] = b"1"
        with self._connect() as sock:
            try:
                sock.sendall(box.serialize())
                with sock.makefile("rb") as stream:
                    answer = _read_box(stream)
                    while answer.get(amp.COMMAND) == CheckNowProgress.commandName:
                        if on_progress is not None:
                            on_progress(answer.get(b"line", b"").decode("utf-8", "replace"))
                        answer = _read_box(stream)
            except TimeoutError:
                raise AdminProtocolError(f"no answer from the daemon within {self.timeout:g} s") from None
            except OSError as e:
                raise AdminProtocolError(f"connection to the daemon failed: {e.strerror or e}") from None
        if amp.ERROR in answer:
            code = answer.get(amp.ERROR_CODE, b"")
            description = answer.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
            known = {wire: error for error, wire in {**command.errors, **command.fatalErrors}.items()}
            error_class = known.get(code)
            if error_class is not None:
                raise error_class(description)
            if code == amp.UNKNOWN_ERROR_CODE:
                raise AdminProtocolError("the daemon could not complete the command (its log says why)")
            if code == amp.UNHANDLED_ERROR_CODE:
                raise AdminProtocolError("the daemon does not know this command (is it an older version?)")
            raise AdminProtocolError(f"the daemon answered with error {code.decode('ascii', 'replace')}: {description}")
        if amp.ANSWER not in answer:
            raise AdminProtocolError("the daemon sent something that is not an answer")
        result: dict[str, Any] = command.parseResponse(answer, None)
        return result


def _read_exactly(stream: Any, size: int) -> bytes:
    data: bytes = stream.read(size)
    if len(data) != size:
        raise AdminProtocolError("the daemon closed the connection before answering")
    return data


def _read_box(stream: Any) -> dict[bytes, bytes]:
    """One AMP box: 16-bit length-prefixed keys and values, ended by an empty key."""
    box: dict[bytes, bytes] = {}
    while True:
        key_length = int.from_bytes(_read_exactly(stream, 2), "big")
        if key_length == 0:
            return box
        key = _read_exactly(stream, key_length)
        value_length = int.from_bytes(_read_exactly(stream, 2), "big")
        box[key] = _read_exactly(stream, value_length)
