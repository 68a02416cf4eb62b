"""The inspection of one message while it arrives, and its verdict [4.9].

A L{MessageCheck} takes a message's octets (dot-stuffing undone) as they arrive and,
at its end, gives a L{Verdict}:

  - the size limit: beyond C{max_message_size} nothing more is kept or scanned, and
    the verdict is L{Withheld} (C{size});
  - the MIME rules (L{mailgw.inspect.mime.MimeInspector}): a part stripped changes the
    message that passes; a rule whose action is C{reject} withholds it;
  - antivirus: the octets go to clamd (C{zINSTREAM}) as they arrive, unless the
    message is beyond C{scan_limit} (then C{scan_limit_action}); an infected message is
    withheld; clamd failing or slow gives L{TempFailed} or, with C{on_scanner_failure =
    "pass"}, a pass.

What passes is in a L{Spool} (memory, then a private file), which the caller replays
and closes.  The check holds no more than the spool's memory limit, the first header
block (for the notice) and what the MIME inspector holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime

from mailgw.config import InspectionProfile
from mailgw.inspect.clamd import ClamdClient, Clean, Failed, Infected, Scan, ScanResult
from mailgw.inspect.mime import Finding, MimeInspector
from mailgw.inspect.spool import Spool

__all__ = ["MAX_HEADER_CAPTURE", "MessageCheck", "Passed", "TempFailed", "Verdict", "Withheld"]

#: octets of the message's start kept for the notice (its header block, usually)
MAX_HEADER_CAPTURE = 16 * 1024


@dataclass(frozen=True, slots=True)
class Passed:
    """The message passes: C{spool} holds it (stripped or tagged when C{changed})."""

    spool: Spool
    changed: bool
    findings: tuple[Finding, ...]
    #: clamd scanned it (not skipped: no clamd, beyond scan_limit, scanner failure passed)
    scanned: bool
    #: why it passes unscanned, if it does ("" when scanned or there is no clamd)
    unscanned: str = ""

    @property
    def label(self) -> str:
        """C{clean}, C{stripped} or C{tagged}: for logs and metrics."""
        if any(f.action == "strip" for f in self.findings):
            return "stripped"
        return "tagged" if self.changed else "clean"


@dataclass(frozen=True, slots=True)
class Withheld:
    """
    The message does not pass.

    @ivar reason: C{virus}, C{attachment}, C{content-type}, C{header}, C{malformed},
        C{size} or C{scan_limit} (a label value).
    @ivar rule: the signature, glob, type, header rule or limit (for logs).
    @ivar text: one sentence for the user, naming it.
    """

    reason: str
    rule: str
    text: str


@dataclass(frozen=True, slots=True)
class TempFailed:
    """The message could not be checked now (clamd failed or was slow)."""

    text: str


Verdict: TypeAlias = Passed | Withheld | TempFailed


def _withheld(finding: Finding) -> Withheld:
    if finding.kind == "header":
        return Withheld("header", finding.rule, f"it matches the header rule {finding.rule}")
    if finding.kind == "malformed":
        return Withheld("malformed", finding.rule, f"its structure cannot be inspected ({finding.rule})")
    what = f'the attachment "{finding.filename}"' if finding.filename else f"a part of type {finding.content_type}"
    return Withheld(finding.kind, finding.rule, f"{what} is not allowed (rule: {finding.rule})")


class MessageCheck:
    """
    One message's inspection (see the module docstring).

    @param scanner: the profile's clamd, or C{None} (no antivirus).
    @param mime: whether to apply the MIME rules (C{False} for an IMAP literal that is
        a part, not a message).
    """

    def __init__(
        self,
        profile: InspectionProfile,
        scanner: ClamdClient | None,
        folder: Path,
        clock: IReactorTime,
        *,
        mime: bool = True,
    ) -> None:
        self.profile = profile
        self._clock = clock
        self.size = 0
        self.spool: Spool | None = Spool(folder)
        self._mime = MimeInspector(profile) if mime else None
        self._scan: Scan | None = scanner.scan() if scanner is not None else None
        self._unscanned = ""
        self._head = bytearray()
        self._head_done = False
        self._over = False
        self._finished = False
        #: seconds clamd took after the end of the message (None: not scanned)
        self.scan_latency: float | None = None

    @property
    def head(self) -> bytes:
        """The start of the message (its header block, at most L{MAX_HEADER_CAPTURE})."""
        return bytes(self._head)

    @property
    def held(self) -> int:
        """Octets this check holds in memory (spool memory and captured header)."""
        return (self.spool.in_memory if self.spool is not None else 0) + len(self._head)

    def registerProducer(self, producer: IPushProducer) -> None:
        """Pause C{producer} (the side the message comes from) while clamd cannot keep up."""
        if self._scan is not None and not self._scan.done:
            self._scan.registerProducer(producer, True)

    def feed(self, data: bytes) -> None:
        """The next octets of the message."""
        if self._finished:
            raise RuntimeError("feed after finish")
        if not data:
            return
        self.size += len(data)
        if not self._head_done:
            self._capture(data)
        if self._over:
            return
        profile = self.profile
        if self.size > profile.max_message_size:
            self._over = True
            self._drop_scan()
            self._drop_spool()
            return
        if self._scan is not None:
            if self.size > profile.scan_limit:
                self._unscanned = f"beyond the scan limit of {profile.scan_limit} octets"
                self._drop_scan()
            else:
                self._scan.write(data)
        if self._mime is not None:
            out = self._mime.feed(data)
            if self._mime.rejected is not None:
                self._drop_spool()
                self._drop_scan()
                return
        else:
            out = data
        if self.spool is not None:
            self.spool.write(out)

    def finish(self) -> Deferred[Verdict]:
        """The message has ended: its verdict (never a failure)."""
        self._finished = True
        profile = self.profile
        if self._over:
            return succeed(
                Withheld(
                    "size",
                    str(profile.max_message_size),
                    f"it is larger than the limit of {profile.max_message_size} octets",
                )
            )
        mime = self._mime
        if mime is not None:
            rest = mime.finish()
            if mime.rejected is None and self.spool is not None:
                self.spool.write(rest)
            if mime.rejected is not None:
                self._drop_spool()
                self._drop_scan()
                return succeed(_withheld(mime.rejected))
        findings = tuple(mime.findings) if mime is not None else ()
        changed = mime.changed if mime is not None else False
        if self._unscanned and profile.scan_limit_action == "refuse":
            self._drop_spool()
            return succeed(
                Withheld(
                    "scan_limit",
                    str(profile.scan_limit),
                    f"it is too large to be scanned for viruses (over {profile.scan_limit} octets)",
                )
            )
        scan = self._scan
        if scan is None:
            return succeed(self._passed(changed, findings, scanned=False))
        scan.finish()
        started = self._clock.seconds()

        def scanned(result: ScanResult) -> Verdict:
            self.scan_latency = self._clock.seconds() - started
            return self._judge(result, changed, findings)

        return scan.result.addCallback(scanned)

    def _judge(self, result: ScanResult, changed: bool, findings: tuple[Finding, ...]) -> Verdict:
        if isinstance(result, Clean):
            return self._passed(changed, findings, scanned=True)
        if isinstance(result, Infected):
            self._drop_spool()
            return Withheld("virus", result.signature, f'it contains the virus "{result.signature}"')
        assert isinstance(result, Failed)
        if self.profile.on_scanner_failure == "pass":
            self._unscanned = f"virus scanner failure: {result.reason}"
            return self._passed(changed, findings, scanned=False)
        self._drop_spool()
        return TempFailed(f"the virus scanner is unavailable ({result.reason})")

    def _passed(self, changed: bool, findings: tuple[Finding, ...], *, scanned: bool) -> Passed:
        assert self.spool is not None
        spool, self.spool = self.spool, None  # the caller's now
        return Passed(spool, changed, findings, scanned, self._unscanned)

    def release(self) -> None:
        """Give up (the session ended): the scan is cancelled, the spool removed."""
        self._finished = True
        self._drop_scan()
        self._drop_spool()

    def _capture(self, data: bytes) -> None:
        head = self._head
        room = MAX_HEADER_CAPTURE - len(head)
        head += data[:room]
        end = head.find(b"\n\r\n")
        if end < 0:
            end = head.find(b"\n\n")
        if end >= 0:
            del head[end + 1 :]
            self._head_done = True
        elif len(head) >= MAX_HEADER_CAPTURE:
            self._head_done = True

    def _drop_scan(self) -> None:
        scan, self._scan = self._scan, None
        if scan is not None and not scan.done:
            scan.result.cancel()
            scan.result.addErrback(lambda _: None)

    def _drop_spool(self) -> None:
        spool, self.spool = self.spool, None
        if spool is not None:
            spool.close()
