"""The poller end to end [6]: a real Dovecot as the remote POP3 mailbox (implicit TLS,
STLS or plain, certificates verified), a real SMTP receiver as the local domain's mail
server, and a scripted POP3 server for the malformed listings Dovecot never sends."""

from __future__ import annotations

import hashlib
import tracemalloc
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailgw.poller import message as msg
from mailgw.poller.poll import PollReport, PollSettings
from mailgw.state import JournalState
from tests.servers.dovecot import big_message, standard_messages
from tests.servers.poller_fixtures import (
    DOMAIN,
    NODE_NAME,
    REMOTE_PASSWORD,
    PollerHarness,
    message,
    strip_trace,
)
from tests.servers.poller_pop3 import FakePop3Server


def kinds(report: PollReport) -> list[str]:
    return sorted(skipped.kind for skipped in report.skipped)


class PollerTestCase(TestCase):
    timeout = 60

    async def harness(self) -> PollerHarness:
        self.h = await PollerHarness.create(self)
        return self.h

    def delivered(self, recipient: str) -> list[bytes]:
        """The originals of the messages the sink got for C{recipient}, the trace
        header checked and removed."""
        originals = []
        for got in self.h.sink.messages_for(recipient):
            assert got.data is not None
            trace, original = strip_trace(got.data)
            self.assertIn(b"by " + NODE_NAME.encode() + b" (mailgw poller account ", trace)
            originals.append(original)
        return originals


class DistributionTests(PollerTestCase):
    async def test_distribution(self) -> None:
        """Each user at the domain receives exactly the messages addressed to them
        (Delivered-To, X-Envelope-To, To/Cc), byte-identical apart from the trace
        header; the message for nobody at the domain is deleted; the remote mailbox
        is empty afterwards."""
        h = await self.harness()
        to_alice = message([("Delivered-To", "alice@example.com"), ("To", "list@lists.example")])
        to_bob = message([("X-Envelope-To", "<bob@example.com>"), ("To", "someone@else.example")])
        to_both = message([("To", "Alice <alice@example.com>, x@else.example"), ("Cc", "bob@example.com")])
        foreign_envelope = message([("Delivered-To", "remote@isp.example"), ("To", '"Bob B." <bob@example.com>')])
        nobody = message([("To", "foreign@else.example"), ("Delivered-To", "remote@isp.example")])
        dots = standard_messages()[1]  # dot-stuffing, to owner@example.com
        for data in (to_alice, to_bob, to_both, foreign_envelope, nobody, dots):
            h.deliver(data)
        account = await h.add_account()
        report = await h.poll(account["id"])
        self.assertTrue(report.ok, report.error)
        self.assertEqual(
            (report.messages, report.fetched, report.delivered, report.deleted), (6, 6, 5, 6), report.summary()
        )
        self.assertEqual(kinds(report), ["no_recipient"])
        self.assertEqual(self.delivered("alice@example.com"), [to_alice, to_both])
        self.assertEqual(self.delivered("bob@example.com"), [to_bob, to_both, foreign_envelope])
        self.assertEqual(self.delivered("owner@example.com"), [dots])
        self.assertEqual(len(h.sink.messages), 5)
        self.assertEqual(
            [m.rcpt_to for m in h.sink.messages if len(m.rcpt_to) > 1], [["alice@example.com", "bob@example.com"]]
        )
        self.assertEqual(h.sink.messages[0].mail_from, "sender@example.net")
        self.assertEqual(h.remote_count(), 0)
        # A second poll finds nothing.
        report = await h.poll(account["id"])
        self.assertEqual((report.messages, report.fetched, report.delivered), (0, 0, 0))

    async def test_postmaster(self) -> None:
        """With no_recipient_action = "postmaster", the message for nobody goes to
        postmaster@domain and is deleted."""
        h = await self.harness()
        nobody = message([("To", "foreign@else.example")])
        h.deliver(nobody)
        account = await h.add_account(no_recipient_action="postmaster")
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, report.skipped), (1, 1, []))
        self.assertEqual(self.delivered(f"postmaster@{DOMAIN}"), [nobody])
        self.assertEqual(h.remote_count(), 0)

    async def test_leaveOnServer(self) -> None:
        """With leave_on_server the messages are delivered once and stay; with "until
        N days old" they are deleted once N days passed since first seen."""
        h = await self.harness()
        for name in ("alice", "bob"):
            h.deliver(message([("To", f"{name}@example.com")]))
        account = await h.add_account(leave_on_server=True, leave_days=2)
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, report.kept), (2, 0, 2))
        self.assertEqual(h.remote_count(), 2)
        h.clock.offset = 86400
        report = await h.poll(account["id"])
        self.assertEqual((report.fetched, report.delivered, report.deleted, report.kept), (0, 0, 0, 2))
        h.clock.offset = 2 * 86400 + 1
        report = await h.poll(account["id"])
        self.assertEqual((report.fetched, report.delivered, report.deleted), (0, 0, 2))
        self.assertEqual(h.remote_count(), 0)
        self.assertEqual(len(h.sink.messages), 2)

    async def test_leaveOnServerForever(self) -> None:
        """leave_days = 0 keeps the messages for good."""
        h = await self.harness()
        h.deliver(message([("To", "alice@example.com")]))
        account = await h.add_account(leave_on_server=True)
        await h.poll(account["id"])
        h.clock.offset = 3650 * 86400
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, report.kept), (0, 0, 1))
        self.assertEqual(h.remote_count(), 1)

    async def test_duplicateMessageId(self) -> None:
        """A second copy of a delivered Message-ID (in the same poll or a later one)
        is dropped as a duplicate and deleted."""
        h = await self.harness()
        original = message([("To", "alice@example.com")], message_id="<dup@example.net>")
        h.deliver(original)
        h.deliver(original)
        account = await h.add_account()
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, kinds(report)), (1, 2, ["duplicate"]))
        h.deliver(original)
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, kinds(report)), (0, 1, ["duplicate"]))
        self.assertEqual(len(h.sink.messages), 1)

    async def test_loop(self) -> None:
        """A message carrying this gateway's trace for this account is dropped as a
        loop; the trace of another account does not count."""
        h = await self.harness()
        account = await h.add_account()
        ours = msg.trace_header(NODE_NAME, account["id"], "pop.isp.example", 0.0)
        theirs = msg.trace_header(NODE_NAME, account["id"] + 1, "pop.isp.example", 0.0)
        looping = ours + message([("To", "alice@example.com")])
        other = theirs + message([("To", "bob@example.com")])
        h.deliver(looping)
        h.deliver(other)
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, kinds(report)), (1, 2, ["loop"]))
        self.assertEqual(self.delivered("bob@example.com"), [other])
        journal = await h.state.journal(account["id"])
        self.assertEqual(sorted(e.state for e in journal.values()), [JournalState.DELIVERED, JournalState.DROPPED])

    async def test_checkNowJoinsRunningPoll(self) -> None:
        """A second check-now while a poll runs joins it: one poll, one report."""
        h = await self.harness()
        h.deliver(message([("To", "alice@example.com")]))
        account = await h.add_account()
        assert h.service is not None
        first = h.service.poll(account["id"])
        second = defer.Deferred.fromCoroutine(h.service.accounts.check_now(str(account["id"])))
        report = await first
        self.assertIs(await second, report)
        self.assertEqual(len(h.sink.messages), 1)
        self.assertEqual(h.service.metrics[account["id"]].polls, 1)


class FailureTests(PollerTestCase):
    async def test_temporaryFailureAtData(self) -> None:
        """A 4xx to the end of DATA leaves the messages on the server; the next poll
        delivers them, with no possible duplicate reported."""
        h = await self.harness()
        for name in ("alice", "bob"):
            h.deliver(message([("To", f"{name}@example.com")]))
        account = await h.add_account()
        h.sink.data_tempfail = 2
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, kinds(report)), (0, 0, ["temporary", "temporary"]))
        self.assertEqual(h.remote_count(), 2)
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, report.possible_duplicates), (2, 2, []))
        self.assertEqual(h.remote_count(), 0)
        self.assertEqual(len(h.sink.messages), 2)

    async def test_temporaryFailureAtRcpt(self) -> None:
        """A 4xx to one RCPT keeps the whole message for the next poll (nobody gets
        it twice); then every recipient gets it once."""
        h = await self.harness()
        data = message([("To", "alice@example.com, bob@example.com")])
        h.deliver(data)
        account = await h.add_account()
        h.sink.tempfail = {"bob@example.com"}
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, kinds(report)), (0, ["temporary"]))
        self.assertEqual(h.remote_count(), 1)
        h.sink.tempfail = set()
        report = await h.poll(account["id"])
        self.assertEqual(report.delivered, 1)
        self.assertEqual([m.rcpt_to for m in h.sink.messages], [["alice@example.com", "bob@example.com"]])

    async def test_rejectedRecipient(self) -> None:
        """One recipient refused: the others still get the message, which is deleted.
        All refused: no valid recipient, deleted (no_recipient_action delete)."""
        h = await self.harness()
        both = message([("To", "alice@example.com"), ("Cc", "nobody@example.com")])
        only = message([("To", "nobody@example.com")])
        h.deliver(both)
        h.deliver(only)
        account = await h.add_account()
        h.sink.reject = {"nobody@example.com"}
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, kinds(report)), (1, 2, ["no_recipient"]))
        self.assertEqual([m.rcpt_to for m in h.sink.messages], [["alice@example.com"]])
        self.assertEqual(self.delivered("alice@example.com"), [both])

    async def test_rejectedRecipientKeptForPostmaster(self) -> None:
        """All recipients refused with no_recipient_action = "postmaster": the
        postmaster gets it."""
        h = await self.harness()
        h.deliver(message([("To", "nobody@example.com")]))
        account = await h.add_account(no_recipient_action="postmaster")
        h.sink.reject = {"nobody@example.com"}
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted), (1, 1))
        self.assertEqual([m.rcpt_to for m in h.sink.messages], [["postmaster@example.com"]])

    async def test_smtpServerDown(self) -> None:
        """With the SMTP server unreachable the poll stops, nothing is deleted, and the
        next poll (server back) delivers everything."""
        h = await self.harness()
        for name in ("alice", "bob"):
            h.deliver(message([("To", f"{name}@example.com")]))
        account = await h.add_account()
        down = h.make_service(settings=PollSettings(smtp_host="127.0.0.1", smtp_port=1, node_name=NODE_NAME))
        report = await down.poll(account["id"])
        self.assertIn("SMTP server unavailable", report.error or "")
        self.assertEqual((report.delivered, report.deleted), (0, 0))
        self.assertEqual(h.remote_count(), 2)
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted, report.possible_duplicates), (2, 2, []))

    async def test_malformedMessages(self) -> None:
        """A message without headers, one with a 100 KB header line, and broken MIME
        (multipart without boundary, boundary never appearing) are skipped with their
        reasons and left on the server; the others are delivered."""
        h = await self.harness()
        good1 = message([("To", "alice@example.com")])
        no_headers = b"Hello Alice,\r\n\r\nthis has no header at all.\r\n"
        long_line = message([("To", "alice@example.com"), ("X-Long", "y" * 100_000)])
        no_boundary = message([("To", "alice@example.com"), ("Content-Type", "multipart/mixed")], body="x\r\n")
        lost_boundary = message(
            [("To", "alice@example.com"), ("Content-Type", 'multipart/mixed; boundary="b1"')],
            body="no delimiter here\r\n--b2\r\n",
        )
        good2 = message([("To", "bob@example.com")])
        for data in (good1, no_headers, long_line, no_boundary, lost_boundary, good2):
            h.deliver(data)
        account = await h.add_account()
        report = await h.poll(account["id"])
        self.assertTrue(report.ok, report.error)
        self.assertEqual(kinds(report), ["broken_mime", "broken_mime", "header_too_long", "no_headers"], report.skipped)
        self.assertEqual((report.delivered, report.deleted), (2, 2))
        self.assertEqual(self.delivered("alice@example.com"), [good1])
        self.assertEqual(self.delivered("bob@example.com"), [good2])
        self.assertEqual(h.remote_count(), 4)

    async def test_validMultipart(self) -> None:
        """A well-formed multipart message (preamble, parts, 8-bit, base64) passes
        byte-identical."""
        h = await self.harness()
        mime = standard_messages()[2]
        h.deliver(mime)
        account = await h.add_account()
        report = await h.poll(account["id"])
        self.assertEqual(report.delivered, 1, report.skipped)
        self.assertEqual(self.delivered("owner@example.com"), [mime])

    async def test_malformedUidl(self) -> None:
        """A malformed UIDL line (a space in the id) and an over-long one skip their
        messages; the others are delivered and deleted."""
        h = await self.harness()
        messages = [message([("To", f"user{n}@example.com")]) for n in range(1, 5)]
        server = await FakePop3Server.listening(
            self, messages, uidl_lines=[b"1 uid-1", b"2 bad uid", b"3 " + b"x" * 600, b"4 uid-4"]
        )
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertTrue(report.ok, report.error)
        self.assertEqual(kinds(report), ["malformed_uidl"] * 2)
        self.assertEqual([(s.number, s.uidl) for s in report.skipped], [(2, None), (3, None)])
        self.assertEqual(
            sorted(r for m in h.sink.messages for r in m.rcpt_to), ["user1@example.com", "user4@example.com"]
        )
        self.assertEqual(server.deleted, {1, 4})

    async def test_inconsistentUidl(self) -> None:
        """A UIDL shared by two messages, a message listed twice and one missing from
        UIDL are each skipped once; the rest is delivered."""
        h = await self.harness()
        messages = [message([("To", f"user{n}@example.com")]) for n in range(1, 6)]
        server = await FakePop3Server.listening(
            self, messages, uidl_lines=[b"1 same", b"2 same", b"3 uid-3", b"3 uid-3b", b"5 uid-5"]
        )
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertEqual([s.number for s in report.skipped], [1, 2, 3, 4])
        self.assertEqual([m.rcpt_to for m in h.sink.messages], [["user5@example.com"]])
        self.assertEqual(server.deleted, {5})

    async def test_withoutPipelining(self) -> None:
        """Without PIPELINING, UIDL and LIST are sent one after the other."""
        h = await self.harness()
        server = await FakePop3Server.listening(self, [message([("To", "alice@example.com")])], pipelining=False)
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted), (1, 1))
        self.assertEqual([c.split(b" ")[0] for c in server.commands][:5], [b"USER", b"PASS", b"CAPA", b"UIDL", b"LIST"])

    async def test_deleNotAwaitedWithPipelining(self) -> None:
        """To a server that offers PIPELINING, the next RETR goes out without waiting
        for a DELE's answer; every message is still delivered once, and QUIT (sent
        once every DELE is answered, so that the report counts them) applies every
        deletion."""
        h = await self.harness()
        messages = [message([("To", f"user{n}@example.com")]) for n in range(1, 4)]
        server = await FakePop3Server.listening(self, messages, dele_delay=0.05)
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertEqual((report.error, report.delivered, report.deleted), (None, 3, 3))
        self.assertEqual(server.deleted, {1, 2, 3})
        self.assertEqual(len(h.sink.messages), 3)
        self.assertEqual(server.overlapped, 2)  # RETR 2 and RETR 3

    async def test_deleAwaitedWithoutPipelining(self) -> None:
        """Without PIPELINING, each DELE's answer is read before the next command."""
        h = await self.harness()
        messages = [message([("To", f"user{n}@example.com")]) for n in range(1, 4)]
        server = await FakePop3Server.listening(self, messages, dele_delay=0.05, pipelining=False)
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertEqual((report.error, report.delivered, report.deleted), (None, 3, 3))
        self.assertEqual(server.deleted, {1, 2, 3})
        self.assertEqual(server.overlapped, 0)

    async def test_journalCommitsPerMessage(self) -> None:
        """Two journal commits per delivered message after the first: "ending" before
        the final dot, and "delivered" together with the next message's "started"
        (marked before its DATA, as SPEC [6] asks, in one transaction)."""
        h = await self.harness()
        messages = [message([("To", f"user{n}@example.com")]) for n in range(1, 4)]
        server = await FakePop3Server.listening(self, messages)
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        commits: list[list[tuple[str, str]]] = []
        marks = h.state.journal_marks

        def counted(account_id: int, batch: Any, now: float) -> Any:
            commits.append([(uidl, state.value) for uidl, state, _ in batch])
            return marks(account_id, batch, now)

        h.state.journal_marks = counted  # type: ignore[method-assign, assignment]
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted), (3, 3))
        self.assertEqual(
            commits,
            [
                [("uid-1", "started")],
                [("uid-1", "ending")],
                [("uid-1", "delivered"), ("uid-2", "started")],
                [("uid-2", "ending")],
                [("uid-2", "delivered"), ("uid-3", "started")],
                [("uid-3", "ending")],
                [("uid-3", "delivered")],
            ],
        )

    async def test_startedAheadThenSkipped(self) -> None:
        """A message marked "started" ahead that is then skipped (malformed) goes back
        to "seen": a later poll does not take it for an interrupted delivery."""
        h = await self.harness()
        messages = [message([("To", f"user{n}@example.com")]) for n in range(1, 4)]
        messages[1] = b"no header line at all\r\n"
        server = await FakePop3Server.listening(self, messages)
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertEqual(report.delivered, 2)
        journal = await h.state.journal(account["id"])
        self.assertEqual(journal["uid-2"].state.value, "seen")

    async def test_startedAheadThenDropped(self) -> None:
        """A message marked "started" ahead that is then dropped (no recipient at the
        domain) stays "dropped": its "started" is not undone over it."""
        h = await self.harness()
        messages = [message([("To", "user1@example.com")]), message([("To", "someone@elsewhere.example")])]
        server = await FakePop3Server.listening(self, messages)
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.deleted), (1, 2))
        journal = await h.state.journal(account["id"])
        self.assertEqual(journal["uid-2"].state.value, "dropped")

    async def test_keptMessageNotStartedAhead(self) -> None:
        """With leave_on_server, a delivered message kept on the server is never
        marked "started" ahead (which would deliver it again on the next poll)."""
        h = await self.harness()
        old, new = message([("To", "user1@example.com")]), message([("To", "user2@example.com")])
        server = await FakePop3Server.listening(self, [old], uidl_lines=[b"1 old"])
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None, leave_on_server=True)
        self.assertEqual((await h.poll(account["id"])).delivered, 1)
        server.messages, server.uidl_lines = [new, old], [b"1 new", b"2 old"]
        self.assertEqual((await h.poll(account["id"])).delivered, 1)
        journal = await h.state.journal(account["id"])
        self.assertEqual((journal["new"].state.value, journal["old"].state.value), ("delivered", "delivered"))
        report = await h.poll(account["id"])
        self.assertEqual((report.delivered, report.kept), (0, 2))
        self.assertEqual(len(h.sink.messages), 2)

    async def test_noUidl(self) -> None:
        """A server without UIDL cannot be polled safely: the poll stops, nothing is
        fetched or deleted."""
        h = await self.harness()
        server = await FakePop3Server.listening(self, [message([("To", "alice@example.com")])], supports_uidl=False)
        account = await h.add_account(host="127.0.0.1", port=server.port, tls="none", ca=None)
        report = await h.poll(account["id"])
        self.assertIn("UIDL", report.error or "")
        self.assertEqual((report.fetched, server.deleted), (0, set()))


class TLSAndLoginTests(PollerTestCase):
    async def test_starttls(self) -> None:
        """STLS on the plain port, certificate verified against the account's CA."""
        h = await self.harness()
        h.deliver(message([("To", "alice@example.com")]))
        account = await h.add_account(tls="starttls", port=h.dovecot.pop3_port)
        report = await h.poll(account["id"])
        self.assertEqual((report.error, report.delivered), (None, 1))

    async def test_plain(self) -> None:
        """tls = "none" works where the server allows it."""
        h = await self.harness()
        h.deliver(message([("To", "alice@example.com")]))
        account = await h.add_account(tls="none", port=h.dovecot.pop3_port, ca=None)
        report = await h.poll(account["id"])
        self.assertEqual((report.error, report.delivered), (None, 1))

    async def test_certificateVerified(self) -> None:
        """Without the test CA the server's certificate is refused: nothing fetched."""
        h = await self.harness()
        h.deliver(message([("To", "alice@example.com")]))
        account = await h.add_account(ca=None)
        report = await h.poll(account["id"])
        self.assertIsNotNone(report.error)
        self.assertEqual((report.fetched, h.remote_count()), (0, 1))

    async def test_loginRejectedPasswordNeverLogged(self) -> None:
        """A refused login ends the poll with a reason; no log event of a poll (failed
        or not) holds the password."""
        h = await self.harness()
        h.deliver(message([("To", "alice@example.com")]))
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        wrong = await h.add_account(password="Wrong-Passw0rd-XYZ")
        report = await h.poll(wrong["id"])
        self.assertIn("rejected", report.error or "")
        right = await h.add_account()
        report = await h.poll(right["id"])
        self.assertEqual(report.delivered, 1)
        self.assertTrue(events)
        for event in events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn(REMOTE_PASSWORD, text)
            self.assertNotIn("Wrong-Passw0rd-XYZ", text)


class BigMessageTests(PollerTestCase):
    async def test_25MiBBoundedMemory(self) -> None:
        """A 25 MiB message passes byte-identical while the process (poller and SMTP
        receiver together) never holds more than a few MiB: tracemalloc's peak."""
        h = await self.harness()
        h.sink.keep_limit = 0  # the receiver keeps a digest, not the message
        size = 25 * 1024 * 1024
        h.deliver(big_message(size))
        account = await h.add_account()
        tracemalloc.start()
        try:
            report = await h.poll(account["id"])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual((report.error, report.delivered, report.deleted), (None, 1, 1))
        [got] = h.sink.messages
        trace, _ = strip_trace(got.head)
        self.assertEqual(got.size, len(trace) + size)
        self.assertEqual(got.sha256, hashlib.sha256(trace + big_message(size)).hexdigest())
        self.assertLess(peak, 2 * 1024 * 1024, f"peak {peak} bytes for a {size}-byte message")
