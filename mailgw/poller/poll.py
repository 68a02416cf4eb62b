"""One poll of one remote POP account: SPEC [6] steps 1-5.

1. Log in (TLS none/STLS/implicit, certificate verified), ``CAPA``, then ``UIDL`` and
   ``LIST`` (pipelined when the server offers PIPELINING).
2. For each message not yet delivered, ``RETR`` it and read its header block (at most
   L{MAX_HEADER_BLOCK}); for a multipart message also its preamble up to the first
   boundary.  Reading from the POP3 server then pauses while the recipients are
   found in the account's header list and offered to the local SMTP server with
   ``RCPT TO`` (accepted = valid).
3. ``DATA``: the poller's ``Received`` trace header, the header block, and the rest of
   the message streamed from the POP3 connection to the SMTP connection as it arrives,
   the SMTP transport's buffer pausing the POP3 socket (bounded memory whatever the
   size).
4. ``DELE`` only after ``250`` to DATA, or for a message to drop (no recipient with
   ``no_recipient_action = "delete"``, a mail loop, a duplicate Message-ID); a 4xx
   leaves the message for the next poll.
5. The journal: ``started`` committed before DATA, ``ending`` just before the final
   ``.``, ``delivered`` after the ``250`` and before DELE.  A message found ``ending``
   at the next poll may have been delivered in the instant between the ``250`` and the
   commit: it is delivered again and the possible duplicate is logged.  One found
   ``started`` was cut before the end of its DATA, which the server drops: it is
   delivered again, with no duplicate possible.

A malformed message, header or UIDL line skips that message (left on the server) with
a logged reason, and the poll goes on.

Fault points (L{FAULT_POINTS}) let the crash tests kill the process at each step; in
the daemon the fault hook is C{None}.

This module holds L{Poll} and the run itself (login, listings, the loop over the
messages, QUIT and the journal pruning); the rest lives beside it and is re-exported
here:

- L{mailgw.poller.polltypes}: L{PollSettings}, L{PollReport}, L{SkippedMessage}, the
  fault points;
- L{mailgw.poller.transfer}: L{MessageTransfer}, the RETR-to-DATA stream, and its
  watchdog;
- L{mailgw.poller.delivery}: the delivery of one message and its journal marks (mixed
  into L{Poll}).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailgw.poller import message as msg
from mailgw.poller.delivery import _MessageDelivery
from mailgw.poller.leases import LeaseLost, PollLease
from mailgw.poller.polltypes import (
    FAULT_POINTS,
    Fault,
    PollReport,
    PollSettings,
    SkippedMessage,
    _Remote,
    _StopPoll,
)
from mailgw.poller.pop3 import Listing, Pop3Error, Pop3Session
from mailgw.poller.smtp import SmtpClient, SmtpError
from mailgw.poller.transfer import MessageTransfer
from mailgw.poller.transfer import _Watchdog as _Watchdog
from mailgw.state import AccountRecord, IStateStore, JournalState, StateError
from mailgw.upstream import Connector, UpstreamError, UpstreamTarget
from mailgw.upstream.pop3 import POP3UpstreamLogin
from mailgw.wire.errors import ProtocolError

__all__ = [
    "FAULT_POINTS",
    "Fault",
    "MessageTransfer",
    "Poll",
    "PollReport",
    "PollSettings",
    "SkippedMessage",
]

#: how long the journal remembers delivered messages gone from the server (their
#: Message-IDs keep suppressing duplicates meanwhile)
JOURNAL_RETENTION = 90 * 86400


class Poll(_MessageDelivery):
    """One poll of one account.  Create one per run; L{run} never raises for a
    failure of the servers (the report says what happened)."""

    log = Logger()

    def __init__(
        self,
        account: AccountRecord,
        password: str,
        *,
        state: IStateStore,
        connector: Connector,
        reactor: Any,
        settings: PollSettings,
        fault: Fault | None = None,
        progress: Callable[[PollReport], None] | None = None,
        stopping: Callable[[], bool] | None = None,
        clock: IReactorTime | None = None,
        lease: PollLease | None = None,
    ) -> None:
        self.account = account
        self._password = password
        self.state = state
        self.connector = connector
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.settings = settings
        self._fault = fault
        self._progress = progress
        self._stopping = stopping or (lambda: False)
        self.rule = msg.RecipientRule(
            domain=account.domain,
            headers=account.recipient_headers,
            received_parsing=account.received_parsing,
            skip_received=account.skip_received,
        )
        self.report = PollReport(account.id, started=self.clock.seconds())
        self._session: Pop3Session | None = None
        self._smtp: SmtpClient | None = None
        self._smtp_clients: list[SmtpClient] = []
        self._quit = False
        self._deletes = 0
        self._dele_answers = []
        self._pipelining = False
        self._upcoming = None
        self._prestarted = None
        self._delivered_ids: dict[str, str] = {}
        #: the SMTP client while a DATA is under way before its final dot
        self._relay: SmtpClient | None = None
        self._lease = lease
        if lease is not None:
            lease.on_lost(self._lease_lost)

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> PollReport:
        account = self.account
        report = self.report
        self.log.debug("Polling account {account}", account=account.id)
        try:
            await self._run()
        except (UpstreamError, Pop3Error, SmtpError, StateError, LeaseLost, _StopPoll) as e:
            report.error = getattr(e, "reason", None) or str(e)
            self.log.warn("Poll of account {account} stopped: {reason}", account=account.id, reason=report.error)
        finally:
            self._password = ""
            await self._close()
        report.finished = self.clock.seconds()
        if self._quit:
            report.deleted = self._deletes
        self.log.info("Poll of {summary}", summary=report.summary(), account=account.id)
        return report

    async def _close(self) -> None:
        """Close both connections and wait until they are closed."""
        session = self._session
        if session is not None:
            if not self._quit:
                session.abort()
            await session.lost
        for smtp in self._smtp_clients:
            await smtp.quit()
            await smtp.closed
        self._smtp = None

    async def _run(self) -> None:
        account = self.account
        target = UpstreamTarget(
            host=account.host,
            port=account.port,
            tls=account.tls,
            verify_certificate=account.verify,
            ca=Path(account.ca) if account.ca else None,
        )
        login, _ = await self.connector.login(target, POP3UpstreamLogin, account.username, self._password)
        self._password = ""
        session = self._session = Pop3Session(login, self.clock, timeout=self.settings.pop3_timeout)
        capabilities = await session.capabilities()
        self._pipelining = "PIPELINING" in capabilities
        if self._pipelining:
            uidl_answer = session.listing("UIDL")
            list_answer = session.listing("LIST")
            try:
                uidls = await uidl_answer
            except BaseException:
                list_answer.addErrback(lambda _: None)  # fails the same way; reported once
                raise
            sizes = await list_answer
        else:
            uidls = await session.listing("UIDL")
            sizes = await session.listing("LIST")
        if not uidls.status.ok:
            raise _StopPoll("the POP3 server does not support UIDL: messages cannot be tracked")
        messages = self._inventory(uidls, sizes)
        now = self.clock.seconds()
        await self.state.journal_seen(account.id, [m.uidl for m in messages], now)
        journal = await self.state.journal(account.id)
        self._delivered_ids = {
            entry.message_id: entry.uidl
            for entry in journal.values()
            if entry.state is JournalState.DELIVERED and entry.message_id
        }
        stopped: _StopPoll | LeaseLost | None = None
        try:
            for index, remote in enumerate(messages):
                following = messages[index + 1] if index + 1 < len(messages) else None
                self._upcoming = None if following is None else (following, journal.get(following.uidl))
                if self._lease is not None and self._lease.lost is not None:
                    raise self._lease.lost
                if self._stopping():
                    self.log.info("Poll of account {account} interrupted: the poller stops", account=account.id)
                    break
                await self._message(remote, journal.get(remote.uidl))
                if self._progress is not None:
                    self._progress(self.report)
        except (_StopPoll, LeaseLost) as e:
            stopped = e
        await self._unstart()  # a message marked "started" ahead that the poll did not reach
        # Apply the deletions done so far (QUIT), even when a message ended the poll
        # early; not after a broken connection, which the server rolls back.
        if not session.broken:
            try:
                await self._deleted_all()
                self._quit = await session.quit()
            except Pop3Error:
                self._quit = False
        if self._quit:
            await self.state.journal_prune(
                account.id, [m.uidl for m in messages], self.clock.seconds() - JOURNAL_RETENTION
            )
        if stopped is not None:
            raise stopped

    def _inventory(self, uidls: Listing, sizes: Listing) -> list[_Remote]:
        """The messages to consider, in mailbox order.  A message whose UIDL line is
        malformed, missing (an over-long line cannot be attributed), repeated or
        shared with another message is skipped, once, with the reason."""
        by_number: dict[int, str] = {}
        unusable: dict[int, str] = {}  # message number → why its UIDL cannot be used
        unattributed = uidls.too_long
        for line in uidls.lines:
            try:
                number, uidl = msg.parse_uidl_line(line)
            except ProtocolError:
                head = line.split(b" ", 1)[0]
                if head.isdigit() and len(head) <= 10 and int(head) > 0:
                    unusable.setdefault(int(head), "malformed UIDL line")
                else:
                    unattributed += 1
                continue
            if number in by_number or number in unusable:
                unusable[number] = "listed more than once in UIDL"
                continue
            by_number[number] = uidl
        size_of: dict[int, int] = {}
        if sizes.status.ok:
            for line in sizes.lines:
                try:
                    number, size = msg.parse_list_line(line)
                except ProtocolError:
                    continue
                size_of[number] = size
        owners: dict[str, int] = {}
        for uidl in by_number.values():
            owners[uidl] = owners.get(uidl, 0) + 1
        numbers = sorted(set(by_number) | set(unusable) | set(size_of))
        remotes: list[_Remote] = []
        missing = 0
        for number in numbers:
            uidl_or_none = by_number.get(number)
            if number in unusable:
                self._skip(uidl_or_none, number, "malformed_uidl", f"message {number}: {unusable[number]}")
            elif uidl_or_none is None:
                missing += 1
                self._skip(None, number, "malformed_uidl", f"message {number}: no valid UIDL line")
            elif owners[uidl_or_none] > 1:
                self._skip(uidl_or_none, number, "malformed_uidl", f"message {number}: UIDL shared with another")
            else:
                remotes.append(_Remote(number, uidl_or_none, size_of.get(number)))
        if unattributed and not missing:
            self._skip(None, None, "malformed_uidl", f"{unattributed} unreadable UIDL line(s)")
        self.report.messages = len(numbers)
        return remotes
