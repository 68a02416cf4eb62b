"""mailgw-pop3test says why a TLS handshake failed, in words with the option that
fixes it, not as pyOpenSSL's error tuples."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.servers.dovecot import Dovecot

SCRIPT = Path(sys.executable).parent / "mailgw-pop3test"


class TLSFailureTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users={"alice": "alice-pw"})

    async def pop3test(self, port: int, *args: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            str(SCRIPT), [f"127.0.0.1:{port}", "alice", "--timeout", "5", *args], env=dict(os.environ),
            stdinBytes=b"alice-pw\n",
        )  # fmt: skip
        self.assertEqual(code, 1, out + err)
        text: str = out.decode()
        self.assertNotIn("SSL routines", text)
        return text

    async def test_untrusted(self) -> None:
        """A certificate from a CA not trusted here: OpenSSL's reason and --ca."""
        out = await self.pop3test(self.dovecot.pop3s_port, "--tls", "implicit")
        self.assertIn("certificate verify failed: unable to get local issuer certificate (set --ca)", out)

    async def test_notTLS(self) -> None:
        """Implicit TLS to a plaintext port: the port does not speak TLS, try --tls."""
        out = await self.pop3test(self.dovecot.pop3_port, "--tls", "implicit", "--ca", str(self.dovecot.ca_path))
        self.assertIn("the server does not speak TLS on this port (try --tls starttls or none)", out)
