"""The session registry's rules: the non-authenticated session limit [4.4] and
simultaneous logins [5.5]."""

from __future__ import annotations

import heapq
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.proxy.registry import LoginRefused, SessionInfo, SessionRegistry, SessionState


class Owner:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def terminate(self, reason: str, cause: str = "Admin-Reset") -> None:
        self.reasons.append(reason)


class SessionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = SessionRegistry(self.clock)

    def open(self, protocol: str = "pop3") -> SessionInfo:
        self.clock.advance(1)
        return self.registry.open(protocol, "127.0.0.1:1", Owner())

    def test_noScanPerConnection(self) -> None:
        """With 10,000 sessions (5,000 authenticated) and a limit set, a new
        connection and its eviction touch a bounded number of entries: counted as
        heap operations, not time."""
        calls = [0]
        real_push, real_pop = heapq.heappush, heapq.heappop

        def push(heap: list[Any], item: Any) -> None:
            calls[0] += 1
            real_push(heap, item)

        def pop(heap: list[Any]) -> Any:
            calls[0] += 1
            return real_pop(heap)

        self.patch(heapq, "heappush", push)
        self.patch(heapq, "heappop", pop)
        infos = [self.open() for _ in range(10_000)]
        for n, info in enumerate(infos[::2]):
            info.client_ip = f"10.0.{n >> 8}.{n & 255}"
            self.registry.claim_login(info, f"user{n}", 3)
        scans = [0]

        class Counting(dict[str, SessionInfo]):
            def values(self) -> Any:
                scans[0] += 1
                return super().values()

            def __iter__(self) -> Any:
                scans[0] += 1
                return super().__iter__()

        self.registry._sessions = Counting(self.registry._sessions)
        calls[0] = 0
        newcomer = self.open()
        victims = self.registry.over_limit("pop3", 5_000, newcomer)
        self.assertEqual(victims, [infos[1]])
        newcomer.client_ip = "10.255.0.1"
        self.assertEqual(self.registry.claim_login(newcomer, "user7", 3), [])
        self.assertLess(calls[0], 64)
        self.assertEqual(scans[0], 0)

    def test_withinLimit(self) -> None:
        """No session is evicted while the count stays within the limit."""
        self.open()
        new = self.open()
        self.assertEqual(self.registry.over_limit("pop3", 2, new), [])

    def test_zeroMeansNoLimit(self) -> None:
        """A limit of 0 never evicts."""
        for _ in range(20):
            new = self.open()
        self.assertEqual(self.registry.over_limit("pop3", 0, new), [])

    def test_oldestUnauthenticatedFirst(self) -> None:
        """The oldest unauthenticated session goes first, even when an authenticating
        one is older."""
        authenticating = self.open()
        self.registry.set_state(authenticating, SessionState.AUTHENTICATING)
        unauth = self.open()
        new = self.open()
        self.assertEqual(self.registry.over_limit("pop3", 2, new), [unauth])

    def test_thenOldestAuthenticating(self) -> None:
        """With no unauthenticated session left, the oldest authenticating one goes."""
        first = self.open()
        second = self.open()
        for s in (first, second):
            self.registry.set_state(s, SessionState.AUTHENTICATING)
        new = self.open()
        self.assertEqual(self.registry.over_limit("pop3", 2, new), [first])

    def test_authenticatedNeverEvicted(self) -> None:
        """Authenticated sessions neither count nor are evicted."""
        done = [self.open() for _ in range(3)]
        for s in done:
            self.registry.set_state(s, SessionState.AUTHENTICATED)
        new = self.open()
        self.assertEqual(self.registry.over_limit("pop3", 1, new), [])

    def test_perProtocol(self) -> None:
        """The limit counts the sessions of one proxy only."""
        self.open("imap4")
        self.open("imap4")
        new = self.open("pop3")
        self.assertEqual(self.registry.over_limit("pop3", 1, new), [])

    def test_sameTimeTieBrokenByArrival(self) -> None:
        """Sessions opened at the same clock reading are ordered by arrival."""
        a = self.registry.open("pop3", "c", Owner())
        self.registry.open("pop3", "c", Owner())
        new = self.registry.open("pop3", "c", Owner())
        self.assertEqual(self.registry.over_limit("pop3", 2, new), [a])

    @given(st.lists(st.sampled_from(list(SessionState)), max_size=30), st.integers(1, 10))
    def test_evictionProperties(self, states: list[SessionState], limit: int) -> None:
        """Whatever the mix, eviction brings the pending count to the limit (or as near
        as the newcomer allows), never touches authenticated sessions or the
        newcomer, and takes every unauthenticated session before any authenticating one.
        """
        registry = SessionRegistry(Clock())
        sessions = []
        for state in states:
            info = registry.open("pop3", "c", Owner())
            registry.set_state(info, state)
            sessions.append(info)
        new = registry.open("pop3", "c", Owner())
        victims = registry.over_limit("pop3", limit, new)
        pending = [s for s in sessions if s.state is not SessionState.AUTHENTICATED] + [new]
        self.assertEqual(len(victims), max(0, len(pending) - limit))
        self.assertNotIn(new, victims)
        self.assertTrue(all(v.state is not SessionState.AUTHENTICATED for v in victims))
        unauth = [s for s in sessions if s.state is SessionState.UNAUTHENTICATED]
        if any(v.state is SessionState.AUTHENTICATING for v in victims):
            self.assertTrue(all(u in victims for u in unauth))


class SimultaneousLoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = SessionRegistry(self.clock)

    def login(
        self, user: str, limit: int, client: str | None = None, protocol: str = "pop3"
    ) -> tuple[SessionInfo, list[SessionInfo]]:
        """A login of C{user}; each from its own client address unless told."""
        self.clock.advance(1)
        if client is None:
            client = f"192.0.2.{self.registry_serial()}"
        info = self.registry.open(protocol, f"{client}:4000", Owner())
        return info, self.registry.claim_login(info, user, limit)

    def registry_serial(self) -> int:
        self._clients = getattr(self, "_clients", 0) + 1
        return self._clients

    def test_underLimit(self) -> None:
        """Logins within the limit log nobody off."""
        self.login("alice", 2)
        info, victims = self.login("alice", 2)
        self.assertEqual(victims, [])
        self.assertIs(info.state, SessionState.AUTHENTICATED)

    def test_limitOneReplaces(self) -> None:
        """With 1, the new login replaces the old session."""
        old, _ = self.login("alice", 1)
        _, victims = self.login("alice", 1)
        self.assertEqual(victims, [old])

    def test_idleLongestFirst(self) -> None:
        """The session idle longest is logged off, not the oldest one."""
        oldest, _ = self.login("alice", 2)
        idle, _ = self.login("alice", 2)
        self.clock.advance(5)
        oldest.last_activity = self.clock.seconds()
        _, victims = self.login("alice", 2)
        self.assertEqual(victims, [idle])

    def test_tieOldestFirst(self) -> None:
        """Equally idle sessions: the oldest goes."""
        a, _ = self.login("alice", 2)
        b, _ = self.login("alice", 2)
        b.last_activity = a.last_activity
        _, victims = self.login("alice", 2)
        self.assertEqual(victims, [a])

    def test_otherUsersUntouched(self) -> None:
        """Only the same user's sessions count."""
        self.login("bob", 1)
        _, victims = self.login("alice", 1)
        self.assertEqual(victims, [])

    def test_zeroRefuses(self) -> None:
        """0 disables login for the policy."""
        info = self.registry.open("pop3", "c:1", Owner())
        self.assertRaises(LoginRefused, self.registry.claim_login, info, "alice", 0)
        self.assertIs(info.state, SessionState.UNAUTHENTICATED)

    def test_release(self) -> None:
        """A released login no longer counts."""
        info, _ = self.login("alice", 1)
        self.registry.release_login(info)
        _, victims = self.login("alice", 1)
        self.assertEqual(victims, [])

    def test_connectionsOfOneLoginCountOnce(self) -> None:
        """Five connections of one user from one address over one protocol are one
        login: with a limit of 3 nobody is logged off, and they share a login id."""
        infos = [self.login("alice", 3, client="198.51.100.1")[0] for _ in range(5)]
        self.assertEqual({i.login_id for i in infos}, {infos[0].session_id})
        self.assertEqual([i.state for i in infos], [SessionState.AUTHENTICATED] * 5)
        _, victims = self.login("alice", 3)
        _, more = self.login("alice", 3)
        self.assertEqual(victims + more, [])

    def test_logOffTakesTheWholeLogin(self) -> None:
        """When a new login exceeds the limit, every connection of the login idle
        longest is logged off (a login is user, address and protocol)."""
        first = [self.login("alice", 2, client="198.51.100.1")[0] for _ in range(3)]
        self.login("alice", 2, client="198.51.100.1", protocol="imap4")
        self.clock.advance(5)
        for info in self.registry:
            if info.protocol == "imap4":
                info.last_activity = self.clock.seconds()
        _, victims = self.login("alice", 2, client="198.51.100.2")
        self.assertEqual(victims, first)

    def test_fiveAddressesLeaveThree(self) -> None:
        """The same five connections from five addresses are five logins: with a
        limit of 3 the two idle longest are logged off."""
        infos = []
        for n in range(5):
            info, victims = self.login("alice", 3, client=f"198.51.100.{n + 1}")
            infos.append((info, victims))
            for victim in victims:
                self.registry.close(victim)  # what its owner's terminate does
        logged_off = [v for _, victims in infos for v in victims]
        self.assertEqual(logged_off, [infos[0][0], infos[1][0]])

    def test_closeForgets(self) -> None:
        """A closed session is gone from the registry."""
        info, _ = self.login("alice", 1)
        self.registry.close(info)
        self.assertIsNone(self.registry.get(info.session_id))
        self.assertEqual(len(self.registry), 0)
