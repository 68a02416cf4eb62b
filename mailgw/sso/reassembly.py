"""TCP reassembly of the connections to a set of servers, for passive monitoring.

A L{TcpReassembler} is fed captured TCP segments (L{Packet}s, in capture order) and
returns L{StreamEvent}s: a connection was opened (L{StreamOpened}), bytes of one
direction arrived in order (L{StreamData}), or a connection is gone (L{StreamClosed}).
It is pure: no reactor, no clock (times are passed in), no I/O.

What it follows:

  - only connections to the configured servers' C{(address, port)} pairs, and only
    from their client's C{SYN} on (a connection already running when capture starts is
    ignored: its dialogue cannot be read from the middle).  The server direction starts
    at the C{SYN-ACK}.  Until that is seen its segments are buffered (a mirror port may
    reorder the two directions); if the client acknowledges buffered bytes first, the
    start is the client's earliest acknowledgement number (its handshake C{ACK}) or the
    lowest buffered byte, whichever comes first;
  - segmentation (data is delivered as soon as it is in order), retransmissions
    (duplicate and overlapping segments: bytes already delivered or buffered are kept,
    the first copy wins), out-of-order segments (buffered while they lie within
    C{window} bytes of the next expected byte), sequence-number wraparound (all
    arithmetic is modulo 2**32);
  - the end of a connection: both C{FIN}s reached in order, a C{RST} within the
    window (L{CLOSED_FIN}, L{CLOSED_RESET}), a new C{SYN} with another initial sequence
    number on the same address pair (the old one ends, L{CLOSED_REUSED}), or
    L{TcpReassembler.discard} by the consumer.

Bounds, whatever the traffic: at most C{max_streams} connections (a new one evicts the
least recently active, L{CLOSED_EVICTED}); per direction at most C{window} out-of-order
bytes in at most C{max_holes} separate pieces (more pieces ends the connection,
L{CLOSED_GAP}); in-order bytes are never held, they are returned.  Connections idle
for C{idle_timeout} seconds end on L{TcpReassembler.expire} (L{CLOSED_IDLE}).
Everything dropped is counted in L{TcpReassembler.counters}.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "ACK",
    "CLOSED_EVICTED",
    "CLOSED_FIN",
    "CLOSED_GAP",
    "CLOSED_IDLE",
    "CLOSED_RESET",
    "CLOSED_REUSED",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "ConnectionKey",
    "Direction",
    "IPAddress",
    "Packet",
    "ReassemblyCounters",
    "StreamClosed",
    "StreamData",
    "StreamEvent",
    "StreamOpened",
    "TcpReassembler",
]

#: An IPv4 or IPv6 address.
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: TCP header flags (RFC 9293).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

#: L{StreamClosed} reasons.
CLOSED_FIN = "fin"
CLOSED_RESET = "rst"
CLOSED_REUSED = "reused"
CLOSED_EVICTED = "evicted"
CLOSED_IDLE = "idle"
CLOSED_GAP = "gap"

_MOD = 1 << 32
_HALF = 1 << 31


def _delta(a: int, b: int) -> int:
    """C{a - b} in sequence space: in M{[-2**31, 2**31)}."""
    d = (a - b) % _MOD
    return d - _MOD if d >= _HALF else d


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured TCP segment.

    @ivar ack: the acknowledgement number, meaningful only with the L{ACK} flag.
    @ivar flags: the TCP flags (L{FIN}, L{SYN}, L{RST}, L{PSH}, L{ACK}, ...).
    """

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    seq: int
    flags: int
    payload: bytes = b""
    ack: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionKey:
    """A connection between a client and one of the monitored servers."""

    client: IPAddress
    client_port: int
    server: IPAddress
    server_port: int


class Direction(enum.Enum):
    """Which way the bytes of a L{StreamData} went."""

    CLIENT_TO_SERVER = "client"
    SERVER_TO_CLIENT = "server"


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The client's C{SYN} of a new connection was seen."""

    key: ConnectionKey


@dataclass(frozen=True, slots=True)
class StreamData:
    """Bytes of one direction of a connection, following the previous ones without gap."""

    key: ConnectionKey
    direction: Direction
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The connection is no longer followed; C{reason} is one of the C{CLOSED_*}."""

    key: ConnectionKey
    reason: str


#: What L{TcpReassembler.feed} and L{TcpReassembler.expire} return.
StreamEvent: TypeAlias = StreamOpened | StreamData | StreamClosed


@dataclass
class ReassemblyCounters:
    """What a L{TcpReassembler} saw and dropped, since it was created."""

    #: Connections opened (client C{SYN} seen).
    streams_opened: int = 0
    #: Connections that ended by C{FIN}s, C{RST} or port reuse.
    streams_closed: int = 0
    #: Connections evicted to stay within C{max_streams}.
    streams_evicted: int = 0
    #: Connections ended after C{idle_timeout}.
    streams_expired: int = 0
    #: Connections ended because their out-of-order buffer had too many holes.
    streams_gap: int = 0
    #: Segments that were not to or from a monitored server.
    packets_foreign: int = 0
    #: Segments of a monitored server with no followed connection (no C{SYN} seen).
    packets_unmatched: int = 0
    #: Segments holding only bytes already delivered or buffered.
    segments_duplicate: int = 0
    #: Segments reaching beyond C{window} bytes ahead, dropped.
    segments_out_of_window: int = 0


class _HalfStream:
    """One direction of a connection: the next expected sequence number and the
    out-of-order pieces, non-overlapping and sorted, all within the window."""

    __slots__ = ("ack_hint", "fin_at", "finished", "next", "pieces")

    def __init__(self, next_seq: int | None) -> None:
        self.next = next_seq
        # While next is None (server direction, no SYN-ACK yet): the segments seen so
        # far, unordered, and the client's earliest acknowledgement number.
        self.pieces: list[tuple[int, bytearray]] = []
        self.ack_hint: int | None = None
        self.fin_at: int | None = None
        self.finished = False

    def buffered(self) -> int:
        return sum(len(data) for _, data in self.pieces)


class _Connection:
    __slots__ = ("client", "client_isn", "last_seen", "server")

    def __init__(self, client_isn: int, now: float) -> None:
        self.client_isn = client_isn
        self.client = _HalfStream((client_isn + 1) % _MOD)
        self.server = _HalfStream(None)
        self.last_seen = now


class _GapError(Exception):
    """Internal: an out-of-order buffer has too many holes."""


class TcpReassembler:
    """Reassembles the connections to C{servers}; see the module docstring.

    @param servers: the C{(address, port)} pairs of the monitored servers; addresses are
        IP literals (C{ValueError} otherwise).
    @param max_streams: the most connections followed at once.
    @param window: the most out-of-order bytes buffered per direction; a segment
        reaching further ahead than this is dropped.
    @param max_holes: the most separate out-of-order pieces per direction.
    @param idle_timeout: seconds without a segment after which L{expire} ends a
        connection.
    """

    def __init__(
        self,
        servers: Iterable[tuple[str | IPAddress, int]],
        *,
        max_streams: int = 1024,
        window: int = 65536,
        max_holes: int = 32,
        idle_timeout: float = 300.0,
    ) -> None:
        if max_streams < 1 or window < 1 or max_holes < 1:
            raise ValueError("max_streams, window and max_holes must be at least 1")
        self._servers = frozenset((ipaddress.ip_address(address), int(port)) for address, port in servers)
        self._max_streams = max_streams
        self._window = window
        self._max_holes = max_holes
        self._idle_timeout = idle_timeout
        # Least recently active first.
        self._connections: OrderedDict[ConnectionKey, _Connection] = OrderedDict()
        self.counters = ReassemblyCounters()

    def __len__(self) -> int:
        """The number of connections followed now."""
        return len(self._connections)

    def is_server(self, address: IPAddress, port: int) -> bool:
        """Whether C{(address, port)} is a monitored server."""
        return (address, port) in self._servers

    def buffered_bytes(self) -> int:
        """The out-of-order bytes held now, over all connections."""
        return sum(c.client.buffered() + c.server.buffered() for c in self._connections.values())

    def discard(self, key: ConnectionKey) -> None:
        """Stop following a connection (its consumer has no use for the rest); its later
        segments are ignored.  No L{StreamClosed} is returned for it."""
        self._connections.pop(key, None)

    def expire(self, now: float) -> list[StreamEvent]:
        """End the connections idle since before C{now - idle_timeout}."""
        events: list[StreamEvent] = []
        limit = now - self._idle_timeout
        while self._connections:
            key, connection = next(iter(self._connections.items()))
            if connection.last_seen > limit:
                break
            del self._connections[key]
            self.counters.streams_expired += 1
            events.append(StreamClosed(key, CLOSED_IDLE))
        return events

    def feed(self, packet: Packet, now: float) -> list[StreamEvent]:
        """Take one captured segment; C{now} is its capture time (for L{expire})."""
        if (packet.dst, packet.dport) in self._servers:
            key = ConnectionKey(packet.src, packet.sport, packet.dst, packet.dport)
            from_client = True
        elif (packet.src, packet.sport) in self._servers:
            key = ConnectionKey(packet.dst, packet.dport, packet.src, packet.sport)
            from_client = False
        else:
            self.counters.packets_foreign += 1
            return []
        events: list[StreamEvent] = []
        connection = self._connections.get(key)
        if from_client and packet.flags & SYN and not packet.flags & ACK:
            if connection is not None and connection.client_isn == packet.seq:
                connection.last_seen = now
                self._connections.move_to_end(key)
                return []  # a retransmitted SYN
            if connection is not None:
                del self._connections[key]
                self.counters.streams_closed += 1
                events.append(StreamClosed(key, CLOSED_REUSED))
            connection = self._open(key, packet.seq, now, events)
        elif connection is None:
            self.counters.packets_unmatched += 1
            return events
        connection.last_seen = now
        self._connections.move_to_end(key)
        try:
            if packet.flags & RST:
                self._reset(key, connection, packet, from_client, events)
            else:
                self._segment(key, connection, packet, from_client, events)
        except _GapError:
            del self._connections[key]
            self.counters.streams_gap += 1
            events.append(StreamClosed(key, CLOSED_GAP))
            return events
        if connection.client.finished and connection.server.finished:
            del self._connections[key]
            self.counters.streams_closed += 1
            events.append(StreamClosed(key, CLOSED_FIN))
        return events

    # -- internals -----------------------------------------------------------------------

    def _open(self, key: ConnectionKey, isn: int, now: float, events: list[StreamEvent]) -> _Connection:
        while len(self._connections) >= self._max_streams:
            oldest, _ = self._connections.popitem(last=False)
            self.counters.streams_evicted += 1
            events.append(StreamClosed(oldest, CLOSED_EVICTED))
        connection = _Connection(isn, now)
        self._connections[key] = connection
        self.counters.streams_opened += 1
        events.append(StreamOpened(key))
        return connection

    def _reset(
        self, key: ConnectionKey, connection: _Connection, packet: Packet, from_client: bool, events: list[StreamEvent]
    ) -> None:
        half = connection.client if from_client else connection.server
        if half.next is not None and abs(_delta(packet.seq, half.next)) > self._window:
            return  # not a RST of this connection's current window
        del self._connections[key]
        self.counters.streams_closed += 1
        events.append(StreamClosed(key, CLOSED_RESET))

    def _segment(
        self, key: ConnectionKey, connection: _Connection, packet: Packet, from_client: bool, events: list[StreamEvent]
    ) -> None:
        flags = packet.flags
        seq = packet.seq % _MOD
        server = connection.server
        if from_client:
            half = connection.client
            if flags & SYN:
                seq = (seq + 1) % _MOD  # a (retransmitted) SYN with data: data follows the ISN
            if server.next is None and flags & ACK:
                self._client_acked(key, server, packet.ack % _MOD, events)
        else:
            half = server
            if flags & SYN:
                seq = (seq + 1) % _MOD
                if half.next is None:
                    self._start(key, half, seq, events)
        if half.finished:
            return
        if flags & FIN and half.fin_at is None:
            half.fin_at = (seq + len(packet.payload)) % _MOD
        if packet.payload:
            if half.next is None:
                self._early(half, seq, packet.payload)
            else:
                data = self._add(half, seq, packet.payload)
                if data:
                    direction = Direction.CLIENT_TO_SERVER if from_client else Direction.SERVER_TO_CLIENT
                    events.append(StreamData(key, direction, data))
        self._check_fin(half)

    def _check_fin(self, half: _HalfStream) -> None:
        if half.next is not None and half.fin_at is not None and _delta(half.next, half.fin_at) == 0:
            half.finished = True
            half.next = (half.next + 1) % _MOD
            half.pieces = []

    def _client_acked(self, key: ConnectionKey, server: _HalfStream, ack: int, events: list[StreamEvent]) -> None:
        """The client acknowledged server bytes before the server's start is known (no
        SYN-ACK captured yet).  The earliest acknowledgement number is the start if it
        came from the handshake; once the client acknowledges buffered bytes, the start
        is fixed at that number or the lowest buffered byte, whichever is first."""
        if server.ack_hint is None or _delta(ack, server.ack_hint) < 0:
            server.ack_hint = ack
        if not server.pieces:
            return
        lowest = min((seq for seq, _ in server.pieces), key=lambda seq: _delta(seq, ack))
        if _delta(ack, lowest) > 0:
            start = server.ack_hint if _delta(server.ack_hint, lowest) < 0 else lowest
            self._start(key, server, start, events)

    def _start(self, key: ConnectionKey, half: _HalfStream, start: int, events: list[StreamEvent]) -> None:
        """Fix where the server direction starts; place what was buffered before."""
        half.next = start
        early, half.pieces = half.pieces, []
        early.sort(key=lambda piece: _delta(piece[0], start))
        data = b"".join(self._add(half, seq, bytes(piece)) for seq, piece in early)
        if data:
            events.append(StreamData(key, Direction.SERVER_TO_CLIENT, data))
        self._check_fin(half)

    def _early(self, half: _HalfStream, seq: int, payload: bytes) -> None:
        """Keep a server segment that came before its direction's start is known, within
        the same bounds as out-of-order pieces."""
        if len(half.pieces) >= self._max_holes or half.buffered() + len(payload) > self._window:
            self.counters.segments_out_of_window += 1
            return
        half.pieces.append((seq, bytearray(payload)))

    def _add(self, half: _HalfStream, seq: int, payload: bytes) -> bytes:
        """Place one segment's bytes; return the bytes that are now in order."""
        assert half.next is not None
        start = _delta(seq, half.next)
        end = start + len(payload)
        if end <= 0:
            self.counters.segments_duplicate += 1
            return b""
        if start > 0:
            if end > self._window:
                self.counters.segments_out_of_window += 1
            else:
                self._buffer(half, start, payload)
            return b""
        delivered = [payload[-start:]]
        half.next = (half.next + end) % _MOD
        # Pieces are sorted: take those that now touch or overlap the in-order edge.
        while half.pieces:
            piece_seq, piece = half.pieces[0]
            offset = _delta(piece_seq, half.next)
            if offset > 0:
                break
            del half.pieces[0]
            if offset + len(piece) > 0:
                delivered.append(bytes(piece[-offset:]))
                half.next = (half.next + offset + len(piece)) % _MOD
        return b"".join(delivered)

    def _buffer(self, half: _HalfStream, start: int, payload: bytes) -> None:
        """Keep the parts of an out-of-order segment not buffered yet (first copy wins);
        merge touching pieces (in place: a run of small segments costs linear time)."""
        assert half.next is not None
        base = half.next
        end = start + len(payload)
        # Pieces as [start, end) offsets from the in-order edge, sorted, disjoint.
        merged: list[tuple[int, bytearray]] = []
        added = False
        cursor = start
        for piece_seq, data in half.pieces:
            piece_start = _delta(piece_seq, base)
            if cursor < end and cursor < piece_start:
                merged.append((cursor, bytearray(payload[cursor - start : min(end, piece_start) - start])))
                added = True
            cursor = max(cursor, piece_start + len(data))
            merged.append((piece_start, data))
        if cursor < end:
            merged.append((cursor, bytearray(payload[cursor - start :])))
            added = True
        if not added:
            self.counters.segments_duplicate += 1
            return
        pieces: list[tuple[int, bytearray]] = []
        for piece_start, data in merged:
            if pieces and pieces[-1][0] + len(pieces[-1][1]) == piece_start:
                pieces[-1][1].extend(data)
            else:
                pieces.append((piece_start, data))
        if len(pieces) > self._max_holes:
            raise _GapError()
        half.pieces = [((base + piece_start) % _MOD, data) for piece_start, data in pieces]
