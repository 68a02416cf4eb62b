"""The supervisor's tables (L{mailgw.workers.anvil}), the worker's directory and its
report of non-authenticated sessions, without processes: the rules that make the
limits hold across workers [4.4, 5.5, 10]."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.proxy.directory import DirectoryUnavailable, ISessionDirectory
from mailgw.proxy.registry import SessionRegistry, SessionState
from mailgw.state.directory import DirectorySession
from mailgw.workers import commands as c
from mailgw.workers.anvil import Anvil, parse_events
from mailgw.workers.sockets import AdoptedSockets
from mailgw.workers.worker import PendingReporter, SupervisorDirectory, WorkerChannel


def login(worker: int, session_id: str, ip: str, started: float, user: str = "alice", protocol: str = "pop3") -> Any:
    return DirectorySession(
        f"gw/w{worker}", session_id, session_id, protocol, f"{ip}:1000", ip, user, user, "P", "up", started
    )


class LoginTests(SynchronousTestCase):
    def test_sameLoginOnTwoWorkers(self) -> None:
        """Two connections of one login (same user, address, protocol) on two
        workers are one login: nothing is logged off."""
        anvil = Anvil()
        self.assertEqual(anvil.claim(1, login(1, "a", "10.0.0.1", 1.0), 1, [("10.0.0.1", "pop3")]), [])
        self.assertEqual(anvil.claim(2, login(2, "b", "10.0.0.1", 2.0), 1, [("10.0.0.1", "pop3")]), [])
        self.assertEqual(anvil.login_count("alice"), 1)

    def test_oldestElsewhereLoggedOff(self) -> None:
        """Beyond the limit, the oldest logins on other workers are logged off (all
        their connections), and no longer count."""
        anvil = Anvil()
        anvil.claim(1, login(1, "a1", "10.0.0.1", 1.0), 2, [("10.0.0.1", "pop3")])
        anvil.claim(2, login(2, "a2", "10.0.0.1", 1.5), 2, [("10.0.0.1", "pop3")])
        anvil.claim(2, login(2, "b", "10.0.0.2", 2.0), 2, [("10.0.0.1", "pop3"), ("10.0.0.2", "pop3")])
        offs = anvil.claim(1, login(1, "c", "10.0.0.3", 3.0), 2, [("10.0.0.1", "pop3"), ("10.0.0.3", "pop3")])
        # Worker 1 holds 10.0.0.1 itself (a1): the other login, 10.0.0.2, goes.
        self.assertEqual([(o.worker, o.session_ids) for o in offs], [(2, ("b",))])
        self.assertIn("simultaneous_logins", offs[0].reason)
        offs = anvil.claim(2, login(2, "d", "10.0.0.4", 4.0), 1, [("10.0.0.1", "pop3"), ("10.0.0.4", "pop3")])
        # Worker 2 still holds a2 (10.0.0.1) itself: only worker 1's c is elsewhere.
        self.assertEqual([(o.worker, o.session_ids) for o in offs], [(1, ("c",))])

    def test_otherUsersUntouched(self) -> None:
        anvil = Anvil()
        anvil.claim(1, login(1, "a", "10.0.0.1", 1.0, user="bob"), 1, [("10.0.0.1", "pop3")])
        self.assertEqual(anvil.claim(2, login(2, "b", "10.0.0.2", 2.0), 1, [("10.0.0.2", "pop3")]), [])

    def test_withdrawnAndGoneDoNotCount(self) -> None:
        anvil = Anvil()
        anvil.claim(1, login(1, "a", "10.0.0.1", 1.0), 1, [("10.0.0.1", "pop3")])
        anvil.withdraw(1, "a")
        self.assertEqual(anvil.claim(2, login(2, "b", "10.0.0.2", 2.0), 1, [("10.0.0.2", "pop3")]), [])
        anvil.worker_gone(2)
        self.assertEqual(anvil.logins(), [])
        self.assertEqual(anvil.claim(1, login(1, "c", "10.0.0.3", 3.0), 1, [("10.0.0.3", "pop3")]), [])

    @given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 5)), min_size=1, max_size=30), st.integers(1, 3))
    def test_limitHolds(self, logins: list[tuple[int, int]], limit: int) -> None:
        """Whatever the order of logins over three workers, once the log-offs are
        done no user has more than C{limit} logins."""
        anvil = Anvil()
        held: dict[int, dict[str, str]] = {1: {}, 2: {}, 3: {}}
        for n, (worker, address) in enumerate(logins):
            ip = f"10.0.0.{address}"
            session_id = f"s{n}"
            # The worker's own registry applies the limit locally first.
            local = set(held[worker].values()) | {ip}
            while len(local) > limit:
                oldest = next(sid for sid, a in held[worker].items() if a != ip)
                gone = held[worker].pop(oldest)
                anvil.withdraw(worker, oldest)
                local = set(held[worker].values()) | {ip}
                del gone
            held[worker][session_id] = ip
            for off in anvil.claim(
                worker, login(worker, session_id, ip, float(n)), limit, [(a, "pop3") for a in local]
            ):
                for sid in off.session_ids:
                    held[off.worker].pop(sid)
            self.assertLessEqual(anvil.login_count("alice"), limit)
            everywhere = {a for sessions in held.values() for a in sessions.values()}
            self.assertLessEqual(len(everywhere), limit)


class PendingTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Malformed events are left out."""
        report = [["+", "a", "pop3", 1.5, "u"], ["-", "b"], ["+", "c"], ["x", "d"], "junk", ["+", "e", "pop3", 1, "z"]]
        self.assertEqual(parse_events(report), [("+", "a", "pop3", "1.5", "u"), ("-", "b")])
        self.assertEqual(parse_events({"not": "a list"}), [])

    def test_oldestElsewhereClosed(self) -> None:
        """A newcomer beyond the limit closes the oldest unauthenticated session
        wherever it is, then the oldest authenticating; never a newcomer."""
        anvil = Anvil({"pop3": 3})
        self.assertEqual(anvil.pending(1, [("+", "a", "pop3", "1", "a"), ("+", "b", "pop3", "2", "u")]), [])
        self.assertEqual(anvil.pending(2, [("+", "c", "pop3", "3", "u")]), [])
        offs = anvil.pending(2, [("+", "d", "pop3", "4", "u"), ("+", "e", "pop3", "5", "u")])
        self.assertEqual([(o.worker, o.session_ids) for o in offs], [(1, ("b",)), (2, ("c",))])
        self.assertEqual(anvil.pending_count("pop3"), 3)
        offs = anvil.pending(1, [("+", "f", "pop3", "6", "u")])
        self.assertEqual([(o.worker, o.session_ids) for o in offs], [(2, ("d",))])
        self.assertIn("unauthenticated_session_limit 3", offs[0].reason)

    def test_loggedInLeaves(self) -> None:
        anvil = Anvil({"pop3": 1})
        anvil.pending(1, [("+", "a", "pop3", "1", "u")])
        anvil.pending(1, [("-", "a")])
        self.assertEqual(anvil.pending(2, [("+", "b", "pop3", "2", "u")]), [])
        self.assertEqual(anvil.pending(2, [("+", "c", "imap4", "3", "u")]), [])  # no limit there

    def test_workerGone(self) -> None:
        anvil = Anvil({"pop3": 1})
        anvil.pending(1, [("+", "a", "pop3", "1", "u")])
        anvil.worker_gone(1)
        self.assertEqual(anvil.pending_count("pop3"), 0)
        self.assertEqual(anvil.pending(2, [("+", "b", "pop3", "2", "u")]), [])

    def test_sameReportCloseAndOpen(self) -> None:
        """A worker's own eviction reported with the newcomer (in one report) is not
        counted again: nothing more is closed."""
        anvil = Anvil({"pop3": 2})
        anvil.pending(1, [("+", "a", "pop3", "1", "u"), ("+", "b", "pop3", "2", "u")])
        self.assertEqual(anvil.pending(1, [("+", "c", "pop3", "3", "u"), ("-", "a")]), [])


class FakeChannel:
    """The calls a worker's directory and reporter make to the supervisor."""

    def __init__(self) -> None:
        self.calls: list[tuple[type[Any], dict[str, Any]]] = []
        self.answer: defer.Deferred[Any] = defer.succeed({})

    def call(self, command: type[Any], **arguments: Any) -> defer.Deferred[Any]:
        self.calls.append((command, arguments))
        return self.answer

    def send(self, command: type[Any], **arguments: Any) -> None:
        self.calls.append((command, arguments))


class Owner:
    def terminate(self, reason: str, cause: str = "Admin-Reset") -> None:
        pass


class WorkerSideTests(SynchronousTestCase):
    def test_interface(self) -> None:
        channel = WorkerChannel(AdoptedSockets(), task.Clock(), lambda: None)
        self.assertTrue(
            verifyObject(ISessionDirectory, SupervisorDirectory(channel, SessionRegistry(task.Clock()), "n"))
        )

    def test_claim(self) -> None:
        """A claim carries the session and the worker's logins of that user; no
        answer in time is a temporary failure."""
        clock = task.Clock()
        registry = SessionRegistry(clock)
        channel = FakeChannel()
        directory = SupervisorDirectory(channel, registry, "gw/w1")  # type: ignore[arg-type]
        info = registry.open("pop3", "10.0.0.1:5", Owner(), client_ip="10.0.0.1")
        registry.claim_login(info, "alice", 2)
        self.successResultOf(directory.claim(info, 2))
        command, arguments = channel.calls[-1]
        self.assertIs(command, c.Claim)
        self.assertEqual(arguments["session"]["node"], "gw/w1")
        self.assertEqual(arguments["local"], [("10.0.0.1", "pop3")])
        channel.answer = defer.fail(defer.TimeoutError())
        self.failureResultOf(directory.claim(info, 2), DirectoryUnavailable)
        directory.withdraw(info)
        self.assertEqual(channel.calls[-1], (c.Withdraw, {"session_id": info.session_id}))

    def test_successSentOnlyAfterAFailure(self) -> None:
        """A login whose delay answer was 0 (no failure in the supervisor) sends no
        success; after a failure, or a delay answer above 0, the success is sent."""
        channel = FakeChannel()
        directory = SupervisorDirectory(channel, SessionRegistry(task.Clock()), "gw/w1")  # type: ignore[arg-type]
        sent = lambda: [(command, arguments) for command, arguments in channel.calls if command is c.Succeeded]  # noqa: E731
        channel.answer = defer.succeed({"delay": 0.0})
        self.assertEqual(self.successResultOf(directory.delay("10.0.0.1")), 0.0)
        directory.succeeded("10.0.0.1")
        self.assertEqual(sent(), [])
        directory.succeeded("10.0.0.1")  # without asking first: sent
        self.assertEqual(sent(), [(c.Succeeded, {"ip": "10.0.0.1"})])
        channel.answer = defer.succeed({"delay": 0.0})
        self.successResultOf(directory.delay("10.0.0.1"))
        directory.failed("10.0.0.1")
        directory.succeeded("10.0.0.1")
        self.assertEqual(len(sent()), 2)
        channel.answer = defer.succeed({"delay": 2.0})
        self.assertEqual(self.successResultOf(directory.delay("10.0.0.2")), 2.0)
        directory.succeeded("10.0.0.2")
        self.assertEqual(sent()[-1], (c.Succeeded, {"ip": "10.0.0.2"}))

    def test_reporter(self) -> None:
        """The changes of one reactor turn go in one report; a login leaves; nothing
        is sent while no proxy has a limit."""
        clock = task.Clock()
        registry = SessionRegistry(clock)
        channel = FakeChannel()
        reporter = PendingReporter(channel, clock, enabled=True)  # type: ignore[arg-type]
        registry.observer = reporter
        a = registry.open("pop3", "10.0.0.1:5", Owner())
        b = registry.open("pop3", "10.0.0.1:6", Owner())
        registry.set_state(a, SessionState.AUTHENTICATING)
        self.assertEqual(channel.calls, [])
        clock.advance(0)
        [(command, arguments)] = channel.calls
        self.assertIs(command, c.Pending)
        self.assertEqual(
            [e[:2] + e[4:] for e in arguments["events"]],
            [["+", a.session_id, "u"], ["+", b.session_id, "u"], ["+", a.session_id, "a"]],
        )
        registry.claim_login(a, "alice", 1)
        registry.close(b)
        clock.advance(0)
        self.assertEqual(channel.calls[-1][1]["events"], [["-", a.session_id], ["-", b.session_id]])
        reporter.enabled = False
        registry.open("pop3", "10.0.0.1:7", Owner())
        clock.advance(0)
        self.assertEqual(len(channel.calls), 2)
