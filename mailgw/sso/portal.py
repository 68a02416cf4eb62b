"""The SSO portal [7]: an HTTPS login page where a user tells the network who is at
their address.

A user logs in with the AAA of the POP3S proxy; the login adds (or renews) the entry
of the client's address in the L{IdentityTable} with the source C{portal}, which is the
"web session" that piggyback authentication [4.3] requires.  The page shows who is
logged in from the visitor's address and until when, and offers a logout that ends the
entry at once.

Pieces:

  - L{PortalResource}: the resource tree (C{GET /} the page, C{POST /login},
    C{POST /logout}); every page is complete HTML with an inline stylesheet (no
    external resources, no JavaScript), readable on a phone and a desktop.
  - L{portal_site}: the L{Site} serving it (no tracebacks, no server banner, request
    bodies bounded, security headers on every answer, no access log).
  - L{portal_service}: the listening service, TLS through the context factory given
    (the gateway's own certificate).

Security: a signed double-submit CSRF token (a random nonce in a
C{Secure; HttpOnly; SameSite=Strict} cookie, the HMAC of it under a key in a hidden
form field, compared in constant time), a cross-origin C{Origin} is refused as well;
C{Cache-Control: no-store} on every answer; everything shown is HTML-escaped.  A
wrong password is answered after C{failure_delay} seconds on the injected clock; a
temporary AAA failure at once.  Passwords are never logged: the events carry C{user},
C{client_ip} and C{reason} only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import io
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailgw.config import split_endpoint
from mailgw.metrics import AdminListener
from mailgw.proxy.gatekeeper import LoginFailed
from mailgw.sso.identity import Identity, IdentitySource, IdentityTable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "CSRF_COOKIE",
    "MAX_BODY",
    "Authenticate",
    "PortalEndpointError",
    "PortalResource",
    "portal_service",
    "portal_site",
]

#: C{(user, password, client_ip)} → C{(user name, group policy name)}; raises
#: L{LoginFailed} (its C{temporary} tells a temporary failure).
Authenticate = Callable[[str, str, str], Awaitable[tuple[str, str | None]]]

#: the CSRF cookie; the C{__Host-} prefix makes browsers insist on C{Secure},
#: C{Path=/} and no C{Domain}, so no other host can plant it
CSRF_COOKIE = b"__Host-mailgw-csrf"
_CSRF_FIELD = b"csrf"
_NONCE = re.compile(rb"\A[A-Za-z0-9_-]{43}\Z")  # secrets.token_urlsafe(32)

#: bytes of a request body kept; a bigger body is answered 413 (and not stored)
MAX_BODY = 16 * 1024
_MAX_USER = 256
_MAX_PASSWORD = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_STYLE = """\
:root{color-scheme:light dark;--fg:#1b2330;--muted:#566070;--bg:#eef1f5;--card:#fff;\
--line:#cfd6df;--accent:#0b5cad;--on-accent:#fff;--err:#8f1d12;--err-bg:#fdecea;\
--ok:#1c5a2b;--ok-bg:#e6f3e9}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ee;--muted:#a7b0bc;--bg:#13171d;\
--card:#1d232b;--line:#39424e;--accent:#6aa9f2;--on-accent:#0a1422;--err:#ffb6ab;\
--err-bg:#3b1d19;--ok:#a8e2b6;--ok-bg:#17301f}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);\
font:1rem/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif}
main{max-width:30rem;margin:0 auto;padding:1.25rem 1rem 2.5rem}
.brand{display:flex;align-items:center;gap:.75rem;margin:.25rem 0 1.25rem}
.mark{flex:none;width:2.5rem;height:2.5rem;border-radius:.6rem;background:var(--accent);\
position:relative}
.mark::before{content:"";position:absolute;left:.5rem;right:.5rem;top:.75rem;bottom:.75rem;\
border:2px solid var(--on-accent);border-radius:2px}
.mark::after{content:"";position:absolute;left:.9rem;top:.45rem;width:.7rem;height:.7rem;\
border-right:2px solid var(--on-accent);border-bottom:2px solid var(--on-accent);\
transform:rotate(45deg)}
.name{display:block;font-size:1.35rem;font-weight:700;letter-spacing:.02em;line-height:1.1}
.tagline{display:block;color:var(--muted);font-size:.875rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:.8rem;\
padding:1.25rem;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h1{font-size:1.375rem;line-height:1.25;margin:0 0 .75rem}
p{margin:0 0 .9rem}
.lead{color:var(--muted)}
.notice{border-radius:.5rem;padding:.75rem 1rem;margin:0 0 1rem;border-left:4px solid}
.error{background:var(--err-bg);color:var(--err);border-color:var(--err)}
.ok{background:var(--ok-bg);color:var(--ok);border-color:var(--ok)}
.who{font-size:1.125rem;overflow-wrap:anywhere}
label{display:block;font-weight:600;margin:1rem 0 .35rem}
input[type=text],input[type=password]{display:block;width:100%;font:inherit;\
padding:.7rem .8rem;min-height:2.75rem;color:var(--fg);background:var(--bg);\
border:1px solid var(--line);border-radius:.5rem}
input[aria-invalid=true]{border-color:var(--err)}
button,.button{display:block;width:100%;margin-top:1.25rem;padding:.75rem 1rem;\
min-height:2.75rem;font:inherit;font-weight:600;text-align:center;text-decoration:none;\
color:var(--on-accent);background:var(--accent);border:1px solid var(--accent);\
border-radius:.5rem;cursor:pointer}
.secondary{color:var(--accent);background:transparent}
input:focus-visible,button:focus-visible,a:focus-visible,summary:focus-visible{\
outline:3px solid var(--accent);outline-offset:2px}
a{color:var(--accent)}
details{margin-top:1.25rem;border-top:1px solid var(--line);padding-top:1rem}
summary{cursor:pointer;font-weight:600;color:var(--accent)}
.small{color:var(--muted);font-size:.875rem;margin:1rem 0 0}
@media (min-width:48rem){main{padding-top:4rem}.card{padding:2rem}h1{font-size:1.6rem}}
"""

_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode("utf-8")).digest()).decode("ascii")

#: on every answer (the Site's requests set them; the resource sets them on its pages)
_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    # Every page shows an identity or carries a CSRF token: never stored anywhere.
    (b"Cache-Control", b"no-store"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"same-origin"),
    (
        b"Content-Security-Policy",
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'".encode("ascii"),
    ),
)

_WRONG_CREDENTIALS = "Wrong user name or password. Check both (and the keyboard's Caps Lock) and try again."
_TEMPORARY = (
    "Logging in is not possible right now: the sign-in service is temporarily unavailable. "
    "Please try again in a minute."
)
_POLICY = (
    "Your user name and password are right, but your account may not log in here "
    "(refused by its group policy). Ask your administrator."
)
_EMPTY = "Enter your user name and your password."
_BAD_INPUT = "The user name or password contains characters that are not allowed, or is too long."


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _duration(seconds: float) -> str:
    """C{28800} → C{"8 hours"}, C{5400} → C{"1 hour 30 minutes"}."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} second{'s' if total != 1 else ''}"
    hours, minutes = divmod(total // 60, 60)
    parts = []
    if hours:
        parts.append(f"{hours} hour{'s' if hours != 1 else ''}")
    if minutes:
        parts.append(f"{minutes} minute{'s' if minutes != 1 else ''}")
    return " ".join(parts)


def _document(title: str, content: str) -> bytes:
    """A complete page: the project's name, C{title}, C{content} (already escaped)."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{_escape(title)} · mailgw</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<header class="brand"><span class="mark" aria-hidden="true"></span>\
<span><span class="name">mailgw</span><span class="tagline">E-mail security gateway · network sign-in</span></span>\
</header>
<div class="card">
{content}
</div>
</main>
</body>
</html>
""".encode()


class _BoundedBody(io.BytesIO):
    """A request body kept up to C{limit} bytes; beyond, it is dropped (and
    C{overflowed} set), so a client cannot make the portal store more."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflowed = False

    def write(self, data: ReadableBuffer, /) -> int:
        size = memoryview(data).nbytes
        if self.overflowed:
            return size
        if self.tell() + size > self.limit:
            self.overflowed = True
            self.seek(0)
            self.truncate()
            return size
        return super().write(data)


class _Exchange:
    """One POST being answered: whether its client went away meanwhile."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.gone = False


class PortalEndpointError(ValueError):
    """The portal's endpoint description is unusable (the message says why)."""


class PortalResource(Resource):
    """The portal: C{GET /} the page (the login form, or who is logged in from the
    visitor's address and until when, with a logout button), C{POST /login} and
    C{POST /logout}.  Successful POSTs answer C{303 See Other} to C{/}.

    Status codes: a wrong password 403 (after C{failure_delay}), a refusal by the
    group policy 403, a temporary AAA failure 503 (at once), a missing or wrong CSRF
    token or a cross-origin C{Origin} 403, missing fields 400, a body over
    L{MAX_BODY} 413, an address outside the SSO policy 403.  Every answer is a
    readable page.

    @ivar log: login, logout and failure events (fields C{user}, C{client_ip},
        C{reason}; a failed login is C{event="login_failed"} as the proxies'
        events, so fail2ban can count it).
    """

    log = Logger()

    def __init__(
        self,
        identities: IdentityTable,
        authenticate: Authenticate,
        clock: IReactorTime,
        *,
        failure_delay: float = 1.0,
        csrf_key: bytes | None = None,
        applies_to: Callable[[str], bool] | None = None,
        timezone: tzinfo | None = None,
    ) -> None:
        """
        @param identities: where a login adds (and a logout removes) the entry of
            the client's address, with the source C{portal}.
        @param authenticate: the AAA check, C{(user, password, client_ip)} →
            C{(user name, group policy name)}, raising L{LoginFailed}.
        @param clock: the time shown and of the failure delay.
        @param failure_delay: seconds before a wrong-password answer.
        @param csrf_key: the key of the CSRF tokens' HMAC; C{None}: random, so a
            page served before a restart must be reloaded.  Several processes
            serving one portal must share it.
        @param applies_to: whether SSO applies to a client address
            (C{SSOConfig.applies_to}); outside it the page says that logging in has
            no effect and a login is refused before any AAA work.  C{None}: every
            address.
        @param timezone: the zone of the times shown; C{None}: the machine's local
            time.
        """
        super().__init__()
        self._identities = identities
        self._authenticate = authenticate
        self._clock = clock
        self._failure_delay = failure_delay
        self._csrf_key = csrf_key if csrf_key is not None else secrets.token_bytes(32)
        self._applies_to = applies_to
        self._timezone = timezone
        self.putChild(b"login", _Action(self, self._login))
        self.putChild(b"logout", _Action(self, self._logout))

    # -- resource tree -------------------------------------------------------------------

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" and not request.postpath:
            return self
        return _NotFound()

    def render_GET(self, request: Request) -> int:
        nonce = self._nonce(request)
        notice = ""
        if request.args.get(b"done") == [b"logout"]:
            notice = '<p class="notice ok" role="status">You are logged out.</p>'
        self._send(request, http.OK, self._page(request, nonce, notice=notice))
        return NOT_DONE_YET

    # -- CSRF ----------------------------------------------------------------------------

    def _token(self, nonce: bytes) -> bytes:
        mac = hmac.new(self._csrf_key, b"mailgw-portal-csrf\x00" + nonce, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=")

    def _nonce(self, request: Request) -> bytes:
        """The visitor's CSRF nonce: the cookie's, or a new one set now."""
        nonce = request.received_cookies.get(CSRF_COOKIE)
        if nonce is not None and _NONCE.match(nonce):
            return nonce
        nonce = secrets.token_urlsafe(32).encode("ascii")
        # Built by hand: Twisted's addCookie writes "SameSite=strict".
        request.responseHeaders.addRawHeader(
            b"Set-Cookie", CSRF_COOKIE + b"=" + nonce + b"; Path=/; Secure; HttpOnly; SameSite=Strict"
        )
        return nonce

    def _csrf_problem(self, request: Request) -> str | None:
        """Why a POST is refused as a possible cross-site request, or C{None}."""
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        if origin is not None and origin != b"null" and host is not None:
            if origin.lower() != b"https://" + host.lower():
                return "cross-origin request"
        nonce = request.received_cookies.get(CSRF_COOKIE)
        if nonce is None or not _NONCE.match(nonce):
            return "no CSRF cookie"
        field = request.args.get(_CSRF_FIELD, [b""])[0]
        if not field:
            return "no CSRF token"
        if not hmac.compare_digest(field, self._token(nonce)):
            return "wrong CSRF token"
        return None

    # -- answers -------------------------------------------------------------------------

    def _client_ip(self, request: Request) -> str:
        return str(getattr(request.getClientAddress(), "host", ""))

    def _when(self, timestamp: float) -> tuple[str, str]:
        """C{("18:30", "Tuesday 12 May 2026, CEST")} in the portal's time zone."""
        if self._timezone is not None:
            moment = datetime.fromtimestamp(timestamp, tz=self._timezone)
        else:
            moment = datetime.fromtimestamp(timestamp).astimezone()
        date = f"{moment:%A} {moment.day} {moment:%B %Y}"
        zone = moment.tzname()
        return f"{moment:%H:%M}", f"{date}, {zone}" if zone else date

    def _send(self, request: Request, code: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        request.setResponseCode(code)
        for name, value in (*_HEADERS, (b"Content-Type", b"text/html; charset=utf-8"), *headers):
            request.setHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _page(
        self,
        request: Request,
        nonce: bytes,
        *,
        error: str = "",
        notice: str = "",
        user: str = "",
    ) -> bytes:
        """The portal page for the visitor's address: who is logged in (with
        logout and a form to log in as someone else), or the login form."""
        ip = self._client_ip(request)
        token = _escape(self._token(nonce).decode("ascii"))
        hidden = f'<input type="hidden" name="csrf" value="{token}">'
        if self._applies_to is not None and not self._applies_to(ip):
            return _document(
                "Not available",
                "<h1>Network sign-in is not available here</h1>\n"
                f'<p class="notice error" role="alert">Single sign-on does not apply to your address '
                f"<strong>{_escape(ip)}</strong>, so logging in here would have no effect. "
                "Ask your administrator if you expected otherwise.</p>",
            )
        identity = self._identities.lookup(ip)
        if error:
            notice = f'<p class="notice error" role="alert" id="problem">{_escape(error)}</p>'
        if identity is None:
            time, date = self._when(self._clock.seconds() + self._identities.ttl)
            return _document(
                "Log in",
                "<h1>Log in to the network</h1>\n"
                f"{notice}\n"
                '<p class="lead">Log in with your e-mail account: your network then recognises you by '
                f"your address, <strong>{_escape(ip)}</strong>, until <strong>{time}</strong> "
                f"({_escape(date)}) — {_duration(self._identities.ttl)} from now, or until you log out. "
                "Web access then needs no further login, and your mail app only your mail password.</p>\n"
                + self._login_form(hidden, user=user, invalid=bool(error)),
            )
        time, date = self._when(identity.expires)
        how = (
            "logged in on this page"
            if identity.source is IdentitySource.PORTAL
            else "recognised from your mail app's login"
        )
        return _document(
            "Logged in",
            f"<h1>You are logged in</h1>\n{notice}\n"
            f'<p class="notice ok who" role="status">Logged in as <strong>{_escape(identity.user)}</strong> '
            f"until <strong>{time}</strong> ({_escape(date)})</p>\n"
            f'<p class="lead">Your network recognises you by your address, <strong>{_escape(ip)}</strong>, '
            f"until {time} ({_escape(how)}). Logging in again renews it; logging out ends it now. "
            "Log out before you leave a shared device.</p>\n"
            f'<form method="post" action="/logout">{hidden}<button type="submit">Log out</button></form>\n'
            f"<details{' open' if error else ''}><summary>Not {_escape(identity.user)}? Log in as someone else"
            f"</summary>\n{self._login_form(hidden, user=user, invalid=bool(error), secondary=True)}</details>",
        )

    def _login_form(self, hidden: str, *, user: str, invalid: bool, secondary: bool = False) -> str:
        described = ' aria-invalid="true" aria-describedby="problem"' if invalid else ""
        button = ' class="secondary"' if secondary else ""
        return (
            f'<form method="post" action="/login">{hidden}\n'
            '<label for="user">User name</label>\n'
            f'<input type="text" id="user" name="user" value="{_escape(user)}" autocomplete="username" '
            f'autocapitalize="none" autocorrect="off" spellcheck="false" maxlength="{_MAX_USER}" '
            f"required{described}>\n"
            '<label for="password">Password</label>\n'
            '<input type="password" id="password" name="password" autocomplete="current-password" '
            f'maxlength="{_MAX_PASSWORD}" required{described}>\n'
            f'<button type="submit"{button}>Log in</button>\n'
            "</form>"
        )

    def _refuse(self, request: Request, reason: str) -> None:
        """A POST that may be cross-site: 403 and a page that explains the way out."""
        self.log.warn(
            "Portal request from {client_ip} refused: {reason}",
            event="portal_refused",
            client_ip=self._client_ip(request),
            reason=reason,
        )
        self._send(
            request,
            http.FORBIDDEN,
            _document(
                "Form expired",
                "<h1>This form has expired</h1>\n"
                '<p class="notice error" role="alert">The form you sent did not come from this page, '
                "or its security cookie was missing. Nothing was changed.</p>\n"
                "<p>Open the login page again and retry. Your browser must accept cookies from this "
                'site.</p>\n<a class="button" href="/">Back to the login page</a>',
            ),
        )

    def _redirect(self, request: Request, location: bytes) -> None:
        self._send(
            request,
            http.SEE_OTHER,
            _document("Done", '<p>Done. <a href="/">Continue</a>.</p>'),
            ((b"Location", location),),
        )

    # -- actions -------------------------------------------------------------------------

    async def _login(self, exchange: _Exchange) -> None:
        request = exchange.request
        ip = self._client_ip(request)
        nonce = request.received_cookies[CSRF_COOKIE]
        user_bytes = request.args.get(b"user", [b""])[0]
        password_bytes = request.args.get(b"password", [b""])[0]
        try:
            user = user_bytes.decode("utf-8").strip()
            password = password_bytes.decode("utf-8")
        except UnicodeDecodeError:
            self._send(request, http.BAD_REQUEST, self._page(request, nonce, error=_BAD_INPUT))
            return
        if not user or not password:
            self._send(request, http.BAD_REQUEST, self._page(request, nonce, error=_EMPTY, user=user))
            return
        if len(user) > _MAX_USER or len(password) > _MAX_PASSWORD or _CONTROL.search(user):
            # Control characters could forge log lines: refused before any AAA work.
            self._send(request, http.BAD_REQUEST, self._page(request, nonce, error=_BAD_INPUT))
            return
        if self._applies_to is not None and not self._applies_to(ip):
            self._failed(request, user, ip, "client address outside sso.pop3.policy", temporary=False)
            self._send(request, http.FORBIDDEN, self._page(request, nonce))
            return
        try:
            name, group_policy = await self._authenticate(user, password, ip)
        except LoginFailed as e:
            self._failed(request, user, ip, e.reason, temporary=e.temporary)
            if e.temporary:
                self._send(
                    request,
                    http.SERVICE_UNAVAILABLE,
                    self._page(request, nonce, error=_TEMPORARY, user=user),
                    ((b"Retry-After", b"30"),),
                )
                return
            await deferLater(self._clock, self._failure_delay)
            if exchange.gone:
                return
            message = _POLICY if e.kind == "policy" else _WRONG_CREDENTIALS
            self._send(request, http.FORBIDDEN, self._page(request, nonce, error=message, user=user))
            return
        if exchange.gone:
            # The answer cannot be seen: the user will retry, and a login nobody saw
            # succeed should not silently identify the address.
            return
        identity = self._identities.learn(ip, name, IdentitySource.PORTAL, group_policy=group_policy)
        self.log.info(
            "Portal login of {user} from {client_ip} until {expires} (group policy {group_policy})",
            event="portal_login",
            protocol="portal",
            user=identity.user,
            client_ip=ip,
            group_policy=group_policy,
            expires=identity.expires,
        )
        self._redirect(request, b"/")

    async def _logout(self, exchange: _Exchange) -> None:
        request = exchange.request
        ip = self._client_ip(request)
        ended: Identity | None = self._identities.remove(ip)
        if ended is not None:
            self.log.info(
                "Portal logout of {user} from {client_ip}",
                event="portal_logout",
                protocol="portal",
                user=ended.user,
                client_ip=ip,
                reason="logout",
            )
        self._redirect(request, b"/?done=logout")

    def _failed(self, request: Request, user: str, ip: str, reason: str, *, temporary: bool) -> None:
        # The proxies' wording and fields: one fail2ban filter reads both [4.10].
        self.log.info(
            "Login failed from {client_ip} for {user} ({protocol}, session {session_id}): {reason}",
            event="login_failed",
            protocol="portal",
            session_id=secrets.token_hex(4),
            client_ip=ip,
            user=user,
            reason=reason,
            temporary=temporary,
        )

    def _post(self, action: Callable[[_Exchange], Awaitable[None]], request: Request) -> int:
        """Check the POST (size, CSRF), then run C{action}; a client that goes away
        cancels whatever the action waits for (AAA work, the failure delay)."""
        content = request.content
        if isinstance(content, _BoundedBody) and content.overflowed:
            self._send(
                request,
                http.REQUEST_ENTITY_TOO_LARGE,
                _document("Too large", '<h1>Request too large</h1>\n<p><a href="/">Back to the login page</a></p>'),
            )
            return NOT_DONE_YET
        problem = self._csrf_problem(request)
        if problem is not None:
            self._refuse(request, problem)
            return NOT_DONE_YET
        exchange = _Exchange(request)

        async def run() -> None:
            await action(exchange)

        d = defer.Deferred.fromCoroutine(run())

        def gone(reason: Failure) -> None:
            exchange.gone = True
            d.cancel()

        request.notifyFinish().addErrback(gone)
        d.addErrback(self._unexpected, exchange)
        return NOT_DONE_YET

    def _unexpected(self, reason: Failure, exchange: _Exchange) -> None:
        if exchange.gone and reason.check(defer.CancelledError):
            return
        self.log.failure(
            "Portal request from {client_ip} failed",
            failure=reason,
            client_ip=self._client_ip(exchange.request),
        )
        if not exchange.gone and not exchange.request.finished:
            self._send(
                exchange.request,
                http.INTERNAL_SERVER_ERROR,
                _document(
                    "Error",
                    '<h1>Something went wrong</h1>\n<p class="notice error" role="alert">The portal could not '
                    'answer. Please try again.</p>\n<a class="button" href="/">Back to the login page</a>',
                ),
            )


class _Action(Resource):
    """C{/login} or C{/logout}: POST runs the portal's action; GET goes back to C{/}."""

    isLeaf = True

    def __init__(self, portal: PortalResource, action: Callable[[_Exchange], Awaitable[None]]) -> None:
        super().__init__()
        self._portal = portal
        self._action = action

    def render_POST(self, request: Request) -> int:
        return self._portal._post(self._action, request)

    def render_GET(self, request: Request) -> int:
        self._portal._redirect(request, b"/")
        return NOT_DONE_YET


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        for name, value in (*_HEADERS, (b"Content-Type", b"text/html; charset=utf-8")):
            request.setHeader(name, value)
        return _document(
            "Not found",
            '<h1>Page not found</h1>\n<p><a class="button" href="/">Go to the login page</a></p>',
        )


class _PortalRequest(Request):
    """No server banner; the security headers on every answer (Twisted's own
    error pages included)."""

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        if name in (b"Server", "Server", b"server", "server"):
            return
        super().setHeader(name, value)

    def process(self) -> None:
        for name, value in _HEADERS:
            self.setHeader(name, value)
        super().process()


class _PortalSite(Site):
    requestFactory = _PortalRequest
    displayTracebacks = False

    def getContentFile(self, length: int | None) -> _BoundedBody:
        return _BoundedBody(MAX_BODY)

    def log(self, request: Any) -> None:
        # The portal logs its own events (logins, logouts, failures), never URLs.
        pass


def portal_site(resource: PortalResource, reactor: IReactorTime, *, timeout: float = 60) -> Site:
    """The site serving C{resource}: no tracebacks shown, no C{Server} header,
    request bodies bounded (L{MAX_BODY}), C{timeout} seconds of idleness close a
    connection (on C{reactor}'s clock), no access log."""
    site = _PortalSite(resource, reactor=reactor, timeout=timeout)
    site.displayTracebacks = False
    site.noisy = False
    return site


def _listen_address(description: str) -> tuple[int, str, int]:
    """C{(port, interface, backlog)} of a portal endpoint description."""
    parts = split_endpoint(description)
    kind, arguments = parts[0], parts[1:]
    if kind not in ("ssl", "tcp", "tcp6"):
        raise PortalEndpointError(
            f"portal endpoint must be ssl:PORT[:interface=ADDRESS] (or tcp:/tcp6:), got {description!r}"
        )
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for argument in arguments:
        name, sep, value = argument.partition("=")
        if not sep:
            positional.append(argument)
        elif name in ("port", "interface", "backlog"):
            keywords[name] = value
        elif name in ("privateKey", "certKey", "extraCertChain", "sslmethod", "dhParameters"):
            raise PortalEndpointError(
                f"portal endpoint {description!r}: {name} is not used: the portal presents the "
                "gateway's [tls] certificate; remove it"
            )
        else:
            raise PortalEndpointError(f"portal endpoint {description!r}: unknown parameter {name!r}")
    if len(positional) > 1:
        raise PortalEndpointError(f"portal endpoint {description!r}: only the port may be given without a name")
    port = positional[0] if positional else keywords.get("port", "")
    backlog = keywords.get("backlog", "50")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise PortalEndpointError(f"portal endpoint {description!r}: port must be 0..65535, got {port!r}")
    if not (backlog.isascii() and backlog.isdigit() and int(backlog) > 0):
        raise PortalEndpointError(f"portal endpoint {description!r}: backlog must be a positive number")
    interface = keywords.get("interface", "::" if kind == "tcp6" else "")
    return int(port), interface, int(backlog)


def portal_service(
    endpoint_description: str,
    site: Site,
    reactor: Any,
    tls_context_factory: IOpenSSLServerConnectionCreator | IOpenSSLContextFactory,
) -> IService:
    """The service serving C{site} over TLS on C{endpoint_description}.

    Accepted: C{ssl:PORT[:interface=ADDRESS][:backlog=N]} (the configuration's
    syntax), and the same with C{tcp:} or C{tcp6:}; the port may also be given as
    C{port=N}.  Either way the connections are TLS with C{tls_context_factory}
    (e.g. the gateway's L{ServerTLS<mailgw.tls.ServerTLS>}, or a creator that
    follows reloads): C{privateKey}, C{certKey} and the other certificate
    parameters of Twisted's C{ssl:} endpoint are refused.  An interface with a
    colon listens on IPv6; none listens on every IPv4 address (as Twisted's C{ssl:}).

    The service fails its start when the port cannot be bound, closes its open
    connections when stopped, and tells the bound port as C{.port}.

    @raise PortalEndpointError: the description is unusable.
    """
    port, interface, backlog = _listen_address(endpoint_description)
    endpoint: IStreamServerEndpoint
    if ":" in interface:
        endpoint = TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=interface)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface)
    factory = TLSMemoryBIOFactory(tls_context_factory, False, site)
    return AdminListener(
        endpoint,
        factory,
        name="sso/portal",
        description=f"SSO portal ({endpoint_description}, TLS)",
    )
