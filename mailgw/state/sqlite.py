"""The SQLite state store: the standard library's C{sqlite3}, in a thread of its own.

One connection, used only from one dedicated thread (a L{ThreadPool} of exactly one
thread): calls run one at a time in submission order, so the store needs no locking and
the reactor thread never waits for the disk.  The database runs in WAL mode with
C{synchronous = FULL}: a transaction is on stable storage when its Deferred fires,
which the poller's journal relies on [6].

The schema is versioned: C{schema_version} holds the version reached, and
L{MIGRATIONS} lists the steps from an empty database, each run in its own transaction
together with the version update.  A database written by a newer release (a version
above the last migration) is refused rather than guessed at.

Poller account leases [11] work here as on PostgreSQL (each a single upsert under the
write lock), on the reactor's clock: several processes of one machine sharing the file
get the same one-holder guarantee.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailgw.state import (
    ACCOUNT_COLUMNS,
    AccountRecord,
    IdentityRecord,
    IStateStore,
    JournalEntry,
    JournalState,
    Lease,
    StateError,
)
from mailgw.state.directory import DIRECTORY_SCHEMA

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteState"]

T = TypeVar("T")

Migration = Callable[[sqlite3.Connection], None]


def _migration_1(db: sqlite3.Connection) -> None:
    """Poller accounts and the poll journal."""
    db.execute(
        """
        CREATE TABLE poller_accounts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            enabled INTEGER NOT NULL,
            description TEXT NOT NULL,
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            tls TEXT NOT NULL,
            verify INTEGER NOT NULL,
            ca TEXT,
            username TEXT NOT NULL,
            password BLOB NOT NULL,
            domain TEXT NOT NULL,
            interval INTEGER,
            leave_on_server INTEGER NOT NULL,
            leave_days INTEGER NOT NULL,
            recipient_headers TEXT NOT NULL,
            received_parsing INTEGER NOT NULL,
            skip_received INTEGER NOT NULL,
            no_recipient_action TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX poller_accounts_domain ON poller_accounts (domain COLLATE NOCASE)")
    db.execute(
        """
        CREATE TABLE poll_journal (
            account_id INTEGER NOT NULL REFERENCES poller_accounts (id) ON DELETE CASCADE,
            uidl TEXT NOT NULL,
            state TEXT NOT NULL,
            message_id TEXT,
            first_seen REAL NOT NULL,
            changed REAL NOT NULL,
            PRIMARY KEY (account_id, uidl)
        )
        """
    )
    db.execute("CREATE INDEX poll_journal_message_id ON poll_journal (account_id, message_id)")


def _migration_2(db: sqlite3.Connection) -> None:
    """Poller account leases [11]."""
    db.execute(
        """
        CREATE TABLE poller_leases (
            account_id INTEGER PRIMARY KEY REFERENCES poller_accounts (id) ON DELETE CASCADE,
            node TEXT NOT NULL,
            acquired REAL NOT NULL,
            expires REAL NOT NULL
        )
        """
    )


def _migration_3(db: sqlite3.Connection) -> None:
    """The SSO identity table [7]: one row per client address."""
    db.execute(
        """
        CREATE TABLE sso_identities (
            ip TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            source TEXT NOT NULL,
            group_policy TEXT,
            first_seen REAL NOT NULL,
            renewed REAL NOT NULL,
            expires REAL NOT NULL,
            session_id TEXT NOT NULL,
            mac TEXT
        )
        """
    )


def _migration_4(db: sqlite3.Connection) -> None:
    """The session directory [11]: the same tables as PostgreSQL's (schema versions are
    the same in both backends), unused by a single gateway."""
    for statement in DIRECTORY_SCHEMA:
        db.execute(statement.replace("TIMESTAMPTZ", "REAL").replace("DOUBLE PRECISION", "REAL"))


#: the schema migrations, in order: C{MIGRATIONS[n]} takes version C{n} to C{n + 1}
MIGRATIONS: Sequence[Migration] = (_migration_1, _migration_2, _migration_3, _migration_4)
#: the schema version this release writes
SCHEMA_VERSION = len(MIGRATIONS)

_ACCOUNT_SELECT = "SELECT id, " + ", ".join(ACCOUNT_COLUMNS) + ", created, updated FROM poller_accounts"  # noqa: S608 - fixed column names
_BOOL_COLUMNS = frozenset({"enabled", "verify", "leave_on_server", "received_parsing"})
#: the columns of sso_identities, in the order of L{IdentityRecord}'s fields
_IDENTITY_COLUMNS = "ip, username, source, group_policy, first_seen, renewed, expires, session_id, mac"


@implementer(IStateStore)
class SQLiteState:
    """An L{IStateStore} in one SQLite file (created 0600 if missing).

    @param path: the database file, normally C{state_dir/state.sqlite3}.
    @param reactor: where results are delivered (the reactor thread).
    @param clock: the clock of leases (default: C{reactor}).
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        reactor: Any,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        clock: IReactorTime | None = None,
    ) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self._clock: IReactorTime = reactor if clock is None else clock
        self._migrations = tuple(migrations)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mailgw-state")
        self._db: sqlite3.Connection | None = None
        self._started = False
        self._closed = False

    # -- running in the state thread -------------------------------------------------

    def _call(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        if not self._started or self._closed:
            return defer.fail(StateError("the state database is not open"))
        return deferToThreadPool(self._reactor, self._pool, self._guarded, f, *args)

    @staticmethod
    def _guarded(f: Callable[..., T], *args: Any) -> T:
        try:
            return f(*args)
        except sqlite3.Error as e:
            raise StateError(f"state database error: {e}") from None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError("the state database is not open")
        return self._db

    def _write(self, f: Callable[[sqlite3.Connection], T]) -> T:
        """Run C{f} in one immediate (write-locking) transaction."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = f(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        if self._started:
            return defer.fail(StateError("the state database was already started"))
        self._started = True
        self._pool.start()
        d = self._call(self._open)
        d.addErrback(self._failed_to_open)
        return d

    def _failed_to_open(self, failure: Any) -> Any:
        self._closed = True
        self._pool.stop()
        return failure

    def _open(self) -> None:
        if not self.path.exists():
            # Created private before SQLite sees it; SQLite gives its -wal and -shm
            # files the database's permissions.
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(descriptor)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as e:
            raise StateError(f"cannot open the state database {self.path}: {e}") from None
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            self._db = db
            self._migrate(db)
        except BaseException:
            self._db = None
            db.close()
            raise

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = int(row[0])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if version > len(self._migrations):
            raise StateError(
                f"{self.path} has schema version {version}; this release knows up to "
                f"{len(self._migrations)}: refusing to use a database of a newer release"
            )
        for number in range(version, len(self._migrations)):
            migration = self._migrations[number]

            def step(db: sqlite3.Connection, migration: Migration = migration, number: int = number) -> None:
                # Re-read inside the lock: another process may have migrated meanwhile.
                current = int(db.execute("SELECT version FROM schema_version").fetchone()[0])
                if current != number:
                    return
                migration(db)
                db.execute("UPDATE schema_version SET version = ?", (number + 1,))

            self._write(step)
            self.log.info(
                "State database {path} migrated to schema version {version}", path=str(self.path), version=number + 1
            )

    def schema_version(self) -> defer.Deferred[int]:
        """The schema version of the open database."""
        return self._call(lambda: int(self._conn().execute("SELECT version FROM schema_version").fetchone()[0]))

    def close(self) -> defer.Deferred[None]:
        if not self._started or self._closed:
            return defer.succeed(None)
        d = self._call(self._close)
        self._closed = True

        def stop_pool(result: object) -> object:
            self._pool.stop()
            return result

        d.addBoth(stop_pool)
        return d

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    # -- accounts --------------------------------------------------------------------------

    @staticmethod
    def _encode(fields: Mapping[str, object]) -> dict[str, object]:
        unknown = set(fields) - set(ACCOUNT_COLUMNS)
        if unknown:
            raise ValueError(f"not account columns: {sorted(unknown)}")
        values: dict[str, object] = {}
        for name, value in fields.items():
            if name == "recipient_headers":
                value = json.dumps(list(value))  # type: ignore[call-overload]
            elif name in _BOOL_COLUMNS:
                value = int(bool(value))
            values[name] = value
        return values

    @staticmethod
    def _account(row: Sequence[Any]) -> AccountRecord:
        values = dict(zip(("id", *ACCOUNT_COLUMNS, "created", "updated"), row, strict=True))
        for name in _BOOL_COLUMNS:
            values[name] = bool(values[name])
        values["recipient_headers"] = tuple(json.loads(values["recipient_headers"]))
        values["password"] = bytes(values["password"])
        return AccountRecord(**values)

    def add_account(self, fields: Mapping[str, object], now: float) -> defer.Deferred[AccountRecord]:
        try:
            values = self._encode(fields)
        except ValueError as e:
            return defer.fail(e)
        missing = set(ACCOUNT_COLUMNS) - set(values)
        if missing:
            return defer.fail(ValueError(f"missing account columns: {sorted(missing)}"))

        def add(db: sqlite3.Connection) -> AccountRecord:
            names = [*values, "created", "updated"]
            cursor = db.execute(
                f"INSERT INTO poller_accounts ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",  # noqa: S608 - names are ACCOUNT_COLUMNS
                [*values.values(), now, now],
            )
            row = db.execute(_ACCOUNT_SELECT + " WHERE id = ?", (cursor.lastrowid,)).fetchone()
            return self._account(row)

        return self._call(self._write, add)

    def update_account(
        self, account_id: int, fields: Mapping[str, object], now: float
    ) -> defer.Deferred[AccountRecord | None]:
        try:
            values = self._encode(fields)
        except ValueError as e:
            return defer.fail(e)

        def update(db: sqlite3.Connection) -> AccountRecord | None:
            assignments = [f"{name} = ?" for name in values] + ["updated = ?"]
            db.execute(
                f"UPDATE poller_accounts SET {', '.join(assignments)} WHERE id = ?",  # noqa: S608 - names are ACCOUNT_COLUMNS
                [*values.values(), now, account_id],
            )
            row = db.execute(_ACCOUNT_SELECT + " WHERE id = ?", (account_id,)).fetchone()
            return None if row is None else self._account(row)

        return self._call(self._write, update)

    def delete_account(self, account_id: int) -> defer.Deferred[bool]:
        def delete(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM poll_journal WHERE account_id = ?", (account_id,))
            db.execute("DELETE FROM poller_leases WHERE account_id = ?", (account_id,))
            return db.execute("DELETE FROM poller_accounts WHERE id = ?", (account_id,)).rowcount > 0

        return self._call(self._write, delete)

    def get_account(self, account_id: int) -> defer.Deferred[AccountRecord | None]:
        def get() -> AccountRecord | None:
            row = self._conn().execute(_ACCOUNT_SELECT + " WHERE id = ?", (account_id,)).fetchone()
            return None if row is None else self._account(row)

        return self._call(get)

    def list_accounts(self, domain: str | None = None) -> defer.Deferred[list[AccountRecord]]:
        def list_() -> list[AccountRecord]:
            db = self._conn()
            if domain is None:
                rows = db.execute(_ACCOUNT_SELECT + " ORDER BY id").fetchall()
            else:
                rows = db.execute(
                    _ACCOUNT_SELECT + " WHERE domain = ? COLLATE NOCASE ORDER BY id", (domain,)
                ).fetchall()
            return [self._account(row) for row in rows]

        return self._call(list_)

    # -- journal ---------------------------------------------------------------------------

    def journal(self, account_id: int) -> defer.Deferred[dict[str, JournalEntry]]:
        def read() -> dict[str, JournalEntry]:
            rows = self._conn().execute(
                "SELECT uidl, state, message_id, first_seen, changed FROM poll_journal WHERE account_id = ?",
                (account_id,),
            )
            return {
                uidl: JournalEntry(account_id, uidl, JournalState(state), message_id, first_seen, changed)
                for uidl, state, message_id, first_seen, changed in rows
            }

        return self._call(read)

    def journal_seen(self, account_id: int, uidls: Sequence[str], now: float) -> defer.Deferred[None]:
        rows = [(account_id, uidl, JournalState.SEEN.value, now, now) for uidl in uidls]

        def seen(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT OR IGNORE INTO poll_journal (account_id, uidl, state, first_seen, changed) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        return self._call(self._write, seen)

    def journal_mark(
        self, account_id: int, uidl: str, state: JournalState, now: float, message_id: str | None = None
    ) -> defer.Deferred[None]:
        return self.journal_marks(account_id, [(uidl, state, message_id)], now)

    def journal_marks(
        self, account_id: int, marks: Sequence[tuple[str, JournalState, str | None]], now: float
    ) -> defer.Deferred[None]:
        rows = [(account_id, uidl, JournalState(state).value, mid, now, now) for uidl, state, mid in marks]

        def mark(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO poll_journal (account_id, uidl, state, message_id, first_seen, changed) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (account_id, uidl) DO UPDATE SET state = excluded.state, changed = excluded.changed, "
                "message_id = COALESCE(excluded.message_id, poll_journal.message_id)",
                rows,
            )

        return self._call(self._write, mark)

    def journal_prune(self, account_id: int, present: Collection[str], forget_before: float) -> defer.Deferred[int]:
        keep = frozenset(present)
        kept_states = (JournalState.DELIVERED.value, JournalState.DROPPED.value)

        def prune(db: sqlite3.Connection) -> int:
            doomed = [
                (account_id, uidl)
                for uidl, state, changed in db.execute(
                    "SELECT uidl, state, changed FROM poll_journal WHERE account_id = ?", (account_id,)
                )
                if uidl not in keep and (state not in kept_states or changed < forget_before)
            ]
            db.executemany("DELETE FROM poll_journal WHERE account_id = ? AND uidl = ?", doomed)
            return len(doomed)

        return self._call(self._write, prune)

    # -- leases ----------------------------------------------------------------------------

    def lease_acquire(self, account_id: int, node: str, duration: float) -> defer.Deferred[Lease | None]:
        if not duration > 0:
            return defer.fail(ValueError(f"a lease lasts a positive time, got {duration!r}"))
        now = self._clock.seconds()

        def acquire(db: sqlite3.Connection) -> Lease | None:
            # fetchall: the statement must have run to its end before COMMIT
            rows = db.execute(
                "INSERT INTO poller_leases (account_id, node, acquired, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (account_id) DO UPDATE SET node = excluded.node, "
                "acquired = CASE WHEN poller_leases.node = excluded.node AND poller_leases.expires > ? "
                "THEN poller_leases.acquired ELSE excluded.acquired END, "
                "expires = excluded.expires "
                "WHERE poller_leases.node = excluded.node OR poller_leases.expires <= ? "
                "RETURNING account_id, node, acquired, expires",
                (account_id, node, now, now + duration, now, now),
            ).fetchall()
            return Lease(*rows[0]) if rows else None

        return self._call(self._write, acquire)

    def lease_renew(self, account_id: int, node: str, duration: float) -> defer.Deferred[Lease | None]:
        if not duration > 0:
            return defer.fail(ValueError(f"a lease lasts a positive time, got {duration!r}"))
        expires = self._clock.seconds() + duration

        def renew(db: sqlite3.Connection) -> Lease | None:
            rows = db.execute(
                "UPDATE poller_leases SET expires = ? WHERE account_id = ? AND node = ? "
                "RETURNING account_id, node, acquired, expires",
                (expires, account_id, node),
            ).fetchall()
            return Lease(*rows[0]) if rows else None

        return self._call(self._write, renew)

    def lease_release(self, account_id: int, node: str) -> defer.Deferred[bool]:
        def release(db: sqlite3.Connection) -> bool:
            cursor = db.execute("DELETE FROM poller_leases WHERE account_id = ? AND node = ?", (account_id, node))
            return cursor.rowcount > 0

        return self._call(self._write, release)

    def leases(self) -> defer.Deferred[dict[int, Lease]]:
        now = self._clock.seconds()

        def read() -> dict[int, Lease]:
            rows = self._conn().execute(
                "SELECT account_id, node, acquired, expires FROM poller_leases WHERE expires > ? ORDER BY account_id",
                (now,),
            )
            return {row[0]: Lease(*row) for row in rows}

        return self._call(read)

    # -- the SSO identity table ------------------------------------------------------------

    def identity_put(self, record: IdentityRecord) -> defer.Deferred[None]:
        values = (record.ip, record.user, record.source, record.group_policy, record.first_seen,
                  record.renewed, record.expires, record.session_id, record.mac)  # fmt: skip

        def put(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT OR REPLACE INTO sso_identities ({_IDENTITY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - fixed column names
                values,
            )

        return self._call(self._write, put)

    def identity_delete(self, ip: str, session_id: str | None = None) -> defer.Deferred[bool]:
        def delete(db: sqlite3.Connection) -> bool:
            if session_id is None:
                cursor = db.execute("DELETE FROM sso_identities WHERE ip = ?", (ip,))
            else:
                cursor = db.execute("DELETE FROM sso_identities WHERE ip = ? AND session_id = ?", (ip, session_id))
            return cursor.rowcount > 0

        return self._call(self._write, delete)

    def identities(self) -> defer.Deferred[list[IdentityRecord]]:
        def read() -> list[IdentityRecord]:
            rows = self._conn().execute(
                f"SELECT {_IDENTITY_COLUMNS} FROM sso_identities ORDER BY renewed, ip"  # noqa: S608 - fixed column names
            )
            return [IdentityRecord(*row) for row in rows]

        return self._call(read)
