"""Tests for :mod:`mailgw.metrics` (SPEC [8.3])."""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.metrics import LOGIN_FAILURE_KINDS, AdminListener, Metrics, metrics_service
from mailgw.proxy.registry import SessionInfo, SessionRegistry, SessionState


class Owner:
    """A session owner that only notes being terminated."""

    def __init__(self) -> None:
        self.terminated: list[str] = []

    def terminate(self, reason: str, cause: str = "Admin-Reset") -> None:
        self.terminated.append(reason)


def sessions_gauge(metrics: Metrics, protocol: str, state: SessionState) -> float | None:
    return metrics.value("mailgw_sessions", protocol=protocol, state=state.value)


def relayed(metrics: Metrics, protocol: str, direction: str) -> float | None:
    return metrics.value("mailgw_relayed_bytes_total", protocol=protocol, direction=direction)


def port_number(service: AdminListener) -> int:
    """The TCP port C{service} listens on."""
    assert service.port is not None
    address = service.port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


class MetricsTests(SynchronousTestCase):
    """The series of [8.3], read straight from the registry."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.sessions = SessionRegistry(self.clock)
        self.metrics = Metrics(self.sessions)

    def open(self, protocol: str) -> SessionInfo:
        return self.sessions.open(protocol, "192.0.2.1:40000", Owner())

    def test_loginCounters(self) -> None:
        """Successes count by protocol, failures by protocol and reason kind; every
        known series exists at 0 before its first event."""
        self.assertEqual(self.metrics.value("mailgw_logins_ok_total", protocol="pop3"), 0)
        self.metrics.login_succeeded("pop3")
        self.metrics.login_succeeded("pop3")
        self.metrics.login_failed("imap4", "auth_failed")
        self.assertEqual(self.metrics.value("mailgw_logins_ok_total", protocol="pop3"), 2)
        self.assertEqual(self.metrics.value("mailgw_logins_ok_total", protocol="imap4"), 0)
        self.assertEqual(self.metrics.value("mailgw_logins_failed_total", protocol="imap4", reason="auth_failed"), 1)
        for kind in LOGIN_FAILURE_KINDS:
            self.assertIsNotNone(self.metrics.value("mailgw_logins_failed_total", protocol="smtp", reason=kind))

    def test_unknownFailureKindIsOther(self) -> None:
        """A reason kind outside the fixed set is counted as C{other}: free text never
        becomes a label value."""
        self.metrics.login_failed("pop3", "user bob typed hunter2")
        self.assertEqual(self.metrics.value("mailgw_logins_failed_total", protocol="pop3", reason="other"), 1)
        text = self.metrics.exposition()[0].decode()
        self.assertNotIn("hunter2", text)

    def test_sessionGauges(self) -> None:
        """The session gauges follow the session registry at scrape time."""
        for protocol in ("pop3", "imap4", "smtp"):
            for state in SessionState:
                self.assertEqual(sessions_gauge(self.metrics, protocol, state), 0)
        first = self.open("pop3")
        second = self.open("pop3")
        third = self.open("imap4")
        self.assertEqual(sessions_gauge(self.metrics, "pop3", SessionState.UNAUTHENTICATED), 2)
        self.clock.advance(1)
        self.sessions.set_state(first, SessionState.AUTHENTICATING)
        self.sessions.claim_login(third, "alice", 1)
        self.assertEqual(sessions_gauge(self.metrics, "pop3", SessionState.UNAUTHENTICATED), 1)
        self.assertEqual(sessions_gauge(self.metrics, "pop3", SessionState.AUTHENTICATING), 1)
        self.assertEqual(sessions_gauge(self.metrics, "imap4", SessionState.AUTHENTICATED), 1)
        self.assertEqual(sessions_gauge(self.metrics, "imap4", SessionState.UNAUTHENTICATED), 0)
        for info in (first, second, third):
            self.sessions.close(info)
        for state in SessionState:
            self.assertEqual(sessions_gauge(self.metrics, "pop3", state), 0)
            self.assertEqual(sessions_gauge(self.metrics, "imap4", state), 0)

    def test_relayedBytes(self) -> None:
        """Relayed bytes are the live sessions' counts plus the closed sessions'
        totals, so the counter never goes back when a session ends."""
        info = self.open("imap4")
        info.bytes_from_client = 100
        info.bytes_to_client = 5000
        self.assertEqual(relayed(self.metrics, "imap4", "from_client"), 100)
        self.assertEqual(relayed(self.metrics, "imap4", "to_client"), 5000)
        info.bytes_to_client += 1000
        self.assertEqual(relayed(self.metrics, "imap4", "to_client"), 6000)
        self.sessions.close(info)
        self.metrics.session_closed(info)
        self.assertEqual(relayed(self.metrics, "imap4", "to_client"), 6000)
        other = self.open("imap4")
        other.bytes_to_client = 1
        self.assertEqual(relayed(self.metrics, "imap4", "to_client"), 6001)
        self.assertEqual(relayed(self.metrics, "pop3", "to_client"), 0)

    def test_withoutSessionRegistry(self) -> None:
        """Metrics without a session registry report zero sessions."""
        metrics = Metrics(process=False)
        self.assertEqual(sessions_gauge(metrics, "smtp", SessionState.AUTHENTICATED), 0)

    def test_ownRegistry(self) -> None:
        """Each Metrics has its own registry: two are independent, and prometheus_client's
        global registry holds none of their series."""
        other = Metrics(SessionRegistry(self.clock))
        self.metrics.login_succeeded("smtp")
        self.metrics.poller_delivered("17")
        self.assertEqual(self.metrics.value("mailgw_logins_ok_total", protocol="smtp"), 1)
        self.assertEqual(other.value("mailgw_logins_ok_total", protocol="smtp"), 0)
        self.assertIsNone(other.value("mailgw_poller_messages_delivered_total", account="17"))
        self.open("smtp")
        self.assertEqual(sessions_gauge(self.metrics, "smtp", SessionState.UNAUTHENTICATED), 1)
        self.assertEqual(sessions_gauge(other, "smtp", SessionState.UNAUTHENTICATED), 0)
        global_names = {
            sample.name for family in prometheus_client.REGISTRY.collect() for sample in family.samples
        }
        self.assertFalse([name for name in global_names if name.startswith("mailgw_")])

    def test_timedChecker(self) -> None:
        """A timed checker records each check's duration on the clock, accepted or
        refused, under its server group."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        slow = SlowChecker(checker, self.clock, 0.3)
        timed = self.metrics.timed_checker(slow, "LOCAL", self.clock)
        verifyObject(ICredentialsChecker, timed)
        self.assertEqual(timed.credentialInterfaces, checker.credentialInterfaces)
        ok = timed.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        self.assertNoResult(ok)
        self.clock.advance(0.3)
        self.assertEqual(self.successResultOf(ok), b"alice")
        refused = timed.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
        self.clock.advance(0.3)
        self.failureResultOf(refused, UnauthorizedLogin)
        self.assertEqual(self.metrics.value("mailgw_aaa_request_duration_seconds_count", group="LOCAL"), 2)
        self.assertAlmostEqual(self.metrics.value("mailgw_aaa_request_duration_seconds_sum", group="LOCAL") or 0, 0.6)
        self.assertEqual(
            self.metrics.value("mailgw_aaa_request_duration_seconds_bucket", group="LOCAL", le="0.25"), 0
        )
        self.assertEqual(self.metrics.value("mailgw_aaa_request_duration_seconds_bucket", group="LOCAL", le="0.5"), 2)

    def test_timedAuthorizer(self) -> None:
        """A timed authorizer records the lookup's duration and passes on its result
        or failure."""

        async def authorize(username: str, secondary: str | None) -> str:
            await task.deferLater(self.clock, 2.0, lambda: None)
            if username == "nobody":
                raise UnauthorizedLogin("no such user")
            return f"{username}/{secondary}"

        timed = self.metrics.timed_authorizer(authorize, "corp-ldap", self.clock)
        ok = timed("alice", "x")
        missing = timed("nobody", None)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(ok), "alice/x")
        self.failureResultOf(missing, UnauthorizedLogin)
        self.assertEqual(self.metrics.value("mailgw_aaa_request_duration_seconds_count", group="corp-ldap"), 2)
        self.assertEqual(self.metrics.value("mailgw_aaa_request_duration_seconds_sum", group="corp-ldap"), 4.0)

    def test_aaaLatencyNeverNegative(self) -> None:
        """A clock going back records 0, not a negative duration."""
        self.metrics.aaa_latency("RADIUS", -1.0)
        self.assertEqual(self.metrics.value("mailgw_aaa_request_duration_seconds_sum", group="RADIUS"), 0)

    def test_pollerCounters(self) -> None:
        """Delivered and deleted messages count by account; a deleted account's
        series go away."""
        self.metrics.poller_delivered("42")
        self.metrics.poller_delivered("42", 3)
        self.metrics.poller_deleted("42", 4)
        self.assertEqual(self.metrics.value("mailgw_poller_messages_delivered_total", account="42"), 4)
        self.assertEqual(self.metrics.value("mailgw_poller_messages_deleted_total", account="42"), 4)
        self.metrics.forget_account("42")
        self.metrics.forget_account("never-seen")
        self.assertIsNone(self.metrics.value("mailgw_poller_messages_delivered_total", account="42"))
        self.assertIsNone(self.metrics.value("mailgw_poller_messages_deleted_total", account="42"))

    def test_exposition(self) -> None:
        """The text format by default, OpenMetrics when the scraper asks for it."""
        body, content_type = self.metrics.exposition()
        self.assertTrue(content_type.startswith("text/plain"))
        self.assertIn(b"# TYPE mailgw_sessions gauge", body)
        body, content_type = self.metrics.exposition("application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))


@implementer(ICredentialsChecker)
class SlowChecker:
    """Answers what C{checker} answers, C{delay} seconds later on C{clock}."""

    def __init__(self, checker: Any, clock: task.Clock, delay: float) -> None:
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces
        self.clock = clock
        self.delay = delay

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        result: defer.Deferred[Any] = defer.maybeDeferred(self.checker.requestAvatarId, credentials)
        return task.deferLater(self.clock, self.delay, lambda: result)


class Idle(Protocol):
    """A client that sends nothing and notes when its connection is gone."""

    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class MetricsEndpointTests(TestCase):
    """The metrics over real HTTP on a loopback port."""

    def setUp(self) -> None:
        self.sessions = SessionRegistry(reactor)
        self.metrics = Metrics(self.sessions)
        service = metrics_service("tcp:0:interface=127.0.0.1", self.metrics, reactor)
        assert isinstance(service, AdminListener)
        self.service = service
        self.service.startService()
        self.addCleanup(self.stop_service)
        assert self.service.port is not None
        self.port = port_number(self.service)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)

    def stop_service(self) -> defer.Deferred[None]:
        if self.service.running:
            return defer.maybeDeferred(self.service.stopService)
        return defer.succeed(None)

    async def get(self, path: str, accept: bytes | None = None) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        headers = Headers({b"accept": [accept]}) if accept else None
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{self.port}{path}".encode(), headers)
        body = await readBody(response)
        return response.code, dict(response.headers.getAllRawHeaders()), body

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, headers, body = await self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers[b"Content-Type"][0].startswith(b"text/plain"))
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    async def test_loginsOverHTTP(self) -> None:
        """The endpoint reflects a login success and a login failure."""
        ok = ("mailgw_logins_ok_total", (("protocol", "pop3"),))
        failed = ("mailgw_logins_failed_total", (("protocol", "pop3"), ("reason", "auth_failed")))
        before = await self.scrape()
        self.assertEqual((before[ok], before[failed]), (0, 0))
        self.metrics.login_succeeded("pop3")
        self.metrics.login_failed("pop3", "auth_failed")
        after = await self.scrape()
        self.assertEqual((after[ok], after[failed]), (1, 1))

    async def test_sessionsOverHTTP(self) -> None:
        """A live session shows in the gauges served over HTTP."""
        self.sessions.open("smtp", "192.0.2.9:1", Owner())
        samples = await self.scrape()
        self.assertEqual(samples["mailgw_sessions", (("protocol", "smtp"), ("state", "unauthenticated"))], 1)
        self.assertIn(("process_cpu_seconds_total", ()), samples)

    async def test_openMetrics(self) -> None:
        """A scraper asking for OpenMetrics gets it."""
        code, headers, body = await self.get("/metrics", b"application/openmetrics-text; version=1.0.0")
        self.assertEqual(code, 200)
        self.assertTrue(headers[b"Content-Type"][0].startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    async def test_otherPaths(self) -> None:
        """C{/} names the metrics path; other paths are not found."""
        code, _, body = await self.get("/")
        self.assertEqual((code, body), (200, b"mailgw: metrics at /metrics\n"))
        code, _, _ = await self.get("/nothing")
        self.assertEqual(code, 404)

    async def test_stopClosesConnections(self) -> None:
        """Stopping the service stops listening and closes the open connections, so an
        idle client does not hold the daemon's stop."""
        client = Idle()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        await self.service.stopService()
        await client.lost
        self.assertIsNone(self.service.port)

    def test_bindFailure(self) -> None:
        """A port that cannot be bound fails the start at once."""
        second = metrics_service(f"tcp:{self.port}:interface=127.0.0.1", Metrics(), reactor)
        self.assertRaises(CannotListenError, second.startService)

