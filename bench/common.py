"""What every part of the benchmark shares: constants, logging, process accounting
(CPU and PSS of a process tree from /proc), the processes it starts, CPU pinning."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.servers.base import port_accepts  # noqa: E402

HOST = "127.0.0.1"
USER = "bench"
PASSWORD = "bench-password"  # noqa: S105 - a test account of the private Dovecot
#: a user whose group policy names an inspection profile (clamd scanning) [4.9]
INSPECTED_USER = "inspected"
#: the remote mailbox of the poller scenario
POLLER_USER = "remote"
POLLER_PASSWORD = "remote-secret-Pw"  # noqa: S105 - a test account of the private Dovecot
TICKS = os.sysconf("SC_CLK_TCK")
IO_TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


def _task_runtime(pid: int) -> float:
    """Seconds on CPU of the live threads of pid (schedstat: nanoseconds)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def cpu_seconds(root: int, *, precise: bool = True) -> float:
    """CPU seconds of root and its descendants, plus what their reaped children used
    (cutime+cstime, clock ticks: Dovecot's short-lived mail processes).

    ``precise``: the live threads' run time from schedstat (nanoseconds), for
    processes whose threads live as long as they do (nginx, mailgw, Dovecot); else
    utime+stime (clock ticks, but counting threads that have exited: the auth_http
    responder's thread per request)."""
    total = 0.0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # fields[11..14] = utime, stime, cutime, cstime (stat fields 14-17)
        ticks = sum(int(f) for f in fields[11:13]) / TICKS
        # Both are lower bounds of the truth: ticks are coarse, schedstat misses
        # threads that have exited.
        own = max(_task_runtime(pid), ticks) if precise else ticks
        total += own + sum(int(f) for f in fields[13:15]) / TICKS
    return total


def pss_kib(root: int) -> int:
    """Summed Pss of root and its descendants (smaps_rollup), KiB."""
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


def machine_busy_seconds() -> tuple[float, float, float]:
    """(busy, total, steal) CPU seconds of the whole machine so far, all CPUs
    (/proc/stat; steal: time the hypervisor gave to others, counted in busy)."""
    with open("/proc/stat") as handle:
        fields = [int(f) for f in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    steal = fields[7] if len(fields) > 7 else 0
    return (total - idle) / TICKS, total / TICKS, steal / TICKS


def allowed_cpus(pid: int) -> str:
    """The CPUs pid may run on (``Cpus_allowed_list``), or "?"."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def set_tree_affinity(root: int, cpus: set[int]) -> int:
    """Let root, its descendants and all their threads run on ``cpus`` (processes they
    fork later inherit it); returns how many threads were changed."""
    changed = 0
    for pid in process_tree(root):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(int(task), cpus)
                changed += 1
            except OSError:
                continue
    return changed


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(max(needed, soft), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        log(f"warning: RLIMIT_NOFILE is {soft}, {needed} wanted")


# -- processes ----------------------------------------------------------------------------


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    if cpu is None:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


class Managed:
    """A process this script started (pid kept); stopped by pid, then its leftovers.

    ``restart`` stops it and starts the same command again: a fresh process."""

    def __init__(self, name: str, argv: list[str], cwd: Path, output: Path, ports: tuple[int, ...] = ()) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.output = output
        self.ports = ports
        self._start()

    def _start(self) -> None:
        self._log = open(self.output, "ab")
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT)  # noqa: S603
        self.pid = self.process.pid
        for port in self.ports:
            self.wait_port(port)

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

    def restart(self) -> None:
        self.stop()
        time.sleep(0.2)
        self._start()

    def stop(self) -> None:
        if self.process.poll() is None:
            children = process_tree(self.pid)[1:]
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
            for pid in children:  # workers of nginx, if any outlived the master
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()
