"""The POP3 SSO monitor: captured traffic in, "this client IP logged in as this user" out.

L{Pop3Monitor} takes captured frames (L{Pop3Monitor.frame_received}, from the live
capture of L{mailgw.sso.capture} or a capture file) or already decoded segments
(L{Pop3Monitor.packet_received}), reassembles the connections to the monitored POP3
servers (L{mailgw.sso.reassembly}), reads each one's dialogue with a
L{Pop3Dialogue<mailgw.wire.pop3dialogue.Pop3Dialogue>} and calls C{on_login(client_ip,
user, server)} once for every login the server accepted.  A connection is forgotten as
soon as its dialogue has nothing more to tell (after the login, C{STLS}, C{QUIT}), is
not POP3, or its TCP stream ends or cannot be followed.  It is pure but for the clock
it is given (for idle expiry): no reactor calls, no I/O.

L{replay} feeds a pcap or pcapng file through the same path, blocking (for a command
line tool or a test); L{replay_in_thread} reads the file in the reactor's thread pool
and feeds the monitor on the reactor thread.  Replays use the file's timestamps as the
time of each frame: give a replay its own monitor rather than the live one, so that the
two clocks do not mix.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool

from mailgw.sso.frames import FRAGMENT, LINKTYPE, FrameError, parse_frame
from mailgw.sso.pcapfile import CaptureRecord, read_capture
from mailgw.sso.reassembly import (
    ConnectionKey,
    Direction,
    Packet,
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamOpened,
    TcpReassembler,
)
from mailgw.wire.pop3dialogue import (
    MAX_BACKLOG,
    MAX_LINE,
    DialogueError,
    DialogueEvent,
    Ended,
    Login,
    Pop3Dialogue,
)

__all__ = ["STATISTICS", "LoginCallback", "Pop3Monitor", "replay", "replay_in_thread"]

#: C{on_login(client_ip, user, (server_ip, server_port))}.
LoginCallback = Callable[[str, str, tuple[str, int]], object]

#: The keys of L{Pop3Monitor.statistics}, all always present.
STATISTICS = (
    # Captured frames, and those that could not be used.
    "frames",
    "frames_not_tcp",
    "frames_fragment",
    "frames_malformed",
    "frames_unsupported",
    # Connections: seen (client SYN), with a login, in TLS, ended by QUIT / a refusing
    # greeting, dropped (evicted by the cap, out-of-order overflow, not POP3), idle.
    "streams_seen",
    "streams_active",
    "streams_authenticated",
    "streams_tls",
    "streams_quit",
    "streams_refused",
    "streams_dropped",
    "streams_evicted",
    "streams_gap",
    "streams_garbage",
    "streams_expired",
    "streams_closed",
    # Logins reported through on_login.
    "logins",
    # Segments: not of a monitored server, of no followed connection, duplicates,
    # beyond the out-of-order window.
    "packets_foreign",
    "packets_unmatched",
    "segments_duplicate",
    "segments_out_of_window",
)


class Pop3Monitor:
    """Watches POP3 connections to C{servers} and reports accepted logins.

    @param servers: C{(ip, port)} of the POP3 servers whose logins count (IP literals:
        host names are resolved by the caller).
    @param on_login: called as C{on_login(client_ip, user, (server_ip, server_port))} once
        per accepted login, C{client_ip} in the canonical form of L{ipaddress}.
    @param clock: the time of live frames (for idle expiry).
    @param max_streams: the most connections followed at once (oldest evicted).
    @param window: out-of-order bytes buffered per direction of a connection.
    @param max_holes: separate out-of-order pieces per direction.
    @param idle_timeout: seconds after which a silent connection is forgotten.
    @param max_line: the longest POP3 line kept (see L{Pop3Dialogue}).
    @param max_backlog: lines of one direction waiting for their partner.
    @param expire_interval: how often (seconds of frame time) idle connections are looked
        for, as frames arrive.
    """

    def __init__(
        self,
        servers: Iterable[tuple[str, int]],
        on_login: LoginCallback,
        clock: IReactorTime,
        *,
        max_streams: int = 1024,
        window: int = 16384,
        max_holes: int = 16,
        idle_timeout: float = 300.0,
        max_line: int = MAX_LINE,
        max_backlog: int = MAX_BACKLOG,
        expire_interval: float = 10.0,
    ) -> None:
        self._servers = tuple((address, int(port)) for address, port in servers)
        self._reassembler = TcpReassembler(
            self._servers, max_streams=max_streams, window=window, max_holes=max_holes, idle_timeout=idle_timeout
        )
        self._on_login = on_login
        self._clock = clock
        self._max_line = max_line
        self._max_backlog = max_backlog
        self._expire_interval = expire_interval
        self._last_expiry: float | None = None
        self._dialogues: dict[ConnectionKey, Pop3Dialogue] = {}
        self._counts: Counter[str] = Counter()

    @property
    def ports(self) -> frozenset[int]:
        """The monitored servers' TCP ports (for the capture filter)."""
        return frozenset(port for _, port in self._servers)

    def __len__(self) -> int:
        """The number of connections followed now."""
        return len(self._reassembler)

    def buffered_bytes(self) -> int:
        """The bytes of captured traffic held now (out-of-order segments and POP3 lines)."""
        dialogues = sum(dialogue.buffered_bytes() for dialogue in self._dialogues.values())
        return self._reassembler.buffered_bytes() + dialogues

    def statistics(self) -> dict[str, int]:
        """Counters since the monitor was made (keys: L{STATISTICS})."""
        counters = self._reassembler.counters
        counts = self._counts
        stats = {key: counts[key] for key in STATISTICS}
        stats.update(
            streams_seen=counters.streams_opened,
            streams_active=len(self._reassembler),
            streams_evicted=counters.streams_evicted,
            streams_gap=counters.streams_gap,
            streams_expired=counters.streams_expired,
            streams_closed=counters.streams_closed,
            streams_dropped=counters.streams_evicted + counters.streams_gap + counts["streams_garbage"],
            packets_foreign=counters.packets_foreign,
            packets_unmatched=counters.packets_unmatched,
            segments_duplicate=counters.segments_duplicate,
            segments_out_of_window=counters.segments_out_of_window,
        )
        return stats

    def frame_received(self, frame: bytes, linktype: int, now: float | None = None) -> None:
        """Take one captured frame of link type C{linktype} captured at C{now} (default:
        the clock's time)."""
        self._counts["frames"] += 1
        try:
            packet = parse_frame(frame, linktype)
        except FrameError as error:
            if error.reason == FRAGMENT:
                self._counts["frames_fragment"] += 1
            elif error.reason == LINKTYPE:
                self._counts["frames_unsupported"] += 1
            else:
                self._counts["frames_malformed"] += 1
            return
        if packet is None:
            self._counts["frames_not_tcp"] += 1
            return
        self.packet_received(packet, now)

    def packet_received(self, packet: Packet, now: float | None = None) -> None:
        """Take one captured TCP segment, captured at C{now} (default: the clock's time)."""
        when = self._clock.seconds() if now is None else now
        self._handle(self._reassembler.feed(packet, when))
        if self._last_expiry is None or not 0 <= when - self._last_expiry < self._expire_interval:
            self.expire(when)

    def expire(self, now: float | None = None) -> None:
        """Forget the connections idle for C{idle_timeout} at C{now} (default: the clock's
        time).  Also done as frames arrive, every C{expire_interval} seconds."""
        when = self._clock.seconds() if now is None else now
        self._last_expiry = when
        self._handle(self._reassembler.expire(when))

    # -- internals -----------------------------------------------------------------------

    def _handle(self, events: list[StreamEvent]) -> None:
        for event in events:
            if isinstance(event, StreamOpened):
                self._dialogues[event.key] = Pop3Dialogue(max_line=self._max_line, max_backlog=self._max_backlog)
            elif isinstance(event, StreamData):
                self._data(event)
            elif isinstance(event, StreamClosed):
                self._dialogues.pop(event.key, None)

    def _data(self, event: StreamData) -> None:
        dialogue = self._dialogues.get(event.key)
        if dialogue is None:
            return
        try:
            if event.direction is Direction.CLIENT_TO_SERVER:
                results = dialogue.client_data(event.data)
            else:
                results = dialogue.server_data(event.data)
        except DialogueError:
            self._counts["streams_garbage"] += 1
            self._forget(event.key)
            return
        self._results(event.key, results)

    def _results(self, key: ConnectionKey, results: list[DialogueEvent]) -> None:
        for result in results:
            if isinstance(result, Login):
                self._counts["logins"] += 1
                self._on_login(str(key.client), result.user, (str(key.server), key.server_port))
            elif isinstance(result, Ended):
                self._counts[f"streams_{result.reason}"] += 1
                self._forget(key)

    def _forget(self, key: ConnectionKey) -> None:
        self._dialogues.pop(key, None)
        self._reassembler.discard(key)


def _feed(monitor: Pop3Monitor, records: Iterable[CaptureRecord]) -> int:
    count = 0
    for record in records:
        monitor.frame_received(record.data, record.linktype, record.timestamp)
        count += 1
    return count


def replay(path: str | os.PathLike[str], monitor: Pop3Monitor) -> int:
    """Feed the pcap or pcapng file at C{path} through C{monitor}, blocking; return the
    number of frames read.

    Not on the reactor thread (file I/O): see L{replay_in_thread}.

    @raise mailgw.sso.pcapfile.CaptureFileError: the file is not a usable capture.
    @raise OSError: it cannot be read.
    """
    with open(path, "rb") as stream:
        return _feed(monitor, read_capture(stream))


class _BatchReader:
    """Reads a capture file a batch of records at a time, from a pool thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = path
        self._stream: BinaryIO | None = None
        self._records: Iterator[CaptureRecord] | None = None

    def next_batch(self, size: int) -> list[CaptureRecord]:
        if self._records is None:
            self._stream = open(self._path, "rb")
            self._records = read_capture(self._stream)
        batch = []
        for record in self._records:
            batch.append(record)
            if len(batch) >= size:
                break
        return batch

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


def replay_in_thread(
    reactor: IReactorThreads, path: str | os.PathLike[str], monitor: Pop3Monitor, *, batch: int = 512
) -> Deferred[int]:
    """Like L{replay}, without blocking the reactor: the file is read C{batch} records
    at a time in the reactor's thread pool, and the monitor is fed on the reactor thread.

    @return: fires with the number of frames read, or fails as L{replay} raises.
    """

    async def run() -> int:
        reader = _BatchReader(path)
        count = 0
        try:
            while True:
                records = await deferToThreadPool(reactor, reactor.getThreadPool(), reader.next_batch, batch)
                if not records:
                    return count
                count += _feed(monitor, records)
        finally:
            reader.close()

    return Deferred.fromCoroutine(run())
