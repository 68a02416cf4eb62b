"""AAA at its edges, end to end [3, 4.10, 5.1, 5.4]: a server group's C{max_pending}
answers a temporary failure at once when its checks hang; an LDAP group whose server
hangs does not delay local logins on another proxy; and reloads keep each session
with the accounting client it started with (the same RADIUS server, the same secret),
while new sessions get the new one.

Real servers behind the gateway (Dovecot, FreeRADIUS) and real clients (poplib,
imaplib) in threads in front of it.  The one server no real component can play -- an
LDAP server that accepts connections and never answers -- is L{HangingLdapServer},
here in the test reactor.
"""

from __future__ import annotations

import copy
import imaplib
import poplib
import shutil
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mailgw.service import GatewayService
from tests.gateway import Gateway, deferLater
from tests.rawclient import RawClient
from tests.servers.base import free_port
from tests.servers.dovecot import Dovecot
from tests.servers.freeradius import FreeRadius
from tests.servers.pki import TestPKI
from tests.test_integration_pop3 import in_thread

#: the answer prefixes of a temporary failure [4.10]
POP3_TEMPORARY = "-ERR [SYS/TEMP]"
IMAP4_TEMPORARY = "[UNAVAILABLE]"

#: a generous LDAP timeout: a check that reaches the hanging server waits this long
HANG_TIMEOUT = 10

MAIL_USERS = {"alice": "alice-mail", "bob": "bob-mail"}
VPN_USERS: dict[str, tuple[str, str | None]] = {name: (password, None) for name, password in MAIL_USERS.items()}
POLICIES = [{"name": "DfltGrpPolicy", "simultaneous_logins": 3}]


# -- an LDAP server that never answers -----------------------------------------------------


class _SilentConnection(Protocol):
    """One connection to a L{HangingLdapServer}: read everything, answer nothing."""

    factory: HangingLdapServer

    def connectionMade(self) -> None:
        self.factory.opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.bytes_received += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.lost(self)


class HangingLdapServer(ServerFactory):
    """An LDAP server that is up but hung: it accepts TCP connections on loopback and
    reads the requests (binds, searches), and never sends a byte back.

    An ldap3 client connects at once and then waits for its receive timeout.
    L{release} ends the hang: every open connection is aborted and new ones are
    closed at once, so the clients fail fast (a server that went down).

    @ivar accepted: connections accepted so far.
    @ivar connections: the connections open now.
    @ivar bytes_received: bytes the clients sent (their requests).
    """

    def __init__(self) -> None:
        self.accepted = 0
        self.bytes_received = 0
        self.connections: set[_SilentConnection] = set()
        self.refusing = False
        self._port: IListeningPort | None = None
        self._all_gone: list[defer.Deferred[None]] = []

    @classmethod
    def started(cls, testcase: TestCase) -> HangingLdapServer:
        """A server listening on a free loopback port, stopped when C{testcase} cleans
        up (after every connection is gone, so trial finds a clean reactor)."""
        server = cls()
        server._port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
        testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(server.stop()))
        return server

    @property
    def url(self) -> str:
        assert self._port is not None
        return f"ldap://127.0.0.1:{self._port.getHost().port}"  # type: ignore[attr-defined]

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        connection = _SilentConnection()
        connection.factory = self
        return connection

    def opened(self, connection: _SilentConnection) -> None:
        self.accepted += 1
        self.connections.add(connection)
        if self.refusing:
            assert connection.transport is not None
            connection.transport.abortConnection()  # type: ignore[attr-defined]

    def lost(self, connection: _SilentConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            waiting, self._all_gone = self._all_gone, []
            for d in waiting:
                d.callback(None)

    def release(self) -> None:
        """End the hang: abort the open connections, close new ones at once."""
        self.refusing = True
        for connection in list(self.connections):
            assert connection.transport is not None
            connection.transport.abortConnection()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop listening, abort every connection and wait until all are gone."""
        self.release()
        if self._port is not None:
            port, self._port = self._port, None
            await defer.maybeDeferred(port.stopListening)
        if self.connections:
            gone: defer.Deferred[None] = defer.Deferred()
            self._all_gone.append(gone)
            await gone


# -- helpers -------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait (in the reactor, polling) until C{predicate()} holds; fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await deferLater(0.01)


def client_pool(testcase: TestCase, size: int) -> ThreadPool:
    """A thread pool of its own for clients that block for long (hanging logins): the
    reactor's pool stays free for the clients whose timing the test measures.  Stopped
    last at cleanup (registered first), when the gateway has closed their connections."""
    pool = ThreadPool(minthreads=0, maxthreads=size, name="edge-aaa-clients")
    pool.start()
    testcase.addCleanup(pool.stop)
    return pool


def login_failures(gateway: Gateway) -> list[dict[str, Any]]:
    """The C{login_failed} events logged so far, oldest first."""
    return [dict(e) for e in gateway.events if e.get("event") == "login_failed"]


class EdgeBase(TestCase):
    """Starts gateways whose configuration dict is kept, for reloads on the same ports."""

    timeout = 120

    def setUp(self) -> None:
        self.pki = TestPKI(Path(self.mktemp()).absolute())

    def start(self, pop3s: dict[str, Any] | None, **sections: Any) -> tuple[Gateway, dict[str, Any]]:
        """A running gateway (as L{tests.gateway.start_gateway}) and its configuration
        data: a copy of that, edited and written with L{Gateway.write_config}, is what a
        reload reads (the ports stay the running ones)."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        gateway = Gateway(directory, self.pki, VPN_USERS)
        self.addCleanup(shutil.rmtree, gateway.socket_dir, True)
        data = gateway.config_data(pop3s, **sections)
        gateway.start(data)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(gateway.stop()))
        return gateway, data

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_path))

    def pop3_login(self, gateway: Gateway, user: str, password: str) -> tuple[str, float, poplib.POP3_SSL | None]:
        """Blocking (run it in a thread): USER/PASS over POP3S.  Returns the answer to
        PASS (or the -ERR text), the seconds PASS took, and the client if logged in
        (the caller then quits it) -- a refused client has been closed."""
        client = poplib.POP3_SSL("127.0.0.1", gateway.port("pop3s"), context=self.context(), timeout=30)
        try:
            client.user(user)
            started = time.monotonic()
            try:
                answer = client.pass_(password).decode()
            except poplib.error_proto as e:
                elapsed = time.monotonic() - started
                text = e.args[0].decode() if isinstance(e.args[0], bytes) else str(e)
                try:
                    client.quit()
                except (poplib.error_proto, OSError):
                    client.close()
                return text, elapsed, None
            return answer, time.monotonic() - started, client
        except BaseException:
            client.close()
            raise

    def hanging_ldap_group(self, ldap: HangingLdapServer, name: str, **options: Any) -> dict[str, Any]:
        return {
            "name": name,
            "protocol": "ldap",
            "servers": [ldap.url],
            "bind_dn": "cn=mailgw,ou=services,dc=example,dc=com",
            "bind_password": "service-password",
            "base_dn": "ou=people,dc=example,dc=com",
            "user_filter": "(uid={username})",
            "timeout": HANG_TIMEOUT,
            **options,
        }


# -- 1. max_pending ------------------------------------------------------------------------


class MaxPendingTests(EdgeBase):
    async def test_fullGroupAnswersTemporaryFailureAtOnce(self) -> None:
        """With C{max_pending = 2} and two checks hanging on the group's LDAP server, a
        third login gets C{-ERR [SYS/TEMP]} in well under a second, never reaches the
        server, and is logged as one C{login_failed} event naming the user, the client
        address and "checks pending".  Once the hanging checks end, the places are free
        again: the next login reaches the server."""
        ldap = HangingLdapServer.started(self)
        group = "hung-ldap"
        gateway, _ = self.start(
            {
                # never reached: every login here ends in the AAA step
                "default_server": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
                "authentication_server_group": group,
            },
            aaa_server_group=[
                {"name": "LOCAL", "protocol": "local", "users_file": "users.toml"},
                self.hanging_ldap_group(ldap, group, max_pending=2),
            ],
            group_policy=POLICIES,
        )
        self.addCleanup(ldap.release)  # before the gateway stops: its LDAP threads end
        service = gateway.service
        assert isinstance(service, GatewayService)
        first = in_thread(self.pop3_login, gateway, "hang1", "password-1")
        second = in_thread(self.pop3_login, gateway, "hang2", "password-2")
        await until(lambda: len(ldap.connections) == 2, "two LDAP checks hanging on the server")
        await until(lambda: ldap.bytes_received > 0, "the LDAP requests sent")
        self.assertEqual(service.limits[group].pending, 2)

        answer, elapsed, client = await in_thread(self.pop3_login, gateway, "carol", "carol-password")

        # The proof that the limit did it: without it this check would be the third
        # ldap3 call (the LDAP pool has more threads than 2), connect to the hanging
        # server and wait out its 10 s timeout -- so elapsed < 0.5 would fail, and the
        # server would have seen a third connection.
        self.assertIsNone(client)
        self.assertTrue(answer.startswith(POP3_TEMPORARY), answer)
        self.assertLess(elapsed, 0.5)
        self.assertEqual(ldap.accepted, 2)
        self.assertEqual(service.limits[group].pending, 2)
        events = [e for e in login_failures(gateway) if e.get("user") == "carol"]
        self.assertEqual(len(events), 1, events)
        event = events[0]
        self.assertIn("checks pending", str(event["reason"]))
        self.assertEqual(event["client_ip"], "127.0.0.1")
        self.assertEqual(event["protocol"], "pop3")
        self.assertTrue(event["session_id"])
        self.assertNotIn("carol-password", gateway.log_text())

        # The server goes down: the hanging checks end with a temporary failure of
        # their own, and give their places back.
        ldap.release()
        for pending in (await first, await second):
            self.assertTrue(pending[0].startswith(POP3_TEMPORARY), pending)
            self.assertIsNone(pending[2])
        await until(lambda: service.limits[group].pending == 0, "the places given back")
        accepted = ldap.accepted
        answer, _, _ = await in_thread(self.pop3_login, gateway, "hang3", "password-3")
        self.assertTrue(answer.startswith(POP3_TEMPORARY), answer)
        self.assertEqual(ldap.accepted, accepted + 1)  # this one reached the server
        reasons = [str(e["reason"]) for e in login_failures(gateway) if e.get("user") in ("hang1", "hang2", "hang3")]
        self.assertEqual(len(reasons), 3, reasons)
        for reason in reasons:
            self.assertNotIn("checks pending", reason)
            self.assertIn("no LDAP server of group", reason)

    async def test_abandonedChecksStillCount(self) -> None:
        """A check whose client disconnects keeps its place until its LDAP work really
        ends: with C{max_pending = 2}, clients that send a login and hang up at once
        never get more than 2 checks of the group to the hanging server (each such
        check still holds an ldap3 thread until its timeout).  Otherwise a client could
        queue unbounded LDAP work by connecting, logging in and disconnecting [4.10, 9]."""
        ldap = HangingLdapServer.started(self)
        group = "hung-ldap"
        gateway, _ = self.start(
            {
                "default_server": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
                "authentication_server_group": group,
            },
            aaa_server_group=[
                {"name": "LOCAL", "protocol": "local", "users_file": "users.toml"},
                self.hanging_ldap_group(ldap, group, max_pending=2),
            ],
            group_policy=POLICIES,
        )
        self.addCleanup(ldap.release)
        service = gateway.service
        assert isinstance(service, GatewayService)

        def login_and_hang_up(user: str) -> None:
            client = RawClient.open(gateway.port("pop3s"), self.context())
            try:
                client.read_line()  # the greeting
                client.command(f"USER {user}".encode())
                client.send(b"PASS secret-password\r\n")  # and hang up without the answer
            finally:
                client.close()

        for attempt in range(6):
            await in_thread(login_and_hang_up, f"quitter{attempt}")
            # the gateway sees the login and then the disconnect
            await until(lambda: not len(service.registry), "the abandoned session gone")
            await deferLater(0.1)
        await deferLater(0.5)
        self.assertLessEqual(len(ldap.connections), 2, f"{ldap.accepted} LDAP connections accepted")
        self.assertLessEqual(ldap.accepted, 2)


# -- 2. an LDAP outage and local logins -----------------------------------------------------


class LdapOutageTests(EdgeBase):
    async def test_hangingLdapDoesNotDelayLocalLogins(self) -> None:
        """Ten IMAP4S logins hang on an LDAP group whose server never answers (every
        ldap3 thread is stuck); meanwhile a POP3S login of a local user, through to the
        real mail server, completes in under 2 s.  Once the LDAP server goes down the
        hanging logins get C{NO [UNAVAILABLE]}."""
        dovecot = Dovecot.started(self, users=MAIL_USERS)
        clients = client_pool(self, 12)
        ldap = HangingLdapServer.started(self)
        gateway, _ = self.start(
            {
                "default_server": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none"},
                "authentication_server_group": "LOCAL",
            },
            imap4s={
                "default_server": {"host": "127.0.0.1", "port": dovecot.imap_port, "tls": "none"},
                "authentication_server_group": "corp-ldap",
            },
            aaa_server_group=[
                {"name": "LOCAL", "protocol": "local", "users_file": "users.toml"},
                self.hanging_ldap_group(ldap, "corp-ldap"),
            ],
            group_policy=POLICIES,
        )
        self.addCleanup(ldap.release)
        service = gateway.service
        assert isinstance(service, GatewayService)

        def imap_login(user: str) -> str:
            client = imaplib.IMAP4_SSL("127.0.0.1", gateway.port("imap4s"), ssl_context=self.context(), timeout=30)
            try:
                client.login(user, "ldap-password")
                return "OK"
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                client.shutdown()

        hanging = [
            deferToThreadPool(reactor, clients, imap_login, f"ldapuser{i}")  # type: ignore[arg-type]
            for i in range(10)
        ]
        limit = service.limits["corp-ldap"]
        await until(lambda: limit.pending == 10 and len(ldap.connections) > 0, "ten LDAP logins hanging")

        answer, elapsed, client = await in_thread(self.pop3_login_timed, gateway, "alice", "alice-mail")
        self.assertLess(elapsed, 2.0, answer)
        self.assertIsNotNone(client, answer)
        assert client is not None
        self.assertTrue(answer.startswith("+OK"), answer)
        # The LDAP logins were hanging all along, holding every ldap3 thread.
        stuck = min(10, service.ldap_threads.max)
        await until(lambda: len(ldap.connections) >= stuck, f"{stuck} LDAP checks hanging (every ldap3 thread)")
        self.assertFalse(any(d.called for d in hanging))
        stat = await in_thread(client.stat)
        self.assertEqual(stat, (0, 0))
        await in_thread(client.quit)

        ldap.release()
        answers = await defer.gatherResults(hanging)
        for imap_answer in answers:
            self.assertIn(IMAP4_TEMPORARY, imap_answer)

    def pop3_login_timed(self, gateway: Gateway, user: str, password: str) -> tuple[str, float, poplib.POP3_SSL | None]:
        """L{pop3_login}, timed from before the TLS connect to the PASS answer (or to
        the client's timeout)."""
        started = time.monotonic()
        try:
            answer, _, client = self.pop3_login(gateway, user, password)
        except TimeoutError:
            return "client timed out", time.monotonic() - started, None
        return answer, time.monotonic() - started, client


# -- 3. reloads and RADIUS accounting -------------------------------------------------------


def acct_group(*servers: FreeRadius, secret: str | None = None) -> dict[str, Any]:
    """An accounting server group of FreeRADIUS instances (their own secret unless
    C{secret} is given)."""
    return {
        "name": "acct",
        "protocol": "radius",
        "servers": [
            {
                "host": server.host,
                "auth_port": server.auth_port,
                "acct_port": server.acct_port,
                "secret": secret if secret is not None else server.secret,
            }
            for server in servers
        ],
        "timeout": 1,
        "retries": 0,
    }


def records_of(radius: FreeRadius, user: str) -> list[tuple[str, str]]:
    """(Acct-Status-Type, Acct-Session-Id) of C{user}'s records at C{radius}, in order."""
    return [
        (r["Acct-Status-Type"], r["Acct-Session-Id"].strip('"'))
        for r in radius.accounting_records()
        if r.get("User-Name") == user
    ]


class ReloadAccountingTests(EdgeBase):
    def setUp(self) -> None:
        super().setUp()
        self.dovecot = Dovecot.started(self, users=MAIL_USERS)

    def start_accounted(self, *servers: FreeRadius) -> tuple[Gateway, dict[str, Any], GatewayService]:
        gateway, data = self.start(
            {
                "default_server": {"host": "127.0.0.1", "port": self.dovecot.pop3_port, "tls": "none"},
                "authentication_server_group": "LOCAL",
                "accounting_server_group": "acct",
            },
            aaa_server_group=[{"name": "LOCAL", "protocol": "local", "users_file": "users.toml"}, acct_group(*servers)],
            group_policy=POLICIES,
        )
        assert isinstance(gateway.service, GatewayService)
        return gateway, data, gateway.service

    async def logged_in(self, gateway: Gateway, user: str) -> tuple[poplib.POP3_SSL, str]:
        """A POP3S session of C{user} (password as its mail password) and its id."""
        answer, _, client = await in_thread(self.pop3_login, gateway, user, MAIL_USERS[user])
        self.assertIsNotNone(client, answer)
        assert client is not None and gateway.service is not None
        ids = [s.session_id for s in gateway.service.registry if s.user == user]
        self.assertEqual(len(ids), 1, ids)
        return client, ids[0]

    async def accounting(self, radius: FreeRadius, count: int) -> None:
        """Wait until C{radius} has at least C{count} accounting records; fail, listing
        what it has, after 5 s (the gateway retries each record every second or so)."""
        try:
            await in_thread(radius.wait_for_accounting, count)
        except TimeoutError:
            got = [(r.get("User-Name"), r.get("Acct-Status-Type")) for r in radius.accounting_records()]
            self.fail(f"expected {count} accounting records at {radius.acct_port}, got {got}")

    def reload(self, gateway: Gateway, data: dict[str, Any]) -> None:
        assert gateway.service is not None
        gateway.write_config(data)
        self.assertEqual(gateway.service.reload(), [])

    async def test_stopGoesWhereStartWentWhenAccountingRemoved(self) -> None:
        """A session logs in (Start sent); a reload removes the accounting group from
        the proxy; the session ends: its Stop reaches the same FreeRADIUS with the same
        Acct-Session-Id.  A session started after the reload sends no accounting."""
        radius = FreeRadius.started(self)
        gateway, data, _ = self.start_accounted(radius)
        alice, alice_id = await self.logged_in(gateway, "alice")
        await self.accounting(radius, 1)
        self.assertEqual(records_of(radius, "alice"), [("Start", alice_id)])

        data = copy.deepcopy(data)
        data["pop3s"]["accounting_server_group"] = ""
        self.reload(gateway, data)

        bob, _ = await self.logged_in(gateway, "bob")
        await in_thread(bob.quit)
        await in_thread(alice.quit)
        await self.accounting(radius, 2)
        self.assertEqual(records_of(radius, "alice"), [("Start", alice_id), ("Stop", alice_id)])
        self.assertEqual(records_of(radius, "bob"), [])

    async def test_stopGoesWhereStartWentWhenAccountingMoved(self) -> None:
        """A reload points the accounting group at another FreeRADIUS: the session
        established before it sends its Stop to the first server (where its Start
        went), a new session sends Start and Stop to the second; neither server sees
        the other's session."""
        first = FreeRadius.started(self)
        second = FreeRadius.started(self, secret="second-secret")
        gateway, data, _ = self.start_accounted(first)
        alice, alice_id = await self.logged_in(gateway, "alice")
        await self.accounting(first, 1)

        data = copy.deepcopy(data)
        data["aaa_server_group"][1] = acct_group(second)
        self.reload(gateway, data)

        bob, bob_id = await self.logged_in(gateway, "bob")
        await self.accounting(second, 1)
        await in_thread(alice.quit)
        await self.accounting(first, 2)
        await in_thread(bob.quit)
        await self.accounting(second, 2)
        self.assertEqual(records_of(first, "alice"), [("Start", alice_id), ("Stop", alice_id)])
        self.assertEqual(records_of(second, "bob"), [("Start", bob_id), ("Stop", bob_id)])
        self.assertEqual(records_of(first, "bob"), [])
        self.assertEqual(records_of(second, "alice"), [])

    async def test_secretChangeAppliesToNewSessionsOnly(self) -> None:
        """A reload that changes nothing of the accounting group keeps its client; one
        that changes its secret gives new sessions a new client: with FreeRADIUS
        knowing only the new secret, the new session's Start and Stop are accepted;
        with it knowing only the old secret again, the session established before the
        reload gets its Stop accepted.  (FreeRADIUS drops a request signed with another
        secret without an answer, and the gateway would retry it forever: a Start or
        Stop sent with the wrong secret never reaches the detail log.)"""
        radius = FreeRadius.started(self, secret="old-secret")
        ports = (radius.auth_port, radius.acct_port)
        gateway, data, service = self.start_accounted(radius)
        alice, alice_id = await self.logged_in(gateway, "alice")
        await self.accounting(radius, 1)

        kept = service.accounting["acct"]
        data = copy.deepcopy(data)
        data["group_policy"] = [{"name": "DfltGrpPolicy", "simultaneous_logins": 4}]
        self.reload(gateway, data)
        self.assertIs(service.accounting["acct"], kept)

        data["aaa_server_group"][1] = acct_group(radius, secret="new-secret")
        self.reload(gateway, data)
        self.assertIsNot(service.accounting["acct"], kept)

        await in_thread(self.restart, radius, "new-secret")
        self.assertEqual((radius.auth_port, radius.acct_port), ports, "FreeRADIUS moved: ports taken meanwhile")
        bob, bob_id = await self.logged_in(gateway, "bob")
        await self.accounting(radius, 2)
        await in_thread(bob.quit)
        await self.accounting(radius, 3)
        self.assertEqual(records_of(radius, "bob"), [("Start", bob_id), ("Stop", bob_id)])

        await in_thread(self.restart, radius, "old-secret")
        self.assertEqual((radius.auth_port, radius.acct_port), ports, "FreeRADIUS moved: ports taken meanwhile")
        await in_thread(alice.quit)
        await self.accounting(radius, 4)
        self.assertEqual(records_of(radius, "alice"), [("Start", alice_id), ("Stop", alice_id)])

    @staticmethod
    def restart(radius: FreeRadius, secret: str) -> None:
        """Restart FreeRADIUS knowing only C{secret} (blocking: run it in a thread)."""
        radius.secret = secret
        radius.restart()

    async def test_stopOfRetiredClientWaitedForAtShutdown(self) -> None:
        """A session established before a reload moved the accounting group keeps its
        old accounting client; its Stop, sent while that server is down, is still
        retried while the gateway stops (which waits up to 5 s for accounting answers),
        so with the server back a second later the Stop arrives [5.4, 9: nothing of a
        session's accounting is lost].  Without the reload this passes: the gateway
        waits for its current accounting client."""
        first = FreeRadius.started(self)
        second = FreeRadius.started(self, secret="second-secret")
        gateway, data, _ = self.start_accounted(first)
        alice, alice_id = await self.logged_in(gateway, "alice")
        await self.accounting(first, 1)
        data = copy.deepcopy(data)
        data["aaa_server_group"][1] = acct_group(second)
        self.reload(gateway, data)

        ports = (first.auth_port, first.acct_port)
        await in_thread(first.stop)
        await in_thread(alice.quit)  # the Stop is sent now, and lost
        assert gateway.service is not None
        await until(lambda: not len(gateway.service.registry), "alice's session ended")  # type: ignore[union-attr]
        stopping = defer.Deferred.fromCoroutine(gateway.stop())
        await deferLater(1.0)
        await in_thread(first.start)
        self.assertEqual((first.auth_port, first.acct_port), ports, "FreeRADIUS moved: ports taken meanwhile")
        await stopping
        await self.accounting(first, 2)
        self.assertEqual(records_of(first, "alice"), [("Start", alice_id), ("Stop", alice_id)])
