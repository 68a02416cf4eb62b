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
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailgw.poller import message as msg
from mailgw.poller.leases import LeaseLost, PollLease
from mailgw.poller.pop3 import Listing, Pop3Error, Pop3Session, ReadGate
from mailgw.poller.smtp import SmtpClient, SmtpError, open_smtp
from mailgw.state import AccountRecord, IStateStore, JournalEntry, JournalState, StateError
from mailgw.upstream import Connector, UpstreamError, UpstreamTarget
from mailgw.upstream.pop3 import POP3UpstreamLogin
from mailgw.wire import smtp as smtp_wire
from mailgw.wire.errors import ProtocolError
from mailgw.wire.lines import LineBuffer, TooLong

__all__ = [
    "FAULT_POINTS",
    "Fault",
    "MessageTransfer",
    "Poll",
    "PollReport",
    "PollSettings",
    "SkippedMessage",
]

#: the named points at which the fault hook is called, in the order of a delivery
FAULT_POINTS = (
    "after_retr",  # RETR answered +OK, nothing sent to SMTP yet
    "during_data",  # DATA accepted (354), part of the message written
    "after_250_before_commit",  # the SMTP server accepted the message; journal not yet updated
    "after_commit",  # journal says delivered; DELE not sent
    "before_dele",  # about to send DELE
    "after_dele",  # DELE answered +OK; QUIT (which applies it) not sent
)

Fault = Callable[[str], None]

#: how long the journal remembers delivered messages gone from the server (their
#: Message-IDs keep suppressing duplicates meanwhile)
JOURNAL_RETENTION = 90 * 86400


@dataclass(frozen=True, slots=True)
class PollSettings:
    """What a poll needs besides the account (from ``[poller]`` and ``[gateway]``)."""

    smtp_host: str
    smtp_port: int
    node_name: str
    pop3_timeout: float = 120.0
    smtp_connect_timeout: float = 30.0
    smtp_timeout: float = 300.0
    smtp_data_timeout: float = 600.0


@dataclass
class SkippedMessage:
    """A message not delivered by this poll: C{kind} is a stable short name, C{reason}
    the explanation logged."""

    uidl: str | None
    number: int | None
    kind: str
    reason: str


@dataclass
class PollReport:
    """What one poll did.

    C{fetched}: messages retrieved (RETR); C{delivered}: accepted by the SMTP server;
    C{deleted}: removed from the remote mailbox (confirmed by QUIT); C{kept}: delivered
    earlier and left on the server; C{skipped}: not delivered, with reasons (dropped
    loops and duplicates, messages without recipient, malformed ones, temporary
    failures); C{possible_duplicates}: UIDLs delivered again after an interrupted
    delivery; C{error}: why the poll stopped early, if it did.
    """

    account_id: int
    started: float
    finished: float | None = None
    messages: int = 0
    fetched: int = 0
    delivered: int = 0
    deleted: int = 0
    kept: int = 0
    skipped: list[SkippedMessage] = field(default_factory=list)
    possible_duplicates: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the admin channel)."""
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def summary(self) -> str:
        text = (
            f"account {self.account_id}: {self.messages} on server, {self.fetched} fetched, "
            f"{self.delivered} delivered, {self.deleted} deleted, {len(self.skipped)} skipped"
        )
        if self.possible_duplicates:
            text += f", {len(self.possible_duplicates)} possible duplicate(s)"
        if self.error:
            text += f"; stopped: {self.error}"
        return text


@dataclass(frozen=True, slots=True)
class _Remote:
    number: int
    uidl: str
    size: int | None


class _Phase(enum.Enum):
    HEADERS = 1
    PREAMBLE = 2
    WAIT = 3
    RELAY = 4
    DISCARD = 5
    DONE = 6


class MessageTransfer:
    """Carries one message from a RETR answer to an SMTP DATA (a
    L{mailgw.poller.pop3.RetrConsumer}).

    L{decided} fires once the header block (and a multipart preamble) is read: with
    the L{msg.HeaderBlock}, with a L{msg.MalformedMessage} (the rest is then read and
    thrown away), or with the exception that broke the POP3 connection.  Reading is
    paused at that point; the caller either L{discard}s the message or calls
    L{start_relay}.  L{finished} fires when the RETR answer ended (and everything was
    written), with C{None} or the exception that broke a connection.
    """

    def __init__(self, gate: ReadGate) -> None:
        self._gate = gate
        self._phase = _Phase.HEADERS
        self._lines = LineBuffer(msg.MAX_HEADER_LINE)
        self._header_lines: list[bytes] = []
        self._header_size = 0
        self._headers: msg.HeaderBlock | None = None
        self._boundary = b""
        self._preamble: list[bytes] = []
        self._preamble_size = 0
        self._pending: list[bytes] = []
        self._ended = False
        self._smtp: SmtpClient | None = None
        #: set when the SMTP connection broke during the relay
        self.smtp_error: SmtpError | None = None
        #: bytes written to SMTP (for tests and logs)
        self.relayed = 0
        self.decided: defer.Deferred[msg.HeaderBlock | msg.MalformedMessage | Exception] = defer.Deferred()
        self.finished: defer.Deferred[Exception | None] = defer.Deferred()

    # -- RetrConsumer ------------------------------------------------------------------------

    def payload(self, data: bytes) -> None:
        phase = self._phase
        if phase is _Phase.RELAY:
            assert self._smtp is not None
            self._smtp.write(data)
            self.relayed += len(data)
        elif phase is _Phase.WAIT:
            self._pending.append(data)
        elif phase in (_Phase.HEADERS, _Phase.PREAMBLE):
            self._lines.append(data)
            self._read_lines()

    def end(self) -> None:
        self._ended = True
        phase = self._phase
        if phase is _Phase.HEADERS:
            rest = self._lines.pending()
            if rest:  # cannot happen on the wire: the terminator starts a line
                self._header_lines.append(rest)
            if not self._header_lines:
                self._malformed(msg.MalformedMessage("no_headers", "empty message"))
            else:
                self._end_of_headers(complete=True)
        elif phase is _Phase.PREAMBLE:
            self._malformed(
                msg.MalformedMessage("broken_mime", "broken MIME structure: the multipart boundary never appears")
            )
        elif phase in (_Phase.RELAY, _Phase.DISCARD):
            self._finish(None)

    def failed(self, reason: Exception) -> None:
        self._phase = _Phase.DONE
        self._stop_relay()
        if not self.decided.called:
            self.decided.callback(reason)
        if not self.finished.called:
            self.finished.callback(reason)

    # -- the caller's decisions ----------------------------------------------------------------

    def discard(self) -> None:
        """Do not deliver: read the rest of the message and throw it away."""
        if self._phase is _Phase.DONE:
            return
        self._pending = []
        self._stop_relay()
        self._phase = _Phase.DISCARD
        self._gate.resume("decide")
        if self._ended:
            self._finish(None)

    def start_relay(self, smtp: SmtpClient, prefix: bytes) -> None:
        """DATA was accepted: write C{prefix} (the trace header), the header block, the
        preamble read so far, and from now on the message as it arrives."""
        if self._phase is _Phase.DONE:
            return
        self._smtp = smtp
        self._phase = _Phase.RELAY
        head = prefix + msg.join_lines(self._header_lines) + msg.join_lines(self._preamble)
        head += b"".join(self._pending)
        self._pending = []
        self._header_lines = []
        self._preamble = []
        smtp.write(head)
        self.relayed += len(head)
        smtp.closed.addCallback(self._smtp_closed, smtp)
        if self._ended:
            self._finish(None)
            return
        smtp.register_producer(self._gate)
        self._gate.resume("decide")

    # -- internals ---------------------------------------------------------------------------

    def _read_lines(self) -> None:
        while self._phase in (_Phase.HEADERS, _Phase.PREAMBLE):
            line = self._lines.next_line()
            if line is None:
                return
            if self._phase is _Phase.HEADERS:
                self._header_line(line)
            else:
                self._preamble_line(line)

    def _header_line(self, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            self._malformed(msg.MalformedMessage("header_too_long", "header line longer than 64 KiB"))
            return
        self._header_size += len(line) + 2
        if self._header_size > msg.MAX_HEADER_BLOCK:
            self._malformed(msg.MalformedMessage("header_too_large", "header block larger than 256 KiB"))
            return
        self._header_lines.append(line)
        if line == b"":
            self._end_of_headers(complete=False)
            return
        try:
            msg.check_header_line(msg.unstuff(line), first=len(self._header_lines) == 1)
        except msg.MalformedMessage as e:
            self._malformed(e)

    def _end_of_headers(self, *, complete: bool) -> None:
        lines = self._header_lines[:-1] if self._header_lines[-1:] == [b""] else self._header_lines
        try:
            headers = msg.parse_header_block([msg.unstuff(line) for line in lines])
            boundary = msg.multipart_boundary(headers)
        except msg.MalformedMessage as e:
            self._malformed(e)
            return
        self._headers = headers
        if boundary is not None:
            if complete:
                self._malformed(
                    msg.MalformedMessage("broken_mime", "broken MIME structure: multipart message without a body")
                )
                return
            self._boundary = boundary
            self._phase = _Phase.PREAMBLE
            return
        self._decide(headers)

    def _preamble_line(self, line: bytes | TooLong) -> None:
        if isinstance(line, TooLong):
            self._malformed(
                msg.MalformedMessage("broken_mime", "broken MIME structure: no multipart boundary in the first 64 KiB")
            )
            return
        self._preamble.append(line)
        self._preamble_size += len(line) + 2
        if msg.is_boundary_line(msg.unstuff(line), self._boundary):
            assert self._headers is not None
            self._decide(self._headers)
        elif self._preamble_size > msg.MAX_PREAMBLE:
            self._malformed(
                msg.MalformedMessage("broken_mime", "broken MIME structure: no multipart boundary in the first 64 KiB")
            )

    def _decide(self, headers: msg.HeaderBlock) -> None:
        self._phase = _Phase.WAIT
        rest = self._lines.take_rest()
        if rest:
            self._pending.append(rest)
        if not self._ended:
            self._gate.pause("decide")
        self.decided.callback(headers)

    def _malformed(self, error: msg.MalformedMessage) -> None:
        self._phase = _Phase.DISCARD
        self._lines.clear()
        self._header_lines = []
        self._preamble = []
        if not self.decided.called:
            self.decided.callback(error)
        if self._ended:
            self._finish(None)

    def _smtp_closed(self, _: object, smtp: SmtpClient) -> None:
        if self._smtp is smtp and self._phase is _Phase.RELAY:
            self.smtp_error = SmtpError("the SMTP connection broke during DATA")
            self._stop_relay()
            self._phase = _Phase.DISCARD
            if self._ended:
                self._finish(None)

    def _stop_relay(self) -> None:
        if self._smtp is not None:
            self._smtp.unregister_producer()
        self._gate.resume("smtp")

    def _finish(self, result: Exception | None) -> None:
        self._stop_relay()
        self._gate.resume("decide")
        self._phase = _Phase.DONE
        if not self.finished.called:
            self.finished.callback(result)


class _Watchdog:
    """Drops the SMTP connection when the relay of a message makes no progress for
    C{timeout} seconds (an SMTP server that stops reading during DATA; a silent POP3
    server is caught earlier by the POP3 session's own time limit)."""

    def __init__(self, clock: IReactorTime, timeout: float, transfer: MessageTransfer, smtp: SmtpClient) -> None:
        self._clock = clock
        self._timeout = timeout
        self._transfer = transfer
        self._smtp = smtp
        self._last = transfer.relayed
        self._call: IDelayedCall | None = clock.callLater(timeout, self._check)

    def _check(self) -> None:
        self._call = None
        if self._transfer.relayed == self._last:
            self._smtp.abort(f"no progress during DATA for {self._timeout:g} s")
            return
        self._last = self._transfer.relayed
        self._call = self._clock.callLater(self._timeout, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _StopPoll(Exception):
    """Ends the poll early (the reason goes into the report)."""


class Poll:
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

    def _lease_lost(self, reason: LeaseLost) -> None:
        # Another gateway may poll the account from now on: a DATA not yet ended is
        # cut, so that the SMTP server voids it (the journal goes back to "seen").
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.abort("the account's lease was lost")

    def _fault_at(self, point: str) -> None:
        if self._fault is not None:
            self._fault(point)

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
        if "PIPELINING" in capabilities:
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
            for remote in messages:
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
        # Apply the deletions done so far (QUIT), even when a message ended the poll
        # early; not after a broken connection, which the server rolls back.
        if not session.broken:
            try:
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
                "Account {account}: message {uidl} was interrupted during its SMTP DATA (before the end, which "
                "the server never got): delivering it again, no duplicate possible",
                account=self.account.id,
                uidl=remote.uidl,
                kind="interrupted_delivery",
            )
        await self._transfer(remote, entry)

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
        await self.state.journal_mark(account.id, remote.uidl, JournalState.DELIVERED, self.clock.seconds(), message_id)
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
        reply = await smtp.command("MAIL", f"FROM:<{sender}>{suffix}")
        if reply.permanent and sender:
            # The local server may refuse the original bounce address; the null
            # sender still delivers.
            reply = await smtp.command("MAIL", f"FROM:<>{suffix}")
        if not reply.positive:
            kind = "temporary" if reply.transient else "rejected"
            return [], (kind, f"MAIL FROM refused: {reply.code} {reply.text[:200]}")
        accepted: list[str] = []
        temporary: list[str] = []
        for recipient in recipients:
            reply = await smtp.command("RCPT", f"TO:<{recipient}>")
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
        await self.state.journal_mark(self.account.id, remote.uidl, JournalState.SEEN, self.clock.seconds(), message_id)

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
        await self.state.journal_mark(
            self.account.id, remote.uidl, JournalState.DROPPED, self.clock.seconds(), message_id
        )
        if self._should_delete(entry):
            await self._dele(remote)

    async def _finish(self, transfer: MessageTransfer) -> None:
        problem = await transfer.finished
        if isinstance(problem, Exception):
            raise problem

    async def _dele(self, remote: _Remote) -> None:
        session = self._session
        assert session is not None
        self._fault_at("before_dele")
        status = await session.command("DELE", str(remote.number))
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
