"""mailgw against nginx's mail proxy (and Dovecot directly), in one run (SPEC [10]).

Run from the repository root::

    .venv/bin/python -m bench.run [--runs 3] [--quick] [--json PATH] [--only SCENARIO,...]

Dovecot is the one mail store; nginx (with its auth_http responder) and mailgw terminate
TLS (implicit POP3S/IMAPS, the same ECDSA P-256 certificate, TLS 1.2-1.3, one worker
each) and talk plaintext to Dovecot's plain ports; Dovecot is also measured over its own
TLS ports.  The proxies are pinned to CPU 0, the load generator (several processes of
threads) and the auth_http responder to CPU 1.  Scenarios (see bench/README.md):
``rate`` (32 concurrent POP3S and IMAPS sessions), ``resume`` (the same with TLS session
resumption), ``bcrypt`` (200 cost-12 users), ``transfer`` (10 MiB RETR and FETCH),
``idle`` (idle IMAPS sessions, PSS, fresh processes), ``poller`` (mailgw's poller vs
fetchmail), ``inspected`` (RETR through clamd), ``workers`` (the session rate of mailgw
with workers = 1 and workers = 2, unpinned).  Every figure is the median of ``--runs``.

Exit status 2 when nginx or its mail module is missing and cannot be installed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.pool
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import clients, report, sslnew, users
from bench.common import (
    INSPECTED_USER,
    PASSWORD,
    USER,
    Managed,
    allowed_cpus,
    cpu_seconds,
    log,
    machine_busy_seconds,
    process_tree,
    pss_kib,
    raise_nofile,
    set_tree_affinity,
)
from bench.servers import Ports, Stack, ensure_nginx, start_mailgw, start_stack
from tests.servers.dovecot import BIG_MESSAGE_SIZE

SCENARIOS = ("rate", "resume", "bcrypt", "transfer", "idle", "inspected", "poller", "workers")
PROXIES = ("mailgw", "nginx")
ALL_SERVERS = ("mailgw", "nginx", "dovecot")
Results = dict[str, dict[str, list[dict[str, Any]]]]
#: gateway.workers of the two gateways of the workers scenario
WORKER_COUNTS = (1, 2)
MAILGWCTL = str(Path(sys.executable).parent / "mailgwctl")


@dataclass
class Target:
    """A gateway started for one scenario (not part of the stack)."""

    name: str  # the results' column: "workers1", "workers2"
    process: Managed
    ports: Ports
    admin_socket: str
    #: the CPUs the load clients' threads run on (None: the pool's, CPU 1)
    client_cpus: list[int] | None
    worker_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def port(self, protocol: str) -> int:
        return self.ports.pop3s if protocol == "pop3" else self.ports.imaps


def mailgw_status(admin_socket: str) -> dict[str, Any]:
    """``mailgwctl --json status`` of the gateway behind ``admin_socket``."""
    result = subprocess.run(  # noqa: S603
        [MAILGWCTL, "--socket", admin_socket, "--timeout", "10", "--json", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mailgwctl status: {result.returncode} {result.stderr.strip()[-500:]}")
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def wait_workers(target: Target, count: int, timeout: float = 60.0) -> list[int]:
    """Wait until the gateway answers and (workers != 1) its ``count`` workers are
    ready; returns their pids (none for workers = 1, which serves by itself)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status = mailgw_status(target.admin_socket)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
            last = error
        else:
            workers = status.get("workers") or []
            if count == 1:
                return []
            last = workers
            if len(workers) == count and all(w.get("state") == "ready" and w.get("pid") for w in workers):
                pids = [int(w["pid"]) for w in workers]
                strays = set(pids) - set(process_tree(target.pid))
                if strays:  # cpu_seconds(supervisor) would miss them
                    raise RuntimeError(f"{target.name}: workers {sorted(strays)} are not the supervisor's children")
                return pids
        time.sleep(0.5)
    raise RuntimeError(f"{target.name}: {count} workers not ready after {timeout}s: {last!r}\n{target.process.tail()}")


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        stack: Stack,
        pool: multiprocessing.pool.Pool,
        all_cpus: list[int] | None = None,
    ) -> None:
        self.args = args
        self.stack = stack
        self.pool = pool
        self.results: Results = {}
        #: every CPU of the machine (the bench process itself is pinned to one)
        self.all_cpus = all_cpus or sorted(os.sched_getaffinity(0))
        #: conditions found while running (added to the report's)
        self.notes: dict[str, Any] = {}

    def add(self, scenario: str, server: str, value: dict[str, Any]) -> None:
        self.results.setdefault(scenario, {}).setdefault(server, []).append(value)

    def port(self, server: str, protocol: str) -> int:
        ports = self.stack.ports[server]
        return ports.pop3s if protocol == "pop3" else ports.imaps

    # -- concurrent sessions -------------------------------------------------------------

    def load(
        self,
        server: str,
        protocol: str,
        seconds: float,
        accounts: list[clients.Account],
        resume: bool = False,
        *,
        target: Target | None = None,
    ) -> dict[str, Any]:
        """``target``: a server not in the stack (the workers scenario), with the CPUs
        of the clients and the machine's busy time measured too."""
        processes, concurrency = self.args.client_processes, self.args.clients
        per = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
        port = self.port(server, protocol) if target is None else target.port(protocol)
        cpus = target.client_cpus if target is not None else None
        tasks = [
            clients.LoadTask(protocol, port, seconds, n, accounts, resume, offset=i * 7, cpus=cpus)
            for i, n in enumerate(per)
            if n
        ]
        pid = self.stack.pid(server) if target is None else target.pid
        dovecot_pid, auth_pid = self.stack.pid("dovecot"), self.stack.auth.pid
        before_w = {w: cpu_seconds(w) for w in (target.worker_pids if target is not None else [])}
        before, before_dc = cpu_seconds(pid), cpu_seconds(dovecot_pid)
        before_auth = cpu_seconds(auth_pid, precise=False)
        machine_before, machine_started = machine_busy_seconds(), time.monotonic()
        outcomes: list[clients.LoadResult] = self.pool.map(clients.run_load, tasks)
        machine_after, machine_ended = machine_busy_seconds(), time.monotonic()
        time.sleep(0.3)  # the last sessions' teardown is the proxy's work too
        proxy = cpu_seconds(pid) - before
        workers_cpu = sum(cpu_seconds(w) - b for w, b in before_w.items())
        backend = cpu_seconds(dovecot_pid) - before_dc
        auth = cpu_seconds(auth_pid, precise=False) - before_auth
        sessions = sum(o.sessions for o in outcomes)
        elapsed = max(o.elapsed for o in outcomes)
        client_cpu = sum(o.cpu for o in outcomes)
        errors = sum(o.errors for o in outcomes)
        if errors:
            first = next(o.first_error for o in outcomes if o.first_error)
            log(f"{server} {protocol}: {errors} failed sessions, first: {first}")
        n = max(sessions, 1)
        latencies = sorted(x for o in outcomes for x in o.latencies) or [0.0]
        result: dict[str, Any] = {
            "latency_ms_p50": latencies[len(latencies) // 2] * 1000,
            "latency_ms_p95": latencies[int(len(latencies) * 0.95)] * 1000,
            "sessions": sessions,
            "errors": errors,
            "seconds": elapsed,
            "sessions_per_second": sessions / elapsed,
            "cpu_ms_per_session": proxy * 1000 / n,
            "proxy_cores": proxy / elapsed,
            "client_cpu_ms_per_session": client_cpu * 1000 / n,
            "client_cores": client_cpu / elapsed,
        }
        if server != "dovecot":
            result["backend_cpu_ms_per_session"] = backend * 1000 / n
        if server == "nginx":
            result["auth_cpu_ms_per_session"] = auth * 1000 / n
            result["cpu_plus_auth_ms_per_session"] = (proxy + auth) * 1000 / n
        elif server == "mailgw":
            result["cpu_plus_auth_ms_per_session"] = proxy * 1000 / n  # its AAA is in-process
        if resume:
            result["resumed_share"] = sum(o.resumed for o in outcomes) / n
        if target is not None:
            busy = machine_after[0] - machine_before[0]
            total = machine_after[1] - machine_before[1]
            result["backend_cores"] = backend / elapsed
            if before_w:
                result["workers_cpu_ms_per_session"] = workers_cpu * 1000 / n
                result["supervisor_cpu_ms_per_session"] = (proxy - workers_cpu) * 1000 / n
            # the whole machine while the clients ran (/proc/stat)
            result["machine_busy_share"] = busy / total if total else 0.0
            result["machine_steal_cores"] = (machine_after[2] - machine_before[2]) / (machine_ended - machine_started)
            result["machine_busy_cores"] = busy / (machine_ended - machine_started)
            # what the machine did besides gateway, clients and Dovecot (bench, kernel, ...)
            result["other_cores"] = result["machine_busy_cores"] - (proxy + client_cpu + backend) / elapsed
            result["client_cpus"] = ",".join(str(c) for c in outcomes[0].extra.get("cpus", []))
        return result

    def rate(self, resume: bool) -> None:
        scenario = "resume" if resume else "rate"
        accounts = [(USER, PASSWORD)]
        for protocol in ("pop3", "imap"):
            name = f"{scenario}_{protocol}s"
            for server in ALL_SERVERS:
                self.load(server, protocol, self.args.warmup, accounts, resume)  # warm-up
            for run in range(self.args.runs):
                for server in ALL_SERVERS:
                    log(f"{name} run {run + 1}: {server}")
                    self.add(name, server, self.load(server, protocol, self.args.seconds, accounts, resume))

    def bcrypt(self) -> None:
        accounts = sorted(self.stack.accounts.items())
        for server in PROXIES:
            log(f"bcrypt: first logins of {len(accounts)} cost-12 users through {server}")
            pid, auth_pid = self.stack.pid(server), self.stack.auth.pid
            before, before_auth = cpu_seconds(pid), cpu_seconds(auth_pid, precise=False)
            outcome = clients.cold_logins("pop3", self.port(server, "pop3"), accounts, self.args.clients)
            time.sleep(0.3)
            cpu = cpu_seconds(pid) - before
            if server == "nginx":  # its AAA is the responder's work
                cpu += cpu_seconds(auth_pid, precise=False) - before_auth
            n = max(outcome.sessions, 1)
            self.add(
                "bcrypt_cold",
                server,
                {
                    "sessions": outcome.sessions,
                    "errors": outcome.errors,
                    "cpu_plus_auth_ms_per_session": cpu * 1000 / n,
                    "seconds": outcome.elapsed,
                },
            )
            if outcome.errors:
                log(f"bcrypt cold {server}: {outcome.errors} errors, first {outcome.first_error}")
        for run in range(self.args.runs):
            for server in PROXIES:
                log(f"bcrypt_pop3s run {run + 1}: {server}")
                self.add("bcrypt_pop3s", server, self.load(server, "pop3", self.args.seconds, accounts))

    # -- workers -------------------------------------------------------------------------

    def workers(self) -> None:
        """The session rate of mailgw with workers = 1 and workers = 2, side by side on
        their own ports, unpinned: the gateways, the load clients' threads and (for the
        time of the scenario) Dovecot may run on every CPU.  Otherwise the rate
        scenario's configuration (users, Dovecot, 32 POP3S/IMAPS clients)."""
        cpus = self.all_cpus
        dovecot = self.stack.pid("dovecot")
        dovecot_mask = os.sched_getaffinity(dovecot)
        targets: list[Target] = []
        try:
            set_tree_affinity(dovecot, set(cpus))
            for count in WORKER_COUNTS:
                name = f"workers{count}"
                process, ports, admin = start_mailgw(
                    self.stack.base / f"mailgw-{name}",
                    self.stack.dovecot,
                    self.stack.cert,
                    self.stack.key,
                    self.args.idle,
                    self.stack.hashes,
                    self.stack.clamd,
                    cpus=cpus,
                    workers=count,
                    name=f"mailgw workers={count}",
                    started=self.stack.started,
                )
                target = Target(name, process, ports, admin, client_cpus=cpus)
                targets.append(target)
                target.worker_pids = wait_workers(target, count)
                log(f"{name}: supervisor {target.pid}, workers {target.worker_pids or '(serves itself)'}")
            self.notes["workers_scenario"] = (
                "two mailgw side by side (workers = 1, workers = 2; otherwise the rate scenario's configuration), "
                + "; ".join(
                    f"{t.name} may run on CPUs {allowed_cpus(t.pid)}"
                    + (
                        f" (its workers on {', '.join(allowed_cpus(w) for w in t.worker_pids)})"
                        if t.worker_pids
                        else ""
                    )
                    for t in targets
                )
                + f"; the load clients' threads on CPUs {','.join(map(str, cpus))}; Dovecot's tree on CPUs "
                f"{allowed_cpus(dovecot)} during the scenario (before and after: "
                f"{','.join(map(str, sorted(dovecot_mask)))}); the bench process on CPU "
                f"{','.join(map(str, sorted(os.sched_getaffinity(0))))}; the stack's nginx and mailgw idle"
            )
            log(f"workers: {self.notes['workers_scenario']}")
            accounts = [(USER, PASSWORD)]
            for protocol in ("pop3", "imap"):
                name = f"workers_{protocol}s"
                for target in targets:
                    self.load(target.name, protocol, self.args.warmup, accounts, target=target)  # warm-up
                for run in range(self.args.runs):
                    for target in targets:
                        log(f"{name} run {run + 1}: mailgw {target.name}")
                        self.add(
                            name,
                            target.name,
                            self.load(target.name, protocol, self.args.seconds, accounts, target=target),
                        )
            if self.args.profile is not None:
                self.profile_workers(targets[-1], self.args.profile)
            for target in targets:  # a worker restarted during the runs would make the CPU figures wrong
                if target.worker_pids:
                    now = [int(w["pid"]) for w in mailgw_status(target.admin_socket).get("workers") or []]
                    if now != target.worker_pids:
                        log(f"warning: {target.name}: workers were {target.worker_pids}, now {now}")
                        self.notes[f"{target.name}_restarted"] = f"workers {target.worker_pids} -> {now}"
        finally:
            for target in targets:
                target.process.stop()
            set_tree_affinity(dovecot, dovecot_mask)

    def profile_workers(self, target: Target, folder: Path) -> None:
        """py-spy on the supervisor and each worker of ``target`` under the POP3S load of
        the workers scenario (not counted in the results)."""
        from bench import profile

        folder.mkdir(parents=True, exist_ok=True)
        pids = {"supervisor": target.pid} | {f"worker{i + 1}": pid for i, pid in enumerate(target.worker_pids)}
        spies = {}
        for role, pid in pids.items():
            stacks = folder / f"{target.name}-{role}-pop3s.txt"
            log(f"profile: py-spy on {target.name} {role} ({pid}) -> {stacks}")
            spies[role] = (stacks, profile.attach(pid, self.args.seconds + 1, stacks))
        time.sleep(0.5)
        outcome = self.load(target.name, "pop3", self.args.seconds, [(USER, PASSWORD)], target=target)
        for role, (stacks, spy) in spies.items():
            spy.wait(timeout=60)
            summary = profile.summarize(stacks) if stacks.exists() else "py-spy wrote nothing"
            header = (
                f"mailgw {target.name} {role} under workers-pop3s: {outcome['cpu_ms_per_session']:.3f} ms "
                f"gateway CPU/session while sampled ({outcome.get('supervisor_cpu_ms_per_session', 0):.3f} in the "
                "supervisor)"
            )
            (folder / f"{target.name}-{role}-pop3s.summary.txt").write_text(header + "\n" + summary + "\n")

    # -- transfer ------------------------------------------------------------------------

    def transfer(self) -> None:
        for protocol, name in (("pop3", "retr"), ("imap", "fetch")):
            for server in ALL_SERVERS:
                clients.transfer(protocol, self.port(server, protocol), (USER, PASSWORD), 1)  # warm-up
            for run in range(self.args.runs):
                for server in ALL_SERVERS:
                    log(f"{name} run {run + 1}: {server}, {self.args.retr} x 10 MiB")
                    pid = self.stack.pid(server)
                    before = cpu_seconds(pid)
                    started = time.monotonic()
                    received = clients.transfer(protocol, self.port(server, protocol), (USER, PASSWORD), self.args.retr)
                    elapsed = time.monotonic() - started
                    time.sleep(0.3)
                    mib = received / (1024 * 1024)
                    self.add(
                        name,
                        server,
                        {
                            "cpu_ms_per_mib": (cpu_seconds(pid) - before) * 1000 / mib,
                            "mib_per_second": mib / elapsed,
                            "mib": mib,
                        },
                    )

    def inspected(self) -> None:
        clamd = self.stack.clamd
        if clamd is None or clamd.pid is None:
            return
        pid = self.stack.pid("mailgw")
        port = self.port("mailgw", "pop3")
        clients.transfer("pop3", port, (INSPECTED_USER, PASSWORD), 1)  # warm-up
        for run in range(self.args.runs):
            log(f"inspected run {run + 1}: {self.args.retr} x RETR through clamd")
            before, before_clamd = cpu_seconds(pid), cpu_seconds(clamd.pid)
            started = time.monotonic()
            received = clients.transfer("pop3", port, (INSPECTED_USER, PASSWORD), self.args.retr)
            elapsed = time.monotonic() - started
            time.sleep(0.3)
            mib = received / (1024 * 1024)
            self.add(
                "inspected",
                "mailgw",
                {
                    "cpu_ms_per_mib": (cpu_seconds(pid) - before) * 1000 / mib,
                    "clamd_cpu_ms_per_mib": (cpu_seconds(clamd.pid) - before_clamd) * 1000 / mib,
                    "mib_per_second": mib / elapsed,
                },
            )

    # -- profile -------------------------------------------------------------------------

    def profile(self, folder: Path) -> None:
        """py-spy on mailgw under the rate scenarios (not counted in the results)."""
        from bench import profile

        folder.mkdir(parents=True, exist_ok=True)
        loads: list[tuple[str, str, list[clients.Account], bool]] = [
            ("rate-pop3s", "pop3", [(USER, PASSWORD)], False),
            ("rate-imaps", "imap", [(USER, PASSWORD)], False),
            ("resume-pop3s", "pop3", [(USER, PASSWORD)], True),
        ]
        if self.stack.accounts:
            loads.append(("bcrypt-pop3s", "pop3", sorted(self.stack.accounts.items()), False))
        for name, protocol, accounts, resume in loads:
            stacks = folder / f"mailgw-{name}.txt"
            log(f"profile: py-spy on mailgw under {name} -> {stacks}")
            spy = profile.attach(self.stack.pid("mailgw"), self.args.seconds + 1, stacks)
            time.sleep(0.5)
            outcome = self.load("mailgw", protocol, self.args.seconds, accounts, resume)
            spy.wait(timeout=60)
            summary = profile.summarize(stacks) if stacks.exists() else "py-spy wrote nothing"
            header = f"mailgw under {name}: {outcome['cpu_ms_per_session']:.3f} ms CPU/session while sampled"
            (folder / f"mailgw-{name}.summary.txt").write_text(header + "\n" + summary + "\n")

    # -- idle ----------------------------------------------------------------------------

    def idle(self) -> None:
        context = multiprocessing.get_context("spawn")
        # One TLS connection object of each proxy's OpenSSL (pyOpenSSL's, the system's
        # for nginx): part of every idle session that neither proxy's code decides.
        # mailgw's implicit-TLS listeners use the system's OpenSSL (mailgw.systls), as
        # nginx does; pyOpenSSL's only when that library cannot be reached.
        system = sslnew.measure("system")
        openssl = {"mailgw": system, "nginx": system}
        for server, figure in openssl.items():
            log(f"idle {server}: {figure['version']}, SSL_new {figure['kib']:.1f} KiB")
        for run in range(self.args.runs):
            for server in PROXIES:
                log(f"idle run {run + 1}: {server}, fresh process, {self.args.idle} IMAPS sessions")
                self.stack.restart(server)
                port = self.port(server, "imap")
                for _ in range(5):  # the code paths, once
                    sock = clients.tls_connect(port, clients.client_context())
                    clients.imap_login(sock, (USER, PASSWORD))
                    sock.close()
                time.sleep(1.0)
                pid = self.stack.pid(server)
                before = pss_kib(pid)
                processes, total = self.args.client_processes, self.args.idle
                share = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
                holders = []
                for count in share:
                    parent, child = context.Pipe()
                    process = context.Process(target=clients.hold_idle, args=(child, port, (USER, PASSWORD), count))
                    process.start()
                    holders.append((process, parent))
                opened = errors = 0
                for _, parent in holders:
                    status = parent.recv()
                    opened += status["opened"]
                    errors += status["errors"]
                    if status["first_error"]:
                        log(f"idle {server}: {status['errors']} failed, first: {status['first_error']}")
                log(f"idle {server}: {opened} sessions open")
                time.sleep(1.5)
                after = pss_kib(pid)
                for _, parent in holders:
                    parent.send("close")
                for process, parent in holders:
                    parent.recv()
                    process.join(timeout=30)
                self.add(
                    "idle",
                    server,
                    {
                        "sessions": opened,
                        "errors": errors,
                        "pss_kib_baseline": before,
                        "pss_kib_loaded": after,
                        "pss_kib_per_session": (after - before) / max(opened, 1),
                        "ssl_new_kib": openssl[server]["kib"],
                        "openssl": openssl[server]["version"],
                    },
                )
                time.sleep(2.0)  # let the proxy and Dovecot close them


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario; figures are medians (default 3)")
    parser.add_argument("--quick", action="store_true", help="a short smoke configuration (1 run, small counts)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each rate measurement (default 5)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up before the rate runs (default 3 s)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--client-processes", type=int, default=4, help="load generator processes (default 4)")
    parser.add_argument("--users", type=int, default=users.COUNT, help="cost-12 users of the bcrypt scenario")
    parser.add_argument("--sessions", type=int, default=None, help=argparse.SUPPRESS)  # the old sequential figure
    parser.add_argument("--retr", type=int, default=5, help="10 MiB transfers per RETR/FETCH run (default 5)")
    parser.add_argument("--idle", type=int, default=5000, help="idle IMAPS sessions (default 5000)")
    parser.add_argument("--messages", type=int, default=2000, help="messages of the poller mailbox (default 2000)")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="also py-spy mailgw under the load (stacks in DIR)"
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH", help="write the results as JSON (no PATH: stdout)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.warmup = 1, 1.5, 0.5
        args.retr, args.idle, args.messages, args.users = 1, min(args.idle, 300), min(args.messages, 200), 20
    args.only = [s for s in args.only.split(",") if s]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if min(args.runs, args.retr, args.idle, args.clients, args.client_processes, args.users, args.messages) < 1:
        parser.error("counts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    nginx_binary, mail_module = ensure_nginx()
    raise_nofile(2 * args.idle + 4096)

    cpus = sorted(os.sched_getaffinity(0))
    pin = shutil.which("taskset") is not None and len(cpus) >= 2
    proxy_cpu = cpus[0] if pin else None
    client_cpu = cpus[1] if pin else None
    if pin:
        os.sched_setaffinity(0, {cpus[1]})
    else:
        log("not pinning CPUs (taskset missing or a single CPU)")

    accounts = users.accounts(args.users) if "bcrypt" in args.only else {}
    hashes = users.hashes(args.users) if accounts else {}
    base = Path(tempfile.mkdtemp(prefix="mailgw-bench-"))
    base.chmod(0o755)  # Dovecot's mail processes (running as root) must reach their folder
    stack: Stack | None = None
    conditions: dict[str, Any] = {}
    bench: Bench | None = None
    started_at = time.time()
    pool = multiprocessing.get_context("spawn").Pool(args.client_processes)
    try:
        stack = start_stack(
            base,
            nginx_binary,
            mail_module,
            proxy_cpu=proxy_cpu,
            client_cpu=client_cpu,
            idle=args.idle,
            accounts=accounts,
            hashes=hashes,
            with_clamd="inspected" in args.only,
        )
        conditions = {
            "cpus": f"proxies (nginx, mailgw) on CPU {proxy_cpu}, load generator + auth_http on CPU {client_cpu}, "
            "Dovecot unpinned"
            if pin
            else "not pinned",
            "tls": {s: clients.tls_description(stack.ports[s].pop3s) for s in ALL_SERVERS},
            "workers": "nginx worker_processes 1; mailgw workers = 1; Dovecot 1 login process per service "
            "(service_count 0), pop3 processes reused (service_count 100), imap up to 50 sessions per process",
            "load": f"{args.clients} concurrent clients in {args.client_processes} processes (threads), "
            f"{args.seconds:g} s per measurement, {args.runs} runs, medians",
            "transfer": f"{args.retr} x {BIG_MESSAGE_SIZE} bytes per run, one session",
            "idle": f"{args.idle} idle authenticated IMAPS sessions, proxy restarted before each run",
            "bcrypt": f"{args.users} users, bcrypt cost {users.COST}, cycled",
            "machine": f"{os.cpu_count()} CPUs, {os.uname().release}",
            "load_average_at_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        }
        log(f"conditions: {conditions}")
        bench = Bench(args, stack, pool, all_cpus=cpus)
        for scenario in args.only:
            if args.json and args.json != "-" and bench.results:  # what is done so far, in case of a crash
                report.write_json(args.json + ".partial", {"conditions": conditions, "runs": bench.results})
            if scenario == "rate":
                bench.rate(resume=False)
            elif scenario == "resume":
                bench.rate(resume=True)
            elif scenario == "bcrypt":
                bench.bcrypt()
            elif scenario == "transfer":
                bench.transfer()
            elif scenario == "inspected":
                bench.inspected()
            elif scenario == "idle":
                bench.idle()
            elif scenario == "poller":
                from bench import poller

                poller.run(bench, base, proxy_cpu, args.profile)
            elif scenario == "workers":
                bench.workers()
            conditions.update(bench.notes)
        if args.profile is not None:
            bench.profile(args.profile)
    finally:
        pool.terminate()
        pool.join()
        if stack is not None:
            stack.stop()
        shutil.rmtree(base, ignore_errors=True)

    conditions["load_average_at_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = bench.results if bench else {}
    summary = report.medians(results)
    print(report.table(summary, conditions))
    if args.json:
        report.write_json(
            args.json,
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
                "duration_seconds": time.time() - started_at,
                "parameters": {k: v for k, v in vars(args).items()},
                "conditions": conditions,
                "medians": summary,
                "ratio_mailgw_over_nginx": report.ratios(summary),
                "ratio_workers2_over_workers1": report.worker_ratios(summary),
                "runs": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
