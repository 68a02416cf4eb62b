"""The MAC addresses of SSO clients [7]: the kernel's neighbour (ARP) table.

C{sso.pop3.policy} may name MAC addresses; a client's MAC comes from the neighbour
table of the interface it is seen on (the monitor interface in monitor mode).  The
table is read from C{/proc/net/arp} in a thread every C{refresh} seconds (never on the
reactor thread), and looked up in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

#: the ATF_COM flag of /proc/net/arp: the entry is complete (the MAC is known)
_COMPLETE = 0x2


def parse_arp(text: str, interface: str = "") -> dict[str, str]:
    """IP address → MAC address (lower case, colons) from the text of
    C{/proc/net/arp}, only complete entries, only of C{interface} when given."""
    found: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6:
            continue
        ip, _hw_type, flags, mac, _mask, device = fields[:6]
        try:
            complete = int(flags, 16) & _COMPLETE
        except ValueError:
            continue
        if not complete or mac == "00:00:00:00:00:00" or (interface and device != interface):
            continue
        found[ip] = mac.lower()
    return found


class NeighbourTable(TimerService):
    """The neighbour table, refreshed in a thread.

    @param reactor: for the timer and the thread.
    @param interface: only this interface's entries ("" = all).
    @param path: the file to read (C{/proc/net/arp}; tests pass another).
    @param refresh: seconds between reads.
    """

    log = Logger()

    def __init__(self, reactor: Any, interface: str = "", *, path: Path = Path("/proc/net/arp"), refresh: float = 10.0):
        super().__init__(refresh, self.refresh)
        self.clock = reactor
        self._interface = interface
        self._path = path
        self._macs: dict[str, str] = {}
        self._reading = False

    def mac_of(self, ip: str) -> str | None:
        """The MAC address last seen for C{ip}, if any."""
        return self._macs.get(ip)

    def refresh(self) -> defer.Deferred[None]:
        """Read the table again (in a thread)."""
        if self._reading:
            return defer.succeed(None)
        self._reading = True
        d = deferToThread(self._path.read_text, errors="replace")

        def read(text: str) -> None:
            self._macs = parse_arp(text, self._interface)

        def failed(failure: Any) -> None:
            self.log.warn("Cannot read the neighbour table {path}: {reason}", path=str(self._path),
                          reason=str(failure.value))

        def done(result: object) -> None:
            self._reading = False

        return d.addCallbacks(read, failed).addBoth(done)
