"""The authentication cache [5.6]: a counting checker shows what reaches the real
check; the gateway's own wiring is checked against a real Dovecot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.auth.cache import AuthCache, CachingChecker
from mailgw.auth.portal import AuthenticatedUser
from tests.edge import in_thread, read_until, tls_connect
from tests.gateway import start_gateway
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI


@implementer(ICredentialsChecker)
class CountingChecker:
    """A real-check stand-in over a dict of passwords that counts its checks."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords
        self.checks: list[str] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AuthenticatedUser]:  # type: ignore[override]
        name = credentials.username.decode()
        self.checks.append(name)
        if self.passwords.get(name) != credentials.password.decode():
            return defer.fail(UnauthorizedLogin("wrong password"))
        return defer.succeed(AuthenticatedUser(name=name, server_group="G", local_policy="Staff"))


def creds(user: str, password: str) -> UsernamePassword:
    return UsernamePassword(user.encode(), password.encode())


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = AuthCache(self.clock)
        self.real = CountingChecker({"alice": "secret", "bob": "bob-pw"})
        self.checker = CachingChecker(self.real, "G", self.cache, ttl=300)

    def check(self, user: str, password: str) -> Any:
        d = self.checker.requestAvatarId(creds(user, password))
        results: list[Any] = []
        d.addBoth(results.append)
        return results[0]

    def test_interface(self) -> None:
        """The caching checker is a cred checker."""
        verifyObject(ICredentialsChecker, self.checker)

    def test_secondLoginHits(self) -> None:
        """The second login with the same password is answered from the cache, with
        the same identity and attributes."""
        first = self.check("alice", "secret")
        second = self.check("alice", "secret")
        self.assertEqual(self.real.checks, ["alice"])
        self.assertEqual(first, second)
        self.assertEqual(second.local_policy, "Staff")
        self.assertEqual((self.cache.hits, self.cache.misses), ({"G": 1}, {"G": 1}))

    def test_wrongPasswordCheckedForRealAndEvicts(self) -> None:
        """A wrong password for a cached user goes to the real check, fails, and
        drops the entry: the right password is then checked for real again."""
        self.check("alice", "secret")
        failure = self.check("alice", "guess")
        self.assertTrue(failure.check(UnauthorizedLogin))
        self.assertEqual(len(self.cache), 0)
        self.check("alice", "secret")
        self.assertEqual(self.real.checks, ["alice", "alice", "alice"])

    def test_changedPasswordWorksAtOnce(self) -> None:
        """A changed password is accepted at once (the real check), and the old one
        is no longer answered from the cache."""
        self.check("alice", "secret")
        self.real.passwords["alice"] = "new-secret"
        self.assertIsInstance(self.check("alice", "new-secret"), AuthenticatedUser)
        self.assertTrue(self.check("alice", "secret").check(UnauthorizedLogin))
        self.assertEqual(self.real.checks, ["alice", "alice", "alice"])

    def test_failuresNotCached(self) -> None:
        """A failed check is never remembered."""
        self.check("alice", "guess")
        self.check("alice", "guess")
        self.assertEqual(self.real.checks, ["alice", "alice"])

    def test_expires(self) -> None:
        """An entry lives cache_ttl seconds."""
        self.check("alice", "secret")
        self.clock.advance(299)
        self.check("alice", "secret")
        self.clock.advance(2)
        self.check("alice", "secret")
        self.assertEqual(self.real.checks, ["alice", "alice"])

    def test_flush(self) -> None:
        """flush empties a user, a group, or everything."""
        other = CachingChecker(self.real, "H", self.cache, ttl=300)
        self.check("alice", "secret")
        self.check("bob", "bob-pw")
        other.requestAvatarId(creds("alice", "secret"))
        self.assertEqual(self.cache.flush("G", "alice"), 1)
        self.assertEqual(self.cache.flush("G"), 1)
        self.assertEqual(len(self.cache), 1)
        self.assertEqual(self.cache.flush(), 1)
        self.assertEqual(len(self.cache), 0)

    def test_noPasswordKept(self) -> None:
        """The cache holds a keyed hash, never the password."""
        self.check("alice", "secret")
        self.assertNotIn("secret", repr(vars(self.cache)))
        self.assertNotIn(b"secret", b"".join(e.digest for e in self.cache._entries.values()))

    def test_bounded(self) -> None:
        """Beyond max_entries the least recently used entry goes."""
        cache = AuthCache(self.clock, max_entries=10)
        avatar = AuthenticatedUser(name="x", server_group="G")
        for n in range(100):
            cache.store("G", f"user{n}", b"pw", avatar, 300)
        self.assertEqual(len(cache), 10)
        self.assertIsNone(cache.lookup("G", "user0", b"pw"))
        self.assertIsNotNone(cache.lookup("G", "user99", b"pw"))


class GatewayCacheTests(TestCase):
    timeout = 60

    async def test_secondLoginFromCacheAndReloadFlushes(self) -> None:
        """Through the running gateway: the second POP3 login of a user is a cache
        hit (no second hash check), and a reload forgets the local group's entries."""
        dovecot = Dovecot.started(self, users={"alice": "alice-mail"})
        pki = TestPKI(Path(self.mktemp()).absolute())
        pop3s = {"default_server": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none"}}
        gateway = start_gateway(self, pki, {"alice": ("alice-mail", None)}, pop3s)
        service = gateway.service
        assert service is not None

        def login() -> bytes:
            with tls_connect(gateway.port(), pki.ca_path) as sock:
                read_until(sock, b"\r\n")
                sock.sendall(b"USER alice\r\nPASS alice-mail\r\n")
                read_until(sock, b"\r\n")
                answer = read_until(sock, b"\r\n")
                sock.sendall(b"QUIT\r\n")
                return answer

        self.assertTrue((await in_thread(login)).startswith(b"+OK"))
        self.assertTrue((await in_thread(login)).startswith(b"+OK"))
        self.assertEqual(service.auth_cache.hits, {"LOCAL": 1})
        self.assertEqual(len(service.auth_cache), 1)
        self.assertEqual(service.reload(), [])
        self.assertEqual(len(service.auth_cache), 0)
