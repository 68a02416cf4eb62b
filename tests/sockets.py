"""The gateway's side of its TCP connections, read from the kernel's socket table.

The integration tests run the gateway in trial's process, so "the gateway still holds
this connection" means: a socket of this process (its inode is one of
``/proc/self/fd``'s) whose local and remote ports are those of the gateway's end.  A
client of the same process has the ports the other way round, so it is never mistaken
for the gateway.  An orphaned socket (FIN_WAIT2, TIME_WAIT: no file descriptor any
more) is not held.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: /proc/net/tcp state codes
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


@dataclass(frozen=True)
class HeldSocket:
    """One TCP socket this process holds."""

    local_port: int
    remote_port: int
    state: str
    #: bytes queued to send / received and not read
    send_queue: int
    receive_queue: int


def _own_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def held_sockets(*, local_port: int | None = None, remote_port: int | None = None) -> list[HeldSocket]:
    """The TCP sockets of this process (not listening ones) matching the ports."""
    inodes = _own_inodes()
    found = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            queues, inode = fields[4], fields[9]
            if inode not in inodes or state == "0A":
                continue
            lport = int(local.rsplit(":", 1)[1], 16)
            rport = int(remote.rsplit(":", 1)[1], 16)
            if local_port is not None and lport != local_port:
                continue
            if remote_port is not None and rport != remote_port:
                continue
            tx, rx = (int(q, 16) for q in queues.split(":"))
            found.append(HeldSocket(lport, rport, TCP_STATES.get(state, state), tx, rx))
    return found


def rss_kib() -> int:
    """This process's resident set size in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used."""
    times = os.times()
    return times.user + times.system
