"""The data of a poll (L{mailgw.poller.poll}): what it takes (L{PollSettings}, the
fault hook and its L{FAULT_POINTS}) and what it gives (L{PollReport} and its
L{SkippedMessage}s), plus the small internal records shared by the poll's modules
(L{_Remote}, one message of a listing, and L{_StopPoll}, which ends a poll early).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "FAULT_POINTS",
    "Fault",
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


class _StopPoll(Exception):
    """Ends the poll early (the reason goes into the report)."""
