"""The state interface [1], [6], [11] and its two backends.

L{StateStoreContract} is the contract of L{IStateStore}: schema versions and
migrations, accounts, the poll journal, poller account leases between two nodes, and
that nothing runs in the reactor thread.  L{SQLiteStateTests} and
L{PostgreSQLStateTests} run it against SQLite and a real PostgreSQL 15
(L{tests.servers.postgresql}), each adding what is its own (SQLite's durability
settings; PostgreSQL's timeouts, connection pool, concurrent start-up and passwords).
L{PostgreSQLOutageTests} stops and starts the database under a store.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer, reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailgw.config import Config, StateConfig, parse_config
from mailgw.state import (
    ACCOUNT_COLUMNS,
    IdentityRecord,
    IStateStore,
    JournalState,
    Lease,
    StateError,
    StateService,
    open_state,
)
from mailgw.state import postgresql as pg_state
from mailgw.state.postgresql import PostgreSQLState
from mailgw.state.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteState
from tests.servers.base import free_port
from tests.servers.postgresql import PostgreSQL

if TYPE_CHECKING:
    import psycopg

    _ContractBase = TestCase
else:
    _ContractBase = object

T = TypeVar("T")


def account_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "enabled": True,
        "description": "d",
        "host": "pop.isp.example",
        "port": 995,
        "tls": "implicit",
        "verify": True,
        "ca": None,
        "username": "u",
        "password": b"token",
        "domain": "example.com",
        "interval": None,
        "leave_on_server": False,
        "leave_days": 0,
        "recipient_headers": ("To/Cc",),
        "received_parsing": False,
        "skip_received": 0,
        "no_recipient_action": "delete",
    }
    fields.update(overrides)
    return fields


def identity(ip: str = "10.0.0.5", **overrides: Any) -> IdentityRecord:
    """An SSO identity entry as stored."""
    fields: dict[str, Any] = {
        "ip": ip,
        "user": "alice",
        "source": "inline",
        "group_policy": "DfltGrpPolicy",
        "first_seen": 1000.0,
        "renewed": 1000.0,
        "expires": 1600.0,
        "session_id": "0123456789abcdef",
        "mac": None,
    }
    fields.update(overrides)
    return IdentityRecord(**fields)


def sleep(seconds: float) -> defer.Deferred[None]:
    """Let the reactor run for C{seconds} (only where real time is the subject)."""
    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], Awaitable[T]], timeout: float) -> T:
    """The first result of C{check} that does not fail with L{StateError}, trying
    every 0.1 s for C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except StateError:
            if time.monotonic() > deadline:
                raise
        await sleep(0.1)


async def state_error(d: defer.Deferred[Any]) -> StateError:
    """The L{StateError} C{d} fails with (any other outcome fails the test)."""
    try:
        await d
    except StateError as e:
        return e
    raise AssertionError(f"{d!r} did not fail with StateError")


class StateStoreContract(_ContractBase):
    """What every L{IStateStore} does.  A backend's test case provides the hooks."""

    #: the backend's own migrations (callables of its own kind)
    migrations: Sequence[Any]
    #: the schema version the backend writes
    schema_version: int

    def new_store(self, migrations: Sequence[Any] | None = None) -> Any:
        """A store on this test's database, not started; closed on cleanup."""
        raise NotImplementedError

    def extra_migration(self, calls: list[int]) -> Any:
        """A migration that appends to C{calls} and creates the table C{extra}."""
        raise NotImplementedError

    def broken_migration(self) -> Any:
        """A migration that creates the table C{half}, then fails."""
        raise NotImplementedError

    def stored_version(self) -> int:
        """The schema version in the database, read directly."""
        raise NotImplementedError

    def set_stored_version(self, version: int) -> None:
        raise NotImplementedError

    def table_exists(self, name: str) -> bool:
        raise NotImplementedError

    def pass_lease_time(self, seconds: float) -> None:
        """Make C{seconds} of the leases' clock pass."""
        raise NotImplementedError

    async def thread_name(self, store: Any) -> str:
        """The name of the thread a call of C{store} runs in."""
        raise NotImplementedError

    def assertNear(self, first: float, second: float, within: float = 1.0) -> None:
        """C{first} and C{second} differ by less than C{within} (trial's
        assertAlmostEqual has no C{delta})."""
        self.assertLess(abs(first - second), within, f"{first} is not within {within} of {second}")

    async def open(self) -> Any:
        store = self.new_store()
        await store.start()
        return store

    # -- the store ---------------------------------------------------------------------------

    async def test_interface(self) -> None:
        """The store provides IStateStore."""
        store = await self.open()
        self.assertTrue(verifyObject(IStateStore, store))

    async def test_freshSchema(self) -> None:
        """A new database is at the latest schema version."""
        store = await self.open()
        self.assertEqual(await store.schema_version(), self.schema_version)
        self.assertEqual(self.stored_version(), self.schema_version)

    async def test_migrationsRunOnce(self) -> None:
        """Reopening does not migrate again; a new migration is applied on the next
        start and only then."""
        store = await self.open()
        await store.add_account(account_fields(), 1.0)
        await store.close()
        calls: list[int] = []
        for _ in range(2):
            store = self.new_store([*self.migrations, self.extra_migration(calls)])
            await store.start()
            self.assertEqual(await store.schema_version(), self.schema_version + 1)
            self.assertEqual(len(await store.list_accounts()), 1)
            await store.close()
        self.assertEqual(calls, [1])
        self.assertTrue(self.table_exists("extra"))

    async def test_failedMigrationRollsBack(self) -> None:
        """A failing migration leaves the database at the previous version, without
        its half-done changes, and the store closed."""
        store = self.new_store([*self.migrations, self.broken_migration()])
        await state_error(store.start())
        self.assertEqual(self.stored_version(), self.schema_version)
        self.assertFalse(self.table_exists("half"))
        await state_error(store.list_accounts())

    async def test_newerSchemaRefused(self) -> None:
        """A database of a newer release is refused."""
        store = await self.open()
        await store.close()
        self.set_stored_version(99)
        store = self.new_store()
        with self.assertRaises(StateError) as caught:
            await store.start()
        self.assertIn("newer release", str(caught.exception))
        await state_error(store.list_accounts())

    async def test_notOpen(self) -> None:
        """Calls before start or after close fail with StateError."""
        store = self.new_store()
        await state_error(store.list_accounts())
        store = await self.open()
        await store.close()
        await state_error(store.list_accounts())
        await self.assertFailure(store.lease_acquire(1, "node-a", 30.0), StateError)
        await self.assertFailure(store.identity_put(identity()), StateError)
        await self.assertFailure(store.identities(), StateError)

    async def test_offTheReactorThread(self) -> None:
        """Every call runs in the store's own threads, never the reactor's."""
        store = await self.open()
        name = await self.thread_name(store)
        self.assertNotEqual(name, threading.current_thread().name)
        self.assertIn("mailgw-state", name)

    async def test_upgradeFromPreviousVersion(self) -> None:
        """A database of the previous schema version is migrated to the latest with its
        accounts kept, and gets what the last migration adds (the identity table)."""
        store = self.new_store(self.migrations[:-1])
        await store.start()
        account = await store.add_account(account_fields(), 1.0)
        await store.close()
        store = await self.open()
        self.assertEqual(await store.schema_version(), self.schema_version)
        self.assertEqual(await store.get_account(account.id), account)
        self.assertEqual(await store.identities(), [])
        await store.identity_put(identity())
        self.assertEqual(await store.identities(), [identity()])

    # -- accounts ----------------------------------------------------------------------------

    async def test_accounts(self) -> None:
        """Accounts are added with an id, read, changed, listed by domain
        (case-insensitively) and deleted with their journal."""
        store = await self.open()
        first = await store.add_account(account_fields(), 10.0)
        second = await store.add_account(account_fields(domain="other.example", recipient_headers=("A", "B/C")), 11.0)
        self.assertEqual((first.id, second.id), (1, 2))
        self.assertEqual(second.recipient_headers, ("A", "B/C"))
        self.assertEqual(first.password, b"token")
        self.assertIs(first.enabled, True)
        self.assertIsNone(first.interval)
        self.assertEqual(await store.get_account(1), first)
        self.assertEqual([a.id for a in await store.list_accounts("EXAMPLE.com")], [1])
        self.assertEqual([a.id for a in await store.list_accounts()], [1, 2])
        changed = await store.update_account(1, {"port": 110, "enabled": False, "interval": 60}, 20.0)
        assert changed is not None
        self.assertEqual(
            (changed.port, changed.enabled, changed.interval, changed.updated, changed.created),
            (110, False, 60, 20.0, 10.0),
        )
        self.assertIsNone(await store.update_account(99, {"port": 1}, 20.0))
        await store.journal_mark(1, "u1", JournalState.DELIVERED, 21.0, "<m@x>")
        self.assertTrue(await store.delete_account(1))
        self.assertFalse(await store.delete_account(1))
        self.assertIsNone(await store.get_account(1))
        self.assertEqual(await store.journal(1), {})

    async def test_accountColumnsChecked(self) -> None:
        """Unknown or missing columns are programming errors."""
        store = await self.open()
        await self.assertFailure(store.add_account({**account_fields(), "bogus": 1}, 1.0), ValueError)
        await self.assertFailure(store.update_account(1, {"bogus": 1}, 1.0), ValueError)
        fields = account_fields()
        del fields["host"]
        await self.assertFailure(store.add_account(fields, 1.0), ValueError)
        self.assertEqual(set(account_fields()), set(ACCOUNT_COLUMNS))

    # -- the journal -------------------------------------------------------------------------

    async def test_journal(self) -> None:
        """Seen UIDLs keep their first-seen time; marks change the state, keep the
        Message-ID when none is given; unknown UIDLs are created by a mark."""
        store = await self.open()
        account = await store.add_account(account_fields(), 1.0)
        await store.journal_seen(account.id, ["a", "b"], 100.0)
        await store.journal_seen(account.id, ["a", "c", "c"], 200.0)
        await store.journal_seen(account.id, [], 250.0)
        journal = await store.journal(account.id)
        self.assertEqual({u: e.first_seen for u, e in journal.items()}, {"a": 100.0, "b": 100.0, "c": 200.0})
        self.assertEqual({e.state for e in journal.values()}, {JournalState.SEEN})
        await store.journal_mark(account.id, "a", JournalState.STARTED, 300.0, "<id@x>")
        await store.journal_mark(account.id, "a", JournalState.DELIVERED, 301.0)
        await store.journal_mark(account.id, "z", JournalState.DROPPED, 302.0)
        journal = await store.journal(account.id)
        self.assertEqual(journal["a"].state, JournalState.DELIVERED)
        self.assertEqual(journal["a"].message_id, "<id@x>")
        self.assertEqual((journal["a"].first_seen, journal["a"].changed), (100.0, 301.0))
        self.assertEqual(journal["z"].state, JournalState.DROPPED)

    async def test_journalMarks(self) -> None:
        """Several marks in one transaction (a delivered message and the next one
        started): all are committed, or none when one of them fails."""
        store = await self.open()
        account = await store.add_account(account_fields(), 1.0)
        await store.journal_seen(account.id, ["a", "b"], 100.0)
        await store.journal_marks(
            account.id, [("a", JournalState.DELIVERED, "<a@x>"), ("b", JournalState.STARTED, None)], 200.0
        )
        journal = await store.journal(account.id)
        self.assertEqual((journal["a"].state, journal["a"].message_id), (JournalState.DELIVERED, "<a@x>"))
        self.assertEqual((journal["b"].state, journal["b"].changed), (JournalState.STARTED, 200.0))
        broken = [("b", JournalState.DELIVERED, "<b@x>"), (None, JournalState.STARTED, None)]
        await self.assertFailure(store.journal_marks(account.id, broken, 300.0), StateError)  # type: ignore[arg-type]
        self.assertEqual((await store.journal(account.id))["b"].state, JournalState.STARTED)

    async def test_journalRequiresAccount(self) -> None:
        """A journal entry of a deleted account is refused (StateError)."""
        store = await self.open()
        await self.assertFailure(store.journal_mark(42, "a", JournalState.SEEN, 1.0), StateError)
        await self.assertFailure(store.journal_seen(42, ["a"], 1.0), StateError)

    async def test_prune(self) -> None:
        """Entries gone from the server are forgotten: undelivered ones at once,
        delivered and dropped ones after the retention."""
        store = await self.open()
        account = await store.add_account(account_fields(), 1.0)
        await store.journal_seen(account.id, ["seen", "kept"], 1.0)
        await store.journal_mark(account.id, "old", JournalState.DELIVERED, 10.0, "<o@x>")
        await store.journal_mark(account.id, "new", JournalState.DELIVERED, 500.0, "<n@x>")
        await store.journal_mark(account.id, "dropped", JournalState.DROPPED, 10.0)
        removed = await store.journal_prune(account.id, ["kept"], 100.0)
        self.assertEqual(removed, 3)
        self.assertEqual(sorted(await store.journal(account.id)), ["kept", "new"])
        self.assertEqual(await store.journal_prune(account.id, [], 1000.0), 2)

    # -- the SSO identity table --------------------------------------------------------------

    async def test_identities(self) -> None:
        """Entries are stored by address, every field kept: a put replaces the entry of
        its address (a renewal, another user); all come back, renewed longest ago
        first; they survive reopening."""
        store = await self.open()
        self.assertEqual(await store.identities(), [])
        first = identity("10.0.0.5", renewed=1500.0, expires=2100.0)
        second = identity("2001:db8::7", user="bob", source="monitor", group_policy=None, mac="00:11:22:33:44:55",
                          first_seen=1200.5, renewed=1200.5, expires=1800.5, session_id="fedcba9876543210")  # fmt: skip
        await store.identity_put(first)
        await store.identity_put(second)
        self.assertEqual(await store.identities(), [second, first])
        renewed = identity("10.0.0.5", renewed=1700.0, expires=2300.0, source="portal")
        await store.identity_put(renewed)
        self.assertEqual(await store.identities(), [second, renewed])
        replaced = identity("2001:db8::7", user="carol", first_seen=1800.0, renewed=1800.0, session_id="s2")
        await store.identity_put(replaced)
        self.assertEqual(await store.identities(), [renewed, replaced])
        await store.close()
        store = await self.open()
        self.assertEqual(await store.identities(), [renewed, replaced])

    async def test_identityDeleted(self) -> None:
        """A delete forgets the entry of an address; with a session id only that entry,
        not a newer one of the same address; deleting nothing says so."""
        store = await self.open()
        await store.identity_put(identity("10.0.0.5", session_id="new"))
        await store.identity_put(identity("10.0.0.6"))
        self.assertFalse(await store.identity_delete("10.0.0.5", "old"))
        self.assertEqual([r.ip for r in await store.identities()], ["10.0.0.5", "10.0.0.6"])
        self.assertTrue(await store.identity_delete("10.0.0.5", "new"))
        self.assertTrue(await store.identity_delete("10.0.0.6"))
        self.assertFalse(await store.identity_delete("10.0.0.6"))
        self.assertEqual(await store.identities(), [])

    # -- leases: two stores on one database are two gateways -------------------------------

    async def two_nodes(self) -> tuple[Any, Any, int]:
        """Two started stores on this test's database, and an account."""
        a = await self.open()
        b = await self.open()
        account = await a.add_account(account_fields(), 1.0)
        return a, b, account.id

    async def test_leaseOneHolder(self) -> None:
        """Of two nodes, the first to ask gets the lease; the other gets nothing, cannot
        renew or release it, and both see who holds it."""
        a, b, account = await self.two_nodes()
        lease = await a.lease_acquire(account, "node-a", 30.0)
        assert lease is not None
        self.assertEqual((lease.account_id, lease.node), (account, "node-a"))
        self.assertNear(lease.expires - lease.acquired, 30.0)
        self.assertIsNone(await b.lease_acquire(account, "node-b", 30.0))
        self.assertIsNone(await b.lease_renew(account, "node-b", 30.0))
        self.assertFalse(await b.lease_release(account, "node-b"))
        self.assertEqual(await a.leases(), {account: lease})
        self.assertEqual(await b.leases(), {account: lease})

    async def test_leaseRace(self) -> None:
        """Two nodes asking for the same leases at the same moment: every account gets
        exactly one holder."""
        a, b, _ = await self.two_nodes()
        accounts = [(await a.add_account(account_fields(username=f"u{i}"), 1.0)).id for i in range(10)]
        asked = [store.lease_acquire(i, node, 30.0) for i in accounts for store, node in ((a, "node-a"), (b, "node-b"))]
        results = await defer.gatherResults(asked)
        for index, account in enumerate(accounts):
            got = [lease for lease in results[2 * index : 2 * index + 2] if lease is not None]
            self.assertEqual(len(got), 1, f"account {account}: {got}")
        held = await b.leases()
        self.assertEqual(sorted(held), accounts)

    async def test_leaseTakenOverAfterExpiry(self) -> None:
        """Once a lease has run out another node takes it; the old holder then can
        neither renew nor retake it."""
        a, b, account = await self.two_nodes()
        first = await a.lease_acquire(account, "node-a", 30.0)
        assert first is not None
        self.pass_lease_time(25.0)
        self.assertIsNone(await b.lease_acquire(account, "node-b", 30.0))
        self.pass_lease_time(10.0)
        self.assertEqual(await a.leases(), {})
        taken = await b.lease_acquire(account, "node-b", 30.0)
        assert taken is not None
        self.assertEqual(taken.node, "node-b")
        self.assertGreaterEqual(taken.acquired, first.acquired)
        self.assertNear(taken.expires - taken.acquired, 30.0)
        self.assertIsNone(await a.lease_renew(account, "node-a", 30.0))
        self.assertIsNone(await a.lease_acquire(account, "node-a", 30.0))
        self.assertFalse(await a.lease_release(account, "node-a"))
        self.assertEqual([lease.node for lease in (await a.leases()).values()], ["node-b"])

    async def test_leaseRenewed(self) -> None:
        """The holder renews its lease before it runs out and keeps it past the first
        expiry; asking again as the holder renews too and keeps the acquisition time."""
        a, b, account = await self.two_nodes()
        first = await a.lease_acquire(account, "node-a", 30.0)
        assert first is not None
        self.pass_lease_time(20.0)
        before = (await a.leases())[account]
        renewed = await a.lease_renew(account, "node-a", 30.0)
        assert renewed is not None
        self.assertNear(renewed.expires - before.expires, 20.0)
        self.assertEqual(renewed.acquired, before.acquired)
        self.pass_lease_time(20.0)  # 40 s after the first acquisition
        self.assertIsNone(await b.lease_acquire(account, "node-b", 30.0))
        held = (await a.leases())[account]
        again = await a.lease_acquire(account, "node-a", 30.0)
        assert again is not None
        self.assertEqual(again.acquired, held.acquired)
        self.assertGreater(again.expires, held.expires)

    async def test_leaseReleased(self) -> None:
        """A released lease is free at once for another node."""
        a, b, account = await self.two_nodes()
        self.assertIsNotNone(await a.lease_acquire(account, "node-a", 30.0))
        self.assertTrue(await a.lease_release(account, "node-a"))
        self.assertFalse(await a.lease_release(account, "node-a"))
        self.assertIsNone(await a.lease_renew(account, "node-a", 30.0))
        taken = await b.lease_acquire(account, "node-b", 30.0)
        assert taken is not None
        self.assertEqual(taken.node, "node-b")

    async def test_leaseOfDeletedAccount(self) -> None:
        """Deleting an account deletes its lease; a lease of an account that does not
        exist is refused; a lease lasts a positive time."""
        a, b, account = await self.two_nodes()
        self.assertIsNotNone(await a.lease_acquire(account, "node-a", 30.0))
        self.assertTrue(await b.delete_account(account))
        self.assertEqual(await a.leases(), {})
        await self.assertFailure(a.lease_acquire(account, "node-a", 30.0), StateError)
        await self.assertFailure(a.lease_acquire(account, "node-a", 0.0), ValueError)
        await self.assertFailure(a.lease_renew(account, "node-a", -1.0), ValueError)


class SQLiteStateTests(StateStoreContract, TestCase):
    """The contract against SQLite, and its durability settings."""

    migrations = MIGRATIONS
    schema_version = SCHEMA_VERSION

    def setUp(self) -> None:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        self.path = folder / "state.sqlite3"
        self.clock = task.Clock()
        self.clock.advance(1_000_000.0)

    def new_store(self, migrations: Sequence[Any] | None = None) -> SQLiteState:
        store = SQLiteState(
            self.path, reactor, migrations=self.migrations if migrations is None else migrations, clock=self.clock
        )
        self.addCleanup(store.close)
        return store

    def extra_migration(self, calls: list[int]) -> Any:
        def migration(db: sqlite3.Connection) -> None:
            calls.append(1)
            db.execute("CREATE TABLE extra (x INTEGER)")

        return migration

    def broken_migration(self) -> Any:
        def broken(db: sqlite3.Connection) -> None:
            db.execute("CREATE TABLE half (x INTEGER)")
            raise sqlite3.OperationalError("boom")

        return broken

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        db = sqlite3.connect(self.path)
        try:
            rows = db.execute(sql, params).fetchall()
            db.commit()
            return rows
        finally:
            db.close()

    def stored_version(self) -> int:
        return int(self._query("SELECT version FROM schema_version")[0][0])

    def set_stored_version(self, version: int) -> None:
        self._query("UPDATE schema_version SET version = ?", (version,))

    def table_exists(self, name: str) -> bool:
        return bool(self._query("SELECT name FROM sqlite_master WHERE name = ?", (name,)))

    def pass_lease_time(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def thread_name(self, store: Any) -> str:
        name: str = await store._call(lambda: threading.current_thread().name)
        return name

    async def test_freshDatabase(self) -> None:
        """A new database is created 0600, in WAL mode."""
        store = await self.open()
        self.assertEqual(stat.S_IMODE(os.stat(store.path).st_mode), 0o600)
        await store.close()
        self.assertEqual(self._query("PRAGMA journal_mode")[0][0], "wal")

    async def test_synchronousFull(self) -> None:
        """The connection commits with synchronous = FULL (2)."""
        store = await self.open()
        level = await store._call(lambda: store._conn().execute("PRAGMA synchronous").fetchone()[0])
        self.assertEqual(level, 2)

    async def test_leasesOnTheStoreClock(self) -> None:
        """SQLite's leases run on the clock the store was given (the reactor's)."""
        store = await self.open()
        account = await store.add_account(account_fields(), 1.0)
        lease = await store.lease_acquire(account.id, "node-a", 30.0)
        self.assertEqual(lease, Lease(account.id, "node-a", self.clock.seconds(), self.clock.seconds() + 30.0))

    async def test_upgradeFromVersion1(self) -> None:
        """A database of the first release (accounts and journal, no leases) is migrated
        with its accounts kept."""
        store = self.new_store(MIGRATIONS[:1])
        await store.start()
        account = await store.add_account(account_fields(), 1.0)
        await store.close()
        store = await self.open()
        self.assertEqual(await store.schema_version(), SCHEMA_VERSION)
        self.assertEqual(await store.get_account(account.id), account)
        self.assertIsNotNone(await store.lease_acquire(account.id, "node-a", 30.0))


class PostgreSQLTestCase(TestCase):
    """A fresh schema on this class's PostgreSQL instance for every test (the stores'
    sessions use it: to them it is an empty database)."""

    def setUp(self) -> None:
        self.postgres = PostgreSQL.shared(self)
        self.schema, self.dsn = self.postgres.fresh_schema(self)

    def pg_store(self, **kwargs: Any) -> PostgreSQLState:
        kwargs.setdefault("password_file", self.postgres.password_file)
        store = PostgreSQLState(kwargs.pop("dsn", self.dsn), reactor, **kwargs)
        self.addCleanup(store.close)
        return store

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self.postgres.execute(sql, params, schema=self.schema)


class PostgreSQLStateTests(StateStoreContract, PostgreSQLTestCase):
    """The contract against a real PostgreSQL 15, and what is PostgreSQL's own."""

    migrations = pg_state.MIGRATIONS
    schema_version = pg_state.SCHEMA_VERSION

    def new_store(self, migrations: Sequence[Any] | None = None) -> PostgreSQLState:
        return self.pg_store(migrations=self.migrations if migrations is None else migrations)

    def extra_migration(self, calls: list[int]) -> Any:
        def migration(db: psycopg.Connection[Any]) -> None:
            calls.append(1)
            db.execute("CREATE TABLE extra (x INTEGER)")

        return migration

    def broken_migration(self) -> Any:
        def broken(db: psycopg.Connection[Any]) -> None:
            db.execute("CREATE TABLE half (x INTEGER)")
            db.execute("DO $$ BEGIN RAISE EXCEPTION 'boom'; END $$")

        return broken

    def stored_version(self) -> int:
        return int(self.query("SELECT version FROM schema_version")[0][0])

    def set_stored_version(self, version: int) -> None:
        self.query("UPDATE schema_version SET version = %s", (version,))

    def table_exists(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s", (self.schema, name)))

    def pass_lease_time(self, seconds: float) -> None:
        # The database server's clock cannot be moved: the leases move back instead.
        self.query(
            "UPDATE poller_leases SET acquired = acquired - %s * interval '1 second', "
            "expires = expires - %s * interval '1 second'",
            (seconds, seconds),
        )

    async def thread_name(self, store: Any) -> str:
        name: str = await store._call(lambda db: threading.current_thread().name)
        return name

    async def test_leasesOnTheServerClock(self) -> None:
        """A lease runs out on the database server's clock: a lease of two seconds is
        held, then taken by the other node once the server's time has passed its
        expiry, and not before."""
        a = await self.open()
        b = await self.open()
        account = await a.add_account(account_fields(), 1.0)
        lease = await a.lease_acquire(account.id, "node-a", 2.0)
        assert lease is not None
        (server_now,) = self.query("SELECT extract(epoch FROM now())::float8")[0]
        self.assertNear(lease.expires, server_now + 2.0)
        self.assertIsNone(await b.lease_acquire(account.id, "node-b", 30.0))
        deadline = time.monotonic() + 10.0
        while (taken := await b.lease_acquire(account.id, "node-b", 30.0)) is None and time.monotonic() < deadline:
            await sleep(0.1)
        assert taken is not None
        self.assertEqual(taken.node, "node-b")
        self.assertGreaterEqual(taken.acquired, lease.expires)

    async def test_gatewaysStartTogether(self) -> None:
        """Three gateways starting at once on a new database migrate it once."""
        stores = [self.new_store() for _ in range(3)]
        await defer.gatherResults([store.start() for store in stores])
        self.assertEqual(self.stored_version(), self.schema_version)
        self.assertEqual(self.query("SELECT count(*) FROM schema_version"), [(1,)])
        for store in stores:
            self.assertEqual(await store.list_accounts(), [])

    async def test_poolBounded(self) -> None:
        """Many calls at once share at most pool_size connections (and threads)."""
        store = self.pg_store(pool_size=2, dsn=f"{self.dsn}&application_name={self.schema}")
        await store.start()
        account = await store.add_account(account_fields(), 1.0)
        calls = [store.journal_mark(account.id, f"u{i}", JournalState.SEEN, 2.0) for i in range(40)]
        names = [store._call(lambda db: threading.current_thread().name) for _ in range(20)]
        await defer.gatherResults(calls)
        self.assertLessEqual(len(set(await defer.gatherResults(names))), 2)
        self.assertEqual(len(await store.journal(account.id)), 40)
        connections = self.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.schema,))
        self.assertLessEqual(connections[0][0], 2)

    async def test_statementTimeout(self) -> None:
        """A statement waiting for a lock is cancelled by the server after
        statement_timeout: StateError promptly; the store works once the lock is gone."""
        store = self.pg_store(statement_timeout=0.5)
        await store.start()
        with self.postgres.connect(self.postgres.database) as locker:
            locker.autocommit = False
            locker.execute(f"LOCK TABLE {self.schema}.poller_accounts IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            failure = await state_error(store.list_accounts())
            self.assertLess(time.monotonic() - started, 3.0)
            self.assertIn("statement timeout", str(failure))
            locker.rollback()
        self.assertEqual(await store.list_accounts(), [])

    async def test_callTimeout(self) -> None:
        """Whatever the database does, a call fails with StateError after call_timeout
        (here: a lock wait the server would let run for a minute)."""
        store = self.pg_store(statement_timeout=60.0, call_timeout=0.5)
        await store.start()
        with self.postgres.connect(self.postgres.database) as locker:
            locker.autocommit = False
            locker.execute(f"LOCK TABLE {self.schema}.poller_accounts IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            failure = await state_error(store.list_accounts())
            self.assertLess(time.monotonic() - started, 3.0)
            self.assertIn("did not answer within 0.5 s", str(failure))
            locker.rollback()
        self.assertEqual(await eventually(store.list_accounts, 5.0), [])

    async def test_passwordFromFile(self) -> None:
        """The password comes from the file, read when connecting: without it, or with a
        wrong one, the server refuses the login (StateError, naming neither)."""
        store = self.pg_store(password_file=None)
        failure = await state_error(store.start())
        self.assertIn("password", str(failure))
        wrong = Path(self.mktemp())
        wrong.write_text("not-the-password-42\n")
        store = self.pg_store(password_file=wrong)
        failure = await state_error(store.start())
        self.assertIn('password authentication failed for user "mailgw"', str(failure))
        self.assertNotIn("not-the-password-42", str(failure))
        # The file is read again for a new connection: fixing it is enough.
        wrong.write_text(self.postgres.password + "\n")
        self.assertEqual(await eventually(store.list_accounts, 5.0), [])

    async def test_passwordNeverShown(self) -> None:
        """Neither the password nor a wrong one appears in any log event, repr or
        error, through start-up, migrations, calls, refused logins and an unreachable
        server."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        wrong = Path(self.mktemp())
        wrong.write_text("not-the-password-42\n")
        errors: list[str] = []
        store = self.pg_store()
        await store.start()
        await store.add_account(account_fields(), 1.0)
        bad = self.pg_store(password_file=wrong)
        errors.append(str(await state_error(bad.start())))
        gone = self.pg_store(dsn=f"postgresql://mailgw@127.0.0.1:{free_port()}/x", connect_timeout=2)
        errors.append(str(await state_error(gone.start())))
        errors.append(str(await state_error(gone.list_accounts())))
        self.assertTrue(any("unavailable" in formatEvent(event) for event in events))
        shown = [*errors, repr(store), repr(bad), repr(gone)]
        shown += [formatEvent(event) for event in events] + [repr(event) for event in events]
        for text in shown:
            self.assertNotIn(self.postgres.password, text)
            self.assertNotIn("not-the-password-42", text)

    async def test_sessionSettings(self) -> None:
        """Sessions commit durably whatever the server's default (the test server's is
        synchronous_commit = off), and carry the statement timeout."""
        self.assertEqual(self.postgres.execute("SHOW synchronous_commit"), [("off",)])
        store = self.pg_store(statement_timeout=1.5)
        await store.start()
        settings = await store._call(
            lambda db: db.execute(
                "SELECT current_setting('synchronous_commit'), current_setting('statement_timeout')"
            ).fetchall()
        )
        self.assertEqual(settings, [("on", "1500ms")])

    async def test_silentServer(self) -> None:
        """A server that accepts connections but never answers: connecting gives up
        after connect_timeout, and for retry_delay the following calls fail at once
        rather than each waiting for a connection of its own."""
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dsn = f"postgresql://mailgw@127.0.0.1:{silent.getsockname()[1]}/mailgw"
        store = self.pg_store(dsn=dsn, connect_timeout=2, retry_delay=60.0)
        started = time.monotonic()
        failure = await state_error(store.start())
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertIn("timeout", str(failure))
        started = time.monotonic()
        for _ in range(3):
            failure = await state_error(store.list_accounts())
            self.assertIn("unavailable", str(failure))
        self.assertLess(time.monotonic() - started, 0.5)

    def test_passwordInDsnRefused(self) -> None:
        """A DSN with a password is refused without quoting it."""
        with self.assertRaises(ValueError) as caught:
            PostgreSQLState("postgresql://mailgw:hunter2@127.0.0.1/mailgw", reactor)
        self.assertIn("must not contain a password", str(caught.exception))
        self.assertNotIn("hunter2", str(caught.exception))


class PostgreSQLOutageTests(PostgreSQLTestCase):
    """The database stops and starts again under a store (an instance of its own)."""

    def setUp(self) -> None:
        super().setUp()
        # However a test ends, the next one finds the server running.
        self.addCleanup(lambda: None if self.postgres.running else self.postgres.start())

    async def test_downAndBack(self) -> None:
        """With PostgreSQL stopped a call fails with StateError within 10 s, and the
        following ones at once; started again, the same store works again by itself,
        with its data; each transition is logged once."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        store = self.pg_store(retry_delay=0.2)
        await store.start()
        account = await store.add_account(account_fields(), 1.0)
        self.postgres.stop()
        started = time.monotonic()
        await state_error(store.list_accounts())
        self.assertLess(time.monotonic() - started, 10.0)
        started = time.monotonic()
        for _ in range(5):
            await self.assertFailure(store.lease_acquire(account.id, "node-a", 30.0), StateError)
        self.assertLess(time.monotonic() - started, 1.0)
        await sleep(0.3)  # past retry_delay: the next call tries to connect again
        await state_error(store.list_accounts())
        self.postgres.start()
        self.assertEqual(await eventually(store.list_accounts, 15.0), [account])
        texts = [formatEvent(event) for event in events]
        self.assertEqual(len([t for t in texts if "unavailable" in t]), 1, texts)
        self.assertEqual(len([t for t in texts if "is back" in t]), 1, texts)

    async def test_restartBetweenCalls(self) -> None:
        """After a restart between two calls, the next call succeeds: the connections
        the server closed are replaced, not reported."""
        store = self.pg_store()
        await store.start()
        await defer.gatherResults([store.list_accounts() for _ in range(4)])  # several idle connections
        self.postgres.stop()
        self.postgres.start()
        self.assertEqual(await store.list_accounts(), [])

    async def test_downAtStart(self) -> None:
        """A database that is down when the gateway starts: start fails, but the store
        stays open and migrates and works once the database is back."""
        self.postgres.stop()
        store = self.pg_store()
        started = time.monotonic()
        await state_error(store.start())
        self.assertLess(time.monotonic() - started, 10.0)
        await state_error(store.list_accounts())
        self.postgres.start()
        self.assertEqual(await eventually(store.schema_version, 15.0), pg_state.SCHEMA_VERSION)
        self.assertEqual(await store.list_accounts(), [])


class StateServiceTests(TestCase):
    async def test_lifecycle(self) -> None:
        """The service opens the store when started and closes it when stopped."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        store = SQLiteState(folder / "state.sqlite3", reactor)
        service = StateService(store)
        service.startService()
        assert service.ready is not None
        await service.ready
        self.assertEqual(await store.list_accounts(), [])
        await service.stopService()
        await state_error(store.list_accounts())


class OpenStateTests(TestCase):
    """open_state makes the store [state] names."""

    def config(self, state: StateConfig) -> Config:
        data = {
            "gateway": {"state_dir": "state"},
            "tls": {"generate_self_signed": True},
            "aaa_server_group": [{"name": "LOCAL", "protocol": "local", "users_file": "users.toml"}],
        }
        folder = Path(self.mktemp()).absolute()
        config = parse_config(data, folder, check_files=False)
        from dataclasses import replace

        return replace(config, state=state)

    def test_sqlite(self) -> None:
        """backend = "sqlite": state.sqlite3 in gateway.state_dir."""
        config = self.config(StateConfig())
        store = open_state(config, reactor)
        self.assertIsInstance(store, SQLiteState)
        assert isinstance(store, SQLiteState)
        self.assertEqual(store.path, config.gateway.state_dir / "state.sqlite3")

    def test_postgresql(self) -> None:
        """backend = "postgresql": the DSN, and the password file to read when
        connecting (nothing is connected yet)."""
        password_file = Path("/etc/mailgw/db-password")
        store = open_state(
            self.config(StateConfig("postgresql", "postgresql://mailgw@db1:5433/mailgw", password_file)), reactor
        )
        assert isinstance(store, PostgreSQLState)
        self.assertEqual((store.where, store.password_file), ("mailgw@db1:5433/mailgw", password_file))
        self.assertEqual(repr(store), "<PostgreSQLState mailgw@db1:5433/mailgw>")
