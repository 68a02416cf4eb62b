"""The state interface and its SQLite backend [1], [6]: schema versions and migrations,
accounts, the poll journal, durability settings, and that nothing runs in the reactor
thread."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailgw.state import ACCOUNT_COLUMNS, IStateStore, JournalState, StateError, StateService
from mailgw.state.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteState


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


class SQLiteStateTests(TestCase):
    async def open(self) -> SQLiteState:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        store = SQLiteState(folder / "state.sqlite3", reactor)
        await store.start()
        self.addCleanup(store.close)
        return store

    async def test_interface(self) -> None:
        """SQLiteState provides IStateStore."""
        store = await self.open()
        self.assertTrue(verifyObject(IStateStore, store))

    async def test_freshDatabase(self) -> None:
        """A new database is created 0600, in WAL mode with synchronous FULL, at the
        latest schema version."""
        store = await self.open()
        self.assertEqual(await store.schema_version(), SCHEMA_VERSION)
        self.assertEqual(stat.S_IMODE(os.stat(store.path).st_mode), 0o600)
        await store.close()
        db = sqlite3.connect(store.path)
        try:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(db.execute("SELECT version FROM schema_version").fetchone()[0], SCHEMA_VERSION)
        finally:
            db.close()

    async def test_synchronousFull(self) -> None:
        """The connection commits with synchronous = FULL (2)."""
        store = await self.open()
        level = await store._call(lambda: store._conn().execute("PRAGMA synchronous").fetchone()[0])
        self.assertEqual(level, 2)

    async def test_migrationsRunOnce(self) -> None:
        """Reopening does not migrate again; a new migration is applied on the next
        start and only then."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        path = folder / "state.sqlite3"
        store = SQLiteState(path, reactor)
        await store.start()
        await store.add_account(account_fields(), 1.0)
        await store.close()
        calls = []

        def migration_2(db: sqlite3.Connection) -> None:
            calls.append(1)
            db.execute("CREATE TABLE extra (x INTEGER)")

        for _ in range(2):
            store = SQLiteState(path, reactor, migrations=[*MIGRATIONS, migration_2])
            await store.start()
            self.assertEqual(await store.schema_version(), SCHEMA_VERSION + 1)
            self.assertEqual(len(await store.list_accounts()), 1)
            await store.close()
        self.assertEqual(calls, [1])

    async def test_failedMigrationRollsBack(self) -> None:
        """A failing migration leaves the database at the previous version."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        path = folder / "state.sqlite3"

        def broken(db: sqlite3.Connection) -> None:
            db.execute("CREATE TABLE half (x INTEGER)")
            raise sqlite3.OperationalError("boom")

        store = SQLiteState(path, reactor, migrations=[*MIGRATIONS, broken])
        await self.assertFailure(store.start(), StateError)
        db = sqlite3.connect(path)
        try:
            self.assertEqual(db.execute("SELECT version FROM schema_version").fetchone()[0], SCHEMA_VERSION)
            self.assertIsNone(db.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone())
        finally:
            db.close()

    async def test_newerSchemaRefused(self) -> None:
        """A database of a newer release is refused."""
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        path = folder / "state.sqlite3"
        store = SQLiteState(path, reactor)
        await store.start()
        await store.close()
        db = sqlite3.connect(path)
        db.execute("UPDATE schema_version SET version = 99")
        db.commit()
        db.close()
        store = SQLiteState(path, reactor)
        with self.assertRaises(StateError) as caught:
            await store.start()
        self.assertIn("newer release", str(caught.exception))

    async def test_notOpen(self) -> None:
        """Calls before start or after close fail with StateError."""
        store = SQLiteState(Path(self.mktemp()).absolute(), reactor)
        await self.assertFailure(store.list_accounts(), StateError)
        store = await self.open()
        await store.close()
        await self.assertFailure(store.list_accounts(), StateError)

    async def test_offTheReactorThread(self) -> None:
        """Every call runs in the store's own thread, never the reactor's."""
        store = await self.open()
        name = await store._call(lambda: threading.current_thread().name)
        self.assertNotEqual(name, threading.current_thread().name)
        self.assertIn("mailgw-state", name)

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
        self.assertEqual([a.id for a in await store.list_accounts("EXAMPLE.com")], [1])
        self.assertEqual([a.id for a in await store.list_accounts()], [1, 2])
        changed = await store.update_account(1, {"port": 110, "enabled": False}, 20.0)
        assert changed is not None
        self.assertEqual((changed.port, changed.enabled, changed.updated, changed.created), (110, False, 20.0, 10.0))
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

    async def test_journal(self) -> None:
        """Seen UIDLs keep their first-seen time; marks change the state, keep the
        Message-ID when none is given; unknown UIDLs are created by a mark."""
        store = await self.open()
        account = await store.add_account(account_fields(), 1.0)
        await store.journal_seen(account.id, ["a", "b"], 100.0)
        await store.journal_seen(account.id, ["a", "c"], 200.0)
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

    async def test_journalRequiresAccount(self) -> None:
        """A journal entry of a deleted account is refused (StateError)."""
        store = await self.open()
        await self.assertFailure(store.journal_mark(42, "a", JournalState.SEEN, 1.0), StateError)

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
        await self.assertFailure(store.list_accounts(), StateError)
