"""A lean session [10]: what an idle, relaying session keeps.

Once the relay runs, the upstream login client stays as the byte pipe for the whole
session: it keeps nothing of the login (the server's capabilities and answer, the
client's origin, the TLS options; the password was already dropped). Every login to
the same server shares one parsed capability tuple. The session's own state lives in
slots (an instance dict of more than 30 keys is a private, ~1.5 KiB dict in
CPython 3.11)."""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailgw.proxy.core import ProxySession
from mailgw.upstream.imap4 import IMAP4UpstreamLogin
from mailgw.wire import imap4
from mailgw.wire.lines import LineBuffer
from tests.test_forwarding import ORIGIN, start, target
from tests.test_proxy_pop3 import POP3Harness, answers, login_upstream, make_config

CAPABILITIES = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFS LITERAL+ AUTH=PLAIN"


class UpstreamLoginReleasedTests(SynchronousTestCase):
    def test_imapLoginStateDroppedWhenAttached(self) -> None:
        """After a login with ID forwarding, the IMAP login client holds the server's
        capabilities, its answer and the client's origin; attached to the relay, it
        holds none of them, and what the server sends goes to the relay."""
        login = IMAP4UpstreamLogin(target(), object(), origin=ORIGIN)  # type: ignore[arg-type]
        start(login)
        login.dataReceived(b"* OK [CAPABILITY " + CAPABILITIES + b"] ready\r\n")
        login.dataReceived(b"mgw1 OK ID completed.\r\n")
        login.dataReceived(b"mgw2 OK Logged in\r\n")  # no capabilities: it asks for them
        login.dataReceived(b"* CAPABILITY " + CAPABILITIES + b"\r\nmgw3 OK done\r\n* 1 EXISTS\r\n")
        self.assertTrue(self.successResultOf(login.result).startswith(b"OK [CAPABILITY IMAP4rev1 SASL-IR"))
        self.assertIn("IDLE", login._capabilities)
        self.assertIsNotNone(login._ok)
        self.assertIsNotNone(login.origin)

        received: list[bytes] = []
        lost: list[Failure] = []
        early = login.attach(received.append, lost.append)
        self.assertEqual(early, b"* 1 EXISTS\r\n")
        self.assertEqual(
            (login._capabilities, login._raw_capabilities, login._ok, login._chunks),
            ((), b"", None, []),
        )
        self.assertIsNone(login.origin)
        self.assertIsNone(login._tls_options)
        self.assertEqual((login.user, login.password), ("", ""))
        login.dataReceived(b"* 2 EXISTS\r\n")
        self.assertEqual(received, [b"* 2 EXISTS\r\n"])

    def test_capabilitiesParsedOnce(self) -> None:
        """The same CAPABILITY list (a server's answer to every login) gives the same
        tuple object, tagged or untagged."""
        first = imap4.parse_response(b"a1 OK [CAPABILITY " + CAPABILITIES + b"] Logged in")
        second = imap4.parse_response(b"a2 OK [CAPABILITY " + CAPABILITIES + b"] Logged in")
        untagged = imap4.parse_response(b"* CAPABILITY " + CAPABILITIES)
        assert first.capabilities is not None
        self.assertIn("AUTH=PLAIN", first.capabilities)
        self.assertIs(first.capabilities, second.capabilities)
        self.assertIs(untagged.capabilities, first.capabilities)


class SlotsTests(SynchronousTestCase):
    def test_sessionStateInSlots(self) -> None:
        """A relaying POP3 session's instance dict holds only what Twisted's Protocol
        and the subclass set: none of the session's own state."""
        harness = POP3Harness(make_config())
        session, transport = harness.connect()
        answers(transport)
        session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
        login_upstream(harness)
        self.assertEqual(answers(transport)[-1], b"+OK Logged in.")
        self.assertIsNotNone(session.relay)
        own = set(getattr(ProxySession, "__slots__", ()))
        self.assertIn("relay", own)
        self.assertFalse(own & set(vars(session)), vars(session))
        self.assertLessEqual(len(vars(session)), 6, sorted(vars(session)))

    def test_lineBufferHasNoDict(self) -> None:
        """Every session has line buffers (its own, its upstream's): no dict each."""
        self.assertFalse(hasattr(LineBuffer(10), "__dict__"))
        self.assertFalse(hasattr(imap4.CommandReader(), "__dict__"))
