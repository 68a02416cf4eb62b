"""Live capture for the SSO monitor: an C{AF_PACKET} socket read by the reactor.

Why C{AF_PACKET} and not libpcap: it is in Python's standard library on Linux (the only
platform the daemon targets), so there is no binding to depend on and keep maintained
(pcapy and pypcap have been unmaintained for years; scapy is large and pulls libpcap in
through ctypes).  What libpcap would add (a filter compiler, ring buffers) the monitor
does not need: its filter is simple enough to build by hand, and POP3 logins are a
trickle.

How it works:

  - L{open_packet_socket} opens a C{SOCK_RAW} packet socket for C{ETH_P_ALL}, first
    bound with protocol 0 (it receives nothing yet), attaches a classic BPF program
    (C{SO_ATTACH_FILTER}) that lets through only TCP segments from or to the monitored
    ports (L{port_filter}), then rebinds for C{ETH_P_ALL}: no unfiltered frame ever
    reaches the queue.  Optionally the interface is put in promiscuous mode
    (C{PACKET_ADD_MEMBERSHIP}, a mirror port receives frames for other MAC addresses);
    the kernel undoes it when the socket closes.  The socket is non-blocking.
  - L{PacketReader} is an L{IReadDescriptor} that the reactor calls when frames are
    queued; it reads at most C{batch} frames per call (other work gets its turn) and
    hands each to a callback with its link type.  On a loopback interface the kernel
    shows every packet twice (sent and received): the sent copy is skipped.
  - L{CaptureService} opens the socket and registers the reader on C{startService} and
    closes it on C{stopService}.

Nothing is ever written to the socket: the monitor cannot inject traffic.  Addresses
are filtered in Python (the reassembler's list of servers), ports in the kernel.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable, Iterable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.sso.frames import DLT_EN10MB, DLT_RAW

__all__ = [
    "MAX_FILTER_PORTS",
    "SNAPLEN",
    "CaptureError",
    "CaptureService",
    "Instruction",
    "PacketReader",
    "attach_filter",
    "linktype_for_hatype",
    "open_packet_socket",
    "port_filter",
]

#: Longest frame kept (the BPF program's accept length and the receive buffer).
SNAPLEN = 262144
#: The most distinct ports the BPF program compares; beyond, it lets all TCP through.
MAX_FILTER_PORTS = 48

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_STATISTICS = 6
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
#: Devices whose frames start at the IP header (tun, PPP, IP-in-IP, ...).
_RAW_IP_HATYPES = frozenset({65534, 519, 512, 768, 776, 778})

# Classic BPF opcodes (linux/filter.h).
_LDH_ABS = 0x28
_LDB_ABS = 0x30
_LDH_IND = 0x48
_LDXB_MSH = 0xB1
_AND_K = 0x54
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06

#: One classic BPF instruction: (code, jt, jf, k).
Instruction = tuple[int, int, int, int]


class CaptureError(Exception):
    """The capture socket cannot be opened on this interface (unsupported link type)."""


def linktype_for_hatype(hatype: int) -> int | None:
    """The link type (C{DLT_*}) of frames read from a device of ARP hardware type
    C{hatype}, or C{None} when it is not supported."""
    if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        return DLT_EN10MB
    if hatype in _RAW_IP_HATYPES:
        return DLT_RAW
    return None


def port_filter(ports: Iterable[int], *, linktype: int = DLT_EN10MB, snaplen: int = SNAPLEN) -> list[Instruction]:
    """A classic BPF program accepting the TCP segments with a source or destination
    port in C{ports}, over IPv4 or IPv6 (TCP right after the fixed IPv6 header), and
    IP fragments carrying TCP and in-line VLAN-tagged Ethernet frames (so that the
    monitor counts and parses them).  Everything else is dropped in the kernel.

    With more than L{MAX_FILTER_PORTS} ports the comparisons are left out (all TCP
    passes: 8-bit jump offsets cannot reach past a long list).

    @param linktype: L{DLT_EN10MB} (14-byte Ethernet header) or L{DLT_RAW}.
    @raise ValueError: another link type, or a port outside 0-65535.
    """
    wanted = sorted(set(ports))
    if any(not 0 <= port <= 0xFFFF for port in wanted):
        raise ValueError("ports are 0-65535")
    if len(wanted) > MAX_FILTER_PORTS:
        wanted = []
        all_tcp = True
    else:
        all_tcp = False
    # Assembled with symbolic jump targets, resolved at the end.
    code: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}

    def emit(op: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        code.append((op, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(code)

    def compare_ports(offset_x: bool, source: int, destination: int) -> None:
        if all_tcp:
            emit(_RET_K, snaplen)
            return
        for offset in (source, destination):
            emit(_LDH_IND if offset_x else _LDH_ABS, offset)
            for port in wanted:
                emit(_JEQ_K, port, "accept", 0)
        emit(_RET_K, 0)

    if linktype == DLT_EN10MB:
        link = 14
        emit(_LDH_ABS, 12)
        emit(_JEQ_K, 0x0800, "ipv4", 0)
        emit(_JEQ_K, 0x86DD, "ipv6", 0)
        emit(_JEQ_K, 0x8100, "accept", 0)
        emit(_JEQ_K, 0x88A8, "accept", "drop")
    elif linktype == DLT_RAW:
        link = 0
        emit(_LDB_ABS, 0)
        emit(_AND_K, 0xF0)
        emit(_JEQ_K, 0x40, "ipv4", 0)
        emit(_JEQ_K, 0x60, "ipv6", "drop")
    else:
        raise ValueError(f"no filter for link type {linktype}")
    label("ipv4")
    emit(_LDB_ABS, link + 9)  # protocol
    emit(_JEQ_K, 6, 0, "drop")
    emit(_LDH_ABS, link + 6)  # flags and fragment offset
    emit(_JSET_K, 0x3FFF, "accept", 0)
    emit(_LDXB_MSH, link)  # X = IPv4 header length
    compare_ports(True, link, link + 2)
    label("ipv6")
    emit(_LDB_ABS, link + 6)  # next header
    emit(_JEQ_K, 6, 0, "fragment6")
    compare_ports(False, link + 40, link + 42)
    label("fragment6")
    emit(_JEQ_K, 44, "accept", "drop")
    label("accept")
    emit(_RET_K, snaplen)
    label("drop")
    emit(_RET_K, 0)

    program: list[Instruction] = []
    for index, (op, jt, jf, k) in enumerate(code):
        offsets = []
        for target in (jt, jf):
            offset = labels[target] - index - 1 if isinstance(target, str) else target
            if not 0 <= offset <= 0xFF:
                raise AssertionError("BPF jump out of range")  # bounded by MAX_FILTER_PORTS
            offsets.append(offset)
        program.append((op, offsets[0], offsets[1], k))
    return program


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def attach_filter(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach a classic BPF program to C{sock} (C{SO_ATTACH_FILTER}; the kernel copies
    and verifies it, raising C{OSError} C{EINVAL} for an invalid one)."""
    instructions = (_SockFilter * len(program))(*(_SockFilter(op, jt, jf, k) for op, jt, jf, k in program))
    fprog = _SockFprog(len(program), ctypes.cast(instructions, ctypes.POINTER(_SockFilter)))
    # bytes(fprog) carries the pointer to `instructions`, alive until the call returns.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def open_packet_socket(
    interface: str,
    ports: Iterable[int],
    *,
    promiscuous: bool = False,
    receive_buffer: int = 4 << 20,
) -> tuple[socket.socket, int]:
    """Open a non-blocking, filtered packet socket on C{interface}; see the module
    docstring.  Returns the socket and the link type of its frames.

    @raise OSError: no such interface (C{ENODEV}), or no C{CAP_NET_RAW} (C{EPERM}).
    @raise CaptureError: the interface's link type is not supported.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((interface, 0))
        hatype = sock.getsockname()[3]
        linktype = linktype_for_hatype(hatype)
        if linktype is None:
            raise CaptureError(f"{interface}: unsupported link type (ARP hardware type {hatype})")
        attach_filter(sock, port_filter(ports, linktype=linktype))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if promiscuous:
            request = struct.pack("iHH8s", socket.if_nametoindex(interface), PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, request)
        sock.bind((interface, ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, linktype


@implementer(IReadDescriptor)
class PacketReader:
    """Reads frames off a non-blocking packet socket when the reactor says it is readable.

    @param sock: from L{open_packet_socket}.
    @param linktype: the link type of its frames.
    @param on_frame: called with each frame and its link type.
    @param batch: the most frames read per reactor callback.
    """

    _log = Logger()

    def __init__(
        self,
        sock: socket.socket,
        linktype: int,
        on_frame: Callable[[bytes, int], object],
        *,
        batch: int = 256,
    ) -> None:
        self._sock = sock
        self._linktype = linktype
        self._on_frame = on_frame
        self._batch = batch
        self._buffer = bytearray(SNAPLEN)
        self._view = memoryview(self._buffer)
        self.frames = 0
        self.kernel_drops = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def logPrefix(self) -> str:
        return "PacketReader"

    def doRead(self) -> None:
        for _ in range(self._batch):
            try:
                size, address = self._sock.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # ENETDOWN and the like are reported once; the socket stays usable.
                self._log.warn("capture socket error: {error}", error=str(error))
                return
            if address[2] == PACKET_OUTGOING and address[3] == ARPHRD_LOOPBACK:
                continue
            self.frames += 1
            try:
                self._on_frame(bytes(self._view[:size]), self._linktype)
            except Exception:  # noqa: BLE001 - the loop boundary: one bad frame must not stop capture
                self._log.failure("monitor failed on a captured frame")

    def connectionLost(self, reason: Failure) -> None:
        self._sock.close()

    def statistics(self) -> tuple[int, int]:
        """C{(frames read, frames the kernel dropped)} since the reader was made."""
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return self.frames, self.kernel_drops
        # Reading the statistics resets them: accumulate.
        self.kernel_drops += struct.unpack("II", raw)[1]
        return self.frames, self.kernel_drops


class CaptureService(Service):
    """Captures on C{interface} while running and feeds C{on_frame}.

    @param ports: the TCP ports let through by the kernel filter.
    @param promiscuous: put the interface in promiscuous mode (a mirror port).
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        interface: str,
        ports: Iterable[int],
        on_frame: Callable[[bytes, int], object],
        *,
        promiscuous: bool = False,
    ) -> None:
        self._reactor = reactor
        self.interface = interface
        self._ports = tuple(ports)
        self._on_frame = on_frame
        self._promiscuous = promiscuous
        self.reader: PacketReader | None = None

    def startService(self) -> None:
        sock, linktype = open_packet_socket(self.interface, self._ports, promiscuous=self._promiscuous)
        self.reader = PacketReader(sock, linktype, self._on_frame)
        self._reactor.addReader(self.reader)
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        if self.reader is not None:
            self._reactor.removeReader(self.reader)
            self.reader.connectionLost(Failure(ConnectionError("capture stopped")))
            self.reader = None
