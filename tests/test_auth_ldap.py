"""The ``ldap`` server-group checker against a real slapd (tests/servers/slapd.py).

ldap3 runs in a thread pool of the test, the reactor stays free; failover is shown with
a closed port and with a "silent" server (a listening socket that never accepts: TCP
connects, no LDAP answer ever comes).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.auth.ldap import LdapChecker, build_filter, normalize_dn
from mailgw.auth.portal import AAAUnavailable, AuthenticatedUser
from mailgw.config import LdapGroup, parse_config
from tests.servers.base import free_port
from tests.servers.pki import TestPKI
from tests.servers.slapd import Slapd

GROUP = "corp-ldap"
MAIL_GROUP = "cn=mail,ou=groups,dc=example,dc=com"
#: upper case on purpose: group DNs are compared case-insensitively
FINANCE_GROUP = "CN=Finance,OU=Groups,DC=Example,DC=Com"
TIMEOUT = 1.0
#: how much longer than the timeout a failover may take (thread hand-offs, the second
#: server's search and bind)
MARGIN = 1.5


def ldap_group(**options: Any) -> LdapGroup:
    """An ldap group built through the configuration contract."""
    group = {"name": GROUP, "protocol": "ldap", **options}
    config = parse_config(
        {
            "aaa_server_group": [{"name": "LOCAL", "protocol": "local"}, group],
            "group_policy": [{"name": "MailUsers"}, {"name": "Finance"}],
        },
        Path("/nonexistent"),
        check_files=False,
    )
    found = config.aaa_group(GROUP)
    assert isinstance(found, LdapGroup)
    return found


def silent_server(testcase: SynchronousTestCase) -> int:
    """A port where TCP connects (the kernel's backlog) but nothing ever answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    testcase.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port: int = listener.getsockname()[1]
    return port


class FilterTests(SynchronousTestCase):
    """The user filter is built with RFC 4515-escaped values."""

    def test_escaped(self) -> None:
        """Filter metacharacters in the user name are escaped, never interpreted."""
        self.assertEqual(build_filter("(uid={username})", "*)(uid=*"), r"(uid=\2a\29\28uid=\2a)")
        self.assertEqual(build_filter("(uid={username})", "\\2a"), r"(uid=\5c2a)")
        self.assertEqual(build_filter("(uid={username})", "a\0b"), r"(uid=a\00b)")

    def test_secondary(self) -> None:
        """C{{secondary}} is escaped too; a filter that needs it refuses a login without."""
        self.assertEqual(
            build_filter("(&(uid={username})(o={secondary}))", "alice", "Acme (EU)*"),
            r"(&(uid=alice)(o=Acme \28EU\29\2a))",
        )
        self.assertRaises(UnauthorizedLogin, build_filter, "(&(uid={username})(o={secondary}))", "alice")

    def test_normalizeDN(self) -> None:
        """DNs compare case-insensitively and regardless of spaces around RDNs."""
        self.assertEqual(normalize_dn(FINANCE_GROUP), normalize_dn("cn=finance, ou=groups, dc=example, dc=com"))
        self.assertNotEqual(normalize_dn(MAIL_GROUP), normalize_dn(FINANCE_GROUP))
        self.assertEqual(normalize_dn("Staff"), "staff")


class LdapCheckerTests(TestCase):
    """Authentication and authorization against slapd."""

    timeout = 60

    def setUp(self) -> None:
        self.ldap = Slapd.started(self)
        self.threadpool = ThreadPool(minthreads=0, maxthreads=4, name="test-ldap")
        self.threadpool.start()
        self.addCleanup(self.threadpool.stop)

    def checker(self, servers: list[str] | None = None, **options: Any) -> LdapChecker:
        settings: dict[str, Any] = {
            "servers": servers or [self.ldap.url()],
            "base_dn": self.ldap.base_dn,
            "bind_dn": self.ldap.bind_dn,
            "bind_password": self.ldap.bind_password,
            "group_policy_map": {MAIL_GROUP: "MailUsers", FINANCE_GROUP: "Finance"},
            "timeout": TIMEOUT,
            **options,
        }
        checker = LdapChecker(ldap_group(**settings), reactor, self.threadpool)
        self.addCleanup(checker.close)
        return checker

    async def login(self, checker: LdapChecker, user: str | bytes, password: str | bytes) -> AuthenticatedUser:
        user_bytes = user.encode() if isinstance(user, str) else user
        password_bytes = password.encode() if isinstance(password, str) else password
        result: AuthenticatedUser = await checker.requestAvatarId(UsernamePassword(user_bytes, password_bytes))
        return result

    async def assertRejected(self, checker: LdapChecker, user: str | bytes, password: str | bytes) -> str:
        try:
            await self.login(checker, user, password)
        except UnauthorizedLogin as e:
            return str(e)
        self.fail(f"login as {user!r} succeeded")

    async def assertUnavailable(self, checker: LdapChecker, user: str, password: str) -> str:
        try:
            await self.login(checker, user, password)
        except AAAUnavailable as e:
            return str(e)
        self.fail(f"login as {user!r} did not fail as unavailable")

    def log_text(self) -> str:
        return self.ldap.log_text()

    # -- authentication ------------------------------------------------------------------

    def test_interface(self) -> None:
        """The checker is a cred checker for user names and passwords."""
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker()))

    async def test_goodPassword(self) -> None:
        """A good password gives the user, with the group policy its memberOf maps to."""
        user = await self.login(self.checker(), "alice", "alice-password")
        self.assertEqual(user, AuthenticatedUser(name="alice", server_group=GROUP, ldap_policies=("MailUsers",)))

    async def test_severalGroups(self) -> None:
        """Every mapped memberOf value counts (compared case-insensitively)."""
        bob = await self.login(self.checker(), "bob", "bob-password")
        self.assertEqual(bob.ldap_policies, ("Finance", "MailUsers"))
        carol = await self.login(self.checker(), "carol", "carol-password")
        self.assertEqual(carol.ldap_policies, ())

    async def test_otherAttribute(self) -> None:
        """The group policy attribute is configurable, and values that are no DNs map too."""
        self.ldap.add_user("dave", "dave-password", attributes={"employeeType": "Contractor"})
        checker = self.checker(group_policy_attribute="employeeType", group_policy_map={"contractor": "Finance"})
        dave = await self.login(checker, "dave", "dave-password")
        self.assertEqual(dave.ldap_policies, ("Finance",))

    async def test_wrongPassword(self) -> None:
        """A wrong password is an explicit reject."""
        reason = await self.assertRejected(self.checker(), "alice", "bob-password")
        self.assertIn("invalid credentials", reason)

    async def test_unknownUser(self) -> None:
        """A user the search does not find is rejected."""
        reason = await self.assertRejected(self.checker(), "mallory", "alice-password")
        self.assertIn("no such user", reason)

    async def test_emptyPassword(self) -> None:
        """An empty password is rejected without any bind as the user (an empty simple
        bind is an unauthenticated bind, which servers answer with success)."""
        checker = self.checker()
        await self.assertRejected(checker, "alice", "")
        await self.assertRejected(checker, "alice", b"")
        self.assertNotIn(f'BIND dn="{self.ldap.user_dn("alice")}"', self.log_text())

    async def test_filterInjection(self) -> None:
        """User names with filter metacharacters match nothing but a literal uid."""
        checker = self.checker()
        for name in ("*", "*)(uid=*", "alice)(|(uid=*", "\\2a", "al*", "*)(|(objectClass=*"):
            for password in ("alice-password", "bob-password"):
                reason = await self.assertRejected(checker, name, password)
                self.assertIn("no such user", reason, name)
        log = self.log_text()
        # slapd logs the filter as it parsed it: the metacharacters arrived as values
        self.assertIn(r'filter="(uid=\2A\29\28uid=\2A)"', log)
        self.assertIn(r'filter="(uid=\5C2a)"', log)
        self.assertIn(r'filter="(uid=alice\29\28|\28uid=\2A)"', log)
        self.assertNotIn('filter="(uid=*)"', log)
        self.assertNotIn('BIND dn="uid=', log)

    async def test_ambiguous(self) -> None:
        """A filter matching several entries rejects the login, naming the cause."""
        self.ldap.add_user("alice2", "alice2-password", mail="alice@example.com")
        checker = self.checker(user_filter="(mail={username})")
        reason = await self.assertRejected(checker, "alice@example.com", "alice-password")
        self.assertIn("ambiguous", reason)
        user = await self.login(checker, "bob@example.com", "bob-password")
        self.assertEqual(user.name, "bob@example.com")

    async def test_anonymousSearch(self) -> None:
        """Without bind_dn the search is anonymous; this slapd lets anonymous clients
        read nothing, so nobody is found."""
        checker = self.checker(bind_dn="", bind_password="")
        await self.assertRejected(checker, "alice", "alice-password")

    async def test_connectionReuse(self) -> None:
        """The service account binds once; its connection serves the following logins."""
        checker = self.checker()
        for _ in range(3):
            await self.login(checker, "alice", "alice-password")
        self.assertEqual(self.log_text().count(f'BIND dn="{self.ldap.bind_dn}" method=128'), 1)
        self.assertEqual(self.log_text().count(f'BIND dn="{self.ldap.user_dn("alice")}" method=128'), 3)

    async def test_staleConnection(self) -> None:
        """A pooled connection the server has dropped (here: slapd restarted) is
        replaced by a new one; the login succeeds on the same server."""
        checker = self.checker()
        await self.login(checker, "alice", "alice-password")
        self.ldap.stop()
        self.ldap.start()
        user = await self.login(checker, "alice", "alice-password")
        self.assertEqual(user.name, "alice")

    # -- TLS -----------------------------------------------------------------------------

    async def test_ldaps(self) -> None:
        """ldaps:// verified with the configured CA."""
        checker = self.checker([self.ldap.url(tls=True)], ca=str(self.ldap.ca_path))
        user = await self.login(checker, "alice", "alice-password")
        self.assertEqual(user.ldap_policies, ("MailUsers",))

    async def test_startTLS(self) -> None:
        """StartTLS on ldap:// verified with the configured CA."""
        checker = self.checker(start_tls=True, ca=str(self.ldap.ca_path))
        user = await self.login(checker, "bob", "bob-password")
        self.assertEqual(user.name, "bob")
        self.assertIn("1.3.6.1.4.1.1466.20037", self.log_text())  # the StartTLS operation

    async def test_ldapsWrongCA(self) -> None:
        """A server certificate from another CA makes the server unavailable."""
        other = TestPKI(Path(self.mktemp()).absolute())
        checker = self.checker([self.ldap.url(tls=True)], ca=str(other.ca_path))
        reason = await self.assertUnavailable(checker, "alice", "alice-password")
        self.assertIn(self.ldap.url(tls=True), reason)
        self.assertIn("certificate verification failed", reason)

    async def test_startTLSWrongCA(self) -> None:
        """StartTLS with a certificate from another CA: unavailable, nothing sent."""
        other = TestPKI(Path(self.mktemp()).absolute())
        checker = self.checker(start_tls=True, ca=str(other.ca_path))
        reason = await self.assertUnavailable(checker, "alice", "alice-password")
        self.assertIn("certificate verification failed", reason)
        self.assertNotIn('BIND dn="cn=mailgw', self.log_text())

    async def test_ldapsSystemStore(self) -> None:
        """Without a CA the system store is used, which does not know the test CA."""
        checker = self.checker([self.ldap.url(tls=True)])
        await self.assertUnavailable(checker, "alice", "alice-password")

    # -- failover ------------------------------------------------------------------------

    async def test_failoverClosedPort(self) -> None:
        """An unreachable first server: the second answers."""
        checker = self.checker([f"ldap://127.0.0.1:{free_port()}", self.ldap.url()])
        user = await self.login(checker, "alice", "alice-password")
        self.assertEqual(user.ldap_policies, ("MailUsers",))

    async def test_failoverSilentServer(self) -> None:
        """A first server that never answers: after the timeout the second answers, and
        the reactor is free all along (ldap3 runs in the thread pool)."""
        checker = self.checker([f"ldap://127.0.0.1:{silent_server(self)}", self.ldap.url()])
        started = reactor.seconds()
        pending = checker.requestAvatarId(UsernamePassword(b"alice", b"alice-password"))
        self.assertNoResult(pending)
        user = await pending
        elapsed = reactor.seconds() - started
        self.assertEqual(user.name, "alice")
        self.assertGreaterEqual(elapsed, TIMEOUT * 0.9)
        self.assertLess(elapsed, TIMEOUT + MARGIN)

    async def test_noFailoverAfterReject(self) -> None:
        """A wrong password on the first server is final: the second is never asked."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        checker = self.checker([self.ldap.url(), f"ldap://127.0.0.1:{listener.getsockname()[1]}"])
        await self.assertRejected(checker, "alice", "wrong-password")
        await self.assertRejected(checker, "nobody", "wrong-password")
        self.assertRaises(BlockingIOError, listener.accept)

    async def test_allDown(self) -> None:
        """No server answers: AAAUnavailable naming every server, within the timeouts."""
        closed = f"ldap://127.0.0.1:{free_port()}"
        silent = f"ldap://127.0.0.1:{silent_server(self)}"
        checker = self.checker([closed, silent])
        started = reactor.seconds()
        reason = await self.assertUnavailable(checker, "alice", "alice-password")
        self.assertLess(reactor.seconds() - started, TIMEOUT + MARGIN)
        self.assertIn(closed, reason)
        self.assertIn(silent, reason)
        self.assertIn("timed out", reason)
        self.assertIn(GROUP, reason)

    async def test_authorizeAllDown(self) -> None:
        """Authorization fails over and reports unavailability the same way."""
        checker = self.checker([f"ldap://127.0.0.1:{free_port()}"])
        with self.assertRaises(AAAUnavailable):
            await checker.authorize("alice")

    async def test_passwordNeverLogged(self) -> None:
        """Neither the user's nor the service account's password appears in log events
        or failure reasons."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        password = "Secret-Pa55word"
        checker = self.checker([f"ldap://127.0.0.1:{free_port()}", self.ldap.url()])
        await self.assertRejected(checker, "alice", password)
        down = self.checker([f"ldap://127.0.0.1:{free_port()}"])
        reason = await self.assertUnavailable(down, "alice", password)
        texts = [formatEvent(event) + repr(event) for event in events] + [reason]
        self.assertTrue(events)
        for text in texts:
            self.assertNotIn(password, text)
            self.assertNotIn(self.ldap.bind_password, text)

    # -- authorization -------------------------------------------------------------------

    async def test_authorize(self) -> None:
        """Search only: the user is found, with its policies and the secondary value."""
        checker = self.checker(user_filter="(&(uid={username})(mail={secondary}))")
        user = await checker.authorize("alice", "alice@example.com")
        self.assertEqual(
            user,
            AuthenticatedUser(
                name="alice", server_group=GROUP, ldap_policies=("MailUsers",), secondary="alice@example.com"
            ),
        )
        self.assertNotIn(f'BIND dn="{self.ldap.user_dn("alice")}"', self.log_text())

    async def test_authorizeWrongSecondary(self) -> None:
        """A secondary value the entry does not carry refuses the user."""
        checker = self.checker(user_filter="(&(uid={username})(mail={secondary}))")
        with self.assertRaises(UnauthorizedLogin):
            await checker.authorize("alice", "bob@example.com")
        with self.assertRaises(UnauthorizedLogin):
            await checker.authorize("alice", "*")
        with self.assertRaises(UnauthorizedLogin):
            await checker.authorize("alice")

    async def test_authorizeOrganisation(self) -> None:
        """EA and O [5.3]: the user must have that address and be in that organisation;
        metacharacters in the secondary value are escaped."""
        self.ldap.add_user("dave", "dave-password", mail="dave@example.com", o="Acme (EU)")
        checker = self.checker(user_filter="(&(mail={username})(o={secondary}))")
        user = await checker.authorize("dave@example.com", "Acme (EU)")
        self.assertEqual(user.name, "dave@example.com")
        with self.assertRaises(UnauthorizedLogin):
            await checker.authorize("dave@example.com", "Acme*")
        with self.assertRaises(UnauthorizedLogin):
            await checker.authorize("*", "Acme (EU)")

    async def test_authorizeUnknown(self) -> None:
        """Authorization of a user that does not exist is refused."""
        with self.assertRaises(UnauthorizedLogin):
            await self.checker().authorize("mallory")

    async def test_secondaryFilterNeedsSecondary(self) -> None:
        """A password login through a filter that needs {secondary} is refused."""
        checker = self.checker(user_filter="(&(uid={username})(mail={secondary}))")
        await self.assertRejected(checker, "alice", "alice-password")
