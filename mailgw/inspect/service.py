"""Content inspection as the proxies see it [4.9]: a stage per inspected session.

L{Inspection} is built from a configuration (its C{[[inspection]]} profiles, one
clamd client for each profile that names a clamd) and handed to the proxies'
environments; a session whose group policy names a profile gets a stage from
L{Inspection.stage_for} when its relay starts, and keeps it (and the profile it was
built with) until it ends, whatever a reload brings.  Every verdict is one log event
(C{event=inspection}) and one count in the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailgw.config import ClamdAddress, Config, InspectionProfile
from mailgw.inspect.check import MessageCheck, Passed, TempFailed, Verdict, Withheld
from mailgw.inspect.clamd import ClamdClient
from mailgw.inspect.imap4 import ImapInspectingStage
from mailgw.inspect.notice import original_fields
from mailgw.inspect.pop3 import Pop3InspectingStage
from mailgw.inspect.smtp import SmtpInspectingStage
from mailgw.inspect.stage import InspectingStage
from mailgw.metrics import Metrics
from mailgw.proxy.registry import SessionInfo
from mailgw.proxy.relay import IRelayStage

__all__ = ["Inspection", "ProfileContext", "spool_folder"]

_STAGES: Mapping[str, type[InspectingStage]] = {
    "pop3": Pop3InspectingStage,
    "imap4": ImapInspectingStage,
    "smtp": SmtpInspectingStage,
}


def spool_folder(config: Config) -> Path:
    """Where inspected messages are spooled: C{<state_dir>/spool}."""
    return Path(config.gateway.state_dir) / "spool"


class ProfileContext:
    """One profile with what its stages need (L{mailgw.inspect.stage.InspectionContext})."""

    log = Logger(namespace="mailgw.inspect")

    def __init__(
        self,
        profile: InspectionProfile,
        scanner: ClamdClient | None,
        spool: Path,
        clock: IReactorTime,
        node_name: str,
        metrics: Metrics | None,
        health: ClamdHealth | None = None,
    ) -> None:
        self.profile = profile
        self.health = health
        self.scanner = scanner
        self.spool_folder = spool
        self.clock = clock
        self.node_name = node_name
        self.metrics = metrics

    def record(self, info: SessionInfo, message: MessageCheck, verdict: Verdict, where: str) -> None:
        protocol = info.protocol
        rule = ""
        if isinstance(verdict, Passed):
            label = verdict.label
            stripped = [f for f in verdict.findings if f.action == "strip"]
            reason = stripped[0].kind if stripped else ("header" if verdict.changed else "none")
            rule = ", ".join(f.rule for f in verdict.findings)
            detail = label + (f" ({rule})" if rule else "")
            if verdict.unscanned:
                detail += f", not scanned: {verdict.unscanned}"
        elif isinstance(verdict, Withheld):
            label = "rejected" if protocol == "smtp" else "replaced"
            reason, rule = verdict.reason, verdict.rule
            detail = f"{label}: {verdict.text}"
        else:
            assert isinstance(verdict, TempFailed)
            label, reason = "tempfail", "scanner"
            detail = f"temporary failure: {verdict.text}"
        if self.health is not None and self.profile.clamd is not None:
            if isinstance(verdict, TempFailed):
                self.health.saw(self.profile.clamd, False, verdict.text)
            elif message.scan_latency is not None:
                self.health.saw(self.profile.clamd, True, "")
        message_id = original_fields(message.head).get("message-id", "")
        self.log.info(
            "Inspection of {where} in session {session_id} ({user}, message {message_id}, {size} octets): {detail}",
            event="inspection",
            where=where,
            session_id=info.session_id,
            protocol=protocol,
            user=info.user,
            profile=self.profile.name,
            message_id=message_id or "-",
            verdict=label,
            reason=reason,
            rule=rule,
            size=message.size,
            scan_seconds=message.scan_latency,
            detail=detail,
        )
        if self.metrics is not None:
            self.metrics.inspected(protocol, label, reason)
            if message.scan_latency is not None:
                self.metrics.scan_latency(message.scan_latency)


class ClamdHealth:
    """What is known of each clamd: the last scan's or ping's outcome, and when."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.seen: dict[ClamdAddress, tuple[bool, float, str]] = {}

    def saw(self, address: ClamdAddress, ok: bool, detail: str) -> None:
        self.seen[address] = (ok, self._clock.seconds(), detail)

    def state(self, address: ClamdAddress) -> dict[str, object]:
        known = self.seen.get(address)
        if known is None:
            return {"health": "unknown", "checked": None, "detail": ""}
        ok, when, detail = known
        return {"health": "reachable" if ok else "unavailable", "checked": when, "detail": detail}


class Inspection:
    """The profiles of one configuration, their clamd clients, and their stages.

    Clients are kept across reloads for an unchanged clamd address and timeout
    (L{Inspection.rebuilt}).
    """

    def __init__(
        self,
        profiles: tuple[InspectionProfile, ...],
        *,
        clock: IReactorTime,
        spool: Path,
        node_name: str,
        metrics: Metrics | None = None,
        scanners: Mapping[tuple[ClamdAddress, float], ClamdClient] | None = None,
        health: ClamdHealth | None = None,
    ) -> None:
        self.spool = spool
        self.health = health if health is not None else ClamdHealth(clock)
        known = dict(scanners or {})
        self.scanners: dict[tuple[ClamdAddress, float], ClamdClient] = {}
        self.contexts: dict[str, ProfileContext] = {}
        for profile in profiles:
            scanner = None
            if profile.clamd is not None:
                key = (profile.clamd, profile.clamd_timeout)
                scanner = self.scanners.get(key) or known.get(key)
                if scanner is None:
                    scanner = ClamdClient.for_address(clock, profile.clamd, profile.clamd_timeout)
                self.scanners[key] = scanner
            self.contexts[profile.name] = ProfileContext(
                profile, scanner, spool, clock, node_name, metrics, self.health
            )

    @classmethod
    def from_config(
        cls,
        config: Config,
        clock: IReactorTime,
        metrics: Metrics | None,
        old: Inspection | None = None,
        *,
        spool: Path | None = None,
    ) -> Inspection:
        """The inspection of C{config}; C{spool}: another folder than the configuration's
        (each worker process spools in a folder of its own)."""
        return cls(
            config.inspections,
            clock=clock,
            spool=spool if spool is not None else spool_folder(config),
            node_name=config.gateway.node_name,
            metrics=metrics,
            scanners=old.scanners if old is not None else None,
            health=old.health if old is not None else None,
        )

    def stage_for(self, protocol: str, profile: str, info: SessionInfo) -> IRelayStage | None:
        """A new stage of C{protocol} for C{profile} (C{None} for an unknown profile,
        which the configuration check does not let through)."""
        context = self.contexts.get(profile)
        stage = _STAGES.get(protocol)
        if context is None or stage is None:
            return None
        return stage(context, info)

    def check_health(self) -> defer.Deferred[None]:
        """Ping every clamd (C{zPING}) and note the outcome (for C{mailgwctl status})."""
        pings: list[defer.Deferred[None]] = []
        for (address, _), scanner in self.scanners.items():

            def noted(ok: bool, address: ClamdAddress = address) -> None:
                self.health.saw(address, ok, "" if ok else "no answer to zPING")

            pings.append(scanner.ping().addCallback(noted))
        return defer.gatherResults(pings).addCallback(lambda _: None)

    def status(self) -> list[dict[str, object]]:
        """Each profile, its clamd and what is known of its health."""
        out: list[dict[str, object]] = []
        for name, context in self.contexts.items():
            address = context.profile.clamd
            entry: dict[str, object] = {"profile": name, "clamd": str(address) if address is not None else None}
            if address is not None:
                entry.update(self.health.state(address))
            out.append(entry)
        return out
