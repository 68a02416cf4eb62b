"""The HAProxy fixture (tests/servers/haproxy.py): a real HAProxy from generated
configuration that opens each connection to its backend with a PROXY v2 header naming
the real client, stopped by PID."""

from __future__ import annotations

import os
import socket
import struct
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.servers.base import MissingBinaryError, port_listening, set_environ, test_directory
from tests.servers.haproxy import HAProxy

#: the PROXY protocol v2 signature (HAProxy's proxy-protocol.txt, section 2.2)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class Backend:
    """A one-connection TCP server in a thread: keeps the first bytes it receives."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received = b""
        self.peer: tuple[str, int] | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(20)
        connection, self.peer = self.listener.accept()
        with connection:
            connection.settimeout(10)
            while len(self.received) < 16 + 12 + 5:
                data = connection.recv(4096)
                if not data:
                    break
                self.received += data

    def wait(self) -> None:
        self._thread.join(30)
        self.listener.close()


def parse_v2(data: bytes) -> tuple[str, int, str, int, bytes]:
    """Source address and port, destination address and port of a PROXY v2 TCP4
    header, and what follows it."""
    if not data.startswith(V2_SIGNATURE):
        raise AssertionError(f"no PROXY v2 header: {data!r}")
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    assert version_command == 0x21, hex(version_command)  # v2, PROXY
    assert family == 0x11, hex(family)  # TCP over IPv4
    source, destination, source_port, destination_port = struct.unpack("!4s4sHH", data[16:28])
    rest = data[16 + length :]
    return socket.inet_ntoa(source), source_port, socket.inet_ntoa(destination), destination_port, rest


class HAProxyTests(SynchronousTestCase):
    def test_sendsProxyV2WithRealClient(self) -> None:
        """A client from 127.0.0.3 reaches the backend through HAProxy; the backend's
        first bytes are a PROXY v2 header naming 127.0.0.3 and the client's port, then
        what the client sent."""
        backend = Backend()
        haproxy = HAProxy.started(self, backends={"test": ("127.0.0.1", backend.port)})
        with socket.create_connection(
            ("127.0.0.1", haproxy.ports["test"]), timeout=10, source_address=("127.0.0.3", 0)
        ) as client:
            client.sendall(b"hello")
            backend.wait()
            client_port = client.getsockname()[1]
        source, source_port, destination, destination_port, rest = parse_v2(backend.received)
        self.assertEqual((source, source_port), ("127.0.0.3", client_port))
        self.assertEqual((destination, destination_port), ("127.0.0.1", haproxy.ports["test"]))
        self.assertEqual(rest, b"hello")
        self.assertIn("send-proxy-v2", haproxy.config_path.read_text())

    def test_stoppedByPid(self) -> None:
        """stop() ends the process (by its PID) and frees its ports."""
        haproxy = HAProxy.started(self, backends={"a": ("127.0.0.1", 1), "b": ("127.0.0.1", 2)})
        self.assertEqual(len(set(haproxy.ports.values())), 2)
        pid = haproxy.pid
        assert pid is not None
        haproxy.stop()
        self.assertFalse(haproxy.running)
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        for port in haproxy.ports.values():
            self.assertFalse(port_listening("127.0.0.1", port))

    def test_configurationChecks(self) -> None:
        """No backend, a name HAProxy could misread, an unknown PROXY version: ValueError."""
        directory = test_directory(self)
        self.assertRaises(ValueError, HAProxy, directory, backends={})
        self.assertRaises(ValueError, HAProxy, directory, backends={"a b": ("127.0.0.1", 1)})
        self.assertRaises(ValueError, HAProxy, directory, backends={"a": ("127.0.0.1", 1)}, proxy_protocol="v3")

    def test_missingBinary(self) -> None:
        """Without the binary the test skips naming the Debian package; with CI=true
        it fails instead."""

        class Absent(HAProxy):
            binary_name = "haproxy-not-installed-mailgw-test"

        directory = test_directory(self)
        set_environ(self, "CI", None)
        with self.assertRaises(SkipTest) as skipped:
            Absent(directory, backends={"a": ("127.0.0.1", 1)})
        self.assertIn("apt-get install haproxy", str(skipped.exception))
        set_environ(self, "CI", "true")
        with self.assertRaises(MissingBinaryError) as failed:
            Absent(directory, backends={"a": ("127.0.0.1", 1)})
        self.assertIn("apt-get install haproxy", str(failed.exception))
