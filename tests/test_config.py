"""Tests for :mod:`mailgw.config` (SPEC [3])."""

from __future__ import annotations

import copy
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import bcrypt
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import (
    DEFAULT_GROUP_POLICY,
    AdminConfig,
    CertificateAuthorizationConfig,
    ClamdAddress,
    Config,
    ConfigError,
    GatewayConfig,
    GroupPolicy,
    HeaderRule,
    HostPort,
    InspectionProfile,
    InterfaceConfig,
    LdapGroup,
    Listener,
    LocalGroup,
    MACAddress,
    PollerConfig,
    Pop3Group,
    Pop3Server,
    ProxyConfig,
    RadiusGroup,
    RadiusServer,
    Secret,
    SSOConfig,
    TLSConfig,
    UpstreamServerConfig,
    load_config,
    parse_config,
)

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mailgw.toml"
BASE_DIR = Path("/etc/mailgw")
DELETE = object()


def base() -> dict[str, Any]:
    """The smallest valid configuration: everything else at its default."""
    return {
        "tls": {"generate_self_signed": True},
        "aaa_server_group": [{"name": "LOCAL", "protocol": "local", "users_file": "users.toml"}],
    }


def ldap_group(**overrides: Any) -> dict[str, Any]:
    group: dict[str, Any] = {
        "name": "corp-ldap",
        "protocol": "ldap",
        "servers": ["ldaps://dc1.example.com"],
        "base_dn": "ou=people,dc=example,dc=com",
    }
    group.update(overrides)
    return group


def radius_group(**overrides: Any) -> dict[str, Any]:
    group: dict[str, Any] = {
        "name": "corp-radius",
        "protocol": "radius",
        "servers": [{"host": "10.0.0.10", "secret": "radius-secret"}],
    }
    group.update(overrides)
    return group


def pop3_group(**overrides: Any) -> dict[str, Any]:
    group: dict[str, Any] = {"name": "mailserver", "protocol": "pop3", "servers": [{"host": "mail.example.com"}]}
    group.update(overrides)
    return group


def inspection(**overrides: Any) -> dict[str, Any]:
    """An [[inspection]] profile named "strict" (everything else at its default)."""
    profile: dict[str, Any] = {"name": "strict"}
    profile.update(overrides)
    return profile


def with_groups(*groups: dict[str, Any]) -> list[dict[str, Any]]:
    """The LOCAL group followed by ``groups``."""
    return [{"name": "LOCAL", "protocol": "local", "users_file": "users.toml"}, *groups]


def merge(data: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with ``patch`` merged in (tables recursively, else replaced)."""
    result = copy.deepcopy(data)
    for key, value in patch.items():
        if value is DELETE:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def problems_of(data: dict[str, Any], *, check_files: bool = False, base_dir: Path = BASE_DIR) -> list[str]:
    try:
        parse_config(data, base_dir, check_files=check_files)
    except ConfigError as e:
        return e.problems
    return []


# --- Known answers: one broken rule each, and the exact problem lines it gives ------------

RULES: list[tuple[str, dict[str, Any], list[str]]] = [
    # unknown keys, at every level
    ("unknownTopLevelKey", {"frobnicate": 1}, ["frobnicate: unknown key"]),
    ("unknownGatewayKey", {"gateway": {"bogus": 1}}, ["gateway.bogus: unknown key"]),
    ("unknownQuotedKey", {"gateway": {"a b": 1}}, ['gateway."a b": unknown key']),
    (
        "unknownKeyInDefaultServer",
        {"pop3s": {"default_server": {"hostname": "x"}}},
        ["pop3s.default_server.hostname: unknown key"],
    ),
    (
        "unknownKeyInInlineTable",
        {"aaa_server_group": with_groups(radius_group(servers=[{"host": "10.0.0.1", "secret": "s", "key": "k"}]))},
        ["aaa_server_group[1].servers[0].key: unknown key"],
    ),
    ("unknownKeyInArrayItem", {"interface": [{"name": "lan", "addr": "10.0.0.1"}]}, ["interface[0].addr: unknown key"]),
    ("unknownSsoKey", {"sso": {"imap": {}}}, ["sso.imap: unknown key"]),
    # types
    ("boolIsNotAnInteger", {"gateway": {"workers": True}}, ["gateway.workers: must be an integer, got boolean"]),
    ("floatIsNotAnInteger", {"pop3s": {"port": 995.0}}, ["pop3s.port: must be an integer, got float"]),
    (
        "stringIsNotABoolean",
        {"tls": {"generate_self_signed": "yes"}},
        ["tls.generate_self_signed: must be true or false, got string"],
    ),
    ("integerIsNotAString", {"gateway": {"node_name": 7}}, ["gateway.node_name: must be a string, got integer"]),
    (
        "tableIsNotAString",
        {"pop3s": {"default_server": {"host": {"a": 1}}}},
        ["pop3s.default_server.host: must be a string, got table"],
    ),
    (
        "datetimeIsNotAString",
        {"gateway": {"log_format": datetime(2024, 1, 1)}},
        ["gateway.log_format: must be a string, got datetime"],
    ),
    ("sectionMustBeATable", {"poller": 3}, ["poller: must be a table, got integer"]),
    (
        "arrayOfStrings",
        {"pop3s": {"authentication": "aaa"}},
        ["pop3s.authentication: must be an array of strings, got string"],
    ),
    (
        "arrayItemType",
        {"pop3s": {"allowed_servers": ["mail.example.com", 5]}},
        ["pop3s.allowed_servers[1]: must be a string, got integer"],
    ),
    # enums
    (
        "logFormat",
        {"gateway": {"log_format": "xml"}},
        ['gateway.log_format: must be one of "text", "json", got \'xml\''],
    ),
    (
        "minimumVersion",
        {"tls": {"minimum_version": "TLSv1.1"}},
        ['tls.minimum_version: must be one of "TLSv1.2", "TLSv1.3", got \'TLSv1.1\''],
    ),
    (
        "clientCertificateMode",
        {"tls": {"client_certificate": "sometimes"}},
        ['tls.client_certificate: must be one of "none", "optional", "required", got \'sometimes\''],
    ),
    (
        "tlsSupport",
        {"pop3s": {"tls_support": "maybe"}},
        ['pop3s.tls_support: must be one of "disabled", "enabled", "required", got \'maybe\''],
    ),
    (
        "upstreamTls",
        {"imap4s": {"default_server": {"tls": "ssl"}}},
        ['imap4s.default_server.tls: must be one of "none", "starttls", "implicit", got \'ssl\''],
    ),
    (
        "serverGroupProtocol",
        {"aaa_server_group": with_groups({"name": "krb", "protocol": "kerberos", "realm": "X"})},
        ['aaa_server_group[1].protocol: must be one of "local", "ldap", "radius", "pop3", got \'kerberos\''],
    ),
    (
        "usernameFromCertificate",
        {"pop3s": {"authorization": {"username_from_certificate": "cn"}}},
        ['pop3s.authorization.username_from_certificate: must be one of "entire-dn", "dn-fields", got \'cn\''],
    ),
    (
        "primaryDnField",
        {"pop3s": {"authorization": {"primary_dn_field": "cn"}}},
        [
            'pop3s.authorization.primary_dn_field: must be one of "C", "CN", "DNQ", "EA", "GENQ", "GN",'
            ' "I", "L", "N", "O", "OU", "SER", "SN", "SP", "T", "UID", "UPN", got \'cn\''
        ],
    ),
    (
        "primaryDnFieldIsNeverNone",
        {"pop3s": {"authorization": {"primary_dn_field": "none"}}},
        [
            'pop3s.authorization.primary_dn_field: must be one of "C", "CN", "DNQ", "EA", "GENQ", "GN",'
            ' "I", "L", "N", "O", "OU", "SER", "SN", "SP", "T", "UID", "UPN", got \'none\''
        ],
    ),
    (
        "secondaryDnFieldDiffers",
        {"pop3s": {"authorization": {"primary_dn_field": "EA", "secondary_dn_field": "EA"}}},
        ["pop3s.authorization.secondary_dn_field: must differ from primary_dn_field ('EA')"],
    ),
    (
        "ssoMode",
        {"sso": {"pop3": {"mode": "sniff"}}},
        ['sso.pop3.mode: must be one of "inline", "monitor", got \'sniff\''],
    ),
    # ranges
    (
        "upstreamPort",
        {"pop3s": {"default_server": {"port": 99999}}},
        ["pop3s.default_server.port: must be 1..65535, got 99999"],
    ),
    ("listenPortZero", {"pop3s": {"port": 0}}, ["pop3s.port: must be 1..65535, got 0"]),
    (
        "starttlsPortNegative",
        {"imap4s": {"starttls_port": -1}},
        ["imap4s.starttls_port: must be 0 (none) or 1..65535, got -1"],
    ),
    ("pollerPort", {"poller": {"smtp_port": 65536}}, ["poller.smtp_port: must be 1..65535, got 65536"]),
    (
        "radiusPort",
        {"aaa_server_group": with_groups(radius_group(servers=[{"host": "10.0.0.1", "secret": "s", "auth_port": 0}]))},
        ["aaa_server_group[1].servers[0].auth_port: must be 1..65535, got 0"],
    ),
    ("workers", {"gateway": {"workers": -1}}, ["gateway.workers: must be 0..256, got -1"]),
    ("tooManyWorkers", {"gateway": {"workers": 1000}}, ["gateway.workers: must be 0..256, got 1000"]),
    ("loginTimeout", {"pop3s": {"login_timeout": 0}}, ["pop3s.login_timeout: must be at least 1, got 0"]),
    ("idleTimeout", {"smtps": {"idle_timeout": -5}}, ["smtps.idle_timeout: must be at least 1, got -5"]),
    (
        "sessionLimit",
        {"pop3s": {"unauthenticated_session_limit": -1}},
        ["pop3s.unauthenticated_session_limit: must be at least 0, got -1"],
    ),
    ("pollerInterval", {"poller": {"default_interval": 0}}, ["poller.default_interval: must be at least 1, got 0"]),
    ("ssoTtl", {"sso": {"pop3": {"ttl": 0}}}, ["sso.pop3.ttl: must be at least 1, got 0"]),
    (
        "ldapTimeout",
        {"aaa_server_group": with_groups(ldap_group(timeout=0))},
        ["aaa_server_group[1].timeout: must be a positive number, got 0"],
    ),
    (
        "radiusTimeoutNotANumber",
        {"aaa_server_group": with_groups(radius_group(timeout="3s"))},
        ["aaa_server_group[1].timeout: must be a number, got string"],
    ),
    (
        "radiusRetries",
        {"aaa_server_group": with_groups(radius_group(retries=-1))},
        ["aaa_server_group[1].retries: must be at least 0, got -1"],
    ),
    # limits against hostile clients [4.10]
    (
        "listenBacklogZero",
        {"gateway": {"listen_backlog": 0}},
        ["gateway.listen_backlog: must be 1..65535, got 0"],
    ),
    (
        "listenBacklogTooHigh",
        {"gateway": {"listen_backlog": 65536}},
        ["gateway.listen_backlog: must be 1..65535, got 65536"],
    ),
    (
        "listenBacklogIsAnInteger",
        {"gateway": {"listen_backlog": "511"}},
        ["gateway.listen_backlog: must be an integer, got string"],
    ),
    (
        "maxLoginLineTooShort",
        {"pop3s": {"max_login_line": 511}},
        ["pop3s.max_login_line: must be 512..65536, got 511"],
    ),
    (
        "maxLoginLineTooLong",
        {"imap4s": {"max_login_line": 65537}},
        ["imap4s.max_login_line: must be 512..65536, got 65537"],
    ),
    (
        "maxLoginLineIsAnInteger",
        {"smtps": {"max_login_line": 4096.0}},
        ["smtps.max_login_line: must be an integer, got float"],
    ),
    (
        "maxLoginLiteralNegative",
        {"imap4s": {"max_login_literal": -1}},
        ["imap4s.max_login_literal: must be 0..65536, got -1"],
    ),
    (
        "maxLoginLiteralTooLong",
        {"pop3s": {"max_login_literal": 65537}},
        ["pop3s.max_login_literal: must be 0..65536, got 65537"],
    ),
    (
        "maxLoginLiteralIsAnInteger",
        {"smtps": {"max_login_literal": True}},
        ["smtps.max_login_literal: must be an integer, got boolean"],
    ),
    (
        "fallbackMessageSizeNegative",
        {"smtps": {"fallback_message_size": -1}},
        ["smtps.fallback_message_size: must be 0..9007199254740992, got -1"],
    ),
    (
        "fallbackMessageSizeIsAnInteger",
        {"smtps": {"fallback_message_size": "10M"}},
        ["smtps.fallback_message_size: must be an integer, got string"],
    ),
    (
        "capabilitiesRefreshTooShort",
        {"smtps": {"capabilities_refresh": 9}},
        ["smtps.capabilities_refresh: must be 10..86400, got 9"],
    ),
    (
        "capabilitiesRefreshTooLong",
        {"smtps": {"capabilities_refresh": 86401}},
        ["smtps.capabilities_refresh: must be 10..86400, got 86401"],
    ),
    (
        "smtpCapabilityKeysAreSmtpOnly",
        {"pop3s": {"fallback_message_size": 1000}, "imap4s": {"capabilities_refresh": 60}},
        ["pop3s.fallback_message_size: unknown key", "imap4s.capabilities_refresh: unknown key"],
    ),
    (
        "maxPendingLocal",
        {"aaa_server_group": [{"name": "LOCAL", "protocol": "local", "max_pending": -1}]},
        ["aaa_server_group[0].max_pending: must be at least 0, got -1"],
    ),
    (
        "maxPendingLdap",
        {"aaa_server_group": with_groups(ldap_group(max_pending=-64))},
        ["aaa_server_group[1].max_pending: must be at least 0, got -64"],
    ),
    (
        "maxPendingRadiusIsAnInteger",
        {"aaa_server_group": with_groups(radius_group(max_pending="64"))},
        ["aaa_server_group[1].max_pending: must be an integer, got string"],
    ),
    (
        "cacheTtlNegative",
        {"aaa_server_group": [{"name": "LOCAL", "protocol": "local", "cache_ttl": -1}]},
        ["aaa_server_group[0].cache_ttl: must be 0..86400, got -1"],
    ),
    (
        "cacheTtlIsAnInteger",
        {"aaa_server_group": with_groups(radius_group(cache_ttl="300"))},
        ["aaa_server_group[1].cache_ttl: must be an integer, got string"],
    ),
    (
        "maxPendingPop3IsAnInteger",
        {"aaa_server_group": with_groups(pop3_group(max_pending=1.5))},
        ["aaa_server_group[1].max_pending: must be an integer, got float"],
    ),
    (
        "policyLogins",
        {"group_policy": [{"name": "Staff", "simultaneous_logins": -1}]},
        ["group_policy[0].simultaneous_logins: must be at least 0, got -1"],
    ),
    (
        "policyIdle",
        {"group_policy": [{"name": "Staff", "idle_timeout": 0}]},
        ["group_policy[0].idle_timeout: must be at least 1, got 0"],
    ),
    (
        "policySessionTime",
        {"group_policy": [{"name": "Staff", "max_session_time": -1}]},
        ["group_policy[0].max_session_time: must be at least 0, got -1"],
    ),
    # names
    (
        "policyNameTooShort",
        {"group_policy": [{"name": "abc"}]},
        ["group_policy[0].name: must be 4-15 letters and digits, got 'abc'"],
    ),
    (
        "policyNameTooLong",
        {"group_policy": [{"name": "A" * 16}]},
        [f"group_policy[0].name: must be 4-15 letters and digits, got '{'A' * 16}'"],
    ),
    (
        "policyNamePunctuation",
        {"group_policy": [{"name": "mail-users"}]},
        ["group_policy[0].name: must be 4-15 letters and digits, got 'mail-users'"],
    ),
    (
        "policyNameUnique",
        {"group_policy": [{"name": "Staff"}, {"name": "Staff"}]},
        ["group_policy[1].name: 'Staff' is already the name of group_policy[0]"],
    ),
    ("policyNameMissing", {"group_policy": [{"simultaneous_logins": 1}]}, ["group_policy[0].name: missing"]),
    (
        "serverGroupNameUnique",
        {"aaa_server_group": with_groups({"name": "LOCAL", "protocol": "local", "users_file": "other.toml"})},
        ["aaa_server_group[1].name: 'LOCAL' is already the name of aaa_server_group[0]"],
    ),
    (
        "serverGroupNameMissing",
        {"aaa_server_group": with_groups({"protocol": "local"})},
        ["aaa_server_group[1].name: missing"],
    ),
    (
        "serverGroupProtocolMissing",
        {"aaa_server_group": with_groups({"name": "other", "users_file": "x.toml"})},
        ["aaa_server_group[1].protocol: missing"],
    ),
    (
        "interfaceNameUnique",
        {"interface": [{"name": "lan", "address": "10.0.0.1"}, {"name": "lan", "address": "10.0.0.2"}]},
        ["interface[1].name: 'lan' is already the name of interface[0]"],
    ),
    # addresses
    ("interfaceAddress", {"interface": [{"address": "foo"}]}, ["interface[0].address: not an IP address: 'foo'"]),
    (
        "interfaceAddressIsNoName",
        {"interface": [{"address": "localhost"}]},
        ["interface[0].address: not an IP address: 'localhost'"],
    ),
    ("interfacesNotEmpty", {"interface": []}, ["interface: must have at least one entry (omit it for the default)"]),
    ("interfaceIsAnArray", {"interface": {"name": "x"}}, ["interface: must be an array of tables, got table"]),
    ("interfaceItemIsATable", {"interface": ["10.0.0.1"]}, ["interface[0]: must be a table, got string"]),
    (
        "managementOnlyInterface",
        {"interface": [{"address": "10.0.0.1", "management_only": True, "pop3s": True}]},
        ["interface[0].pop3s: must not be true on a management_only interface"],
    ),
    (
        "allowedServerHost",
        {"pop3s": {"allowed_servers": ["bad host"]}},
        ["pop3s.allowed_servers[0]: not a host name or IP address: 'bad host'"],
    ),
    (
        "upstreamHost",
        {"smtps": {"default_server": {"host": "-bad-.example"}}},
        ["smtps.default_server.host: not a host name or IP address: '-bad-.example'"],
    ),
    ("pollerHost", {"poller": {"smtp_host": ""}}, ["poller.smtp_host: not a host name or IP address: ''"]),
    # authentication
    (
        "authenticationNotEmpty",
        {"pop3s": {"authentication": []}},
        ["pop3s.authentication: must list at least one method"],
    ),
    (
        "authenticationMethod",
        {"pop3s": {"authentication": ["aaa", "kerberos"]}},
        ['pop3s.authentication[1]: must be one of "aaa", "certificate", "piggyback", got \'kerberos\''],
    ),
    (
        "mailhostIsForSmtpsOnly",
        {"imap4s": {"authentication": ["mailhost"]}},
        ['imap4s.authentication[0]: "mailhost" is for smtps only (POP3S and IMAP4S always log in to the mail server)'],
    ),
    (
        "authenticationTwice",
        {"pop3s": {"authentication": ["aaa", "aaa"]}},
        ["pop3s.authentication[1]: 'aaa' is listed twice"],
    ),
    # references
    (
        "authenticationGroupExists",
        {"pop3s": {"authentication_server_group": "X"}},
        ["pop3s.authentication_server_group: no aaa_server_group named 'X'"],
    ),
    (
        "authenticationGroupNeededForAaa",
        {"pop3s": {"authentication_server_group": ""}},
        ['pop3s.authentication_server_group: must be set when "aaa" is in pop3s.authentication'],
    ),
    (
        "authorizationGroupExists",
        {"imap4s": {"authorization_server_group": "corp-ldap"}},
        ["imap4s.authorization_server_group: no aaa_server_group named 'corp-ldap'"],
    ),
    (
        "authorizationGroupNotPop3",
        {"aaa_server_group": with_groups(pop3_group()), "imap4s": {"authorization_server_group": "mailserver"}},
        [
            "imap4s.authorization_server_group: aaa_server_group 'mailserver' is a pop3 group, which cannot"
            " authorize (use ldap, radius or local)"
        ],
    ),
    (
        "accountingGroupExists",
        {"smtps": {"accounting_server_group": "corp-radius"}},
        ["smtps.accounting_server_group: no aaa_server_group named 'corp-radius'"],
    ),
    (
        "accountingGroupIsRadius",
        {"pop3s": {"accounting_server_group": "LOCAL"}},
        ["pop3s.accounting_server_group: aaa_server_group 'LOCAL' is a local group; accounting needs a radius group"],
    ),
    (
        "defaultGroupPolicyExists",
        {"pop3s": {"default_group_policy": "Nope"}},
        ["pop3s.default_group_policy: no group_policy named 'Nope'"],
    ),
    (
        "groupPolicyMapNamesPolicies",
        {"aaa_server_group": with_groups(ldap_group(group_policy_map={"cn=mail,dc=example,dc=com": "Ghost"}))},
        ["aaa_server_group[1].group_policy_map.\"cn=mail,dc=example,dc=com\": no group_policy named 'Ghost'"],
    ),
    # TLS and certificates
    (
        "clientCertificateNeedsCA",
        {"tls": {"client_certificate": "required"}},
        ["tls.client_ca: must be set when tls.client_certificate is 'required'"],
    ),
    (
        "certificateNeedsClientCertificates",
        {"pop3s": {"authentication": ["certificate"]}},
        ['pop3s.authentication: "certificate" needs tls.client_certificate = "optional" or "required"'],
    ),
    (
        "certificateNeedsTls",
        {
            "tls": {"client_certificate": "optional", "client_ca": "ca.pem"},
            "pop3s": {"authentication": ["certificate"], "tls_support": "disabled", "allow_plaintext_auth": True},
        },
        ['pop3s.authentication: "certificate" needs TLS, but pop3s.tls_support is "disabled"'],
    ),
    (
        "tlsDisabledNeedsStarttlsPort",
        {"pop3s": {"tls_support": "disabled", "starttls_port": 0, "allow_plaintext_auth": True}},
        ['pop3s.starttls_port: must not be 0 when tls_support is "disabled" (it is the only port)'],
    ),
    (
        "tlsDisabledNeedsPlaintextAuth",
        {"pop3s": {"tls_support": "disabled"}},
        [
            'pop3s.allow_plaintext_auth: must be true when tls_support is "disabled"'
            " (no TLS is offered, so no login could succeed)"
        ],
    ),
    # listeners
    (
        "listenerCollision",
        {"imap4s": {"port": 995}},
        [
            "imap4s.port: 995 on interface 'inside' (127.0.0.1) is already used by pop3s.port"
            " on interface 'inside' (127.0.0.1)"
        ],
    ),
    (
        "listenerCollisionWithWildcard",
        {
            "interface": [
                {"name": "any", "address": "0.0.0.0", "imap4s": False, "smtps": False},
                {"name": "lo", "address": "127.0.0.1", "imap4s": False, "smtps": False},
            ]
        },
        [
            "pop3s.port: 995 on interface 'lo' (127.0.0.1) is already used by pop3s.port on interface 'any' (0.0.0.0)",
            "pop3s.starttls_port: 110 on interface 'lo' (127.0.0.1) is already used by pop3s.starttls_port"
            " on interface 'any' (0.0.0.0)",
        ],
    ),
    # delimiters
    (
        "delimiterOneCharacter",
        {"pop3s": {"server_delimiter": "@@"}},
        ["pop3s.server_delimiter: must be one printable ASCII character other than space, got '@@'"],
    ),
    (
        "delimiterNotSpace",
        {"pop3s": {"username_password_delimiter": " "}},
        ["pop3s.username_password_delimiter: must be one printable ASCII character other than space, got ' '"],
    ),
    (
        "delimiterNotEmpty",
        {"smtps": {"username_password_delimiter": ""}},
        ["smtps.username_password_delimiter: must be one printable ASCII character other than space, got ''"],
    ),
    (
        "delimitersDiffer",
        {"pop3s": {"username_password_delimiter": "@"}},
        ["pop3s.server_delimiter: must differ from username_password_delimiter, both are '@'"],
    ),
    # AAA server groups
    (
        "ldapServerUrl",
        {"aaa_server_group": with_groups(ldap_group(servers=["http://dc1.example.com"]))},
        ["aaa_server_group[1].servers[0]: not an ldap:// or ldaps:// server URL: 'http://dc1.example.com'"],
    ),
    (
        "ldapServerUrlHasNoDn",
        {"aaa_server_group": with_groups(ldap_group(servers=["ldap://dc1/dc=example"]))},
        ["aaa_server_group[1].servers[0]: must name a server only (no DN, query or user): 'ldap://dc1/dc=example'"],
    ),
    (
        "ldapServersNotEmpty",
        {"aaa_server_group": with_groups(ldap_group(servers=[]))},
        ["aaa_server_group[1].servers: must list at least one ldap:// or ldaps:// URL"],
    ),
    (
        "ldapUserFilterHasUsername",
        {"aaa_server_group": with_groups(ldap_group(user_filter="(uid=*)"))},
        ["aaa_server_group[1].user_filter: must contain {username}, got '(uid=*)'"],
    ),
    (
        "ldapUserFilterPlaceholders",
        {"aaa_server_group": with_groups(ldap_group(user_filter="(&(uid={username})(o={org}))"))},
        ["aaa_server_group[1].user_filter: unknown placeholder {org} (known: {username}, {secondary})"],
    ),
    (
        "ldapUserFilterBraces",
        {"aaa_server_group": with_groups(ldap_group(user_filter="(&(uid={username})(cn=a{b))"))},
        [
            "aaa_server_group[1].user_filter: unbalanced braces (write {{ or }} for a literal brace),"
            " got '(&(uid={username})(cn=a{b))'"
        ],
    ),
    (
        "ldapUserFilterNoFormatSpec",
        {"aaa_server_group": with_groups(ldap_group(user_filter="(uid={username!r})"))},
        ["aaa_server_group[1].user_filter: placeholders take no format spec or conversion, got '(uid={username!r})'"],
    ),
    (
        "ldapUserFilterParentheses",
        {"aaa_server_group": with_groups(ldap_group(user_filter="(uid={username}"))},
        ["aaa_server_group[1].user_filter: must be a parenthesised LDAP filter, got '(uid={username}'"],
    ),
    (
        "ldapBindPasswordWithBindDn",
        {"aaa_server_group": with_groups(ldap_group(bind_dn="cn=mailgw,dc=example,dc=com"))},
        ["aaa_server_group[1].bind_password: must not be empty when bind_dn is set"],
    ),
    (
        "ldapBaseDnRequired",
        {"aaa_server_group": with_groups({"name": "l", "protocol": "ldap", "servers": ["ldap://dc1"]})},
        ["aaa_server_group[1].base_dn: missing"],
    ),
    (
        "ldapServersRequired",
        {"aaa_server_group": with_groups({"name": "l", "protocol": "ldap", "base_dn": "dc=example"})},
        ["aaa_server_group[1].servers: must list at least one ldap:// or ldaps:// URL"],
    ),
    (
        "radiusServersRequired",
        {"aaa_server_group": with_groups({"name": "r", "protocol": "radius"})},
        ["aaa_server_group[1].servers: must list at least one server"],
    ),
    (
        "ldapGroupPolicyAttribute",
        {"aaa_server_group": with_groups(ldap_group(group_policy_attribute="member of"))},
        ["aaa_server_group[1].group_policy_attribute: not an LDAP attribute name: 'member of'"],
    ),
    (
        "radiusSecretNotEmpty",
        {"aaa_server_group": with_groups(radius_group(servers=[{"host": "10.0.0.1", "secret": ""}]))},
        ["aaa_server_group[1].servers[0].secret: must not be empty"],
    ),
    (
        "radiusSecretRequired",
        {"aaa_server_group": with_groups(radius_group(servers=[{"host": "10.0.0.1"}]))},
        ["aaa_server_group[1].servers[0].secret: missing"],
    ),
    (
        "radiusServersAreTables",
        {"aaa_server_group": with_groups(radius_group(servers=["10.0.0.1"]))},
        ["aaa_server_group[1].servers[0]: must be a table, got string"],
    ),
    (
        "radiusServersNotEmpty",
        {"aaa_server_group": with_groups(radius_group(servers=[]))},
        ["aaa_server_group[1].servers: must list at least one server"],
    ),
    (
        "pop3ServerTls",
        {"aaa_server_group": with_groups(pop3_group(servers=[{"host": "mail", "tls": "yes"}]))},
        ['aaa_server_group[1].servers[0].tls: must be one of "none", "starttls", "implicit", got \'yes\''],
    ),
    (
        "localUsersFileNotEmpty",
        {"aaa_server_group": [{"name": "LOCAL", "protocol": "local", "users_file": ""}]},
        ["aaa_server_group[0].users_file: must not be empty"],
    ),
    # SSO
    (
        "ssoPolicyCidr",
        {"sso": {"pop3": {"policy": ["garbage"]}}},
        ["sso.pop3.policy[0]: not a CIDR network or MAC address: 'garbage'"],
    ),
    (
        "ssoPolicyHostBits",
        {"sso": {"pop3": {"policy": ["10.0.0.1/8"]}}},
        ["sso.pop3.policy[0]: network has host bits set: '10.0.0.1/8'"],
    ),
    (
        "ssoServersHostPort",
        {"sso": {"pop3": {"servers": ["127.0.0.1", "[::1]:110", "mail:0"]}}},
        [
            "sso.pop3.servers[0]: must be host:port (IPv6 as [address]:port), got '127.0.0.1'",
            "sso.pop3.servers[2]: must be host:port (IPv6 as [address]:port), got 'mail:0'",
        ],
    ),
    (
        "ssoMonitorNeedsInterface",
        {"sso": {"pop3": {"enabled": True, "mode": "monitor"}}},
        ['sso.pop3.monitor_interface: must be set when mode is "monitor"'],
    ),
    (
        "ssoCollectorSecret",
        {"sso": {"pop3": {"radius_accounting": [{"host": "10.0.0.1"}]}}},
        ["sso.pop3.radius_accounting[0].secret: missing"],
    ),
    (
        "portalEndpointHasType",
        {"sso": {"pop3": {"portal": "8443"}}},
        [
            'sso.pop3.portal: not an endpoint description of type "ssl"'
            " (e.g. 'ssl:8443:interface=127.0.0.1'), got '8443'"
        ],
    ),
    (
        "portalIsHttps",
        {"sso": {"pop3": {"portal": "tcp:8080"}}},
        [
            'sso.pop3.portal: not an endpoint description of type "ssl"'
            " (e.g. 'ssl:8443:interface=127.0.0.1'), got 'tcp:8080'"
        ],
    ),
    # admin
    (
        "manholeNeedsKeys",
        {"admin": {"manhole": "ssh:2222:interface=127.0.0.1"}},
        ["admin.manhole_authorized_keys: must be set when admin.manhole is"],
    ),
    (
        "manholeOnLoopbackOnly",
        {"admin": {"manhole": "ssh:2222:interface=0.0.0.0", "manhole_authorized_keys": "keys"}},
        ["admin.manhole: must listen on loopback only (interface=127.0.0.1 or interface=\\:\\:1)"],
    ),
    (
        "manholeInterfaceRequired",
        {"admin": {"manhole": "ssh:2222", "manhole_authorized_keys": "keys"}},
        ["admin.manhole: must listen on loopback only (interface=127.0.0.1 or interface=\\:\\:1)"],
    ),
    (
        "metricsEndpointType",
        {"admin": {"metrics": "http:9125"}},
        [
            'admin.metrics: not an endpoint description of type "tcp", "tcp6", "ssl", "unix"'
            " (e.g. 'tcp:9125:interface=127.0.0.1'), got 'http:9125'"
        ],
    ),
    (
        "metricsEndpointPort",
        {"admin": {"metrics": "tcp:99999"}},
        ["admin.metrics: endpoint port must be 0..65535, got '99999'"],
    ),
    (
        "metricsEndpointParameter",
        {"admin": {"metrics": "tcp:9125:iface=lo"}},
        ["admin.metrics: unknown tcp endpoint parameter 'iface'"],
    ),
    (
        "metricsEndpointInterface",
        {"admin": {"metrics": "tcp:9125:interface=lo"}},
        ["admin.metrics: endpoint interface is not an IP address: 'lo'"],
    ),
    ("adminSocketNotEmpty", {"admin": {"socket": ""}}, ["admin.socket: must not be empty"]),
    # [[inspection]] [4.9]
    (
        "inspectionUnknownKey",
        {"inspection": [inspection(clamav="tcp:x:1")]},
        ['inspection[0].clamav: unknown key (did you mean "clamd"?)'],
    ),
    ("inspectionNameMissing", {"inspection": [{"scan_limit": 10}]}, ["inspection[0].name: missing"]),
    (
        "inspectionNameSyntax",
        {"inspection": [inspection(name="no spaces")]},
        ["inspection[0].name: must be 1-64 letters, digits, '_', '.' or '-', got 'no spaces'"],
    ),
    (
        "inspectionNameUnique",
        {"inspection": [inspection(), inspection()]},
        ["inspection[1].name: 'strict' is already the name of inspection[0]"],
    ),
    (
        "inspectionMustBeTables",
        {"inspection": {"name": "strict"}},
        ["inspection: must be an array of tables, got table"],
    ),
    (
        "maxMessageSizePositive",
        {"inspection": [inspection(max_message_size=0)]},
        [f"inspection[0].max_message_size: must be 1..{2**53}, got 0"],
    ),
    (
        "scanLimitInteger",
        {"inspection": [inspection(scan_limit="25M")]},
        ["inspection[0].scan_limit: must be an integer, got string"],
    ),
    (
        "scanLimitAction",
        {"inspection": [inspection(scan_limit_action="skip")]},
        ['inspection[0].scan_limit_action: must be one of "refuse", "pass", got \'skip\''],
    ),
    (
        "clamdAddressKind",
        {"inspection": [inspection(clamd="/run/clamav/clamd.ctl")]},
        [
            'inspection[0].clamd: must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus),'
            " got '/run/clamav/clamd.ctl'"
        ],
    ),
    (
        "clamdUnixNeedsPath",
        {"inspection": [inspection(clamd="unix:")]},
        ['inspection[0].clamd: must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus), got \'unix:\''],
    ),
    (
        "clamdTcpNeedsPort",
        {"inspection": [inspection(clamd="tcp:127.0.0.1")]},
        ['inspection[0].clamd: must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus), got \'tcp:127.0.0.1\''],
    ),
    (
        "clamdTcpPortRange",
        {"inspection": [inspection(clamd="tcp:127.0.0.1:99999")]},
        [
            'inspection[0].clamd: must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus),'
            " got 'tcp:127.0.0.1:99999'"
        ],
    ),
    (
        "clamdTcpHost",
        {"inspection": [inspection(clamd="tcp:bad host:3310")]},
        ['inspection[0].clamd: must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus), got \'tcp:bad host:3310\''],
    ),
    (
        "clamdTcpEndpointSyntaxIsNotAccepted",
        {"inspection": [inspection(clamd="tcp:host=127.0.0.1:port=3310")]},
        [
            'inspection[0].clamd: must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus),'
            " got 'tcp:host=127.0.0.1:port=3310'"
        ],
    ),
    (
        "clamdUnixNul",
        {"inspection": [inspection(clamd="unix:/run/a\0b")]},
        ["inspection[0].clamd: must not contain a NUL character"],
    ),
    (
        "clamdUnixPathLength",
        {"inspection": [inspection(clamd="unix:/" + "s" * 107)]},
        [f"inspection[0].clamd: a UNIX socket path has at most 107 bytes, got /{'s' * 107}"],
    ),
    (
        "clamdTimeoutPositive",
        {"inspection": [inspection(clamd_timeout=0)]},
        ["inspection[0].clamd_timeout: must be a positive number, got 0"],
    ),
    (
        "onScannerFailure",
        {"inspection": [inspection(on_scanner_failure="reject")]},
        ['inspection[0].on_scanner_failure: must be one of "tempfail", "pass", got \'reject\''],
    ),
    (
        "attachmentsDenyStrings",
        {"inspection": [inspection(attachments_deny="*.exe")]},
        ["inspection[0].attachments_deny: must be an array of strings, got string"],
    ),
    (
        "attachmentGlobEmpty",
        {"inspection": [inspection(attachments_deny=["*.exe", ""])]},
        ["inspection[0].attachments_deny[1]: must not be empty"],
    ),
    (
        "attachmentGlobBracket",
        {"inspection": [inspection(attachments_deny=["*.[ce]xe", "*.[exe"])]},
        ["inspection[0].attachments_deny[1]: unbalanced '[' in glob '*.[exe'"],
    ),
    (
        "attachmentGlobBracketOnlyMember",
        {"inspection": [inspection(attachments_deny=["*.[]"])]},
        ["inspection[0].attachments_deny[0]: unbalanced '[' in glob '*.[]'"],
    ),
    (
        "attachmentGlobPath",
        {"inspection": [inspection(attachments_deny=["dir/*.exe"])]},
        ["inspection[0].attachments_deny[0]: a file name glob has no '/', '\\' or control characters, got 'dir/*.exe'"],
    ),
    (
        "attachmentGlobControl",
        {"inspection": [inspection(attachments_deny=["*.exe\n"])]},
        ["inspection[0].attachments_deny[0]: a file name glob has no '/', '\\' or control characters, got '*.exe\\n'"],
    ),
    (
        "contentTypeSyntax",
        {"inspection": [inspection(content_types_deny=["application/x-msdownload", "exe", "text/*/x"])]},
        [
            "inspection[0].content_types_deny[1]: not a MIME type (type/subtype or type/*): 'exe'",
            "inspection[0].content_types_deny[2]: not a MIME type (type/subtype or type/*): 'text/*/x'",
        ],
    ),
    (
        "contentTypeWildcardMajor",
        {"inspection": [inspection(content_types_deny=["*/*"])]},
        ["inspection[0].content_types_deny[0]: not a MIME type (type/subtype or type/*): '*/*'"],
    ),
    (
        "attachmentAction",
        {"inspection": [inspection(attachment_action="quarantine")]},
        ['inspection[0].attachment_action: must be one of "strip", "reject", got \'quarantine\''],
    ),
    (
        "headerRulesTables",
        {"inspection": [inspection(header_rules=["X-Spam-Flag"])]},
        ["inspection[0].header_rules[0]: must be a table, got string"],
    ),
    (
        "headerRuleBadRegex",
        {"inspection": [inspection(header_rules=[{"header": "Subject", "match": "(unclosed", "action": "reject"}])]},
        [
            "inspection[0].header_rules[0].match: not a regular expression (missing ), unterminated subpattern"
            " at position 0): '(unclosed'"
        ],
    ),
    (
        "headerRuleHeaderName",
        {"inspection": [inspection(header_rules=[{"header": "X Spam:", "match": "x", "action": "reject"}])]},
        ["inspection[0].header_rules[0].header: not a header field name: 'X Spam:'"],
    ),
    (
        "headerRuleAction",
        {"inspection": [inspection(header_rules=[{"header": "X-Spam-Flag", "match": "^YES", "action": "drop"}])]},
        ['inspection[0].header_rules[0].action: must be one of "reject", "tag", got \'drop\''],
    ),
    (
        "headerRuleKeysRequired",
        {"inspection": [inspection(header_rules=[{}])]},
        [
            "inspection[0].header_rules[0].header: missing",
            "inspection[0].header_rules[0].match: missing",
            "inspection[0].header_rules[0].action: missing",
        ],
    ),
    (
        "headerRuleUnknownKey",
        {
            "inspection": [
                inspection(header_rules=[{"header": "X-Spam-Flag", "match": "^YES", "action": "reject", "re": "x"}])
            ]
        },
        ["inspection[0].header_rules[0].re: unknown key"],
    ),
    (
        "headerRuleTagOnlyForTag",
        {
            "inspection": [
                inspection(header_rules=[{"header": "X-Spam-Flag", "match": "^YES", "action": "reject", "tag": "[S]"}])
            ]
        },
        ['inspection[0].header_rules[0].tag: only with action = "tag"'],
    ),
    (
        "headerRuleTagPrintable",
        {
            "inspection": [
                inspection(header_rules=[{"header": "Subject", "match": "x", "action": "tag", "tag": "[S]\r\nBcc: x"}])
            ]
        },
        ["inspection[0].header_rules[0].tag: must be 1-64 printable characters, got '[S]\\r\\nBcc: x'"],
    ),
    (
        "policyInspectionUnknown",
        {"group_policy": [{"name": "Staff", "inspection": "strict"}]},
        ["group_policy[0].inspection: no inspection profile named 'strict'"],
    ),
    (
        "policyInspectionCaseMatters",
        {"group_policy": [{"name": "Staff", "inspection": "Strict"}], "inspection": [inspection()]},
        ["group_policy[0].inspection: no inspection profile named 'Strict'"],
    ),
    (
        "policyInspectionString",
        {"group_policy": [{"name": "Staff", "inspection": True}]},
        ["group_policy[0].inspection: must be a string, got boolean"],
    ),
]

# Configurations that look suspicious but are valid.
VALID: list[tuple[str, dict[str, Any]]] = [
    ("minimal", {}),
    ("tlsRequiredIgnoresStarttlsPort", {"pop3s": {"tls_support": "required", "starttls_port": 143}}),
    ("noStarttlsPort", {"pop3s": {"starttls_port": 0}}),
    ("plaintextOnly", {"pop3s": {"tls_support": "disabled", "allow_plaintext_auth": True}}),
    ("disabledProxyIsNotCrossChecked", {"smtps": {"enabled": False, "authentication_server_group": "X", "port": 995}}),
    ("mailhostOnSmtps", {"smtps": {"authentication": ["aaa", "mailhost"]}}),
    ("noGroupWithoutAaa", {"pop3s": {"authentication": ["piggyback"], "authentication_server_group": ""}}),
    ("noDefaultGroupPolicy", {"pop3s": {"default_group_policy": ""}}),
    (
        "accountingOnRadius",
        {"aaa_server_group": with_groups(radius_group()), "pop3s": {"accounting_server_group": "corp-radius"}},
    ),
    (
        "authorizationOnLdap",
        {"aaa_server_group": with_groups(ldap_group()), "pop3s": {"authorization_server_group": "corp-ldap"}},
    ),
    (
        "certificateAuthentication",
        {
            "tls": {"client_certificate": "optional", "client_ca": "ca.pem"},
            "imap4s": {"authentication": ["certificate", "aaa"]},
        },
    ),
    ("secondaryNone", {"pop3s": {"authorization": {"primary_dn_field": "EA", "secondary_dn_field": "none"}}}),
    (
        "entireDnIgnoresFields",
        {"pop3s": {"authorization": {"username_from_certificate": "entire-dn", "secondary_dn_field": "CN"}}},
    ),
    ("ipv6Interface", {"interface": [{"name": "v6", "address": "::1"}]}),
    (
        "sameAddressOtherPorts",
        {
            "interface": [
                {"name": "a", "address": "10.0.0.1", "imap4s": False, "smtps": False},
                {"name": "b", "address": "10.0.0.1", "pop3s": False},
            ]
        },
    ),
    (
        "managementInterface",
        {"interface": [{"name": "lan"}, {"name": "mgmt", "address": "10.9.9.9", "management_only": True}]},
    ),
    (
        "ssoPolicyMacs",
        {"sso": {"pop3": {"policy": ["aa:bb:cc:dd:ee:ff", "AA-BB-CC-DD-EE-01", "aabb.ccdd.eeff", "fd00::/8"]}}},
    ),
    ("ssoMonitorDisabled", {"sso": {"pop3": {"mode": "monitor"}}}),
    (
        "endpoints",
        {
            "sso": {"pop3": {"portal": "ssl:8443:interface=127.0.0.1"}},
            "admin": {"metrics": "unix:/run/mailgw/metrics.sock"},
        },
    ),
    (
        "manholeIPv6Loopback",
        {"admin": {"manhole": "ssh:port=2222:interface=\\:\\:1", "manhole_authorized_keys": "keys"}},
    ),
    ("radiusFloatTimeout", {"aaa_server_group": with_groups(radius_group(timeout=2.5))}),
    (
        "ldapAnonymous",
        {"aaa_server_group": with_groups(ldap_group(bind_dn="", bind_password="", group_policy_attribute=""))},
    ),
    ("dfltGrpPolicyRedefined", {"group_policy": [{"name": DEFAULT_GROUP_POLICY, "simultaneous_logins": 1}]}),
    ("listenBacklogEdges", {"gateway": {"listen_backlog": 1}, "pop3s": {"max_login_line": 512}}),
    (
        "inspectionReferenced",
        {"inspection": [inspection()], "group_policy": [{"name": "Staff", "inspection": "strict"}]},
    ),
    ("inspectionNotReferenced", {"inspection": [inspection(), inspection(name="lax")]}),
    ("policyInspectionNone", {"group_policy": [{"name": "Staff", "inspection": ""}]}),
    (
        "inspectionEdges",
        {
            "inspection": [
                inspection(
                    max_message_size=1,
                    scan_limit=2**53,
                    clamd="",
                    clamd_timeout=0.5,
                    attachments_deny=[],
                    content_types_deny=["Application/*", "x-foo/x.bar+baz"],
                    header_rules=[{"header": "X-Spam-Flag", "match": "", "action": "tag"}],
                )
            ]
        },
    ),
    (
        "clamdAddresses",
        {
            "inspection": [
                inspection(name="a", clamd="tcp:[::1]:3310"),
                inspection(name="b", clamd="tcp:clamd.example.com:3310"),
                inspection(name="c", clamd="unix:clamd.sock"),
                inspection(name="d", clamd="unix:/" + "s" * 106),
            ]
        },
    ),
    ("globBracketLiteralClose", {"inspection": [inspection(attachments_deny=["*.[]x]", "*.[!]]", "[!a-z]*", "?.*"])]}),
    ("loginLimitEdges", {"imap4s": {"max_login_line": 65536, "max_login_literal": 0}}),
    ("loginLiteralOnEveryProxy", {p: {"max_login_literal": 65536} for p in ("pop3s", "imap4s", "smtps")}),
    ("smtpCapabilityEdges", {"smtps": {"fallback_message_size": 0, "capabilities_refresh": 10}}),
    (
        "maxPendingZeroIsNoLimit",
        {
            "aaa_server_group": [
                {"name": "LOCAL", "protocol": "local", "max_pending": 0},
                ldap_group(max_pending=0),
                radius_group(max_pending=0),
                pop3_group(max_pending=0),
            ]
        },
    ),
]


class ValidationRuleTests(SynchronousTestCase):
    """
    One test per validation rule (generated from ``RULES``): a configuration that breaks
    the rule gives exactly the expected problem lines, and nothing else.
    """


class ValidConfigurationTests(SynchronousTestCase):
    """Configurations near the rules' edges that are valid (generated from ``VALID``)."""


def _rule_test(patch: dict[str, Any], expected: list[str]) -> Callable[[SynchronousTestCase], None]:
    def test(self: SynchronousTestCase) -> None:
        self.assertEqual(problems_of(merge(base(), patch)), expected)

    return test


def _valid_test(patch: dict[str, Any]) -> Callable[[SynchronousTestCase], None]:
    def test(self: SynchronousTestCase) -> None:
        self.assertEqual(problems_of(merge(base(), patch)), [])

    return test


for _name, _patch, _expected in RULES:
    _test = _rule_test(_patch, _expected)
    _test.__name__ = f"test_{_name}"
    _test.__doc__ = f"Reports: {_expected[0]}"
    setattr(ValidationRuleTests, _test.__name__, _test)

for _name, _patch in VALID:
    _test = _valid_test(_patch)
    _test.__name__ = f"test_{_name}"
    _test.__doc__ = f"{_name} is a valid configuration."
    setattr(ValidConfigurationTests, _test.__name__, _test)


class ProblemReportingTests(SynchronousTestCase):
    """All problems are reported together, one line each."""

    def test_severalProblemsTogether(self) -> None:
        """Problems from different sections are all reported, in section order."""
        data = merge(
            base(),
            {
                "gateway": {"workers": -1, "bogus": True},
                "tls": {"minimum_version": "SSLv3"},
                "interface": [{"address": "foo"}],
                "pop3s": {"default_server": {"port": 99999}, "authentication_server_group": "X"},
                "group_policy": [{"name": "x"}],
                "admin": {"socket": ""},
            },
        )
        with self.assertRaises(ConfigError) as raised:
            parse_config(data, BASE_DIR, check_files=False)
        self.assertEqual(
            raised.exception.problems,
            [
                "gateway.workers: must be 0..256, got -1",
                "gateway.bogus: unknown key",
                'tls.minimum_version: must be one of "TLSv1.2", "TLSv1.3", got \'SSLv3\'',
                "interface[0].address: not an IP address: 'foo'",
                "pop3s.default_server.port: must be 1..65535, got 99999",
                "group_policy[0].name: must be 4-15 letters and digits, got 'x'",
                "admin.socket: must not be empty",
                "pop3s.authentication_server_group: no aaa_server_group named 'X'",
            ],
        )
        self.assertEqual(str(raised.exception), "\n".join(raised.exception.problems))

    def test_noFollowOnProblems(self) -> None:
        """A key with a problem does not cause more problems in the checks that use it."""
        data = merge(base(), {"pop3s": {"authentication_server_group": 5, "tls_support": "bogus"}})
        self.assertEqual(
            problems_of(data),
            [
                'pop3s.tls_support: must be one of "disabled", "enabled", "required", got \'bogus\'',
                "pop3s.authentication_server_group: must be a string, got integer",
            ],
        )

    def test_badProtocolSkipsGroupKeys(self) -> None:
        """A server group with an unknown protocol does not also report its keys as unknown."""
        data = merge(base(), {"aaa_server_group": with_groups({"name": "x", "protocol": "tacacs", "host": "h"})})
        self.assertEqual(len(problems_of(data)), 1)

    def test_unreadableGroupEntryNoFollowOn(self) -> None:
        """A group entry that is not a table does not make every reference a problem too."""
        self.assertEqual(
            problems_of(merge(base(), {"aaa_server_group": ["LOCAL"]})),
            ["aaa_server_group[0]: must be a table, got string"],
        )

    def test_droppedGroupNoFollowOn(self) -> None:
        """A group with a bad protocol is reported once, not again where it is referenced."""
        self.assertEqual(
            problems_of(merge(base(), {"aaa_server_group": [{"name": "LOCAL", "protocol": "locale"}]})),
            ['aaa_server_group[0].protocol: must be one of "local", "ldap", "radius", "pop3", got \'locale\''],
        )

    def test_unreadablePolicyNoFollowOn(self) -> None:
        """A policy without a readable name does not make references to policies problems too."""
        self.assertEqual(
            problems_of(merge(base(), {"group_policy": [{"name": 5}], "pop3s": {"default_group_policy": "Staff"}})),
            ["group_policy[0].name: must be a string, got integer"],
        )

    def test_configErrorFromString(self) -> None:
        """A ConfigError made from one string has that string as its only problem."""
        self.assertEqual(ConfigError("a: b").problems, ["a: b"])

    def test_documentMustBeATable(self) -> None:
        """A document that is not a table is a ConfigError, not a crash."""
        self.assertRaises(ConfigError, parse_config, [], BASE_DIR)  # type: ignore[arg-type]


class DefaultsTests(SynchronousTestCase):
    """Absent keys take SPEC [3]'s defaults."""

    def setUp(self) -> None:
        self.config = parse_config(base(), BASE_DIR, check_files=False)

    def test_gateway(self) -> None:
        """[gateway] defaults."""
        self.assertEqual(
            self.config.gateway,
            GatewayConfig(Path("/var/lib/mailgw"), "text", "mailgw", 1, listen_backlog=511),
        )

    def test_tls(self) -> None:
        """[tls] defaults, paths resolved against the configuration folder."""
        self.assertEqual(
            self.config.tls,
            TLSConfig(
                certificate=BASE_DIR / "tls/gateway.pem",
                private_key=BASE_DIR / "tls/gateway.key",
                generate_self_signed=True,  # set by base()
                minimum_version="TLSv1.2",
                client_ca=None,
                client_certificate="none",
            ),
        )
        defaults = parse_config(merge(base(), {"tls": DELETE}), BASE_DIR, check_files=False)
        self.assertFalse(defaults.tls.generate_self_signed)

    def test_interface(self) -> None:
        """Without [[interface]], one interface "inside" on 127.0.0.1 with all proxies."""
        self.assertEqual(
            self.config.interfaces, (InterfaceConfig("inside", "127.0.0.1", False, True, True, True, False),)
        )

    def test_interfaceFlagsFollowManagementOnly(self) -> None:
        """The proxy flags of an interface default to ``not management_only``."""
        config = parse_config(
            merge(
                base(),
                {"interface": [{"name": "lan"}, {"name": "mgmt", "address": "10.0.0.9", "management_only": True}]},
            ),
            BASE_DIR,
            check_files=False,
        )
        lan, mgmt = config.interfaces
        self.assertEqual((lan.pop3s, lan.imap4s, lan.smtps), (True, True, True))
        self.assertEqual((mgmt.pop3s, mgmt.imap4s, mgmt.smtps), (False, False, False))
        self.assertEqual(config.interfaces_for("pop3s"), (lan,))

    def test_interfaceAddressNormalised(self) -> None:
        """An interface address is stored in its canonical form."""
        config = parse_config(merge(base(), {"interface": [{"address": "0:0::1"}]}), BASE_DIR, check_files=False)
        self.assertEqual(config.interfaces[0].address, "::1")

    def test_proxies(self) -> None:
        """Each proxy's defaults, with the protocol's own ports."""
        ports = {"pop3s": (995, 110, 110), "imap4s": (993, 143, 143), "smtps": (988, 587, 587)}
        for proxy in self.config.proxies():
            port, starttls_port, upstream_port = ports[proxy.protocol]
            self.assertEqual(
                proxy,
                ProxyConfig(
                    protocol=proxy.protocol,
                    enabled=True,
                    port=port,
                    starttls_port=starttls_port,
                    tls_support="enabled",
                    allow_plaintext_auth=False,
                    authentication=("aaa",),
                    authentication_server_group="LOCAL",
                    authorization_server_group="",
                    accounting_server_group="",
                    default_group_policy="DfltGrpPolicy",
                    unauthenticated_session_limit=0,
                    username_password_delimiter=":",
                    server_delimiter="@",
                    allowed_servers=(),
                    login_timeout=60,
                    idle_timeout=1800,
                    default_server=UpstreamServerConfig("127.0.0.1", upstream_port, "starttls", True, None),
                    authorization=CertificateAuthorizationConfig("dn-fields", "CN", "OU"),
                    max_login_line=4096,
                    max_login_literal=4096,
                ),
            )
        self.assertEqual([p.protocol for p in self.config.proxies()], ["pop3s", "imap4s", "smtps"])

    def test_implicitUpstreamPort(self) -> None:
        """With upstream tls = "implicit", the port defaults to the protocol's TLS port."""
        config = parse_config(
            merge(base(), {p: {"default_server": {"tls": "implicit"}} for p in ("pop3s", "imap4s", "smtps")}),
            BASE_DIR,
            check_files=False,
        )
        self.assertEqual([p.default_server.port for p in config.proxies()], [995, 993, 465])

    def test_groupPolicies(self) -> None:
        """The built-in DfltGrpPolicy exists when none of that name is defined."""
        self.assertEqual(self.config.group_policies, (GroupPolicy("DfltGrpPolicy", 3, 1800, 0),))
        self.assertEqual(self.config.group_policy("DfltGrpPolicy"), GroupPolicy("DfltGrpPolicy", 3, 1800, 0))
        self.assertIsNone(self.config.group_policy("Other"))

    def test_definedPolicyDefaults(self) -> None:
        """A defined policy's absent keys take the defaults; a defined DfltGrpPolicy replaces the built-in."""
        config = parse_config(
            merge(base(), {"group_policy": [{"name": "Staff"}, {"name": "DfltGrpPolicy", "simultaneous_logins": 1}]}),
            BASE_DIR,
            check_files=False,
        )
        self.assertEqual(
            config.group_policies, (GroupPolicy("Staff", 3, 1800, 0), GroupPolicy("DfltGrpPolicy", 1, 1800, 0))
        )

    def test_poller(self) -> None:
        """[poller] defaults."""
        self.assertEqual(self.config.poller, PollerConfig(True, 300, "127.0.0.1", 25))

    def test_sso(self) -> None:
        """[sso.pop3] defaults."""
        self.assertEqual(
            self.config.sso_pop3,
            SSOConfig(
                enabled=False,
                mode="inline",
                monitor_interface="",
                servers=(HostPort("127.0.0.1", 110),),
                policy=(ipaddress.ip_network("10.0.0.0/8"),),
                ttl=28800,
                radius_accounting=(),
                portal="",
            ),
        )

    def test_admin(self) -> None:
        """[admin] defaults."""
        self.assertEqual(self.config.admin, AdminConfig(Path("/run/mailgw/admin.sock"), "", None, ""))

    def test_serverGroups(self) -> None:
        """Server groups get their per-protocol defaults."""
        config = parse_config(
            merge(base(), {"aaa_server_group": with_groups(ldap_group(), radius_group(), pop3_group())}),
            BASE_DIR,
            check_files=False,
        )
        local, ldap, radius, pop3 = config.aaa_server_groups
        self.assertEqual(local, LocalGroup("LOCAL", "local", BASE_DIR / "users.toml", max_pending=64))
        self.assertEqual(
            ldap,
            LdapGroup(
                name="corp-ldap",
                protocol="ldap",
                servers=("ldaps://dc1.example.com",),
                start_tls=False,
                ca=None,
                bind_dn="",
                bind_password=Secret(""),
                base_dn="ou=people,dc=example,dc=com",
                user_filter="(uid={username})",
                group_policy_attribute="memberOf",
                group_policy_map={},
                timeout=5,
                max_pending=64,
            ),
        )
        self.assertEqual(
            radius,
            RadiusGroup(
                "corp-radius",
                "radius",
                (RadiusServer("10.0.0.10", 1812, 1813, Secret("radius-secret")),),
                3,
                2,
                max_pending=64,
            ),
        )
        self.assertEqual(
            pop3,
            Pop3Group("mailserver", "pop3", (Pop3Server("mail.example.com", 110, "starttls"),), False, max_pending=64),
        )
        self.assertIs(config.aaa_group("corp-ldap"), ldap)
        self.assertRaises(KeyError, config.aaa_group, "nope")

    def test_pop3ServerImplicitPort(self) -> None:
        """A POP3 group server with implicit TLS defaults to port 995."""
        config = parse_config(
            merge(base(), {"aaa_server_group": with_groups(pop3_group(servers=[{"host": "m", "tls": "implicit"}]))}),
            BASE_DIR,
            check_files=False,
        )
        group = config.aaa_group("mailserver")
        assert isinstance(group, Pop3Group)
        self.assertEqual(group.servers, (Pop3Server("m", 995, "implicit"),))


class LimitTests(SynchronousTestCase):
    """The limits against hostile clients [4.10] are read where they are set, each on its own."""

    def test_valuesRead(self) -> None:
        """listen_backlog, each proxy's login limits and each group's max_pending take the configured values."""
        config = parse_config(
            merge(
                base(),
                {
                    "gateway": {"listen_backlog": 1024},
                    "pop3s": {"max_login_line": 1024},
                    "imap4s": {"max_login_line": 8192, "max_login_literal": 65536},
                    "smtps": {"max_login_literal": 0},
                    "aaa_server_group": [
                        {"name": "LOCAL", "protocol": "local", "max_pending": 0},
                        ldap_group(max_pending=1),
                        radius_group(max_pending=2),
                        pop3_group(max_pending=300),
                    ],
                },
            ),
            BASE_DIR,
            check_files=False,
        )
        self.assertEqual(config.gateway.listen_backlog, 1024)
        self.assertEqual(
            [(p.protocol, p.max_login_line, p.max_login_literal) for p in config.proxies()],
            [("pop3s", 1024, 4096), ("imap4s", 8192, 65536), ("smtps", 4096, 0)],
        )
        self.assertEqual(
            [(g.protocol, g.max_pending) for g in config.aaa_server_groups],
            [("local", 0), ("ldap", 1), ("radius", 2), ("pop3", 300)],
        )

    def test_sampleValues(self) -> None:
        """The sample shows the defaults."""
        config = load_config(SAMPLE)
        self.assertEqual(config.gateway.listen_backlog, 511)
        self.assertEqual({(p.max_login_line, p.max_login_literal) for p in config.proxies()}, {(4096, 4096)})
        self.assertEqual({g.max_pending for g in config.aaa_server_groups}, {64})
        self.assertEqual((config.smtps.fallback_message_size, config.smtps.capabilities_refresh), (10240000, 600))

    def test_smtpCapabilityKeys(self) -> None:
        """[smtps] fallback_message_size and capabilities_refresh are read as given."""
        config = parse_config(
            merge(base(), {"smtps": {"fallback_message_size": 52428800, "capabilities_refresh": 3600}}),
            BASE_DIR,
            check_files=False,
        )
        self.assertEqual((config.smtps.fallback_message_size, config.smtps.capabilities_refresh), (52428800, 3600))


class HelperTests(SynchronousTestCase):
    """The helpers the rest of the gateway uses on a configuration."""

    def test_listenPorts(self) -> None:
        """tls_support picks the ports [4.1]; starttls_port 0 is no port."""
        config = parse_config(base(), BASE_DIR, check_files=False)
        cases = [
            ({"tls_support": "enabled"}, (Listener(995, True), Listener(110, False))),
            ({"tls_support": "required"}, (Listener(995, True),)),
            ({"tls_support": "disabled", "allow_plaintext_auth": True}, (Listener(110, False),)),
            ({"starttls_port": 0}, (Listener(995, True),)),
        ]
        for patch, expected in cases:
            config = parse_config(merge(base(), {"pop3s": patch}), BASE_DIR, check_files=False)
            self.assertEqual(config.pop3s.listen_ports(), expected)

    def test_proxyByName(self) -> None:
        """Config.proxy finds a proxy by protocol name."""
        config = parse_config(base(), BASE_DIR, check_files=False)
        self.assertIs(config.proxy("imap4s"), config.imap4s)
        self.assertRaises(KeyError, config.proxy, "nntps")

    def test_ssoAppliesTo(self) -> None:
        """SSO policy matching by network (IPv4-mapped addresses included) and by MAC."""
        config = parse_config(
            merge(base(), {"sso": {"pop3": {"policy": ["10.0.0.0/8", "fd00::/8", "aa:bb:cc:dd:ee:ff"]}}}),
            BASE_DIR,
            check_files=False,
        )
        sso = config.sso_pop3
        self.assertEqual(sso.policy[2], MACAddress("aa:bb:cc:dd:ee:ff"))
        self.assertTrue(sso.applies_to("10.1.2.3"))
        self.assertTrue(sso.applies_to("::ffff:10.1.2.3"))
        self.assertTrue(sso.applies_to("fd00::5"))
        self.assertFalse(sso.applies_to("192.168.1.1"))
        self.assertTrue(sso.applies_to("192.168.1.1", "AA-BB-CC-DD-EE-FF"))
        self.assertFalse(sso.applies_to("192.168.1.1", "aa:bb:cc:dd:ee:00"))
        self.assertFalse(sso.applies_to("not an ip"))

    def test_hostPortStr(self) -> None:
        """HostPort prints back as host:port, IPv6 in brackets."""
        self.assertEqual(str(HostPort("::1", 110)), "[::1]:110")
        self.assertEqual(str(HostPort("mail", 110)), "mail:110")


class SecretTests(SynchronousTestCase):
    """Secrets never show in a repr, a str or a problem."""

    SECRETS = ("ldap-bind-pw-1", "radius-secret-2", "collector-secret-3")

    def config(self) -> Config:
        return parse_config(
            merge(
                base(),
                {
                    "aaa_server_group": with_groups(
                        ldap_group(bind_dn="cn=gw,dc=example,dc=com", bind_password=self.SECRETS[0]),
                        radius_group(servers=[{"host": "10.0.0.1", "secret": self.SECRETS[1]}]),
                    ),
                    "sso": {"pop3": {"radius_accounting": [{"host": "10.0.0.2", "secret": self.SECRETS[2]}]}},
                },
            ),
            BASE_DIR,
            check_files=False,
        )

    def test_reprHidesSecrets(self) -> None:
        """repr and str of the whole configuration show no secret."""
        config = self.config()
        for text in (repr(config), str(config)):
            for secret in self.SECRETS:
                self.assertNotIn(secret, text)
            self.assertIn("Secret('********')", text)

    def test_revealGivesValue(self) -> None:
        """The consumer gets the value with reveal()."""
        config = self.config()
        ldap = config.aaa_group("corp-ldap")
        radius = config.aaa_group("corp-radius")
        assert isinstance(ldap, LdapGroup) and isinstance(radius, RadiusGroup)
        self.assertEqual(ldap.bind_password.reveal(), self.SECRETS[0])
        self.assertEqual(radius.servers[0].secret.reveal(), self.SECRETS[1])
        self.assertEqual(config.sso_pop3.radius_accounting[0].secret.reveal(), self.SECRETS[2])

    def test_secretBehaviour(self) -> None:
        """Secrets compare by value, hide it in str/repr/format, and are false when empty."""
        self.assertEqual(Secret("a"), Secret("a"))
        self.assertNotEqual(Secret("a"), Secret("b"))
        self.assertNotEqual(Secret("a"), "a")
        self.assertEqual(hash(Secret("a")), hash(Secret("a")))
        self.assertEqual(str(Secret("a")), "Secret('********')")
        self.assertEqual(f"{Secret('a')}", "Secret('********')")
        self.assertFalse(Secret(""))
        self.assertTrue(Secret("x"))

    def test_problemsHideSecrets(self) -> None:
        """A problem about a secret key never quotes its value."""
        data = merge(
            base(),
            {
                "aaa_server_group": with_groups(
                    radius_group(servers=[{"host": "bad host", "secret": "s3cr3t-value", "secrte": "typo-s3cr3t"}]),
                    ldap_group(bind_password="s3cr3t-value"),
                )
            },
        )
        problems = problems_of(data)
        self.assertTrue(problems)
        for problem in problems:
            self.assertNotIn("s3cr3t", problem)


class PathTests(SynchronousTestCase):
    """Paths are resolved against the configuration file's folder."""

    def test_relativePaths(self) -> None:
        """Relative paths are joined to the folder and normalised; absolute ones stay."""
        data = merge(
            base(),
            {
                "gateway": {"state_dir": "state"},
                "tls": {"certificate": "../pki/cert.pem", "private_key": "/srv/key.pem", "client_ca": "ca/clients.pem"},
                "pop3s": {"default_server": {"ca": "mail-ca.pem"}},
                "admin": {
                    "socket": "run/admin.sock",
                    "manhole": "ssh:2222:interface=127.0.0.1",
                    "manhole_authorized_keys": "keys",
                },
            },
        )
        config = parse_config(data, Path("/opt/mailgw/etc"), check_files=False)
        self.assertEqual(config.gateway.state_dir, Path("/opt/mailgw/etc/state"))
        self.assertEqual(config.tls.certificate, Path("/opt/mailgw/pki/cert.pem"))
        self.assertEqual(config.tls.private_key, Path("/srv/key.pem"))
        self.assertEqual(config.tls.client_ca, Path("/opt/mailgw/etc/ca/clients.pem"))
        self.assertEqual(config.pop3s.default_server.ca, Path("/opt/mailgw/etc/mail-ca.pem"))
        self.assertEqual(config.admin.socket, Path("/opt/mailgw/etc/run/admin.sock"))
        self.assertEqual(config.admin.manhole_authorized_keys, Path("/opt/mailgw/etc/keys"))
        self.assertEqual(config.aaa_group("LOCAL"), LocalGroup("LOCAL", "local", Path("/opt/mailgw/etc/users.toml")))

    def test_relativeBaseDir(self) -> None:
        """A relative base folder is made absolute."""
        config = parse_config(base(), Path("conf"), check_files=False)
        self.assertEqual(config.tls.certificate, Path.cwd() / "conf" / "tls" / "gateway.pem")

    def test_loadConfigUsesFileFolder(self) -> None:
        """load_config resolves against the file's folder and records the file's path."""
        folder = Path(self.mktemp())
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "users.toml").write_text("")
        path = folder / "sub" / "gw.toml"
        path.write_text(
            '[tls]\ngenerate_self_signed = true\n[[aaa_server_group]]\nname = "LOCAL"\nprotocol = "local"\n'
            'users_file = "users.toml"\n'
        )
        config = load_config(path)
        self.assertEqual(config.path, path.absolute())
        self.assertEqual(config.aaa_group("LOCAL"), LocalGroup("LOCAL", "local", path.absolute().parent / "users.toml"))


class FileCheckTests(SynchronousTestCase):
    """With check_files, the input files a configuration names must exist."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.hash = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
        (self.folder / "users.toml").write_text(f'[users.alice]\npassword_hash = "{self.hash}"\n')

    def test_allFilesPresent(self) -> None:
        """No problem when the files exist."""
        for name in ("cert.pem", "key.pem", "ca.pem", "keys"):
            (self.folder / name).write_text("x")
        data = merge(
            base(),
            {
                "tls": {
                    "generate_self_signed": False,
                    "certificate": "cert.pem",
                    "private_key": "key.pem",
                    "client_ca": "ca.pem",
                },
                "pop3s": {"default_server": {"ca": "ca.pem"}},
                "aaa_server_group": with_groups(ldap_group(ca="ca.pem")),
                "admin": {"manhole": "ssh:2222:interface=127.0.0.1", "manhole_authorized_keys": "keys"},
            },
        )
        self.assertEqual(problems_of(data, check_files=True, base_dir=self.folder), [])

    def test_missingFiles(self) -> None:
        """Each missing file is named with its absolute path."""
        data = merge(
            base(),
            {
                "tls": {"generate_self_signed": False, "client_ca": "ca.pem"},
                "imap4s": {"default_server": {"ca": "mail-ca.pem"}},
                "aaa_server_group": [
                    {"name": "LOCAL", "protocol": "local", "users_file": "nobody.toml"},
                    ldap_group(ca="ldap-ca.pem"),
                ],
                "admin": {"manhole": "ssh:2222:interface=127.0.0.1", "manhole_authorized_keys": "keys"},
            },
        )
        f = self.folder.absolute()
        self.assertEqual(
            problems_of(data, check_files=True, base_dir=self.folder),
            [
                f"tls.certificate: file not found: {f}/tls/gateway.pem",
                f"tls.private_key: file not found: {f}/tls/gateway.key",
                f"tls.client_ca: file not found: {f}/ca.pem",
                f"imap4s.default_server.ca: file not found: {f}/mail-ca.pem",
                f"aaa_server_group[0].users_file: file not found: {f}/nobody.toml",
                f"aaa_server_group[1].ca: file not found: {f}/ldap-ca.pem",
                f"admin.manhole_authorized_keys: file not found: {f}/keys",
            ],
        )

    def test_selfSignedNeedsNoFiles(self) -> None:
        """With generate_self_signed, the certificate and key may be missing."""
        self.assertEqual(problems_of(base(), check_files=True, base_dir=self.folder), [])

    def test_directoryIsNotAFile(self) -> None:
        """A folder where a file is expected is a problem."""
        (self.folder / "ca").mkdir()
        data = merge(base(), {"tls": {"client_ca": "ca"}})
        self.assertEqual(
            problems_of(data, check_files=True, base_dir=self.folder),
            [f"tls.client_ca: not a regular file: {self.folder.absolute()}/ca"],
        )

    def test_usersFileIsChecked(self) -> None:
        """The users file's own problems, and its policy names, are reported with the group's key."""
        (self.folder / "users.toml").write_text(
            f'[users.alice]\npassword_hash = "plaintext"\n[users.bob]\npassword_hash = "{self.hash}"\n'
            'group_policy = "Ghost"\n'
        )
        users = self.folder.absolute() / "users.toml"
        self.assertEqual(
            problems_of(base(), check_files=True, base_dir=self.folder),
            [
                f"aaa_server_group[0].users_file: {users}: users.alice.password_hash: not a bcrypt or argon2 hash"
                " (make one with `mailgwctl hash-password`)",
            ],
        )
        (self.folder / "users.toml").write_text(f'[users.bob]\npassword_hash = "{self.hash}"\ngroup_policy = "Ghost"\n')
        self.assertEqual(
            problems_of(base(), check_files=True, base_dir=self.folder),
            [f"aaa_server_group[0].users_file: {users}: users.bob.group_policy: no group_policy named 'Ghost'"],
        )

    def test_usersFileSyntax(self) -> None:
        """A TOML error in the users file names the file, line and column."""
        (self.folder / "users.toml").write_text("[users.alice\n")
        problems = problems_of(base(), check_files=True, base_dir=self.folder)
        self.assertEqual(len(problems), 1)
        self.assertTrue(
            problems[0].startswith(
                f"aaa_server_group[0].users_file: {self.folder.absolute()}/users.toml: line 1, column "
            )
        )


class LoadConfigTests(SynchronousTestCase):
    """load_config reads files; every failure is a ConfigError."""

    def test_sampleIsValid(self) -> None:
        """The sample etc/mailgw.toml validates as it is, files included."""
        config = load_config(SAMPLE)
        self.assertEqual(config.path, SAMPLE)
        self.assertTrue(config.tls.generate_self_signed)
        self.assertEqual(
            [g.name for g in config.aaa_server_groups], ["LOCAL", "corp-ldap", "corp-radius", "mailserver"]
        )
        self.assertEqual(config.gateway.state_dir, Path("/var/lib/mailgw"))
        self.assertEqual(
            [(p.default_server.host, p.default_server.port) for p in config.proxies()],
            [("127.0.0.1", 110), ("127.0.0.1", 143), ("127.0.0.1", 587)],
        )
        self.assertEqual((config.admin.manhole, config.admin.metrics, config.sso_pop3.portal), ("", "", ""))

    def test_sampleShowsEveryKey(self) -> None:
        """
        Every key the parser knows, at its own key path (each proxy section, each kind of
        server group), is set in the sample or shown in a commented example line of its
        section (so the sample documents them all).
        """
        known = _known_key_paths()
        # the recorder works: it sees keys of every level, defaulted ones included
        for path in (
            "gateway.listen_backlog",
            "smtps.max_login_literal",
            "imap4s.default_server.verify_certificate",
            "aaa_server_group[local].max_pending",
            "aaa_server_group[radius].servers[].acct_port",
            "sso.pop3.radius_accounting[].secret",
        ):
            self.assertIn(path, known)
        self.assertEqual(sorted(known - _sample_key_paths()), [])

    def test_syntaxError(self) -> None:
        """A TOML syntax error names the file, the line and the column."""
        path = Path(self.mktemp())
        path.write_text('[gateway]\nnode_name = "gw"\nworkers = = 2\n')
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(raised.exception.problems, [f"{path}: line 3, column 11: invalid TOML: Invalid value"])

    def test_syntaxErrorAtEnd(self) -> None:
        """An error at the end of the document still gets a line and column."""
        path = Path(self.mktemp())
        path.write_text("[gateway]\nworkers =")
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(raised.exception.problems, [f"{path}: line 2, column 10: invalid TOML: Invalid value"])

    def test_missingFile(self) -> None:
        """A missing file is a ConfigError naming it."""
        path = Path(self.mktemp())
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(raised.exception.problems, [f"{path}: cannot read: No such file or directory"])

    def test_notUtf8(self) -> None:
        """Bytes that are not UTF-8 are a ConfigError with the line."""
        path = Path(self.mktemp())
        path.write_bytes(b"[gateway]\nnode_name = '\xff'\n")
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(raised.exception.problems, [f"{path}: line 2: not valid UTF-8"])


class _KeyRecorder(Mapping[str, Any]):
    """
    A TOML table that records the key path of every key looked up in it, present or not:
    fed to the parser, it shows which keys the parser knows.
    """

    def __init__(self, data: Mapping[str, Any], path: str, seen: set[str]) -> None:
        self._data = {key: _recording(value, _child_path(path, key), seen) for key, value in data.items()}
        self._path = path
        self._seen = seen

    def __getitem__(self, key: str) -> Any:
        self._seen.add(_child_path(self._path, key))
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _child_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _item_path(path: str, item: object) -> str:
    """The key path of an array item: ``name[]``, and ``aaa_server_group[PROTOCOL]``
    for a server group, whose keys depend on its protocol."""
    if path == "aaa_server_group" and isinstance(item, Mapping):
        return f"{path}[{item.get('protocol')}]"
    return f"{path}[]"


def _recording(value: object, path: str, seen: set[str]) -> object:
    if isinstance(value, Mapping):
        return _KeyRecorder(value, path, seen)
    if isinstance(value, list):
        return [_recording(item, _item_path(path, item), seen) for item in value]
    return value


def _every_table() -> dict[str, Any]:
    """A valid configuration with every table the parser reads present, mostly empty
    (an absent table is not read key by key), and a server group of each protocol."""
    proxy: dict[str, Any] = {"default_server": {}, "authorization": {}}
    return {
        "gateway": {},
        "tls": {"generate_self_signed": True},
        "interface": [{}],
        "pop3s": copy.deepcopy(proxy),
        "imap4s": copy.deepcopy(proxy),
        "smtps": copy.deepcopy(proxy),
        "aaa_server_group": with_groups(ldap_group(), radius_group(), pop3_group()),
        "group_policy": [{"name": "Staff"}],
        "inspection": [inspection(header_rules=[{"header": "Subject", "match": "x", "action": "tag"}])],
        "poller": {},
        "sso": {"pop3": {"radius_accounting": [{"host": "10.0.0.2", "secret": "x"}]}},
        "admin": {},
    }


def _known_key_paths() -> set[str]:
    """The key paths the parser looks up (``interface[].name``,
    ``aaa_server_group[radius].servers[].secret``, ...), found by recording them."""
    seen: set[str] = set()
    document = _recording(_every_table(), "", seen)
    assert isinstance(document, Mapping)
    parse_config(document, BASE_DIR, check_files=False)
    return seen


def _document_key_paths(node: object, path: str = "") -> set[str]:
    """The key paths of a parsed TOML document, named as :func:`_known_key_paths` names them."""
    paths: set[str] = set()
    if isinstance(node, Mapping):
        for key, value in node.items():
            paths.add(_child_path(path, key))
            paths |= _document_key_paths(value, _child_path(path, key))
    elif isinstance(node, list):
        for item in node:
            paths |= _document_key_paths(item, _item_path(path, item))
    return paths


_TABLE_HEADER = re.compile(r"\[([A-Za-z0-9_.-]+)\]\s*(#.*)?")
_COMMENTED_KEY = re.compile(r"#\s*([A-Za-z0-9_-]+\s*=.*)")
# A commented-out example entry of an array of tables (``#[[inspection]]``): the
# commented example lines after it show the keys of that array's entries.
_COMMENTED_ARRAY_HEADER = re.compile(r"#\[\[([A-Za-z0-9_.-]+)\]\]\s*(#.*)?")


def _sample_key_paths() -> set[str]:
    """
    The key paths the sample shows: those it sets, and those of the commented example
    lines (``#   radius_accounting = [{ host = ... }]``) in its ``[table]`` sections and
    in commented-out entries of arrays of tables (``#[[inspection]]``).
    """
    text = SAMPLE.read_text()
    paths = _document_key_paths(tomllib.loads(text))
    section: str | None = ""
    for line in text.splitlines():
        header = _TABLE_HEADER.fullmatch(line)
        if header:
            section = header.group(1)
        elif line.startswith("[["):
            section = None  # an array item: which one is not known from the line alone
        elif commented := _COMMENTED_ARRAY_HEADER.fullmatch(line):
            section = f"{commented.group(1)}[]"
            paths.add(commented.group(1))
        elif section is not None and (example := _COMMENTED_KEY.fullmatch(line)):
            try:
                value = tomllib.loads(example.group(1))
            except tomllib.TOMLDecodeError:
                continue  # prose that happens to contain "word ="
            paths |= _document_key_paths(value, section)
    return paths


def _all_keys() -> set[str]:
    """The key names the parser knows, at any level."""
    return {path.rsplit(".", 1)[-1] for path in _known_key_paths()}


# --- Properties ---------------------------------------------------------------------------

KEYS = sorted(
    _all_keys()
    | {
        "gateway",
        "tls",
        "interface",
        "aaa_server_group",
        "group_policy",
        "inspection",
        "poller",
        "sso",
        "pop3",
        "admin",
        "default_server",
        "authorization",
        "users",
        "x",
    }
)

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 25, 110, 995, 65535, 65536, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "none",
            "aaa",
            "LOCAL",
            "DfltGrpPolicy",
            "127.0.0.1",
            "::",
            "ldap://x",
            "ssl:1",
            "tcp:1:interface=::1",
            "tcp:127.0.0.1:3310",
            "unix:/run/clamav/clamd.ctl",
            "*.exe",
            "*.[",
            "application/x-msdownload",
            "^YES",
            "(",
            "strict",
            "reject",
            "tag",
            "strip",
            "ssh:22:interface=127.0.0.1",
            "a\x00b",
            "10.0.0.0/8",
            "aa:bb:cc:dd:ee:ff",
            "{username}",
            "(uid={username})",
            "local",
            "ldap",
            "radius",
            "pop3",
            "monitor",
            "required",
            "implicit",
            "\\",
            "unix:",
        ]
    ),
    st.datetimes(),
)
toml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=5),
    ),
    max_leaves=25,
)
documents = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), toml_values, max_size=8)

# Key paths (as nested keys) of every port, with whether 0 is allowed there.
PORT_KEYS: list[tuple[tuple[str | int, ...], bool]] = [
    (("pop3s", "port"), False),
    (("imap4s", "starttls_port"), True),
    (("smtps", "default_server", "port"), False),
    (("poller", "smtp_port"), False),
    (("aaa_server_group", 1, "servers", 0, "auth_port"), False),
    (("aaa_server_group", 1, "servers", 0, "acct_port"), False),
    (("aaa_server_group", 2, "servers", 0, "port"), False),
    (("sso", "pop3", "radius_accounting", 0, "port"), False),
]


# Key paths (as nested keys, in _full()) of the limits of [4.10], with their ranges
# (None: no upper bound).
LIMIT_KEYS: list[tuple[tuple[str | int, ...], int, int | None]] = [
    (("gateway", "listen_backlog"), 1, 65535),
    (("pop3s", "max_login_line"), 512, 65536),
    (("imap4s", "max_login_line"), 512, 65536),
    (("smtps", "max_login_line"), 512, 65536),
    (("pop3s", "max_login_literal"), 0, 65536),
    (("imap4s", "max_login_literal"), 0, 65536),
    (("smtps", "max_login_literal"), 0, 65536),
    (("aaa_server_group", 0, "max_pending"), 0, None),  # local
    (("aaa_server_group", 1, "max_pending"), 0, None),  # radius
    (("aaa_server_group", 2, "max_pending"), 0, None),  # pop3
    (("aaa_server_group", 0, "cache_ttl"), 0, 86400),  # local
    (("aaa_server_group", 1, "cache_ttl"), 0, 86400),  # radius
    (("aaa_server_group", 3, "max_pending"), 0, None),  # ldap
]


def _paths(node: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path of a parsed TOML document (tables' keys and arrays' indexes)."""
    paths: list[tuple[str | int, ...]] = []
    items: list[tuple[str | int, object]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    for key, child in items:
        paths.append((*prefix, key))
        paths.extend(_paths(child, (*prefix, key)))
    return paths


SAMPLE_PATHS = _paths(tomllib.loads(SAMPLE.read_text()))


def _full() -> dict[str, Any]:
    return merge(
        base(),
        {
            "aaa_server_group": with_groups(radius_group(), pop3_group(), ldap_group()),
            "sso": {"pop3": {"radius_accounting": [{"host": "10.0.0.2", "secret": "x"}]}},
        },
    )


def _set(data: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    node: Any = data
    for part in path[:-1]:
        if isinstance(part, str):
            node = node.setdefault(part, {})
        else:
            node = node[part]
    node[path[-1]] = value


def _key_path(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class PropertyTests(SynchronousTestCase):
    """Properties over arbitrary input."""

    @given(documents)
    def test_arbitraryDocumentsOnlyRaiseConfigError(self, data: dict[str, Any]) -> None:
        """Any TOML-ish document gives a Config or a ConfigError of non-empty single lines."""
        for check_files in (False, True):
            try:
                parse_config(data, BASE_DIR, check_files=check_files)
            except ConfigError as e:
                self.assertTrue(e.problems)
                for problem in e.problems:
                    self.assertNotIn("\n", problem)
                    self.assertRegex(problem, r"^\S[^:]*: |^\S.*: ")

    @given(st.sampled_from(SAMPLE_PATHS), toml_values)
    def test_arbitraryValueAnywhereInTheSample(self, path: tuple[str | int, ...], value: object) -> None:
        """Any value at any key of the sample gives a Config or a ConfigError of single lines."""
        data = tomllib.loads(SAMPLE.read_text())
        _set(data, path, value)
        try:
            parse_config(data, SAMPLE.parent, check_files=False)
        except ConfigError as e:
            self.assertTrue(e.problems)
            for problem in e.problems:
                self.assertNotIn("\n", problem)

    @given(st.sampled_from(SAMPLE_PATHS))
    def test_anyKeyRemovedFromTheSample(self, path: tuple[str | int, ...]) -> None:
        """Removing any key of the sample gives a Config or a ConfigError, never a crash."""
        data = tomllib.loads(SAMPLE.read_text())
        node: Any = data
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
        try:
            parse_config(data, SAMPLE.parent, check_files=False)
        except ConfigError as e:
            self.assertTrue(e.problems)

    @given(st.sampled_from(PORT_KEYS), st.one_of(st.integers(max_value=-1), st.integers(min_value=65536)))
    def test_portOutOfRange(self, port_key: tuple[tuple[str | int, ...], bool], port: int) -> None:
        """A port outside 1..65535 (0..65535 where 0 means none) is a problem naming the key."""
        path, allow_zero = port_key
        config = _full()
        _set(config, path, port)
        if not -(2**63) <= port < 2**63:
            expected = "must be a 64-bit integer, as TOML integers are"
        elif allow_zero:
            expected = f"must be 0 (none) or 1..65535, got {port}"
        else:
            expected = f"must be 1..65535, got {port}"
        self.assertEqual(problems_of(config), [f"{_key_path(path)}: {expected}"])

    @given(
        st.sampled_from(LIMIT_KEYS),
        st.one_of(st.integers(min_value=-2, max_value=70000), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    )
    def test_limitRange(self, limit: tuple[tuple[str | int, ...], int, int | None], value: int) -> None:
        """A limit inside its range is valid; outside, it is one problem naming the key and the range."""
        path, minimum, maximum = limit
        config = _full()
        _set(config, path, value)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"{minimum}..{maximum}"
            self.assertEqual(problems_of(config), [f"{_key_path(path)}: must be {bounds}, got {value}"])
        else:
            self.assertEqual(problems_of(config), [])

    @given(st.sampled_from(PORT_KEYS))
    def test_portZero(self, port_key: tuple[tuple[str | int, ...], bool]) -> None:
        """Port 0 is a problem except for starttls_port."""
        path, allow_zero = port_key
        config = _full()
        _set(config, path, 0)
        self.assertEqual(problems_of(config) == [], allow_zero)

    @given(st.text(max_size=3), st.text(max_size=3))
    def test_delimiters(self, d1: str, d2: str) -> None:
        """Delimiters are valid exactly when each is one printable ASCII non-space character and they differ."""
        config = merge(base(), {"pop3s": {"username_password_delimiter": d1, "server_delimiter": d2}})
        good = all(len(d) == 1 and "!" <= d <= "~" for d in (d1, d2)) and d1 != d2
        self.assertEqual(problems_of(config) == [], good)

    @given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
    def test_ssoPolicyNetworks(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int) -> None:
        """Any network in canonical form is accepted, and it contains its own address."""
        prefix = min(prefix, address.max_prefixlen)
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        config = parse_config(merge(base(), {"sso": {"pop3": {"policy": [str(network)]}}}), BASE_DIR, check_files=False)
        self.assertEqual(config.sso_pop3.policy, (network,))
        self.assertTrue(config.sso_pop3.applies_to(str(network.network_address)))


class Pop3ServerTrustTests(SynchronousTestCase):
    """pop3 group servers take verify_certificate and ca like a default_server."""

    def test_caResolvedAndVerifyRead(self) -> None:
        """ca is resolved against the configuration folder; verify_certificate is read."""
        data = {
            "tls": {"generate_self_signed": True},
            "aaa_server_group": [
                {"name": "LOCAL", "protocol": "local"},
                {
                    "name": "mailserver",
                    "protocol": "pop3",
                    "servers": [
                        {"host": "127.0.0.1", "ca": "certs/ca.pem"},
                        {"host": "mail.example.com", "verify_certificate": False},
                    ],
                },
            ],
        }
        config = parse_config(data, Path("/etc/mailgw"), check_files=False)
        group = config.aaa_group("mailserver")
        assert isinstance(group, Pop3Group)
        self.assertEqual(group.servers[0].ca, Path("/etc/mailgw/certs/ca.pem"))
        self.assertTrue(group.servers[0].verify_certificate)
        self.assertFalse(group.servers[1].verify_certificate)
        self.assertIsNone(group.servers[1].ca)

    def test_missingCaFileNamed(self) -> None:
        """A missing ca file is reported with its key path."""
        data = {
            "tls": {"generate_self_signed": True},
            "aaa_server_group": [
                {"name": "LOCAL", "protocol": "local", "users_file": "/dev/null"},
                {"name": "mailserver", "protocol": "pop3", "servers": [{"host": "127.0.0.1", "ca": "nope.pem"}]},
            ],
        }
        with self.assertRaises(ConfigError) as caught:
            parse_config(data, Path("/nonexistent"), check_files=True)
        self.assertTrue(
            any(p.startswith("aaa_server_group[1].servers[0].ca: file not found") for p in caught.exception.problems),
            caught.exception.problems,
        )


def _uncommented_sample() -> str:
    """The sample with its commented-out example entries (``#[[inspection]]``, ``#name = …``) put back."""
    return re.sub(r"(?m)^#(?=\[\[|[a-z_]+ = )", "", SAMPLE.read_text())


class InspectionTests(SynchronousTestCase):
    """``[[inspection]]`` profiles [3] [4.9] and ``group_policy.inspection``."""

    def test_defaults(self) -> None:
        """A profile with only a name has SPEC [3]'s defaults; no profile is the default."""
        self.assertEqual(parse_config(base(), BASE_DIR, check_files=False).inspections, ())
        config = parse_config(merge(base(), {"inspection": [inspection()]}), BASE_DIR, check_files=False)
        self.assertEqual(
            config.inspections,
            (
                InspectionProfile(
                    name="strict",
                    max_message_size=26214400,
                    scan_limit=26214400,
                    scan_limit_action="refuse",
                    clamd=ClamdAddress("unix", path=Path("/run/clamav/clamd.ctl")),
                    clamd_timeout=30,
                    on_scanner_failure="tempfail",
                    attachments_deny=("*.exe", "*.js", "*.vbs", "*.scr"),
                    content_types_deny=("application/x-msdownload",),
                    attachment_action="strip",
                    header_rules=(),
                ),
            ),
        )
        self.assertIs(config.inspection("strict"), config.inspections[0])
        self.assertIsNone(config.inspection(""))
        self.assertIsNone(config.inspection("lax"))

    def test_valuesRead(self) -> None:
        """Every key is read as given; globs and types are lower-cased, clamd parsed."""
        config = parse_config(
            merge(
                base(),
                {
                    "inspection": [
                        inspection(
                            max_message_size=1000,
                            scan_limit=500,
                            scan_limit_action="pass",
                            clamd="tcp:127.0.0.1:3310",
                            clamd_timeout=2.5,
                            on_scanner_failure="pass",
                            attachments_deny=["*.EXE", "Invoice?.pdf"],
                            content_types_deny=["Application/X-MSDownload", "video/*"],
                            attachment_action="reject",
                            header_rules=[
                                {"header": "X-Spam-Flag", "match": "^YES", "action": "reject"},
                                {"header": "subject", "match": "(?i)lottery", "action": "tag"},
                                {"header": "X-Spam-Level", "match": r"^\*{5}", "action": "tag", "tag": "[SPAM]"},
                            ],
                        )
                    ],
                    "group_policy": [{"name": "Staff", "inspection": "strict"}],
                },
            ),
            BASE_DIR,
            check_files=False,
        )
        profile = config.inspections[0]
        self.assertEqual(
            (profile.max_message_size, profile.scan_limit, profile.scan_limit_action),
            (1000, 500, "pass"),
        )
        self.assertEqual(profile.clamd, ClamdAddress("tcp", host="127.0.0.1", port=3310))
        self.assertEqual((profile.clamd_timeout, profile.on_scanner_failure), (2.5, "pass"))
        self.assertEqual(profile.attachments_deny, ("*.exe", "invoice?.pdf"))
        self.assertEqual(profile.content_types_deny, ("application/x-msdownload", "video/*"))
        self.assertEqual(profile.attachment_action, "reject")
        self.assertEqual(
            profile.header_rules,
            (
                HeaderRule("X-Spam-Flag", re.compile("^YES"), "reject"),
                HeaderRule("subject", re.compile("(?i)lottery"), "tag", "[SUSPECT]"),
                HeaderRule("X-Spam-Level", re.compile(r"^\*{5}"), "tag", "[SPAM]"),
            ),
        )
        policy = config.group_policy("Staff")
        assert policy is not None
        self.assertEqual(policy.inspection, "strict")
        self.assertEqual(config.group_policy(DEFAULT_GROUP_POLICY), GroupPolicy(DEFAULT_GROUP_POLICY, 3, 1800, 0, ""))

    def test_clamdAddresses(self) -> None:
        """unix paths are resolved against the configuration folder; tcp takes names and [IPv6]; "" is none."""
        profiles = parse_config(
            merge(
                base(),
                {
                    "inspection": [
                        inspection(name="a", clamd="unix:clamd.sock"),
                        inspection(name="b", clamd="tcp:[::1]:3310"),
                        inspection(name="c", clamd="tcp:clamd.example.com:10"),
                        inspection(name="d", clamd=""),
                    ]
                },
            ),
            BASE_DIR,
            check_files=False,
        ).inspections
        self.assertEqual(
            [p.clamd for p in profiles],
            [
                ClamdAddress("unix", path=BASE_DIR / "clamd.sock"),
                ClamdAddress("tcp", host="::1", port=3310),
                ClamdAddress("tcp", host="clamd.example.com", port=10),
                None,
            ],
        )
        self.assertEqual(
            [str(p.clamd) for p in profiles[:3]],
            ["unix:/etc/mailgw/clamd.sock", "tcp:[::1]:3310", "tcp:clamd.example.com:10"],
        )

    def test_deniedAttachment(self) -> None:
        """File names match the globs case-insensitively, on their last path component."""
        profile = parse_config(
            merge(base(), {"inspection": [inspection(attachments_deny=["*.EXE", "report[0-9].doc", "*.[!t]xt"])]}),
            BASE_DIR,
            check_files=False,
        ).inspections[0]
        for name, glob in [
            ("tool.exe", "*.exe"),
            ("TOOL.Exe", "*.exe"),
            ("C:\\temp\\tool.exe", "*.exe"),
            ("../tool.exe", "*.exe"),
            ("Report7.DOC", "report[0-9].doc"),
            ("notes.bxt", "*.[!t]xt"),
            ("notes.txt", None),
            ("tool.exe.txt", None),
            ("tool.exe/", None),
            ("reportX.doc", None),
        ]:
            self.assertEqual(profile.denied_attachment(name), glob, name)

    def test_deniedContentType(self) -> None:
        """Content-Type values (parameters ignored, any case) match type/subtype and type/*."""
        profile = parse_config(
            merge(base(), {"inspection": [inspection(content_types_deny=["application/x-msdownload", "video/*"])]}),
            BASE_DIR,
            check_files=False,
        ).inspections[0]
        for value, denied in [
            ("application/x-msdownload", "application/x-msdownload"),
            ('Application/X-MSDownload; name="a.exe"', "application/x-msdownload"),
            (" video/mp4 ", "video/*"),
            ("application/octet-stream", None),
            ("text/plain", None),
            ("videox/mp4", None),
        ]:
            self.assertEqual(profile.denied_content_type(value), denied, value)

    def test_sampleExampleProfile(self) -> None:
        """The sample's commented-out profile, put back, is valid and is SPEC [3]'s example."""
        text = _uncommented_sample()
        self.assertIn("\n[[inspection]]\n", text)
        data = tomllib.loads(text)
        data["group_policy"][0]["inspection"] = "strict"
        config = parse_config(data, SAMPLE.parent, check_files=False)
        (profile,) = config.inspections
        self.assertEqual(profile.name, "strict")
        self.assertEqual(profile.clamd, ClamdAddress("unix", path=Path("/run/clamav/clamd.ctl")))
        defaults = parse_config(merge(base(), {"inspection": [inspection()]}), BASE_DIR, check_files=False)
        self.assertEqual(profile, defaults.inspections[0])
        self.assertEqual(config.group_policies[0].inspection, "strict")

    def test_sampleHasNoActiveProfile(self) -> None:
        """As shipped, the sample inspects nothing: no profile, no policy names one."""
        config = load_config(SAMPLE)
        self.assertEqual(config.inspections, ())
        self.assertEqual({p.inspection for p in config.group_policies}, {""})

    def test_unreadableProfileNoFollowOn(self) -> None:
        """A profile without a readable name does not make a policy's reference a problem too."""
        self.assertEqual(
            problems_of(
                merge(
                    base(), {"inspection": [{"name": 5}], "group_policy": [{"name": "Staff", "inspection": "strict"}]}
                )
            ),
            ["inspection[0].name: must be a string, got integer"],
        )

    def test_severalProblemsInOneProfile(self) -> None:
        """All the problems of a profile are reported together, in key order."""
        self.assertEqual(
            problems_of(
                merge(
                    base(),
                    {
                        "inspection": [
                            inspection(
                                clamd="tcp:nope",
                                attachments_deny=["*.[x"],
                                header_rules=[{"header": "Subject", "match": "[", "action": "reject"}],
                            )
                        ]
                    },
                )
            ),
            [
                'inspection[0].clamd: must be "unix:PATH" or "tcp:HOST:PORT" ("" = no antivirus), got \'tcp:nope\'',
                "inspection[0].attachments_deny[0]: unbalanced '[' in glob '*.[x'",
                "inspection[0].header_rules[0].match: not a regular expression"
                " (unterminated character set at position 0): '['",
            ],
        )


class StateConfigTests(SynchronousTestCase):
    """``[state]`` [11]: the backend, a DSN without a password, a private password file."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        password_hash = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
        (self.folder / "users.toml").write_text(f'[users.alice]\npassword_hash = "{password_hash}"\n')

    def problems(self, state: dict[str, Any], *, check_files: bool = False) -> list[str]:
        return problems_of(merge(base(), {"state": state}), check_files=check_files, base_dir=self.folder)

    def password_file(self, mode: int) -> Path:
        path = self.folder / "db-password"
        path.write_text("s3cret-db-password\n")
        path.chmod(mode)
        return path

    def test_defaults(self) -> None:
        """Without [state]: SQLite, no DSN, no password file."""
        from mailgw.config import StateConfig

        config = parse_config(base(), BASE_DIR, check_files=False)
        self.assertEqual(config.state, StateConfig("sqlite", "", None))

    def test_postgresql(self) -> None:
        """A PostgreSQL DSN (URI or key=value) and a relative password file, resolved
        against the configuration folder."""
        self.password_file(0o640)
        for dsn in ("postgresql://mailgw@db1:5432/mailgw?sslmode=verify-full", "host=db1 user=mailgw dbname=mailgw"):
            data = merge(base(), {"state": {"backend": "postgresql", "dsn": dsn, "dsn_password_file": "db-password"}})
            config = parse_config(data, self.folder, check_files=False)
            self.assertEqual(
                (config.state.backend, config.state.dsn, config.state.dsn_password_file),
                ("postgresql", dsn, self.folder / "db-password"),
            )
            self.assertEqual(self.problems(data["state"], check_files=True), [])

    def test_backendChoices(self) -> None:
        """The backend is "sqlite" or "postgresql"."""
        self.assertEqual(
            self.problems({"backend": "mysql"}),
            ['state.backend: must be one of "sqlite", "postgresql", got \'mysql\''],
        )

    def test_unknownKey(self) -> None:
        """Unknown [state] keys are reported, with the key meant."""
        self.assertEqual(
            self.problems({"dsn_pasword_file": ""}),
            ['state.dsn_pasword_file: unknown key (did you mean "dsn_password_file"?)'],
        )

    def test_postgresqlNeedsDsn(self) -> None:
        """backend = "postgresql" without a DSN is refused."""
        self.assertEqual(
            self.problems({"backend": "postgresql"}),
            ['state.dsn: must be set when state.backend is "postgresql" (e.g. "postgresql://mailgw@db1/mailgw")'],
        )

    def test_passwordInDsnRefused(self) -> None:
        """A DSN holding a password, in any of libpq's forms, is refused with a message
        that says where the password goes and never quotes it (whatever the backend)."""
        for dsn in (
            "postgresql://mailgw:hunter2-pw@db1/mailgw",
            "postgres://mailgw@db1/mailgw?password=hunter2-pw",
            "host=db1 user=mailgw password=hunter2-pw",
            "host=db1 sslpassword=hunter2-pw",
        ):
            for backend in ("postgresql", "sqlite"):
                problems = self.problems({"backend": backend, "dsn": dsn})
                self.assertEqual(len(problems), 1, problems)
                self.assertRegex(
                    problems[0],
                    r"^state\.dsn: must not contain a password \((ssl)?password is set\): "
                    r"put the password in the file named by state\.dsn_password_file$",
                )
                self.assertNotIn("hunter2", problems[0])

    def test_malformedDsnNotQuoted(self) -> None:
        """A DSN libpq cannot read is refused without quoting it (it may hold a password)."""
        problems = self.problems({"backend": "postgresql", "dsn": "host=db1 hunter2-pw"})
        self.assertEqual(
            problems,
            [
                'state.dsn: not a PostgreSQL connection string: use a URI ("postgresql://mailgw@db1/mailgw") '
                'or key=value pairs ("host=db1 user=mailgw dbname=mailgw")'
            ],
        )

    def test_passwordFileMissing(self) -> None:
        """With check_files, the password file must exist."""
        self.assertEqual(
            self.problems(
                {"backend": "postgresql", "dsn": "postgresql://mailgw@db1/mailgw", "dsn_password_file": "nope"},
                check_files=True,
            ),
            [f"state.dsn_password_file: file not found: {self.folder}/nope"],
        )

    def test_passwordFileOpenToOthers(self) -> None:
        """A password file that others may read or write is refused; group access is
        allowed (root:mailgw 0640)."""
        path = self.password_file(0o644)
        state = {"backend": "postgresql", "dsn": "postgresql://mailgw@db1/mailgw", "dsn_password_file": str(path)}
        self.assertEqual(
            self.problems(state, check_files=True),
            [f"state.dsn_password_file: must not be readable or writable by others (mode 0644): chmod o-rw {path}"],
        )
        path.chmod(0o602)
        self.assertEqual(
            self.problems(state, check_files=True),
            [f"state.dsn_password_file: must not be readable or writable by others (mode 0602): chmod o-rw {path}"],
        )
        for mode in (0o600, 0o640, 0o400):
            path.chmod(mode)
            self.assertEqual(self.problems(state, check_files=True), [])

    def test_passwordFileNotRead(self) -> None:
        """The configuration never holds the password: not in the objects, not in
        their repr."""
        path = self.password_file(0o600)
        data = merge(
            base(),
            {
                "state": {
                    "backend": "postgresql",
                    "dsn": "postgresql://mailgw@db1/mailgw",
                    "dsn_password_file": str(path),
                }
            },
        )
        config = parse_config(data, self.folder, check_files=False)
        self.assertNotIn("s3cret", repr(config))
        self.assertNotIn("s3cret", repr(config.state))
