"""The SSO portal [7]: the login page, CSRF, cookies, caching, escaping, the TLS
listener, and the page as headless Chromium renders it (phone and desktop)."""

from __future__ import annotations

import http.client
import io
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import Certificate
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site
from zope.interface import implementer

from mailgw.metrics import AdminListener
from mailgw.proxy.gatekeeper import LoginFailed
from mailgw.sso.identity import IdentitySource, IdentityTable
from mailgw.sso.portal import (
    CSRF_COOKIE,
    MAX_BODY,
    PortalEndpointError,
    PortalResource,
    portal_service,
    portal_site,
)
from mailgw.tls import ServerTLS
from tests.servers.base import is_root, require_binary
from tests.servers.pki import TestPKI

CLIENT = "10.0.0.5"
PASSWORD = "correct horse battery"
TTL = 28800
#: 2026-05-12 10:00:00 UTC
NOW = 1_778_580_000.0


class FakeAAA:
    """The injected AAA check: C{alice} / L{PASSWORD} (group policy C{Mail}) logs in;
    C{temporary} makes every check a temporary failure; C{hold} leaves it pending."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.temporary = False
        self.policy_refusal = False
        self.hold = False
        self.cancelled: list[defer.Deferred[Any]] = []

    def __call__(self, user: str, password: str, client_ip: str) -> defer.Deferred[tuple[str, str | None]]:
        self.calls.append((user, password, client_ip))
        if self.hold:
            d: defer.Deferred[tuple[str, str | None]] = defer.Deferred(self.cancelled.append)
            return d
        if self.temporary:
            return defer.fail(LoginFailed("LOCAL: server group unavailable", temporary=True, kind="temporary"))
        if user == "alice" and password == PASSWORD:
            if self.policy_refusal:
                return defer.fail(LoginFailed("simultaneous_logins 0", kind="policy"))
            return defer.succeed(("alice", "Mail"))
        return defer.fail(LoginFailed("aaa: LOCAL: wrong password", kind="auth_failed"))


class Reply:
    """An HTTP response as a client reads it."""

    def __init__(self, raw: bytes) -> None:
        response = http.client.HTTPResponse(_Socket(raw))  # type: ignore[arg-type]
        response.begin()
        self.status = response.status
        self.headers: Message = response.msg
        self.body = response.read().decode("utf-8")

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def all(self, name: str) -> list[str]:
        return self.headers.get_all(name) or []


class _Socket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self._file


class Exchange:
    """One request sent to the site through memory; its reply once answered."""

    def __init__(self, browser: Browser, channel: Any, transport: StringTransport) -> None:
        self.browser = browser
        self.channel = channel
        self.transport = transport

    @property
    def answered(self) -> bool:
        return bool(self.transport.value())

    def reply(self) -> Reply:
        assert self.answered, "no answer yet"
        reply = Reply(self.transport.value())
        self.browser.keep_cookies(reply)
        if "text/html" in (reply.header("Content-Type") or ""):
            self.browser.last_page = reply.body
            match = re.search(r'name="csrf" value="([^"]*)"', reply.body)
            if match is not None:
                self.browser.last_token = match.group(1)
        return reply

    def disconnect(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class Browser:
    """A browser stand-in: HTTP/1.1 to the site over a memory transport from
    C{client_ip}, keeping the cookies it is given (one connection per request)."""

    def __init__(self, site: Site, client_ip: str = CLIENT) -> None:
        self.site = site
        self.client_ip = client_ip
        self.cookies: dict[str, str] = {}
        self.last_page = ""
        self.last_token = ""

    def keep_cookies(self, reply: Reply) -> None:
        for line in reply.all("Set-Cookie"):
            name, _, rest = line.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]

    def token(self) -> str:
        """The CSRF field of the last page that had a form."""
        assert self.last_token, "no page with a CSRF field yet"
        return self.last_token

    def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Exchange:
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 8443), peerAddress=IPv4Address("TCP", self.client_ip, 50123)
        )
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: portal.example:8443", "Connection: close"]
        if self.cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        if method == "POST":
            lines += ["Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
        return Exchange(self, channel, transport)

    def get(self, path: str = "/") -> Reply:
        return self.send("GET", path).reply()

    def post(
        self,
        path: str,
        fields: Iterable[tuple[str, str]] = (),
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Exchange:
        """POST C{fields} with the CSRF field of the last page (or C{token};
        C{""} sends none)."""
        form = list(fields)
        token = self.token() if token is None else token
        if token:
            form.insert(0, ("csrf", token))
        return self.send("POST", path, urlencode(form).encode("utf-8"), headers)

    def login(self, user: str = "alice", password: str = PASSWORD, **kwargs: Any) -> Exchange:
        return self.post("/login", [("user", user), ("password", password)], **kwargs)


def make_portal(
    testcase: SynchronousTestCase,
    *,
    clock: IReactorTime | None = None,
    **options: Any,
) -> tuple[PortalResource, Site, IdentityTable, FakeAAA, task.Clock]:
    fake_clock = task.Clock()
    fake_clock.advance(NOW)
    the_clock = clock if clock is not None else fake_clock
    table = IdentityTable(the_clock, TTL)
    aaa = FakeAAA()
    options.setdefault("timezone", UTC)
    portal = PortalResource(table, aaa, the_clock, **options)
    return portal, portal_site(portal, the_clock), table, aaa, fake_clock


def until(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return f"{moment:%H:%M}"


class PortalPageTests(SynchronousTestCase):
    """The pages, cookies and headers, through the real HTTP stack in memory."""

    def setUp(self) -> None:
        self.portal, self.site, self.table, self.aaa, self.clock = make_portal(self, failure_delay=1.5)
        self.browser = Browser(self.site)

    def test_loginPage(self) -> None:
        """C{GET /} for an unknown address is a real page: the project's name, what
        logging in does (the address and until when), a form with labelled fields
        and a CSRF field, a viewport and an inline stylesheet; no script, nothing
        loaded from elsewhere."""
        reply = self.browser.get()
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("Content-Type"), "text/html; charset=utf-8")
        page = reply.body
        self.assertTrue(page.startswith("<!DOCTYPE html>"))
        self.assertIn('<html lang="en">', page)
        self.assertIn('<meta name="viewport" content="width=device-width, initial-scale=1">', page)
        self.assertIn('<span class="name">mailgw</span>', page)
        self.assertIn("recognises you by your address, <strong>10.0.0.5</strong>", page)
        self.assertIn(f"until <strong>{until(NOW + TTL)}</strong> (Tuesday 12 May 2026, UTC)", page)
        self.assertIn("8 hours from now", page)
        self.assertIn('<label for="user">User name</label>', page)
        self.assertIn('<input type="text" id="user" name="user"', page)
        self.assertIn('<label for="password">Password</label>', page)
        self.assertIn('<input type="password" id="password" name="password" autocomplete="current-password"', page)
        self.assertIn('<form method="post" action="/login">', page)
        self.assertRegex(page, r'<input type="hidden" name="csrf" value="[A-Za-z0-9_-]{43}">')
        self.assertIn("<style>", page)
        self.assertNotIn("<script", page.lower())
        self.assertNotRegex(page, r'(src|href)="(https?:)?//')
        self.assertIsNone(reply.header("Server"))

    def test_cookieAttributes(self) -> None:
        """The CSRF cookie is C{Secure; HttpOnly; SameSite=Strict}, host-only
        (C{__Host-}, C{Path=/}), and sent once: a visitor keeping it gets no new one."""
        reply = self.browser.get()
        [cookie] = reply.all("Set-Cookie")
        self.assertRegex(
            cookie, r"^__Host-mailgw-csrf=[A-Za-z0-9_-]{43}; Path=/; Secure; HttpOnly; SameSite=Strict$"
        )
        self.assertEqual(self.browser.get().all("Set-Cookie"), [])

    def test_noStore(self) -> None:
        """Every page that shows an identity (and every other answer) carries
        C{Cache-Control: no-store}."""
        replies = [self.browser.get()]
        self.browser.login().reply()
        replies.append(self.browser.get())
        self.assertIn("Logged in as", replies[-1].body)
        replies.append(self._wrong())
        replies.append(self.browser.post("/logout", token="forged").reply())
        replies.append(self.browser.get("/nothing"))
        replies.append(self.browser.send("POST", "/").reply())
        self.assertEqual([r.status for r in replies], [200, 200, 403, 403, 404, 405])
        for reply in replies:
            self.assertEqual(reply.header("Cache-Control"), "no-store")
            self.assertEqual(reply.header("X-Frame-Options"), "DENY")
            self.assertIsNone(reply.header("Server"))

    def _wrong(self) -> Reply:
        exchange = self.browser.login(password="nope")
        self.clock.advance(1.5)
        return exchange.reply()

    def test_login(self) -> None:
        """The right password adds the address's entry (source portal, the group
        policy from the AAA) and the page then shows who is logged in until when."""
        self.browser.get()
        reply = self.browser.login().reply()
        self.assertEqual((reply.status, reply.header("Location")), (303, "/"))
        self.assertEqual(self.aaa.calls, [("alice", PASSWORD, CLIENT)])
        identity = self.table.lookup(CLIENT)
        assert identity is not None
        self.assertEqual(
            (identity.user, identity.source, identity.group_policy, identity.expires),
            ("alice", IdentitySource.PORTAL, "Mail", NOW + TTL),
        )
        page = self.browser.get().body
        self.assertIn(
            f"Logged in as <strong>alice</strong> until <strong>{until(NOW + TTL)}</strong> "
            "(Tuesday 12 May 2026, UTC)",
            page,
        )
        self.assertIn('<form method="post" action="/logout">', page)
        self.assertIn('<button type="submit">Log out</button>', page)

    def test_loginRenews(self) -> None:
        """Logging in again later renews the entry."""
        self.browser.get()
        self.browser.login().reply()
        self.clock.advance(3600)
        self.browser.get()
        self.browser.login().reply()
        identity = self.table.lookup(CLIENT)
        assert identity is not None
        self.assertEqual(identity.expires, NOW + 3600 + TTL)

    def test_wrongPassword(self) -> None:
        """A wrong password adds nothing and is answered after the failure delay
        with a clear error, the user name kept and the password not."""
        self.browser.get()
        exchange = self.browser.login(password="guess")
        self.clock.advance(1.49)
        self.assertFalse(exchange.answered)
        self.clock.advance(0.01)
        reply = exchange.reply()
        self.assertEqual(reply.status, 403)
        self.assertIn('role="alert" id="problem">Wrong user name or password.', reply.body)
        self.assertIn('value="alice"', reply.body)
        self.assertNotIn("guess", reply.body)
        self.assertIn('aria-invalid="true"', reply.body)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(reply.header("Cache-Control"), "no-store")
        # The form works again from the error page (same CSRF cookie).
        self.assertEqual(self.browser.login().reply().status, 303)

    def test_temporaryFailure(self) -> None:
        """A temporary AAA failure is answered at once, 503, with a generic message."""
        self.aaa.temporary = True
        self.browser.get()
        reply = self.browser.login().reply()
        self.assertEqual((reply.status, reply.header("Retry-After")), (503, "30"))
        self.assertIn("temporarily unavailable", reply.body)
        self.assertNotIn("server group", reply.body)
        self.assertEqual(len(self.table), 0)

    def test_policyRefusal(self) -> None:
        """A login the group policy refuses says so (after the failure delay)."""
        self.aaa.policy_refusal = True
        self.browser.get()
        exchange = self.browser.login()
        self.assertFalse(exchange.answered)
        self.clock.advance(1.5)
        reply = exchange.reply()
        self.assertEqual(reply.status, 403)
        self.assertIn("refused by its group policy", reply.body)
        self.assertEqual(len(self.table), 0)

    def test_logout(self) -> None:
        """Logout ends the address's entry and says so."""
        self.table.learn(CLIENT, "alice", IdentitySource.INLINE)
        self.assertIn("recognised from your mail app", self.browser.get().body)
        reply = self.browser.post("/logout").reply()
        self.assertEqual((reply.status, reply.header("Location")), (303, "/?done=logout"))
        self.assertIsNone(self.table.lookup(CLIENT))
        page = self.browser.get("/?done=logout").body
        self.assertIn("You are logged out.", page)
        self.assertIn('<form method="post" action="/login">', page)

    def test_otherAddress(self) -> None:
        """The page shows the entry of the visitor's own address only; a logout
        from another address leaves it."""
        self.table.learn(CLIENT, "alice", IdentitySource.PORTAL)
        other = Browser(self.site, "10.0.0.6")
        self.assertNotIn("alice", other.get().body)
        other.post("/logout").reply()
        self.assertIsNotNone(self.table.lookup(CLIENT))

    def assertRefused(self, exchange: Exchange) -> None:
        reply = exchange.reply()
        self.assertEqual(reply.status, 403)
        self.assertIn("<h1>This form has expired</h1>", reply.body)
        self.assertIn("Nothing was changed.", reply.body)
        self.assertIn('href="/"', reply.body)

    def test_loginWithoutToken(self) -> None:
        """A login without the CSRF field, with a wrong one, with one of another
        key, without the cookie or from another origin is refused (403, a readable
        page) before any AAA work; nothing is added."""
        self.browser.get()
        token = self.browser.token()
        self.assertRefused(self.browser.login(token=""))
        self.assertRefused(self.browser.login(token=token[:-1] + ("A" if token[-1] != "A" else "B")))
        other = Browser(make_portal(self)[1])
        other.get()
        self.assertRefused(self.browser.login(token=other.token()))
        self.assertRefused(self.browser.login(headers={"Origin": "https://evil.example"}))
        cookies = self.browser.cookies
        self.browser.cookies = {}
        self.assertRefused(self.browser.login(token=token))
        self.browser.cookies = {name: "A" * 43 for name in cookies}
        self.assertRefused(self.browser.login(token=token))
        self.assertEqual((self.aaa.calls, len(self.table)), ([], 0))
        # The genuine form, same origin, works.
        self.browser.cookies = cookies
        reply = self.browser.login(token=token, headers={"Origin": "https://portal.example:8443"}).reply()
        self.assertEqual(reply.status, 303)

    def test_logoutWithoutToken(self) -> None:
        """A logout without a valid CSRF token is refused and the entry stays."""
        self.table.learn(CLIENT, "alice", IdentitySource.PORTAL)
        self.browser.get()
        self.assertRefused(self.browser.post("/logout", token=""))
        self.assertRefused(self.browser.post("/logout", token="x" * 43))
        self.assertIsNotNone(self.table.lookup(CLIENT))

    def test_escaping(self) -> None:
        """A user name with HTML in it is shown escaped, in the page and in the
        form's value."""
        evil = '<script>alert(1)</script>"&'
        self.table.learn(CLIENT, evil, IdentitySource.MONITOR)
        page = self.browser.get().body
        self.assertIn("Logged in as <strong>&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;</strong>", page)
        self.assertNotIn("<script", page)
        exchange = self.browser.login(user='"><script>x()</script>', password="nope")
        self.clock.advance(1.5)
        reply = exchange.reply()
        self.assertIn('value="&quot;&gt;&lt;script&gt;x()&lt;/script&gt;"', reply.body)
        self.assertNotIn("<script", reply.body)

    def test_badInput(self) -> None:
        """Empty fields, control characters in the user name and oversized bodies
        are refused before any AAA work."""
        self.browser.get()
        reply = self.browser.login(user="", password="").reply()
        self.assertEqual(reply.status, 400)
        self.assertIn("Enter your user name and your password.", reply.body)
        reply = self.browser.login(user="alice\nLogin failed from 1.2.3.4").reply()
        self.assertEqual(reply.status, 400)
        reply = self.browser.login(password="x" * MAX_BODY).reply()
        self.assertEqual(reply.status, 413)
        self.assertEqual(self.aaa.calls, [])

    def test_outsidePolicy(self) -> None:
        """Outside the SSO policy the page says logging in has no effect, shows no
        form, and a login is refused without AAA work."""
        _, site, table, aaa, _ = make_portal(self, applies_to=lambda ip: ip.startswith("192.168."))
        browser = Browser(site)
        page = browser.get().body
        self.assertIn("Single sign-on does not apply to your address <strong>10.0.0.5</strong>", page)
        self.assertNotIn("<form", page)
        # A token from a page that had the form (an address inside the policy).
        inside = Browser(site, "192.168.1.2")
        inside.get()
        browser.cookies, browser.last_token = inside.cookies, inside.last_token
        self.assertEqual(browser.login().reply().status, 403)
        self.assertEqual((aaa.calls, len(table)), ([], 0))

    def test_otherPaths(self) -> None:
        """Unknown paths get a 404 page; C{GET /login} goes back to C{/}."""
        reply = self.browser.get("/nothing")
        self.assertEqual(reply.status, 404)
        self.assertIn("Page not found", reply.body)
        reply = self.browser.get("/login")
        self.assertEqual((reply.status, reply.header("Location")), (303, "/"))

    def test_disconnectCancels(self) -> None:
        """A client that goes away during the AAA check cancels it; nothing is
        added and nothing fails."""
        self.aaa.hold = True
        self.browser.get()
        exchange = self.browser.login()
        self.assertEqual(self.aaa.cancelled, [])
        exchange.disconnect()
        self.assertEqual(len(self.aaa.cancelled), 1)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_disconnectDuringDelay(self) -> None:
        """A client that goes away during the failure delay gets nothing written."""
        self.browser.get()
        exchange = self.browser.login(password="nope")
        exchange.disconnect()
        self.clock.advance(1.5)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_events(self) -> None:
        """Logins, failures and logouts are logged with C{user}, C{client_ip} and
        C{reason} (a failure as the proxies' C{login_failed}); the password never
        appears in any event."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        self.browser.get()
        exchange = self.browser.login(password="wrong-" + PASSWORD)
        self.clock.advance(1.5)
        exchange.reply()
        self.browser.login().reply()
        self.browser.post("/logout").reply()
        self.browser.login(token="").reply()
        kinds = [e.get("event") for e in events]
        self.assertEqual(kinds, ["login_failed", "portal_login", "portal_logout", "portal_refused"])
        failed = events[0]
        self.assertEqual(
            (failed["user"], failed["client_ip"], failed["reason"], failed["protocol"]),
            ("alice", CLIENT, "aaa: LOCAL: wrong password", "portal"),
        )
        self.assertRegex(
            formatEvent(failed),
            r"^Login failed from 10\.0\.0\.5 for alice \(portal, session [0-9a-f]+\): aaa: LOCAL: wrong password$",
        )
        self.assertEqual((events[1]["user"], events[1]["client_ip"]), ("alice", CLIENT))
        self.assertEqual((events[2]["user"], events[2]["reason"]), ("alice", "logout"))
        self.assertEqual(events[3]["reason"], "no CSRF token")
        for event in events:
            self.assertNotIn(PASSWORD, formatEvent(event))
            self.assertNotIn(PASSWORD, repr(event))


@implementer(IOpenSSLServerConnectionCreator)
class _UnusedTLS:
    """A connection creator no connection ever asks (the endpoint tests do not listen)."""

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        raise AssertionError("not connected")


class EndpointTests(SynchronousTestCase):
    """L{portal_service}'s endpoint descriptions."""

    def setUp(self) -> None:
        self.site = make_portal(self)[1]

    def listener(self, description: str) -> Any:
        service = portal_service(description, self.site, reactor, _UnusedTLS())
        assert isinstance(service, AdminListener)
        return service

    def test_accepted(self) -> None:
        """C{ssl:} (the configuration's syntax), C{tcp:} and C{tcp6:} name the port,
        interface and backlog."""
        for description, interface, port in [
            ("ssl:8443:interface=127.0.0.1", "127.0.0.1", 8443),
            (r"tcp:port=8443:interface=\:\:1:backlog=10", "::1", 8443),
            ("ssl:443", "", 443),
            ("tcp6:8443", "::", 8443),
        ]:
            endpoint = self.listener(description).endpoint._endpoint
            self.assertEqual((endpoint._interface, endpoint._port), (interface, port), description)

    def test_refused(self) -> None:
        """Certificate parameters (the portal presents the gateway's certificate),
        unknown parameters or kinds and bad ports are refused with the reason."""
        for description, fragment in [
            ("ssl:8443:privateKey=k.pem", "privateKey is not used"),
            ("ssl:8443:bogus=1", "unknown parameter 'bogus'"),
            ("unix:/tmp/x", "must be ssl:PORT"),
            ("ssl:99999", "port must be 0..65535"),
            ("ssl:8443:9443", "only the port"),
        ]:
            e = self.assertRaises(PortalEndpointError, portal_service, description, self.site, reactor, _UnusedTLS())
            self.assertIn(fragment, str(e))


def port_number(service: AdminListener) -> int:
    assert service.port is not None
    host = service.port.getHost()
    assert isinstance(host, IPv4Address)
    return host.port


class PortalOverTLSTests(TestCase):
    """The portal over real TLS on loopback with the gateway's L{ServerTLS}."""

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        cert, key = self.pki.server_cert()
        self.tls = ServerTLS(Path(cert), Path(key))
        self.portal, self.site, self.table, self.aaa, _ = make_portal(self, clock=reactor, failure_delay=0.01)
        service = portal_service("ssl:0:interface=127.0.0.1", self.site, reactor, self.tls)
        assert isinstance(service, AdminListener)
        self.service = service
        service.startService()
        self.addCleanup(service.stopService)
        self.base = f"https://127.0.0.1:{port_number(service)}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        ca = Certificate.loadPEM(Path(self.pki.ca_path).read_bytes())
        self.agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca), pool=pool)

    async def request(
        self, method: bytes, path: str, cookie: str = "", body: bytes = b""
    ) -> tuple[int, Headers, str]:
        headers = Headers()
        if cookie:
            headers.addRawHeader(b"cookie", cookie.encode())
        producer = None
        if body:
            from twisted.web.client import FileBodyProducer

            headers.addRawHeader(b"content-type", b"application/x-www-form-urlencoded")
            producer = FileBodyProducer(io.BytesIO(body))
        response = await self.agent.request(method, (self.base + path).encode(), headers, producer)
        return response.code, response.headers, (await readBody(response)).decode()

    async def test_loginOverTLS(self) -> None:
        """A client verifying the gateway's certificate gets the page, logs in with
        its cookie and token, and then sees itself logged in."""
        code, headers, page = await self.request(b"GET", "/")
        self.assertEqual(code, 200)
        [set_cookie] = headers.getRawHeaders(b"set-cookie", [])
        cookie = set_cookie.decode().split(";", 1)[0]
        self.assertTrue(cookie.startswith(CSRF_COOKIE.decode() + "="))
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match is not None
        form = urlencode([("csrf", match.group(1)), ("user", "alice"), ("password", PASSWORD)]).encode()
        code, headers, _ = await self.request(b"POST", "/login", cookie, form)
        self.assertEqual((code, headers.getRawHeaders(b"location")), (303, [b"/"]))
        self.assertEqual(self.aaa.calls, [("alice", PASSWORD, "127.0.0.1")])
        code, headers, page = await self.request(b"GET", "/", cookie)
        self.assertIn("Logged in as <strong>alice</strong>", page)
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])


# -- headless Chromium ------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_facts(data: bytes) -> tuple[int, int, int]:
    """C{(width, height, distinct byte values of the pixel data)} of a PNG."""
    assert data.startswith(PNG_SIGNATURE), "not a PNG"
    offset, width, height, pixels = 8, 0, 0, b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        chunk = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            pixels += chunk
        offset += 12 + length
    return width, height, len(set(zlib.decompress(pixels)))


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output = (self.output + data)[-8192:]

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


class _RecordingPortal(PortalResource):
    def render_GET(self, request: Request) -> int:
        self.agents: list[bytes | None]
        self.agents = [*getattr(self, "agents", []), request.getHeader(b"user-agent")]
        return super().render_GET(request)


class ChromiumTests(TestCase):
    """The page as headless Chromium renders it, at a phone's and a desktop's size.

    The screenshots stay in the test's temporary folder (and are copied to
    C{$MAILGW_SCREENSHOTS} when set) for review."""

    timeout = 90

    def setUp(self) -> None:
        self.chromium = require_binary("chromium", "chromium")
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir(parents=True)
        pki = TestPKI(self.folder / "pki")
        cert, key = pki.server_cert()
        self.table = IdentityTable(reactor, TTL)
        self.aaa = FakeAAA()
        self.portal = _RecordingPortal(self.table, self.aaa, reactor)
        service = portal_service(
            "ssl:0:interface=127.0.0.1", portal_site(self.portal, reactor), reactor, ServerTLS(Path(cert), Path(key))
        )
        assert isinstance(service, AdminListener)
        service.startService()
        self.addCleanup(service.stopService)
        self.url = f"https://127.0.0.1:{port_number(service)}/"

    async def screenshot(self, name: str, url: str, width: int, height: int) -> Path:
        target = self.folder / f"{name}.png"
        argv = [
            self.chromium,
            "--headless=new",
            f"--screenshot={target}",
            f"--window-size={width},{height}",
            "--ignore-certificate-errors",
            "--hide-scrollbars",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={self.folder / 'profile'}",
            *(["--no-sandbox"] if is_root() else []),
            url,
        ]
        env = {**os.environ, "HOME": str(self.folder)}
        protocol = _Collect()
        process = reactor.spawnProcess(protocol, self.chromium, argv, env=env)  # type: ignore[attr-defined]
        killer = reactor.callLater(30, process.signalProcess, "KILL")  # type: ignore[attr-defined]
        code = await protocol.ended
        if killer.active():
            killer.cancel()
        self.assertEqual(code, 0, protocol.output.decode("utf-8", "replace"))
        data = target.read_bytes()
        got_width, got_height, distinct = png_facts(data)
        self.assertEqual((got_width, got_height), (width, height))
        # A blank or error page compresses to almost nothing and has a handful of
        # byte values; the portal has text, a card, a button.
        self.assertGreater(len(data), 10_000)
        self.assertGreater(distinct, 64)
        copy = os.environ.get("MAILGW_SCREENSHOTS")
        if copy:
            Path(copy).mkdir(parents=True, exist_ok=True)
            shutil.copy(target, Path(copy) / target.name)
        return target

    async def test_screenshots(self) -> None:
        """The login page at 390x844 (a phone) and 1280x800 (a desktop), served to
        Chromium over TLS, and on the phone the logged-in page with the error of a
        wrong password ("log in as someone else"): PNGs of the window's size with
        real content."""
        await self.screenshot("portal-login-phone", self.url, 390, 844)
        await self.screenshot("portal-login-desktop", self.url, 1280, 800)
        self.assertEqual(len(self.portal.agents), 2)
        self.assertTrue(all(b"HeadlessChrome" in (agent or b"") for agent in self.portal.agents))
        # The answer to a POST (which --screenshot cannot send), saved as a file.
        _, site, table, _, clock = make_portal(self)
        table.learn(CLIENT, "alice", IdentitySource.PORTAL, group_policy="Mail")
        browser = Browser(site)
        browser.get()
        exchange = browser.login(user="bob", password="nope")
        clock.advance(1.0)
        body = exchange.reply().body
        self.assertIn("Logged in as <strong>alice</strong>", body)
        self.assertIn("Wrong user name or password.", body)
        page = self.folder / "logged-in-wrong-password.html"
        page.write_text(body)
        await self.screenshot("portal-logged-in-error-phone", page.as_uri(), 390, 844)
