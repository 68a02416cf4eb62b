"""What one TLS connection object costs in the OpenSSL each proxy runs: the heap that
``SSL_new`` takes, before any handshake (glibc's ``mallinfo2`` in a fresh process).

nginx uses the system's ``libssl``; so do mailgw's implicit-TLS listeners since
``mailgw.systls`` (Python's ssl module). Its STARTTLS ports and upstream connections use
pyOpenSSL on the OpenSSL that ``cryptography``'s wheel links in statically, as all of its
TLS did before. The idle-session figure of each proxy contains one such object per client
connection, so a difference here is a difference per idle session that neither proxy's
own code decides (OpenSSL 3.2's record layer about doubled it).

``python -m bench.sslnew pyopenssl|system`` prints ``{"version": ..., "kib": ...}``.
``python -m bench.sslnew handshake`` prints the server's CPU per full TLS 1.3 handshake
(ECDSA P-256, in memory, Python's ssl as the client) through pyOpenSSL, as mailgw
does it, and through Python's ssl module on the system's OpenSSL (the library nginx
uses, without nginx's own code).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

#: connection objects made per measurement
COUNT = 2000


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _heap_in_use() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _per_object(new: Any, count: int) -> float:
    kept = [new() for _ in range(10)]  # the library's one-time allocations
    before = _heap_in_use()
    kept = [new() for _ in range(count)]
    after = _heap_in_use()
    del kept  # freed with the process
    return (after - before) / count / 1024


def measure_pyopenssl(count: int = COUNT) -> dict[str, Any]:
    """The OpenSSL under pyOpenSSL (``cryptography``'s)."""
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return {"version": version, "kib": _per_object(lambda: SSL.Connection(context, None), count)}


def measure_system(count: int = COUNT) -> dict[str, Any]:
    """The system's ``libssl`` (what Debian's nginx links)."""
    name = ctypes.util.find_library("ssl")
    if name is None:
        raise RuntimeError("no system libssl (package libssl3)")
    libssl = ctypes.CDLL(name)
    libssl.TLS_server_method.restype = ctypes.c_void_p
    libssl.SSL_CTX_new.restype = ctypes.c_void_p
    libssl.SSL_CTX_new.argtypes = [ctypes.c_void_p]
    libssl.SSL_new.restype = ctypes.c_void_p
    libssl.SSL_new.argtypes = [ctypes.c_void_p]
    libssl.OpenSSL_version.restype = ctypes.c_char_p
    libssl.OpenSSL_version.argtypes = [ctypes.c_int]
    context = libssl.SSL_CTX_new(libssl.TLS_server_method())
    version = libssl.OpenSSL_version(0).decode()
    # Two memory BIOs each, as pyOpenSSL's connections have (Twisted's TLS).
    libssl.BIO_s_mem.restype = ctypes.c_void_p
    libssl.BIO_new.restype = ctypes.c_void_p
    libssl.BIO_new.argtypes = [ctypes.c_void_p]
    libssl.SSL_set_bio.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

    def new() -> int:
        ssl = libssl.SSL_new(context)
        libssl.SSL_set_bio(ssl, libssl.BIO_new(libssl.BIO_s_mem()), libssl.BIO_new(libssl.BIO_s_mem()))
        return int(ssl)

    return {"version": version, "kib": _per_object(new, count)}


def _handshake_cpu(count: int) -> dict[str, Any]:
    import ssl
    import tempfile
    import time
    from pathlib import Path

    from OpenSSL import SSL

    from mailgw.tls import ServerTLS
    from tests.servers.pki import TestPKI

    pki = TestPKI(Path(tempfile.mkdtemp(prefix="sslnew-")))
    cert, key = pki.server_cert(["localhost"], file_name="server")
    client = ssl.create_default_context(cafile=str(pki.ca_path))
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    pyopenssl = ServerTLS(Path(cert), Path(key))
    system = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    system.load_cert_chain(str(cert), str(key))

    def handshake(server_step: Callable[[bytes], bytes]) -> float:
        """The server's CPU seconds for one handshake with a fresh client;
        C{server_step} takes the client's bytes and returns the server's answer."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        peer = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
        spent = 0.0
        for _ in range(10):
            try:
                peer.do_handshake()
                return spent
            except ssl.SSLWantReadError:
                pass
            started = time.thread_time()
            answer = server_step(outgoing.read())
            spent += time.thread_time() - started
            incoming.write(answer)
        raise RuntimeError("no handshake")

    def through_pyopenssl() -> float:
        server = pyopenssl.serverConnectionForTLS(None)  # type: ignore[arg-type]
        server.set_accept_state()

        def step(data: bytes) -> bytes:
            server.bio_write(data)
            try:
                server.do_handshake()
            except SSL.WantReadError:
                pass
            return server.bio_read(65536)

        return handshake(step)

    def through_system() -> float:
        server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = system.wrap_bio(server_in, server_out, server_side=True)

        def step(data: bytes) -> bytes:
            server_in.write(data)
            try:
                server.do_handshake()
            except ssl.SSLWantReadError:
                pass
            return server_out.read()

        return handshake(step)

    result: dict[str, Any] = {"system_version": ssl.OPENSSL_VERSION}
    for name, one in (("pyopenssl_ms", through_pyopenssl), ("system_ms", through_system)):
        for _ in range(20):
            one()  # warm-up
        result[name] = 1000 * sum(one() for _ in range(count)) / count
    return result


def measure(which: str) -> dict[str, Any]:
    """The measurement C{which} ("pyopenssl" or "system") in a fresh process."""
    output = subprocess.run(  # noqa: S603 (this interpreter, a fixed argument list)
        [sys.executable, "-m", "bench.sslnew", which], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    return dict(json.loads(output))


def main(argv: list[str]) -> int:
    if argv not in (["pyopenssl"], ["system"], ["handshake"]):
        print("usage: python -m bench.sslnew pyopenssl|system|handshake", file=sys.stderr)
        return 2
    if argv == ["handshake"]:
        result = _handshake_cpu(500)
    else:
        result = measure_pyopenssl() if argv == ["pyopenssl"] else measure_system()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
