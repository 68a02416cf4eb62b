"""The SSO identity table survives a restart [7]: its entries in the state database.

L{IdentityPersistence} listens to an L{IdentityTable}: a Start or a renewal stores the
entry (L{IStateStore.identity_put}), a Stop or an expiry deletes it
(L{IStateStore.identity_delete}, of that entry only: a newer entry another gateway
stored for the address is left alone [11]).  Writes are asynchronous and never raise
into the table: a failed one is logged, and the next change of that address writes
again.  The writes of one address are made one at a time, in order, and coalesced:
while one is under way only the latest state wanted for the address waits, so a burst
of renewals costs two writes and a slow database holds at most two per address.

L{restore} reads the entries back into the table at start: those not expired, and not
learnt again meanwhile; the expired ones are deleted from the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.sso.identity import Change, Identity, IdentitySource, IdentityTable
from mailgw.state import IdentityRecord, IStateStore, StateError

__all__ = ["IdentityPersistence", "identity_of", "record_of", "restore"]

log = Logger()


def record_of(identity: Identity) -> IdentityRecord:
    """The stored form of C{identity}."""
    return IdentityRecord(
        ip=identity.ip,
        user=identity.user,
        source=identity.source.value,
        group_policy=identity.group_policy,
        first_seen=identity.first_seen,
        renewed=identity.renewed,
        expires=identity.expires,
        session_id=identity.session_id,
        mac=identity.mac,
    )


def identity_of(record: IdentityRecord) -> Identity:
    """The table entry of a stored C{record}.

    @raise ValueError: its source is not one this release knows.
    """
    return Identity(
        ip=record.ip,
        user=record.user,
        source=IdentitySource(record.source),
        group_policy=record.group_policy,
        first_seen=record.first_seen,
        renewed=record.renewed,
        expires=record.expires,
        session_id=record.session_id,
        mac=record.mac,
    )


@dataclass(frozen=True, slots=True)
class _Delete:
    """The entry of C{ip} is to be forgotten (C{session_id}: the one that ended)."""

    ip: str
    session_id: str


_Write = IdentityRecord | _Delete


class IdentityPersistence:
    """Writes the changes of an identity table to C{store}; subscribe it with
    C{table.subscribe(persistence)}.

    @ivar failures: writes that failed (each logged).
    """

    def __init__(self, store: IStateStore) -> None:
        self._store = store
        #: addresses with a write under way
        self._busy: set[str] = set()
        #: the latest write wanted for a busy address, made when its write is done
        self._waiting: dict[str, _Write] = {}
        #: the session each address was last stored with by this gateway (what a
        #: coalesced delete must remove)
        self._stored: dict[str, str] = {}
        self._drained: list[defer.Deferred[None]] = []
        self.failures = 0

    def __call__(self, change: Change, identity: Identity) -> None:
        """The table's listener: never raises, never waits."""
        wanted: _Write
        if change in (Change.START, Change.RENEW):
            wanted = record_of(identity)
        else:
            wanted = _Delete(identity.ip, identity.session_id)
        if identity.ip in self._busy:
            self._waiting[identity.ip] = wanted
        else:
            self._write(identity.ip, wanted)

    @property
    def pending(self) -> int:
        """Addresses with a write under way."""
        return len(self._busy)

    def drain(self) -> defer.Deferred[None]:
        """Fires once no write is under way or waiting (before the store is closed)."""
        if not self._busy:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        return d

    def _write(self, ip: str, wanted: _Write) -> None:
        self._busy.add(ip)
        d: defer.Deferred[object]
        if isinstance(wanted, IdentityRecord):
            self._stored[ip] = wanted.session_id
            d = defer.maybeDeferred(self._store.identity_put, wanted)
        else:
            # What this gateway stored last for the address, which may be another
            # entry than the one that ended when writes were coalesced.
            session_id = self._stored.pop(ip, wanted.session_id)
            d = defer.maybeDeferred(self._store.identity_delete, ip, session_id)
        d.addErrback(self._failed, ip)
        d.addBoth(self._done, ip)

    def _failed(self, failure: Failure, ip: str) -> None:
        self.failures += 1
        if failure.check(StateError):
            log.warn(
                "SSO identity of {client_ip} not saved in the state database: {reason}",
                client_ip=ip,
                reason=failure.getErrorMessage(),
            )
        else:
            log.failure("Saving the SSO identity of {client_ip} failed", failure, client_ip=ip)

    def _done(self, _: object, ip: str) -> None:
        self._busy.discard(ip)
        wanted = self._waiting.pop(ip, None)
        if wanted is not None:
            self._write(ip, wanted)
        elif not self._busy:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def load(self, table: IdentityTable) -> defer.Deferred[int]:
        """L{restore} C{table} from this store, logging a failure; fires with the
        number of entries restored (0 when the store could not be read)."""

        def failed(failure: Failure) -> int:
            if failure.check(StateError):
                log.warn(
                    "SSO identity table not restored from the state database: {reason}",
                    reason=failure.getErrorMessage(),
                )
            else:
                log.failure("Restoring the SSO identity table failed", failure)
            return 0

        return defer.Deferred.fromCoroutine(restore(table, self._store)).addErrback(failed)


async def restore(table: IdentityTable, store: IStateStore) -> int:
    """Put the entries stored in C{store} back into C{table} (at start): each one not
    expired and whose address the table has not learnt again since; the expired ones
    are deleted from the store.  Returns the number of entries restored.

    @raise StateError: the store cannot be read.
    """
    records = await store.identities()
    live = {identity.ip for identity in table}
    restored = 0
    expired: list[IdentityRecord] = []
    for record in records:  # renewed longest ago first: the table's own order
        if record.ip in live:
            continue
        try:
            identity = identity_of(record)
        except ValueError:
            log.warn(
                "SSO identity of {client_ip} in the state database has an unknown source {source}: skipped",
                client_ip=record.ip,
                source=record.source,
            )
            continue
        before = len(table)
        table.restore(identity)
        if len(table) > before:
            restored += 1
        else:
            expired.append(record)
    for record in expired:
        try:
            await store.identity_delete(record.ip, record.session_id)
        except StateError as e:
            log.warn("Expired SSO identity of {client_ip} not deleted: {reason}", client_ip=record.ip, reason=str(e))
            break
    log.info(
        "SSO identity table: {count} entries restored from the state database ({expired} expired)",
        count=restored,
        expired=len(expired),
    )
    return restored
