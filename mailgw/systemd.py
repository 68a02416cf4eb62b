"""systemd integration [8.4]: readiness, reload and stop notifications (sd_notify).

The protocol is one datagram per message on the AF_UNIX socket named by
C{NOTIFY_SOCKET} (a path, or C{@name} in the abstract namespace), so no library is
needed.  Outside systemd (no C{NOTIFY_SOCKET}) every call does nothing and returns
C{False}; a notification never raises and never blocks the reactor.

The daemon's life as systemd sees it (C{Type=notify}, or C{Type=notify-reload} on
systemd 253 and later)::

    READY=1                              listeners bound, the gateway serves
    RELOADING=1 + MONOTONIC_USEC=...     SIGHUP / mailgwctl reload received
    READY=1                              reload done (applied or refused: the old
                                         configuration still runs either way)
    STOPPING=1                           graceful stop begins
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def notify_address(environ: Mapping[str, str] = os.environ) -> str | bytes | None:
    """The address of systemd's notification socket, or C{None} when there is none
    (or it is of a kind this module does not speak, such as C{vsock:})."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # Abstract namespace: a leading NUL instead of the "@".
        return b"\0" + address[1:].encode("utf-8", "surrogateescape")
    if address.startswith("/"):
        return address
    return None


def sd_notify(message: str, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Send C{message} (newline-separated C{KEY=VALUE} assignments) to systemd.

    @return: whether the datagram was sent; C{False} when not run by systemd or when
        sending failed (a notification is best effort: it never raises).
    """
    address = notify_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as e:
        log.warn("sd_notify to {address!r} failed: {error}", address=environ.get("NOTIFY_SOCKET"), error=str(e))
        return False
    return True


def _one_line(text: str) -> str:
    """A value that cannot smuggle another assignment in (no newline, no NUL)."""
    return " ".join(text.replace("\0", " ").splitlines())


class SystemdNotifier(Service):
    """Tells systemd where the daemon is in its life.

    As a child service: add it B{last} to the root service, so that its
    C{startService} (which sends C{READY=1}) runs once every listener is bound, and its
    C{stopService} (which sends C{STOPPING=1}) runs first when the daemon stops
    (a C{MultiService} stops its children in reverse order).  Reloads call
    L{reloading} before and L{ready} after.

    @ivar sent: the last messages this notifier sent (or tried to), oldest first.
    """

    name = "systemd"

    def __init__(
        self,
        *,
        environ: Mapping[str, str] = os.environ,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
        notify_on_start: bool = True,
    ) -> None:
        self._environ = environ
        self._monotonic_usec = monotonic_usec
        self._notify_on_start = notify_on_start
        self.sent: deque[str] = deque(maxlen=32)
        self._stopping = False

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (C{NOTIFY_SOCKET} is set to something usable)."""
        return notify_address(self._environ) is not None

    def notify(self, *assignments: str) -> bool:
        """Send C{assignments} (C{KEY=VALUE} strings) in one datagram."""
        message = "\n".join(assignments)
        self.sent.append(message)
        return sd_notify(message, environ=self._environ)

    def ready(self, status: str | None = None) -> bool:
        """The daemon serves: at start once the listeners are bound, and after each
        reload (applied or not)."""
        assignments = ["READY=1"]
        if status is not None:
            assignments.append(f"STATUS={_one_line(status)}")
        return self.notify(*assignments)

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts; L{ready} must follow when it is over.  C{MONOTONIC_USEC}
        (CLOCK_MONOTONIC) is what C{Type=notify-reload} requires with it."""
        assignments = ["RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}"]
        if status is not None:
            assignments.append(f"STATUS={_one_line(status)}")
        return self.notify(*assignments)

    def stopping(self, status: str | None = None) -> bool:
        """The graceful stop begins (sent once: later calls do nothing)."""
        if self._stopping:
            return False
        self._stopping = True
        assignments = ["STOPPING=1"]
        if status is not None:
            assignments.append(f"STATUS={_one_line(status)}")
        return self.notify(*assignments)

    def status(self, text: str) -> bool:
        """A one-line status for C{systemctl status}."""
        return self.notify(f"STATUS={_one_line(text)}")

    def startService(self) -> None:
        super().startService()
        if self._notify_on_start:
            self.ready("serving")

    def stopService(self) -> None:
        if self.running and self._notify_on_start:
            self.stopping("stopping: finishing sessions")
        super().stopService()
