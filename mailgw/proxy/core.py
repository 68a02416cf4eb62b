"""What the three proxies share: the pre-login session protocol, its timers and error
counting, STARTTLS with the pipelining discard, the login pipeline and the switch to the
relay.  Each protocol module subclasses L{ProxySession} with its own dialogue (driving a
pure parser from L{mailgw.wire}) and answers.
"""

from __future__ import annotations

import typing
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.auth.radius import AccountingSession, RadiusAccounting, TerminateCause
from mailgw.config import InterfaceConfig, ProxyConfig
from mailgw.metrics import Metrics
from mailgw.proxy.gatekeeper import Gatekeeper, LoginFailed
from mailgw.proxy.registry import SessionInfo, SessionRegistry, SessionState
from mailgw.proxy.relay import IRelayStage, Relay
from mailgw.tls import peer_certificate, set_nodelay
from mailgw.upstream import Connector, UpstreamError, UpstreamProtocol, UpstreamTarget
from mailgw.wire.errors import LoginSyntaxError
from mailgw.wire.lines import LineBuffer, TooLong
from mailgw.wire.login import LoginRequest, parse_login

#: protocol errors before the connection is closed [4.5]
MAX_ERRORS = 10


class InputBuffer(typing.Protocol):
    """What the core needs of a protocol's pre-login input buffer."""

    def append(self, data: bytes) -> None: ...

    def clear(self) -> None: ...

    def pending(self) -> bytes: ...

    def take_rest(self) -> bytes: ...


@dataclass
class ProxyEnvironment:
    """Everything a proxy's sessions share (one per proxy, built by the service)."""

    proxy: ProxyConfig
    clock: IReactorTime
    registry: SessionRegistry
    gatekeeper: Gatekeeper
    connector: Connector
    #: server TLS context factory (for the implicit port and STARTTLS)
    server_tls: Any
    node_name: str = "mailgw"
    #: seconds before a failed login is answered [4.3]
    failure_delay: float = 1.0
    #: RADIUS accounting of the proxy's sessions [5.4], if configured
    accounting: RadiusAccounting | None = None
    #: Prometheus series [8.3]
    metrics: Metrics | None = None


class ProxyFactory(Factory):
    """Builds the sessions of one proxy on one listening port."""

    noisy = False

    def __init__(
        self,
        environment: ProxyEnvironment,
        session_class: type[ProxySession],
        *,
        interface: InterfaceConfig,
        implicit_tls: bool,
    ) -> None:
        self.environment = environment
        self.session_class = session_class
        self.interface = interface
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> Protocol:
        session = self.session_class(self.environment, implicit_tls=self.implicit_tls)
        session.factory = self
        return session


class ProxySession(Protocol, metaclass=ABCMeta):
    """One client connection of a proxy, from connect to the end of the relay."""

    log = Logger()

    #: the protocol's name in the registry and logs ("pop3", "imap4", "smtp")
    protocol_name: ClassVar[str]
    #: longest command line accepted before login
    max_line: ClassVar[int] = 8192
    #: the login client for the upstream server
    upstream_class: ClassVar[type[UpstreamProtocol]]

    def __init__(self, environment: ProxyEnvironment, *, implicit_tls: bool) -> None:
        self.env = environment
        self.proxy = environment.proxy
        self.implicit_tls = implicit_tls
        self.tls_active = implicit_tls
        self.input = self.make_input()
        self.errors = 0
        self.info: SessionInfo | None = None
        self.client_ip = ""
        self.relay: Relay | None = None
        self._busy = False
        self._closing = False
        self._login_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._session_timer: IDelayedCall | None = None
        self._failure_timer: IDelayedCall | None = None
        self._pending: defer.Deferred[None] | None = None
        self._upstream: UpstreamProtocol | None = None
        self._idle_timeout = 0.0
        self._terminate_cause: str = TerminateCause.USER_REQUEST
        self._accounted: AccountingSession | None = None

    # -- connection life --------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", str(peer))
        client = f"{self.client_ip}:{getattr(peer, 'port', 0)}"
        registry = self.env.registry
        self.info = info = registry.open(self.protocol_name, client, self)
        set_nodelay(self.transport)
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
        self._login_timer = self.env.clock.callLater(self.proxy.login_timeout, self._login_timed_out)
        self.greet()

    def dataReceived(self, data: bytes) -> None:
        self.input.append(data)
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
        self._closing = True
        for timer in (self._login_timer, self._idle_timer, self._session_timer, self._failure_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._pending is not None:
            self._pending.cancel()
        if self.relay is not None:
            self.relay.close()
        elif self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.loseConnection()
        if self.info is not None:
            self.env.registry.close(self.info)
            if self.env.metrics is not None:
                self.env.metrics.session_closed(self.info)
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

    def terminate(self, reason: str, cause: str = TerminateCause.ADMIN_RESET) -> None:
        """Close this session (both sides) for C{reason}: used by the session limit,
        simultaneous logins, timeouts and the admin channel.  C{cause} goes into the
        accounting Stop."""
        if self._closing:
            return
        self._closing = True
        self._terminate_cause = cause
        assert self.info is not None
        self.info.closing = True
        self.log.info(
            "Closing session {session_id}: {reason}",
            session_id=self.info.session_id,
            protocol=self.protocol_name,
            user=self.info.user,
            reason=reason,
        )
        if self.relay is not None:
            self.relay.close()
        elif self.transport is not None:
            self.transport.loseConnection()

    def close_with(self, answer: bytes) -> None:
        """Send a last answer and close."""
        if self.transport is not None:
            self.transport.write(answer)
            self.transport.loseConnection()
        self._closing = True
        if self.info is not None:
            self.info.closing = True

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

    def make_upstream(self, target: UpstreamTarget, tls: IOpenSSLClientConnectionCreator | None) -> UpstreamProtocol:
        """The login client for this session's upstream connection."""
        return self.upstream_class(target, tls)

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
        self.transport.pauseProducing()  # type: ignore[attr-defined]
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
        self._pending = defer.Deferred.fromCoroutine(self._login(request))
        self._pending.addErrback(self._unexpected)

    async def _login(self, request: LoginRequest) -> None:
        assert self.info is not None
        info = self.info
        info.mail_user = request.mail_user
        try:
            target = self.env.gatekeeper.target_for(request)
            info.upstream = target.describe()
            identity = await self.env.gatekeeper.authenticate(
                info, request, self.client_ip, peer_certificate(self.transport)
            )
        except LoginFailed as e:
            self._login_failed(e)
            return
        try:
            upstream, answer = await self.env.connector.login(
                target, self.make_upstream, request.mail_user, request.mail_password
            )
        except UpstreamError as e:
            self.env.registry.release_login(info)
            self._login_failed(LoginFailed(f"mailhost login: {e.reason}", temporary=e.temporary, kind="mailhost"))
            return
        if identity is None:
            try:
                identity = self.env.gatekeeper.mailhost_identity(info, request)
            except LoginFailed as e:
                if upstream.transport is not None:
                    upstream.transport.loseConnection()
                self._login_failed(e)
                return
        self._pending = None
        if self._closing:
            if upstream.transport is not None:
                upstream.transport.loseConnection()
            return
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
        if self.env.metrics is not None:
            self.env.metrics.login_succeeded(self.protocol_name)
        self._start_relay(upstream, answer, identity.policy.idle_timeout, identity.policy.max_session_time)

    def _login_failed(self, failure: LoginFailed) -> None:
        assert self.info is not None
        self._pending = None
        self.log.info(
            "Session {session_id}: login failed: {reason}",
            session_id=self.info.session_id,
            protocol=self.protocol_name,
            client=self.info.client,
            user=self.info.mail_user,
            upstream=self.info.upstream,
            reason=failure.reason,
        )
        if self.info.state is not SessionState.UNAUTHENTICATED:
            self.env.registry.set_state(self.info, SessionState.UNAUTHENTICATED)
        if self.env.metrics is not None:
            self.env.metrics.login_failed(self.protocol_name, "temporary" if failure.temporary else failure.kind)
        if failure.temporary:
            self._answer_after_failure(self.answer_temporary_failure())
        else:
            self._failure_timer = self.env.clock.callLater(
                self.env.failure_delay, self._answer_after_failure, self.answer_auth_failed()
            )

    def _answer_after_failure(self, answer: bytes) -> None:
        self._failure_timer = None
        if self._closing or self.transport is None:
            return
        self._busy = False
        self.protocol_error(answer)
        if not self._closing:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            self.process_input()

    def _unexpected(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        if self.env.metrics is not None:
            self.env.metrics.login_failed(self.protocol_name, "other")
        self.log.failure("Session {session_id}: login failed unexpectedly", failure,
                         session_id=self.info.session_id if self.info else None)
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
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._upstream = upstream
        relay = Relay(self.info, self.transport, upstream.transport, self.env.clock, stage)
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
        self.transport.resumeProducing()  # type: ignore[attr-defined]
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

    def _upstream_closed(self, reason: Failure) -> None:
        # The server closing cleanly is the normal end (after QUIT/LOGOUT); a broken
        # connection is a lost service.
        if not self._closing and not reason.check(ConnectionDone):
            self._terminate_cause = TerminateCause.LOST_SERVICE
        if self.relay is not None:
            self.relay.close()

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
        assert self.info is not None
        self.log.info(
            "Closing session {session_id}: {reason}",
            session_id=self.info.session_id,
            protocol=self.protocol_name,
            reason=f"login_timeout {self.proxy.login_timeout}s reached",
        )
        if self._pending is not None:
            self._pending.cancel()
        self.close_with(self.answer_login_timeout())
