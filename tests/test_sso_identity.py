"""The identity table [7]: learning, renewal, expiry, replacement and its bound, with
a Clock; every change told to the listeners (the accounting export)."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.metrics import Metrics
from mailgw.sso.export import AccountingExport
from mailgw.sso.identity import Change, Identity, IdentitySource, IdentityTable
from mailgw.sso.monitor import Pop3Monitor


class IdentityTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.table = IdentityTable(self.clock, ttl=60)
        self.changes: list[tuple[Change, str, str]] = []
        self.table.subscribe(lambda change, identity: self.changes.append((change, identity.ip, identity.user)))

    def test_learnAndLookup(self) -> None:
        """A login adds an entry with its source, policy and expiry."""
        identity = self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE, group_policy="Staff")
        self.assertEqual(self.table.lookup("10.0.0.5"), identity)
        self.assertEqual((identity.first_seen, identity.expires, identity.group_policy), (1000, 1060, "Staff"))
        self.assertEqual(self.changes, [(Change.START, "10.0.0.5", "alice")])

    def test_renewKeepsSession(self) -> None:
        """A new login of the same user renews the entry: same accounting session,
        first_seen kept, expiry moved."""
        first = self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        self.clock.advance(50)
        second = self.table.learn("10.0.0.5", "alice", IdentitySource.MONITOR)
        self.assertEqual((second.session_id, second.first_seen, second.expires), (first.session_id, 1000, 1110))
        self.assertEqual(self.changes[-1], (Change.RENEW, "10.0.0.5", "alice"))

    def test_otherUserReplaces(self) -> None:
        """Another user at the same address ends the old entry (Stop) and starts a
        new one."""
        old = self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        new = self.table.learn("10.0.0.5", "bob", IdentitySource.INLINE)
        self.assertNotEqual(old.session_id, new.session_id)
        self.assertEqual(self.changes[1:], [(Change.STOP, "10.0.0.5", "alice"), (Change.START, "10.0.0.5", "bob")])

    def test_expiry(self) -> None:
        """Entries end ttl seconds after their last renewal."""
        self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        self.clock.advance(30)
        self.table.learn("10.0.0.6", "bob", IdentitySource.INLINE)
        self.clock.advance(31)
        self.assertEqual([i.user for i in self.table.expire()], ["alice"])
        self.assertIsNone(self.table.lookup("10.0.0.5"))
        self.assertIsNotNone(self.table.lookup("10.0.0.6"))
        self.clock.advance(30)
        self.assertIsNone(self.table.lookup("10.0.0.6"))
        self.assertEqual([c for c, _, _ in self.changes].count(Change.EXPIRE), 2)

    def test_remove(self) -> None:
        """remove ends an entry (logout, mailgwctl sso remove)."""
        self.table.learn("10.0.0.5", "alice", IdentitySource.PORTAL)
        self.assertEqual(self.table.remove("10.0.0.5").user, "alice")  # type: ignore[union-attr]
        self.assertIsNone(self.table.remove("10.0.0.5"))
        self.assertEqual(len(self.table), 0)

    def test_bounded(self) -> None:
        """Beyond max_entries the entry renewed longest ago ends."""
        table = IdentityTable(self.clock, ttl=60, max_entries=100)
        for n in range(1000):
            table.learn(f"10.0.{n >> 8}.{n & 255}", f"user{n}", IdentitySource.MONITOR)
        self.assertEqual(len(table), 100)
        self.assertIsNone(table.lookup("10.0.0.0"))
        self.assertIsNotNone(table.lookup("10.0.3.231"))

    def test_restore(self) -> None:
        """Entries read back at start keep their session; expired ones are dropped."""
        live = Identity("10.0.0.5", "alice", IdentitySource.INLINE, None, 990, 995, 1055, "abc")
        dead = Identity("10.0.0.6", "bob", IdentitySource.INLINE, None, 900, 910, 970, "def")
        self.table.restore(live)
        self.table.restore(dead)
        self.assertEqual(self.table.lookup("10.0.0.5"), live)
        self.assertIsNone(self.table.lookup("10.0.0.6"))
        self.assertEqual(self.changes, [])


class IdentityMetricsTests(SynchronousTestCase):
    def test_scrape(self) -> None:
        """The metrics show the entries by source, the expirations and the monitor's
        counters, read at scrape time."""
        clock = Clock()
        metrics = Metrics(process=False)
        table = IdentityTable(clock, ttl=60)
        metrics.identities = table
        metrics.sso_monitor = Pop3Monitor([("127.0.0.1", 110)], lambda *args: None, clock)
        table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        table.learn("10.0.0.6", "bob", IdentitySource.PORTAL)
        clock.advance(30)
        table.learn("10.0.0.7", "carol", IdentitySource.PORTAL)
        clock.advance(31)
        table.expire()
        text = generate_latest(metrics.registry).decode()
        self.assertIn('mailgw_sso_identities{source="portal"} 1.0', text)
        self.assertIn('mailgw_sso_identities{source="inline"} 0.0', text)
        self.assertIn("mailgw_sso_expirations_total 2.0", text)
        self.assertIn('mailgw_sso_monitor_total{counter="streams_seen"} 0.0', text)


class _RecordingSender:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, str | None]] = []

    def start(self, session: Any) -> None:
        self.records.append(("Start", session.session_id, None))

    def interim(self, session: Any) -> None:
        self.records.append(("Interim-Update", session.session_id, None))

    def stop(self, session: Any, cause: Any) -> None:
        self.records.append(("Stop", session.session_id, str(cause)))


class ExportMappingTests(SynchronousTestCase):
    def test_expiryStopsWithSessionTimeout(self) -> None:
        """An entry that expires (Clock-driven) sends a Stop with Session-Timeout; a
        removal sends one with User-Request; a renewal an Interim-Update."""
        clock = Clock()
        table = IdentityTable(clock, ttl=60)
        export = AccountingExport.__new__(AccountingExport)
        sender = _RecordingSender()
        export._senders = [sender]  # type: ignore[list-item]
        table.subscribe(export)
        first = table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        second = table.learn("10.0.0.6", "bob", IdentitySource.INLINE)
        table.remove("10.0.0.6")
        clock.advance(61)
        table.expire()
        self.assertEqual(
            sender.records,
            [
                ("Start", first.session_id, None),
                ("Interim-Update", first.session_id, None),
                ("Start", second.session_id, None),
                ("Stop", second.session_id, "User-Request"),
                ("Stop", first.session_id, "Session-Timeout"),
            ],
        )
