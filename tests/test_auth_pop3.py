"""The ``pop3`` server-group checker against a real Dovecot (tests/servers/dovecot.py)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.auth.pop3 import Pop3Checker, pop3_username
from mailgw.auth.portal import AAAUnavailable, AuthenticatedUser
from mailgw.config import Pop3Group, parse_config
from mailgw.upstream import Connector
from tests.servers.base import free_port
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI

GROUP = "mailserver"
USERS = {"alice": "alice-mail", "bob": "bob-mail"}
LOGIN_TIMEOUT = 1.0
MARGIN = 1.5


def pop3_group(servers: list[dict[str, Any]], strip_domain: bool = False) -> Pop3Group:
    """A pop3 group built through the configuration contract."""
    config = parse_config(
        {
            "aaa_server_group": [
                {"name": "LOCAL", "protocol": "local"},
                {"name": GROUP, "protocol": "pop3", "servers": servers, "strip_domain": strip_domain},
            ]
        },
        Path("/nonexistent"),
        check_files=False,
    )
    group = config.aaa_group(GROUP)
    assert isinstance(group, Pop3Group)
    return group


def listening_socket(testcase: SynchronousTestCase) -> socket.socket:
    """A listening socket that never accepts: TCP connects, no greeting ever comes."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    testcase.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    return listener


class UsernameTests(SynchronousTestCase):
    def test_stripDomain(self) -> None:
        """With strip_domain the part before the last @ is sent; otherwise the name as is."""
        self.assertEqual(pop3_username("alice@example.com", True), "alice")
        self.assertEqual(pop3_username("a@b@example.com", True), "a@b")
        self.assertEqual(pop3_username("alice", True), "alice")
        self.assertEqual(pop3_username("alice@example.com", False), "alice@example.com")


class Pop3CheckerTests(TestCase):
    """Logins through Dovecot's POP3 service."""

    timeout = 60

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users=USERS)
        self.connector = Connector(reactor, connect_timeout=LOGIN_TIMEOUT, login_timeout=LOGIN_TIMEOUT)

    def starttls(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "starttls"}

    def checker(
        self,
        servers: list[dict[str, Any]] | None = None,
        *,
        strip_domain: bool = False,
        ca: Path | None = None,
    ) -> Pop3Checker:
        group = pop3_group(servers or [self.starttls()], strip_domain)
        return Pop3Checker(group, self.connector, ca=ca or Path(self.dovecot.ca_path))

    async def login(self, checker: Pop3Checker, user: str, password: str) -> AuthenticatedUser:
        result: AuthenticatedUser = await checker.requestAvatarId(UsernamePassword(user.encode(), password.encode()))
        return result

    async def assertRejected(self, checker: Pop3Checker, user: str, password: str) -> str:
        try:
            await self.login(checker, user, password)
        except UnauthorizedLogin as e:
            return str(e)
        self.fail(f"login as {user!r} succeeded")

    async def assertUnavailable(self, checker: Pop3Checker, user: str, password: str) -> str:
        try:
            await self.login(checker, user, password)
        except AAAUnavailable as e:
            return str(e)
        self.fail(f"login as {user!r} did not fail as unavailable")

    def test_interface(self) -> None:
        """The checker is a cred checker for user names and passwords."""
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker()))

    async def test_goodPassword(self) -> None:
        """The mail server accepts the login (over STLS): the user is authenticated."""
        user = await self.login(self.checker(), "alice", "alice-mail")
        self.assertEqual(user, AuthenticatedUser(name="alice", server_group=GROUP))

    async def test_quit(self) -> None:
        """After the login the checker says QUIT (Dovecot logs "Logged out")."""
        await self.login(self.checker(), "bob", "bob-mail")
        line = await deferToThread(self.dovecot.wait_for_log, "Logged out")
        self.assertIn("pop3(bob)", line)

    async def test_badPassword(self) -> None:
        """A wrong password or an unknown user is an explicit reject."""
        checker = self.checker()
        await self.assertRejected(checker, "alice", "bob-mail")
        await self.assertRejected(checker, "mallory", "alice-mail")
        await self.assertRejected(checker, "alice", "")

    async def test_fullAddress(self) -> None:
        """Without strip_domain, user@domain is sent as is (Dovecot knows only "alice")."""
        await self.assertRejected(self.checker(), "alice@example.com", "alice-mail")

    async def test_stripDomain(self) -> None:
        """With strip_domain, user@domain logs in as user; the identity is "user"."""
        user = await self.login(self.checker(strip_domain=True), "alice@example.com", "alice-mail")
        self.assertEqual(user.name, "alice")

    async def test_implicitTLS(self) -> None:
        """TLS from the first byte (POP3S port)."""
        checker = self.checker([{"host": "localhost", "port": self.dovecot.pop3s_port, "tls": "implicit"}])
        user = await self.login(checker, "bob", "bob-mail")
        self.assertEqual(user.name, "bob")

    async def test_plain(self) -> None:
        """No TLS at all when the group says so."""
        checker = self.checker([{"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"}])
        user = await self.login(checker, "alice", "alice-mail")
        self.assertEqual(user.name, "alice")

    async def test_wrongCA(self) -> None:
        """STLS or implicit TLS to a certificate of another CA: unavailable, naming the server."""
        other = TestPKI(Path(self.mktemp()).absolute()).ca_path
        implicit = {"host": "127.0.0.1", "port": self.dovecot.pop3s_port, "tls": "implicit"}
        for server in (self.starttls(), implicit):
            reason = await self.assertUnavailable(self.checker([server], ca=Path(other)), "alice", "alice-mail")
            self.assertIn(f"127.0.0.1:{server['port']}", reason)

    async def test_failoverClosedPort(self) -> None:
        """An unreachable first server: the second answers."""
        first = {"host": "127.0.0.1", "port": free_port(), "tls": "starttls"}
        user = await self.login(self.checker([first, self.starttls()]), "alice", "alice-mail")
        self.assertEqual(user.name, "alice")

    async def test_failoverSilentServer(self) -> None:
        """A first server that never greets: after the login timeout the second answers."""
        silent = listening_socket(self)
        first = {"host": "127.0.0.1", "port": silent.getsockname()[1], "tls": "starttls"}
        started = reactor.seconds()
        user = await self.login(self.checker([first, self.starttls()]), "alice", "alice-mail")
        self.assertEqual(user.name, "alice")
        self.assertLess(reactor.seconds() - started, LOGIN_TIMEOUT + MARGIN)

    async def test_noFailoverAfterReject(self) -> None:
        """A rejected login is final: the next server is never contacted."""
        second = listening_socket(self)
        servers = [self.starttls(), {"host": "127.0.0.1", "port": second.getsockname()[1], "tls": "none"}]
        await self.assertRejected(self.checker(servers), "alice", "wrong")
        self.assertRaises(BlockingIOError, second.accept)

    async def test_allDown(self) -> None:
        """No server answers: AAAUnavailable naming each."""
        closed = free_port()
        silent = listening_socket(self).getsockname()[1]
        servers = [
            {"host": "127.0.0.1", "port": closed, "tls": "starttls"},
            {"host": "127.0.0.1", "port": silent, "tls": "implicit"},
        ]
        reason = await self.assertUnavailable(self.checker(servers), "alice", "alice-mail")
        self.assertIn(f"127.0.0.1:{closed}", reason)
        self.assertIn(f"127.0.0.1:{silent}", reason)
        self.assertIn(GROUP, reason)

    async def test_passwordNeverLogged(self) -> None:
        """The password appears in no log event and no failure reason."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        password = "Secret-Pa55word"
        first = {"host": "127.0.0.1", "port": free_port(), "tls": "starttls"}
        reason = await self.assertRejected(self.checker([first, self.starttls()]), "alice", password)
        down = self.checker([first])
        reason += await self.assertUnavailable(down, "alice", password)
        self.assertTrue(events)
        for text in [formatEvent(event) + repr(event) for event in events] + [reason]:
            self.assertNotIn(password, text)
