"""Tests for L{mailgw.sso.monitor} and L{mailgw.sso.capture}.

Pure tests feed synthetic segments and frames; the integration tests record real POP3
sessions (Python's poplib against the test Dovecot) with tcpdump and replay the file
through the monitor, as recorded and with its segments split, duplicated and
reordered, and capture the same sessions live with the monitor's own C{AF_PACKET}
socket on the loopback interface.  Capturing needs root (C{CAP_NET_RAW}).
"""

from __future__ import annotations

import base64
import imaplib
import ipaddress
import itertools
import poplib
import random
import signal
import subprocess
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorFDSet, IReactorThreads, IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mailgw.sso.capture import (
    MAX_FILTER_PORTS,
    SNAPLEN,
    CaptureService,
    Instruction,
    linktype_for_hatype,
    port_filter,
)
from mailgw.sso.frames import DLT_EN10MB, DLT_RAW, build_frame, parse_frame
from mailgw.sso.monitor import STATISTICS, Pop3Monitor, replay, replay_in_thread
from mailgw.sso.pcapfile import CaptureRecord, read_capture, write_pcap
from mailgw.sso.reassembly import ACK, FIN, PSH, SYN, Packet
from tests.servers.base import is_root, require_binary, wait_for
from tests.servers.dovecot import Dovecot

CLIENT = "10.1.2.3"
SERVER = "192.0.2.10"
PORT = 110
C = "client"
S = "server"
Login = tuple[str, str, tuple[str, int]]

GREETING = (S, b"+OK Dovecot ready.\r\n")
USER_PASS_OK = [
    GREETING,
    (C, b"USER alice\r\n"),
    (S, b"+OK\r\n"),
    (C, b"PASS alice-mail\r\n"),
    (S, b"+OK Logged in.\r\n"),
    (C, b"STAT\r\n"),
    (S, b"+OK 0 0\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"+OK Logging out.\r\n"),
]
USER_PASS_FAILED = [
    GREETING,
    (C, b"USER alice\r\n"),
    (S, b"+OK\r\n"),
    (C, b"PASS wrong\r\n"),
    (S, b"-ERR [AUTH] Authentication failed.\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"+OK Logging out\r\n"),
]


def session(
    messages: list[tuple[str, bytes]],
    *,
    client: str = CLIENT,
    port: int = 40000,
    server: str = SERVER,
    isn: tuple[int, int] = (1000, 90000),
) -> list[Packet]:
    """The segments of a whole TCP connection carrying C{messages}, one segment each."""
    c, s = ipaddress.ip_address(client), ipaddress.ip_address(server)
    seq_c, seq_s = isn[0] + 1, isn[1] + 1
    packets = [
        Packet(c, s, port, PORT, isn[0], SYN),
        Packet(s, c, PORT, port, isn[1], SYN | ACK, b"", seq_c),
        Packet(c, s, port, PORT, seq_c, ACK, b"", seq_s),
    ]
    for direction, data in messages:
        if direction == C:
            packets.append(Packet(c, s, port, PORT, seq_c, ACK | PSH, data, seq_s))
            seq_c += len(data)
        else:
            packets.append(Packet(s, c, PORT, port, seq_s, ACK | PSH, data, seq_c))
            seq_s += len(data)
    packets.append(Packet(s, c, PORT, port, seq_s, ACK | FIN, b"", seq_c))
    packets.append(Packet(c, s, port, PORT, seq_c, ACK | FIN, b"", seq_s + 1))
    return packets


class Recorder:
    """Collects the on_login calls."""

    def __init__(self) -> None:
        self.logins: list[Login] = []

    def __call__(self, client_ip: str, user: str, server: tuple[str, int]) -> None:
        self.logins.append((client_ip, user, server))


def monitor(clock: IReactorTime | None = None, **kwargs: Any) -> tuple[Pop3Monitor, Recorder]:
    recorder = Recorder()
    return Pop3Monitor([(SERVER, PORT)], recorder, clock or Clock(), **kwargs), recorder


def feed(mon: Pop3Monitor, packets: list[Packet], now: float = 0.0) -> None:
    for packet in packets:
        mon.packet_received(packet, now)


class MonitorTests(SynchronousTestCase):
    """Pop3Monitor on synthetic traffic."""

    def test_login(self) -> None:
        """A successful USER/PASS login is reported once, with the client's IP and the
        server, and the connection is forgotten at once."""
        mon, recorder = monitor()
        feed(mon, session(USER_PASS_OK)[:-2])  # not the FINs: forgotten before its end
        self.assertEqual(recorder.logins, [(CLIENT, "alice", (SERVER, PORT))])
        stats = mon.statistics()
        self.assertEqual(
            (stats["streams_seen"], stats["logins"], stats["streams_authenticated"], stats["streams_active"]),
            (1, 1, 1, 0),
        )
        self.assertEqual(len(mon), 0)
        self.assertEqual(set(stats), set(STATISTICS))

    def test_failedLogin(self) -> None:
        """A refused login is not reported."""
        mon, recorder = monitor()
        feed(mon, session(USER_PASS_FAILED))
        self.assertEqual(recorder.logins, [])
        self.assertEqual(mon.statistics()["streams_quit"], 1)

    def test_saslLogins(self) -> None:
        """AUTH PLAIN and AUTH LOGIN logins are reported."""
        mon, recorder = monitor()
        plain = base64.b64encode(b"\x00bob\x00pw")
        feed(mon, session([GREETING, (C, b"AUTH PLAIN " + plain + b"\r\n"), (S, b"+OK\r\n")], port=1))
        login = [
            GREETING,
            (C, b"AUTH LOGIN\r\n"),
            (S, b"+ VXNlcm5hbWU6\r\n"),
            (C, base64.b64encode(b"carol") + b"\r\n"),
            (S, b"+ UGFzc3dvcmQ6\r\n"),
            (C, base64.b64encode(b"pw") + b"\r\n"),
            (S, b"+OK\r\n"),
        ]
        feed(mon, session(login, port=2))
        self.assertEqual([user for _, user, _ in recorder.logins], ["bob", "carol"])

    def test_tls(self) -> None:
        """A connection that goes TLS is counted and ignored."""
        mon, recorder = monitor()
        stls = [GREETING, (C, b"STLS\r\n"), (S, b"+OK Begin TLS.\r\n"), (C, b"USER alice\r\nPASS x\r\n")]
        feed(mon, session([*stls, (S, b"+OK\r\n+OK\r\n")]))
        self.assertEqual(recorder.logins, [])
        self.assertEqual(mon.statistics()["streams_tls"], 1)

    def test_garbage(self) -> None:
        """A connection that is not POP3 is dropped and counted."""
        mon, _ = monitor()
        feed(mon, session([(S, b"SSH-2.0-OpenSSH_9.2\r\n"), (C, b"USER a\r\n"), (S, b"+OK\r\n")]))
        stats = mon.statistics()
        self.assertEqual((stats["streams_garbage"], stats["streams_dropped"], stats["streams_active"]), (1, 1, 0))

    def test_interleaved(self) -> None:
        """Concurrent connections of several clients, their segments interleaved, each
        reported with its own client's address."""
        mon, recorder = monitor()
        first = session(USER_PASS_OK, client="10.0.0.1", port=5000)
        second = session(USER_PASS_FAILED, client="10.0.0.2", port=5000)
        third = session(USER_PASS_OK, client="10.0.0.3", port=5000)
        for packets in itertools.zip_longest(second, first, third):
            feed(mon, [packet for packet in packets if packet is not None])
        self.assertEqual(
            recorder.logins, [("10.0.0.1", "alice", (SERVER, PORT)), ("10.0.0.3", "alice", (SERVER, PORT))]
        )

    def test_otherServers(self) -> None:
        """Logins to servers that are not monitored are not reported."""
        mon, recorder = monitor()
        feed(mon, session(USER_PASS_OK, server="192.0.2.99"))
        self.assertEqual(recorder.logins, [])
        self.assertEqual(mon.statistics()["streams_seen"], 0)

    def test_frames(self) -> None:
        """Frames are parsed and counted: TCP segments followed, others counted."""
        mon, recorder = monitor()
        for packet in session(USER_PASS_OK):
            mon.frame_received(build_frame(packet, vlan=7), DLT_EN10MB, 0.0)
        fragment = bytearray(build_frame(session(USER_PASS_OK)[0]))
        fragment[20] = 0x20  # more fragments
        mon.frame_received(bytes(fragment), DLT_EN10MB)
        mon.frame_received(b"\xff" * 12 + b"\x08\x06" + b"\x00" * 28, DLT_EN10MB)  # ARP
        mon.frame_received(b"\x45\x00", DLT_RAW)
        mon.frame_received(b"x", 9999)
        stats = mon.statistics()
        self.assertEqual(recorder.logins, [(CLIENT, "alice", (SERVER, PORT))])
        self.assertEqual(
            [stats[k] for k in ("frames_fragment", "frames_not_tcp", "frames_malformed", "frames_unsupported")],
            [1, 1, 1, 1],
        )

    def test_cap(self) -> None:
        """Beyond max_streams the oldest connection is dropped and counted; the newest
        still logs in."""
        mon, recorder = monitor(max_streams=2)
        half_open = [session([GREETING], port=p)[:3] for p in (1, 2, 3)]
        for packets in half_open:
            feed(mon, packets)
        feed(mon, session(USER_PASS_OK, port=4))
        stats = mon.statistics()
        # Left: the third half-open connection (the fourth was forgotten after its login).
        self.assertEqual((stats["streams_evicted"], stats["streams_dropped"], len(mon)), (2, 2, 1))
        self.assertEqual(len(recorder.logins), 1)

    def test_idle(self) -> None:
        """Connections silent for idle_timeout are forgotten, on the clock given."""
        clock = Clock()
        mon, _ = monitor(clock, idle_timeout=60, expire_interval=10)
        feed(mon, session([GREETING], port=1)[:3], now=clock.seconds())
        self.assertEqual(len(mon), 1)
        clock.advance(61)
        mon.packet_received(session([GREETING], port=2)[0])
        self.assertEqual((len(mon), mon.statistics()["streams_expired"]), (1, 1))
        clock.advance(61)
        mon.expire()
        self.assertEqual(len(mon), 0)

    def test_flood(self) -> None:
        """A flood of half-open connections and random payloads keeps the monitor within
        its bounds, in what it holds and in memory measured by tracemalloc."""
        rng = random.Random(12)
        cap = 64
        mon, recorder = monitor(max_streams=cap, window=4096)
        packets = []
        for port in range(1, 3001):
            c, s = ipaddress.ip_address(CLIENT), ipaddress.ip_address(SERVER)
            packets.append(Packet(c, s, port, PORT, 0, SYN))
            packets.append(Packet(s, c, PORT, port, 0, SYN | ACK, b"", 1))
            # In order: a partial line for each dialogue; out of order: a buffered piece.
            packets.append(Packet(s, c, PORT, port, 1, ACK, b"+OK " + rng.randbytes(900).replace(b"\n", b"")))
            packets.append(Packet(c, s, port, PORT, 1, ACK, b"USER " + rng.randbytes(900).replace(b"\n", b"")))
            packets.append(Packet(c, s, port, PORT, 2001, ACK, rng.randbytes(2000)))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            feed(mon, packets)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(len(mon), cap)
        self.assertEqual(mon.statistics()["streams_evicted"], 3000 - cap)
        self.assertLessEqual(mon.buffered_bytes(), cap * (2 * 4096 + 2 * 1024))
        # About 4 KB of traffic per connection: 3000 unbounded connections would hold 12 MB.
        self.assertLess(held, cap * 12_000, f"{held} bytes held")
        self.assertEqual(recorder.logins, [])


class ReplayTests(SynchronousTestCase):
    """replay() of capture files written from synthetic sessions."""

    def test_replay(self) -> None:
        """A pcap file of several sessions gives exactly the successful logins."""
        packets = session(USER_PASS_FAILED, port=1) + session(USER_PASS_OK, port=2)
        path = Path(self.mktemp())
        with path.open("wb") as stream:
            records = (CaptureRecord(float(i), DLT_EN10MB, build_frame(p), 0) for i, p in enumerate(packets))
            write_pcap(stream, records, linktype=DLT_EN10MB)
        mon, recorder = monitor()
        self.assertEqual(replay(path, mon), len(packets))
        self.assertEqual(recorder.logins, [(CLIENT, "alice", (SERVER, PORT))])


class ReplayInThreadTests(TestCase):
    """replay_in_thread() reads in the thread pool and feeds on the reactor thread."""

    async def test_replayInThread(self) -> None:
        """The file is read in batches; the logins are the same as with replay()."""
        packets = session(USER_PASS_OK, port=1) + session(USER_PASS_OK, client="10.9.9.9", port=2)
        path = Path(self.mktemp())
        with path.open("wb") as stream:
            write_pcap(
                stream, (CaptureRecord(0.0, DLT_EN10MB, build_frame(p), 0) for p in packets), linktype=DLT_EN10MB
            )
        mon, recorder = monitor()
        reactor: IReactorThreads = _reactor  # type: ignore[assignment]
        count = await replay_in_thread(reactor, path, mon, batch=3)
        self.assertEqual(count, len(packets))
        self.assertEqual([ip for ip, _, _ in recorder.logins], [CLIENT, "10.9.9.9"])


# -- the kernel filter -------------------------------------------------------------------


def run_bpf(program: list[Instruction], frame: bytes) -> int:
    """A classic BPF interpreter for the instructions the filters use (loads past the
    end of the frame drop it, as in the kernel)."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (0x28, 0x48):  # ldh [k] / [x + k]
            offset = k + (x if code == 0x48 else 0)
            if offset + 2 > len(frame):
                return 0
            a = int.from_bytes(frame[offset : offset + 2], "big")
        elif code == 0x30:  # ldb [k]
            if k >= len(frame):
                return 0
            a = frame[k]
        elif code == 0xB1:  # ldxb 4*([k]&0xf)
            if k >= len(frame):
                return 0
            x = 4 * (frame[k] & 0x0F)
        elif code == 0x54:  # and #k
            a &= k
        elif code == 0x15:  # jeq #k
            pc += jt if a == k else jf
        elif code == 0x45:  # jset #k
            pc += jt if a & k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def frame_for(sport: int, dport: int, *, v6: bool = False, vlan: int | None = None) -> bytes:
    src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("10.0.0.1", "10.0.0.2")
    packet = Packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport, 1, ACK, b"x")
    return build_frame(packet, vlan=vlan)


class FilterTests(SynchronousTestCase):
    """port_filter: the classic BPF program of the capture socket."""

    def test_ports(self) -> None:
        """TCP from or to a monitored port passes, in IPv4 and IPv6; other ports, UDP,
        ICMPv6 and ARP are dropped; fragments and in-line VLAN tags pass for the
        monitor to count and parse."""
        program = port_filter([110, 1110])
        self.assertEqual(run_bpf(program, frame_for(40000, 110)), SNAPLEN)
        self.assertEqual(run_bpf(program, frame_for(1110, 40000)), SNAPLEN)
        self.assertEqual(run_bpf(program, frame_for(40000, 110, v6=True)), SNAPLEN)
        self.assertEqual(run_bpf(program, frame_for(110, 40000, v6=True)), SNAPLEN)
        self.assertEqual(run_bpf(program, frame_for(40000, 111)), 0)
        self.assertEqual(run_bpf(program, frame_for(40000, 25, v6=True)), 0)
        udp = bytearray(frame_for(40000, 110))
        udp[23] = 17
        self.assertEqual(run_bpf(program, bytes(udp)), 0)
        icmp6 = bytearray(frame_for(40000, 110, v6=True))
        icmp6[20] = 58
        self.assertEqual(run_bpf(program, bytes(icmp6)), 0)
        self.assertEqual(run_bpf(program, b"\xff" * 12 + b"\x08\x06" + b"\x00" * 28), 0)
        fragment = bytearray(frame_for(40000, 25))
        fragment[20] = 0x20
        self.assertEqual(run_bpf(program, bytes(fragment)), SNAPLEN)
        self.assertEqual(run_bpf(program, frame_for(40000, 25, vlan=3)), SNAPLEN)
        self.assertEqual(run_bpf(program, b"\x00" * 13), 0)

    def test_ipv4Options(self) -> None:
        """The TCP ports are found behind IPv4 options."""
        frame = bytearray(frame_for(40000, 110))
        ip = frame[14:34]
        ip[0] = 0x46
        ip[2:4] = (int.from_bytes(ip[2:4], "big") + 4).to_bytes(2, "big")
        options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
        with_options = bytes(frame[:14] + ip + options + frame[34:])
        self.assertEqual(run_bpf(port_filter([110]), with_options), SNAPLEN)
        self.assertEqual(parse_frame(with_options).dport, 110)  # type: ignore[union-attr]

    def test_rawIp(self) -> None:
        """The program for raw IP devices reads the IP header at offset 0."""
        program = port_filter([110], linktype=DLT_RAW)
        self.assertEqual(run_bpf(program, frame_for(40000, 110)[14:]), SNAPLEN)
        self.assertEqual(run_bpf(program, frame_for(40000, 110, v6=True)[14:]), SNAPLEN)
        self.assertEqual(run_bpf(program, frame_for(40000, 111)[14:]), 0)

    def test_manyPorts(self) -> None:
        """Beyond MAX_FILTER_PORTS every TCP segment passes (jumps are 8-bit)."""
        many = port_filter(range(1, MAX_FILTER_PORTS + 2))
        self.assertEqual(run_bpf(many, frame_for(60000, 60001)), SNAPLEN)
        most = port_filter(range(1, MAX_FILTER_PORTS + 1))
        self.assertEqual(run_bpf(most, frame_for(60000, 60001)), 0)
        self.assertEqual(run_bpf(most, frame_for(60000, MAX_FILTER_PORTS)), SNAPLEN)
        self.assertRaises(ValueError, port_filter, [70000])
        self.assertRaises(ValueError, port_filter, [1], linktype=113)

    def test_sameAsTcpdump(self) -> None:
        """On unfragmented, untagged frames the program accepts exactly what tcpdump's
        compilation of "tcp port P" accepts."""
        tcpdump = require_binary("tcpdump", "tcpdump")
        output = subprocess.run(
            [tcpdump, "-ddd", "-y", "EN10MB", "tcp port 110 or tcp port 995"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout.split("\n")
        reference = [tuple(int(field) for field in line.split()) for line in output[1 : int(output[0]) + 1]]
        ours = port_filter([110, 995])
        rng = random.Random(3)
        for _ in range(400):
            ports = [rng.choice([110, 995, 111, 25, rng.randrange(65536)]) for _ in range(2)]
            frame = bytearray(frame_for(*ports, v6=rng.random() < 0.5))
            if rng.random() < 0.2:
                frame[23 if frame[12:14] == b"\x08\x00" else 20] = rng.choice([17, 1, 58])
            expected = run_bpf(reference, bytes(frame)) > 0  # type: ignore[arg-type]
            self.assertEqual(run_bpf(ours, bytes(frame)) > 0, expected, (ports, bytes(frame).hex()))

    def test_linktypes(self) -> None:
        """Ethernet and loopback devices give Ethernet frames; tun devices raw IP."""
        self.assertEqual(linktype_for_hatype(1), DLT_EN10MB)
        self.assertEqual(linktype_for_hatype(772), DLT_EN10MB)
        self.assertEqual(linktype_for_hatype(65534), DLT_RAW)
        self.assertIsNone(linktype_for_hatype(801))


# -- real traffic ------------------------------------------------------------------------


def require_root() -> None:
    """Skip without root: capturing needs CAP_NET_RAW."""
    if not is_root():
        raise SkipTest("capturing on the loopback interface needs root (CAP_NET_RAW)")


def require_capture() -> str:
    """tcpdump's path; skip (or fail under CI) without it, skip without root."""
    tcpdump = require_binary("tcpdump", "tcpdump")
    require_root()
    return tcpdump


def shortcmd(client: poplib.POP3, line: str) -> bytes:
    """Send one command and read its one-line answer (raising on -ERR)."""
    answer: bytes = client._shortcmd(line)  # type: ignore[attr-defined]
    return answer


def pop3_sessions(dovecot: Dovecot, *, tls: bool = True) -> None:
    """Real poplib sessions: a failed login, USER/PASS, AUTH PLAIN, AUTH LOGIN and a
    login inside STLS (blocking; run it outside the reactor thread)."""
    host, port = dovecot.host, dovecot.pop3_port
    failed = poplib.POP3(host, port, timeout=10)
    failed.user("alice")
    try:
        failed.pass_("wrong-password")
    except poplib.error_proto:
        pass
    else:
        raise AssertionError("Dovecot accepted a wrong password")
    failed.quit()
    client = poplib.POP3(host, port, timeout=10)
    client.user("alice")
    client.pass_("alice-mail")
    client.stat()
    client.quit()
    client = poplib.POP3(host, port, timeout=10)
    shortcmd(client, "AUTH PLAIN " + base64.b64encode(b"\x00alice\x00alice-mail").decode())
    client.quit()
    client = poplib.POP3(host, port, timeout=10)
    shortcmd(client, "AUTH LOGIN")
    shortcmd(client, base64.b64encode(b"alice").decode())
    shortcmd(client, base64.b64encode(b"alice-mail").decode())
    client.quit()
    if tls:
        client = poplib.POP3(host, port, timeout=10)
        client.stls(dovecot.ssl_context())
        client.user("alice")
        client.pass_("alice-mail")
        client.quit()


def record(testcase: SynchronousTestCase, tcpdump: str, port: int, traffic: Callable[[], None]) -> Path:
    """Capture TCP port C{port} on the loopback interface with tcpdump while
    C{traffic} runs; return the pcap file."""
    folder = Path(testcase.mktemp())
    folder.mkdir()
    path, log = folder / "pop3.pcap", folder / "tcpdump.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            # --immediate-mode: libpcap's ring otherwise holds packets up to a second, and
            # those still held when SIGINT comes are never written.
            [tcpdump, "-i", "lo", "-n", "--immediate-mode", "-U", "-B", "8192", "-Z", "root", "-w", str(path),
             f"tcp port {port}"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )

    def stop() -> None:
        if process.poll() is None:
            process.kill()
            process.wait()

    testcase.addCleanup(stop)
    for _ in range(500):  # fixture polling: tcpdump says when its filter is in place
        if b"listening on" in log.read_bytes() or process.poll() is not None:
            break
        wait_for(0.01)
    if process.poll() is not None:
        raise AssertionError(f"tcpdump exited: {log.read_text()}")
    traffic()
    # Let tcpdump write the last segments (FINs), then stop it as a user would: the
    # file must stay the same size for a while (a loaded machine delays tcpdump).
    size, unchanged = -1, 0
    while unchanged < 5:
        current = path.stat().st_size
        unchanged = unchanged + 1 if current == size else 0
        size = current
        wait_for(0.1)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=10)
    return path


def mangle(path: Path, seed: int) -> Path:
    """A copy of the capture with every segment's payload split in pieces, some pieces
    duplicated (with overlapping retransmissions) and neighbouring segments swapped."""
    rng = random.Random(seed)
    with path.open("rb") as stream:
        originals = list(read_capture(stream))
    frames: list[tuple[float, Packet]] = []
    for rec in originals:
        packet = parse_frame(rec.data, rec.linktype)
        assert packet is not None
        payload = packet.payload

        def piece(a: int, b: int, flags: int, p: Packet = packet) -> Packet:
            return Packet(p.src, p.dst, p.sport, p.dport, p.seq + a, flags, p.payload[a:b], p.ack)

        if not payload:
            frames.append((rec.timestamp, packet))
            continue
        cuts = sorted({0, len(payload), *(rng.randrange(len(payload) + 1) for _ in range(3))})
        for a, b in itertools.pairwise(cuts):
            segment = piece(a, b, packet.flags if b == len(payload) else packet.flags & ~FIN)
            frames += [(rec.timestamp, segment)] * (2 if rng.random() < 0.3 else 1)
        if rng.random() < 0.3:
            frames.append((rec.timestamp, piece(rng.randrange(len(payload)), len(payload), packet.flags & ~FIN)))
    for i in range(3, len(frames) - 1):  # the handshake stays first
        if rng.random() < 0.3:
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
    out = path.with_name(f"mangled-{seed}.pcap")
    with out.open("wb") as output:
        write_pcap(output, (CaptureRecord(t, DLT_EN10MB, build_frame(p), 0) for t, p in frames), linktype=DLT_EN10MB)
    return out


class RealTrafficTests(SynchronousTestCase):
    """Real poplib sessions with the test Dovecot, recorded by tcpdump, replayed."""

    def test_replayRecordedSessions(self) -> None:
        """Replaying the recording reports exactly the three successful cleartext
        logins, from 127.0.0.1 as alice, and counts the STLS session; so does every
        replay of the recording with its segments split, duplicated and reordered."""
        tcpdump = require_capture()
        dovecot = Dovecot.started(self, users={"alice": "alice-mail"})
        port = dovecot.pop3_port
        path = record(self, tcpdump, port, lambda: pop3_sessions(dovecot))
        expected = [("127.0.0.1", "alice", ("127.0.0.1", port))] * 3
        for capture in [path, *(mangle(path, seed) for seed in range(3))]:
            recorder = Recorder()
            mon = Pop3Monitor([("127.0.0.1", port)], recorder, Clock())
            replay(capture, mon)
            stats = mon.statistics()
            self.assertEqual(recorder.logins, expected, capture.name)
            self.assertEqual(
                (stats["streams_seen"], stats["streams_tls"], stats["streams_quit"]), (5, 1, 1), capture.name
            )
            self.assertEqual(stats["streams_dropped"], 0)


class LiveCaptureTests(TestCase):
    """The monitor's own AF_PACKET capture on the loopback interface, in the reactor."""

    timeout = 60

    async def test_liveCapture(self) -> None:
        """Real poplib sessions straight to Dovecot are seen live: the successful login
        is reported, the failed one is not, and the kernel filter keeps other ports'
        traffic (here IMAP to the same Dovecot) out of the process."""
        require_root()
        dovecot = Dovecot.started(self, users={"alice": "alice-mail"})
        port = dovecot.pop3_port
        recorder = Recorder()
        reactor: IReactorTime = _reactor  # type: ignore[assignment]
        fdset: IReactorFDSet = _reactor  # type: ignore[assignment]
        mon = Pop3Monitor([(dovecot.host, port)], recorder, reactor)
        service = CaptureService(fdset, "lo", mon.ports, mon.frame_received)
        service.startService()
        self.addCleanup(service.stopService)

        def traffic() -> None:
            imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
            imap.logout()
            pop3_sessions(dovecot, tls=False)

        await deferToThread(traffic)
        for _ in range(500):
            if len(recorder.logins) >= 3:
                break
            await deferLater(_reactor, 0.01, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(recorder.logins, [("127.0.0.1", "alice", ("127.0.0.1", port))] * 3)
        stats = mon.statistics()
        self.assertEqual(stats["packets_foreign"], 0)
        # Loopback shows each packet twice (sent, received): the sent copy is skipped,
        # so duplicates are only real retransmissions (a few at most, on a loaded host).
        self.assertLessEqual(stats["segments_duplicate"], 3)
        self.assertGreaterEqual(stats["streams_quit"], 1)
        assert service.reader is not None
        self.assertGreater(service.reader.statistics()[0], 0)

    def test_unknownInterface(self) -> None:
        """Starting on an interface that does not exist fails at once."""
        require_root()
        service = CaptureService(_reactor, "nosuchif0", [110], lambda frame, linktype: None)  # type: ignore[arg-type]
        self.assertRaises(OSError, service.startService)
