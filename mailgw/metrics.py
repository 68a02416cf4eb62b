"""Prometheus metrics of the gateway [8.3], served over HTTP on the configured endpoint.

A L{Metrics} owns its own C{CollectorRegistry}: nothing is registered in
prometheus_client's global registry, so two gateways (or two tests) in one process never
share a series.  The hot paths cost nothing: session gauges and relayed bytes are read
from the L{SessionRegistry} at scrape time (the relay keeps counting in its
L{SessionInfo} as it always does), and the core adds a closed session's totals with
L{Metrics.session_closed}.

Label values come from small fixed sets (protocols, failure kinds) or from the
configuration (server group names); never from what a client sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mailgw.auth.cache import AuthCache
from mailgw.auth.portal import AAAUnavailable
from mailgw.proxy.registry import SessionInfo, SessionRegistry, SessionState
from mailgw.sso.identity import IdentitySource, IdentityTable
from mailgw.sso.monitor import Pop3Monitor

P = ParamSpec("P")
T = TypeVar("T")

#: the proxies' protocol names: their series exist (at 0) before the first session
PROTOCOLS = ("pop3", "imap4", "smtp")

#: why a login failed, as a label value [8.3]; anything else is counted as C{other}
LOGIN_FAILURE_KINDS = (
    "auth_failed",  # the AAA servers refused the credentials (or the certificate)
    "temporary",  # AAA or mail server unreachable: the client got a temporary failure
    "not_allowed",  # a server outside allowed_servers was asked for (no open proxy)
    "policy",  # refused by the group policy (simultaneous_logins 0, no default policy, ...)
    "syntax",  # the login string could not be parsed [4.2]
    "mailhost",  # the mail server refused the login the gateway made for the user
    "other",
)

#: the directions of relayed bytes, as in L{SessionInfo}
DIRECTIONS = ("from_client", "to_client")

#: AAA latency buckets (seconds): LAN LDAP/RADIUS answers in milliseconds, bcrypt in
#: tens of them, timeouts and retries in seconds
AAA_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _relayed(info: SessionInfo) -> tuple[tuple[str, int], tuple[str, int]]:
    return ((DIRECTIONS[0], info.bytes_from_client), (DIRECTIONS[1], info.bytes_to_client))


class _SessionCollector(Collector):
    """Reads the live sessions at scrape time: gauges by protocol and state, and the
    relayed bytes of live sessions added to the closed sessions' totals."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        counts: dict[tuple[str, str], int] = {
            (protocol, state.value): 0 for protocol in PROTOCOLS for state in SessionState
        }
        relayed = dict(metrics._closed_bytes)
        sessions = metrics.sessions
        if sessions is not None:
            for info in sessions:
                key = (info.protocol, info.state.value)
                counts[key] = counts.get(key, 0) + 1
                for direction, count in _relayed(info):
                    relayed[info.protocol, direction] = relayed.get((info.protocol, direction), 0) + count
        gauge, counter = self._families()
        for (protocol, state), count in sorted(counts.items()):
            gauge.add_metric([protocol, state], count)
        for (protocol, direction), count in sorted(relayed.items()):
            counter.add_metric([protocol, direction], count)
        return [gauge, counter]

    def _families(self) -> tuple[GaugeMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily(
                "mailgw_sessions",
                "Live proxy sessions by protocol and state [4.4].",
                labels=["protocol", "state"],
            ),
            CounterMetricFamily(
                "mailgw_relayed_bytes",
                "Bytes relayed after login, by protocol and direction.",
                labels=["protocol", "direction"],
            ),
        )


class _CacheCollector(Collector):
    """The authentication cache's hits and misses per group [5.6], read at scrape
    time from the cache's own counters (no work per login)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        cache = self._metrics.auth_cache
        if cache is not None:
            for group, count in sorted(cache.hits.items()):
                family.add_metric([group, "hit"], count)
            for group, count in sorted(cache.misses.items()):
                family.add_metric([group, "miss"], count)
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "mailgw_aaa_cache_lookups",
            "Authentication cache lookups by server group and result (hit or miss) [5.6].",
            labels=["group", "result"],
        )


class _SSOCollector(Collector):
    """POP3 SSO at scrape time [7]: identity table entries by source, expirations,
    and the monitor's stream counters (read from their own counters)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        entries, expirations, monitor = self._families()
        table = self._metrics.identities
        if table is not None:
            counts = {source.value: 0 for source in IdentitySource}
            for identity in table:
                counts[identity.source.value] += 1
            for source, count in sorted(counts.items()):
                entries.add_metric([source], count)
            expirations.add_metric([], table.expirations)
        sso_monitor = self._metrics.sso_monitor
        if sso_monitor is not None:
            for name, count in sorted(sso_monitor.statistics().items()):
                monitor.add_metric([name], count)
        return [entries, expirations, monitor]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily("mailgw_sso_identities", "Identity table entries by source [7].", labels=["source"]),
            CounterMetricFamily("mailgw_sso_expirations", "Identity table entries ended by their ttl."),
            CounterMetricFamily(
                "mailgw_sso_monitor",
                "Monitor-mode counters (streams seen, TLS, dropped, logins ...) [7].",
                labels=["counter"],
            ),
        )


class Metrics:
    """The gateway's series, in a registry of their own.

    @ivar registry: the C{CollectorRegistry} that L{metrics_service} serves.
    @ivar sessions: the session registry read at scrape time (may be replaced).
    """

    def __init__(self, sessions: SessionRegistry | None = None, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.aaa_health = {}
        self.sessions = sessions
        #: the authentication cache read at scrape time (set by the service)
        self.auth_cache: AuthCache | None = None
        #: the SSO identity table and monitor, read at scrape time (set by the service)
        self.identities: IdentityTable | None = None
        self.sso_monitor: Pop3Monitor | None = None
        self._closed_bytes: dict[tuple[str, str], int] = {
            (protocol, direction): 0 for protocol in PROTOCOLS for direction in DIRECTIONS
        }
        registry = self.registry
        self.registry.register(_SessionCollector(self))
        self.registry.register(_CacheCollector(self))
        self.registry.register(_SSOCollector(self))
        self._logins_ok = Counter(
            "mailgw_logins_ok", "Successful logins (relay started), by protocol.", ["protocol"], registry=registry
        )
        self._logins_failed = Counter(
            "mailgw_logins_failed",
            "Failed logins by protocol and reason kind.",
            ["protocol", "reason"],
            registry=registry,
        )
        for protocol in PROTOCOLS:
            self._logins_ok.labels(protocol)
            for kind in LOGIN_FAILURE_KINDS:
                self._logins_failed.labels(protocol, kind)
        self._aaa_latency = Histogram(
            "mailgw_aaa_request_duration_seconds",
            "Time an AAA server group took to answer (success or failure), by group.",
            ["group"],
            buckets=AAA_BUCKETS,
            registry=registry,
        )
        self._poller_delivered = Counter(
            "mailgw_poller_messages_delivered",
            "Messages the remote POP poller delivered, by account.",
            ["account"],
            registry=registry,
        )
        self._poller_deleted = Counter(
            "mailgw_poller_messages_deleted",
            "Messages the remote POP poller deleted from the remote mailbox, by account.",
            ["account"],
            registry=registry,
        )
        self._inspected = Counter(
            "mailgw_inspected_messages",
            "Messages inspected [4.9], by protocol, verdict (clean, stripped, tagged, rejected, "
            "replaced, tempfail) and reason (none, virus, attachment, content-type, header, "
            "malformed, size, scan_limit, scanner).",
            ["protocol", "verdict", "reason"],
            registry=registry,
        )
        self._scan_latency = Histogram(
            "mailgw_scan_duration_seconds",
            "Time clamd took to answer after the end of a message.",
            buckets=AAA_BUCKETS,
            registry=registry,
        )
        if process:
            ProcessCollector(registry=registry)

    # -- what the proxies call ----------------------------------------------------------

    def login_succeeded(self, protocol: str) -> None:
        """A login of C{protocol} succeeded (the relay is starting)."""
        self._logins_ok.labels(protocol).inc()

    def login_failed(self, protocol: str, kind: str) -> None:
        """A login of C{protocol} failed; C{kind} is one of L{LOGIN_FAILURE_KINDS}
        (anything else counts as C{other}: label values are never free text)."""
        if kind not in LOGIN_FAILURE_KINDS:
            kind = "other"
        self._logins_failed.labels(protocol, kind).inc()

    def inspected(self, protocol: str, verdict: str, reason: str) -> None:
        """A message of C{protocol} was inspected: its verdict and reason (label values
        from fixed sets, see the series' help)."""
        self._inspected.labels(protocol, verdict, reason).inc()

    def scan_latency(self, seconds: float) -> None:
        """clamd answered a scan C{seconds} after the message ended."""
        self._scan_latency.observe(seconds)

    def session_closed(self, info: SessionInfo) -> None:
        """A session ended: keep its relayed bytes in the totals.  Call it once per
        session, when (or after) it leaves the session registry."""
        for direction, count in _relayed(info):
            key = (info.protocol, direction)
            self._closed_bytes[key] = self._closed_bytes.get(key, 0) + count

    # -- AAA ----------------------------------------------------------------------------

    def aaa_latency(self, group: str, seconds: float) -> None:
        """One answer (or failure) of server group C{group} took C{seconds}."""
        self._aaa_latency.labels(group).observe(max(seconds, 0.0))

    #: server group → ("reachable" | "unavailable", when) from the last real check
    aaa_health: dict[str, tuple[str, float]]

    def timed_checker(self, checker: ICredentialsChecker, group: str, clock: IReactorTime) -> ICredentialsChecker:
        """C{checker} with each C{requestAvatarId} timed as C{group}'s latency."""
        return TimedChecker(checker, group, clock, self)

    def timed_authorizer(
        self, authorize: Callable[P, Awaitable[T]], group: str, clock: IReactorTime
    ) -> Callable[P, defer.Deferred[T]]:
        """An authorizer (user lookup without password [5.2]) timed as C{group}'s
        latency."""

        async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            start = clock.seconds()
            try:
                return await authorize(*args, **kwargs)
            finally:
                self.aaa_latency(group, clock.seconds() - start)

        def call(*args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
            return defer.Deferred.fromCoroutine(timed(*args, **kwargs))

        return call

    # -- the poller ---------------------------------------------------------------------

    def poller_delivered(self, account: str, count: int = 1) -> None:
        """The poller delivered C{count} messages of C{account} (its id, never a URL
        or anything holding a password)."""
        self._poller_delivered.labels(account).inc(count)

    def poller_deleted(self, account: str, count: int = 1) -> None:
        """The poller deleted C{count} messages from C{account}'s remote mailbox."""
        self._poller_deleted.labels(account).inc(count)

    def forget_account(self, account: str) -> None:
        """Drop the series of a deleted poller account."""
        for counter in (self._poller_delivered, self._poller_deleted):
            try:
                counter.remove(account)
            except KeyError:
                pass

    # -- reading ------------------------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the text format the C{Accept} header asks for, and its
        content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def value(self, name: str, **labels: str) -> float | None:
        """The current value of sample C{name} with C{labels} (for tests and the
        admin channel)."""
        return self.registry.get_sample_value(name, labels)


@implementer(ICredentialsChecker)
class TimedChecker:
    """Wraps a server group's checker to record how long each check takes."""

    def __init__(self, checker: ICredentialsChecker, group: str, clock: IReactorTime, metrics: Metrics) -> None:
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces
        self._group = group
        self._clock = clock
        self._metrics = metrics

    def requestAvatarId(self, credentials: ICredentials) -> defer.Deferred[Any]:
        start = self._clock.seconds()

        def record(result: object) -> object:
            now = self._clock.seconds()
            self._metrics.aaa_latency(self._group, now - start)
            # Health for `mailgwctl status`: a reject still proves the servers answer.
            unavailable = isinstance(result, Failure) and result.check(AAAUnavailable) is not None
            self._metrics.aaa_health[self._group] = ("unavailable" if unavailable else "reachable", now)
            return result

        d: defer.Deferred[Any] = defer.maybeDeferred(self.checker.requestAvatarId, credentials)
        return d.addBoth(record)


# -- HTTP ----------------------------------------------------------------------------------


class MetricsResource(Resource):
    """C{GET /metrics}: the registry rendered in the reactor thread (it only reads
    memory: no thread pool, unlike prometheus_client's WSGI-based resource, which
    also imports the global reactor)."""

    isLeaf = True

    def __init__(self, metrics: Metrics, workers: WorkerExpositions | None = None) -> None:
        super().__init__()
        self._metrics = metrics
        self._workers = workers

    def render_GET(self, request: Request) -> bytes | int:
        accept = request.getHeader(b"accept")
        if self._workers is None:
            body, content_type = self._metrics.exposition(accept.decode("latin-1") if accept else "")
            request.setHeader(b"content-type", content_type.encode("ascii"))
            return body
        # With workers [10]: theirs (the sessions, logins, relayed bytes), each sample
        # labelled with its worker, beside the supervisor's own (poller, AAA tests).
        own, content_type = self._metrics.exposition("")
        request.setHeader(b"content-type", content_type.encode("ascii"))

        def write(workers: list[tuple[int, str]]) -> None:
            if not request.finished and not request._disconnected:  # type: ignore[attr-defined]
                request.write(merge_expositions(own.decode("utf-8"), workers).encode("utf-8"))
                request.finish()

        d = self._workers()
        d.addCallback(write).addErrback(lambda f: write([]))
        return NOT_DONE_YET

    render_HEAD = render_GET


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return NoResource()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"mailgw: metrics at /metrics\n"


class _QuietSite(Site):
    """No access log line per scrape."""

    def log(self, request: http.Request) -> None:
        pass


class _TrackingFactory(WrappingFactory):
    """Keeps the open connections so that stopping the service closes them (an
    admin client must not hold the daemon's stop)."""

    def __init__(self, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self._waiting: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def close_all(self) -> defer.Deferred[None]:
        """Abort the open connections; fires once all are gone."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        for p in list(self.protocols):
            if p.transport is not None:
                p.transport.abortConnection()
        return d


class _RecordingEndpoint:
    """Notes the port an endpoint listens on (for L{AdminListener.port})."""

    def __init__(self, endpoint: IStreamServerEndpoint, service: AdminListener) -> None:
        self._endpoint = endpoint
        self._service = service

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self._service.port = port
            return port

        return self._endpoint.listen(factory).addCallback(listening)


class AdminListener(StreamServerEndpointService):
    """A listening admin surface (metrics, Manhole): fails the daemon's start when the
    port cannot be bound, and closes its open connections when stopped.

    @ivar port: the listening port once bound (its C{getHost()} tells the address).
    """

    port: IListeningPort | None = None

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, *, name: str, description: str
    ) -> None:
        self.tracker = _TrackingFactory(factory)
        super().__init__(_RecordingEndpoint(endpoint, self), self.tracker)
        self.setName(name)
        self.description = description
        self._raiseSynchronously = True

    async def _stop(self) -> None:
        try:
            await defer.maybeDeferred(super().stopService)
            await self.tracker.close_all()
        finally:
            self.port = None

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())


#: fires with each worker's metrics (Prometheus text), by worker number
WorkerExpositions = Callable[[], defer.Deferred[list[tuple[int, str]]]]


def merge_expositions(own: str, workers: Sequence[tuple[int, str]]) -> str:
    """The supervisor's metrics (Prometheus text) and its workers', one family at a
    time (the format wants a family's samples together), each worker's samples with
    a C{worker} label."""
    families: dict[str, tuple[list[str], list[str]]] = {}

    def add(text: str, worker: int | None) -> None:
        name = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    name = parts[2]
                    header, _ = families.setdefault(name, ([], []))
                    if worker is None or not any(h.startswith(f"# {parts[1]} ") for h in header):
                        header.append(line)
                continue
            _, samples = families.setdefault(name, ([], []))
            if worker is not None:
                metric, brace, rest = line.partition("{")
                if brace:
                    line = f'{metric}{{worker="{worker}",{rest}'
                else:
                    metric, _, value = line.partition(" ")
                    line = f'{metric}{{worker="{worker}"}} {value}'
            samples.append(line)

    add(own, None)
    for worker, text in workers:
        add(text, worker)
    return "".join("\n".join([*header, *samples]) + "\n" for header, samples in families.values())


def metrics_site(metrics: Metrics, reactor: Any, workers: WorkerExpositions | None = None) -> Site:
    """The HTTP site: C{/metrics}, and a one-line page at C{/}."""
    root = _Root()
    root.putChild(b"metrics", MetricsResource(metrics, workers))
    site = _QuietSite(root, reactor=reactor, timeout=60)
    site.noisy = False
    return site


def metrics_service(
    endpoint: str, metrics: Metrics, reactor: Any, workers: WorkerExpositions | None = None
) -> IService:
    """The service serving C{metrics} at C{/metrics} on C{endpoint} (an endpoint
    description such as C{tcp:9125:interface=127.0.0.1}); C{workers}: the worker
    processes' metrics to serve with them."""
    return AdminListener(
        serverFromString(reactor, endpoint),
        metrics_site(metrics, reactor, workers),
        name="admin/metrics",
        description=f"metrics ({endpoint})",
    )


__all__ = [
    "LOGIN_FAILURE_KINDS",
    "PROTOCOLS",
    "AdminListener",
    "Metrics",
    "MetricsResource",
    "TimedChecker",
    "merge_expositions",
    "metrics_service",
    "metrics_site",
]

