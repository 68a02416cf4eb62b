"""The SSO identity table survives a restart [7]: L{mailgw.sso.persist} writes its
changes through the state interface and reads them back at start.

L{PersistenceTests} drive the listener on a L{Clock} against a store whose identity
writes the test answers; L{RestoreTests} read a real SQLite store back into a table;
L{GatewayRestartTests} stop a gateway and start a new one on the same state folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.sso.identity import Identity, IdentitySource, IdentityTable
from mailgw.sso.persist import IdentityPersistence, identity_of, record_of, restore
from mailgw.state import IdentityRecord, IStateStore, StateError
from mailgw.state.sqlite import SQLiteState
from tests.gateway import start_gateway
from tests.servers.pki import TestPKI

Write = tuple[str, Any, defer.Deferred[Any]]


class ScriptedStore(SQLiteState):
    """An L{IStateStore} (never opened) whose identity writes wait for the test:
    each is recorded in C{writes} with the Deferred that answers it."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/state.sqlite3"), reactor)
        self.writes: list[Write] = []

    def identity_put(self, record: IdentityRecord) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.writes.append(("put", record, d))
        return d

    def identity_delete(self, ip: str, session_id: str | None = None) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.writes.append(("delete", (ip, session_id), d))
        return d

    def calls(self) -> list[tuple[str, Any]]:
        return [(kind, what) for kind, what, _ in self.writes]

    def answer(self, index: int, result: object = None) -> None:
        self.writes[index][2].callback(result)


def table_with(store: IStateStore, clock: Clock, ttl: float = 600.0) -> tuple[IdentityTable, IdentityPersistence]:
    table = IdentityTable(clock, ttl)
    persistence = IdentityPersistence(store)
    table.subscribe(persistence)
    return table, persistence


class PersistenceTests(SynchronousTestCase):
    """IdentityPersistence turns the table's changes into writes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000.0)
        self.store = ScriptedStore()
        self.table, self.persistence = table_with(self.store, self.clock)

    def test_fakeStoreProvidesInterface(self) -> None:
        """The scripted store of these tests is an IStateStore."""
        self.assertTrue(verifyObject(IStateStore, self.store))

    def test_changesWritten(self) -> None:
        """A Start and a renewal store the entry as it is now; a removal and an
        expiry delete that entry (by its session id)."""
        alice = self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE, group_policy="Staff")
        self.assertEqual(self.store.calls(), [("put", record_of(alice))])
        self.store.answer(0)
        self.clock.advance(10)
        renewed = self.table.learn("10.0.0.5", "alice", IdentitySource.PORTAL)
        self.assertEqual(self.store.calls()[1], ("put", record_of(renewed)))
        self.assertEqual((renewed.renewed, renewed.source, renewed.group_policy), (1_000_010.0, "portal", "Staff"))
        self.store.answer(1)
        self.table.remove("10.0.0.5")
        self.assertEqual(self.store.calls()[2], ("delete", ("10.0.0.5", alice.session_id)))
        self.store.answer(2, True)
        bob = self.table.learn("10.0.0.6", "bob", IdentitySource.MONITOR, mac="00:11:22:33:44:55")
        self.store.answer(3)
        self.clock.advance(601)
        self.table.expire()
        self.assertEqual(self.store.calls()[3:], [("put", record_of(bob)), ("delete", ("10.0.0.6", bob.session_id))])
        self.store.answer(4, True)
        self.assertEqual(self.persistence.pending, 0)

    def test_recordRoundTrip(self) -> None:
        """record_of and identity_of are inverses; an unknown source is a ValueError."""
        identity = self.table.learn("2001:db8::1", "carol", IdentitySource.MONITOR, mac="aa:bb:cc:dd:ee:ff")
        record = record_of(identity)
        self.assertEqual(record.source, "monitor")
        self.assertEqual(identity_of(record), identity)
        self.assertRaises(ValueError, identity_of, replace(record, source="carrier-pigeon"))

    def test_writesOfOneAddressCoalesced(self) -> None:
        """While a write of an address is under way, only the latest state wanted
        for it waits: a burst of renewals makes two writes, the second with the last
        renewal; other addresses are not held up; drain fires once all are done."""
        self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        for policy in ("P1", "P2", "P3"):
            self.clock.advance(1)
            last = self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE, group_policy=policy)
        other = self.table.learn("10.0.0.6", "bob", IdentitySource.INLINE)
        self.assertEqual([what.ip for _, what in self.store.calls()], ["10.0.0.5", "10.0.0.6"])
        drained = self.persistence.drain()
        self.assertNoResult(drained)
        self.store.answer(0)
        self.assertEqual(self.store.calls()[2], ("put", record_of(last)))
        self.store.answer(1)
        self.assertNoResult(drained)
        self.store.answer(2)
        self.successResultOf(drained)
        self.assertEqual(len(self.store.writes), 3)
        self.assertEqual(self.store.calls()[1], ("put", record_of(other)))
        self.successResultOf(self.persistence.drain())

    def test_coalescedDeleteRemovesWhatWasStored(self) -> None:
        """alice's entry is being stored when bob replaces her at that address and
        is removed: the one delete that follows removes alice's stored entry (the
        one really stored), not bob's (never stored)."""
        alice = self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        self.table.learn("10.0.0.5", "bob", IdentitySource.INLINE)
        self.table.remove("10.0.0.5")
        self.assertEqual(len(self.store.writes), 1)
        self.store.answer(0)
        self.assertEqual(self.store.calls(), [("put", record_of(alice)), ("delete", ("10.0.0.5", alice.session_id))])

    def test_failuresLoggedNeverRaised(self) -> None:
        """A write that fails is logged (a StateError as a warning with its reason,
        anything else with its traceback) and counted; the table keeps its entry,
        and the next change of the address writes again."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        alice = self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        self.store.writes[0][2].errback(StateError("the state database is not open"))
        self.assertEqual(self.persistence.failures, 1)
        self.assertEqual(self.table.lookup("10.0.0.5"), alice)
        texts = [formatEvent(event) for event in events]
        self.assertIn("SSO identity of 10.0.0.5 not saved in the state database: the state database is not open", texts)
        self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        self.assertEqual(len(self.store.writes), 2)
        self.store.writes[1][2].errback(RuntimeError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.persistence.failures, 2)
        self.assertEqual(self.persistence.pending, 0)

    def test_storeRaising(self) -> None:
        """A store method that raises instead of failing its Deferred does not reach
        the table either."""

        def broken(record: IdentityRecord) -> defer.Deferred[None]:
            raise StateError("closed")

        self.store.identity_put = broken  # type: ignore[method-assign]
        self.table.learn("10.0.0.5", "alice", IdentitySource.INLINE)
        self.assertEqual((self.persistence.failures, self.persistence.pending, len(self.table)), (1, 0, 1))


class RestoreTests(TestCase):
    """restore() reads a real SQLite store back into a table."""

    async def store(self) -> SQLiteState:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        store = SQLiteState(folder / "state.sqlite3", reactor)
        self.addCleanup(store.close)
        await store.start()
        return store

    async def test_restore(self) -> None:
        """The entries not expired come back as they were, renewed longest ago first
        (the table's order), with no write and no Start told; expired ones are
        deleted from the store; an entry the table learnt meanwhile is kept; one of
        an unknown source is skipped."""
        store = await self.store()
        clock = Clock()
        clock.advance(5000.0)

        def record(ip: str, **fields: Any) -> IdentityRecord:
            values: dict[str, Any] = {"ip": ip, "user": "u", "source": "inline", "group_policy": None,
                                      "first_seen": 4000.0, "renewed": 4000.0, "expires": 6000.0,
                                      "session_id": f"s-{ip}", "mac": None}  # fmt: skip
            values.update(fields)
            return IdentityRecord(**values)

        stored = [
            record("10.0.0.1", user="alice", renewed=4500.0, group_policy="Staff", mac="00:11:22:33:44:55"),
            record("10.0.0.2", user="bob", renewed=4100.0, source="portal"),
            record("10.0.0.3", user="old", expires=4999.0),
            record("10.0.0.4", user="new-here"),
            record("10.0.0.5", source="carrier-pigeon"),
        ]
        for item in stored:
            await store.identity_put(item)
        table = IdentityTable(clock, 600)
        live = table.learn("10.0.0.4", "carol", IdentitySource.MONITOR)
        told: list[Any] = []
        table.subscribe(lambda change, identity: told.append((change, identity)))
        self.assertEqual(await restore(table, store), 2)
        self.assertEqual(told, [])
        self.assertEqual([i.ip for i in table], ["10.0.0.4", "10.0.0.2", "10.0.0.1"])
        self.assertEqual(table.lookup("10.0.0.1"), identity_of(stored[0]))
        self.assertEqual(table.lookup("10.0.0.4"), live)
        self.assertIsNone(table.lookup("10.0.0.3"))
        left = {r.ip for r in await store.identities()}
        self.assertEqual(left, {"10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5"})

    async def test_loadLogsFailure(self) -> None:
        """load() of a store that cannot be read logs why and fires with 0."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        store = await self.store()
        await store.close()
        table = IdentityTable(Clock(), 600)
        self.assertEqual(await IdentityPersistence(store).load(table), 0)
        self.assertIn(
            "SSO identity table not restored from the state database: the state database is not open",
            [formatEvent(event) for event in events],
        )


class GatewayRestartTests(TestCase):
    """A gateway's identity table is there again after a restart."""

    timeout = 60

    async def test_tableSurvivesRestart(self) -> None:
        """Entries learnt (and renewed, in bursts) by one gateway are in the table of
        the next gateway started on the same state folder, exactly as they were
        last; a removed entry is not."""
        pki = TestPKI(Path(self.mktemp()).absolute())
        pop3s = {"default_server": {"host": "127.0.0.1", "port": 9, "tls": "none"}}
        sso = {"pop3": {"enabled": True, "mode": "inline", "servers": ["127.0.0.1:110"], "policy": ["10.0.0.0/8"],
                        "ttl": 3600}}  # fmt: skip
        gateway = start_gateway(self, pki, {"alice": ("alice-pw", None)}, pop3s, sso=sso)
        service = gateway.service
        assert service is not None and service.identities is not None and service.identities_restored is not None
        self.assertEqual(await service.identities_restored, 0)
        table = service.identities
        table.learn("10.0.0.5", "alice", IdentitySource.INLINE, group_policy="Staff")
        table.learn("10.0.0.6", "bob", IdentitySource.PORTAL)
        table.remove("10.0.0.6")
        expected: dict[str, Identity] = {}
        for round_ in range(3):  # renewals while the first writes are under way
            for n in range(30):
                ip = f"10.1.0.{n}"
                expected[ip] = table.learn(ip, f"user{n}", IdentitySource.MONITOR, group_policy=f"P{round_}")
        expected["10.0.0.5"] = table.learn("10.0.0.5", "alice", IdentitySource.PORTAL, mac="00:11:22:33:44:55")
        await gateway.stop()

        gateway.start(gateway.config_data(pop3s, sso=sso))
        service = gateway.service
        assert service is not None and service.identities is not None and service.identities_restored is not None
        self.assertEqual(await service.identities_restored, len(expected))
        table = service.identities
        self.assertEqual({identity.ip: identity for identity in table}, expected)
        self.assertEqual(table.lookup("10.0.0.5"), expected["10.0.0.5"])
        self.assertIsNone(table.lookup("10.0.0.6"))
