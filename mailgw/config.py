"""The configuration contract: one TOML file → frozen dataclasses, all validation here.

:func:`load_config` reads a file, :func:`parse_config` validates an already parsed
mapping.  Every problem found is reported, all together, in one :class:`ConfigError`
whose lines each start with the key path (``pop3s.default_server.port: must be
1..65535, got 99999``); nothing else is ever raised for bad input.  A configuration that
parses is internally consistent: references between sections resolve, listeners do not
collide, and (with ``check_files``) the files it names exist.

Conventions of the result:

- Lists are tuples.  Strings keep their TOML value, ``""`` included where SPEC [3] says
  "``""`` = none/off" (group names, endpoints) and ``secondary_dn_field = "none"``.
- Paths are absolute, resolved against the configuration file's folder; an optional path
  left ``""`` is ``None``.
- Secrets (LDAP bind password, RADIUS secrets) are :class:`Secret` objects, so that no
  ``repr`` of a configuration, and no problem message, ever shows one.
- Cross-section checks (references, listeners, TLS requirements) apply to enabled proxies
  and an enabled SSO only; types, ranges and unknown keys are checked everywhere.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time
from pathlib import Path
from string import Formatter
from types import MappingProxyType
from typing import NamedTuple, TypeAlias
from urllib.parse import urlsplit

__all__ = [
    "ATTACHMENT_ACTIONS",
    "AUTHENTICATION_METHODS",
    "CLIENT_CERTIFICATE_MODES",
    "DEFAULT_GROUP_POLICY",
    "DN_FIELDS",
    "HEADER_RULE_ACTIONS",
    "LOG_FORMATS",
    "PROTOCOLS",
    "SCANNER_FAILURE_ACTIONS",
    "SCAN_LIMIT_ACTIONS",
    "SERVER_GROUP_PROTOCOLS",
    "SSO_MODES",
    "STATE_BACKENDS",
    "TLS_SUPPORT",
    "TLS_VERSIONS",
    "UPSTREAM_TLS",
    "USERNAME_FROM_CERTIFICATE",
    "AAAServerGroup",
    "AdminConfig",
    "CertificateAuthorizationConfig",
    "ClamdAddress",
    "Config",
    "ConfigError",
    "GatewayConfig",
    "GroupPolicy",
    "HeaderRule",
    "HostPort",
    "InspectionProfile",
    "InterfaceConfig",
    "LdapGroup",
    "Listener",
    "LocalGroup",
    "MACAddress",
    "PolicyEntry",
    "PollerConfig",
    "Pop3Group",
    "Pop3Server",
    "ProxyConfig",
    "RadiusCollector",
    "RadiusGroup",
    "RadiusServer",
    "SSOConfig",
    "Secret",
    "StateConfig",
    "TLSConfig",
    "UpstreamServerConfig",
    "load_config",
    "parse_config",
    "read_toml",
]


# --- Enumerations --------------------------------------------------------------------

PROTOCOLS = ("pop3s", "imap4s", "smtps")
LOG_FORMATS = ("text", "json")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
CLIENT_CERTIFICATE_MODES = ("none", "optional", "required")
TLS_SUPPORT = ("disabled", "enabled", "required")
UPSTREAM_TLS = ("none", "starttls", "implicit")
AUTHENTICATION_METHODS = ("aaa", "certificate", "piggyback", "mailhost")
SERVER_GROUP_PROTOCOLS = ("local", "ldap", "radius", "pop3")
USERNAME_FROM_CERTIFICATE = ("entire-dn", "dn-fields")
DN_FIELDS = (
    "C", "CN", "DNQ", "EA", "GENQ", "GN", "I", "L", "N",
    "O", "OU", "SER", "SN", "SP", "T", "UID", "UPN",
)  # fmt: skip
SSO_MODES = ("inline", "monitor")
STATE_BACKENDS = ("sqlite", "postgresql")
# [[inspection]] [4.9]
SCAN_LIMIT_ACTIONS = ("refuse", "pass")
SCANNER_FAILURE_ACTIONS = ("tempfail", "pass")
ATTACHMENT_ACTIONS = ("strip", "reject")
HEADER_RULE_ACTIONS = ("reject", "tag")

DEFAULT_GROUP_POLICY = "DfltGrpPolicy"

# protocol → (implicit-TLS port, STARTTLS port) of the gateway's listeners [3]
_LISTEN_PORTS = {"pop3s": (995, 110), "imap4s": (993, 143), "smtps": (988, 587)}
# protocol → (plain/STARTTLS port, implicit-TLS port) of a mail server
_SERVER_PORTS = {"pop3s": (110, 995), "imap4s": (143, 993), "smtps": (587, 465)}


# --- Errors and secrets --------------------------------------------------------------


class ConfigError(Exception):
    """
    An invalid configuration.  ``problems`` holds one line per problem, each starting
    with the key path it concerns; ``str()`` joins them with newlines.
    """

    problems: list[str]

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(*self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


class Secret:
    """
    A configured secret.  ``repr``/``str`` never show it; :meth:`reveal` does, at the one
    place that needs the value (the bind, the RADIUS packet).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogatepass"),
            other._value.encode("utf-8", "surrogatepass"),
        )

    def __hash__(self) -> int:
        return hash(self._value)


# --- The configuration objects -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """``[gateway]``.  ``listen_backlog`` is the listen(2) backlog of every proxy listener."""

    state_dir: Path
    log_format: str
    node_name: str
    workers: int
    listen_backlog: int = 511


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """``[tls]``: the certificate the proxies present and client-certificate checking."""

    certificate: Path
    private_key: Path
    generate_self_signed: bool
    minimum_version: str
    client_ca: Path | None
    client_certificate: str


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """One ``[[interface]]``: an address the enabled proxies listen on."""

    name: str
    address: str
    management_only: bool
    pop3s: bool
    imap4s: bool
    smtps: bool
    proxy_protocol: bool

    def enables(self, protocol: str) -> bool:
        """Whether the proxy ``protocol`` ("pop3s", ...) listens on this interface."""
        return bool(getattr(self, protocol))


@dataclass(frozen=True, slots=True)
class UpstreamServerConfig:
    """``[PROXY.default_server]``: the mail server behind a proxy."""

    host: str
    port: int
    tls: str
    verify_certificate: bool
    ca: Path | None
    #: tell the server the real client before the login [4.7] (IMAP ID, XCLIENT)
    forward_client_address: bool = False


@dataclass(frozen=True, slots=True)
class CertificateAuthorizationConfig:
    """``[PROXY.authorization]``: client certificate → username [5.3]."""

    username_from_certificate: str
    primary_dn_field: str
    secondary_dn_field: str


class Listener(NamedTuple):
    """A port a proxy listens on, and whether TLS starts with the first byte."""

    port: int
    implicit_tls: bool


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """
    ``[pop3s]``, ``[imap4s]`` or ``[smtps]``; ``protocol`` says which.  Before login, a
    command line may have at most ``max_login_line`` bytes and an IMAP literal at most
    ``max_login_literal`` (read in all three sections, so they share one shape).
    """

    protocol: str
    enabled: bool
    port: int
    starttls_port: int
    tls_support: str
    allow_plaintext_auth: bool
    authentication: tuple[str, ...]
    authentication_server_group: str
    authorization_server_group: str
    accounting_server_group: str
    default_group_policy: str
    unauthenticated_session_limit: int
    username_password_delimiter: str
    server_delimiter: str
    allowed_servers: tuple[str, ...]
    login_timeout: int
    idle_timeout: int
    default_server: UpstreamServerConfig
    authorization: CertificateAuthorizationConfig
    max_login_line: int = 4096
    max_login_literal: int = 4096
    #: ``[smtps]`` only: the SIZE advertised while the default server's own is not known
    #: (0 = SIZE without a limit), and the seconds between two readings of its EHLO
    fallback_message_size: int = 10240000
    capabilities_refresh: int = 600

    def listen_ports(self) -> tuple[Listener, ...]:
        """The ports ``tls_support`` opens [4.1] (whether or not the proxy is enabled)."""
        implicit = Listener(self.port, True)
        plain = (Listener(self.starttls_port, False),) if self.starttls_port else ()
        if self.tls_support == "disabled":
            return plain
        if self.tls_support == "required":
            return (implicit,)
        return (implicit, *plain)


@dataclass(frozen=True, slots=True)
class LocalGroup:
    """
    ``protocol = "local"``: users and hashes in a TOML file.  ``max_pending``, in every
    group: the checks queued or running at once (0 = no limit) [4.10]; ``cache_ttl``,
    in every group: seconds a successful check is remembered (0 = off) [5.6].
    """

    name: str
    protocol: str
    users_file: Path
    max_pending: int = 64
    cache_ttl: int = 300


@dataclass(frozen=True, slots=True)
class LdapGroup:
    """
    ``protocol = "ldap"``.  ``user_filter`` is a ``str.format`` template with the fields
    ``username`` and ``secondary`` (substitute RFC 4515-escaped values); ``""`` for
    ``bind_dn`` means an anonymous search and for ``group_policy_attribute`` none.
    ``group_policy_map`` is read-only (so the object is not hashable).
    """

    name: str
    protocol: str
    servers: tuple[str, ...]
    start_tls: bool
    ca: Path | None
    bind_dn: str
    bind_password: Secret
    base_dn: str
    user_filter: str
    group_policy_attribute: str
    group_policy_map: Mapping[str, str]
    timeout: float
    max_pending: int = 64
    cache_ttl: int = 300


@dataclass(frozen=True, slots=True)
class RadiusServer:
    """One server of a RADIUS group."""

    host: str
    auth_port: int
    acct_port: int
    secret: Secret


@dataclass(frozen=True, slots=True)
class RadiusGroup:
    """``protocol = "radius"``."""

    name: str
    protocol: str
    servers: tuple[RadiusServer, ...]
    timeout: float
    retries: int
    max_pending: int = 64
    cache_ttl: int = 300


@dataclass(frozen=True, slots=True)
class Pop3Server:
    """One server of a POP3 group (``verify_certificate`` and ``ca`` as for a proxy's
    ``default_server``: an extension of SPEC [3], so a private CA can be trusted)."""

    host: str
    port: int
    tls: str
    verify_certificate: bool = True
    ca: Path | None = None


@dataclass(frozen=True, slots=True)
class Pop3Group:
    """``protocol = "pop3"``: a POP3 login is the password check."""

    name: str
    protocol: str
    servers: tuple[Pop3Server, ...]
    strip_domain: bool
    max_pending: int = 64
    cache_ttl: int = 300


AAAServerGroup: TypeAlias = LocalGroup | LdapGroup | RadiusGroup | Pop3Group


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    """One ``[[group_policy]]`` (or the built-in ``DfltGrpPolicy``).  ``inspection``
    names an ``[[inspection]]`` profile; ``""`` = none (the zero-parsing relay)."""

    name: str
    simultaneous_logins: int
    idle_timeout: int
    max_session_time: int
    inspection: str = ""


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """
    Where clamd listens: C{kind} C{"unix"} with an absolute C{path}, or C{"tcp"} with
    C{host} and C{port}.  C{str()} gives the configuration syntax back
    (C{unix:/run/clamav/clamd.ctl}, C{tcp:127.0.0.1:3310}, C{tcp:[::1]:3310}).
    """

    kind: str
    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """
    One of C{header_rules}: when a C{header} field (name compared case-insensitively)
    has a value that C{match} finds (C{re.search} on the unfolded value), the message is
    refused (C{action = "reject"}) or passes with C{tag} put in front of its Subject
    (C{action = "tag"}; C{tag} is C{""} for C{"reject"}).
    """

    header: str
    match: re.Pattern[str]
    action: str
    tag: str = ""


@dataclass(frozen=True, slots=True)
class InspectionProfile:
    """
    One C{[[inspection]]} profile [4.9].  C{clamd} is C{None} for no antivirus.
    C{attachments_deny} holds lower-cased globs and C{content_types_deny} lower-cased
    C{type/subtype} or C{type/*}; use L{denied_attachment} and L{denied_content_type}
    to match them.
    """

    name: str
    max_message_size: int
    scan_limit: int
    scan_limit_action: str
    clamd: ClamdAddress | None
    clamd_timeout: float
    on_scanner_failure: str
    attachments_deny: tuple[str, ...]
    content_types_deny: tuple[str, ...]
    attachment_action: str
    header_rules: tuple[HeaderRule, ...]

    def denied_attachment(self, filename: str) -> str | None:
        """
        The first glob of C{attachments_deny} that the file name matches
        (case-insensitively, on the part after the last C{/} or C{\\}), or C{None}.
        """
        base = re.split(r"[/\\]", filename)[-1].lower()
        for glob in self.attachments_deny:
            if fnmatch.fnmatchcase(base, glob):
                return glob
        return None

    def denied_content_type(self, content_type: str) -> str | None:
        """
        The entry of C{content_types_deny} that a C{Content-Type} value (parameters
        allowed) matches, case-insensitively, or C{None}.
        """
        value = content_type.partition(";")[0].strip().lower()
        major = value.partition("/")[0]
        for denied in self.content_types_deny:
            if denied == value or denied == f"{major}/*":
                return denied
        return None


@dataclass(frozen=True, slots=True)
class PollerConfig:
    """``[poller]``."""

    enabled: bool
    default_interval: int
    smtp_host: str
    smtp_port: int


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``host:port`` pair; ``str()`` gives it back (IPv6 in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MACAddress:
    """A MAC address, normalised to lower-case ``aa:bb:cc:dd:ee:ff``."""

    value: str

    def __str__(self) -> str:
        return self.value


PolicyEntry: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network | MACAddress


@dataclass(frozen=True, slots=True)
class RadiusCollector:
    """A RADIUS accounting collector that SSO identities are exported to."""

    host: str
    port: int
    secret: Secret


@dataclass(frozen=True, slots=True)
class SSOConfig:
    """``[sso.pop3]``."""

    enabled: bool
    mode: str
    monitor_interface: str
    servers: tuple[HostPort, ...]
    policy: tuple[PolicyEntry, ...]
    ttl: int
    radius_accounting: tuple[RadiusCollector, ...]
    portal: str
    #: a capture file (pcap/pcapng) replayed through the monitor path at start
    replay_file: Path | None = None

    def applies_to(self, ip: str, mac: str | None = None) -> bool:
        """Whether a client at ``ip`` (and ``mac``, if known) is inside ``policy``."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: match both forms.
        addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            addresses.append(address.ipv4_mapped)
        normalised_mac = _parse_mac(mac) if mac is not None else None
        for entry in self.policy:
            if isinstance(entry, MACAddress):
                if normalised_mac is not None and entry == normalised_mac:
                    return True
            elif any(a.version == entry.version and a in entry for a in addresses):
                return True
        return False


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``."""

    socket: Path
    manhole: str
    manhole_authorized_keys: Path | None
    metrics: str


@dataclass(frozen=True, slots=True)
class StateConfig:
    """
    ``[state]`` [11]: where persistent and shared state lives.  ``dsn`` (PostgreSQL) never
    holds a password (that is refused); the password is in ``dsn_password_file``, which
    the store reads when it connects: no configuration object holds it.
    """

    backend: str = "sqlite"
    dsn: str = ""
    dsn_password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    gateway: GatewayConfig
    tls: TLSConfig
    interfaces: tuple[InterfaceConfig, ...]
    pop3s: ProxyConfig
    imap4s: ProxyConfig
    smtps: ProxyConfig
    aaa_server_groups: tuple[AAAServerGroup, ...]
    group_policies: tuple[GroupPolicy, ...]
    poller: PollerConfig
    sso_pop3: SSOConfig
    admin: AdminConfig
    state: StateConfig = StateConfig()
    inspections: tuple[InspectionProfile, ...] = ()
    path: Path | None = None

    def proxies(self) -> tuple[ProxyConfig, ...]:
        """The three proxies, enabled or not, in the order pop3s, imap4s, smtps."""
        return (self.pop3s, self.imap4s, self.smtps)

    def proxy(self, protocol: str) -> ProxyConfig:
        """The proxy named ``protocol``; ``KeyError`` if there is none."""
        for proxy in self.proxies():
            if proxy.protocol == protocol:
                return proxy
        raise KeyError(protocol)

    def interfaces_for(self, protocol: str) -> tuple[InterfaceConfig, ...]:
        """The interfaces the proxy ``protocol`` listens on."""
        return tuple(i for i in self.interfaces if i.enables(protocol))

    def aaa_group(self, name: str) -> AAAServerGroup:
        """The AAA server group called ``name``; ``KeyError`` if there is none."""
        for group in self.aaa_server_groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def group_policy(self, name: str) -> GroupPolicy | None:
        """The group policy called ``name``, or ``None``."""
        for policy in self.group_policies:
            if policy.name == name:
                return policy
        return None

    def inspection(self, name: str) -> InspectionProfile | None:
        """The C{[[inspection]]} profile called C{name}, or C{None} (also for C{""})."""
        for profile in self.inspections:
            if profile.name == name:
                return profile
        return None


# --- Loading -------------------------------------------------------------------------

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> Config:
    """
    Read, parse and validate the configuration file at ``path``; relative paths in it are
    resolved against its folder.  Raises :class:`ConfigError`, also for an unreadable
    file or a TOML syntax error (naming the file, line and column).
    """
    file = Path(path)
    data = read_toml(file)
    config = parse_config(data, file.absolute().parent, check_files=check_files)
    return replace(config, path=file.absolute())


def read_toml(path: str | os.PathLike[str]) -> dict[str, object]:
    """
    Read a TOML file; an unreadable file, bad UTF-8 or a syntax error raises a
    :class:`ConfigError` naming the file (and the line and column).
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise ConfigError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{file}: line {line}: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error(file, text, str(e))) from None
    except ValueError as e:  # e.g. an integer of more digits than int() converts
        raise ConfigError(f"{file}: invalid TOML: {e}") from None


def _toml_error(file: Path, text: str, message: str) -> str:
    position = _TOML_POSITION.search(message)
    if position:
        line, column = position.group(1), position.group(2)
        message = message[: position.start()]
    else:
        end = _TOML_END.search(message)
        if end:
            message = message[: end.start()]
        lines = text.split("\n")
        line, column = str(len(lines)), str(len(lines[-1]) + 1)
    return f"{file}: line {line}, column {column}: invalid TOML: {message}"


def parse_config(data: Mapping[str, object], base_dir: Path, *, check_files: bool = True) -> Config:
    """
    Validate a parsed TOML document and build the :class:`Config`.

    ``base_dir`` is the folder relative paths are resolved against.  With
    ``check_files``, the input files the configuration names must exist.  All problems
    are raised together in one :class:`ConfigError`.
    """
    ctx = _Context()
    if not isinstance(data, Mapping):
        raise ConfigError(f"(document): must be a table, got {_type_name(data)}")
    base = Path(os.path.normpath(Path(base_dir).absolute()))
    root = _Table(ctx, data, "")
    gateway = _parse_gateway(root.table("gateway"), base)
    tls = _parse_tls(root.table("tls"), base)
    interfaces = _parse_interfaces(root)
    pop3s, imap4s, smtps = (_parse_proxy(root.table(p), p, base) for p in PROTOCOLS)
    groups, group_paths = _parse_server_groups(root, base)
    policies = _parse_group_policies(root)
    inspections = _parse_inspections(root, base)
    poller = _parse_poller(root.table("poller"))
    sso = _parse_sso(root.table("sso"), base)
    admin = _parse_admin(root.table("admin"), base)
    state = _parse_state(root.table("state"), base, check_files=check_files)
    root.finish()
    config = Config(
        gateway=gateway,
        tls=tls,
        interfaces=interfaces,
        pop3s=pop3s,
        imap4s=imap4s,
        smtps=smtps,
        aaa_server_groups=groups,
        group_policies=policies,
        poller=poller,
        sso_pop3=sso,
        admin=admin,
        state=state,
        inspections=inspections,
    )
    _check_tls(ctx, config)
    _check_proxies(ctx, config)
    _check_policy_references(ctx, config)
    _check_inspection_references(ctx, config)
    _check_listeners(ctx, config)
    _check_sso_and_admin(ctx, config)
    if check_files:
        _check_files(ctx, config, group_paths)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return config


# --- The reader ----------------------------------------------------------------------


class _Missing:
    pass


_MISSING = _Missing()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    """The key path of ``key`` inside ``path``, quoted as TOML would need it."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{path}.{part}" if path else part


def _edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of neighbours that turn C{a}
    into C{b} (optimal string alignment)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def _closest(key: str, known: Iterable[str]) -> str | None:
    """The known key that C{key} is a typing slip away from (one edit for short keys,
    two for longer ones; case and C{-}/C{_} do not count), if exactly one is closest."""
    folded = key.lower().replace("-", "_")
    limit = 1 if len(folded) <= 4 else 2
    scored = sorted((_edit_distance(folded, k.lower()), k) for k in known if k != key)
    best = [k for d, k in scored if d <= limit and d == scored[0][0]]
    return best[0] if len(best) == 1 else None


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, datetime):
        return "datetime"
    if isinstance(value, date):
        return "date"
    if isinstance(value, time):
        return "time"
    return type(value).__name__


def _choices(values: Sequence[str]) -> str:
    return ", ".join(json.dumps(v) for v in values)


class _Context:
    """The problems found so far in one configuration, and the keys they concern."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.bad: set[str] = set()
        # (key path, group policy name) references to check once all policies are known
        self.policy_references: list[tuple[str, str]] = []
        # names of server groups left out of the result because of their problems
        self.dropped_groups: set[str] = set()
        # key paths whose value is the built-in default (absent from the file)
        self.defaulted: set[str] = set()
        # (key path, inspection profile name) references, checked once all are known
        self.inspection_references: list[tuple[str, str]] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")
        self.bad.add(path)

    def ok(self, *paths: str) -> bool:
        """Whether none of ``paths`` has a problem already (to avoid follow-on noise)."""
        return not any(p in self.bad for p in paths)

    def names_unknown(self, array: str) -> bool:
        """
        Whether some entry of the array of tables ``array`` has no readable name, so that
        a reference to a missing name may only be a follow-on problem.
        """
        pattern = re.compile(rf"{re.escape(array)}(\[\d+\](\.name)?)?")
        return any(pattern.fullmatch(p) for p in self.bad)


class _Table:
    """
    One TOML table being read: typed accessors that report problems and fall back to
    the default, and, in :meth:`finish`, the keys nobody asked for.
    """

    def __init__(self, ctx: _Context, data: Mapping[str, object], path: str) -> None:
        self.ctx = ctx
        self.data = data
        self.path = path
        self._used: set[str] = set()

    def key(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def empty_array(self, key: str) -> bool:
        """Whether ``key`` is present as an empty array (not: absent, or only bad items)."""
        value = self.data.get(key)
        return isinstance(value, list | tuple) and not value

    def problem(self, key: str, message: str) -> None:
        self.ctx.problem(self.key(key), message)

    def _get(self, key: str) -> object:
        self._used.add(key)
        return self.data.get(key, _MISSING)

    def finish(self) -> None:
        """Report every key that no accessor read, with the known key it is probably
        a misspelling of."""
        for key in self.data:
            if key not in self._used:
                close = _closest(key, self._used)
                self.problem(key, f"unknown key (did you mean {json.dumps(close)}?)" if close else "unknown key")

    def ignore_rest(self) -> None:
        """Do not report unknown keys (the table is already known to be wrong)."""
        self._used.update(self.data)

    def string(self, key: str, default: str | None, *, choices: Sequence[str] = ()) -> str:
        """A string; ``default=None`` makes it required."""
        value = self._get(key)
        if isinstance(value, _Missing):
            if default is None:
                self.problem(key, "missing")
                return ""
            return default
        if not isinstance(value, str):
            self.problem(key, f"must be a string, got {_type_name(value)}")
            return default or ""
        if choices and value not in choices:
            self.problem(key, f"must be one of {_choices(choices)}, got {value!r}")
            return default if default is not None else choices[0]
        return value

    def secret(self, key: str, default: str | None) -> Secret:
        """A string never echoed in problems."""
        return Secret(self.string(key, default))

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, got {_type_name(value)}")
            return default
        return value

    def _int(self, key: str) -> int | _Missing | None:
        """The integer at ``key``, ``_MISSING``, or ``None`` after reporting a problem."""
        value = self._get(key)
        if isinstance(value, _Missing):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"must be an integer, got {_type_name(value)}")
            return None
        if not -(2**63) <= value < 2**63:
            self.problem(key, "must be a 64-bit integer, as TOML integers are")
            return None
        return value

    def integer(
        self,
        key: str,
        default: int,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self._int(key)
        if value is None or isinstance(value, _Missing):
            return default
        too_low = minimum is not None and value < minimum
        too_high = maximum is not None and value > maximum
        if too_low or too_high:
            if minimum is not None and maximum is not None:
                self.problem(key, f"must be {minimum}..{maximum}, got {value}")
            elif minimum is not None:
                self.problem(key, f"must be at least {minimum}, got {value}")
            else:
                self.problem(key, f"must be at most {maximum}, got {value}")
            return default
        return value

    def port(self, key: str, default: int, *, allow_zero: bool = False) -> int:
        value = self._int(key)
        if value is None or isinstance(value, _Missing):
            return default
        if allow_zero and not 0 <= value <= 65535:
            self.problem(key, f"must be 0 (none) or 1..65535, got {value}")
            return default
        if not allow_zero and not 1 <= value <= 65535:
            self.problem(key, f"must be 1..65535, got {value}")
            return default
        return value

    def seconds(self, key: str, default: float) -> float:
        """A positive number of seconds, integer or not."""
        value = self._get(key)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"must be a number, got {_type_name(value)}")
            return default
        if not (math.isfinite(value) and value > 0):
            self.problem(key, f"must be a positive number, got {value}")
            return default
        return value

    def strings(self, key: str, default: Sequence[str]) -> list[tuple[str, str]]:
        """An array of strings, as ``(key path, value)`` pairs; bad items are dropped."""
        value = self._get(key)
        path = self.key(key)
        if isinstance(value, _Missing):
            return [(f"{path}[{i}]", v) for i, v in enumerate(default)]
        if not isinstance(value, list | tuple):
            self.problem(key, f"must be an array of strings, got {_type_name(value)}")
            return []
        items: list[tuple[str, str]] = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                items.append((f"{path}[{i}]", item))
            else:
                self.ctx.problem(f"{path}[{i}]", f"must be a string, got {_type_name(item)}")
        return items

    def string_map(self, key: str) -> list[tuple[str, str, str]]:
        """A table of strings, as ``(key path, key, value)`` triples."""
        value = self._get(key)
        if isinstance(value, _Missing):
            return []
        if not isinstance(value, Mapping):
            self.problem(key, f"must be a table of strings, got {_type_name(value)}")
            return []
        items: list[tuple[str, str, str]] = []
        for k, v in value.items():
            path = _join(self.key(key), str(k))
            if isinstance(v, str):
                items.append((path, str(k), v))
            else:
                self.ctx.problem(path, f"must be a string, got {_type_name(v)}")
        return items

    def table(self, key: str) -> _Table:
        """A sub-table; an empty one when absent or not a table (reported)."""
        value = self._get(key)
        if isinstance(value, _Missing):
            return _Table(self.ctx, {}, self.key(key))
        if not isinstance(value, Mapping):
            self.problem(key, f"must be a table, got {_type_name(value)}")
            return _Table(self.ctx, {}, self.key(key))
        return _Table(self.ctx, value, self.key(key))

    def tables(self, key: str) -> list[_Table] | None:
        """An array of tables (``[[key]]``, or inline); ``None`` when absent."""
        value = self._get(key)
        path = self.key(key)
        if isinstance(value, _Missing):
            return None
        if not isinstance(value, list | tuple):
            self.problem(key, f"must be an array of tables, got {_type_name(value)}")
            return []
        tables: list[_Table] = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                tables.append(_Table(self.ctx, item, f"{path}[{i}]"))
            else:
                self.ctx.problem(f"{path}[{i}]", f"must be a table, got {_type_name(item)}")
        return tables

    def path_value(self, key: str, default: str, base: Path) -> Path | None:
        """A file path resolved against ``base``; ``""`` gives ``None``."""
        value = self.string(key, default)
        if not value:
            return None
        if "\0" in value:
            self.problem(key, "must not contain a NUL character")
            return None
        return _resolve(base, value)

    def required_path(self, key: str, default: str, base: Path) -> Path:
        resolved = self.path_value(key, default, base)
        if resolved is None:
            if self.ctx.ok(self.key(key)):
                self.problem(key, "must not be empty")
            return base
        return resolved


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / value))


# --- Value checks --------------------------------------------------------------------

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_INTERFACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_POLICY_NAME = re.compile(r"[A-Za-z0-9]{4,15}")
_LDAP_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+")
_NETWORK_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_MAC = re.compile(
    r"([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})"
    r"[:-]([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})"
)
_MAC_CISCO = re.compile(r"([0-9A-Fa-f]{4})\.([0-9A-Fa-f]{4})\.([0-9A-Fa-f]{4})")


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _is_host(value: str) -> bool:
    """An IP literal or a DNS name (underscores tolerated, as internal names have them)."""
    if _ip(value) is not None:
        return True
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _is_token(value: str, maximum: int) -> bool:
    """1..maximum printable characters, none of them white space."""
    return 0 < len(value) <= maximum and all(c.isprintable() and not c.isspace() for c in value)


def _check_host(ctx: _Context, path: str, value: str) -> None:
    if not _is_host(value):
        ctx.problem(path, f"not a host name or IP address: {value!r}")


def _parse_mac(value: str) -> MACAddress | None:
    match = _MAC.fullmatch(value)
    if match and len({value[2], value[5], value[8], value[11], value[14]}) == 1:
        return MACAddress(":".join(match.groups()).lower())
    match = _MAC_CISCO.fullmatch(value)
    if match:
        digits = "".join(match.groups()).lower()
        return MACAddress(":".join(digits[i : i + 2] for i in range(0, 12, 2)))
    return None


def _parse_host_port(value: str) -> HostPort | None:
    """``host:port`` or ``[v6]:port``."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep or not isinstance(_ip(host), ipaddress.IPv6Address):
            return None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or ":" in host or not _is_host(host):
            return None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return None
    return HostPort(host, int(port))


def _check_delimiter(t: _Table, key: str, default: str) -> str:
    value = t.string(key, default)
    if len(value) != 1 or not ("!" <= value <= "~"):
        if t.ctx.ok(t.key(key)):
            t.problem(key, f"must be one printable ASCII character other than space, got {value!r}")
        return default
    return value


# Endpoint descriptions (Twisted's serverFromString syntax): type → keyword arguments.
_ENDPOINT_KEYWORDS: Mapping[str, frozenset[str]] = {
    "tcp": frozenset({"port", "interface", "backlog"}),
    "tcp6": frozenset({"port", "interface", "backlog"}),
    "ssl": frozenset(
        {"port", "interface", "backlog", "privateKey", "certKey", "sslmethod"} | {"extraCertChain", "dhParameters"}
    ),
    "unix": frozenset({"address", "mode", "backlog", "lockfile"}),
    "ssh": frozenset({"port", "interface", "backlog"}),
}


def split_endpoint(description: str) -> list[str]:
    """Split at unescaped colons, as Twisted does (``\\:`` is a literal colon)."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _check_endpoint(
    ctx: _Context,
    path: str,
    description: str,
    types: Sequence[str],
    example: str,
    *,
    loopback_only: bool = False,
) -> None:
    parts = split_endpoint(description)
    kind, arguments = parts[0], parts[1:]
    if kind not in types or not arguments:
        ctx.problem(
            path,
            f"not an endpoint description of type {_choices(types)} (e.g. {example!r}), got {description!r}",
        )
        return
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for argument in arguments:
        name, sep, value = argument.partition("=")
        if sep:
            if name not in _ENDPOINT_KEYWORDS[kind]:
                ctx.problem(path, f"unknown {kind} endpoint parameter {name!r}")
                return
            keywords[name] = value
        else:
            positional.append(argument)
    if kind == "unix":
        if not (positional[:1] or [keywords.get("address", "")])[0]:
            ctx.problem(path, f"a unix endpoint needs a socket path, got {description!r}")
        return
    port = positional[0] if positional else keywords.get("port", "")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        ctx.problem(path, f"endpoint port must be 0..65535, got {port!r}")
        return
    interface = keywords.get("interface")
    address = _ip(interface) if interface is not None else None
    if interface is not None and address is None:
        ctx.problem(path, f"endpoint interface is not an IP address: {interface!r}")
    elif loopback_only and (address is None or not address.is_loopback):
        ctx.problem(path, "must listen on loopback only (interface=127.0.0.1 or interface=\\:\\:1)")


def _policy_name_problem(name: str) -> str | None:
    if not _POLICY_NAME.fullmatch(name):
        return f"must be 4-15 letters and digits, got {name!r}"
    return None


# --- Sections ------------------------------------------------------------------------


def _parse_gateway(t: _Table, base: Path) -> GatewayConfig:
    state_dir = t.required_path("state_dir", "/var/lib/mailgw", base)
    log_format = t.string("log_format", "text", choices=LOG_FORMATS)
    node_name = t.string("node_name", "mailgw")
    if t.ctx.ok(t.key("node_name")) and not _is_token(node_name, 253):
        t.problem("node_name", f"must be 1-253 printable characters without spaces, got {node_name!r}")
    # 0: one worker per CPU [10]
    workers = t.integer("workers", 1, minimum=0, maximum=256)
    listen_backlog = t.integer("listen_backlog", 511, minimum=1, maximum=65535)
    t.finish()
    return GatewayConfig(state_dir, log_format, node_name, workers, listen_backlog)


def _parse_tls(t: _Table, base: Path) -> TLSConfig:
    config = TLSConfig(
        certificate=t.required_path("certificate", "tls/gateway.pem", base),
        private_key=t.required_path("private_key", "tls/gateway.key", base),
        generate_self_signed=t.boolean("generate_self_signed", False),
        minimum_version=t.string("minimum_version", "TLSv1.2", choices=TLS_VERSIONS),
        client_ca=t.path_value("client_ca", "", base),
        client_certificate=t.string("client_certificate", "none", choices=CLIENT_CERTIFICATE_MODES),
    )
    t.finish()
    return config


def _parse_interfaces(root: _Table) -> tuple[InterfaceConfig, ...]:
    tables = root.tables("interface")
    if tables is None:
        return (InterfaceConfig("inside", "127.0.0.1", False, True, True, True, False),)
    if root.empty_array("interface"):
        root.problem("interface", "must have at least one entry (omit it for the default)")
    interfaces: list[InterfaceConfig] = []
    seen: dict[str, str] = {}
    for t in tables:
        name = t.string("name", "inside")
        if not _INTERFACE_NAME.fullmatch(name):
            if t.ctx.ok(t.key("name")):
                t.problem("name", f"must be 1-32 letters, digits, '_', '.' or '-', got {name!r}")
        elif name in seen:
            t.problem("name", f"{name!r} is already the name of {seen[name]}")
        else:
            seen[name] = t.path
        address = t.string("address", "127.0.0.1")
        ip = _ip(address)
        if ip is None:
            if t.ctx.ok(t.key("address")):
                t.problem("address", f"not an IP address: {address!r}")
        else:
            address = str(ip)
        management_only = t.boolean("management_only", False)
        flags: dict[str, bool] = {}
        for protocol in PROTOCOLS:
            flags[protocol] = t.boolean(protocol, not management_only)
            if management_only and t.has(protocol) and flags[protocol]:
                t.problem(protocol, "must not be true on a management_only interface")
                flags[protocol] = False
        proxy_protocol = t.boolean("proxy_protocol", False)
        t.finish()
        interfaces.append(
            InterfaceConfig(
                name,
                address,
                management_only,
                flags["pop3s"],
                flags["imap4s"],
                flags["smtps"],
                proxy_protocol,
            )
        )
    return tuple(interfaces)


def _parse_proxy(t: _Table, protocol: str, base: Path) -> ProxyConfig:
    implicit_port, starttls_port = _LISTEN_PORTS[protocol]
    enabled = t.boolean("enabled", True)
    port = t.port("port", implicit_port)
    starttls = t.port("starttls_port", starttls_port, allow_zero=True)
    tls_support = t.string("tls_support", "enabled", choices=TLS_SUPPORT)
    allow_plaintext_auth = t.boolean("allow_plaintext_auth", False)
    authentication = _parse_authentication(t, protocol)
    authentication_server_group = t.string("authentication_server_group", "LOCAL")
    if not t.has("authentication_server_group"):
        t.ctx.defaulted.add(t.key("authentication_server_group"))
    authorization_server_group = t.string("authorization_server_group", "")
    accounting_server_group = t.string("accounting_server_group", "")
    default_group_policy = t.string("default_group_policy", DEFAULT_GROUP_POLICY)
    limit = t.integer("unauthenticated_session_limit", 0, minimum=0)
    user_delimiter = _check_delimiter(t, "username_password_delimiter", ":")
    server_delimiter = _check_delimiter(t, "server_delimiter", "@")
    if user_delimiter == server_delimiter and t.ctx.ok(t.key("server_delimiter"), t.key("username_password_delimiter")):
        t.problem(
            "server_delimiter",
            f"must differ from username_password_delimiter, both are {server_delimiter!r}",
        )
    allowed_servers: list[str] = []
    for path, value in t.strings("allowed_servers", ()):
        _check_host(t.ctx, path, value)
        allowed_servers.append(value)
    login_timeout = t.integer("login_timeout", 60, minimum=1)
    idle_timeout = t.integer("idle_timeout", 1800, minimum=1)
    max_login_line = t.integer("max_login_line", 4096, minimum=512, maximum=65536)
    max_login_literal = t.integer("max_login_literal", 4096, minimum=0, maximum=65536)
    fallback_message_size, capabilities_refresh = 10240000, 600
    if protocol == "smtps":
        # The SIZE of the gateway's EHLO before AUTH while the server's is not known [4.5].
        fallback_message_size = t.integer("fallback_message_size", 10240000, minimum=0, maximum=2**53)
        capabilities_refresh = t.integer("capabilities_refresh", 600, minimum=10, maximum=86400)
    default_server = _parse_upstream(t.table("default_server"), protocol, base)
    authorization = _parse_certificate_authorization(t.table("authorization"))
    t.finish()
    return ProxyConfig(
        protocol=protocol,
        enabled=enabled,
        port=port,
        starttls_port=starttls,
        tls_support=tls_support,
        allow_plaintext_auth=allow_plaintext_auth,
        authentication=authentication,
        authentication_server_group=authentication_server_group,
        authorization_server_group=authorization_server_group,
        accounting_server_group=accounting_server_group,
        default_group_policy=default_group_policy,
        unauthenticated_session_limit=limit,
        username_password_delimiter=user_delimiter,
        server_delimiter=server_delimiter,
        allowed_servers=tuple(allowed_servers),
        login_timeout=login_timeout,
        idle_timeout=idle_timeout,
        default_server=default_server,
        authorization=authorization,
        max_login_line=max_login_line,
        max_login_literal=max_login_literal,
        fallback_message_size=fallback_message_size,
        capabilities_refresh=capabilities_refresh,
    )


def _parse_authentication(t: _Table, protocol: str) -> tuple[str, ...]:
    allowed = AUTHENTICATION_METHODS if protocol == "smtps" else AUTHENTICATION_METHODS[:3]
    items = t.strings("authentication", ("aaa",))
    methods: list[str] = []
    for path, method in items:
        if method == "mailhost" and protocol != "smtps":
            t.ctx.problem(
                path,
                '"mailhost" is for smtps only (POP3S and IMAP4S always log in to the mail server)',
            )
        elif method not in allowed:
            t.ctx.problem(path, f"must be one of {_choices(allowed)}, got {method!r}")
        elif method in methods:
            t.ctx.problem(path, f"{method!r} is listed twice")
        else:
            methods.append(method)
    if not items and (t.empty_array("authentication") or not t.has("authentication")):
        t.problem("authentication", "must list at least one method")
    return tuple(methods)


def _parse_upstream(t: _Table, protocol: str, base: Path) -> UpstreamServerConfig:
    host = t.string("host", "127.0.0.1")
    if t.ctx.ok(t.key("host")):
        _check_host(t.ctx, t.key("host"), host)
    tls = t.string("tls", "starttls", choices=UPSTREAM_TLS)
    plain_port, implicit_port = _SERVER_PORTS[protocol]
    port = t.port("port", implicit_port if tls == "implicit" else plain_port)
    config = UpstreamServerConfig(
        host=host,
        port=port,
        tls=tls,
        verify_certificate=t.boolean("verify_certificate", True),
        ca=t.path_value("ca", "", base),
        forward_client_address=t.boolean("forward_client_address", False),
    )
    t.finish()
    return config


def _parse_certificate_authorization(t: _Table) -> CertificateAuthorizationConfig:
    mode = t.string("username_from_certificate", "dn-fields", choices=USERNAME_FROM_CERTIFICATE)
    primary = t.string("primary_dn_field", "CN", choices=DN_FIELDS)
    secondary = t.string("secondary_dn_field", "OU", choices=(*DN_FIELDS, "none"))
    if (
        mode == "dn-fields"
        and primary == secondary
        and t.ctx.ok(t.key("primary_dn_field"), t.key("secondary_dn_field"))
    ):
        t.problem("secondary_dn_field", f"must differ from primary_dn_field ({primary!r})")
    t.finish()
    return CertificateAuthorizationConfig(mode, primary, secondary)


def _parse_server_groups(root: _Table, base: Path) -> tuple[tuple[AAAServerGroup, ...], list[str]]:
    """The groups, and the key path of each (for later problems)."""
    groups: list[AAAServerGroup] = []
    paths: list[str] = []
    seen: dict[str, str] = {}
    for t in root.tables("aaa_server_group") or []:
        name = t.string("name", None)
        if name and not _GROUP_NAME.fullmatch(name):
            t.problem("name", f"must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        elif name in seen:
            t.problem("name", f"{name!r} is already the name of {seen[name]}")
        elif name:
            seen[name] = t.path
        protocol = t.string("protocol", None, choices=SERVER_GROUP_PROTOCOLS)
        if not t.ctx.ok(t.key("protocol")):
            t.ignore_rest()
            t.ctx.dropped_groups.add(name)
            continue
        group: AAAServerGroup
        if protocol == "local":
            group = LocalGroup(name, protocol, t.required_path("users_file", "users.toml", base))
        elif protocol == "ldap":
            group = _parse_ldap_group(t, name, base)
        elif protocol == "radius":
            group = _parse_radius_group(t, name)
        else:
            group = _parse_pop3_group(t, name, base)
        # every protocol: the bound on checks queued or in flight [4.10]
        group = replace(group, max_pending=t.integer("max_pending", 64, minimum=0))
        # every protocol: seconds a successful check is remembered [5.6]
        group = replace(group, cache_ttl=t.integer("cache_ttl", 300, minimum=0, maximum=86400))
        t.finish()
        groups.append(group)
        paths.append(t.path)
    return tuple(groups), paths


def _parse_ldap_group(t: _Table, name: str, base: Path) -> LdapGroup:
    servers: list[str] = []
    items = t.strings("servers", ())
    for path, url in items:
        problem = _ldap_url_problem(url)
        if problem:
            t.ctx.problem(path, problem)
        servers.append(url)
    if not items and (t.empty_array("servers") or not t.has("servers")):
        t.problem("servers", "must list at least one ldap:// or ldaps:// URL")
    start_tls = t.boolean("start_tls", False)
    ca = t.path_value("ca", "", base)
    bind_dn = t.string("bind_dn", "")
    if bind_dn and "=" not in bind_dn:
        t.problem("bind_dn", f"not a distinguished name: {bind_dn!r}")
    bind_password = t.secret("bind_password", "")
    if bind_dn and not bind_password and t.ctx.ok(t.key("bind_password")):
        # an empty password with a DN is an "unauthenticated bind" (RFC 4513 5.1.2)
        t.problem("bind_password", "must not be empty when bind_dn is set")
    if bind_password and not bind_dn and t.ctx.ok(t.key("bind_dn")):
        t.problem("bind_dn", "must be set when bind_password is")
    base_dn = t.string("base_dn", None)
    if t.ctx.ok(t.key("base_dn")) and "=" not in base_dn:
        t.problem("base_dn", f"not a distinguished name: {base_dn!r}")
    user_filter = t.string("user_filter", "(uid={username})")
    if t.ctx.ok(t.key("user_filter")):
        problem = _user_filter_problem(user_filter)
        if problem:
            t.problem("user_filter", problem)
    attribute = t.string("group_policy_attribute", "memberOf")
    if attribute and not _LDAP_ATTRIBUTE.fullmatch(attribute):
        t.problem("group_policy_attribute", f"not an LDAP attribute name: {attribute!r}")
    mapping: dict[str, str] = {}
    for path, value, policy in t.string_map("group_policy_map"):
        problem = _policy_name_problem(policy)
        if problem:
            t.ctx.problem(path, problem)
        else:
            t.ctx.policy_references.append((path, policy))
        mapping[value] = policy
    timeout = t.seconds("timeout", 5)
    return LdapGroup(
        name=name,
        protocol="ldap",
        servers=tuple(servers),
        start_tls=start_tls,
        ca=ca,
        bind_dn=bind_dn,
        bind_password=bind_password,
        base_dn=base_dn,
        user_filter=user_filter,
        group_policy_attribute=attribute,
        group_policy_map=MappingProxyType(mapping),
        timeout=timeout,
    )


def _ldap_url_problem(url: str) -> str | None:
    expected = f"not an ldap:// or ldaps:// server URL: {url!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return expected
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        return expected
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return f"must name a server only (no DN, query or user): {url!r}"
    if port == 0 or not _is_host(parts.hostname):
        return expected
    return None


def _user_filter_problem(user_filter: str) -> str | None:
    """The filter is a ``str.format`` template with the fields username and secondary."""
    try:
        fields = [
            (name, spec, conversion) for _, name, spec, conversion in Formatter().parse(user_filter) if name is not None
        ]
    except ValueError:
        return f"unbalanced braces (write {{{{ or }}}} for a literal brace), got {user_filter!r}"
    names = {name for name, _, _ in fields}
    if "username" not in names:
        return f"must contain {{username}}, got {user_filter!r}"
    unknown = sorted(names - {"username", "secondary"})
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}} (known: {{username}}, {{secondary}})"
    if any(spec or conversion for _, spec, conversion in fields):
        return f"placeholders take no format spec or conversion, got {user_filter!r}"
    depth = 0
    for ch in user_filter:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            break
    if depth != 0 or not (user_filter.startswith("(") and user_filter.endswith(")")):
        return f"must be a parenthesised LDAP filter, got {user_filter!r}"
    return None


def _parse_radius_group(t: _Table, name: str) -> RadiusGroup:
    servers: list[RadiusServer] = []
    tables = t.tables("servers")
    for s in tables or []:
        host = s.string("host", None)
        if s.ctx.ok(s.key("host")):
            _check_host(s.ctx, s.key("host"), host)
        auth_port = s.port("auth_port", 1812)
        acct_port = s.port("acct_port", 1813)
        secret = s.secret("secret", None)
        if not secret and s.ctx.ok(s.key("secret")):
            s.problem("secret", "must not be empty")
        s.finish()
        servers.append(RadiusServer(host, auth_port, acct_port, secret))
    if tables is None or t.empty_array("servers"):
        t.problem("servers", "must list at least one server")
    return RadiusGroup(
        name=name,
        protocol="radius",
        servers=tuple(servers),
        timeout=t.seconds("timeout", 3),
        retries=t.integer("retries", 2, minimum=0),
    )


def _parse_pop3_group(t: _Table, name: str, base: Path) -> Pop3Group:
    servers: list[Pop3Server] = []
    tables = t.tables("servers")
    for s in tables or []:
        host = s.string("host", None)
        if s.ctx.ok(s.key("host")):
            _check_host(s.ctx, s.key("host"), host)
        tls = s.string("tls", "starttls", choices=UPSTREAM_TLS)
        port = s.port("port", 995 if tls == "implicit" else 110)
        verify = s.boolean("verify_certificate", True)
        ca = s.path_value("ca", "", base)
        s.finish()
        servers.append(Pop3Server(host, port, tls, verify, ca))
    if tables is None or t.empty_array("servers"):
        t.problem("servers", "must list at least one server")
    return Pop3Group(name, "pop3", tuple(servers), t.boolean("strip_domain", False))


def _parse_group_policies(root: _Table) -> tuple[GroupPolicy, ...]:
    policies: list[GroupPolicy] = []
    seen: dict[str, str] = {}
    for t in root.tables("group_policy") or []:
        name = t.string("name", None)
        problem = _policy_name_problem(name) if t.ctx.ok(t.key("name")) else None
        if problem:
            t.problem("name", problem)
        elif name in seen:
            t.problem("name", f"{name!r} is already the name of {seen[name]}")
        elif name:
            seen[name] = t.path
        inspection = t.string("inspection", "")
        if inspection and t.ctx.ok(t.key("inspection")):
            t.ctx.inspection_references.append((t.key("inspection"), inspection))
        policies.append(
            GroupPolicy(
                name=name,
                simultaneous_logins=t.integer("simultaneous_logins", 3, minimum=0),
                idle_timeout=t.integer("idle_timeout", 1800, minimum=1),
                max_session_time=t.integer("max_session_time", 0, minimum=0),
                inspection=inspection,
            )
        )
        t.finish()
    if DEFAULT_GROUP_POLICY not in seen:
        policies.append(GroupPolicy(DEFAULT_GROUP_POLICY, 3, 1800, 0))
    return tuple(policies)


# RFC 5322 field-name: printable US-ASCII except ":"
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
# RFC 2045 token (printable US-ASCII except tspecials), without "*": that is the wildcard
_MIME_NAME = r"[!#$%&'+\-.0-9A-Z^_`a-z{|}~]+"
_MIME_TYPE = re.compile(rf"({_MIME_NAME})/({_MIME_NAME}|\*)")
# sun_path of struct sockaddr_un holds 108 bytes, the terminating NUL included
_UNIX_PATH_MAX = 107


def _parse_inspections(root: _Table, base: Path) -> tuple[InspectionProfile, ...]:
    profiles: list[InspectionProfile] = []
    seen: dict[str, str] = {}
    for t in root.tables("inspection") or []:
        name = t.string("name", None)
        if name and not _GROUP_NAME.fullmatch(name):
            t.problem("name", f"must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        elif name in seen:
            t.problem("name", f"{name!r} is already the name of {seen[name]}")
        elif name:
            seen[name] = t.path
        max_message_size = t.integer("max_message_size", 26214400, minimum=1, maximum=2**53)
        scan_limit = t.integer("scan_limit", 26214400, minimum=1, maximum=2**53)
        scan_limit_action = t.string("scan_limit_action", "refuse", choices=SCAN_LIMIT_ACTIONS)
        clamd = _parse_clamd_address(t, "clamd", "unix:/run/clamav/clamd.ctl", base)
        clamd_timeout = t.seconds("clamd_timeout", 30)
        on_scanner_failure = t.string("on_scanner_failure", "tempfail", choices=SCANNER_FAILURE_ACTIONS)
        globs: list[str] = []
        for path, glob in t.strings("attachments_deny", ("*.exe", "*.js", "*.vbs", "*.scr")):
            problem = _glob_problem(glob)
            if problem:
                t.ctx.problem(path, problem)
            else:
                globs.append(glob.lower())
        types: list[str] = []
        for path, value in t.strings("content_types_deny", ("application/x-msdownload",)):
            if _MIME_TYPE.fullmatch(value):
                types.append(value.lower())
            else:
                t.ctx.problem(path, f"not a MIME type (type/subtype or type/*): {value!r}")
        attachment_action = t.string("attachment_action", "strip", choices=ATTACHMENT_ACTIONS)
        rules: list[HeaderRule] = []
        for r in t.tables("header_rules") or []:
            rule = _parse_header_rule(r)
            if rule is not None:
                rules.append(rule)
        t.finish()
        profiles.append(
            InspectionProfile(
                name=name,
                max_message_size=max_message_size,
                scan_limit=scan_limit,
                scan_limit_action=scan_limit_action,
                clamd=clamd,
                clamd_timeout=clamd_timeout,
                on_scanner_failure=on_scanner_failure,
                attachments_deny=tuple(globs),
                content_types_deny=tuple(types),
                attachment_action=attachment_action,
                header_rules=tuple(rules),
            )
        )
    return tuple(profiles)


def _parse_clamd_address(t: _Table, key: str, default: str, base: Path) -> ClamdAddress | None:
    """C{""} (none), C{unix:PATH} (resolved against C{base}) or C{tcp:HOST:PORT}."""
    value = t.string(key, default)
    if not value or not t.ctx.ok(t.key(key)):
        return None
    kind, _, rest = value.partition(":")
    if kind == "unix" and rest:
        if "\0" in rest:
            t.problem(key, "must not contain a NUL character")
            return None
        path = _resolve(base, rest)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            t.problem(key, f"a UNIX socket path has at most {_UNIX_PATH_MAX} bytes, got {path}")
            return None
        return ClamdAddress("unix", path=path)
    if kind == "tcp":
        server = _parse_host_port(rest)
        if server is not None:
            return ClamdAddress("tcp", host=server.host, port=server.port)
    t.problem(key, f'must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus), got {value!r}')
    return None


def _glob_problem(glob: str) -> str | None:
    """Why C{glob} cannot be a file name pattern, if it cannot."""
    if not glob:
        return "must not be empty"
    if any(c in "/\\" or not c.isprintable() for c in glob):
        return f"a file name glob has no '/', '\\' or control characters, got {glob!r}"
    i = 0
    while i < len(glob):
        if glob[i] == "[":
            # fnmatch: "]" right after "[" or "[!" is a member, not the end
            j = i + 1
            if j < len(glob) and glob[j] == "!":
                j += 1
            if j < len(glob) and glob[j] == "]":
                j += 1
            end = glob.find("]", j)
            if end < 0:
                return f"unbalanced '[' in glob {glob!r}"
            i = end
        i += 1
    return None


def _parse_header_rule(t: _Table) -> HeaderRule | None:
    header = t.string("header", None)
    if t.ctx.ok(t.key("header")) and not _HEADER_NAME.fullmatch(header):
        t.problem("header", f"not a header field name: {header!r}")
    match = t.string("match", None)
    pattern: re.Pattern[str] | None = None
    if t.ctx.ok(t.key("match")):
        try:
            pattern = re.compile(match)
        except re.error as e:
            t.problem("match", f"not a regular expression ({e.msg} at position {e.pos}): {match!r}")
        except (RecursionError, OverflowError, ValueError):
            t.problem("match", f"not a usable regular expression: {match!r}")
    action = t.string("action", None, choices=HEADER_RULE_ACTIONS)
    tag = t.string("tag", "")
    if t.has("tag") and t.ctx.ok(t.key("tag"), t.key("action")):
        if action != "tag":
            t.problem("tag", 'only with action = "tag"')
        elif not (0 < len(tag) <= 64 and tag.isprintable()):
            t.problem("tag", f"must be 1-64 printable characters, got {tag!r}")
    elif action == "tag":
        tag = "[SUSPECT]"
    t.finish()
    if pattern is None or not t.ctx.ok(t.key("header"), t.key("action"), t.key("tag")):
        return None
    return HeaderRule(header, pattern, action, tag if action == "tag" else "")


def _parse_poller(t: _Table) -> PollerConfig:
    enabled = t.boolean("enabled", True)
    default_interval = t.integer("default_interval", 300, minimum=1)
    smtp_host = t.string("smtp_host", "127.0.0.1")
    if t.ctx.ok(t.key("smtp_host")):
        _check_host(t.ctx, t.key("smtp_host"), smtp_host)
    smtp_port = t.port("smtp_port", 25)
    t.finish()
    return PollerConfig(enabled, default_interval, smtp_host, smtp_port)


def _parse_sso(sso: _Table, base: Path) -> SSOConfig:
    t = sso.table("pop3")
    sso.finish()
    enabled = t.boolean("enabled", False)
    mode = t.string("mode", "inline", choices=SSO_MODES)
    monitor_interface = t.string("monitor_interface", "")
    if monitor_interface and not _NETWORK_INTERFACE.fullmatch(monitor_interface):
        t.problem("monitor_interface", f"not a network interface name: {monitor_interface!r}")
    servers: list[HostPort] = []
    for path, value in t.strings("servers", ("127.0.0.1:110",)):
        server = _parse_host_port(value)
        if server is None:
            t.ctx.problem(path, f"must be host:port (IPv6 as [address]:port), got {value!r}")
        else:
            servers.append(server)
    policy: list[PolicyEntry] = []
    for path, value in t.strings("policy", ("10.0.0.0/8",)):
        entry = _parse_policy_entry(value)
        if isinstance(entry, str):
            t.ctx.problem(path, entry)
        else:
            policy.append(entry)
    ttl = t.integer("ttl", 28800, minimum=1)
    collectors: list[RadiusCollector] = []
    for c in t.tables("radius_accounting") or []:
        host = c.string("host", None)
        if c.ctx.ok(c.key("host")):
            _check_host(c.ctx, c.key("host"), host)
        port = c.port("port", 1813)
        secret = c.secret("secret", None)
        if not secret and c.ctx.ok(c.key("secret")):
            c.problem("secret", "must not be empty")
        c.finish()
        collectors.append(RadiusCollector(host, port, secret))
    portal = t.string("portal", "")
    if portal:
        _check_endpoint(t.ctx, t.key("portal"), portal, ("ssl",), "ssl:8443:interface=127.0.0.1")
    # A capture file replayed through the monitor path once at start [7].
    replay_file = t.path_value("replay_file", "", base)
    t.finish()
    return SSOConfig(
        enabled=enabled,
        mode=mode,
        monitor_interface=monitor_interface,
        servers=tuple(servers),
        policy=tuple(policy),
        ttl=ttl,
        radius_accounting=tuple(collectors),
        portal=portal,
        replay_file=replay_file,
    )


def _parse_policy_entry(value: str) -> PolicyEntry | str:
    """A network or MAC address, or the problem with ``value``."""
    mac = _parse_mac(value)
    if mac is not None:
        return mac
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"not a CIDR network or MAC address: {value!r}"
    return f"network has host bits set: {value!r}"


def _parse_admin(t: _Table, base: Path) -> AdminConfig:
    socket = t.required_path("socket", "/run/mailgw/admin.sock", base)
    manhole = t.string("manhole", "")
    if manhole:
        _check_endpoint(
            t.ctx,
            t.key("manhole"),
            manhole,
            ("ssh",),
            "ssh:2222:interface=127.0.0.1",
            loopback_only=True,
        )
    keys = t.path_value("manhole_authorized_keys", "", base)
    metrics = t.string("metrics", "")
    if metrics:
        _check_endpoint(
            t.ctx,
            t.key("metrics"),
            metrics,
            ("tcp", "tcp6", "ssl", "unix"),
            "tcp:9125:interface=127.0.0.1",
        )
    t.finish()
    return AdminConfig(socket, manhole, keys, metrics)


def _parse_state(t: _Table, base: Path, *, check_files: bool) -> StateConfig:
    backend = t.string("backend", "sqlite", choices=STATE_BACKENDS)
    dsn = t.string("dsn", "")
    password_file = t.path_value("dsn_password_file", "", base)
    t.finish()
    if dsn:
        # Imported here: psycopg is loaded only by configurations that name a database.
        from mailgw.state.dsn import DSNError, dsn_parameters

        try:
            dsn_parameters(dsn)
        except DSNError as e:
            t.problem("dsn", str(e))  # never quotes the DSN: it may hold the password
            dsn = ""
    elif backend == "postgresql" and t.ctx.ok(t.key("dsn")):
        t.problem("dsn", 'must be set when state.backend is "postgresql" (e.g. "postgresql://mailgw@db1/mailgw")')
    if backend == "postgresql" and password_file is not None and check_files:
        problem = _file_problem(password_file)
        if problem is None:
            try:
                mode = stat.S_IMODE(password_file.stat().st_mode)
            except OSError as e:
                problem = f"cannot access {password_file}: {e.strerror or e}"
            else:
                if mode & 0o006:
                    problem = (
                        f"must not be readable or writable by others (mode {mode:04o}): "
                        f"chmod o-rw {password_file}"
                    )
        if problem is not None:
            t.problem("dsn_password_file", problem)
    return StateConfig(backend, dsn, password_file)


# --- Cross-section checks ------------------------------------------------------------


def _check_tls(ctx: _Context, config: Config) -> None:
    tls = config.tls
    if tls.client_certificate != "none" and tls.client_ca is None and ctx.ok("tls.client_ca"):
        ctx.problem(
            "tls.client_ca",
            f"must be set when tls.client_certificate is {tls.client_certificate!r}",
        )


def _check_proxies(ctx: _Context, config: Config) -> None:
    for proxy in config.proxies():
        if not proxy.enabled:
            continue
        p = proxy.protocol
        if proxy.tls_support == "disabled":
            if proxy.starttls_port == 0 and ctx.ok(f"{p}.starttls_port"):
                ctx.problem(
                    f"{p}.starttls_port",
                    'must not be 0 when tls_support is "disabled" (it is the only port)',
                )
            if not proxy.allow_plaintext_auth:
                ctx.problem(
                    f"{p}.allow_plaintext_auth",
                    'must be true when tls_support is "disabled" (no TLS is offered, so no login could succeed)',
                )
        _check_group_reference(ctx, config, proxy)
        if "certificate" in proxy.authentication:
            where = f"{p}.authentication"
            if config.tls.client_certificate == "none":
                ctx.problem(
                    where,
                    '"certificate" needs tls.client_certificate = "optional" or "required"',
                )
            elif config.tls.client_ca is None:
                ctx.problem(where, '"certificate" needs tls.client_ca')
            if proxy.tls_support == "disabled":
                ctx.problem(where, f'"certificate" needs TLS, but {p}.tls_support is "disabled"')


def _check_group_reference(ctx: _Context, config: Config, proxy: ProxyConfig) -> None:
    p = proxy.protocol
    groups = {g.name: g for g in config.aaa_server_groups}
    # With an unreadable group entry, a missing name may only be a follow-on problem.
    uncertain = ctx.names_unknown("aaa_server_group")

    def lookup(key: str, name: str) -> AAAServerGroup | None:
        group = groups.get(name)
        if group is None and not uncertain and name not in ctx.dropped_groups:
            if key in ctx.defaulted:
                ctx.problem(
                    key,
                    f"no aaa_server_group named {name!r} ({name!r} is the built-in default:"
                    f" define that group, or set {key.rpartition('.')[2]})",
                )
            else:
                ctx.problem(key, f"no aaa_server_group named {name!r}")
        return group

    key = f"{p}.authentication_server_group"
    if ctx.ok(key):
        if "aaa" in proxy.authentication and not proxy.authentication_server_group:
            ctx.problem(key, f'must be set when "aaa" is in {p}.authentication')
        elif proxy.authentication_server_group:
            lookup(key, proxy.authentication_server_group)
    key = f"{p}.authorization_server_group"
    if proxy.authorization_server_group and ctx.ok(key):
        group = lookup(key, proxy.authorization_server_group)
        if group is not None and group.protocol == "pop3":
            ctx.problem(
                key,
                f"aaa_server_group {group.name!r} is a pop3 group, which cannot authorize (use ldap, radius or local)",
            )
    key = f"{p}.accounting_server_group"
    if proxy.accounting_server_group and ctx.ok(key):
        group = lookup(key, proxy.accounting_server_group)
        if group is not None and group.protocol != "radius":
            ctx.problem(
                key,
                f"aaa_server_group {group.name!r} is a {group.protocol} group; accounting needs a radius group",
            )
    key = f"{p}.default_group_policy"
    if proxy.default_group_policy and ctx.ok(key):
        ctx.policy_references.append((key, proxy.default_group_policy))


def _check_policy_references(ctx: _Context, config: Config) -> None:
    if ctx.names_unknown("group_policy"):
        return  # a policy entry is unreadable: missing names may only be follow-on problems
    names = {policy.name for policy in config.group_policies}
    for path, name in ctx.policy_references:
        if name not in names:
            ctx.problem(path, f"no group_policy named {name!r}")


def _check_inspection_references(ctx: _Context, config: Config) -> None:
    if ctx.names_unknown("inspection"):
        return  # a profile entry is unreadable: missing names may only be follow-on problems
    names = {profile.name for profile in config.inspections}
    for path, name in ctx.inspection_references:
        if name not in names:
            ctx.problem(path, f"no inspection profile named {name!r}")


def _overlap(
    a: ipaddress.IPv4Address | ipaddress.IPv6Address,
    b: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    """Whether listening sockets on ``a`` and ``b`` (same port) would collide."""
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        # "::" is dual-stack on Linux (IPV6_V6ONLY off), so it covers IPv4 as well
        if x.is_unspecified and (x.version == y.version or x.version == 6):
            return True
    return False


class _Bound(NamedTuple):
    path: str
    interface: InterfaceConfig
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


def _listeners(config: Config) -> list[_Bound]:
    bound: list[_Bound] = []
    for proxy in config.proxies():
        if not proxy.enabled:
            continue
        for interface in config.interfaces_for(proxy.protocol):
            address = _ip(interface.address)
            if address is None:
                continue
            for listener in proxy.listen_ports():
                key = "port" if listener.implicit_tls else "starttls_port"
                bound.append(_Bound(f"{proxy.protocol}.{key}", interface, address, listener.port))
    return bound


def _check_listeners(ctx: _Context, config: Config) -> None:
    bound = _listeners(config)
    for i, this in enumerate(bound):
        for other in bound[:i]:
            if this.port == other.port and _overlap(this.address, other.address):
                ctx.problem(
                    this.path,
                    f"{this.port} on interface {this.interface.name!r}"
                    f" ({this.interface.address}) is already used by {other.path}"
                    f" on interface {other.interface.name!r} ({other.interface.address})",
                )
                break


def _check_sso_and_admin(ctx: _Context, config: Config) -> None:
    sso = config.sso_pop3
    key = "sso.pop3.monitor_interface"
    if sso.enabled and sso.mode == "monitor" and not sso.monitor_interface and ctx.ok(key):
        ctx.problem(key, 'must be set when mode is "monitor"')
    if sso.enabled and config.gateway.workers != 1 and ctx.ok("gateway.workers"):
        # Each worker would learn and look up identities in a table of its own.
        ctx.problem(
            "gateway.workers",
            "POP3 SSO (sso.pop3.enabled) runs in one process: set workers = 1, or turn SSO off",
        )
    admin = config.admin
    key = "admin.manhole_authorized_keys"
    if admin.manhole and admin.manhole_authorized_keys is None and ctx.ok(key):
        ctx.problem(key, "must be set when admin.manhole is")


def _file_problem(path: Path) -> str | None:
    try:
        if path.is_file():
            return None
        if path.exists():
            return f"not a regular file: {path}"
    except (OSError, ValueError) as e:
        return f"cannot access {path}: {getattr(e, 'strerror', None) or e}"
    return f"file not found: {path}"


def _check_files(ctx: _Context, config: Config, group_paths: list[str]) -> None:
    files: list[tuple[str, Path | None]] = []
    if not config.tls.generate_self_signed:
        files += [
            ("tls.certificate", config.tls.certificate),
            ("tls.private_key", config.tls.private_key),
        ]
    files.append(("tls.client_ca", config.tls.client_ca))
    for proxy in config.proxies():
        files.append((f"{proxy.protocol}.default_server.ca", proxy.default_server.ca))
    local_groups: list[tuple[str, LocalGroup]] = []
    for group, path in zip(config.aaa_server_groups, group_paths, strict=True):
        if isinstance(group, LocalGroup):
            files.append((f"{path}.users_file", group.users_file))
            local_groups.append((f"{path}.users_file", group))
        elif isinstance(group, LdapGroup):
            files.append((f"{path}.ca", group.ca))
        elif isinstance(group, Pop3Group):
            files.extend((f"{path}.servers[{i}].ca", server.ca) for i, server in enumerate(group.servers))
    if config.admin.manhole:
        files.append(("admin.manhole_authorized_keys", config.admin.manhole_authorized_keys))
    for key, file in files:
        if file is not None and ctx.ok(key) and (problem := _file_problem(file)):
            ctx.problem(key, problem)
    # A users file is part of the configuration: check it too, and its policy names.
    # (Imported here because mailgw.auth.users imports this module.)
    from mailgw.auth.users import load_users_file

    policies = {policy.name for policy in config.group_policies}
    check_policies = not ctx.names_unknown("group_policy")
    for key, group in local_groups:
        if not ctx.ok(key):
            continue
        try:
            users = load_users_file(group.users_file)
        except ConfigError as e:
            for problem in e.problems:
                if not problem.startswith(str(group.users_file)):
                    problem = f"{group.users_file}: {problem}"
                ctx.problem(key, problem)
            continue
        for user in users.values():
            if check_policies and user.group_policy is not None and user.group_policy not in policies:
                ctx.problem(
                    key,
                    f"{group.users_file}: users.{_join('', user.name)}.group_policy:"
                    f" no group_policy named {user.group_policy!r}",
                )
