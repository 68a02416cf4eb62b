"""Enterprise AAA end to end: the POP3S proxy with real slapd (LDAPS), the mail
server's own POP3 login, and client certificates; real Dovecot behind, poplib in
front."""

from __future__ import annotations

import poplib
import ssl
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, start_gateway
from tests.servers.base import free_port
from tests.servers.dovecot import Dovecot
from tests.servers.freeradius import FreeRadius, silent_udp_port
from tests.servers.pki import TestPKI
from tests.servers.slapd import Slapd
from tests.test_integration_pop3 import in_thread

POLICIES = [
    {"name": "DfltGrpPolicy", "simultaneous_logins": 3},
    {"name": "MailUsers", "simultaneous_logins": 3},
    {"name": "Finance", "simultaneous_logins": 2},
    {"name": "Engineering", "simultaneous_logins": 3},
]


class AAAIntegrationBase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.pki = TestPKI(Path(self.mktemp()).absolute())

    def dovecot(self, users: dict[str, str]) -> Dovecot:
        dovecot = Dovecot.started(self, users=users)
        return dovecot

    def gateway(self, dovecot: Dovecot, groups: list[dict[str, Any]], **pop3s: Any) -> Gateway:
        options = {
            "default_server": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none"},
            "authentication_server_group": groups[0]["name"],
            **pop3s,
        }
        groups = [{"name": "LOCAL", "protocol": "local"}, *groups]
        return start_gateway(self, self.pki, {}, options, aaa_server_group=groups, group_policy=POLICIES, **self.extra)

    extra: dict[str, Any] = {}

    def login(self, gateway: Gateway, user: str, password: str, context: ssl.SSLContext | None = None) -> Any:
        """USER/PASS over POP3S in a thread: the STAT answer, or the -ERR text."""

        def attempt() -> Any:
            ctx = context or ssl.create_default_context(cafile=str(self.pki.ca_path))
            client = poplib.POP3_SSL("127.0.0.1", gateway.port(), context=ctx, timeout=30)
            try:
                client.user(user)
                client.pass_(password)
                return client.stat()
            except poplib.error_proto as e:
                return str(e)
            finally:
                client.quit()

        return in_thread(attempt)

    def session_policy(self, gateway: Gateway, user: str) -> list[str | None]:
        return [
            e.get("group_policy") for e in gateway.events if e.get("user") == user and "group_policy" in e
        ]


class LdapTests(AAAIntegrationBase):
    def setUp(self) -> None:
        super().setUp()
        self.ldap = Slapd.started(self)
        self.mail = self.dovecot(dict(self.ldap.users))

    def group(self, servers: list[str]) -> dict[str, Any]:
        return {
            "name": "corp-ldap",
            "protocol": "ldap",
            "servers": servers,
            "ca": str(self.ldap.ca_path),
            "bind_dn": self.ldap.bind_dn,
            "bind_password": self.ldap.bind_password,
            "base_dn": self.ldap.base_dn,
            "user_filter": "(uid={username})",
            "group_policy_attribute": "memberOf",
            "group_policy_map": {
                self.ldap.group_dn("mail"): "MailUsers",
                self.ldap.group_dn("finance"): "Finance",
            },
            "timeout": 2,
        }

    async def test_ldapsLoginAndPolicy(self) -> None:
        """LDAPS users log in; memberOf decides the group policy (several matches:
        the first policy name alphabetically); a wrong password gets -ERR; a filter
        injection matches nobody."""
        gateway = self.gateway(self.mail, [self.group([self.ldap.url(tls=True)])])
        stat = await self.login(gateway, "alice", "alice-password")
        self.assertEqual(stat, (0, 0))
        stat = await self.login(gateway, "bob", "bob-password")
        self.assertEqual(stat, (0, 0))
        self.assertEqual(self.session_policy(gateway, "alice"), ["MailUsers"])
        self.assertEqual(self.session_policy(gateway, "bob"), ["Finance"])
        self.assertIn("-ERR [AUTH]", await self.login(gateway, "alice", "wrong"))
        self.assertIn("-ERR [AUTH]", await self.login(gateway, "*)(uid=*", "alice-password"))
        self.assertNotIn("alice-password", gateway.log_text())
        self.assertNotIn(self.ldap.bind_password, gateway.log_text())

    async def test_failoverAndAllDown(self) -> None:
        """The first LDAP server down: the second answers.  Both down: the client gets
        -ERR [SYS/TEMP] and the gateway goes on serving."""
        dead = f"ldap://127.0.0.1:{free_port()}"
        gateway = self.gateway(self.mail, [self.group([dead, self.ldap.url(tls=True)])])
        self.assertEqual(await self.login(gateway, "alice", "alice-password"), (0, 0))
        down = self.gateway(self.mail, [self.group([dead, f"ldaps://127.0.0.1:{free_port()}"])])
        answer = await self.login(down, "alice", "alice-password")
        self.assertIn("-ERR [SYS/TEMP]", answer)
        self.assertEqual(await self.login(gateway, "bob", "bob-password"), (0, 0))

    async def test_certificateWithLdapAuthorization(self) -> None:
        """Certificate method with EA as username and O as secondary field, authorized
        by an LDAP search for both: the right organisation logs in, another is
        refused, a certificate from another CA never completes the handshake."""
        self.ldap.add_user("dave", "dave-password", mail="dave@example.com", o="Corp", member_of=["mail"])
        mail = self.dovecot({"dave": "dave-mail"})
        group = self.group([self.ldap.url(tls=True)])
        group["user_filter"] = "(&(mail={username})(o={secondary}))"
        self.extra = {"tls": self.tls_with_client_ca()}
        gateway = self.gateway(
            mail,
            [group],
            authentication=["certificate"],
            authorization_server_group="corp-ldap",
            authorization={"username_from_certificate": "dn-fields", "primary_dn_field": "EA",
                           "secondary_dn_field": "O"},
        )
        good = self.client_context(self.pki.client_cert("dave", email="dave@example.com", organization="Corp"))
        self.assertEqual(await self.login(gateway, "dave", "dave-mail", good), (0, 0))
        self.assertEqual(self.session_policy(gateway, "dave@example.com"), ["MailUsers"])
        other_org = self.client_context(
            self.pki.client_cert("dave2", email="dave@example.com", organization="Other")
        )
        self.assertIn("-ERR [AUTH]", await self.login(gateway, "dave", "dave-mail", other_org))
        no_email = self.client_context(self.pki.client_cert("dave3", organization="Corp"))
        self.assertIn("-ERR [AUTH]", await self.login(gateway, "dave", "dave-mail", no_email))
        self.assertTrue(any("certificate has no EA field" in r for r in gateway.reasons()), gateway.reasons())
        stranger = self.client_context(self.pki.other_ca.client_cert("dave", email="dave@example.com",
                                                                      organization="Corp"))
        with self.assertRaises((ssl.SSLError, OSError, poplib.error_proto)):
            answer = await self.login(gateway, "dave", "dave-mail", stranger)
            if isinstance(answer, str):
                raise poplib.error_proto(answer)

    def tls_with_client_ca(self) -> dict[str, Any]:
        cert, key = self.pki.server_cert(["localhost", "127.0.0.1"], file_name="gateway-mtls")
        return {
            "certificate": cert,
            "private_key": key,
            "client_ca": str(self.pki.ca_path),
            "client_certificate": "optional",
        }

    def client_context(self, pair: tuple[str, str]) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        context.load_cert_chain(pair[0], pair[1])
        return context


class CertificateTests(AAAIntegrationBase):
    extra = {}

    async def test_cnMappingWithoutAuthorization(self) -> None:
        """certificate method, CN mapping, no authorization group: the CN is the VPN
        user (default policy); no certificate at all is refused."""
        mail = self.dovecot({"alice": "alice-mail"})
        cert, key = self.pki.server_cert(["localhost", "127.0.0.1"], file_name="gateway-mtls")
        self.extra = {
            "tls": {"certificate": cert, "private_key": key, "client_ca": str(self.pki.ca_path),
                    "client_certificate": "optional"}
        }
        gateway = self.gateway(mail, [{"name": "LOCAL2", "protocol": "local"}], authentication=["certificate"])
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        context.load_cert_chain(*self.pki.client_cert("alice.smith", organizational_unit="Sales"))
        self.assertEqual(await self.login(gateway, "alice", "alice-mail", context), (0, 0))
        self.assertEqual(self.session_policy(gateway, "alice.smith"), ["DfltGrpPolicy"])
        self.assertIn("-ERR [AUTH]", await self.login(gateway, "alice", "alice-mail"))
        self.assertTrue(any("no (verified) certificate" in r for r in gateway.reasons()))


class Pop3GroupTests(AAAIntegrationBase):
    async def test_mailServerLoginIsTheCheck(self) -> None:
        """A pop3 server group: the mail server's login checks the VPN password
        (with strip_domain); a wrong one is refused."""
        checker_server = self.dovecot({"jdoe": "jdoe-vpn"})
        mail = self.dovecot({"alice": "alice-mail"})
        group = {
            "name": "mailserver",
            "protocol": "pop3",
            "servers": [{"host": "127.0.0.1", "port": checker_server.pop3_port, "tls": "starttls",
                         "ca": str(checker_server.ca_path)}],
            "strip_domain": True,
        }
        gateway = self.gateway(mail, [group], server_delimiter="#")
        self.assertEqual(await self.login(gateway, "jdoe@corp.example:alice", "jdoe-vpn:alice-mail"), (0, 0))
        self.assertIn("-ERR [AUTH]", await self.login(gateway, "jdoe:alice", "wrong:alice-mail"))


class RadiusTests(AAAIntegrationBase):
    def setUp(self) -> None:
        super().setUp()
        self.radius = FreeRadius.started(self)
        self.mail = self.dovecot({"alice": "alice-password", "bob": "bob-password"})

    def group(self, *ports: int, timeout: float = 0.5, retries: int = 1) -> dict[str, Any]:
        return {
            "name": "corp-radius",
            "protocol": "radius",
            "servers": [
                {"host": "127.0.0.1", "auth_port": port, "acct_port": self.radius.acct_port,
                 "secret": self.radius.secret}
                for port in ports
            ],
            "timeout": timeout,
            "retries": retries,
        }

    async def test_classDecidesPolicyAndAccounting(self) -> None:
        """RADIUS users log in; the Class attribute decides the group policy (seen in
        the session registry); a wrong password is refused; after a real session the
        detail log shows Start and Stop with the same session id, the session time
        and the octet counts."""
        gateway = start_gateway(
            self,
            self.pki,
            {},
            {
                "default_server": {"host": "127.0.0.1", "port": self.mail.pop3_port, "tls": "none"},
                "authentication_server_group": "corp-radius",
                "accounting_server_group": "corp-radius",
            },
            aaa_server_group=[{"name": "LOCAL", "protocol": "local"}, self.group(self.radius.auth_port)],
            group_policy=POLICIES,
        )
        seen: dict[str, Any] = {}

        def session(user: str, password: str) -> Any:
            ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
            client = poplib.POP3_SSL("127.0.0.1", gateway.port(), context=ctx, timeout=30)
            try:
                client.user(user)
                client.pass_(password)
                seen[user] = [(s.user, s.group_policy) for s in gateway.service.registry]  # type: ignore[union-attr]
                return client.stat()
            finally:
                client.quit()

        self.assertEqual(await in_thread(session, "alice", "alice-password"), (0, 0))
        self.assertEqual(await in_thread(session, "bob", "bob-password"), (0, 0))
        self.assertIn(("alice", "Finance"), seen["alice"])
        self.assertIn(("bob", "Engineering"), seen["bob"])
        self.assertIn("-ERR [AUTH]", await self.login(gateway, "alice", "wrong"))
        records = await in_thread(self.radius.wait_for_accounting, 4)
        by_session: dict[str, list[dict[str, str]]] = {}
        for record in records:
            by_session.setdefault(record["Acct-Session-Id"].strip('"'), []).append(record)
        self.assertEqual(len(by_session), 2)
        for session_records in by_session.values():
            kinds = [r["Acct-Status-Type"] for r in session_records]
            self.assertEqual(kinds, ["Start", "Stop"])
            stop = session_records[1]
            self.assertIn("Acct-Session-Time", stop)
            self.assertGreater(int(stop["Acct-Input-Octets"]), 0)
            self.assertGreater(int(stop["Acct-Output-Octets"]), 0)
            self.assertEqual(stop["Acct-Terminate-Cause"], "User-Request")
            self.assertEqual(stop["Framed-IP-Address"], "127.0.0.1")
        self.assertNotIn(self.radius.secret, gateway.log_text())
        self.assertNotIn("alice-password", gateway.log_text())

    async def test_failoverAndAllDown(self) -> None:
        """First RADIUS server silent: the second answers within timeout x (retries +
        1) plus a margin.  Both silent: -ERR [SYS/TEMP], and the gateway goes on."""
        silent = silent_udp_port(self)
        gateway = self.gateway(self.mail, [self.group(silent.port, self.radius.auth_port)])
        started = time.monotonic()
        self.assertEqual(await self.login(gateway, "alice", "alice-password"), (0, 0), gateway.reasons())
        self.assertLess(time.monotonic() - started, 0.5 * 2 + 2.0)
        self.assertGreaterEqual(len(silent.received), 2)
        other = silent_udp_port(self)
        down = self.gateway(self.mail, [self.group(silent.port, other.port)])
        self.assertIn("-ERR [SYS/TEMP]", await self.login(down, "alice", "alice-password"))
        self.assertEqual(await self.login(gateway, "bob", "bob-password"), (0, 0))
