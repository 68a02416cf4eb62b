"""What the three proxies share: the pre-login session protocol, its timers and error
counting, STARTTLS with the pipelining discard, the login pipeline and the switch to the
relay.  Each protocol module subclasses L{ProxySession} with its own dialogue (driving a
pure parser from L{mailgw.wire}) and answers.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import replace
from typing import ClassVar

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.auth.radius import AccountingSession, TerminateCause
from mailgw.config import GroupPolicy
from mailgw.proxy.directory import DirectoryUnavailable
from mailgw.proxy.environment import InputBuffer, ProxyEnvironment
from mailgw.proxy.gatekeeper import LoginFailed
from mailgw.proxy.registry import SessionInfo, SessionState
from mailgw.proxy.relay import IRelayStage, Relay, cancel_timer, close_transport
from mailgw.sso.identity import IdentitySource, sso_applies
from mailgw.tls import peer_certificate, tls_failure_text, tune_tcp
from mailgw.upstream import UpstreamError, UpstreamProtocol, UpstreamTarget, client_origin
from mailgw.wire.errors import LoginSyntaxError
from mailgw.wire.lines import LineBuffer, TooLong
from mailgw.wire.login import LoginRequest, parse_login

#: protocol errors before the connection is closed [4.5]
MAX_ERRORS = 10

#: longest TLS handshake accepted (implicit TLS and after STARTTLS); never longer
#: than the proxy's C{login_timeout} [4.1]
HANDSHAKE_TIMEOUT = 10.0


@implementer(IHandshakeListener)
class ProxySession(Protocol, metaclass=ABCMeta):
    """One client connection of a proxy, from connect to the end of the relay.

    It keeps the L{ProxyEnvironment} it was built with until it ends: a reload
    gives new sessions a new environment, never this one [3].
    """

    log = Logger()

    # The session's own state in slots, not in an instance dict: with more than 30
    # attributes CPython 3.11 gives every instance a dict of its own (~1.5 KiB of an
    # idle session) [10].  Twisted's Protocol base still brings a small dict (transport,
    # connected), and the subclasses' few attributes go there.
    __slots__ = (
        "_abort_timer",
        "_accounted",
        "_banner_sent",
        "_busy",
        "_closing",
        "_failure_timer",
        "_handshake_timer",
        "_handshaking",
        "_held",
        "_idle_timeout",
        "_idle_timer",
        "_in_registry",
        "_login_timer",
        "_lost",
        "_paused",
        "_pending",
        "_session_timer",
        "_terminate_cause",
        "_upstream",
        "_vpn_user",
        "client_ip",
        "env",
        "errors",
        "implicit_tls",
        "info",
        "input",
        "max_line",
        "proxy",
        "relay",
        "tls_active",
    )

    #: the protocol's name in the registry and logs ("pop3", "imap4", "smtp")
    protocol_name: ClassVar[str]
    #: longest command line accepted before login: the proxy's C{max_login_line}
    max_line: int
    #: the login client for the upstream server
    upstream_class: ClassVar[type[UpstreamProtocol]]

    def __init__(self, environment: ProxyEnvironment, *, implicit_tls: bool) -> None:
        self.env = environment
        self.proxy = environment.proxy
        # Pre-login input is sized for what a login needs [4.10].
        self.max_line = environment.proxy.max_login_line
        self.implicit_tls = implicit_tls
        self.tls_active = implicit_tls
        self.input = self.make_input()
        self.errors = 0
        self.info: SessionInfo | None = None
        self.client_ip = ""
        self.relay: Relay | None = None
        self._busy = False
        self._closing = False
        self._lost = False
        self._in_registry = False
        #: a TLS handshake is under way (implicit TLS, or after STARTTLS)
        self._handshaking = False
        self._banner_sent = False
        #: bytes received while a login is under way (bounded, then reading pauses)
        self._held = 0
        self._paused = False
        self._login_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._session_timer: IDelayedCall | None = None
        self._failure_timer: IDelayedCall | None = None
        self._handshake_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._pending: defer.Deferred[None] | None = None
        self._upstream: UpstreamProtocol | None = None
        self._idle_timeout = 0.0
        self._terminate_cause: str = TerminateCause.USER_REQUEST
        self._accounted: AccountingSession | None = None
        self._vpn_user: str | None = None

    # -- connection life --------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", str(peer))
        client = f"{self.client_ip}:{getattr(peer, 'port', 0)}"
        registry = self.env.registry
        self.info = info = registry.open(self.protocol_name, client, self, client_ip=self.client_ip)
        self._in_registry = True
        self.env.connections.add(self)
        tune_tcp(self.transport)
        self.log.info(
            "New {protocol} session {session_id} from {client}",
            protocol=self.protocol_name,
            session_id=info.session_id,
            client=client,
        )
        for victim in registry.over_limit(self.protocol_name, self.proxy.unauthenticated_session_limit, info):
            victim.owner.terminate(
                f"unauthenticated_session_limit {self.proxy.unauthenticated_session_limit} reached"
                f" ({victim.state.value} session closed for new session {info.session_id})"
            )
        clock = self.env.clock
        self._login_timer = clock.callLater(self.proxy.login_timeout, self._login_timed_out)
        if self.implicit_tls:
            # The greeting goes out once the handshake is done [4.1].
            self._start_handshake_timer()
        else:
            self._banner_sent = True
            self.greet()

    def _start_handshake_timer(self) -> None:
        self._handshaking = True
        timeout = min(HANDSHAKE_TIMEOUT, float(self.proxy.login_timeout))
        self._handshake_timer = self.env.clock.callLater(timeout, self._handshake_timed_out, timeout)

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (L{IHandshakeListener}): greet on the
        implicit-TLS port."""
        self._handshaking = False
        cancel_timer(self._handshake_timer)
        self._handshake_timer = None
        if not self._banner_sent and not self._closing:
            self._banner_sent = True
            self.greet()

    def _handshake_timed_out(self, timeout: float) -> None:
        self._handshake_timer = None
        self._end(b"", f"TLS handshake not completed within {timeout:g}s")

    def dataReceived(self, data: bytes) -> None:
        self.input.append(data)
        if self._busy:
            # A login is under way: hold what follows (pipelined commands), but only
            # so much; reading stays on otherwise, so a client that goes away is
            # noticed and its pending AAA work cancelled [4.10].
            self._held += len(data)
            if self._held > 2 * self.max_line and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            return
        self.process_input()

    def process_input(self) -> None:
        """Handle complete commands until the buffer is empty or a login is under
        way (the rest waits, to be handled after it or relayed)."""
        while not self._busy and not self._closing and self.relay is None:
            if not self.handle_next_input():
                return

    def make_input(self) -> InputBuffer:
        """The pre-login input buffer (command lines, by default)."""
        return LineBuffer(self.max_line)

    def handle_next_input(self) -> bool:
        """Take one command off the input and handle it; False when none is
        complete yet.  Line-based protocols keep this; IMAP reads literals too."""
        assert isinstance(self.input, LineBuffer)
        line = self.input.next_line()
        if line is None:
            return False
        if isinstance(line, TooLong):
            self.protocol_error(self.answer_line_too_long())
        else:
            self.line_received(line)
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        failure_text = tls_failure_text(reason) if self._handshaking else None
        if failure_text is not None and self.info is not None:
            self.log.info(
                "Session {session_id}: TLS handshake failed: {reason}",
                session_id=self.info.session_id,
                protocol=self.protocol_name,
                client=self.info.client,
                reason=failure_text,
            )
        self._closing = True
        self._lost = True
        self._cancel_timers()
        cancel_timer(self._abort_timer)
        if self._pending is not None:
            self._pending.cancel()
        if self.relay is not None:
            self.relay.client_lost()
        elif self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.abortConnection()  # type: ignore[attr-defined]
        self._leave_registry()
        self._forget_if_gone()
        if self.info is not None:
            if self._accounted is not None and self.env.accounting is not None:
                # Sent however the session ended, the client vanishing included [5.4].
                self.env.accounting.stop(
                    replace(
                        self._accounted,
                        bytes_in=self.info.bytes_from_client,
                        bytes_out=self.info.bytes_to_client,
                    ),
                    TerminateCause(self._terminate_cause),
                )
            self.log.info(
                "Session {session_id} closed ({bytes_from_client} bytes from client, "
                "{bytes_to_client} to client)",
                session_id=self.info.session_id,
                protocol=self.protocol_name,
                user=self.info.user,
                bytes_from_client=self.info.bytes_from_client,
                bytes_to_client=self.info.bytes_to_client,
            )

    def _cancel_timers(self) -> None:
        for timer in (
            self._login_timer,
            self._idle_timer,
            self._session_timer,
            self._failure_timer,
            self._handshake_timer,
        ):
            cancel_timer(timer)
        self._login_timer = self._idle_timer = self._session_timer = None
        self._failure_timer = self._handshake_timer = None

    def _leave_registry(self) -> None:
        """The session no longer counts anywhere (registry, metrics, limits) [4.1]."""
        if self._in_registry and self.info is not None:
            self._in_registry = False
            self.env.gatekeeper.directory.withdraw(self.info)
            self.info.closing = True
            self.env.registry.close(self.info)
            if self.env.metrics is not None:
                self.env.metrics.session_closed(self.info)

    def _forget_if_gone(self) -> None:
        """Both connections are gone: the session no longer holds the gateway."""
        if self._lost and (self.relay is None or self.relay.server_gone):
            self.env.connections.discard(self)

    def terminate(self, reason: str, cause: str = TerminateCause.ADMIN_RESET) -> None:
        """Close this session (both sides) for C{reason}: used by the session limit,
        simultaneous logins, timeouts and the admin channel.  C{cause} goes into the
        accounting Stop.  The client gets the protocol's goodbye."""
        if self._closing:
            return
        self._terminate_cause = cause
        self._end(self.answer_closing(), reason)

    def close_with(self, answer: bytes) -> None:
        """Send a last answer and close."""
        self._end(answer, None)

    def _end(self, answer: bytes, reason: str | None) -> None:
        """The one way the gateway closes a session [4.1]: the protocol's last
        words, the TLS close alert, and an abort if the connection is not gone
        within L{CLOSE_GRACE} seconds; the session leaves the registry at once."""
        if self._closing:
            return
        self._closing = True
        if reason is not None and self.info is not None:
            self.log.info(
                "Closing session {session_id}: {reason}",
                session_id=self.info.session_id,
                protocol=self.protocol_name,
                user=self.info.user,
                reason=reason,
            )
        self._cancel_timers()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        self._leave_registry()
        if self.relay is not None:
            self.relay.close(answer)
            return
        transport = self.transport
        if transport is None or self._lost:
            return
        if self._handshaking:
            # No TLS yet: nothing can be said, and a polite close would wait for a
            # handshake that may never come.
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        if answer:
            transport.write(answer)
        self._abort_timer = close_transport(transport, self.env.clock)

    # -- for the protocol subclasses -------------------------------------------------

    @abstractmethod
    def greet(self) -> None:
        """Send the greeting."""

    def line_received(self, line: bytes) -> None:
        """One command line of the pre-login dialogue (line-based protocols)."""
        raise TypeError(f"{type(self).__name__} must handle its input")

    @abstractmethod
    def answer_line_too_long(self) -> bytes:
        """The protocol error for an over-long line."""

    @abstractmethod
    def answer_too_many_errors(self) -> bytes:
        """The last words before closing after L{MAX_ERRORS} errors."""

    @abstractmethod
    def answer_login_timeout(self) -> bytes:
        """The last words when C{login_timeout} expires."""

    @abstractmethod
    def answer_auth_failed(self) -> bytes:
        """The ordinary authentication failure (sent after the failure delay)."""

    @abstractmethod
    def answer_temporary_failure(self) -> bytes:
        """The temporary-failure answer (upstream or AAA servers unavailable)."""

    @abstractmethod
    def answer_closing(self) -> bytes:
        """The goodbye when the gateway ends the session (kill, eviction, log-off,
        timeouts after login): C{* BYE}, C{421}, C{-ERR} [4.1]."""

    def answer_upstream_lost(self, reason: Failure) -> bytes:
        """What the client gets when the mail server closes the relayed connection
        (by default nothing: the server's own last words were relayed)."""
        return b""

    def make_upstream(self, target: UpstreamTarget, tls: IOpenSSLClientConnectionCreator | None) -> UpstreamProtocol:
        """The login client for this session's upstream connection.  With the default
        server's C{forward_client_address} it gets the real client [4.7]: the peer
        (behind a load balancer, the PROXY header's source), the gateway's address it
        reached, the session id and, for IMAP, the client's own ID parameters
        (C{client_id_fields}, kept by the IMAP session)."""
        if not self.proxy.default_server.forward_client_address or self.transport is None or self.info is None:
            return self.upstream_class(target, tls)
        origin = client_origin(
            self.transport,
            self.info.session_id,
            client_id=tuple(getattr(self, "client_id_fields", ())),
        )
        return self.upstream_class(target, tls, origin=origin)

    def answer_login_ok(self, upstream_answer: bytes) -> bytes:
        """What the client gets when the relay starts (by default, the upstream
        server's own answer to the login)."""
        return upstream_answer

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def protocol_error(self, answer: bytes) -> None:
        """Answer a protocol error; after L{MAX_ERRORS} of them, close [4.5]."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            assert self.info is not None
            self.log.info(
                "Closing session {session_id}: {reason}",
                session_id=self.info.session_id,
                protocol=self.protocol_name,
                reason=f"{MAX_ERRORS} protocol errors",
            )
            self.close_with(answer + self.answer_too_many_errors())
        else:
            self.write(answer)

    @property
    def starttls_available(self) -> bool:
        """STARTTLS may be offered: plaintext port of a proxy with TLS enabled."""
        return not self.tls_active and self.proxy.tls_support != "disabled"

    @property
    def login_allowed(self) -> bool:
        """Logins are accepted: over TLS, or in plaintext where allowed [4.1]."""
        return self.tls_active or self.proxy.allow_plaintext_auth

    def start_tls(self) -> None:
        """Switch to TLS after the positive answer to STARTTLS was written.

        Whatever the client pipelined after the STARTTLS command is discarded (the
        CVE-2011-0411 class of command injection)."""
        assert self.transport is not None
        discarded = self.input.pending()
        self.input.clear()
        if discarded:
            assert self.info is not None
            self.log.warn(
                "Session {session_id}: discarded {count} bytes pipelined after STARTTLS",
                session_id=self.info.session_id,
                protocol=self.protocol_name,
                count=len(discarded),
            )
        self.transport.startTLS(self.env.server_tls)  # type: ignore[attr-defined]
        self.tls_active = True
        self._start_handshake_timer()

    def username_presented(self) -> None:
        """A username was presented: the session is now authenticating [4.4]."""
        assert self.info is not None
        if self.info.state is SessionState.UNAUTHENTICATED:
            self.env.registry.set_state(self.info, SessionState.AUTHENTICATING)

    def attempt_login(self, username: str, password: str) -> None:
        """Run the login pipeline for the client's credentials; further command
        lines wait until it has an outcome."""
        assert self.info is not None and self.transport is not None
        self.username_presented()
        self._busy = True
        self._held = 0
        try:
            request = parse_login(
                username,
                password,
                user_delimiter=self.proxy.username_password_delimiter,
                server_delimiter=self.proxy.server_delimiter,
            )
        except LoginSyntaxError as e:
            self._login_failed(LoginFailed(f"bad login syntax: {e}", kind="syntax"))
            return
        self._vpn_user = request.vpn_user
        self._pending = defer.Deferred.fromCoroutine(self._login(request))
        self._pending.addErrback(self._unexpected)

    async def _login(self, request: LoginRequest) -> None:
        assert self.info is not None
        info = self.info
        info.mail_user = request.mail_user
        env = self.env
        penalty = env.penalty
        if penalty is not None:
            # Guessing costs the guesser: a penalised address waits before any AAA
            # work is done for it [4.10].
            delay = penalty.delay(self.client_ip)
            # The failures other gateways saw count too [4.10, 11].
            delay = max(delay, await env.gatekeeper.directory.delay(self.client_ip))
            if delay > 0:
                await task.deferLater(env.clock, delay, lambda: None)  # type: ignore[arg-type]
        try:
            target = env.gatekeeper.target_for(request)
            info.upstream = target.describe()
            identity = await env.gatekeeper.authenticate(
                info, request, self.client_ip, peer_certificate(self.transport)
            )
        except LoginFailed as e:
            self._login_failed(e)
            return
        try:
            upstream, answer = await env.connector.login(
                target, self.make_upstream, request.mail_user, request.mail_password
            )
        except UpstreamError as e:
            env.registry.release_login(info)
            self._login_failed(LoginFailed(f"mailhost login: {e.reason}", temporary=e.temporary, kind="mailhost"))
            return
        if self._closing:
            _abort_upstream(upstream)
            return
        if identity is None:
            try:
                identity = env.gatekeeper.mailhost_identity(info, request)
            except LoginFailed as e:
                _abort_upstream(upstream)
                self._login_failed(e)
                return
        try:
            # Counted beyond this gateway too (other gateways sharing the database) [11].
            await env.gatekeeper.directory.claim(info, identity.policy.simultaneous_logins)
        except DirectoryUnavailable as e:
            _abort_upstream(upstream)
            env.registry.release_login(info)
            self._login_failed(LoginFailed(str(e), temporary=True))
            return
        if self._closing:
            _abort_upstream(upstream)
            return
        self._pending = None
        if penalty is not None:
            penalty.succeeded(self.client_ip)
            env.gatekeeper.directory.succeeded(self.client_ip)
        sso = env.sso_inline
        if sso is not None and env.identities is not None:
            mac = env.neighbours.mac_of(self.client_ip) if env.neighbours is not None else None
            if sso_applies(sso, self.client_ip, target, mac):
                # Inline SSO: a successful mailhost login tells who is at this address [7].
                env.identities.learn(
                    self.client_ip, identity.user, IdentitySource.INLINE, group_policy=identity.policy.name, mac=mac
                )
        self.log.info(
            "Session {session_id}: {user} logged in as {mail_user} at {upstream} "
            "(group policy {group_policy})",
            session_id=info.session_id,
            protocol=self.protocol_name,
            client=info.client,
            user=identity.user,
            mail_user=request.mail_user,
            upstream=info.upstream,
            group_policy=identity.policy.name,
        )
        if env.metrics is not None:
            env.metrics.login_succeeded(self.protocol_name)
        self._start_relay(
            upstream,
            answer,
            identity.policy.idle_timeout,
            identity.policy.max_session_time,
            self.inspection_stage(identity.policy),
        )

    def _login_failed(self, failure: LoginFailed) -> None:
        assert self.info is not None
        self._pending = None
        # One event a fail2ban filter can read [4.10]: the client address first,
        # before anything the client chose.
        self.log.info(
            "Login failed from {client_ip} for {user} ({protocol}, session {session_id}): {reason}",
            event="login_failed",
            session_id=self.info.session_id,
            protocol=self.protocol_name,
            client=self.info.client,
            client_ip=self.client_ip,
            user=self._vpn_user or "-",
            mail_user=self.info.mail_user,
            upstream=self.info.upstream,
            reason=failure.reason,
            temporary=failure.temporary,
        )
        if self.info.state is not SessionState.UNAUTHENTICATED:
            self.env.registry.set_state(self.info, SessionState.UNAUTHENTICATED)
        if self.env.metrics is not None:
            self.env.metrics.login_failed(self.protocol_name, "temporary" if failure.temporary else failure.kind)
        if failure.temporary:
            self._answer_after_failure(self.answer_temporary_failure())
        else:
            if self.env.penalty is not None:
                self.env.penalty.failed(self.client_ip)
                self.env.gatekeeper.directory.failed(self.client_ip)
            self._failure_timer = self.env.clock.callLater(
                self.env.failure_delay, self._answer_after_failure, self.answer_auth_failed()
            )

    def _resume_input(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _answer_after_failure(self, answer: bytes) -> None:
        self._failure_timer = None
        if self._closing or self.transport is None:
            return
        self._busy = False
        self.protocol_error(answer)
        if not self._closing:
            self._resume_input()
            self.process_input()

    def _unexpected(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        if self.env.metrics is not None:
            self.env.metrics.login_failed(self.protocol_name, "other")
        self.log.failure("Session {session_id}: login failed unexpectedly", failure,
                         session_id=self.info.session_id if self.info else None)
        self._pending = None
        self.close_with(self.answer_temporary_failure())

    def _start_relay(
        self,
        upstream: UpstreamProtocol,
        answer: bytes,
        policy_idle: int,
        max_session_time: int,
        stage: IRelayStage | None = None,
    ) -> None:
        assert self.transport is not None and self.info is not None and upstream.transport is not None
        cancel_timer(self._login_timer)
        self._login_timer = None
        self._upstream = upstream
        relay = Relay(self.info, self.transport, upstream.transport, self.env.clock, stage, self._end_by_stage)
        self.relay = relay
        early = upstream.attach(relay.from_server, self._upstream_closed)
        self.write(self.answer_login_ok(answer))
        if early:
            relay.from_server(early)
        pending = self.input.take_rest()
        self.dataReceived = relay.from_client  # type: ignore[method-assign]
        relay.start()
        if pending:
            relay.from_client(pending)
        self._resume_input()
        idle = min(t for t in (self.proxy.idle_timeout, policy_idle) if t > 0) if (
            self.proxy.idle_timeout > 0 or policy_idle > 0
        ) else 0
        self._idle_timeout = float(idle)
        clock = self.env.clock
        if idle:
            self._idle_timer = clock.callLater(idle, self._check_idle)
        if max_session_time > 0:
            self._session_timer = clock.callLater(
                max_session_time,
                self.terminate,
                f"max_session_time {max_session_time}s reached",
                TerminateCause.SESSION_TIMEOUT,
            )
        if self.env.accounting is not None and self.info.user is not None:
            self._accounted = AccountingSession(
                session_id=self.info.session_id,
                user=self.info.user,
                client_ip=self.client_ip,
                started=clock.seconds(),
            )
            self.env.accounting.start(self._accounted)

    def inspection_stage(self, policy: GroupPolicy) -> IRelayStage | None:
        """The content-inspection stage of the session's group policy [4.9], or
        C{None} (the zero-parsing relay)."""
        inspection = self.env.inspection
        if inspection is None or not policy.inspection:
            return None
        assert self.info is not None
        return inspection.stage_for(self.protocol_name, policy.inspection, self.info)

    def _end_by_stage(self, reason: str, goodbye: bytes) -> None:
        self._end(goodbye, reason)

    def _upstream_closed(self, reason: Failure) -> None:
        # The server closing cleanly is the normal end (after QUIT/LOGOUT); a broken
        # connection is a lost service.
        if not self._closing and not reason.check(ConnectionDone):
            self._terminate_cause = TerminateCause.LOST_SERVICE
        if self.relay is not None:
            if not self._closing:
                self._closing = True
                self._cancel_timers()
                self._leave_registry()
                if not reason.check(ConnectionDone) and self.info is not None:
                    self.log.info(
                        "Session {session_id}: the mail server closed the connection: {reason}",
                        session_id=self.info.session_id,
                        protocol=self.protocol_name,
                        user=self.info.user,
                        upstream=self.info.upstream,
                        reason=str(reason.value) or type(reason.value).__name__,
                    )
                self.relay.server_lost(self.answer_upstream_lost(reason))
            else:
                self.relay.server_lost()
        self._forget_if_gone()

    def _check_idle(self) -> None:
        assert self.info is not None
        now = self.env.clock.seconds()
        due = self.info.last_activity + self._idle_timeout
        if now >= due:
            self._idle_timer = None
            self.terminate(f"idle_timeout {self._idle_timeout:g}s reached", TerminateCause.IDLE_TIMEOUT)
        else:
            self._idle_timer = self.env.clock.callLater(due - now, self._check_idle)

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.relay is not None or self._closing:
            return
        self._end(self.answer_login_timeout(), f"login_timeout {self.proxy.login_timeout}s reached")


def _abort_upstream(upstream: UpstreamProtocol) -> None:
    if upstream.transport is not None:
        upstream.transport.abortConnection()  # type: ignore[attr-defined]
