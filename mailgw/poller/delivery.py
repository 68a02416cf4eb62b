"""Delivering the messages of a poll (SPEC [6] steps 2-5), one at a time.

L{_MessageDelivery} is the half of L{mailgw.poller.poll.Poll} that handles one listed
message: what its journal entry says to do with it, the RETR through a
L{MessageTransfer}, the loop, duplicate and recipient checks, the SMTP envelope and
DATA, the journal marks around the final dot (``started``, ``ending``,
``delivered``, back to ``seen`` when the delivery surely did not happen, ``dropped``),
the DELE, and the skips with their reasons.  It also holds the fault hook and cuts
a DATA under way when the account's lease is lost.

Per delivered message, two journal commits and as few round trips as the servers
allow: the next message's ``started`` is committed together with this one's
``delivered`` (and undone if that message is then not delivered); MAIL FROM and the
RCPT TOs go in one write to an SMTP server that offers PIPELINING; a DELE's answer is
not awaited before the next RETR from a POP3 server that offers PIPELINING.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailgw.poller import message as msg
from mailgw.poller.leases import LeaseLost, PollLease
from mailgw.poller.polltypes import Fault, PollReport, PollSettings, SkippedMessage, _Remote, _StopPoll
from mailgw.poller.pop3 import Pop3Session
from mailgw.poller.smtp import SmtpClient, SmtpError, open_smtp
from mailgw.poller.transfer import MessageTransfer, _Watchdog
from mailgw.state import AccountRecord, IStateStore, JournalEntry, JournalState
from mailgw.wire import pop3 as pop3_wire
from mailgw.wire import smtp as smtp_wire


async def mail_and_rcpt(
    smtp: SmtpClient, mail: str, recipients: list[str]
) -> tuple[smtp_wire.Reply, list[smtp_wire.Reply]]:
    """MAIL FROM, then the RCPT TOs: the reply to MAIL and, when it was accepted,
    the RCPT replies.  To a server that offers PIPELINING all in one write (RFC
    2920; the RCPT replies after a refused MAIL are read and dropped: the server
    refused them too), else one command at a time."""
    rcpts = [("RCPT", f"TO:<{recipient}>") for recipient in recipients]
    if "PIPELINING" not in smtp.extensions:
        reply = await smtp.command("MAIL", mail)
        if not reply.positive:
            return reply, []
        return reply, [await smtp.command(verb, argument) for verb, argument in rcpts]
    try:
        replies = await defer.gatherResults(smtp.pipeline([("MAIL", mail), *rcpts]), consumeErrors=True)
    except defer.FirstError as e:
        error = e.subFailure.value  # the connection broke: one SmtpError for all
        assert isinstance(error, SmtpError)
        raise error from None
    if not replies[0].positive:
        return replies[0], []
    return replies[0], replies[1:]


class _MessageDelivery:
    """The per-message steps of a poll, mixed into L{mailgw.poller.poll.Poll}, which
    sets the attributes declared here."""

    log: Logger
    account: AccountRecord
    state: IStateStore
    reactor: Any
    clock: IReactorTime
    settings: PollSettings
    rule: msg.RecipientRule
    report: PollReport
    _fault: Fault | None
    _session: Pop3Session | None
    _smtp: SmtpClient | None
    _smtp_clients: list[SmtpClient]
    _deletes: int
    #: the answers to DELEs not awaited yet (see L{_dele})
    _dele_answers: list[defer.Deferred[None]]
    #: whether the POP3 server offers PIPELINING
    _pipelining: bool
    #: the message after the one being handled, and its journal entry
    _upcoming: tuple[_Remote, JournalEntry | None] | None
    #: the UIDL marked "started" ahead, with the previous message's "delivered"
    _prestarted: str | None
    _stopping: Callable[[], bool]
    _delivered_ids: dict[str, str]
    #: the SMTP client while a DATA is under way before its final dot
    _relay: SmtpClient | None
    _lease: PollLease | None

    # -- the lease and the fault hook ----------------------------------------------------------

    def _lease_lost(self, reason: LeaseLost) -> None:
        # Another gateway may poll the account from now on: a DATA not yet ended is
        # cut, so that the SMTP server voids it (the journal goes back to "seen").
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.abort("the account's lease was lost")

    def _fault_at(self, point: str) -> None:
        if self._fault is not None:
            self._fault(point)

    # -- one message --------------------------------------------------------------------------

    def _should_delete(self, entry: JournalEntry | None) -> bool:
        account = self.account
        if not account.leave_on_server:
            return True
        if account.leave_days <= 0:
            return False
        first_seen = entry.first_seen if entry is not None else self.clock.seconds()
        return self.clock.seconds() - first_seen >= account.leave_days * 86400

    async def _message(self, remote: _Remote, entry: JournalEntry | None) -> None:
        state = entry.state if entry is not None else JournalState.SEEN
        if state in (JournalState.DELIVERED, JournalState.DROPPED):
            if self._should_delete(entry):
                await self._dele(remote)
            elif state is JournalState.DELIVERED:
                self.report.kept += 1
            return
        if state is JournalState.ENDING:
            self.report.possible_duplicates.append(remote.uidl)
            self.log.warn(
                "Account {account}: message {uidl} was interrupted between the end of its SMTP DATA and the "
                "journal commit; delivering it again: possible duplicate if the SMTP server had accepted it",
                account=self.account.id,
                uidl=remote.uidl,
                kind="possible_duplicate",
            )
        elif state is JournalState.STARTED:
            self.log.info(
                "Account {account}: message {uidl} was interrupted before the end of its SMTP DATA (which "
                "the server never got): delivering it again, no duplicate possible",
                account=self.account.id,
                uidl=remote.uidl,
                kind="interrupted_delivery",
            )
        await self._transfer(remote, entry)
        if self._prestarted == remote.uidl:
            # marked "started" with the previous delivery's commit, and not delivered
            await self._unstart()

    async def _unstart(self) -> None:
        """Back to "seen" for the message marked "started" ahead (see
        L{_upcoming_start}), when its delivery did not begin."""
        uidl, self._prestarted = self._prestarted, None
        if uidl is not None:
            await self.state.journal_mark(self.account.id, uidl, JournalState.SEEN, self.clock.seconds())

    def _upcoming_start(self) -> str | None:
        """The UIDL of the next message, to mark "started" in the same commit as this
        one's "delivered" (one commit fewer per message), when it is to be delivered:
        new or only seen, and the poll going on."""
        upcoming = self._upcoming
        if upcoming is None or (self._lease is not None and self._lease.lost is not None) or self._stopping():
            return None
        remote, entry = upcoming
        if entry is not None and entry.state is not JournalState.SEEN:
            return None
        return remote.uidl

    def _skip(self, uidl: str | None, number: int | None, kind: str, reason: str) -> None:
        self.report.skipped.append(SkippedMessage(uidl, number, kind, reason))
        self.log.warn(
            "Account {account}: message {uidl} skipped: {reason}",
            account=self.account.id,
            uidl=uidl if uidl is not None else f"#{number}" if number is not None else "?",
            kind=kind,
            reason=reason,
        )

    async def _transfer(self, remote: _Remote, entry: JournalEntry | None) -> None:
        session = self._session
        assert session is not None
        account = self.account
        transfer = MessageTransfer(session.gate)
        status = await session.retr(remote.number, transfer)
        if not status.ok:
            self._skip(remote.uidl, remote.number, "retr_refused", f"RETR refused: {status.text[:200]}")
            return
        self.report.fetched += 1
        self._fault_at("after_retr")
        outcome = await transfer.decided
        if isinstance(outcome, msg.MalformedMessage):
            await self._finish(transfer)
            self._skip(remote.uidl, remote.number, outcome.kind, outcome.reason)
            return
        if isinstance(outcome, Exception):
            raise outcome
        headers = outcome
        message_id = msg.message_id(headers)
        if msg.has_loop_trace(headers, self.settings.node_name, account.id):
            await self._drop(
                remote,
                entry,
                transfer,
                message_id,
                "loop",
                "mail loop: the message already carries this gateway's trace for this account",
            )
            return
        earlier = self._delivered_ids.get(message_id) if message_id else None
        if earlier is not None and earlier != remote.uidl:
            await self._drop(
                remote,
                entry,
                transfer,
                message_id,
                "duplicate",
                f"duplicate: Message-ID already delivered (UIDL {earlier})",
            )
            return
        recipients, source = msg.find_recipients(headers, self.rule)
        if len(recipients) > msg.MAX_RECIPIENTS:
            transfer.discard()
            await self._finish(transfer)
            self._skip(
                remote.uidl,
                remote.number,
                "too_many_recipients",
                f"{len(recipients)} recipients in {source}: more than {msg.MAX_RECIPIENTS}",
            )
            return
        postmaster = f"postmaster@{account.domain}"
        if not recipients and account.no_recipient_action == "delete":
            await self._drop(
                remote, entry, transfer, message_id, "no_recipient", f"no recipient at {account.domain} in the headers"
            )
            return
        await self._deliver(remote, entry, transfer, headers, message_id, recipients or [postmaster], source)

    async def _deliver(
        self,
        remote: _Remote,
        entry: JournalEntry | None,
        transfer: MessageTransfer,
        headers: msg.HeaderBlock,
        message_id: str | None,
        recipients: list[str],
        source: str | None,
    ) -> None:
        account = self.account
        postmaster = f"postmaster@{account.domain}"
        try:
            smtp = await self._smtp_client()
        except SmtpError as e:
            transfer.discard()
            await self._finish(transfer)
            self._skip(remote.uidl, remote.number, "temporary", f"SMTP server unavailable: {e}")
            raise _StopPoll(f"SMTP server unavailable: {e}") from None
        trace = msg.trace_header(self.settings.node_name, account.id, account.host, self.clock.seconds())
        try:
            accepted, failure = await self._envelope(smtp, headers, recipients, remote, len(trace))
            if failure is None and self._lease is not None and self._lease.lost is not None:
                failure = ("lease_lost", str(self._lease.lost))
            if not accepted and failure is None:
                # Nobody valid: [6] step 4.
                if account.no_recipient_action == "postmaster" and postmaster not in recipients:
                    reply = await smtp.command("RCPT", f"TO:<{postmaster}>")
                    if reply.positive:
                        accepted = [postmaster]
                    else:
                        failure = (
                            "temporary" if reply.transient else "rejected",
                            f"{postmaster} refused: {reply.code} {reply.text[:200]}",
                        )
                elif account.no_recipient_action == "delete":
                    await self._rset(smtp)
                    await self._drop(
                        remote,
                        entry,
                        transfer,
                        message_id,
                        "no_recipient",
                        f"no valid recipient: the SMTP server refused {', '.join(recipients)}",
                    )
                    return
                else:
                    failure = ("rejected", f"postmaster@{account.domain} refused")
            if failure is not None:
                await self._rset(smtp)
                transfer.discard()
                await self._finish(transfer)
                self._skip(remote.uidl, remote.number, *failure)
                return
            if self._prestarted == remote.uidl:
                self._prestarted = None  # marked with the previous message's "delivered"
            else:
                await self.state.journal_mark(
                    account.id, remote.uidl, JournalState.STARTED, self.clock.seconds(), message_id
                )
            reply = await smtp.command("DATA")
            if reply.code != 354:
                await self._abandon(remote, message_id)
                await self._rset(smtp)
                transfer.discard()
                await self._finish(transfer)
                kind = "temporary" if reply.transient else "rejected"
                self._skip(remote.uidl, remote.number, kind, f"DATA refused: {reply.code} {reply.text[:200]}")
                return
            transfer.start_relay(smtp, trace)
            self._relay = smtp
            if self._lease is not None and self._lease.lost is not None:
                self._lease_lost(self._lease.lost)
            self._fault_at("during_data")
            watchdog = self._watch(transfer, smtp)
            try:
                problem = await transfer.finished
            finally:
                watchdog.stop()
            if isinstance(problem, Exception):
                # The POP3 connection broke: no final dot, so nothing was delivered.
                smtp.abort("the POP3 side broke during DATA")
                self._smtp = None
                await self._abandon(remote, message_id)
                raise problem
            if transfer.smtp_error is not None or not smtp.usable:
                self._smtp = None
                await self._abandon(remote, message_id)
                broke = str(transfer.smtp_error or "the SMTP connection broke during DATA")
                self._skip(remote.uidl, remote.number, *self._cut("temporary", broke))
                return
            # From the end of DATA until the "delivered" commit is the one window in
            # which a crash can duplicate the message: note it durably first, so
            # that a redelivery is reported as a possible duplicate, and only then.
            await self.state.journal_mark(
                account.id, remote.uidl, JournalState.ENDING, self.clock.seconds(), message_id
            )
            if not smtp.usable:
                self._smtp = None
                await self._abandon(remote, message_id)
                self._skip(remote.uidl, remote.number, *self._cut("temporary", "the SMTP connection broke during DATA"))
                return
            # The lease still held (else the relay was cut): the final dot goes out.
            self._relay = None
            try:
                final = await smtp.end_data()
            except SmtpError as e:
                # The server may have accepted the message: the journal keeps
                # "ending", and the next poll delivers it again as a possible
                # duplicate.
                self._smtp = None
                self._skip(remote.uidl, remote.number, "temporary", f"no answer to the end of DATA: {e}")
                return
        except SmtpError as e:
            self._smtp = None
            if not transfer.finished.called:
                transfer.discard()
                await self._finish(transfer)
            self._skip(remote.uidl, remote.number, *self._cut("temporary", f"SMTP connection failed: {e}"))
            return
        finally:
            self._relay = None
        if not final.positive:
            await self._abandon(remote, message_id)
            kind = "temporary" if final.transient else "rejected"
            reason = f"SMTP server refused the message: {final.code} {final.text[:200]}"
            self._skip(remote.uidl, remote.number, kind, reason)
            return
        self._fault_at("after_250_before_commit")
        marks = [(remote.uidl, JournalState.DELIVERED, message_id)]
        upcoming = self._upcoming_start()
        if upcoming is not None:
            marks.append((upcoming, JournalState.STARTED, None))
        await self.state.journal_marks(account.id, marks, self.clock.seconds())
        self._prestarted = upcoming
        self._fault_at("after_commit")
        if message_id:
            self._delivered_ids[message_id] = remote.uidl
        self.report.delivered += 1
        self.log.info(
            "Account {account}: message {uidl} delivered to {recipients} (from {source})",
            account=account.id,
            uidl=remote.uidl,
            recipients=", ".join(accepted),
            source=source or "no recipient: postmaster",
        )
        if self._should_delete(entry):
            await self._dele(remote)
        else:
            self.report.kept += 1

    def _cut(self, kind: str, reason: str) -> tuple[str, str]:
        """The kind and reason of a skip: C{lease_lost} when the lease was lost (which
        is what cut the SMTP connection), else as given."""
        if self._lease is not None and self._lease.lost is not None:
            return "lease_lost", str(self._lease.lost)
        return kind, reason

    def _watch(self, transfer: MessageTransfer, smtp: SmtpClient) -> _Watchdog:
        return _Watchdog(self.clock, self.settings.smtp_timeout, transfer, smtp)

    async def _envelope(
        self, smtp: SmtpClient, headers: msg.HeaderBlock, recipients: list[str], remote: _Remote, extra: int
    ) -> tuple[list[str], tuple[str, str] | None]:
        """MAIL FROM and one RCPT TO per recipient: the accepted recipients, and the
        failure (kind, reason) that leaves the message for later or skips it."""
        parameters = []
        if "8BITMIME" in smtp.extensions:
            parameters.append("BODY=8BITMIME")
        if "SIZE" in smtp.extensions and remote.size is not None:
            parameters.append(f"SIZE={remote.size + extra}")
        suffix = "".join(" " + p for p in parameters)
        sender = msg.envelope_sender(headers)
        reply, replies = await mail_and_rcpt(smtp, f"FROM:<{sender}>{suffix}", recipients)
        if reply.permanent and sender:
            # The local server may refuse the original bounce address; the null
            # sender still delivers.
            reply, replies = await mail_and_rcpt(smtp, f"FROM:<>{suffix}", recipients)
        if not reply.positive:
            kind = "temporary" if reply.transient else "rejected"
            return [], (kind, f"MAIL FROM refused: {reply.code} {reply.text[:200]}")
        accepted: list[str] = []
        temporary: list[str] = []
        for recipient, reply in zip(recipients, replies, strict=True):
            if reply.positive:
                accepted.append(recipient)
            elif reply.transient:
                temporary.append(recipient)
            else:
                self.log.info(
                    "Account {account}: message {uidl}: the SMTP server refused recipient {recipient}: {code}",
                    account=self.account.id,
                    uidl=remote.uidl,
                    recipient=recipient,
                    code=reply.code,
                )
        if temporary:
            # All or nothing: delivering to some now and to the others later would
            # need per-recipient state; the whole message waits for the next poll.
            return [], ("temporary", f"temporary failure for {', '.join(temporary)}")
        return accepted, None

    async def _smtp_client(self) -> SmtpClient:
        if self._smtp is not None and self._smtp.usable:
            return self._smtp
        settings = self.settings
        client = await open_smtp(
            self.reactor,
            settings.smtp_host,
            settings.smtp_port,
            msg.safe_node_name(settings.node_name),
            connect_timeout=settings.smtp_connect_timeout,
            timeout=settings.smtp_timeout,
            data_timeout=settings.smtp_data_timeout,
        )
        self._smtp_clients.append(client)
        self._smtp = client
        return client

    async def _rset(self, smtp: SmtpClient) -> None:
        reply: smtp_wire.Reply | None
        try:
            reply = await smtp.command("RSET")
        except SmtpError:
            reply = None
        if reply is None or not reply.positive:
            smtp.abort()
            self._smtp = None

    async def _abandon(self, remote: _Remote, message_id: str | None) -> None:
        """The delivery surely did not happen (no final dot, or a refusal): back to
        "seen", so that the next attempt is not reported as a possible duplicate."""
        await self._mark(remote, JournalState.SEEN, message_id)

    async def _mark(self, remote: _Remote, state: JournalState, message_id: str | None) -> None:
        """Journal C{state} for C{remote}, which replaces a "started" marked ahead."""
        if self._prestarted == remote.uidl:
            self._prestarted = None
        await self.state.journal_mark(self.account.id, remote.uidl, state, self.clock.seconds(), message_id)

    async def _drop(
        self,
        remote: _Remote,
        entry: JournalEntry | None,
        transfer: MessageTransfer,
        message_id: str | None,
        kind: str,
        reason: str,
    ) -> None:
        transfer.discard()
        await self._finish(transfer)
        self._skip(remote.uidl, remote.number, kind, reason)
        await self._mark(remote, JournalState.DROPPED, message_id)
        if self._should_delete(entry):
            await self._dele(remote)

    async def _finish(self, transfer: MessageTransfer) -> None:
        problem = await transfer.finished
        if isinstance(problem, Exception):
            raise problem

    async def _dele(self, remote: _Remote) -> None:
        """DELE.  To a server that offers PIPELINING (RFC 2449) without waiting for
        the answer: the next command (the next RETR, or QUIT after L{_deleted_all})
        goes out behind it, and the answers come in order."""
        session = self._session
        assert session is not None
        self._fault_at("before_dele")
        answer = session.command("DELE", str(remote.number)).addCallback(self._dele_answered, remote)
        if not self._pipelining:
            await answer
            return
        answer.addErrback(lambda _: None)  # a broken connection fails the next command too
        self._dele_answers.append(answer)

    def _dele_answered(self, status: pop3_wire.Status, remote: _Remote) -> None:
        if not status.ok:
            self.log.warn(
                "Account {account}: DELE of message {uidl} refused: {reason}",
                account=self.account.id,
                uidl=remote.uidl,
                reason=status.text[:200],
            )
            return
        self._deletes += 1
        self._fault_at("after_dele")

    async def _deleted_all(self) -> None:
        """Wait for the answers to the DELEs sent so far."""
        answers, self._dele_answers = self._dele_answers, []
        for answer in answers:
            await answer
