"""Tests for L{mailgw.sso.reassembly}, L{mailgw.sso.frames} and L{mailgw.sso.pcapfile}."""

from __future__ import annotations

import ast
import io
import ipaddress
import itertools
import pathlib
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

import mailgw.sso
from mailgw.sso.frames import (
    DLT_EN10MB,
    DLT_IPV4,
    DLT_LINUX_SLL,
    DLT_LINUX_SLL2,
    DLT_NULL,
    DLT_RAW,
    FRAGMENT,
    LINKTYPE,
    SUPPORTED_LINKTYPES,
    FrameError,
    build_frame,
    parse_frame,
)
from mailgw.sso.pcapfile import CaptureFileError, CaptureRecord, read_capture, write_pcap
from mailgw.sso.reassembly import (
    ACK,
    CLOSED_EVICTED,
    CLOSED_FIN,
    CLOSED_GAP,
    CLOSED_IDLE,
    CLOSED_RESET,
    CLOSED_REUSED,
    FIN,
    PSH,
    RST,
    SYN,
    ConnectionKey,
    Direction,
    IPAddress,
    Packet,
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamOpened,
    TcpReassembler,
)
from mailgw.wire.errors import ProtocolError

CLIENT = ipaddress.ip_address("10.1.2.3")
SERVER = ipaddress.ip_address("192.0.2.10")
CLIENT6 = ipaddress.ip_address("2001:db8::3")
SERVER6 = ipaddress.ip_address("2001:db8::10")
PORT = 110
MOD = 1 << 32


def key(client: IPAddress = CLIENT, port: int = 40000, server: IPAddress = SERVER) -> ConnectionKey:
    return ConnectionKey(client, port, server, PORT)


def c2s(seq: int, flags: int = ACK, payload: bytes = b"", ack: int = 0, k: ConnectionKey | None = None) -> Packet:
    k = k or key()
    return Packet(k.client, k.server, k.client_port, PORT, seq % MOD, flags, payload, ack % MOD)


def s2c(seq: int, flags: int = ACK, payload: bytes = b"", ack: int = 0, k: ConnectionKey | None = None) -> Packet:
    k = k or key()
    return Packet(k.server, k.client, PORT, k.client_port, seq % MOD, flags, payload, ack % MOD)


def streams(events: list[StreamEvent]) -> dict[Direction, bytes]:
    """The bytes delivered per direction."""
    out = {Direction.CLIENT_TO_SERVER: b"", Direction.SERVER_TO_CLIENT: b""}
    for event in events:
        if isinstance(event, StreamData):
            out[event.direction] += event.data
    return out


def feed_all(reassembler: TcpReassembler, packets: list[Packet], now: float = 0.0) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for packet in packets:
        events += reassembler.feed(packet, now)
    return events


def reassembler(**kwargs: int) -> TcpReassembler:
    return TcpReassembler([(str(SERVER), PORT), (str(SERVER6), PORT)], **kwargs)


class ReassemblyTests(SynchronousTestCase):
    """Known cases of TcpReassembler."""

    def handshake(self, isn_c: int = 1000, isn_s: int = 5000) -> list[Packet]:
        return [c2s(isn_c, SYN), s2c(isn_s, SYN | ACK, ack=isn_c + 1), c2s(isn_c + 1, ACK, ack=isn_s + 1)]

    def test_connection(self) -> None:
        """A whole connection: opened on the SYN, data of both directions in order,
        closed once both FINs are reached."""
        r = reassembler()
        events = feed_all(
            r,
            [
                *self.handshake(),
                s2c(5001, ACK | PSH, b"+OK ready\r\n"),
                c2s(1001, ACK | PSH, b"QUIT\r\n"),
                s2c(5012, ACK | PSH | FIN, b"+OK bye\r\n"),
                c2s(1007, ACK | FIN),
            ],
        )
        k = key()
        self.assertEqual(
            events,
            [
                StreamOpened(k),
                StreamData(k, Direction.SERVER_TO_CLIENT, b"+OK ready\r\n"),
                StreamData(k, Direction.CLIENT_TO_SERVER, b"QUIT\r\n"),
                StreamData(k, Direction.SERVER_TO_CLIENT, b"+OK bye\r\n"),
                StreamClosed(k, CLOSED_FIN),
            ],
        )
        self.assertEqual(len(r), 0)
        self.assertEqual(r.counters.streams_opened, 1)
        self.assertEqual(r.counters.streams_closed, 1)

    def test_outOfOrderAndRetransmission(self) -> None:
        """Out-of-order segments wait for the gap; duplicates and overlaps deliver only
        new bytes, the first copy of a byte winning."""
        r = reassembler()
        events = feed_all(
            r,
            [
                *self.handshake(),
                c2s(1005, payload=b"EFGH"),
                c2s(1003, payload=b"CD"),
                c2s(1004, payload=b"x"),  # all buffered already
                c2s(1007, payload=b"xxyy"),  # "xx" overlaps "GH", which stay; "yy" is new
                c2s(1001, payload=b"AB"),
                c2s(1001, payload=b"ABCDEF"),  # a retransmission
                c2s(1011, payload=b"IJ"),
            ],
        )
        self.assertEqual(streams(events)[Direction.CLIENT_TO_SERVER], b"ABCDEFGHyyIJ")
        self.assertEqual(r.counters.segments_duplicate, 2)
        self.assertEqual(r.buffered_bytes(), 0)

    def test_wraparound(self) -> None:
        """Sequence numbers wrap around 2**32."""
        r = reassembler()
        isn = MOD - 3
        events = feed_all(
            r,
            [
                *self.handshake(isn_c=isn, isn_s=MOD - 1),
                c2s(isn + 5, payload=b"DEF"),
                c2s(isn + 1, payload=b"ABCD"),
                s2c(0, payload=b"xyz"),
            ],
        )
        self.assertEqual(streams(events), {Direction.CLIENT_TO_SERVER: b"ABCDDEF", Direction.SERVER_TO_CLIENT: b"xyz"})

    def test_serverStartWithoutSynAck(self) -> None:
        """Without a captured SYN-ACK, the client's handshake ACK tells where the server
        direction starts, so out-of-order server data still comes out whole."""
        r = reassembler()
        events = feed_all(
            r,
            [
                c2s(1000, SYN),
                c2s(1001, ACK, ack=5001),
                s2c(5004, payload=b"DEF"),
                s2c(5001, payload=b"ABC"),
                c2s(1001, ACK, ack=5007),
            ],
        )
        self.assertEqual(streams(events)[Direction.SERVER_TO_CLIENT], b"ABCDEF")

    def test_serverDataBeforeSynAck(self) -> None:
        """Server segments captured before the SYN-ACK wait for it."""
        r = reassembler()
        events = feed_all(r, [c2s(1000, SYN), s2c(5004, payload=b"DEF"), s2c(5001, payload=b"ABC")])
        self.assertEqual(streams(events)[Direction.SERVER_TO_CLIENT], b"")
        events = r.feed(s2c(5000, SYN | ACK, ack=1001), 0)
        self.assertEqual(streams(events)[Direction.SERVER_TO_CLIENT], b"ABCDEF")

    def test_serverStartFromBufferedBytes(self) -> None:
        """Without SYN-ACK or handshake ACK, once the client acknowledges server bytes the
        stream starts at the lowest buffered one; the server's data comes out before the
        client's segment that carried the acknowledgement."""
        r = reassembler()
        events = feed_all(r, [c2s(1000, SYN), s2c(77, payload=b"+OK\r\n"), s2c(82, payload=b"+OK\r\n")])
        self.assertEqual(streams(events)[Direction.SERVER_TO_CLIENT], b"")
        events = r.feed(c2s(1001, ACK, b"USER a\r\n", ack=82), 0)
        self.assertEqual(
            [e for e in events if isinstance(e, StreamData)],
            [
                StreamData(key(), Direction.SERVER_TO_CLIENT, b"+OK\r\n+OK\r\n"),
                StreamData(key(), Direction.CLIENT_TO_SERVER, b"USER a\r\n"),
            ],
        )

    def test_serverStartHandshakeAck(self) -> None:
        """The client's handshake ACK marks the start even if the first server bytes come
        only after the client acknowledged later ones."""
        r = reassembler()
        events = feed_all(
            r,
            [
                c2s(1000, SYN),
                c2s(1001, ACK, ack=5001),
                s2c(5002, payload=b"OK\r\n"),
                c2s(1001, ACK, b"CAPA\r\n", ack=5006),
                s2c(5001, payload=b"+"),
            ],
        )
        self.assertEqual(streams(events)[Direction.SERVER_TO_CLIENT], b"+OK\r\n")

    def test_noSyn(self) -> None:
        """A connection whose SYN was not seen is not followed; other hosts are ignored."""
        r = reassembler()
        self.assertEqual(r.feed(c2s(1, payload=b"USER a\r\n"), 0), [])
        other = Packet(CLIENT, SERVER, 40000, 25, 1, SYN)
        self.assertEqual(r.feed(other, 0), [])
        self.assertEqual(len(r), 0)
        self.assertEqual(r.counters.packets_unmatched, 1)
        self.assertEqual(r.counters.packets_foreign, 1)

    def test_retransmittedSyn(self) -> None:
        """A retransmitted SYN changes nothing; a SYN with another ISN replaces the
        connection (the port was reused)."""
        r = reassembler()
        k = key()
        self.assertEqual(feed_all(r, [c2s(1000, SYN), c2s(1000, SYN)]), [StreamOpened(k)])
        self.assertEqual(r.feed(c2s(9000, SYN), 0), [StreamClosed(k, CLOSED_REUSED), StreamOpened(k)])
        events = r.feed(c2s(9001, payload=b"x"), 0)
        self.assertEqual(streams(events)[Direction.CLIENT_TO_SERVER], b"x")

    def test_reset(self) -> None:
        """A RST in the window ends the connection; one far outside it is ignored."""
        r = reassembler()
        feed_all(r, self.handshake())
        self.assertEqual(r.feed(s2c(5001 + 10_000_000, RST), 0), [])
        self.assertEqual(r.feed(s2c(5001, RST), 0), [StreamClosed(key(), CLOSED_RESET)])
        self.assertEqual(len(r), 0)

    def test_finOutOfOrder(self) -> None:
        """A FIN that arrives before the data in front of it ends its direction only once
        that data is in."""
        r = reassembler()
        events = feed_all(
            r,
            [
                *self.handshake(),
                c2s(1004, ACK | FIN, b"DE"),
                s2c(5001, ACK | FIN),
                c2s(1001, payload=b"ABC"),
                c2s(1007, payload=b"late"),
            ],
        )
        self.assertEqual(streams(events)[Direction.CLIENT_TO_SERVER], b"ABCDE")
        self.assertEqual(events[-1], StreamClosed(key(), CLOSED_FIN))

    def test_outOfWindow(self) -> None:
        """A segment reaching beyond the window is dropped and counted."""
        r = reassembler(window=100)
        feed_all(r, self.handshake())
        self.assertEqual(r.feed(c2s(1051, payload=b"x" * 60), 0), [])
        self.assertEqual(r.counters.segments_out_of_window, 1)
        self.assertEqual(r.buffered_bytes(), 0)

    def test_tooManyHoles(self) -> None:
        """More separate out-of-order pieces than max_holes end the connection."""
        r = reassembler(max_holes=3)
        feed_all(r, self.handshake())
        for i in range(3):
            self.assertEqual(r.feed(c2s(1003 + 2 * i, payload=b"x"), 0), [])
        self.assertEqual(r.feed(c2s(1011, payload=b"x"), 0), [StreamClosed(key(), CLOSED_GAP)])
        self.assertEqual(r.counters.streams_gap, 1)

    def test_cap(self) -> None:
        """Beyond max_streams, the least recently active connection is evicted, counted."""
        r = reassembler(max_streams=3)
        keys = [key(port=40000 + i) for i in range(5)]
        for k in keys[:3]:
            r.feed(c2s(1, SYN, k=k), 0)
        r.feed(c2s(2, payload=b"a", k=keys[0]), 1)  # keys[0] is active again
        self.assertEqual(
            r.feed(c2s(1, SYN, k=keys[3]), 2), [StreamClosed(keys[1], CLOSED_EVICTED), StreamOpened(keys[3])]
        )
        self.assertEqual(
            r.feed(c2s(1, SYN, k=keys[4]), 3), [StreamClosed(keys[2], CLOSED_EVICTED), StreamOpened(keys[4])]
        )
        self.assertEqual(len(r), 3)
        self.assertEqual(r.counters.streams_evicted, 2)

    def test_expire(self) -> None:
        """Connections idle for idle_timeout end on expire()."""
        r = TcpReassembler([(str(SERVER), PORT)], idle_timeout=60)
        first, second = key(port=1), key(port=2)
        r.feed(c2s(1, SYN, k=first), 0)
        r.feed(c2s(1, SYN, k=second), 30)
        self.assertEqual(r.expire(59), [])
        self.assertEqual(r.expire(61), [StreamClosed(first, CLOSED_IDLE)])
        self.assertEqual(r.expire(1000), [StreamClosed(second, CLOSED_IDLE)])
        self.assertEqual(r.counters.streams_expired, 2)

    def test_discard(self) -> None:
        """A discarded connection is forgotten and its later segments ignored."""
        r = reassembler()
        feed_all(r, self.handshake())
        r.discard(key())
        self.assertEqual(r.feed(c2s(1001, payload=b"x"), 0), [])
        self.assertEqual(len(r), 0)

    def test_ipv6(self) -> None:
        """IPv6 connections are followed like IPv4 ones."""
        r = reassembler()
        k = key(CLIENT6, 5, SERVER6)
        events = feed_all(r, [c2s(7, SYN, k=k), c2s(8, payload=b"hi", k=k)])
        self.assertEqual(events, [StreamOpened(k), StreamData(k, Direction.CLIENT_TO_SERVER, b"hi")])

    def test_arguments(self) -> None:
        """Servers are IP literals; bounds are positive."""
        self.assertRaises(ValueError, TcpReassembler, [("mail.example.com", 110)])
        self.assertRaises(ValueError, TcpReassembler, [], max_streams=0)


@st.composite
def connections(draw: st.DrawFn, window: int) -> tuple[list[Packet], bytes, bytes]:
    """A connection's segments (SYN and SYN-ACK first, then the data of both directions
    cut at arbitrary points, with duplicates and overlapping retransmissions, shuffled
    across and within directions, each direction's last segment carrying its FIN) and
    the two original streams."""
    isn_c = draw(st.one_of(st.integers(0, MOD - 1), st.integers(MOD - 600, MOD - 1)))
    isn_s = draw(st.one_of(st.integers(0, MOD - 1), st.integers(MOD - 600, MOD - 1)))
    client = draw(st.binary(min_size=1, max_size=window // 2))
    server = draw(st.binary(min_size=1, max_size=window // 2))
    packets: list[Packet] = []
    for data, base, make in ((client, isn_c + 1, c2s), (server, isn_s + 1, s2c)):
        cuts = sorted(draw(st.sets(st.integers(1, len(data)), max_size=15)) | {0, len(data)})
        segments = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
        # Retransmissions: exact duplicates and arbitrary overlapping ranges.
        segments += draw(st.lists(st.sampled_from(segments), max_size=4))
        for _ in range(draw(st.integers(0, 3))):
            a = draw(st.integers(0, len(data) - 1))
            segments.append((a, draw(st.integers(a + 1, len(data)))))
        for a, b in segments:
            flags = ACK | (FIN if b == len(data) else 0)
            packets.append(make(base + a, flags, data[a:b]))
    order = draw(st.permutations(range(len(packets))))
    handshake = [c2s(isn_c, SYN), s2c(isn_s, SYN | ACK, ack=isn_c + 1)]
    return handshake + [packets[i] for i in order], client, server


class ReassemblyPropertyTests(SynchronousTestCase):
    """Any segmentation, duplication and reordering within the window gives the
    original bytes; the bounds hold whatever the segments."""

    @given(connections(window=2048))
    def test_original(self, connection: tuple[list[Packet], bytes, bytes]) -> None:
        """Both directions come out as sent, and the connection closes on its FINs."""
        packets, client, server = connection
        r = reassembler(window=2048, max_holes=64)
        events = feed_all(r, packets)
        self.assertEqual(streams(events), {Direction.CLIENT_TO_SERVER: client, Direction.SERVER_TO_CLIENT: server})
        self.assertEqual(events[0], StreamOpened(key()))
        self.assertEqual(events[-1], StreamClosed(key(), CLOSED_FIN))
        self.assertEqual(len(r), 0)

    @given(
        st.lists(
            st.tuples(
                st.integers(0, 7),  # which connection
                st.booleans(),  # direction
                st.integers(0, 5000),  # offset from the ISN
                st.sampled_from([0, SYN, ACK, FIN | ACK, RST]),
                st.binary(max_size=400),
            ),
            max_size=80,
        )
    )
    def test_bounds(self, segments: list[tuple[int, bool, int, int, bytes]]) -> None:
        """Random segments to random connections never make the reassembler follow more
        than max_streams connections or hold more than window bytes per direction."""
        r = reassembler(max_streams=4, window=1000, max_holes=8)
        for index, from_client, offset, flags, payload in segments:
            k = key(port=1000 + index)
            packet = c2s(offset, flags, payload, k=k) if from_client else s2c(offset, flags, payload, k=k)
            r.feed(packet, 0)
            self.assertLessEqual(len(r), 4)
            self.assertLessEqual(r.buffered_bytes(), 4 * 2 * 1000)


# -- frames ------------------------------------------------------------------------------

addresses4 = st.ip_addresses(v=4)
addresses6 = st.ip_addresses(v=6)


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    src, dst = draw(st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)))
    return Packet(
        src,
        dst,
        draw(st.integers(0, 65535)),
        draw(st.integers(0, 65535)),
        draw(st.integers(0, MOD - 1)),
        draw(st.integers(0, 255)),
        draw(st.binary(max_size=200)),
        draw(st.integers(0, MOD - 1)),
    )


class FrameTests(SynchronousTestCase):
    """parse_frame and build_frame."""

    @given(packets(), st.one_of(st.none(), st.integers(0, 4095)))
    def test_roundTrip(self, packet: Packet, vlan: int | None) -> None:
        """A built Ethernet frame, tagged or not, parses back to the same segment."""
        self.assertEqual(parse_frame(build_frame(packet, vlan=vlan), DLT_EN10MB), packet)

    def test_linkTypes(self) -> None:
        """Linux cooked (v1, v2), raw IP, BSD loopback and QinQ frames carry the same
        segment as the Ethernet frame."""
        packet = Packet(CLIENT, SERVER, 40000, PORT, 1, ACK, b"USER a\r\n", 2)
        ip = build_frame(packet)[14:]
        ip6 = build_frame(Packet(CLIENT6, SERVER6, 40000, PORT, 1, ACK, b"x", 2))[14:]
        sll = struct.pack(">HHH8sH", 0, 772, 6, b"", 0x0800) + ip
        sll2 = struct.pack(">HHIHBB8s", 0x0800, 0, 1, 1, 0, 6, b"") + ip
        qinq = build_frame(packet)[:12] + struct.pack(">HHHH", 0x88A8, 10, 0x8100, 20) + build_frame(packet)[12:]
        self.assertEqual(parse_frame(sll, DLT_LINUX_SLL), packet)
        self.assertEqual(parse_frame(sll2, DLT_LINUX_SLL2), packet)
        self.assertEqual(parse_frame(ip, DLT_RAW), packet)
        self.assertEqual(parse_frame(ip, DLT_IPV4), packet)
        self.assertEqual(parse_frame(struct.pack("=I", 2) + ip, DLT_NULL), packet)
        self.assertEqual(parse_frame(struct.pack(">I", 30) + ip6, DLT_NULL).src, CLIENT6)  # type: ignore[union-attr]
        self.assertEqual(parse_frame(qinq, DLT_EN10MB), packet)

    def test_padding(self) -> None:
        """The Ethernet padding of short frames is not taken for payload."""
        packet = Packet(CLIENT, SERVER, 40000, PORT, 1, ACK, b"", 2)
        frame = build_frame(packet) + b"\x00" * 6
        self.assertEqual(parse_frame(frame), packet)

    def test_notTcp(self) -> None:
        """ARP, UDP and IPv6 without TCP give None."""
        frame = bytearray(build_frame(Packet(CLIENT, SERVER, 1, 2, 3, 0)))
        frame[14 + 9] = 17  # UDP
        self.assertIsNone(parse_frame(bytes(frame)))
        self.assertIsNone(parse_frame(b"\xff" * 12 + b"\x08\x06" + b"\x00" * 28))
        frame6 = bytearray(build_frame(Packet(CLIENT6, SERVER6, 1, 2, 3, 0)))
        frame6[14 + 6] = 58  # ICMPv6
        self.assertIsNone(parse_frame(bytes(frame6)))

    def test_ipv6Extensions(self) -> None:
        """TCP behind IPv6 hop-by-hop options is found; a fragment header is a fragment."""
        packet = Packet(CLIENT6, SERVER6, 1, 2, 3, ACK, b"data")
        frame = build_frame(packet)
        header, tcp = bytearray(frame[14:54]), frame[54:]
        hop = bytes([6, 0]) + b"\x01\x04\x00\x00\x00\x00"  # next header TCP, PadN
        header[6] = 0
        struct.pack_into(">H", header, 4, len(hop) + len(tcp))
        self.assertEqual(parse_frame(frame[:14] + bytes(header) + hop + tcp), packet)
        header[6] = 44
        fragment = bytes([6, 0, 0, 1, 0, 0, 0, 1])
        error = self.assertRaises(FrameError, parse_frame, frame[:14] + bytes(header) + fragment + tcp)
        self.assertEqual(error.reason, FRAGMENT)

    def test_fragments(self) -> None:
        """IPv4 fragments (more-fragments flag or an offset) raise FrameError(FRAGMENT)."""
        frame = build_frame(Packet(CLIENT, SERVER, 1, 2, 3, ACK, b"data"))
        for flags in (0x2000, 0x0001, 0x2010):
            fragment = bytearray(frame)
            struct.pack_into(">H", fragment, 14 + 6, flags)
            error = self.assertRaises(FrameError, parse_frame, bytes(fragment))
            self.assertEqual(error.reason, FRAGMENT)

    def test_unknownLinkType(self) -> None:
        """An unknown link type raises FrameError(LINKTYPE)."""
        self.assertEqual(self.assertRaises(FrameError, parse_frame, b"x" * 64, 147).reason, LINKTYPE)

    @given(st.sampled_from(sorted(SUPPORTED_LINKTYPES)), st.binary(max_size=120))
    def test_garbage(self, linktype: int, frame: bytes) -> None:
        """Arbitrary bytes raise nothing but FrameError, a ProtocolError."""
        try:
            parse_frame(frame, linktype)
        except FrameError as e:
            self.assertIsInstance(e, ProtocolError)

    @given(packets(), st.data())
    def test_damaged(self, packet: Packet, data: st.DataObject) -> None:
        """A valid frame cut short or with bytes changed raises nothing but FrameError."""
        frame = bytearray(build_frame(packet))
        for _ in range(data.draw(st.integers(0, 4))):
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
        frame = frame[: data.draw(st.integers(0, len(frame)))]
        try:
            parse_frame(bytes(frame))
        except FrameError:
            pass


# -- capture files -----------------------------------------------------------------------

records = st.lists(
    st.builds(
        CaptureRecord,
        timestamp=st.integers(0, 2**31 * 10**6).map(lambda us: us / 1e6),
        linktype=st.just(DLT_EN10MB),
        data=st.binary(max_size=100),
        original_length=st.integers(0, 2**32 - 1),
    ),
    max_size=10,
)


def pcapng(order: str, blocks: list[tuple[int, bytes]]) -> bytes:
    """A pcapng file: a section header in byte order C{order}, then C{blocks}."""

    def block(kind: int, body: bytes) -> bytes:
        body += b"\x00" * (-len(body) % 4)
        length = 12 + len(body)
        return struct.pack(order + "II", kind, length) + body + struct.pack(order + "I", length)

    shb = struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    return block(0x0A0D0D0A, shb) + b"".join(block(kind, body) for kind, body in blocks)


class CaptureFileTests(SynchronousTestCase):
    """read_capture and write_pcap."""

    @given(records)
    def test_roundTrip(self, written: list[CaptureRecord]) -> None:
        """What write_pcap writes, read_capture reads back (microsecond timestamps)."""
        stream = io.BytesIO()
        write_pcap(stream, written, linktype=DLT_EN10MB)
        stream.seek(0)
        read = list(read_capture(stream))
        self.assertEqual(
            [(r.data, r.linktype, r.original_length) for r in read],
            [(r.data, r.linktype, r.original_length) for r in written],
        )
        for r, w in zip(read, written, strict=True):
            self.assertAlmostEqual(r.timestamp, w.timestamp, delta=1e-6)

    def test_bigEndianNanoseconds(self) -> None:
        """A big-endian, nanosecond pcap file is read."""
        header = struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, DLT_LINUX_SLL)
        record = struct.pack(">IIII", 10, 500_000_000, 3, 60) + b"abc"
        (read,) = read_capture(io.BytesIO(header + record))
        self.assertEqual(read, CaptureRecord(10.5, DLT_LINUX_SLL, b"abc", 60))

    def test_pcapng(self) -> None:
        """pcapng in both byte orders: interfaces with their link types and timestamp
        resolutions, enhanced and simple packet blocks, unknown blocks skipped."""
        for order in "<>":
            idb0 = struct.pack(order + "HHI", DLT_EN10MB, 0, 0)
            idb1 = struct.pack(order + "HHI", DLT_RAW, 0, 0) + struct.pack(order + "HH", 9, 1) + b"\x09\x00\x00\x00"
            idb1 += struct.pack(order + "HH", 0, 0)
            ticks = 1_500_000
            epb = struct.pack(order + "IIIII", 1, ticks >> 32, ticks & 0xFFFFFFFF, 5, 9) + b"hello"
            spb = struct.pack(order + "I", 2) + b"ok"
            data = pcapng(order, [(1, idb0), (1, idb1), (0x0BAD, b"skip me!"), (6, epb), (3, spb)])
            read = list(read_capture(io.BytesIO(data)))
            self.assertEqual(
                read,
                [CaptureRecord(ticks / 1e9, DLT_RAW, b"hello", 9), CaptureRecord(0.0, DLT_EN10MB, b"ok", 2)],
                order,
            )

    def test_malformed(self) -> None:
        """Truncated files, bad magic, oversized records and pcapng blocks whose two
        lengths differ raise CaptureFileError."""
        stream = io.BytesIO()
        write_pcap(stream, [CaptureRecord(1.0, DLT_EN10MB, b"x" * 100, 100)], linktype=DLT_EN10MB)
        good = stream.getvalue()
        for bad in (good[:3], good[:30], good[:-1], b"GIF89a" + good[6:]):
            self.assertRaises(CaptureFileError, list, read_capture(io.BytesIO(bad)))
        self.assertRaises(CaptureFileError, list, read_capture(io.BytesIO(good), max_record=99))
        idb = pcapng("<", [(1, struct.pack("<HHI", DLT_EN10MB, 0, 0))])
        for damaged in (idb[:-4] + b"\x18\x00\x00\x00", idb[:-8], idb + b"\x06\x00\x00\x00\x0d\x00\x00\x00"):
            self.assertRaises(CaptureFileError, list, read_capture(io.BytesIO(damaged)))
        self.assertEqual(list(read_capture(io.BytesIO(b""))), [])
        self.assertRaises(
            ValueError, write_pcap, io.BytesIO(), [CaptureRecord(1.0, DLT_RAW, b"", 0)], linktype=DLT_EN10MB
        )

    @given(
        st.binary(max_size=200), st.sampled_from([b"", b"\xd4\xc3\xb2\xa1", b"\x0a\x0d\x0d\x0a", b"\xa1\xb2\x3c\x4d"])
    )
    def test_garbage(self, data: bytes, magic: bytes) -> None:
        """Arbitrary bytes, behind a real magic or not, raise nothing but
        CaptureFileError, a ProtocolError."""
        try:
            list(read_capture(io.BytesIO(magic + data), max_record=1000))
        except CaptureFileError as e:
            self.assertIsInstance(e, ProtocolError)


class PurityTests(SynchronousTestCase):
    """The pure modules of mailgw.sso."""

    def test_pure(self) -> None:
        """reassembly, frames and pcapfile import nothing from Twisted."""
        folder = pathlib.Path(mailgw.sso.__file__).parent
        for name in ("reassembly.py", "frames.py", "pcapfile.py"):
            for node in ast.walk(ast.parse((folder / name).read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for imported in names:
                    self.assertFalse(imported.startswith("twisted"), f"{name} imports {imported}")
