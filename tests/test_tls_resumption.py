"""TLS resumption on the proxies' ports [4.1, 10]: a client that reconnects resumes
its TLS session (TLS 1.3 tickets, and the TLS 1.2 session cache), so the second
handshake costs no certificate signature."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.edge import in_thread, read_until
from tests.gateway import start_gateway
from tests.servers.base import free_port
from tests.servers.pki import TestPKI


class ResumptionTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        pop3s = {"default_server": {"host": "127.0.0.1", "port": free_port(), "tls": "none"}}
        self.gateway = start_gateway(self, self.pki, {"alice": ("alice-pw", None)}, pop3s)

    def reconnect(self, version: ssl.TLSVersion) -> tuple[bool, bool]:
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        context.minimum_version = context.maximum_version = version
        port = self.gateway.port()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as first:
                read_until(first, b"\r\n")  # TLS 1.3 tickets come after the handshake
                session = first.session
                first_reused = bool(first.session_reused)
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as second:
                read_until(second, b"\r\n")
                return first_reused, bool(second.session_reused)

    async def test_tls13TicketResumes(self) -> None:
        """A TLS 1.3 client reconnecting with its ticket resumes."""
        self.assertEqual(await in_thread(self.reconnect, ssl.TLSVersion.TLSv1_3), (False, True))

    async def test_tls12SessionResumes(self) -> None:
        """A TLS 1.2 client reconnecting with its session resumes."""
        self.assertEqual(await in_thread(self.reconnect, ssl.TLSVersion.TLSv1_2), (False, True))
