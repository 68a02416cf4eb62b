"""Builds the gateway's service tree from a configuration and a reactor.

Nothing here reads the clock or the reactor from a global: ``build`` gets both, and
every object that needs them gets them passed in.  Shared state (the session registry,
the AAA portals, the TLS context) belongs to the objects created here.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailgw.admin.channel import admin_service
from mailgw.admin.responder import GatewayAdminBackend
from mailgw.auth.cache import AuthCache, CachingChecker
from mailgw.auth.ldap import LdapChecker
from mailgw.auth.limits import FairPool, PenaltyTable, PendingLimit
from mailgw.auth.local import LocalUsersChecker
from mailgw.auth.pop3 import Pop3Checker
from mailgw.auth.portal import AuthenticatedUser, GatewayRealm, make_portal
from mailgw.auth.radius import RadiusAccounting, RadiusChecker, RadiusClient, TerminateCause
from mailgw.config import (
    Config,
    ConfigError,
    LdapGroup,
    LocalGroup,
    MACAddress,
    Pop3Group,
    RadiusGroup,
    load_config,
)
from mailgw.inspect.service import Inspection, spool_folder
from mailgw.inspect.spool import prepare_spool_folder
from mailgw.listeners import SESSION_CLASSES, CurrentEnvironment, Listener, pending_limits, proxy_listeners
from mailgw.logs import make_observer
from mailgw.manhole import manhole_service
from mailgw.memory import LiveConnections
from mailgw.metrics import Metrics, metrics_service
from mailgw.poller.service import PollerService
from mailgw.proxy.core import ProxySession
from mailgw.proxy.directory import ISessionDirectory, LocalDirectory, SharedDirectory
from mailgw.proxy.environment import ProxyEnvironment
from mailgw.proxy.gatekeeper import Authorizer, Gatekeeper, LoginFailed
from mailgw.proxy.registry import SessionRegistry, SessionState
from mailgw.proxy.relay import CLOSE_GRACE
from mailgw.sso.capture import CaptureService
from mailgw.sso.export import AccountingExport
from mailgw.sso.identity import IdentitySource, IdentityTable
from mailgw.sso.monitor import Pop3Monitor
from mailgw.sso.neighbours import NeighbourTable
from mailgw.sso.persist import IdentityPersistence
from mailgw.sso.portal import PortalResource, portal_service, portal_site
from mailgw.state import StateService, open_state
from mailgw.systemd import SystemdNotifier
from mailgw.tls import ServerTLS, TLSConfigError, ensure_self_signed
from mailgw.tlstickets import TicketKeyRotation, TicketKeys
from mailgw.upstream import Connector
from mailgw.upstream.smtpprobe import SMTPCapabilities
from mailgw.workers.sockets import DirectSockets, HeldSockets, ListenSockets
from mailgw.workers.supervisor import WorkerPool
from mailgw.workers.worker import PendingReporter, SupervisorDirectory, WorkerRole, worker_node


class ThreadPoolService(Service):
    """Runs a bounded thread pool for blocking work (password hashes) while the
    service runs."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLSOf:
    """The gateway's current server TLS context (followed across reloads), for the
    SSO portal."""

    def __init__(self, gateway: GatewayService) -> None:
        self._gateway = gateway

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self._gateway.server_tls.serverConnectionForTLS(tlsProtocol)


class GatewayService(MultiService):
    """The root of the gateway: listeners, thread pool, shared state.

    Everything that a configuration decides (TLS context, AAA server groups, group
    policies, proxy settings, listeners) is built by L{_apply}, at start and again
    by L{reload}; the session registry, the thread pool and the clients persist, so
    established sessions are never dropped by a reload.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        failure_delay: float = 1.0,
        grace_period: float = 20.0,
        install_signal_handlers: bool = False,
        worker: WorkerRole | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        #: this process is a worker of a supervisor [10] (None: it serves by itself,
        #: or supervises workers when gateway.workers is not 1)
        self.worker = worker
        node = config.gateway.node_name
        #: how this process is named in session lists (a worker: node/wN)
        self.node_label = worker_node(node, worker.index) if worker is not None else node
        supervising = worker is None and config.gateway.workers != 1
        #: where the listening sockets come from: bound here; bound here and kept for
        #: the workers; or sent by the supervisor
        self.sockets: ListenSockets = (
            worker.sockets if worker is not None else HeldSockets() if supervising else DirectSockets()
        )
        self.failure_delay = failure_delay
        self.grace_period = grace_period
        self.install_signal_handlers = install_signal_handlers
        self.registry = SessionRegistry(reactor)
        self.metrics = Metrics(self.registry)
        #: remembered successful checks [5.6]; its HMAC key is made here, per process
        self.auth_cache = AuthCache(reactor)
        self.metrics.auth_cache = self.auth_cache
        #: the TLS session-ticket key of every context (a worker: its supervisor's,
        #: pushed to it on each rotation) [4.1, 10]
        self.ticket_keys = TicketKeys(worker.ticket_key if worker is not None else None)
        #: who makes new ticket keys: this process unless it is a worker
        self.ticket_rotation: TicketKeyRotation | None = None
        if worker is None:
            self.ticket_rotation = TicketKeyRotation(reactor, self.ticket_keys.key)
            self.ticket_rotation.subscribe(self.ticket_keys.set)
            self.ticket_rotation.setServiceParent(self)
        # With workers, READY=1 waits until every worker serves (sent by the pool).
        self.notifier = SystemdNotifier(notify_on_start=not supervising)
        self.log_observer: ILogObserver = make_observer(config.gateway.log_format, sys.stdout)
        # Password hashing and ldap3 each get their own bounded pool, so an LDAP
        # outage cannot stall local logins [4.10]; hashing is CPU work: one thread per
        # core, handed out fairly between client addresses.
        cores = os.cpu_count() or 2
        self.hash_threads = ThreadPool(minthreads=0, maxthreads=cores, name="mailgw-hash")
        ThreadPoolService(self.hash_threads).setServiceParent(self)
        self.hash_pool = FairPool(reactor, self.hash_threads, concurrency=cores, name="password hashing")
        self.ldap_threads = ThreadPool(minthreads=0, maxthreads=8, name="mailgw-ldap")
        ThreadPoolService(self.ldap_threads).setServiceParent(self)
        self.ldap_pool = FairPool(reactor, self.ldap_threads, concurrency=8, name="ldap")
        #: the failure penalty per client address [4.10], shared by the proxies and
        #: kept across reloads
        self.penalty = PenaltyTable(reactor)
        #: every session whose connections are not all gone yet (all proxies)
        self.connections: LiveConnections[ProxySession] = LiveConnections(reactor)
        #: the poller's connector (the proxies get a new one with each configuration)
        self.connector = Connector(reactor)
        self.radius = RadiusClient(reactor)
        #: each proxy's environment for new sessions; a reload replaces it, and
        #: established sessions keep the one they started with [3]
        self.environments: dict[str, ProxyEnvironment] = {}
        self.checkers: dict[str, Any] = {}
        self.accounting: dict[str, RadiusAccounting] = {}
        #: accounting clients replaced by a reload: their sessions' Stops still go
        #: through them; closed at stop
        self._retired_accounting: list[RadiusAccounting] = []
        self.limits: dict[str, PendingLimit] = {}
        #: the SSO identity table [7] (kept across reloads) and its accounting export
        self.identities: IdentityTable | None = None
        #: writes the table's changes to the state store, reads them back at start [7]
        self.identity_persistence: IdentityPersistence | None = None
        #: fires with the number of entries restored at start
        self.identities_restored: defer.Deferred[int] | None = None
        #: fires once sso.pop3.replay_file was replayed at start
        self.replayed: defer.Deferred[None] | None = None
        self._identity_export: AccountingExport | None = None
        self._retired_exports: list[AccountingExport] = []
        self._capture: CaptureService | None = None
        self._neighbours: NeighbourTable | None = None
        self._portal: Any = None
        self.monitor: Pop3Monitor | None = None
        self._identity_sweep = TimerService(30, self._expire_identities)
        self._identity_sweep.clock = reactor
        self._identity_sweep.setServiceParent(self)
        #: content inspection [4.9] (None: no profile); clamd's health every 30 s
        self.inspection: Inspection | None = None
        self._clamd_health = TimerService(30, self._check_clamd)
        self._clamd_health.clock = reactor
        self._clamd_health.setServiceParent(self)
        #: the default SMTP server's extensions, for the EHLO answer before AUTH [4.5]
        self.smtp_capabilities = SMTPCapabilities(reactor)
        self.smtp_capabilities.setServiceParent(self)
        shared = config.state.backend == "postgresql"
        # All persistent state goes through one store [1]: SQLite (one machine) or
        # PostgreSQL (several gateways) [11]; a change of [state] takes effect at the
        # next start.  Made before _apply, which may make the SSO identity table that
        # persists through it.  A worker uses none of it but the shared directory.
        self.state = open_state(config, reactor) if worker is None or shared else None
        #: where logins count beyond this process: the shared database's directory
        #: [11], or a worker's supervisor [10]
        self.directory: ISessionDirectory
        if shared:
            assert self.state is not None
            self.directory = SharedDirectory(
                self.state, self.registry, self.node_label, reactor, penalty=self.penalty  # type: ignore[arg-type]
            )
        elif worker is not None:
            self.directory = SupervisorDirectory(worker.channel, self.registry, self.node_label)
        else:
            self.directory = LocalDirectory()
        if worker is not None:
            # The supervisor counts every worker's non-authenticated sessions [4.4, 10].
            reporter = PendingReporter(worker.channel, reactor, enabled=worker.track)
            worker.channel.reporter = self.registry.observer = reporter
        self._apply(config)
        if self.state is not None:
            StateService(self.state).setServiceParent(self)  # before the poller: closes after it
        if isinstance(self.directory, SharedDirectory):
            self.directory.setServiceParent(self)
        #: the worker processes (None: this process serves by itself) [10]
        self.pool: WorkerPool | None = None
        if supervising:
            assert isinstance(self.sockets, HeldSockets)
            if config.path is None:
                raise ConfigError(["gateway.workers: the workers need the configuration loaded from a file"])
            self.pool = WorkerPool(
                config.gateway.workers or os.cpu_count() or 1,
                Path(config.path).absolute(),
                self.sockets,
                reactor,
                node_name=node,
                penalty=self.penalty,
                notifier=self.notifier,
                limits=pending_limits(config),
                ticket_rotation=self.ticket_rotation,
            )
            self.pool.setServiceParent(self)  # after the listeners: their sockets are bound
        #: the remote POP poller: one per machine, in the supervisor (not in workers)
        self.poller: PollerService | None = None
        if worker is None:
            assert self.state is not None
            self.poller = PollerService(config, self.state, self.connector, reactor, metrics=self.metrics)
            self.poller.setServiceParent(self)
        self.admin_backend = GatewayAdminBackend(
            self,
            started=reactor.seconds(),
            clock=reactor,
            reload=self._reload_deferred,
            poller=self.poller.accounts if self.poller is not None else None,
        )
        admin = config.admin
        if worker is not None:
            # A worker answers its supervisor only (the admin channel, metrics and
            # Manhole are the supervisor's).
            return
        admin_service(config.admin, self.admin_backend, reactor).setServiceParent(self)
        if admin.metrics:
            pool = self.pool
            workers = (lambda: defer.Deferred.fromCoroutine(pool.metrics())) if pool is not None else None
            metrics_service(admin.metrics, self.metrics, reactor, workers).setServiceParent(self)
        #: what the Manhole's sessions see (the running configuration is updated on reload)
        self.manhole_namespace: dict[str, Any] = {
            "gateway": self,
            "registry": self.registry,
            "config": config,
            "metrics": self.metrics,
            "reactor": reactor,
        }
        if admin.manhole:
            assert admin.manhole_authorized_keys is not None  # checked by the configuration
            manhole_service(
                admin.manhole,
                admin.manhole_authorized_keys,
                self.manhole_namespace,
                reactor,
                host_key=config.gateway.state_dir / "manhole_host_key",
            ).setServiceParent(self)
        # Last child: READY=1 goes out only once every listener is bound (with
        # workers: once every worker serves, sent by the pool).
        self.notifier.setServiceParent(self)
    def _reload_deferred(self) -> defer.Deferred[list[str]]:
        if self.pool is None:
            return defer.succeed(self.reload())
        return defer.Deferred.fromCoroutine(self._reload_with_workers())

    async def _reload_with_workers(self) -> list[str]:
        """The supervisor loads the configuration (validating it, binding new
        listeners); once applied, every worker loads it too [10]."""
        assert self.pool is not None
        self.notifier.reloading()
        try:
            before = self.config
            problems = self._reload(None)
            if self.config is not before:
                assert self.config.path is not None
                self.pool.configure(pending_limits(self.config))
                problems += await self.pool.reload(str(Path(self.config.path).absolute()))
        finally:
            self.notifier.ready()
        self._reloaded(problems)
        return problems

    # -- configuration ------------------------------------------------------------------

    def _apply(self, config: Config) -> list[str]:
        """Make C{config} the running configuration; returns problems met while
        applying it (listeners that could not start).  Everything that can fail
        before a change is visible (TLS files, users files) is built first."""
        reactor = self.reactor
        _ensure_private_folder(config.gateway.state_dir)
        tls = config.tls
        if tls.generate_self_signed:
            ensure_self_signed(tls.certificate, tls.private_key, config.gateway.node_name)
        server_tls = ServerTLS(
            tls.certificate,
            tls.private_key,
            minimum_version=tls.minimum_version,  # type: ignore[arg-type]  # validated by config
            client_certificate=tls.client_certificate,  # type: ignore[arg-type]
            client_ca=tls.client_ca,
        )
        self.ticket_keys.use(server_tls.getContext())
        if server_tls.system_context is not None:
            self.ticket_keys.use(server_tls.system_context)
        else:
            self.log.warn(
                "Implicit TLS runs on pyOpenSSL, not on the system's OpenSSL: {reason}",
                reason=server_tls.system_problem,
            )
        realm = GatewayRealm(config.group_policy)
        old_inspection = self.inspection
        # Each worker spools in a folder of its own: cleaning it at start must not
        # remove another process's files [4.9].
        spool = spool_folder(config) / f"worker-{self.worker.index}" if self.worker is not None else None
        inspection = (
            Inspection.from_config(config, reactor, self.metrics, old_inspection, spool=spool)
            if config.inspections
            else None
        )
        if inspection is not None:
            # Made once; what a crash left in it goes at start [4.9].
            if old_inspection is None or old_inspection.spool != inspection.spool:
                removed = prepare_spool_folder(inspection.spool)
                if removed:
                    self.log.info("Removed {count} spool files left by an earlier run", count=removed)
        # A new connector (and so new upstream TLS objects, re-reading CA files) for
        # the sessions of this configuration; the old one lives on in the old ones.
        connector = Connector(reactor)
        limits: dict[str, PendingLimit] = {}
        for group in config.aaa_server_groups:
            known = self.limits.get(group.name)
            # Kept while max_pending is the same, so checks in flight still count.
            limits[group.name] = (
                known if known is not None and known.max_pending == group.max_pending
                else PendingLimit(group.name, group.max_pending)
            )
        #: the groups whose checkers hold their place themselves until their thread
        #: work really ends (the others through the gatekeeper)
        self_limited: set[str] = set()
        portals: dict[str, Portal] = {}
        checkers: dict[str, Any] = {}
        #: server groups that can look a user up without a password [5.2]
        authorizers: dict[str, Authorizer] = {}
        for group in config.aaa_server_groups:
            checker: Any
            if isinstance(group, LocalGroup):
                checker = LocalUsersChecker.from_file(
                    group.name, group.users_file, self.hash_pool, limits[group.name]
                )
                self_limited.add(group.name)
            elif isinstance(group, LdapGroup):
                checker = LdapChecker(group, reactor, self.ldap_pool, limit=limits[group.name])
                self_limited.add(group.name)
                authorizers[group.name] = self.metrics.timed_authorizer(checker.authorize, group.name, reactor)
            elif isinstance(group, Pop3Group):
                checker = Pop3Checker(group, connector)
            else:
                checker = RadiusChecker(group, self.radius, config.gateway.node_name)
                authorizers[group.name] = self.metrics.timed_authorizer(
                    _radius_authorizer(checker), group.name, reactor
                )
            checkers[group.name] = checker
            timed = self.metrics.timed_checker(checker, group.name, reactor)
            front = CachingChecker(timed, group.name, self.auth_cache, group.cache_ttl) if group.cache_ttl else timed
            portals[group.name] = make_portal(front, realm)
        accounting: dict[str, RadiusAccounting] = {}
        old_config: Config | None = getattr(self, "config", None)
        for proxy in config.proxies():
            name = proxy.accounting_server_group
            if proxy.enabled and name and name not in accounting:
                group = config.aaa_group(name)
                assert isinstance(group, RadiusGroup)  # checked by the configuration
                known_acct = self.accounting.get(name)
                # The same servers, secrets and node name: keep the client; anything
                # changed: a new one for new sessions, the old one for the old [3].
                unchanged = (
                    known_acct is not None
                    and old_config is not None
                    and old_config.aaa_group(name) == group
                    and old_config.gateway.node_name == config.gateway.node_name
                )
                accounting[name] = known_acct if unchanged and known_acct is not None else RadiusAccounting.for_group(
                    self.radius, group, config.gateway.node_name
                )

        # Nothing above failed: switch over.  A group that changed (or went) forgets
        # what its cache remembered [5.6].
        if old_config is not None:
            new_groups = {g.name: g for g in config.aaa_server_groups}
            for old_group in old_config.aaa_server_groups:
                # A local group's users file is read again by each reload: a user
                # removed there must not live on in the cache.
                if new_groups.get(old_group.name) != old_group or isinstance(old_group, LocalGroup):
                    self.auth_cache.flush(old_group.name)
        old_checkers = self.checkers
        self.config = config
        self.server_tls = server_tls
        self.portals, self.checkers, self.authorizers = portals, checkers, authorizers
        self.limits = limits
        kept = set(map(id, accounting.values()))
        self._retired_accounting.extend(a for a in self.accounting.values() if id(a) not in kept)
        self.accounting = accounting
        self.inspection = inspection
        self._configure_sso(config, old_config)
        self.smtp_capabilities.configure(config.smtps, config.gateway.node_name, connector.tls_options)
        wanted: dict[tuple[object, ...], tuple[Listener, ProxyEnvironment]] = {}
        for proxy in config.proxies():
            if not proxy.enabled:
                continue
            gatekeeper = Gatekeeper(
                proxy,
                portals,
                self.registry,
                config.group_policy,
                authorizers=authorizers,
                limits={name: limit for name, limit in limits.items() if name not in self_limited},
                identities=self.identities,
                directory=self.directory,
            )
            acct = accounting.get(proxy.accounting_server_group) if proxy.accounting_server_group else None
            # A new environment: listeners hand it to new sessions; established
            # sessions keep theirs (proxy settings, gatekeeper, accounting) [3].
            env = ProxyEnvironment(
                proxy=proxy,
                clock=reactor,
                registry=self.registry,
                gatekeeper=gatekeeper,
                connector=connector,
                server_tls=server_tls,
                node_name=config.gateway.node_name,
                failure_delay=self.failure_delay,
                accounting=acct,
                metrics=self.metrics,
                penalty=self.penalty,
                connections=self.connections,
                identities=self.identities,
                neighbours=self._neighbours,
                sso_inline=config.sso_pop3
                if proxy.protocol == "pop3s" and config.sso_pop3.enabled and config.sso_pop3.mode == "inline"
                else None,
                smtp_extensions=self.smtp_capabilities.keywords if proxy.protocol == "smtps" else None,
                inspection=inspection,
            )
            self.environments[proxy.protocol] = env
            current_env = CurrentEnvironment(self.environments, proxy.protocol)
            for interface in config.interfaces:
                if interface.enables(proxy.protocol):
                    for listener in proxy_listeners(
                        reactor,
                        current_env,
                        SESSION_CLASSES[proxy.protocol],
                        interface,
                        config.gateway.listen_backlog,
                        self.sockets,
                    ):
                        wanted[listener.key] = (listener, env)
        problems: list[str] = []
        current = {listener.key: listener for listener in self.listeners()}
        for key, listener in current.items():
            if key not in wanted:
                self.log.info("No longer listening: {listener}", listener=listener.description)
                defer.maybeDeferred(listener.disownServiceParent).addErrback(
                    lambda f: self.log.failure("Stopping a listener failed", f)
                )
        for key, (listener, _) in wanted.items():
            if key in current:
                continue
            try:
                listener.setServiceParent(self)
            except Exception as e:  # noqa: BLE001 - any listen error becomes a reported problem
                listener.disownServiceParent()
                problems.append(f"{listener.description}: cannot listen: {e}")
                continue
            if self.running:
                self.log.info("Listening: {listener}", listener=listener.description)
        for checker in old_checkers.values():
            close = getattr(checker, "close", None)
            if close is not None and checker not in checkers.values():
                defer.maybeDeferred(close)
        poller = getattr(self, "poller", None)
        if poller is not None:
            poller.reconfigure(config)
        return problems

    def _configure_sso(self, config: Config, old: Config | None) -> None:
        """The identity table and its export for C{sso.pop3} [7]: made when SSO is
        on (and kept across reloads, its ttl updated); the export follows the
        collectors."""
        sso = config.sso_pop3
        if not sso.enabled:
            return
        if self.identities is None:
            self.identities = IdentityTable(self.reactor, sso.ttl)
            self.metrics.identities = self.identities
            # The table survives a restart [7]: restored at start (now, when a
            # reload turned SSO on), every change written to the state store.
            assert self.state is not None  # SSO does not run in workers (see the configuration)
            self.identity_persistence = IdentityPersistence(self.state)
            self.identities.subscribe(self.identity_persistence)
            if self.running:
                self.identities_restored = self.identity_persistence.load(self.identities)
        self.identities.ttl = sso.ttl
        if self._neighbours is None and any(isinstance(entry, MACAddress) for entry in sso.policy):
            # MAC addresses in the policy: the neighbour table of the monitor
            # interface (all interfaces inline) tells a client's MAC [7].
            self._neighbours = NeighbourTable(self.reactor, sso.monitor_interface if sso.mode == "monitor" else "")
            self._neighbours.setServiceParent(self)
        if sso.mode == "monitor" and self._capture is None:
            self._start_monitor(config)
        if sso.portal and self._portal is None:
            self._start_portal(config)
        if old is not None and old.sso_pop3.radius_accounting == sso.radius_accounting and self._identity_export:
            return
        if self._identity_export is not None:
            self.identities.unsubscribe(self._identity_export)
            self._retired_exports.append(self._identity_export)
            self._identity_export = None
        if sso.radius_accounting:
            self._identity_export = AccountingExport(self.radius, sso.radius_accounting, config.gateway.node_name)
            self.identities.subscribe(self._identity_export)

    def _start_monitor(self, config: Config) -> None:
        """Monitor mode [7]: capture the POP3 servers' traffic on the mirror port
        and learn from the logins seen (never injecting anything).  Set up at start;
        a reload's change of the monitor settings takes effect at the next start."""
        sso = config.sso_pop3
        servers = []
        for server in sso.servers:
            try:
                ipaddress.ip_address(server.host.strip("[]"))
            except ValueError:
                self.log.warn(
                    "sso.pop3.servers: {server} is not an IP address; monitor mode watches addresses only",
                    server=str(server),
                )
                continue
            servers.append((server.host.strip("[]"), server.port))
        identities = self.identities
        assert identities is not None

        neighbours = self._neighbours

        def learned(client_ip: str, user: str, server: tuple[str, int]) -> None:
            mac = neighbours.mac_of(client_ip) if neighbours is not None else None
            if sso.applies_to(client_ip, mac):
                identities.learn(client_ip, user, IdentitySource.MONITOR, mac=mac)

        self.monitor = Pop3Monitor(servers, learned, self.reactor)
        self.metrics.sso_monitor = self.monitor
        self._capture = CaptureService(
            self.reactor, sso.monitor_interface, sorted({port for _, port in servers}), self.monitor.frame_received
        )
        self._capture.setServiceParent(self)

    def _start_portal(self, config: Config) -> None:
        """The SSO portal [7]: an HTTPS login page with the gateway's certificate and
        the POP3S proxy's AAA (its gatekeeper as it is at each login, the failure
        penalty, the bounded AAA work).  Its endpoint is read at start."""
        identities = self.identities
        assert identities is not None
        penalty = self.penalty
        clock = self.reactor

        async def authenticate(user: str, password: str, client_ip: str) -> tuple[str, str | None]:
            env = self.environments.get("pop3s")
            if env is None or not self.config.pop3s.enabled:
                raise LoginFailed("the POP3S proxy is disabled: no AAA for the portal", temporary=True)
            delay = penalty.delay(client_ip)
            if delay > 0:
                await deferLater(clock, delay)
            try:
                identity = await env.gatekeeper.check_password(user, password, client_ip)
            except LoginFailed as e:
                if not e.temporary:
                    penalty.failed(client_ip)
                raise
            penalty.succeeded(client_ip)
            return identity.user, identity.policy.name

        resource = PortalResource(
            identities,
            authenticate,
            clock,
            failure_delay=self.failure_delay,
            applies_to=config.sso_pop3.applies_to,
        )
        self._portal = portal_service(config.sso_pop3.portal, portal_site(resource, clock), clock, _ServerTLSOf(self))
        self._portal.setServiceParent(self)

    def _check_clamd(self) -> defer.Deferred[None] | None:
        return self.inspection.check_health() if self.inspection is not None else None

    def _expire_identities(self) -> None:
        if self.identities is not None:
            self.identities.expire()

    def reload(self, path: str | os.PathLike[str] | None = None) -> list[str]:
        """Load the configuration again (from C{path} or the running one's file),
        validate it and apply it; returns the problems, empty when applied.  On
        any validation problem the running configuration stays as it is."""
        self.notifier.reloading()
        try:
            problems = self._reload(path)
        finally:
            self.notifier.ready()
        self._reloaded(problems)
        return problems

    def _reloaded(self, problems: list[str]) -> None:
        if problems:
            self.notifier.status(f"last reload: {len(problems)} problem(s)")
        if hasattr(self, "manhole_namespace"):
            self.manhole_namespace["config"] = self.config

    def _reload(self, path: str | os.PathLike[str] | None) -> list[str]:
        source = path if path is not None else self.config.path
        if source is None:
            return ["the running configuration was not loaded from a file"]
        try:
            new = load_config(source)
        except ConfigError as e:
            problems = list(e.problems)
        except OSError as e:
            problems = [f"{source}: {e.strerror}"]
        else:
            try:
                problems = self._apply(new)
            except (TLSConfigError, ConfigError, OSError) as e:
                problems = [str(e)]
            else:
                self.log.info(
                    "Configuration {path} reloaded{detail}",
                    path=str(source),
                    detail="" if not problems else f" with {len(problems)} problem(s)",
                )
                for problem in problems:
                    self.log.warn("Reload: {reason}", reason=problem)
                return problems
        self.log.warn(
            "Configuration {path} not reloaded, the running one stays: {reason}",
            path=str(source),
            reason="; ".join(problems),
        )
        return problems

    # -- life cycle ---------------------------------------------------------------------

    def setServiceParent(self, parent: Any) -> None:
        # twistd creates the Application after makeService and asks it for an
        # ILogObserver before it starts logging: give it the configured format.
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    def startService(self) -> None:
        # Before the children start: the notifier's READY=1 tells systemd that a
        # reload (SIGHUP) may come, and SIGHUP's default action would kill us.
        if self.install_signal_handlers:
            signal.signal(signal.SIGHUP, self._sighup)
        super().startService()
        if self.identity_persistence is not None and self.identities is not None:
            # After StateService.startService: the store serves calls in order, so
            # this read comes after its opening (and migration).
            self.identities_restored = self.identity_persistence.load(self.identities)
        replay_file = self.config.sso_pop3.replay_file
        if self.config.sso_pop3.enabled and replay_file is not None:
            # After the restore (the store answers in order): the replayed logins win.
            restored = self.identities_restored or defer.succeed(0)
            after: defer.Deferred[None] = defer.Deferred()

            def then(result: object) -> object:
                after.callback(None)
                return result

            restored.addBoth(then)
            after.addCallback(lambda _: defer.Deferred.fromCoroutine(self._replay_at_start(replay_file)))
            self.replayed = after
        for listener in self.listeners():
            self.log.info("Listening: {listener}", listener=listener.description)

    async def _replay_at_start(self, path: Path) -> None:
        """C{sso.pop3.replay_file}: learn the logins of a capture file once [7]."""
        try:
            result = await self.admin_backend.sso_replay(str(path))
        except Exception as e:  # noqa: BLE001 - any failure of the replay is logged, the gateway runs on
            self.log.error("sso.pop3.replay_file {path}: cannot replay: {reason}", path=str(path), reason=str(e))
            return
        self.log.info(
            "sso.pop3.replay_file {path}: {frames} frames, {learnt} identities learnt",
            path=str(path),
            frames=result.get("frames"),
            learnt=result.get("learnt"),
        )

    def _sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._reload_deferred)

    async def _stop(self) -> None:
        self.notifier.stopping()
        # 1. Stop accepting.
        for listener in self.listeners():
            await defer.maybeDeferred(listener.stopService)
        if self.pool is not None:
            # Every worker finishes its logged-in sessions (its own grace period).
            await self.pool.drain(self.grace_period + CLOSE_GRACE + 10)
        # 2. Let logged-in sessions finish, up to the grace period; the others go now.
        for info in self.registry:
            if info.state is not SessionState.AUTHENTICATED:
                info.owner.terminate("gateway stopping", TerminateCause.NAS_REQUEST)
        deadline = self.reactor.seconds() + self.grace_period
        while len(self.registry) and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1)
        for info in self.registry:
            info.owner.terminate("gateway stopping: grace period over", TerminateCause.NAS_REBOOT)
        # Every connection is gone within CLOSE_GRACE of its close [4.1].
        deadline = self.reactor.seconds() + CLOSE_GRACE + 1
        while self.connections and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05)
        # 3. Give the accounting Stops a moment to be answered.
        deadline = self.reactor.seconds() + 5
        every_accounting = [*self.accounting.values(), *self._retired_accounting]
        while any(a.pending for a in every_accounting) and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1)
        # 4. Release the AAA connections while the thread pool still runs.
        for checker in self.checkers.values():
            close = getattr(checker, "close", None)
            if close is not None:
                await defer.maybeDeferred(close)
        self.connections.stop()
        # 5. The identity table's last writes, before StateService closes the store.
        if self.identity_persistence is not None:
            await self.identity_persistence.drain()
        await defer.maybeDeferred(super().stopService)
        for accounting in [*self.accounting.values(), *self._retired_accounting]:
            accounting.close()
        for export in [*self._retired_exports, *([self._identity_export] if self._identity_export else [])]:
            export.close()
        await self.radius.close()

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())


def _radius_authorizer(checker: RadiusChecker) -> Authorizer:
    """RADIUS authorizes by name only (Authorize-Only has no secondary field)."""

    def authorize(username: str, secondary: str | None) -> defer.Deferred[AuthenticatedUser]:
        return checker.authorize(username)

    return authorize


def _ensure_private_folder(path: Path) -> None:
    """Create the state folder 0700 if missing."""
    if not path.exists():
        os.makedirs(path, mode=0o700, exist_ok=True)


def build(config: Config, reactor: Any, **options: Any) -> GatewayService:
    """The service tree for C{config}."""
    return GatewayService(config, reactor, **options)


