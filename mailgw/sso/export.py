"""The RADIUS accounting export of the identity table [7]: each entry is a session
of the collectors (FortiGate RSSO, SonicWall RADIUS SSO): Start when learnt,
Interim-Update when renewed, Stop when it ends, with User-Name, Framed-IP-Address,
Calling-Station-Id (the MAC where known, else the address), Class (the group
policy), Acct-Session-Id and NAS-Identifier.

Collectors that never answer accounting (FortiGate's default) get each record at most
twice (L{RadiusAccounting.for_collector}): nothing is retried forever.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailgw.auth.radius import AccountingSession, IRadiusTransport, RadiusAccounting, TerminateCause
from mailgw.config import RadiusCollector
from mailgw.sso.identity import Change, Identity


def accounting_session(identity: Identity) -> AccountingSession:
    """The accounting view of an entry."""
    return AccountingSession(
        session_id=identity.session_id,
        user=identity.user,
        client_ip=identity.ip,
        started=identity.first_seen,
        calling_station_id=identity.mac or identity.ip,
        radius_class=identity.group_policy,
    )


class AccountingExport:
    """Sends the table's changes to every collector (a listener of the table).

    @param transport: the gateway's RADIUS client.
    @param collectors: C{sso.pop3.radius_accounting}.
    @param nas_identifier: the gateway's node name.
    """

    def __init__(self, transport: IRadiusTransport, collectors: Sequence[RadiusCollector], nas_identifier: str) -> None:
        self._senders = [RadiusAccounting.for_collector(transport, c, nas_identifier) for c in collectors]

    def __call__(self, change: Change, identity: Identity) -> None:
        session = accounting_session(identity)
        for sender in self._senders:
            if change is Change.START:
                sender.start(session)
            elif change is Change.RENEW:
                sender.interim(session)
            else:
                cause = TerminateCause.SESSION_TIMEOUT if change is Change.EXPIRE else TerminateCause.USER_REQUEST
                sender.stop(session, cause)

    @property
    def pending(self) -> int:
        """Records queued or in flight."""
        return sum(sender.pending for sender in self._senders)

    def close(self) -> None:
        for sender in self._senders:
            sender.close()

