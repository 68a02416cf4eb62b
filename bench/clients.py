"""Load generators: blocking TLS clients in threads, several processes of them.

Every function that a client process runs is a top-level function taking and returning
plain data, so it works with the ``spawn`` start method (the bench process has threads).
"""

from __future__ import annotations

import multiprocessing.connection
import os
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import HOST, IO_TIMEOUT

Account = tuple[str, str]


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Line:
    """Line and literal reading over a blocking socket."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""

    def readline(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed; buffer {self.buffer[-200:]!r}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def read_exact(self, size: int) -> int:
        """Read and drop ``size`` bytes; returns ``size``."""
        left = size
        if self.buffer:
            taken = min(left, len(self.buffer))
            self.buffer = self.buffer[taken:]
            left -= taken
        while left:
            data = self.sock.recv(min(262144, left))
            if not data:
                raise ConnectionError("connection closed during a literal")
            left -= len(data)
        return size

    def read_until(self, terminator: bytes) -> int:
        """Read through terminator; returns the bytes read (including it)."""
        data, self.buffer = self.buffer, b""
        total = 0  # bytes seen so far (the tail included)
        tail = b""
        keep = len(terminator) - 1
        while True:
            if data:
                window = tail + data
                position = window.find(terminator)
                if position >= 0:
                    end = position + len(terminator)
                    self.buffer = window[end:]
                    return total - len(tail) + end
                total += len(data)
                tail = window[-keep:]
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("connection closed during transfer")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")


def tls_connect(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw, server_hostname="localhost", session=session)


def _pop3_ok(lines: Line) -> bytes:
    reply = lines.readline()
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"POP3 error: {reply!r}")
    return reply


def _imap_tagged(lines: Line, tag: str) -> bytes:
    prefix = tag.encode() + b" "
    while True:
        reply = lines.readline()
        if reply.startswith(prefix):
            if not reply.startswith(prefix + b"OK"):
                raise RuntimeError(f"IMAP {tag}: {reply!r}")
            return reply


def pop3_login(sock: ssl.SSLSocket, account: Account) -> Line:
    lines = Line(sock)
    _pop3_ok(lines)
    lines.send(f"USER {account[0]}")
    _pop3_ok(lines)
    lines.send(f"PASS {account[1]}")
    _pop3_ok(lines)
    return lines


def imap_login(sock: ssl.SSLSocket, account: Account) -> Line:
    lines = Line(sock)
    greeting = lines.readline()
    if not greeting.startswith(b"* OK"):
        raise RuntimeError(f"IMAP greeting: {greeting!r}")
    lines.send(f"a1 LOGIN {account[0]} {account[1]}")
    _imap_tagged(lines, "a1")
    return lines


def session(protocol: str, sock: ssl.SSLSocket, account: Account) -> None:
    """One session on a connected socket: login, STAT/SELECT, QUIT/LOGOUT."""
    if protocol == "pop3":
        lines = pop3_login(sock, account)
        lines.send("STAT")
        _pop3_ok(lines)
        lines.send("QUIT")
        _pop3_ok(lines)
    else:
        lines = imap_login(sock, account)
        lines.send("a2 SELECT INBOX")
        _imap_tagged(lines, "a2")
        lines.send("a3 LOGOUT")
        _imap_tagged(lines, "a3")


def tls_description(port: int) -> str:
    sock = tls_connect(port, client_context())
    try:
        cipher = sock.cipher()
        certificate = sock.getpeercert(binary_form=True) or b""
        kind = "?"
        if certificate:
            from cryptography import x509
            from cryptography.hazmat.primitives.asymmetric import ec, rsa

            key = x509.load_der_x509_certificate(certificate).public_key()
            if isinstance(key, ec.EllipticCurvePublicKey):
                kind = f"ECDSA {key.curve.name}"
            elif isinstance(key, rsa.RSAPublicKey):
                kind = f"RSA-{key.key_size}"
        return f"{sock.version()} {cipher[0] if cipher else '?'}, {kind}"
    finally:
        sock.close()


# -- concurrent sessions ------------------------------------------------------------------


@dataclass
class LoadTask:
    """What one client process does: ``threads`` clients in a loop for ``seconds``."""

    protocol: str  # "pop3" or "imap"
    port: int
    seconds: float
    threads: int
    accounts: list[Account]
    resume: bool = False
    offset: int = 0
    #: the CPUs this process's client threads may run on (None: as the process is)
    cpus: list[int] | None = None


@dataclass
class LoadResult:
    sessions: int = 0
    errors: int = 0
    resumed: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(task: LoadTask) -> LoadResult:
    """Run in a client process: the task's threads until its deadline."""
    affinity = os.sched_getaffinity(0)
    if task.cpus is not None:
        os.sched_setaffinity(0, set(task.cpus))  # the threads started below inherit it
    try:
        return _run_load(task)
    finally:
        os.sched_setaffinity(0, affinity)


def _run_load(task: LoadTask) -> LoadResult:
    context = client_context()
    result = LoadResult()
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + task.seconds
    cpu_before = _process_cpu()

    def client(index: int) -> None:
        saved: ssl.SSLSession | None = None
        count = sessions = errors = resumed = 0
        first_error = ""
        latencies: list[float] = []
        position = task.offset + index
        while time.monotonic() < deadline:
            begun = time.monotonic()
            account = task.accounts[position % len(task.accounts)]
            position += task.threads * 997  # spread the accounts over the threads
            count += 1
            try:
                sock = tls_connect(task.port, context, saved if task.resume else None)
                try:
                    session(task.protocol, sock, account)
                    if sock.session_reused:
                        resumed += 1
                    elif task.resume:
                        saved = sock.session  # the first (or a refused) session: keep it
                finally:
                    sock.close()
                sessions += 1
                latencies.append(time.monotonic() - begun)
            except (OSError, RuntimeError, ConnectionError) as error:
                errors += 1
                first_error = first_error or repr(error)[:300]
                time.sleep(0.01)
        with lock:
            result.latencies += latencies
            result.sessions += sessions
            result.errors += errors
            result.resumed += resumed
            result.first_error = result.first_error or first_error

    threads = [threading.Thread(target=client, args=(i,)) for i in range(task.threads)]
    for thread in threads:
        thread.start()
    try:  # where the client threads may run (the first one's mask; they all inherit it)
        result.extra["cpus"] = sorted(os.sched_getaffinity(threads[0].native_id or 0)) if threads else []
    except OSError:  # it ended already
        result.extra["cpus"] = sorted(os.sched_getaffinity(0))
    for thread in threads:
        thread.join()
    result.elapsed = time.monotonic() - started
    result.cpu = _process_cpu() - cpu_before
    return result


def cold_logins(protocol: str, port: int, accounts: list[Account], threads: int) -> LoadResult:
    """Each account logs in once (first logins: no cache anywhere)."""
    context = client_context()
    result = LoadResult()
    lock = threading.Lock()
    queue = list(accounts)
    started = time.monotonic()
    cpu_before = _process_cpu()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                account = queue.pop()
            try:
                sock = tls_connect(port, context)
                try:
                    session(protocol, sock, account)
                finally:
                    sock.close()
                with lock:
                    result.sessions += 1
            except (OSError, RuntimeError, ConnectionError) as error:
                with lock:
                    result.errors += 1
                    result.first_error = result.first_error or repr(error)[:300]

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    result.elapsed = time.monotonic() - started
    result.cpu = _process_cpu() - cpu_before
    return result


# -- bulk transfer ------------------------------------------------------------------------


def transfer(protocol: str, port: int, account: Account, count: int) -> int:
    """``count`` RETRs (POP3) or FETCH BODY.PEEK[] (IMAP) of message 1; bytes received."""
    sock = tls_connect(port, client_context())
    received = 0
    try:
        if protocol == "pop3":
            lines = pop3_login(sock, account)
            for _ in range(count):
                lines.send("RETR 1")
                _pop3_ok(lines)
                received += lines.read_until(b"\r\n.\r\n")
            lines.send("QUIT")
            _pop3_ok(lines)
        else:
            lines = imap_login(sock, account)
            lines.send("a2 EXAMINE INBOX")
            _imap_tagged(lines, "a2")
            for n in range(count):
                tag = f"f{n}"
                lines.send(f"{tag} FETCH 1 BODY.PEEK[]")
                while True:
                    line = lines.readline()
                    if line.endswith(b"}") and b"{" in line:
                        size = int(line[line.rindex(b"{") + 1 : -1])
                        received += lines.read_exact(size)
                    elif line.startswith(tag.encode() + b" "):
                        if not line.startswith(tag.encode() + b" OK"):
                            raise RuntimeError(f"IMAP FETCH: {line!r}")
                        break
            lines.send("a3 LOGOUT")
            _imap_tagged(lines, "a3")
    finally:
        sock.close()
    return received


# -- idle sessions ------------------------------------------------------------------------


def hold_idle(
    connection: multiprocessing.connection.Connection, port: int, account: Account, count: int, threads: int = 8
) -> None:
    """Run in a client process: log ``count`` IMAPS sessions in (``threads`` at a
    time), report, wait for a word, close them."""
    context = client_context()
    socks: list[ssl.SSLSocket] = []
    errors: list[str] = []
    lock = threading.Lock()

    def opener(share: int) -> None:
        for _ in range(share):
            try:
                sock = tls_connect(port, context)
                imap_login(sock, account)
                with lock:
                    socks.append(sock)
            except (OSError, RuntimeError, ConnectionError) as error:
                with lock:
                    errors.append(repr(error)[:300])

    shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=opener, args=(share,)) for share in shares if share]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    connection.send({"opened": len(socks), "errors": len(errors), "first_error": errors[0] if errors else ""})
    connection.recv()
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass
    connection.send({"closed": len(socks)})
