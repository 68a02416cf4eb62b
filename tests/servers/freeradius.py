"""A private FreeRADIUS 3 (authentication and accounting) for integration tests.

::

    radius = FreeRadius.started(self)                      # alice, bob, carol, dave
    reply = radclient(radius, "auth", {"User-Name": "alice", "User-Password": "alice-password"})
    self.assertEqual((reply.code, reply.text("Class")), ("Access-Accept", "OU=Finance;"))

The instance runs ``freeradius -s -d <base_dir>/raddb -l stdout`` (foreground, no
threads, no debug output) from a minimal generated raddb that never refers to
``/etc/freeradius``: FreeRADIUS's own dictionaries from ``/usr/share/freeradius``, one
client, ``127.0.0.1`` with :attr:`FreeRadius.secret` and
``require_message_authenticator = yes`` (an Access-Request without a
Message-Authenticator is dropped without an answer), an auth and an acct listener on
free UDP ports of ``127.0.0.1``, and one virtual server:

- ``authorize``: the ``files`` module with a generated users file (each user's
  ``Cleartext-Password`` and reply attributes, e.g. ``Class := "OU=Finance;"``), then
  ``pap``.  ``reject_delay`` is 0: rejects are answered at once.
- A user with a ``challenge`` code gets an Access-Challenge (with :data:`CHALLENGE_PROMPT`
  as Reply-Message and a ``State``) after a correct password; the next Access-Request
  carrying that ``State`` must have the code as ``User-Password``, and is then accepted
  with the user's reply attributes.
- ``accounting``: every Accounting-Request is written to the ``detail`` file
  :attr:`FreeRadius.detail_path` and answered with an Accounting-Response;
  :meth:`FreeRadius.accounting_records` parses that file.
- Status-Server is answered on both ports.

The log (``Login OK: [alice] ...``, ``Login incorrect ...``) is the process output,
:attr:`FreeRadius.log_path`; the server is ready when it logs "Ready to process
requests" (UDP has no listening state to poll).

:class:`SilentUdpPort` is a UDP port where nothing ever answers (a RADIUS server that is
down, or an accounting collector that never acknowledges), recording what it receives;
:func:`radclient` runs FreeRADIUS's ``radclient`` against an instance.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self

from twisted.trial.unittest import SynchronousTestCase

from tests.servers.base import LOOPBACK, ServerProcess, require_binary, require_file, wait_for

__all__ = [
    "CHALLENGE_PROMPT",
    "DEFAULT_RADIUS_USERS",
    "DICTIONARY_DIRECTORY",
    "FreeRadius",
    "RadclientReply",
    "RadiusUser",
    "RadiusValue",
    "SilentUdpPort",
    "decode_octets",
    "radclient",
    "silent_udp_port",
]

#: Reply-Message of the Access-Challenge sent to users with a ``challenge`` code.
CHALLENGE_PROMPT = "Enter your one-time code"

#: FreeRADIUS's dictionaries (freeradius-common) and loadable modules (freeradius).
DICTIONARY_DIRECTORY = "/usr/share/freeradius"
MODULE_DIRECTORIES = ("/usr/lib/freeradius", "/usr/lib64/freeradius", "/usr/local/lib/freeradius")

#: A value for :func:`radclient`: text, a number, or octets.
RadiusValue = str | int | bytes

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


@dataclass(frozen=True)
class RadiusUser:
    """A user of the generated users file.

    ``reply``: attributes of the Access-Accept, in order (a mapping, or pairs when an
    attribute repeats), e.g. ``{"Class": "OU=Finance;", "Session-Timeout": "3600"}``;
    values are given as text and parsed by FreeRADIUS per the attribute's type.
    ``challenge``: when set, a correct password is answered with an Access-Challenge and
    this code is the password of the follow-up request (which carries the ``State``).
    """

    password: str
    reply: Mapping[str, str] | Sequence[tuple[str, str]] = field(default=())
    challenge: str | None = None

    def reply_pairs(self) -> list[tuple[str, str]]:
        if isinstance(self.reply, Mapping):
            return list(self.reply.items())
        return list(self.reply)


#: Users of an instance created without ``users``: ``Class`` in both forms the gateway
#: accepts (``OU=Name;`` and a bare ``Name``), none, and a challenge-response user.
DEFAULT_RADIUS_USERS: Mapping[str, RadiusUser] = {
    "alice": RadiusUser("alice-password", {"Class": "OU=Finance;"}),
    "bob": RadiusUser("bob-password", {"Class": "Engineering"}),
    "carol": RadiusUser("carol-password"),
    "dave": RadiusUser("dave-password", {"Class": "OU=Finance;"}, challenge="123456"),
}


def _quote(value: str) -> str:
    """A single-quoted FreeRADIUS string: taken literally (no ``%{...}`` expansion)."""
    if any(character in value for character in "\r\n\0"):
        raise ValueError(f"CR, LF and NUL cannot be written to the users file: {value!r}")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "'": "'", "\\": "\\"}


def _unquote(value: str) -> str:
    """The text of a value as FreeRADIUS prints it (``"..."`` with C escapes, or bare)."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    body = value[1:-1]
    out = bytearray()
    index = 0
    while index < len(body):
        character = body[index]
        if character == "\\" and index + 1 < len(body):
            following = body[index + 1]
            octal = body[index + 1 : index + 4]
            if re.fullmatch(r"[0-7]{3}", octal):
                out.append(int(octal, 8))
                index += 4
                continue
            out += _ESCAPES.get(following, "\\" + following).encode()
            index += 2
            continue
        out += character.encode()
        index += 1
    return out.decode("utf-8", "replace")


def decode_octets(value: str) -> bytes:
    """The bytes of an octets value as FreeRADIUS prints it (``0x4f553d...``) or text."""
    if value.startswith("0x"):
        return bytes.fromhex(value[2:])
    return value.encode()


# -- the server --------------------------------------------------------------------------


class FreeRadius(ServerProcess):
    """A private FreeRADIUS instance.

    Constructor: ``FreeRadius(base_dir=None, *, secret="testing123", users=None
    (DEFAULT_RADIUS_USERS), host="127.0.0.1", require_message_authenticator=True,
    startup_timeout=15.0, stop_timeout=5.0)``.  ``users`` maps a name to a
    :class:`RadiusUser` or just a password.

    Attributes: ``host``, ``auth_port``, ``acct_port``, ``secret``, ``users`` (name ->
    :class:`RadiusUser`), ``raddb`` (the configuration folder; also what ``radclient -d``
    wants), ``users_path``, ``detail_path``, ``log_path``, ``challenge_state`` (the
    ``State`` bytes of Access-Challenges), ``base_dir``, ``pid``.
    """

    name: ClassVar[str] = "freeradius"
    port_clash_markers: ClassVar[Sequence[str]] = ("Address already in use", "Error binding to port")

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        secret: str = "testing123",  # noqa: S107 - a test fixture
        users: Mapping[str, RadiusUser | str] | None = None,
        host: str = LOOPBACK,
        require_message_authenticator: bool = True,
        startup_timeout: float = 15.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.auth_port = self.acct_port = 0
        super().__init__(base_dir, host=host, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        if not secret or any(character in secret for character in "\r\n\0"):
            raise ValueError("the shared secret must be non-empty, without CR, LF, NUL")
        self.secret = secret
        self.require_message_authenticator = require_message_authenticator
        self.users: dict[str, RadiusUser] = {}
        for user_name, user in (DEFAULT_RADIUS_USERS if users is None else users).items():
            self.users[user_name] = RadiusUser(user) if isinstance(user, str) else user
        self._users_file()  # refuse what cannot be written now, not at start
        self.challenge_state = b"mailgw-" + secrets.token_hex(4).encode()
        self.raddb = self.base_dir / "raddb"
        self.config_path = self.raddb / "radiusd.conf"
        self.users_path = self.raddb / "users"
        self.detail_path = self.base_dir / "radacct" / "detail"
        self._log_offset = 0

    # -- ServerProcess hooks -------------------------------------------------------------

    def check_requirements(self) -> None:
        self.freeradius_binary = require_binary("freeradius", "freeradius")
        require_file([Path(d) / "rlm_files.so" for d in MODULE_DIRECTORIES], "freeradius")
        self.dictionary = require_file([Path(DICTIONARY_DIRECTORY) / "dictionary"], "freeradius-common")
        self.module_directory = next(d for d in MODULE_DIRECTORIES if (Path(d) / "rlm_files.so").exists())

    def allocate_ports(self) -> None:
        self.auth_port, self.acct_port = _free_udp_ports(2, self.host)

    def listening_ports(self) -> dict[str, int]:
        # UDP: nothing to poll in /proc/net/tcp; readiness is the log line (is_ready).
        return {}

    def prepare(self) -> None:
        for folder in (self.raddb, self.detail_path.parent, self.base_dir / "run", self.base_dir / "log"):
            folder.mkdir(parents=True, exist_ok=True)
        (self.raddb / "dictionary").write_text(
            "# Generated by tests/servers/freeradius.py: FreeRADIUS's own dictionaries only.\n"
            f"$INCLUDE {self.dictionary}\n"
        )
        self.write_users()
        self.config_path.write_text(self._config())
        self._log_offset = self.output_path.stat().st_size if self.output_path.exists() else 0

    def command(self) -> list[str]:
        # -s: foreground, no threads (starts in ~20 ms instead of ~60 ms with a pool).
        return [self.freeradius_binary, "-s", "-d", str(self.raddb), "-l", "stdout"]

    def is_ready(self) -> bool:
        try:
            with open(self.output_path, "rb") as log:
                log.seek(self._log_offset)
                return b"Ready to process requests" in log.read()
        except FileNotFoundError:
            return False

    # -- users ---------------------------------------------------------------------------

    def set_user(self, name: str, user: RadiusUser | str) -> None:
        """Add or replace a user, before or while the server runs.

        FreeRADIUS reads its users file only at start (a HUP does not reload it), so a
        running instance is restarted: about 50 ms; the ports stay the same unless
        another process took one in between (then new ones are chosen, as at start).
        """
        previous = self.users.get(name)
        self.users[name] = RadiusUser(user) if isinstance(user, str) else user
        try:
            self._users_file()
        except ValueError:
            if previous is None:
                del self.users[name]
            else:
                self.users[name] = previous
            raise
        self.write_users()
        if self.running:
            self.restart()

    def restart(self) -> None:
        """Stop the server and start it again from the current configuration and users."""
        self._terminate()
        self.start()

    def write_users(self) -> None:
        """(Re)write the users file from :attr:`users` (FreeRADIUS reads it at start)."""
        self.users_path.write_text(self._users_file())

    def _users_file(self) -> str:
        lines = ["# Generated by tests/servers/freeradius.py.\n"]
        for user_name, user in self.users.items():
            check = [f"Cleartext-Password := {_quote(user.password)}"]
            if user.challenge is not None:
                check.append(f"Tmp-String-1 := {_quote(user.challenge)}")
            lines.append(f"{_quote(user_name)} {', '.join(check)}\n")
            replies = []
            for attribute, value in user.reply_pairs():
                if not _NAME_RE.match(attribute):
                    raise ValueError(f"bad RADIUS attribute name: {attribute!r}")
                replies.append(f"{attribute} += {_quote(value)}")
            if replies:
                lines.append("\t" + ",\n\t".join(replies) + "\n")
            lines.append("\n")
        return "".join(lines)

    # -- accounting ----------------------------------------------------------------------

    def accounting_records(self) -> list[dict[str, str]]:
        """The Accounting-Requests received so far, oldest first, from the detail file.

        Each record maps attribute name to its value as text (quotes and escapes
        removed; enumerations by name, e.g. ``"Start"``; octets as ``0x...``, see
        :func:`decode_octets`; a repeated attribute's values joined by ``"\\n"``).
        FreeRADIUS adds ``Timestamp`` (UNIX time of arrival).
        """
        try:
            text = self.detail_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        records: list[dict[str, str]] = []
        current: dict[str, str] | None = None
        for line in text.splitlines():
            if not line.strip():
                current = None
            elif not line[0].isspace():  # the header line (arrival time) opens a record
                current = {}
                records.append(current)
            elif current is not None:
                attribute, separator, value = line.strip().partition(" = ")
                if not separator:
                    continue
                value = _unquote(value)
                current[attribute] = f"{current[attribute]}\n{value}" if attribute in current else value
        return records

    def wait_for_accounting(self, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
        """Block until at least ``count`` accounting records exist; returns them all."""
        deadline = time.monotonic() + timeout
        while len(records := self.accounting_records()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(records)} accounting records after {timeout:g} s, expected {count}")
            wait_for(0.01)
        return records

    # -- configuration -------------------------------------------------------------------

    def _config(self) -> str:
        base = self.base_dir
        state = "0x" + self.challenge_state.hex()
        return f"""\
# Generated by tests/servers/freeradius.py for one test instance.
prefix = /usr
exec_prefix = /usr
sysconfdir = {base}
localstatedir = {base}
sbindir = /usr/sbin
logdir = {base}/log
raddbdir = {self.raddb}
radacctdir = {self.detail_path.parent}
name = freeradius
confdir = ${{raddbdir}}
modconfdir = ${{confdir}}
certdir = ${{confdir}}
cadir = ${{confdir}}
run_dir = {base}/run
db_dir = {base}
libdir = {self.module_directory}
pidfile = ${{run_dir}}/freeradius.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 16384
hostname_lookups = no
log {{
  destination = stdout
  colourise = no
  auth = yes
  auth_badpass = no
  auth_goodpass = no
}}
security {{
  allow_core_dumps = no
  max_attributes = 200
  reject_delay = 0
  status_server = yes
}}
proxy_requests = no
client mailgw-tests {{
  ipaddr = {self.host}
  secret = {_quote(self.secret)}
  require_message_authenticator = {"yes" if self.require_message_authenticator else "no"}
  nas_type = other
}}
modules {{
  pap {{
  }}
  files {{
    filename = {self.users_path}
  }}
  detail {{
    filename = {self.detail_path}
    escape_filename = no
    permissions = 0600
    header = "%t"
    locking = no
  }}
  always ok {{
    rcode = ok
  }}
  always handled {{
    rcode = handled
  }}
}}
server default {{
  listen {{
    type = auth
    ipaddr = {self.host}
    port = {self.auth_port}
  }}
  listen {{
    type = acct
    ipaddr = {self.host}
    port = {self.acct_port}
  }}
  authorize {{
    files
    # Second step of a challenge: the password is the user's code.
    if (&control:Tmp-String-1 && &request:State && &request:State == {state}) {{
      update control {{
        &Cleartext-Password := &control:Tmp-String-1
      }}
    }}
    pap
  }}
  authenticate {{
    Auth-Type PAP {{
      pap
      # First step of a challenge: the right password earns an Access-Challenge.
      if (ok && &control:Tmp-String-1 && !&request:State) {{
        update {{
          &reply: !* ANY
        }}
        update reply {{
          &State := {state}
          &Reply-Message := {_quote(CHALLENGE_PROMPT)}
        }}
        update control {{
          &Response-Packet-Type := Access-Challenge
        }}
        handled
      }}
    }}
  }}
  preacct {{
  }}
  accounting {{
    detail
    ok
  }}
  post-auth {{
    Post-Auth-Type REJECT {{
      # Like attr_filter.access_reject: no authorization attributes in a reject.
      update {{
        &reply: !* ANY
      }}
    }}
  }}
}}
"""


def _free_udp_ports(count: int, host: str) -> list[int]:
    """``count`` distinct UDP ports free on ``host`` right now (see ``free_ports``)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# -- a port that never answers -----------------------------------------------------------


class SilentUdpPort:
    """A bound UDP port that receives and records datagrams but never answers.

    A client sending there times out (no ICMP "port unreachable" either, since the port
    is bound): a RADIUS server that is down, or an accounting collector that never
    acknowledges.  Attributes: ``host``, ``port``; :attr:`received` lists the datagrams
    so far.  Stop it with :meth:`close` (or use it as a context manager).
    """

    def __init__(self, host: str = LOOPBACK, port: int = 0) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((host, port))
        self._socket.settimeout(0.05)
        self.host: str = host
        self.port: int = self._socket.getsockname()[1]
        self._received: list[bytes] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, name=f"silent-udp-{self.port}", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data = self._socket.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._received.append(data)

    @property
    def received(self) -> list[bytes]:
        with self._lock:
            return list(self._received)

    def wait_for_datagrams(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """Block until at least ``count`` datagrams arrived; returns them all."""
        deadline = time.monotonic() + timeout
        while len(received := self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(received)} datagrams on port {self.port} after {timeout:g} s")
            wait_for(0.01)
        return received

    def close(self) -> None:
        """Stop listening (idempotent)."""
        self._closing.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def silent_udp_port(testcase: SynchronousTestCase, host: str = LOOPBACK) -> SilentUdpPort:
    """A :class:`SilentUdpPort` closed when ``testcase`` cleans up."""
    port = SilentUdpPort(host)
    testcase.addCleanup(port.close)
    return port


# -- radclient ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RadclientReply:
    """What :func:`radclient` got back.

    ``code``: e.g. ``"Access-Accept"``, ``"Accounting-Response"``, or ``None`` when no
    answer came; ``attributes``: the reply's (name, value) pairs as radclient prints
    them (strings unquoted, octets as ``0x...``); ``output``: radclient's whole output.
    """

    code: str | None
    attributes: list[tuple[str, str]]
    output: str

    def get(self, attribute: str) -> str | None:
        """The first value of ``attribute`` in the reply, or ``None``."""
        return next((value for name, value in self.attributes if name == attribute), None)

    def text(self, attribute: str) -> str | None:
        """The first value of ``attribute`` as text, octets (``0x...``) decoded as UTF-8."""
        value = self.get(attribute)
        return None if value is None else decode_octets(value).decode("utf-8", "replace")


def _radclient_value(value: RadiusValue) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def radclient(
    server: FreeRadius,
    command: str,
    attributes: Mapping[str, RadiusValue] | Iterable[tuple[str, RadiusValue]],
    *,
    port: int | None = None,
    secret: str | None = None,
    message_authenticator: bool = True,
    timeout: float = 3.0,
    tries: int = 1,
) -> RadclientReply:
    """Send one request with FreeRADIUS's ``radclient``; returns the reply.

    ``command``: ``"auth"``, ``"acct"`` or ``"status"`` (to the auth port, or the acct
    port for ``"acct"``, unless ``port`` is given).  String values are sent as text,
    ``bytes`` as octets, ``int`` as numbers; enumerated values (e.g.
    ``Acct-Status-Type``) can be given by name: they are quoted, which radclient
    accepts.  A Message-Authenticator is added unless ``message_authenticator=False``.
    ``radclient`` sends up to ``tries`` times, waiting ``timeout`` seconds for each.
    """
    binary = require_binary("radclient", "freeradius-utils")
    pairs = list(attributes.items()) if isinstance(attributes, Mapping) else list(attributes)
    if message_authenticator and command != "acct":
        pairs.append(("Message-Authenticator", b"\x00"))
    if port is None:
        port = server.acct_port if command == "acct" else server.auth_port
    request = ", ".join(f"{name} = {_radclient_value(value)}" for name, value in pairs) + "\n"
    result = subprocess.run(
        [
            binary,
            "-x",
            "-d",
            str(server.raddb),
            "-t",
            f"{timeout:g}",
            "-r",
            str(tries),
            f"{server.host}:{port}",
            command,
            secret if secret is not None else server.secret,
        ],
        input=request.encode(),
        capture_output=True,
        timeout=timeout * tries + 10,
        check=False,
    )
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    code: str | None = None
    replies: list[tuple[str, str]] = []
    in_reply = False
    for line in output.splitlines():
        match = re.match(r"Received (\S+) Id \d+ ", line)
        if match:
            code, in_reply, replies = match.group(1), True, []
        elif in_reply and line.startswith("\t"):
            name, _, value = line.strip().partition(" = ")
            replies.append((name, _unquote(value)))
        else:
            in_reply = False
    return RadclientReply(code, replies, output)
