"""Hostile and load clients for the edge tests, run as a separate process so that
their sockets, memory and CPU are not counted as the gateway's (the gateway runs in
trial's process).

    python -m tests.floodclient MODE --port P [--count N] [--source ADDR] ...

Modes:
  - ``tcp``: open N TCP connections that never send a byte; print ``ready`` and hold
    them until standard input closes.
  - ``half-hello``: the same, each sending half of a TLS ClientHello.
  - ``tls-idle``: N TLS connections that complete the handshake, read the greeting and
    then say nothing; print ``ready`` and hold them.
  - ``guess``: N threads, each logging in with a wrong POP3 password again and again
    for ``--seconds``; print the number of attempts.
  - ``wrong-and-close``: N connections one after the other (``--parallel`` at a time),
    each sending USER/PASS with a wrong password and closing at once; print ``done``.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return sock


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (Python's ssl, in memory)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _context(cafile: str | None) -> ssl.SSLContext:
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _hold(sockets: list[socket.socket]) -> None:
    print("ready", len(sockets), flush=True)
    sys.stdin.read()
    for sock in sockets:
        sock.close()


def _open_many(count: int, opener: Callable[[], socket.socket]) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    for _ in range(count):
        sockets.append(opener())
    return sockets


def _pop3_wrong_login(port: int, source: str, context: ssl.SSLContext, user: str) -> None:
    with _connect(port, source) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        _read_line(tls)
        tls.sendall(f"USER {user}\r\n".encode())
        _read_line(tls)
        tls.sendall(b"PASS wrong-password\r\n")
        _read_line(tls)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--sources", type=int, default=0, help="wrong-and-close: cycle through 127.0.1.1 … 127.0.1.N")
    parser.add_argument("--cafile")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    context = _context(args.cafile)

    if args.mode == "tcp":
        _hold(_open_many(args.count, lambda: _connect(args.port, args.source)))
    elif args.mode == "half-hello":
        hello = client_hello()

        def half() -> socket.socket:
            sock = _connect(args.port, args.source)
            sock.sendall(hello[: len(hello) // 2])
            return sock

        _hold(_open_many(args.count, half))
    elif args.mode == "tls-idle":

        def idle() -> socket.socket:
            tls = context.wrap_socket(_connect(args.port, args.source), server_hostname="localhost")
            _read_line(tls)
            return tls

        _hold(_open_many(args.count, idle))
    elif args.mode == "guess":
        attempts = [0]
        deadline = time.monotonic() + args.seconds
        lock = threading.Lock()

        def guesser() -> None:
            while time.monotonic() < deadline:
                try:
                    _pop3_wrong_login(args.port, args.source, context, args.user)
                except OSError:
                    time.sleep(0.05)
                with lock:
                    attempts[0] += 1

        threads = [threading.Thread(target=guesser) for _ in range(args.count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("attempts", attempts[0], flush=True)
    elif args.mode == "wrong-and-close":
        lock = threading.Lock()

        counter = [0]

        def wrong_and_close() -> None:
            source = args.source
            if args.sources:
                with lock:
                    counter[0] += 1
                    source = f"127.0.1.{counter[0] % args.sources + 1}"
            with _connect(args.port, source) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
                _read_line(tls)
                tls.sendall(f"USER {args.user}\r\nPASS wrong-password\r\n".encode())
                # ... and gone at once, without waiting for the answer.

        remaining = [args.count]

        def worker() -> None:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                try:
                    wrong_and_close()
                except OSError:
                    pass

        threads = [threading.Thread(target=worker) for _ in range(args.parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("done", flush=True)
    else:
        parser.error(f"unknown mode {args.mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
