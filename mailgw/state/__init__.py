"""The gateway's persistent state, behind one interface [1].

Everything the gateway keeps across restarts goes through an L{IStateStore}: today the
remote POP poller's accounts, its delivery journal [6], the leases that let one
gateway at a time poll an account [11] and the entries of the SSO identity table [7].
SQLite implements it for one machine (L{mailgw.state.sqlite.SQLiteState}, the default)
and PostgreSQL for gateways sharing state behind a load balancer
(L{mailgw.state.postgresql.PostgreSQLState}); the C{[state]} configuration chooses
(L{open_state}), and the store's users do not change.

Every method returns a L{Deferred} and never blocks the reactor thread: backends run
their I/O elsewhere (SQLite in one dedicated thread, PostgreSQL in a bounded pool).
Records are plain frozen dataclasses, never backend objects.  Writes are durable when
their Deferred fires: the poller commits a journal entry before it deletes the remote
message.

A store is started once (which creates or migrates the schema) and closed once;
L{StateService} does both for a service tree.  A store that cannot reach its database
fails calls with L{StateError} promptly, never hangs them.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface

if TYPE_CHECKING:
    from mailgw.config import Config

__all__ = [
    "ACCOUNT_COLUMNS",
    "AccountRecord",
    "IStateStore",
    "IdentityRecord",
    "JournalEntry",
    "JournalState",
    "Lease",
    "StateError",
    "StateService",
    "open_state",
]


class StateError(Exception):
    """The state database cannot be used (unreadable, unreachable, newer schema,
    closed).  The message names the database, never a password."""


class JournalState(enum.StrEnum):
    """Where a remote message stands in the poll journal [6]."""

    #: listed by the remote server; not delivered yet (also: delivery failed cleanly)
    SEEN = "seen"
    #: the SMTP DATA is about to start or under way, its end not sent: a crash now
    #: loses nothing and duplicates nothing (the server drops an unfinished DATA)
    STARTED = "started"
    #: the end of DATA is being sent: a crash before L{DELIVERED} may have left a
    #: delivered message unrecorded, the one possible duplicate [6]
    ENDING = "ending"
    #: the local SMTP server answered 250 to DATA; the message may be deleted
    DELIVERED = "delivered"
    #: not to be delivered (a loop or a duplicate Message-ID, or no recipient with
    #: ``no_recipient_action = "delete"``): may be deleted
    DROPPED = "dropped"


#: the stored fields of a poller account, besides C{id}, C{created}, C{updated}
ACCOUNT_COLUMNS: tuple[str, ...] = (
    "enabled",
    "description",
    "host",
    "port",
    "tls",
    "verify",
    "ca",
    "username",
    "password",
    "domain",
    "interval",
    "leave_on_server",
    "leave_days",
    "recipient_headers",
    "received_parsing",
    "skip_received",
    "no_recipient_action",
)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """A remote POP account as stored.  C{password} is the encrypted token, never
    the password (see L{mailgw.poller.accounts.PasswordCipher})."""

    id: int
    enabled: bool
    description: str
    host: str
    port: int
    tls: str
    verify: bool
    ca: str | None
    username: str
    password: bytes
    domain: str
    interval: int | None
    leave_on_server: bool
    leave_days: int
    recipient_headers: tuple[str, ...]
    received_parsing: bool
    skip_received: int
    no_recipient_action: str
    created: float
    updated: float

    def __repr__(self) -> str:
        return f"<AccountRecord {self.id} {self.username}@{self.host}:{self.port} for {self.domain}>"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One remote message of one account, by UIDL."""

    account_id: int
    uidl: str
    state: JournalState
    message_id: str | None
    #: when the poller first listed this UIDL (the age for "leave on server N days")
    first_seen: float
    #: when the state last changed
    changed: float


@dataclass(frozen=True, slots=True)
class Lease:
    """The right of one gateway (C{node}) to poll one account [11].

    Times are seconds since the epoch on the I{store's} clock, not the caller's: the
    gateways sharing a database must agree on when a lease runs out, so the database
    server's clock decides for PostgreSQL (the reactor's for SQLite, one machine).
    """

    account_id: int
    node: str
    #: when C{node} took the lease (kept while it renews it)
    acquired: float
    #: when the lease runs out unless renewed; from then on any node may take it
    expires: float


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """One entry of the SSO identity table [7] as stored: the fields of
    L{mailgw.sso.identity.Identity}, with its source as a string (C{"inline"},
    C{"monitor"}, C{"portal"}), so that this layer does not import the SSO one."""

    ip: str
    user: str
    source: str
    group_policy: str | None
    first_seen: float
    renewed: float
    expires: float
    #: the Acct-Session-Id of the entry's accounting export
    session_id: str
    mac: str | None = None


class IStateStore(Interface):
    """All persistent state of the gateway.

    Account fields passed to L{add_account} and L{update_account} are a mapping from
    names of L{ACCOUNT_COLUMNS} to validated values (the poller validates; a store only
    stores).  Times are seconds since the epoch, passed in by the caller (its clock).
    """

    def start() -> defer.Deferred[None]:
        """Open the store, creating or migrating the schema."""

    def close() -> defer.Deferred[None]:
        """Finish pending work and close the store."""

    # -- poller accounts -------------------------------------------------------------

    def add_account(fields: Mapping[str, object], now: float) -> defer.Deferred[AccountRecord]:  # noqa: N805
        """Store a new account; fires with it (its C{id} assigned)."""

    def update_account(
        account_id: int,  # noqa: N805 - zope.interface declarations have no self
        fields: Mapping[str, object],
        now: float,
    ) -> defer.Deferred[AccountRecord | None]:
        """Change some fields; fires with the account, or C{None} if there is none."""

    def delete_account(account_id: int) -> defer.Deferred[bool]:  # noqa: N805
        """Delete an account and its journal; fires with whether it existed."""

    def get_account(account_id: int) -> defer.Deferred[AccountRecord | None]:  # noqa: N805
        """One account, or C{None}."""

    def list_accounts(domain: str | None = None) -> defer.Deferred[list[AccountRecord]]:  # noqa: N805
        """All accounts (of one local domain, compared case-insensitively), by id."""

    # -- the poll journal ----------------------------------------------------------------

    def journal(account_id: int) -> defer.Deferred[dict[str, JournalEntry]]:  # noqa: N805
        """The journal of an account, by UIDL."""

    def journal_seen(account_id: int, uidls: Sequence[str], now: float) -> defer.Deferred[None]:  # noqa: N805
        """Record UIDLs listed by the server: new ones as L{JournalState.SEEN} with
        C{first_seen = now}; known ones are left as they are."""

    def journal_mark(
        account_id: int,  # noqa: N805 - zope.interface declarations have no self
        uidl: str,
        state: JournalState,
        now: float,
        message_id: str | None = None,
    ) -> defer.Deferred[None]:
        """Set the state of one message (creating its entry if needed), durably:
        the Deferred fires once the change is committed to stable storage.  A
        C{message_id} of C{None} keeps the one recorded."""

    def journal_marks(
        account_id: int,  # noqa: N805 - zope.interface declarations have no self
        marks: Sequence[tuple[str, JournalState, str | None]],
        now: float,
    ) -> defer.Deferred[None]:
        """L{journal_mark} for several messages (uidl, state, message_id) in one
        transaction: all of them are committed to stable storage, or none."""

    def journal_prune(
        account_id: int,  # noqa: N805 - zope.interface declarations have no self
        present: Collection[str],
        forget_before: float,
    ) -> defer.Deferred[int]:
        """Forget entries whose UIDL is no longer on the server: at once for messages
        never delivered, after C{forget_before} for delivered and dropped ones (their
        Message-ID keeps suppressing duplicates until then).  Fires with the number of
        entries removed."""

    # -- poller account leases [11] ------------------------------------------------------
    #
    # One gateway at a time polls an account: the one holding its lease.  A lease runs
    # for C{duration} seconds of the store's clock from its last acquisition or renewal;
    # once it has run out, any node may take it.  Each method is one atomic statement,
    # so of several nodes asking at once exactly one gets a free lease.  Deleting an
    # account deletes its lease.

    def lease_acquire(account_id: int, node: str, duration: float) -> defer.Deferred[Lease | None]:  # noqa: N805
        """Take the lease of an account for C{node} if nobody holds it, it has run out,
        or C{node} holds it already (then this renews it).  Fires with the lease
        C{node} now holds, or C{None} if another node holds it; fails with
        L{StateError} if the account does not exist."""

    def lease_renew(account_id: int, node: str, duration: float) -> defer.Deferred[Lease | None]:  # noqa: N805
        """Extend the lease C{node} holds to C{duration} seconds from now.  Fires with
        it, or C{None} if C{node} no longer holds it (another node took it after it ran
        out, or it was released): the caller must stop polling that account at once."""

    def lease_release(account_id: int, node: str) -> defer.Deferred[bool]:  # noqa: N805
        """Give up the lease if C{node} holds it, so that another node may take it at
        once; fires with whether C{node} held it."""

    def leases() -> defer.Deferred[dict[int, Lease]]:
        """The leases in force (not run out), by account id."""

    # -- the SSO identity table [7] --------------------------------------------------------
    #
    # One row per client address, written as the table changes and read back at start,
    # so that the table survives a restart.  Expired rows are the reader's to drop.

    def identity_put(record: IdentityRecord) -> defer.Deferred[None]:  # noqa: N805
        """Store the entry of C{record.ip}, replacing the one stored for that address."""

    def identity_delete(ip: str, session_id: str | None = None) -> defer.Deferred[bool]:  # noqa: N805
        """Forget the entry of C{ip}; with C{session_id}, only if the stored entry is
        that one (not a newer entry of the same address).  Fires with whether an entry
        was deleted."""

    def identities() -> defer.Deferred[list[IdentityRecord]]:
        """Every stored entry, the one renewed longest ago first."""


class StateService(Service):
    """Starts a state store with the service tree and closes it when it stops.

    Add it to the tree before the services that use the store: a
    L{MultiService} stops its children in reverse order, so the store is closed last.
    """

    log = Logger()

    def __init__(self, store: IStateStore) -> None:
        self.store = store
        self.ready: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self.ready = self.store.start()
        self.ready.addErrback(lambda f: self.log.failure("Cannot open the state database", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.store.close()


def open_state(config: Config, reactor: Any) -> IStateStore:
    """The state store C{config}'s C{[state]} section names, not started yet.

    C{backend = "sqlite"}: C{state.sqlite3} in C{gateway.state_dir}.
    C{backend = "postgresql"}: C{state.dsn}, with the password read from
    C{state.dsn_password_file} (if set) each time a connection is opened.
    """
    state = config.state
    if state.backend == "postgresql":
        from mailgw.state.postgresql import PostgreSQLState

        return PostgreSQLState(state.dsn, reactor, password_file=state.dsn_password_file)
    from mailgw.state.sqlite import SQLiteState

    return SQLiteState(config.gateway.state_dir / "state.sqlite3", reactor)
