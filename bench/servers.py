"""Starting what the benchmark measures: a private Dovecot (the one mail store behind
both proxies, and measured directly over its own TLS ports), nginx's mail proxy with its
auth_http responder (:mod:`bench.authhttp`), mailgw via ``twistd`` and clamd.

All three TLS servers present the same ECDSA P-256 certificate, accept TLS 1.2 and 1.3
(so clients negotiate 1.3) and run one worker: nginx ``worker_processes 1``, mailgw
``workers = 1``, Dovecot one login process per service (``service_count = 0``,
``process_limit = 1``: its high-performance mode; the mail processes are one per
session whatever the mode).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    INSPECTED_USER,
    PASSWORD,
    POLLER_PASSWORD,
    POLLER_USER,
    USER,
    Managed,
    log,
    pinned,
    process_tree,
)
from tests.servers.base import free_ports
from tests.servers.dovecot import Dovecot, big_message

MAIL_MODULE_CANDIDATES = ("/usr/lib/nginx/modules/ngx_mail_module.so", "/usr/share/nginx/modules/ngx_mail_module.so")


# -- nginx availability -------------------------------------------------------------------


def _find_nginx() -> tuple[str | None, str | None]:
    binary = shutil.which("nginx") or (("/usr/sbin/nginx") if os.path.exists("/usr/sbin/nginx") else None)
    module = next((m for m in MAIL_MODULE_CANDIDATES if os.path.exists(m)), None)
    return binary, module


def _mail_built_in(binary: str) -> bool:
    result = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False)  # noqa: S603
    return "--with-mail " in result.stderr + " " and "--with-mail=dynamic" not in result.stderr


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


# -- configuration ------------------------------------------------------------------------


def self_signed_ecdsa(directory: Path) -> tuple[str, str]:
    """An ECDSA P-256 certificate for localhost/127.0.0.1: (cert path, key path)."""
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
    cert_path, key_path = directory / "bench.pem", directory / "bench.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o644)  # Dovecot reads it as root; the folder is private to the run
    return str(cert_path), str(key_path)


def nginx_config(base: Path, module: str | None, cert: str, key: str, auth_port: int, pop3s: int, imaps: int) -> Path:
    load = f"load_module {module};\n" if module else ""
    user = "user root;\n" if os.geteuid() == 0 else ""
    text = f"""{load}{user}worker_processes 1;
worker_rlimit_nofile 40000;
pid {base}/nginx.pid;
error_log {base}/nginx-error.log error;
events {{
    worker_connections 20000;
}}
mail {{
    server_name localhost;
    auth_http {HOST}:{auth_port}/auth;
    proxy_pass_error_message on;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:MAIL:10m;
    ssl_session_tickets on;
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


def dovecot_extra_config(idle: int) -> str:
    clients = 4 * idle + 1000
    login = (
        "  service_count = 0\n  process_min_avail = 1\n  process_limit = 1\n"
        f"  client_limit = {clients}\n  vsz_limit = 1G\n"
    )
    mail = f"  service_count = 100\n  process_min_avail = 4\n  process_limit = {idle + 300}\n"
    return (
        f"default_process_limit = {idle + 300}\n"
        f"default_client_limit = {clients}\n"
        "default_vsz_limit = 1G\n"
        f"service imap-login {{\n{login}}}\n"
        f"service pop3-login {{\n{login}}}\n"
        # Reuse mail processes (Dovecot's performance tuning advice) instead of one
        # fork+exec per session, and cache passdb/userdb lookups.
        # imap: up to 50 sessions per process (Dovecot's advice is 1 for busy mailboxes;
        # these are idle, and forking thousands of processes is what slows the idle runs)
        f"service imap {{\n  service_count = 0\n  client_limit = 50\n  process_min_avail = 4\n"
        f"  process_limit = {idle // 10 + 300}\n}}\n"
        f"service pop3 {{\n{mail}}}\n"
        "auth_cache_size = 1M\n"
        # thousands of idle sessions of one user from 127.0.0.1
        f"protocol imap {{\n  mail_max_userip_connections = {idle + 1000}\n}}\n"
        f"protocol pop3 {{\n  mail_max_userip_connections = {idle + 1000}\n}}\n"
    )


# -- the stack ----------------------------------------------------------------------------


@dataclass
class Ports:
    pop3s: int
    imaps: int


@dataclass
class Stack:
    """Everything started for one benchmark run; ``stop`` undoes it in reverse."""

    base: Path
    dovecot: Dovecot
    cert: str
    key: str
    auth: Managed
    nginx: Managed
    mailgw: Managed
    ports: dict[str, Ports]
    accounts: dict[str, str]
    hashes: dict[str, str] = field(default_factory=dict)
    clamd: Any = None
    started: list[Any] = field(default_factory=list)

    def pid(self, server: str) -> int:
        if server == "dovecot":
            assert self.dovecot.pid is not None
            return self.dovecot.pid
        return {"nginx": self.nginx, "mailgw": self.mailgw}[server].pid

    def restart(self, server: str) -> None:
        """A fresh process of the proxy ``server``."""
        {"nginx": self.nginx, "mailgw": self.mailgw}[server].restart()

    def stop(self) -> None:
        for item in reversed(self.started):
            try:
                if isinstance(item, tuple):
                    shutil.rmtree(item[1], ignore_errors=True)
                else:
                    item.stop()
            except Exception as error:  # noqa: BLE001 - clean up the rest anyway
                log(f"stopping {item!r}: {error}")


def _users_toml(hashes: dict[str, str], fast: dict[str, tuple[str, str | None]]) -> str:
    from tests.gateway import fast_hash

    lines = []
    for name, (password, policy) in fast.items():
        lines += [f"[users.{json.dumps(name)}]", f"password_hash = {json.dumps(fast_hash(password))}"]
        if policy:
            lines.append(f"group_policy = {json.dumps(policy)}")
        lines.append("")
    for name, value in hashes.items():
        lines += [f"[users.{json.dumps(name)}]", f"password_hash = {json.dumps(value)}", ""]
    return "\n".join(lines)


def start_stack(
    base: Path,
    nginx_binary: str,
    mail_module: str | None,
    *,
    proxy_cpu: int | None,
    client_cpu: int | None,
    idle: int,
    accounts: dict[str, str],
    hashes: dict[str, str],
    with_clamd: bool = True,
) -> Stack:
    """Dovecot, auth_http + nginx, clamd (when installed) and mailgw, all listening."""
    started: list[Any] = []
    try:
        cert, key = self_signed_ecdsa(base)
        dovecot_dir = base / "dovecot"
        dovecot_dir.mkdir()
        dovecot = Dovecot(
            dovecot_dir,
            users={USER: PASSWORD, INSPECTED_USER: PASSWORD, POLLER_USER: POLLER_PASSWORD, **accounts},
            extra_config=dovecot_extra_config(idle),
        )
        dovecot.cert_path, dovecot.key_path = cert, key  # the certificate all three present
        dovecot.deliver(USER, big_message())
        dovecot.deliver(INSPECTED_USER, big_message())
        dovecot.start()
        started.append(dovecot)
        log(f"dovecot: pop3 {dovecot.pop3_port}, imap {dovecot.imap_port}")

        # nginx and its auth_http responder
        nginx_dir = base / "nginx"
        nginx_dir.mkdir()
        users_json = nginx_dir / "users.json"
        users_json.write_text(json.dumps(hashes))
        (auth_port,) = free_ports(1)
        auth = Managed(
            "auth_http",
            pinned(
                [
                    sys.executable,
                    "-m",
                    "bench.authhttp",
                    "--port",
                    str(auth_port),
                    "--pop3",
                    str(dovecot.pop3_port),
                    "--imap",
                    str(dovecot.imap_port),
                    "--users",
                    str(users_json),
                ],
                client_cpu,
            ),
            Path(__file__).resolve().parent.parent,
            nginx_dir / "authhttp.out",
            (auth_port,),
        )
        started.append(auth)
        n_pop3s, n_imaps = free_ports(2)
        conf = nginx_config(nginx_dir, mail_module, cert, key, auth_port, n_pop3s, n_imaps)
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
            (n_pop3s, n_imaps),
        )
        started.append(nginx)

        clamd = None
        if with_clamd and (shutil.which("clamd") or Path("/usr/sbin/clamd").exists()):
            from tests.servers.clamd import Clamd

            clamd = Clamd(base / "clamd")
            clamd.start()
            started.append(clamd)
        elif with_clamd:
            log("clamd missing (apt-get install clamav-daemon): no inspected scenario")
        mailgw, mailgw_ports, _ = start_mailgw(
            base / "mailgw", dovecot, cert, key, idle, hashes, clamd, pinned_to=proxy_cpu, started=started
        )
    except BaseException:
        for item in reversed(started):
            if not isinstance(item, tuple):
                item.stop()
        raise
    return Stack(
        base=base,
        dovecot=dovecot,
        cert=cert,
        key=key,
        auth=auth,
        nginx=nginx,
        mailgw=mailgw,
        ports={
            "nginx": Ports(n_pop3s, n_imaps),
            "mailgw": mailgw_ports,
            "dovecot": Ports(dovecot.pop3s_port, dovecot.imaps_port),
        },
        accounts=accounts,
        hashes=hashes,
        clamd=clamd,
        started=started,
    )


def start_mailgw(
    gw_dir: Path,
    dovecot: Dovecot,
    cert: str,
    key: str,
    idle: int,
    hashes: dict[str, str],
    clamd: Any,
    *,
    pinned_to: int | None = None,
    cpus: list[int] | None = None,
    workers: int | None = None,
    name: str = "mailgw",
    started: list[Any],
) -> tuple[Managed, Ports, str]:
    """mailgw under ``twistd`` in front of ``dovecot``, listening: (process, its POP3S and
    IMAPS ports, its admin socket).  ``pinned_to``: one CPU (``taskset``); else ``cpus``:
    the CPUs it may run on (``taskset`` too: the bench process is pinned and its children
    inherit that); ``workers``: ``gateway.workers`` (None: the default, one process).
    What is started is appended to ``started`` (for :meth:`Stack.stop`)."""
    from tests.gateway import Gateway
    from tests.servers.pki import TestPKI

    gw_dir.mkdir()
    fast_users: dict[str, tuple[str, str | None]] = {
        USER: (PASSWORD, None),
        INSPECTED_USER: (PASSWORD, "Inspected"),
    }
    gateway = Gateway(gw_dir, TestPKI(gw_dir / "pki"), fast_users)
    started.append(("rmtree", gateway.socket_dir))
    data = gateway.config_data(
        {"default_server": {"host": HOST, "port": dovecot.pop3_port, "tls": "none"}},
        imap4s={"default_server": {"host": HOST, "port": dovecot.imap_port, "tls": "none"}},
    )
    if workers is not None:
        data["gateway"]["workers"] = workers
    data["tls"] = {"certificate": cert, "private_key": key}
    data["group_policy"] = [{"name": "DfltGrpPolicy", "simultaneous_logins": idle + 100}]
    if clamd is not None:
        data["group_policy"].append({"name": "Inspected", "inspection": "bench"})
        data["inspection"] = [{"name": "bench", "clamd": str(clamd.address)}]
    else:
        data["group_policy"].append({"name": "Inspected", "simultaneous_logins": idle + 100})
    config_path = gateway.write_config(data)
    (gw_dir / "users.toml").write_text(_users_toml(hashes, fast_users))
    twistd = str(Path(sys.executable).parent / "twistd")
    # BENCH_TWISTD_ARGS: more twistd options, e.g. "--profile=FILE --profiler=cprofile --savestats"
    extra = os.environ.get("BENCH_TWISTD_ARGS", "").split()
    argv = [twistd, "-n", "--pidfile=", *extra, "mailgw", "--config", str(config_path)]
    if pinned_to is not None:
        argv = pinned(argv, pinned_to)
    elif cpus is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(str(cpu) for cpu in cpus), *argv]
    ports = Ports(data["pop3s"]["port"], data["imap4s"]["port"])
    mailgw = Managed(name, argv, gw_dir, gw_dir / "twistd.out", (ports.pop3s, ports.imaps))
    started.append(mailgw)
    return mailgw, ports, str(data["admin"]["socket"])


def dovecot_pids(stack: Stack) -> list[int]:
    return process_tree(stack.pid("dovecot"))
