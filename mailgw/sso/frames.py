"""Captured link-layer frames to TCP segments, and back.

L{parse_frame} reads one frame of a supported link type (L{DLT_EN10MB} Ethernet with
up to L{MAX_VLAN_TAGS} 802.1Q / 802.1ad tags, L{DLT_LINUX_SLL} and L{DLT_LINUX_SLL2}
"cooked" captures, L{DLT_RAW} / L{DLT_IPV4} / L{DLT_IPV6} bare IP, L{DLT_NULL} BSD
loopback) carrying IPv4 or IPv6 and returns the TCP segment as a
L{Packet<mailgw.sso.reassembly.Packet>}, or C{None} when the frame carries something else
(ARP, UDP, ICMP, ...).  It is pure and never raises anything but L{FrameError} (with a
L{FrameError.reason}) for a frame it cannot use: truncated or malformed headers
(L{TRUNCATED}, L{MALFORMED}), IP fragments (L{FRAGMENT}: reassembling IP is not worth
it for POP3 logins, and fragmented TCP is rare), an unknown link type (L{LINKTYPE}).
Checksums are not verified: captures on the sending host carry offloaded, unfinished
ones.

L{build_frame} is the inverse for tests and tools: an Ethernet frame (optionally
VLAN-tagged) with correct IPv4 and TCP checksums.
"""

from __future__ import annotations

import ipaddress
import struct

from mailgw.sso.reassembly import IPAddress, Packet
from mailgw.wire.errors import ProtocolError

__all__ = [
    "DLT_EN10MB",
    "DLT_IPV4",
    "DLT_IPV6",
    "DLT_LINUX_SLL",
    "DLT_LINUX_SLL2",
    "DLT_NULL",
    "DLT_RAW",
    "FRAGMENT",
    "LINKTYPE",
    "MALFORMED",
    "MAX_VLAN_TAGS",
    "SUPPORTED_LINKTYPES",
    "TRUNCATED",
    "FrameError",
    "build_frame",
    "parse_frame",
]

#: Link types (the LINKTYPE_ values of pcap files, https://www.tcpdump.org/linktypes.html).
DLT_NULL = 0
DLT_EN10MB = 1
DLT_RAW = 101
DLT_LINUX_SLL = 113
DLT_IPV4 = 228
DLT_IPV6 = 229
DLT_LINUX_SLL2 = 276
SUPPORTED_LINKTYPES = frozenset({DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2})

#: L{FrameError} reasons.
TRUNCATED = "truncated"
MALFORMED = "malformed"
FRAGMENT = "fragment"
LINKTYPE = "linktype"

#: The most VLAN tags read in front of the IP header (802.1ad outer plus 802.1Q inner).
MAX_VLAN_TAGS = 2

_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = frozenset({0x8100, 0x88A8, 0x9100})
_PROTOCOL_TCP = 6
# IPv6 extension headers that may precede TCP (hop-by-hop, routing, destination options);
# the fragment header (44) makes the packet a fragment.
_IPV6_EXTENSIONS = frozenset({0, 43, 60})
_IPV6_FRAGMENT = 44
_MAX_IPV6_EXTENSIONS = 8
# BSD loopback (DLT_NULL) address families meaning IPv6 on various systems.
_AF_INET = 2
_AF_INET6 = frozenset({10, 24, 28, 30})


class FrameError(ProtocolError):
    """A captured frame that cannot be used; C{reason} says why (see the module docstring)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"unusable frame: {reason}")
        self.reason = reason


def parse_frame(frame: bytes, linktype: int = DLT_EN10MB) -> Packet | None:
    """The TCP segment in C{frame}, or C{None} if it carries no TCP over IP.

    @raise FrameError: see the module docstring.
    """
    view = memoryview(frame)
    if linktype == DLT_EN10MB:
        return _ethernet(view)
    if linktype in (DLT_RAW, DLT_IPV4, DLT_IPV6):
        return _ip(view)
    if linktype == DLT_LINUX_SLL:
        _need(view, 16)
        return _ethertype(view, 16, _u16(view, 14))
    if linktype == DLT_LINUX_SLL2:
        _need(view, 20)
        return _ethertype(view, 20, _u16(view, 0))
    if linktype == DLT_NULL:
        _need(view, 4)
        family = struct.unpack_from("=I", view, 0)[0]
        if family not in (_AF_INET, *_AF_INET6):
            family = struct.unpack_from(">I", view, 0)[0]  # written on a host of the other order
        if family == _AF_INET or family in _AF_INET6:
            return _ip(view[4:])
        return None
    raise FrameError(LINKTYPE)


def _need(view: memoryview, length: int) -> None:
    if len(view) < length:
        raise FrameError(TRUNCATED)


def _u16(view: memoryview, offset: int) -> int:
    value: int = struct.unpack_from(">H", view, offset)[0]
    return value


def _ethernet(view: memoryview) -> Packet | None:
    _need(view, 14)
    offset = 12
    ethertype = _u16(view, offset)
    for _ in range(MAX_VLAN_TAGS):
        if ethertype not in _ETHERTYPE_VLAN:
            break
        offset += 4
        _need(view, offset + 2)
        ethertype = _u16(view, offset)
    return _ethertype(view, offset + 2, ethertype)


def _ethertype(view: memoryview, offset: int, ethertype: int) -> Packet | None:
    if ethertype == _ETHERTYPE_IPV4:
        return _ipv4(view[offset:])
    if ethertype == _ETHERTYPE_IPV6:
        return _ipv6(view[offset:])
    return None


def _ip(view: memoryview) -> Packet | None:
    _need(view, 1)
    version = view[0] >> 4
    if version == 4:
        return _ipv4(view)
    if version == 6:
        return _ipv6(view)
    raise FrameError(MALFORMED)


def _ipv4(view: memoryview) -> Packet | None:
    _need(view, 20)
    if view[0] >> 4 != 4:
        raise FrameError(MALFORMED)
    header = (view[0] & 0x0F) * 4
    total, fragment, protocol = struct.unpack_from(">2xH2xH1xB", view, 0)
    if header < 20 or total < header:
        raise FrameError(MALFORMED)
    _need(view, total)
    if fragment & 0x3FFF:  # more fragments, or a fragment offset
        raise FrameError(FRAGMENT)
    if protocol != _PROTOCOL_TCP:
        return None
    src = ipaddress.IPv4Address(bytes(view[12:16]))
    dst = ipaddress.IPv4Address(bytes(view[16:20]))
    # Ethernet pads short frames: the IP total length says where the packet ends.
    return _tcp(view[header:total], src, dst)


def _ipv6(view: memoryview) -> Packet | None:
    _need(view, 40)
    if view[0] >> 4 != 6:
        raise FrameError(MALFORMED)
    length, next_header = struct.unpack_from(">4xHB", view, 0)
    if length == 0:
        raise FrameError(MALFORMED)  # a jumbogram, or nothing at all
    _need(view, 40 + length)
    src = ipaddress.IPv6Address(bytes(view[8:24]))
    dst = ipaddress.IPv6Address(bytes(view[24:40]))
    body = view[40 : 40 + length]
    for _ in range(_MAX_IPV6_EXTENSIONS):
        if next_header == _IPV6_FRAGMENT:
            raise FrameError(FRAGMENT)
        if next_header not in _IPV6_EXTENSIONS:
            break
        _need(body, 8)
        next_header, units = body[0], body[1]
        extension = (units + 1) * 8
        _need(body, extension)
        body = body[extension:]
    if next_header != _PROTOCOL_TCP:
        return None
    return _tcp(body, src, dst)


def _tcp(view: memoryview, src: IPAddress, dst: IPAddress) -> Packet:
    _need(view, 20)
    sport, dport, seq, ack, offset, flags = struct.unpack_from(">HHIIBB", view, 0)
    header = (offset >> 4) * 4
    if header < 20:
        raise FrameError(MALFORMED)
    _need(view, header)
    return Packet(src, dst, sport, dport, seq, flags, bytes(view[header:]), ack)


# -- building ----------------------------------------------------------------------------


def build_frame(packet: Packet, *, vlan: int | None = None, window: int = 65535) -> bytes:
    """An Ethernet II frame carrying C{packet} over IPv4 or IPv6 (by its addresses), with
    an 802.1Q tag of VLAN C{vlan} if given, and correct IPv4 and TCP checksums.

    @raise ValueError: the addresses are of different families.
    """
    if packet.src.version != packet.dst.version:
        raise ValueError("source and destination must both be IPv4 or IPv6")
    tcp = bytearray(
        struct.pack(
            ">HHIIBBHHH",
            packet.sport,
            packet.dport,
            packet.seq % (1 << 32),
            packet.ack % (1 << 32),
            5 << 4,
            packet.flags & 0xFF,
            window,
            0,
            0,
        )
        + packet.payload
    )
    src, dst = packet.src.packed, packet.dst.packed
    if packet.src.version == 4:
        pseudo = src + dst + struct.pack(">BBH", 0, _PROTOCOL_TCP, len(tcp))
    else:
        pseudo = src + dst + struct.pack(">IxxxB", len(tcp), _PROTOCOL_TCP)
    struct.pack_into(">H", tcp, 16, _checksum(pseudo + tcp))
    if packet.src.version == 4:
        ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, _PROTOCOL_TCP, 0, src, dst))
        struct.pack_into(">H", ip, 10, _checksum(bytes(ip)))
        ethertype = _ETHERTYPE_IPV4
    else:
        ip = bytearray(struct.pack(">IHBB16s16s", 6 << 28, len(tcp), _PROTOCOL_TCP, 64, src, dst))
        ethertype = _ETHERTYPE_IPV6
    link = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    if vlan is not None:
        link += struct.pack(">HH", 0x8100, vlan & 0x0FFF)
    return link + struct.pack(">H", ethertype) + bytes(ip) + bytes(tcp)


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)
