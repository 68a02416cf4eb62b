"""A private clamd (ClamAV, Debian's ``clamav-daemon``) for integration tests.

::

    clamd = Clamd.started(self)
    client = ClamdClient.for_address(reactor, clamd.address, 5)      # its UNIX socket
    client = ClamdClient.for_address(reactor, clamd.tcp_address, 5)  # or TCP on loopback
    ...  # EICAR (built at run time) is found as EICAR_SIGNATURE

The instance runs ``clamd --foreground --config-file=<base_dir>/clamd.conf`` from a
generated configuration: a ``LocalSocket`` in a short private folder under the system's
temporary folder (a UNIX socket path has at most 107 bytes, trial's folders are deeper),
a ``TCPSocket`` on a free loopback port, its log in :attr:`Clamd.log_path`, and a
``DatabaseDirectory`` holding only the signature file the fixture writes — an ``.ndb``
signature for the EICAR test string, so that no freshclam and no network is needed and
clamd starts in well under a second.  clamd decodes mail (MIME, base64) itself, so EICAR
is also found inside an attachment.  Nothing of the system's ClamAV (its service, its
``/etc/clamav``, ``/var/lib/clamav``) is used or touched.

It is ready when it answers ``zPING`` with ``PONG`` on its socket; it is stopped by PID
(SIGTERM) at cleanup.  Without the binary the tests are skipped naming the package, or
fail with ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import ClassVar

from mailgw.config import ClamdAddress
from tests.servers.base import LOOPBACK, ServerProcess, free_port, require_binary

__all__ = ["EICAR", "EICAR_SIGNATURE", "Clamd"]

#: The EICAR anti-virus test string (68 octets), put together here so that this file
#: itself is no test virus to a scanner on the developer's machine.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS" + b"-TEST-FILE!$H+H*"
#: The signature name clamd reports for it (its own suffix for a non-official database).
EICAR_SIGNATURE = "Mailgw.Test.EICAR.UNOFFICIAL"
_SIGNATURE_NAME = "Mailgw.Test.EICAR"


class Clamd(ServerProcess):
    """A private clamd instance.

    Constructor: ``Clamd(base_dir=None, *, host="127.0.0.1", stream_max_length="25M",
    startup_timeout=30.0, stop_timeout=5.0)``; ``stream_max_length`` is clamd's
    ``StreamMaxLength`` (beyond it, ``INSTREAM`` answers ``... ERROR``).

    Attributes: ``host``, ``port`` (TCP), ``socket_path``, ``address`` and
    ``tcp_address`` (as :class:`~mailgw.config.ClamdAddress`, for the client),
    ``config_path``, ``database_dir``, ``log_path``, ``base_dir``, ``pid``.
    """

    name: ClassVar[str] = "clamd"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = LOOPBACK,
        stream_max_length: str = "25M",
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.port = 0
        super().__init__(base_dir, host=host, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.stream_max_length = stream_max_length
        self.config_path = self.base_dir / "clamd.conf"
        self.database_dir = self.base_dir / "db"
        self._socket_dir = Path(tempfile.mkdtemp(prefix="mailgw-clamd-"))
        self.socket_path = self._socket_dir / "clamd.sock"

    # -- ServerProcess hooks -------------------------------------------------------------

    def check_requirements(self) -> None:
        self.clamd_binary = require_binary("clamd", "clamav-daemon")

    def allocate_ports(self) -> None:
        self.port = free_port(self.host)

    def listening_ports(self) -> dict[str, int]:
        return {"tcp": self.port}

    @property
    def log_path(self) -> Path:
        return self.base_dir / "clamd.log"

    def prepare(self) -> None:
        self._socket_dir.mkdir(mode=0o700, exist_ok=True)  # after a stop, for a restart
        self.database_dir.mkdir(exist_ok=True)
        (self.database_dir / "mailgw-test.ndb").write_text(f"{_SIGNATURE_NAME}:0:*:{EICAR.hex()}\n")
        self.config_path.write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"LocalSocket {self.socket_path}",
                    f"TCPSocket {self.port}",
                    f"TCPAddr {self.host}",
                    f"DatabaseDirectory {self.database_dir}",
                    f"TemporaryDirectory {self.base_dir}",
                    f"LogFile {self.log_path}",
                    "LogTime yes",
                    f"StreamMaxLength {self.stream_max_length}",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return [self.clamd_binary, "--foreground", f"--config-file={self.config_path}"]

    def is_ready(self) -> bool:
        return self.ping()

    def after_stop(self) -> None:
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- clients -------------------------------------------------------------------------

    @property
    def address(self) -> ClamdAddress:
        """Its UNIX socket, as the configuration gives it."""
        return ClamdAddress("unix", path=self.socket_path)

    @property
    def tcp_address(self) -> ClamdAddress:
        """Its TCP listener, as the configuration gives it."""
        return ClamdAddress("tcp", host=self.host, port=self.port)

    def _request(self, request: bytes, timeout: float = 5.0) -> bytes:
        """Send one request on the UNIX socket and read the NUL-terminated answer (blocking:
        fixture use only)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(self.socket_path))
            connection.sendall(request)
            answer = b""
            while not answer.endswith(b"\0"):
                data = connection.recv(4096)
                if not data:
                    break
                answer += data
        return answer.rstrip(b"\0")

    def ping(self) -> bool:
        """Whether it answers ``zPING`` with ``PONG`` right now."""
        try:
            return self._request(b"zPING\0", timeout=1.0) == b"PONG"
        except OSError:
            return False

    def instream(self, data: bytes) -> str:
        """Its answer to ``zINSTREAM`` of ``data`` in one chunk, e.g. ``stream: OK``
        (blocking, independent of the gateway's client: to check the fixture itself)."""
        return self._request(b"zINSTREAM\0" + struct.pack("!L", len(data)) + data + b"\0\0\0\0").decode()
