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

    def connect(self, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession, bool]:
        """One connection that reads the greeting: (its session, whether it resumed)."""
        with socket.create_connection(("127.0.0.1", self.gateway.port())) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                read_until(tls, b"\r\n")  # TLS 1.3 tickets come after the handshake
                assert tls.session is not None
                return tls.session, bool(tls.session_reused)

    def context(self, version: ssl.TLSVersion) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        context.minimum_version = context.maximum_version = version
        return context

    def reconnect(self, version: ssl.TLSVersion) -> tuple[bool, bool]:
        context = self.context(version)
        session, first_reused = self.connect(context)
        return first_reused, self.connect(context, session)[1]

    async def test_tls13TicketResumes(self) -> None:
        """A TLS 1.3 client reconnecting with its ticket resumes."""
        self.assertEqual(await in_thread(self.reconnect, ssl.TLSVersion.TLSv1_3), (False, True))

    async def test_tls12SessionResumes(self) -> None:
        """A TLS 1.2 client reconnecting with its session resumes."""
        self.assertEqual(await in_thread(self.reconnect, ssl.TLSVersion.TLSv1_2), (False, True))

    async def test_resumesAfterReload(self) -> None:
        """A reload builds a new TLS context; it gets the gateway's ticket key, so a
        session from before the reload resumes after it (TLS 1.3 and TLS 1.2 tickets)."""
        service = self.gateway.service
        assert service is not None
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            context = self.context(version)
            session, _ = await in_thread(self.connect, context)
            before = service.server_tls
            self.assertEqual(service.reload(), [])
            self.assertIsNot(service.server_tls, before)
            _, resumed = await in_thread(self.connect, context, session)
            self.assertTrue(resumed, version)
