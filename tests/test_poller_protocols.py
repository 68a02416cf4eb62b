"""The poller's protocols without sockets [6]: the POP3 session after login (pipelined
answers, streamed RETR, time limits), the SMTP client, and the message transfer between
them (header block, pausing, relay, discarding), on StringTransports and a Clock."""

from __future__ import annotations

import gc

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailgw.poller import message as msg
from mailgw.poller.delivery import mail_and_rcpt
from mailgw.poller.poll import MessageTransfer, _Watchdog
from mailgw.poller.pop3 import Listing, Pop3Error, Pop3Session, ReadGate
from mailgw.poller.smtp import SmtpClient, SmtpError
from mailgw.upstream import UpstreamTarget
from mailgw.upstream.pop3 import POP3UpstreamLogin


def logged_in(clock: Clock) -> tuple[Pop3Session, StringTransport]:
    transport = StringTransport()
    login = POP3UpstreamLogin(UpstreamTarget("pop.example", 110, "none"), None)
    login.makeConnection(transport)
    result = login.begin_login("user", "secret")
    login.dataReceived(b"+OK ready\r\n+OK\r\n+OK logged in\r\n")
    SynchronousTestCase().successResultOf(result)
    transport.clear()
    return Pop3Session(login, clock, timeout=30), transport


class Consumer:
    def __init__(self) -> None:
        self.data = b""
        self.ended = False
        self.error: Exception | None = None

    def payload(self, data: bytes) -> None:
        self.data += data

    def end(self) -> None:
        self.ended = True

    def failed(self, reason: Exception) -> None:
        self.error = reason


class Pop3SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.session, self.transport = logged_in(self.clock)

    def test_pipelinedListings(self) -> None:
        """UIDL and LIST go out together; answers arriving in one read fire both."""
        uidl = self.session.listing("UIDL")
        listing = self.session.listing("LIST")
        self.assertEqual(self.transport.value(), b"UIDL\r\nLIST\r\n")
        self.session._data(b"+OK\r\n1 a\r\n2 b\r\n.\r\n+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n")
        self.assertEqual(self.successResultOf(uidl).lines, [b"1 a", b"2 b"])
        self.assertEqual(self.successResultOf(listing).lines, [b"1 10", b"2 20"])

    def test_errorListing(self) -> None:
        """-ERR to a listing command gives a Listing with a negative status."""
        d = self.session.listing("UIDL")
        self.session._data(b"-ERR not supported\r\n")
        answer = self.successResultOf(d)
        self.assertIsInstance(answer, Listing)
        self.assertFalse(answer.status.ok)

    def test_overlongListingLine(self) -> None:
        """An over-long line in a listing is counted, not kept, and the rest reads."""
        d = self.session.listing("UIDL")
        self.session._data(b"+OK\r\n1 a\r\n2 " + b"x" * 1000 + b"\r\n3 c\r\n.\r\n")
        answer = self.successResultOf(d)
        self.assertEqual((answer.lines, answer.too_long), ([b"1 a", b"3 c"], 1))

    def test_retrStreams(self) -> None:
        """The RETR body reaches the consumer as it arrives, still stuffed, split
        anywhere; what follows the terminator answers the next command."""
        consumer = Consumer()
        status = self.session.retr(1, consumer)
        dele = self.session.command("DELE", "1")
        wire = b"+OK\r\nSubject: x\r\n\r\n..dot\r\n.\r\n+OK deleted\r\n"
        for byte in wire:
            self.session._data(bytes([byte]))
        self.assertTrue(self.successResultOf(status).ok)
        self.assertEqual(consumer.data, b"Subject: x\r\n\r\n..dot\r\n")
        self.assertTrue(consumer.ended)
        self.assertTrue(self.successResultOf(dele).ok)

    def test_timeout(self) -> None:
        """No answer within the time limit drops the connection and fails the poll."""
        d = self.session.command("NOOP")
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, Pop3Error)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)

    def test_noTimeoutWhilePaused(self) -> None:
        """While the SMTP side has reading paused, silence is not a timeout."""
        consumer = Consumer()
        self.session.retr(1, consumer)
        self.session._data(b"+OK\r\npart")
        self.session.gate.pause("smtp")
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(300)
        self.assertIsNone(consumer.error)
        self.session.gate.resume("smtp")
        self.assertEqual(self.transport.producerState, "producing")
        self.clock.advance(30)
        self.assertIsInstance(consumer.error, Pop3Error)

    def test_unsolicited(self) -> None:
        """Data nobody asked for breaks the session."""
        d = self.session.command("NOOP")
        self.session._data(b"+OK\r\n+OK surprise\r\n")
        self.successResultOf(d)
        self.assertTrue(self.session.broken)
        self.failureResultOf(self.session.command("NOOP"), Pop3Error)

    def test_connectionLost(self) -> None:
        """A lost connection fails what waits, the stream included."""
        consumer = Consumer()
        self.session.retr(1, consumer)
        self.session._data(b"+OK\r\nSubject: x\r\n")
        later = self.session.command("DELE", "1")
        self.session._connection_lost(Failure(Exception("gone")))
        self.assertIsInstance(consumer.error, Pop3Error)
        self.failureResultOf(later, Pop3Error)
        self.successResultOf(self.session.lost)


class SmtpClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = SmtpClient(self.clock, timeout=10, data_timeout=20)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def test_replies(self) -> None:
        """Greeting, multi-line replies and commands in order."""
        self.client.dataReceived(b"220 ready\r\n")
        self.assertEqual(self.successResultOf(self.client.greeting).code, 220)
        d = self.client.command("EHLO", "gw")
        self.assertEqual(self.transport.value(), b"EHLO gw\r\n")
        self.client.dataReceived(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
        self.assertEqual(self.successResultOf(d).lines, ("mx", "PIPELINING", "SIZE 10"))

    def test_timeouts(self) -> None:
        """A command waits C{timeout}, the end of DATA C{data_timeout}."""
        self.client.dataReceived(b"220 ready\r\n")
        d = self.client.end_data()
        self.clock.advance(19)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, SmtpError)
        self.assertFalse(self.client.usable)

    def test_garbage(self) -> None:
        """A line that is no reply breaks the connection."""
        d = self.client.command("NOOP")
        self.client.dataReceived(b"220 ready\r\nhello\r\n")
        self.failureResultOf(d, SmtpError)

    def test_quitInsideData(self) -> None:
        """Inside DATA, quitting drops the connection without writing QUIT (which
        would be message text); outside, QUIT is sent."""
        self.client.dataReceived(b"220 ready\r\n")
        data = self.client.command("DATA")
        self.client.dataReceived(b"354 go on\r\n")
        self.successResultOf(data)
        self.assertTrue(self.client.in_data)
        self.transport.clear()
        self.successResultOf(defer.Deferred.fromCoroutine(self.client.quit()))
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)

    def test_quit(self) -> None:
        """QUIT outside DATA is sent, then the connection closed."""
        self.client.dataReceived(b"220 ready\r\n")
        done = defer.Deferred.fromCoroutine(self.client.quit())
        self.assertEqual(self.transport.value(), b"QUIT\r\n")
        self.client.dataReceived(b"221 bye\r\n")
        self.successResultOf(done)

    def test_lost(self) -> None:
        """A lost connection fails the waiting command and fires C{closed}."""
        self.client.dataReceived(b"220 ready\r\n")
        d = self.client.command("NOOP")
        self.client.connectionLost(Failure(Exception("gone")))
        self.failureResultOf(d, SmtpError)
        self.successResultOf(self.client.closed)


class _CountedTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class EnvelopeTests(SynchronousTestCase):
    """MAIL FROM and RCPT TO: in one write to a server that offers PIPELINING (RFC
    2920), one at a time to one that does not."""

    def client(self, *extensions: str) -> tuple[SmtpClient, _CountedTransport]:
        client = SmtpClient(Clock(), timeout=10, data_timeout=20)
        transport = _CountedTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 ready\r\n")
        client.extensions = {name: () for name in extensions}
        return client, transport

    def test_pipelined(self) -> None:
        """With PIPELINING: one write, the replies read in order."""
        client, transport = self.client("PIPELINING")
        d = defer.Deferred.fromCoroutine(mail_and_rcpt(client, "FROM:<a@x>", ["b@example.com", "c@example.com"]))
        self.assertEqual(transport.writes, 1)
        self.assertEqual(
            transport.value(), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"
        )
        client.dataReceived(b"250 ok\r\n250 ok\r\n550 no such user\r\n")
        mail, rcpts = self.successResultOf(d)
        self.assertEqual((mail.code, [r.code for r in rcpts]), (250, [250, 550]))

    def test_pipelinedMailRefused(self) -> None:
        """A refused MAIL: the RCPT replies are read (and dropped), so that the next
        command's reply is its own."""
        client, _transport = self.client("PIPELINING")
        d = defer.Deferred.fromCoroutine(mail_and_rcpt(client, "FROM:<a@x>", ["b@example.com"]))
        client.dataReceived(b"553 sender refused\r\n503 MAIL first\r\n")
        mail, rcpts = self.successResultOf(d)
        self.assertEqual((mail.code, rcpts), (553, []))
        noop = client.command("NOOP")
        client.dataReceived(b"250 noop\r\n")
        self.assertEqual(self.successResultOf(noop).code, 250)

    def test_pipelinedConnectionLost(self) -> None:
        """The connection breaks under a pipelined group: one SmtpError, and no
        unhandled failure left in the other replies."""
        client, _ = self.client("PIPELINING")
        d = defer.Deferred.fromCoroutine(mail_and_rcpt(client, "FROM:<a@x>", ["b@example.com", "c@example.com"]))
        client.connectionLost(Failure(Exception("gone")))
        self.failureResultOf(d, SmtpError)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_oneAtATime(self) -> None:
        """Without PIPELINING: MAIL, then each RCPT after the previous reply."""
        client, transport = self.client()
        d = defer.Deferred.fromCoroutine(mail_and_rcpt(client, "FROM:<a@x>", ["b@example.com", "c@example.com"]))
        self.assertEqual(transport.value(), b"MAIL FROM:<a@x>\r\n")
        transport.clear()
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual(transport.value(), b"RCPT TO:<b@example.com>\r\n")
        transport.clear()
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual(transport.value(), b"RCPT TO:<c@example.com>\r\n")
        client.dataReceived(b"450 later\r\n")
        _mail, rcpts = self.successResultOf(d)
        self.assertEqual([r.code for r in rcpts], [250, 450])

    def test_dataNotPipelined(self) -> None:
        """DATA cannot be part of a pipelined group (its reply decides what follows)."""
        client, _ = self.client("PIPELINING")
        self.assertRaises(ValueError, client.pipeline, [("MAIL", "FROM:<>"), ("DATA", "")])


class TransferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reading = StringTransport()
        self.gate = ReadGate(self.reading)
        self.transfer = MessageTransfer(self.gate)
        self.smtp = SmtpClient(Clock())
        self.smtp_transport = StringTransport()
        self.smtp.makeConnection(self.smtp_transport)
        self.smtp.dataReceived(b"220 ready\r\n")
        self.successResultOf(self.smtp.greeting)

    def test_headersThenRelay(self) -> None:
        """The header block is read, reading pauses for the decision, and the relay
        writes the trace, the headers, the bytes held meanwhile and the rest."""
        self.transfer.payload(b"To: a@example.com\r\n\r\nfirst body line\r\n")
        headers = self.successResultOf(self.transfer.decided)
        assert isinstance(headers, msg.HeaderBlock)
        self.assertEqual(headers.get("To"), "a@example.com")
        self.assertEqual(self.reading.producerState, "paused")
        self.transfer.payload(b"..second\r\n")
        self.transfer.start_relay(self.smtp, b"Received: x\r\n")
        self.assertEqual(self.reading.producerState, "producing")
        self.assertIs(self.smtp_transport.producer, self.gate)
        self.transfer.payload(b"third\r\n")
        self.transfer.end()
        self.assertIsNone(self.successResultOf(self.transfer.finished))
        self.assertEqual(
            self.smtp_transport.value(),
            b"Received: x\r\nTo: a@example.com\r\n\r\nfirst body line\r\n..second\r\nthird\r\n",
        )
        self.assertIsNone(self.smtp_transport.producer)

    def test_backPressure(self) -> None:
        """The SMTP transport pausing the gate pauses reading from the POP3 server."""
        self.transfer.payload(b"To: a@example.com\r\n\r\n")
        self.transfer.start_relay(self.smtp, b"")
        self.gate.pauseProducing()
        self.assertEqual(self.reading.producerState, "paused")
        self.gate.resumeProducing()
        self.assertEqual(self.reading.producerState, "producing")

    def test_headersOnly(self) -> None:
        """A message of headers only (no blank line) is complete at the terminator."""
        self.transfer.payload(b"To: a@example.com\r\nSubject: s\r\n")
        self.assertNoResult(self.transfer.decided)
        self.transfer.end()
        headers = self.successResultOf(self.transfer.decided)
        assert isinstance(headers, msg.HeaderBlock)
        self.transfer.start_relay(self.smtp, b"")
        self.successResultOf(self.transfer.finished)
        self.assertEqual(self.smtp_transport.value(), b"To: a@example.com\r\nSubject: s\r\n")

    def test_malformedIsDrained(self) -> None:
        """A malformed message is decided at once and the rest thrown away."""
        self.transfer.payload(b"Hello there\r\n")
        outcome = self.successResultOf(self.transfer.decided)
        assert isinstance(outcome, msg.MalformedMessage)
        self.assertEqual(outcome.kind, "no_headers")
        self.transfer.payload(b"x" * 100_000)
        self.transfer.end()
        self.assertIsNone(self.successResultOf(self.transfer.finished))
        self.assertEqual(self.reading.producerState, "producing")

    def test_headerBlockLimit(self) -> None:
        """More than 256 KiB of headers is refused without keeping them."""
        line = b"X-Filler: " + b"y" * 1000 + b"\r\n"
        for _ in range(300):
            self.transfer.payload(line)
        outcome = self.successResultOf(self.transfer.decided)
        assert isinstance(outcome, msg.MalformedMessage)
        self.assertEqual(outcome.kind, "header_too_large")

    def test_multipartPreamble(self) -> None:
        """A multipart message is decided at its first boundary."""
        self.transfer.payload(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\npreamble\r\n')
        self.assertNoResult(self.transfer.decided)
        self.transfer.payload(b"--b\r\n")
        self.assertIsInstance(self.successResultOf(self.transfer.decided), msg.HeaderBlock)

    def test_pop3Broken(self) -> None:
        """The POP3 connection breaking during the relay ends the transfer with the
        error (the caller then aborts the SMTP transaction)."""
        self.transfer.payload(b"To: a@example.com\r\n\r\n")
        self.transfer.start_relay(self.smtp, b"")
        error = Pop3Error("gone")
        self.transfer.failed(error)
        self.assertIs(self.successResultOf(self.transfer.finished), error)

    def test_smtpBroken(self) -> None:
        """The SMTP connection breaking during the relay drains the message and says so."""
        self.transfer.payload(b"To: a@example.com\r\n\r\n")
        self.transfer.start_relay(self.smtp, b"")
        self.smtp.connectionLost(Failure(Exception("gone")))
        self.transfer.payload(b"more\r\n")
        self.transfer.end()
        self.assertIsNone(self.successResultOf(self.transfer.finished))
        self.assertIsInstance(self.transfer.smtp_error, SmtpError)
        self.assertEqual(self.reading.producerState, "producing")

    def test_discard(self) -> None:
        """Discarding after the decision resumes reading and drops the rest."""
        self.transfer.payload(b"To: a@example.com\r\n\r\nbody\r\n")
        self.successResultOf(self.transfer.decided)
        self.transfer.discard()
        self.assertEqual(self.reading.producerState, "producing")
        self.transfer.end()
        self.successResultOf(self.transfer.finished)


class WatchdogTests(SynchronousTestCase):
    def test_stalledRelay(self) -> None:
        """No byte relayed for the time limit: the SMTP connection is dropped; bytes
        flowing keep it alive."""
        clock = Clock()
        transfer = MessageTransfer(ReadGate(StringTransport()))
        smtp = SmtpClient(clock)
        smtp_transport = StringTransport()
        smtp.makeConnection(smtp_transport)
        smtp.dataReceived(b"220 ready\r\n")
        self.successResultOf(smtp.greeting)
        transfer.payload(b"To: a@example.com\r\n\r\n")
        transfer.start_relay(smtp, b"")
        watchdog = _Watchdog(clock, 10, transfer, smtp)
        clock.advance(5)
        transfer.payload(b"more\r\n")
        clock.advance(5)
        self.assertTrue(smtp.usable)
        clock.advance(10)
        self.assertFalse(smtp.usable)
        watchdog.stop()


class GateTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        """Reading resumes only when every reason to pause is gone."""
        transport = StringTransport()
        gate = ReadGate(transport)
        gate.pause("decide")
        gate.pause("smtp")
        gate.resume("decide")
        self.assertEqual(transport.producerState, "paused")
        gate.resume("smtp")
        self.assertEqual(transport.producerState, "producing")
        gate.resume("smtp")
        self.assertEqual(transport.producerState, "producing")
