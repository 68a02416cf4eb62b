"""mailgw against nginx's mail proxy, in one run, against the same Dovecot (SPEC [10]).

Run from the repository root::

    .venv/bin/python -m bench.run [--sessions 300] [--retr 5] [--idle 500] [--json]

Both proxies terminate TLS (implicit POP3S / IMAPS, ECDSA P-256 certificates) and talk
plaintext to Dovecot's plain POP3/IMAP ports.  They are pinned to CPU 0, this client
(and nginx's auth_http responder, a thread of this process) to CPU 1 with ``taskset``
when available.  Metrics, for each proxy:

1. CPU ms per session: N sequential POP3S sessions (TLS + USER/PASS + STAT + QUIT);
   delta of utime+stime of the proxy's processes divided by N.
2. CPU ms per MiB relayed: K RETRs of a 10 MiB message.
3. PSS KiB per idle authenticated IMAPS session: M sessions logged in and left idle;
   delta of the summed Pss of /proc/PID/smaps_rollup divided by M.

Exit status 2 when nginx or its mail module is missing and cannot be installed.
"""

from __future__ import annotations

import argparse
import datetime
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.servers.base import free_ports, port_accepts  # noqa: E402
from tests.servers.dovecot import BIG_MESSAGE_SIZE, Dovecot, big_message  # noqa: E402

USER = "bench"
PASSWORD = "bench-password"  # noqa: S105 - a test account of the private Dovecot
#: a user whose group policy names an inspection profile (clamd scanning) [4.9]
INSPECTED_USER = "inspected"
HOST = "127.0.0.1"
MAIL_MODULE_CANDIDATES = ("/usr/lib/nginx/modules/ngx_mail_module.so", "/usr/share/nginx/modules/ngx_mail_module.so")
TICKS = os.sysconf("SC_CLK_TCK")
IO_TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- nginx availability -------------------------------------------------------------------


def _find_nginx() -> tuple[str | None, str | None]:
    binary = shutil.which("nginx") or (("/usr/sbin/nginx") if os.path.exists("/usr/sbin/nginx") else None)
    module = next((m for m in MAIL_MODULE_CANDIDATES if os.path.exists(m)), None)
    return binary, module


def ensure_nginx() -> tuple[str, str | None]:
    """Return (nginx binary, mail module path or None when built in); exit 2 if impossible."""
    binary, module = _find_nginx()
    if binary and (module or _mail_built_in(binary)):
        return binary, module
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # policy-rc.d 101: the package scripts must not start the system nginx service.
        policy = Path("/usr/sbin/policy-rc.d")
        created_policy = False
        if not policy.exists():
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            created_policy = True
        try:
            for packages in (["nginx-light", "libnginx-mod-mail"], ["nginx", "libnginx-mod-mail"]):
                log(f"installing {' '.join(packages)} with apt-get")
                result = subprocess.run(  # noqa: S603
                    ["apt-get", "install", "-y", "--no-install-recommends", *packages],  # noqa: S607
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                if result.returncode == 0:
                    break
                log(result.stderr.strip()[-500:])
        finally:
            if created_policy:
                policy.unlink(missing_ok=True)
        binary, module = _find_nginx()
        if binary and (module or _mail_built_in(binary)):
            return binary, module
    print(
        "bench: nginx with its mail module is needed and could not be installed/found.\n"
        "       Install it with: apt-get install nginx-light libnginx-mod-mail "
        "(or nginx libnginx-mod-mail)",
        file=sys.stderr,
    )
    sys.exit(2)


def _mail_built_in(binary: str) -> bool:
    result = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False)  # noqa: S603
    return "--with-mail " in result.stderr + " " and "--with-mail=dynamic" not in result.stderr


# -- process accounting -------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_tree(root: int) -> list[int]:
    """root and its descendants (by parent pid)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree += children
        frontier += children
    return tree


def cpu_seconds(root: int) -> float:
    """utime+stime of root and descendants (plus reaped children's cutime+cstime)."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # fields[11..14] = utime, stime, cutime, cstime (stat fields 14-17)
        total += sum(int(f) for f in fields[11:15])
    return total / TICKS


def pss_kib(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


# -- servers ------------------------------------------------------------------------------


def self_signed_ecdsa(directory: Path) -> tuple[str, str]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "nginx.pem", directory / "nginx.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


class AuthResponder:
    """nginx's auth_http: every login is OK and goes to Dovecot's plain port."""

    def __init__(self, ports: dict[str, int]) -> None:
        ports_by_protocol = ports

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                protocol = self.headers.get("Auth-Protocol", "pop3")
                self.send_response(200)
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", HOST)
                self.send_header("Auth-Port", str(ports_by_protocol.get(protocol, ports_by_protocol["pop3"])))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> AuthResponder:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Managed:
    """A process this script started (pid kept); stopped by pid, then its leftovers."""

    def __init__(self, name: str, argv: list[str], cwd: Path, output: Path) -> None:
        self.name = name
        self.output = output
        self._log = open(output, "wb")
        self.process = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)  # noqa: S603
        self.pid = self.process.pid

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.tail()}")
            if port_accepts(HOST, port, timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} is not listening on {port} after {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        try:
            return self.output.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            children = process_tree(self.pid)[1:]
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
            for pid in children:  # workers of nginx, if any outlived the master
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    if cpu is None:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def nginx_config(base: Path, module: str | None, cert: str, key: str, auth_port: int, pop3s: int, imaps: int) -> Path:
    load = f"load_module {module};\n" if module else ""
    user = "user root;\n" if os.geteuid() == 0 else ""
    text = f"""{load}{user}worker_processes 1;
worker_rlimit_nofile 16384;
pid {base}/nginx.pid;
error_log {base}/nginx-error.log error;
events {{
    worker_connections 8192;
}}
mail {{
    server_name localhost;
    auth_http {HOST}:{auth_port}/auth;
    proxy_pass_error_message on;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen {HOST}:{pop3s} ssl;
        protocol pop3;
        pop3_auth plain;
    }}
    server {{
        listen {HOST}:{imaps} ssl;
        protocol imap;
        imap_auth plain;
    }}
}}
"""
    path = base / "nginx.conf"
    path.write_text(text)
    return path


# -- clients ------------------------------------------------------------------------------


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Line:
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


def tls_connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    return context.wrap_socket(raw, server_hostname="localhost")


def pop3_expect_ok(lines: Line) -> bytes:
    reply = lines.readline()
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"POP3 error: {reply!r}")
    return reply


def pop3_login(port: int, context: ssl.SSLContext, user: str = USER) -> tuple[ssl.SSLSocket, Line]:
    sock = tls_connect(port, context)
    lines = Line(sock)
    pop3_expect_ok(lines)
    lines.send(f"USER {user}")
    pop3_expect_ok(lines)
    lines.send(f"PASS {PASSWORD}")
    pop3_expect_ok(lines)
    return sock, lines


def pop3_session(port: int, context: ssl.SSLContext) -> None:
    sock, lines = pop3_login(port, context)
    try:
        lines.send("STAT")
        pop3_expect_ok(lines)
        lines.send("QUIT")
        pop3_expect_ok(lines)
    finally:
        sock.close()


def pop3_retr(port: int, context: ssl.SSLContext, count: int, user: str = USER) -> int:
    sock, lines = pop3_login(port, context, user)
    received = 0
    try:
        for _ in range(count):
            lines.send("RETR 1")
            pop3_expect_ok(lines)
            received += lines.read_until(b"\r\n.\r\n")
        lines.send("QUIT")
        pop3_expect_ok(lines)
    finally:
        sock.close()
    return received


def imap_login(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = tls_connect(port, context)
    lines = Line(sock)
    greeting = lines.readline()
    if not greeting.startswith(b"* OK"):
        raise RuntimeError(f"IMAP greeting: {greeting!r}")
    lines.send(f"a1 LOGIN {USER} {PASSWORD}")
    while True:
        reply = lines.readline()
        if reply.startswith(b"a1 "):
            if not reply.startswith(b"a1 OK"):
                raise RuntimeError(f"IMAP LOGIN: {reply!r}")
            return sock


def tls_description(port: int, context: ssl.SSLContext) -> str:
    sock = tls_connect(port, context)
    try:
        cipher = sock.cipher()
        return f"{sock.version()} {cipher[0] if cipher else '?'}"
    finally:
        sock.close()


# -- measurements -------------------------------------------------------------------------


def measure(name: str, pid: int, pop3s: int, imaps: int, args: argparse.Namespace) -> dict[str, Any]:
    context = client_context()
    result: dict[str, Any] = {"tls": tls_description(pop3s, context)}
    # Warm-up: code paths, caches, allocator.
    for _ in range(5):
        pop3_session(pop3s, context)
    warm = [imap_login(imaps, context) for _ in range(5)]
    for sock in warm:
        sock.close()
    time.sleep(0.5)

    log(f"{name}: {args.sessions} sequential POP3S sessions")
    before = cpu_seconds(pid)
    started = time.monotonic()
    for _ in range(args.sessions):
        pop3_session(pop3s, context)
    elapsed = time.monotonic() - started
    time.sleep(0.3)
    result["cpu_ms_per_session"] = (cpu_seconds(pid) - before) * 1000 / args.sessions
    result["sessions_per_second"] = args.sessions / elapsed

    log(f"{name}: {args.retr} x RETR of the 10 MiB message")
    before = cpu_seconds(pid)
    started = time.monotonic()
    received = pop3_retr(pop3s, context, args.retr)
    elapsed = time.monotonic() - started
    time.sleep(0.3)
    mib = received / (1024 * 1024)
    result["cpu_ms_per_mib"] = (cpu_seconds(pid) - before) * 1000 / mib
    result["relay_mib_per_second"] = mib / elapsed

    log(f"{name}: {args.idle} idle authenticated IMAPS sessions")
    before_pss = pss_kib(pid)
    idle: list[ssl.SSLSocket] = []
    try:
        for _ in range(args.idle):
            idle.append(imap_login(imaps, context))
        time.sleep(1.0)
        after_pss = pss_kib(pid)
    finally:
        for sock in idle:
            sock.close()
    result["pss_kib_per_idle_session"] = (after_pss - before_pss) / args.idle
    result["pss_kib_baseline"] = before_pss
    time.sleep(1.0)  # let the proxy and Dovecot close them before the next proxy runs
    return result


def measure_inspected(pid: int, clamd_pid: int, pop3s: int, args: argparse.Namespace) -> dict[str, Any]:
    """CPU per MiB of RETR for a session whose policy inspects (clean mail, clamd
    scanning): the gateway's own CPU and clamd's, apart."""
    context = client_context()
    pop3_retr(pop3s, context, 1, INSPECTED_USER)  # warm-up
    log(f"mailgw (inspected): {args.retr} x RETR of the 10 MiB message")
    before, before_clamd = cpu_seconds(pid), cpu_seconds(clamd_pid)
    started = time.monotonic()
    received = pop3_retr(pop3s, context, args.retr, INSPECTED_USER)
    elapsed = time.monotonic() - started
    time.sleep(0.3)
    mib = received / (1024 * 1024)
    return {
        "cpu_ms_per_mib": (cpu_seconds(pid) - before) * 1000 / mib,
        "clamd_cpu_ms_per_mib": (cpu_seconds(clamd_pid) - before_clamd) * 1000 / mib,
        "relay_mib_per_second": mib / elapsed,
    }


# -- main ---------------------------------------------------------------------------------


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(max(needed, soft), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        log(f"warning: RLIMIT_NOFILE is {soft}, {needed} wanted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=300, help="sequential POP3S sessions (default 300)")
    parser.add_argument("--retr", type=int, default=5, help="RETRs of the 10 MiB message (default 5)")
    parser.add_argument("--idle", type=int, default=500, help="idle IMAPS sessions (default 500)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if min(args.sessions, args.retr, args.idle) < 1:
        parser.error("--sessions, --retr and --idle must be at least 1")

    nginx_binary, mail_module = ensure_nginx()
    raise_nofile(4 * args.idle + 1024)

    cpus = sorted(os.sched_getaffinity(0))
    pin = shutil.which("taskset") is not None and len(cpus) >= 2
    proxy_cpu = cpus[0] if pin else None
    if pin:
        os.sched_setaffinity(0, {cpus[1]})
    else:
        log("not pinning CPUs (taskset missing or a single CPU)")

    base = Path(tempfile.mkdtemp(prefix="mailgw-bench-"))
    base.chmod(0o755)  # Dovecot's mail processes (running as root) must reach their folder
    started: list[Any] = []
    results: dict[str, Any] = {}
    try:
        from tests.gateway import Gateway
        from tests.servers.pki import TestPKI

        dovecot_dir = base / "dovecot"
        dovecot_dir.mkdir()
        dovecot = Dovecot(
            dovecot_dir,
            users={USER: PASSWORD, INSPECTED_USER: PASSWORD},
            extra_config=(
                f"default_process_limit = {args.idle + 200}\n"
                f"default_client_limit = {4 * args.idle + 1000}\n"
                f"default_vsz_limit = 1G\n"
            ),
        )
        dovecot.deliver(USER, big_message())
        dovecot.deliver(INSPECTED_USER, big_message())
        dovecot.start()
        started.append(dovecot)
        if pin and len(cpus) > 2:  # keep Dovecot off the proxies' and the client's CPUs
            for pid in process_tree(dovecot.pid):  # type: ignore[arg-type]
                try:
                    os.sched_setaffinity(pid, set(cpus[2:]))
                except OSError:
                    pass
        log(f"dovecot: pop3 {dovecot.pop3_port}, imap {dovecot.imap_port}")

        # nginx
        auth = AuthResponder({"pop3": dovecot.pop3_port, "imap": dovecot.imap_port}).start()
        started.append(auth)
        nginx_dir = base / "nginx"
        nginx_dir.mkdir()
        cert, key = self_signed_ecdsa(nginx_dir)
        n_pop3s, n_imaps = free_ports(2)
        conf = nginx_config(nginx_dir, mail_module, cert, key, auth.port, n_pop3s, n_imaps)
        nginx = Managed(
            "nginx",
            pinned(
                [
                    nginx_binary,
                    "-p",
                    str(nginx_dir),
                    "-e",
                    str(nginx_dir / "nginx-error.log"),
                    "-c",
                    str(conf),
                    "-g",
                    "daemon off;",
                ],
                proxy_cpu,
            ),
            nginx_dir,
            nginx_dir / "nginx.out",
        )
        started.append(nginx)
        nginx.wait_port(n_pop3s)
        nginx.wait_port(n_imaps)

        # mailgw
        gw_dir = base / "mailgw"
        gw_dir.mkdir()
        gateway = Gateway(
            gw_dir, TestPKI(gw_dir / "pki"), {USER: (PASSWORD, None), INSPECTED_USER: (PASSWORD, "Inspected")}
        )
        clamd = None
        if shutil.which("clamd") or Path("/usr/sbin/clamd").exists():
            from tests.servers.clamd import Clamd

            clamd = Clamd(base / "clamd")
            clamd.start()
            started.append(clamd)
        else:
            log("clamd missing (apt-get install clamav-daemon): no inspected scenario")
        started.append(("rmtree", gateway.socket_dir))
        data = gateway.config_data(
            {"default_server": {"host": HOST, "port": dovecot.pop3_port, "tls": "none"}},
            imap4s={"default_server": {"host": HOST, "port": dovecot.imap_port, "tls": "none"}},
        )
        data["group_policy"] = [{"name": "DfltGrpPolicy", "simultaneous_logins": args.idle + 100}]
        if clamd is not None:
            data["group_policy"].append({"name": "Inspected", "inspection": "bench"})
            data["inspection"] = [{"name": "bench", "clamd": str(clamd.address)}]
        config_path = gateway.write_config(data)
        twistd = str(Path(sys.executable).parent / "twistd")
        mailgw = Managed(
            "mailgw",
            pinned([twistd, "-n", "--pidfile=", "mailgw", "--config", str(config_path)], proxy_cpu),
            gw_dir,
            gw_dir / "twistd.out",
        )
        started.append(mailgw)
        m_pop3s, m_imaps = data["pop3s"]["port"], data["imap4s"]["port"]
        mailgw.wait_port(m_pop3s)
        mailgw.wait_port(m_imaps)

        results["nginx"] = measure("nginx", nginx.pid, n_pop3s, n_imaps, args)
        results["mailgw"] = measure("mailgw", mailgw.pid, m_pop3s, m_imaps, args)
        if clamd is not None and clamd.pid is not None:
            results["mailgw_inspected"] = measure_inspected(mailgw.pid, clamd.pid, m_pop3s, args)
    finally:
        for item in reversed(started):
            try:
                if isinstance(item, tuple):
                    shutil.rmtree(item[1], ignore_errors=True)
                else:
                    item.stop()
            except Exception as error:  # noqa: BLE001 - clean up the rest anyway
                log(f"stopping {item!r}: {error}")
        shutil.rmtree(base, ignore_errors=True)

    report(results, args, pin)
    return 0


METRICS = (
    ("cpu_ms_per_session", "proxy CPU ms per POP3S session", "{:.3f}"),
    ("cpu_ms_per_mib", "proxy CPU ms per MiB relayed (RETR)", "{:.3f}"),
    ("pss_kib_per_idle_session", "proxy PSS KiB per idle IMAPS session", "{:.1f}"),
    ("sessions_per_second", "(info) sequential sessions per second", "{:.1f}"),
    ("relay_mib_per_second", "(info) RETR throughput MiB/s", "{:.1f}"),
)


def report(results: dict[str, Any], args: argparse.Namespace, pinned_cpus: bool) -> None:
    ratios = {}
    for key, _, _ in METRICS:
        base = results["nginx"][key]
        ratios[key] = results["mailgw"][key] / base if base else None
    if args.json:
        print(
            json.dumps(
                {
                    "parameters": {
                        "sessions": args.sessions,
                        "retr": args.retr,
                        "idle": args.idle,
                        "message_bytes": BIG_MESSAGE_SIZE,
                        "pinned": pinned_cpus,
                    },
                    "results": results,
                    "ratio_mailgw_over_nginx": ratios,
                },
                indent=2,
            )
        )
        return
    print(f"sessions={args.sessions} retr={args.retr} idle={args.idle} pinned={pinned_cpus}")
    inspected = results.get("mailgw_inspected")
    print(f"TLS: mailgw {results['mailgw']['tls']}; nginx {results['nginx']['tls']}")
    header = f"{'metric':<42} {'mailgw':>10} {'nginx':>10} {'mailgw/nginx':>13}"
    print(header)
    print("-" * len(header))
    for key, label, fmt in METRICS:
        ratio = ratios[key]
        print(
            f"{label:<42} {fmt.format(results['mailgw'][key]):>10} {fmt.format(results['nginx'][key]):>10} "
            f"{(f'{ratio:.2f}' if ratio is not None else 'n/a'):>13}"
        )
    if inspected:
        nginx_mib = results["nginx"]["cpu_ms_per_mib"]
        for key, label in (
            ("cpu_ms_per_mib", "inspected: proxy CPU ms per MiB (RETR)"),
            ("clamd_cpu_ms_per_mib", "inspected: clamd CPU ms per MiB"),
        ):
            value = inspected[key]
            ratio = value / nginx_mib if nginx_mib else None
            print(f"{label:<42} {value:>10.3f} {nginx_mib:>10.3f} {(f'{ratio:.2f}' if ratio else 'n/a'):>13}")


if __name__ == "__main__":
    sys.exit(main())
