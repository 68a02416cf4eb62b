"""Reading capture files: classic pcap and pcapng; writing classic pcap.

L{read_capture} takes a binary file object and yields its L{CaptureRecord}s, the format
told by the first four bytes:

  - classic libpcap files (https://www.tcpdump.org/manpages/pcap-savefile.5.html): a
    24-byte global header (magic C{0xa1b2c3d4} for microsecond or C{0xa1b23c4d} for
    nanosecond timestamps, read in either byte order; version; snap length; link type
    in the low 16 bits), then per packet a 16-byte header (seconds, fraction, captured
    and original lengths) and the captured bytes;
  - pcapng files (RFC draft-ietf-opsawg-pcapng): section header blocks (either byte
    order, several sections), interface description blocks (link type, C{if_tsresol}),
    enhanced, simple and obsolete packet blocks; other blocks are skipped.

Memory is bounded: a record or block longer than C{max_record} bytes raises
L{CaptureFileError} instead of being read, and the reader holds one record at a time.
A malformed or truncated file raises L{CaptureFileError} (a L{ProtocolError}) and
nothing else (C{OSError} aside).  Reading is blocking file I/O: outside the reactor
thread (see L{mailgw.sso.monitor.replay_in_thread}).

L{write_pcap} writes a classic microsecond pcap file (for tests and tools).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from mailgw.wire.errors import ProtocolError

__all__ = [
    "MAX_RECORD",
    "CaptureFileError",
    "CaptureRecord",
    "read_capture",
    "write_pcap",
]

#: Default longest record or block accepted, in bytes.
MAX_RECORD = 1 << 18

_PCAP_MICRO = 0xA1B2C3D4
_PCAP_NANO = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BYTE_ORDER = 0x1A2B3C4D
_PCAPNG_IDB = 1
_PCAPNG_OPB = 2
_PCAPNG_SPB = 3
_PCAPNG_EPB = 6
_IF_TSRESOL = 9


class CaptureFileError(ProtocolError):
    """The capture file is malformed, truncated or holds an oversized record."""


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """One captured frame.

    @ivar timestamp: seconds since the epoch.
    @ivar linktype: the link type of C{data} (a C{DLT_*} of L{mailgw.sso.frames}).
    @ivar original_length: the frame's length on the wire (C{len(data)} or more when
        the capture was cut at the snap length).
    """

    timestamp: float
    linktype: int
    data: bytes = field(repr=False)
    original_length: int


def read_capture(stream: BinaryIO, *, max_record: int = MAX_RECORD) -> Iterator[CaptureRecord]:
    """Yield the records of a pcap or pcapng file, in file order.

    An empty file yields nothing.

    @raise CaptureFileError: see the module docstring.
    """
    head = stream.read(4)
    if not head:
        return
    if len(head) < 4:
        raise CaptureFileError("truncated file header")
    if struct.unpack("<I", head)[0] == _PCAPNG_SHB:
        yield from _pcapng(stream, head, max_record)
    else:
        yield from _pcap(stream, head, max_record)


def _read(stream: BinaryIO, length: int, what: str) -> bytes:
    data = stream.read(length)
    if len(data) != length:
        raise CaptureFileError(f"truncated {what}")
    return data


def _pcap(stream: BinaryIO, magic: bytes, max_record: int) -> Iterator[CaptureRecord]:
    for order in ("<", ">"):
        value = struct.unpack(order + "I", magic)[0]
        if value in (_PCAP_MICRO, _PCAP_NANO):
            break
    else:
        raise CaptureFileError("not a pcap or pcapng file")
    scale = 1e-6 if value == _PCAP_MICRO else 1e-9
    header = _read(stream, 20, "file header")
    major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack(order + "HHiIII", header)
    if major != 2:
        raise CaptureFileError(f"unsupported pcap version {major}")
    linktype = network & 0xFFFF
    record = struct.Struct(order + "IIII")
    while True:
        header = stream.read(16)
        if not header:
            return
        if len(header) < 16:
            raise CaptureFileError("truncated record header")
        seconds, fraction, captured, original = record.unpack(header)
        if captured > max_record:
            raise CaptureFileError("record longer than the limit")
        data = _read(stream, captured, "record")
        yield CaptureRecord(seconds + fraction * scale, linktype, data, original)


@dataclass
class _Interface:
    linktype: int
    snaplen: int
    units_per_second: int


def _pcapng(stream: BinaryIO, first: bytes, max_record: int) -> Iterator[CaptureRecord]:
    order = "<"
    interfaces: list[_Interface] = []
    block_type_bytes: bytes | None = first
    while True:
        if block_type_bytes is None:
            block_type_bytes = stream.read(4)
            if not block_type_bytes:
                return
            if len(block_type_bytes) < 4:
                raise CaptureFileError("truncated block header")
        raw_type = block_type_bytes
        block_type_bytes = None
        if struct.unpack("<I", raw_type)[0] == _PCAPNG_SHB:
            # A new section: its byte-order magic says how to read it (and the length).
            length_bytes = _read(stream, 4, "section header")
            magic = _read(stream, 4, "section header")
            if struct.unpack("<I", magic)[0] == _PCAPNG_BYTE_ORDER:
                order = "<"
            elif struct.unpack(">I", magic)[0] == _PCAPNG_BYTE_ORDER:
                order = ">"
            else:
                raise CaptureFileError("bad pcapng byte-order magic")
            length = struct.unpack(order + "I", length_bytes)[0]
            body = _block_body(stream, order, length, 12, max_record)
            if len(body) < 4 or struct.unpack_from(order + "H", body, 0)[0] != 1:
                raise CaptureFileError("unsupported pcapng version")
            interfaces = []
            continue
        block_type = struct.unpack(order + "I", raw_type)[0]
        length = struct.unpack(order + "I", _read(stream, 4, "block header"))[0]
        body = _block_body(stream, order, length, 8, max_record)
        if block_type == _PCAPNG_IDB:
            interfaces.append(_interface(body, order))
        elif block_type == _PCAPNG_EPB:
            if len(body) < 20:
                raise CaptureFileError("truncated enhanced packet block")
            index, high, low, captured, original = struct.unpack_from(order + "IIIII", body, 0)
            yield _packet(interfaces, index, (high << 32) | low, body[20:], captured, original)
        elif block_type == _PCAPNG_OPB:
            if len(body) < 20:
                raise CaptureFileError("truncated packet block")
            index, _drops, high, low, captured, original = struct.unpack_from(order + "HHIIII", body, 0)
            yield _packet(interfaces, index, (high << 32) | low, body[20:], captured, original)
        elif block_type == _PCAPNG_SPB:
            if len(body) < 4 or not interfaces:
                raise CaptureFileError("bad simple packet block")
            original = struct.unpack_from(order + "I", body, 0)[0]
            captured = min(original, interfaces[0].snaplen or original, len(body) - 4)
            yield CaptureRecord(0.0, interfaces[0].linktype, bytes(body[4 : 4 + captured]), original)


def _block_body(stream: BinaryIO, order: str, length: int, consumed: int, max_record: int) -> bytes:
    """Read the rest of a block of total C{length} (C{consumed} bytes read) and check the
    trailing copy of the length; return the body between header and trailer."""
    if length % 4 or length < consumed + 4:
        raise CaptureFileError("bad pcapng block length")
    if length > max_record + 64:
        raise CaptureFileError("block longer than the limit")
    rest = _read(stream, length - consumed, "block")
    if struct.unpack_from(order + "I", rest, len(rest) - 4)[0] != length:
        raise CaptureFileError("pcapng block lengths differ")
    return rest[:-4]


def _interface(body: bytes, order: str) -> _Interface:
    if len(body) < 8:
        raise CaptureFileError("truncated interface description block")
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body, 0)
    units = 1_000_000
    offset = 8
    while offset + 4 <= len(body):
        code, size = struct.unpack_from(order + "HH", body, offset)
        offset += 4
        if code == 0:
            break
        if code == _IF_TSRESOL and size >= 1 and offset < len(body):
            resolution = body[offset]
            exponent = resolution & 0x7F
            units = 2**exponent if resolution & 0x80 else 10**exponent
        offset += (size + 3) & ~3
    return _Interface(linktype, snaplen, units)


def _packet(
    interfaces: list[_Interface], index: int, ticks: int, data: bytes, captured: int, original: int
) -> CaptureRecord:
    if index >= len(interfaces):
        raise CaptureFileError("packet of an undescribed interface")
    if captured > len(data):
        raise CaptureFileError("captured length beyond the block")
    interface = interfaces[index]
    return CaptureRecord(ticks / interface.units_per_second, interface.linktype, bytes(data[:captured]), original)


def write_pcap(stream: BinaryIO, records: Iterable[CaptureRecord], *, linktype: int, snaplen: int = 262144) -> None:
    """Write C{records} as a classic little-endian, microsecond pcap file of C{linktype}.

    @raise ValueError: a record of another link type.
    """
    stream.write(struct.pack("<IHHiIII", _PCAP_MICRO, 2, 4, 0, 0, snaplen, linktype))
    for record in records:
        if record.linktype != linktype:
            raise ValueError("a classic pcap file holds a single link type")
        seconds = int(record.timestamp)
        micros = min(round((record.timestamp - seconds) * 1e6), 999_999)
        stream.write(struct.pack("<IIII", seconds, micros, len(record.data), record.original_length))
        stream.write(record.data)
