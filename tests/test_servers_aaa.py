"""The AAA server fixtures (slapd, FreeRADIUS) work against real clients.

ldap3 and OpenLDAP's ``ldapwhoami`` talk to :class:`~tests.servers.slapd.Slapd`;
FreeRADIUS's ``radclient`` to :class:`~tests.servers.freeradius.FreeRadius`.  Like
tests/test_servers.py, these block in the test thread: they test the fixtures, not the
gateway, and use no reactor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import subprocess
import time
import warnings

import ldap3
from ldap3.core.exceptions import LDAPBindError, LDAPSocketOpenError
from ldap3.utils.conv import escape_filter_chars
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.servers import base
from tests.servers.base import MissingBinaryError, group_members, port_listening, set_environ, test_directory
from tests.servers.freeradius import (
    CHALLENGE_PROMPT,
    FreeRadius,
    RadiusUser,
    RadiusValue,
    SilentUdpPort,
    decode_octets,
    radclient,
    silent_udp_port,
)
from tests.servers.pki import TestPKI
from tests.servers.slapd import Slapd, ssha


def hide_binaries(testcase: SynchronousTestCase) -> None:
    """Make :func:`~tests.servers.base.require_binary` find nothing for one test."""
    set_environ(testcase, "PATH", "/nonexistent")
    testcase.patch(base, "SBIN_DIRECTORIES", ())


def processes_running(pattern: str) -> list[str]:
    """``pgrep -af pattern``: the processes whose command line contains ``pattern``."""
    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    return [line for line in result.stdout.splitlines() if str(os.getpid()) != line.split()[0]]


def access_request(secret: str, user: str, password: str, *, message_authenticator: bool) -> bytes:
    """A PAP Access-Request built by hand (RFC 2865, RFC 3579 Message-Authenticator)."""

    def attribute(kind: int, value: bytes) -> bytes:
        return struct.pack("!BB", kind, len(value) + 2) + value

    authenticator = os.urandom(16)
    plain = password.encode()
    plain += b"\0" * (-len(plain) % 16 or (16 if not plain else 0))
    hidden, previous = b"", authenticator
    for offset in range(0, len(plain), 16):
        pad = hashlib.md5(secret.encode() + previous).digest()  # noqa: S324 - RFC 2865
        previous = bytes(a ^ b for a, b in zip(plain[offset : offset + 16], pad, strict=True))
        hidden += previous
    attributes = attribute(1, user.encode()) + attribute(2, hidden)
    if message_authenticator:
        attributes += attribute(80, b"\0" * 16)
    packet = struct.pack("!BBH", 1, 7, 20 + len(attributes)) + authenticator + attributes
    if message_authenticator:
        packet = packet[:-16] + hmac.new(secret.encode(), packet, "md5").digest()
    return packet


def udp_exchange(host: str, port: int, packet: bytes, timeout: float = 0.3) -> bytes | None:
    """Send ``packet``; the first answer, or ``None`` after ``timeout`` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(timeout)
        client.sendto(packet, (host, port))
        try:
            return client.recv(4096)
        except TimeoutError:
            return None


def entries(connection: ldap3.Connection) -> dict[str, dict[str, list[str]]]:
    """The last search's entries: DN -> attribute -> values."""
    return {entry.entry_dn: entry.entry_attributes_as_dict for entry in connection.entries}


# -- slapd -------------------------------------------------------------------------------


class SlapdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ldap = Slapd.started(self)

    def connect(self, user: str | None = None, password: str | None = None, **kwargs: bool) -> ldap3.Connection:
        connection = self.ldap.connection(user, password, **kwargs)
        self.addCleanup(connection.unbind)
        return connection

    def test_service_account_searches(self) -> None:
        """The gateway's search: service bind, filter on uid, mail and memberOf back."""
        connection = self.connect(self.ldap.bind_dn, self.ldap.bind_password)
        self.assertEqual(connection.extend.standard.who_am_i(), f"dn:{self.ldap.bind_dn}")
        found = connection.search(
            self.ldap.base_dn, "(uid=bob)", attributes=["uid", "mail", "memberOf", "userPassword"]
        )
        self.assertTrue(found)
        [(dn, attributes)] = entries(connection).items()
        self.assertEqual(dn, "uid=bob,ou=people,dc=example,dc=com")
        self.assertEqual(attributes["mail"], ["bob@example.com"])
        self.assertEqual(
            sorted(attributes["memberOf"]),
            ["cn=finance,ou=groups,dc=example,dc=com", "cn=mail,ou=groups,dc=example,dc=com"],
        )
        self.assertEqual(attributes["userPassword"], [])  # readable for authentication only
        connection.search(self.ldap.base_dn, "(objectClass=inetOrgPerson)", attributes=["uid"])
        self.assertEqual(sorted(e["uid"][0] for e in entries(connection).values()), ["alice", "bob", "carol"])

    def test_user_binds_with_own_password(self) -> None:
        alice = self.ldap.user_dn("alice")
        connection = self.connect(alice, "alice-password")
        self.assertEqual(connection.extend.standard.who_am_i(), f"dn:{alice}")
        error = self.assertRaises(LDAPBindError, self.ldap.connection, alice, "wrong-password")
        self.assertIn("invalidCredentials", str(error))
        self.assertRaises(LDAPBindError, self.ldap.connection, self.ldap.user_dn("nobody"), "alice-password")
        self.assertRaises(LDAPBindError, self.ldap.connection, self.ldap.bind_dn, "alice-password")

    def test_passwords_not_readable(self) -> None:
        """Users read the directory but no password; anonymous clients read nothing."""
        user = self.connect(self.ldap.user_dn("alice"), "alice-password")
        user.search(self.ldap.base_dn, "(uid=bob)", attributes=["userPassword", "mail"])
        [attributes] = entries(user).values()
        self.assertEqual((attributes["userPassword"], attributes["mail"]), ([], ["bob@example.com"]))
        user.search(self.ldap.user_dn("alice"), "(objectClass=*)", search_scope=ldap3.BASE, attributes=["userPassword"])
        self.assertEqual([e["userPassword"] for e in entries(user).values()], [[]])  # not even one's own
        # ... but a user may change it.
        self.assertTrue(user.extend.standard.modify_password(new_password="alice-new"))
        self.connect(self.ldap.user_dn("alice"), "alice-new")
        anonymous = self.connect(bind=False)
        anonymous.open()
        anonymous.search(self.ldap.base_dn, "(uid=*)", attributes=["uid"])
        self.assertEqual(anonymous.entries, [])
        # The root DN does read the stored {SSHA} value: slapd checks hashes itself.
        admin = self.connect(self.ldap.admin_dn, self.ldap.admin_password)
        admin.search(self.ldap.user_dn("bob"), "(objectClass=*)", search_scope=ldap3.BASE, attributes=["userPassword"])
        [attributes] = entries(admin).values()
        [stored] = attributes["userPassword"]
        self.assertTrue((stored.decode() if isinstance(stored, bytes) else stored).startswith("{SSHA}"))

    def test_starttls_verified(self) -> None:
        connection = self.connect(self.ldap.bind_dn, self.ldap.bind_password, start_tls=True)
        self.assertTrue(connection.tls_started)
        self.assertTrue(connection.search(self.ldap.base_dn, "(uid=alice)", attributes=["mail"]))

    def test_ldaps_verified(self) -> None:
        alice = self.ldap.user_dn("alice")
        connection = self.connect(alice, "alice-password", tls=True)
        self.assertEqual(connection.extend.standard.who_am_i(), f"dn:{alice}")
        self.assertTrue(self.ldap.url(tls=True).startswith("ldaps://127.0.0.1:"))
        with socket.create_connection((self.ldap.host, self.ldap.ldaps_port), timeout=10) as raw:
            context = self.ldap.ssl_context()
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                self.assertIn(tls.version(), ("TLSv1.2", "TLSv1.3"))

    def test_untrusted_ca_rejected(self) -> None:
        other = TestPKI(test_directory(self)).other_ca
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=other.cert_path, version=ssl.PROTOCOL_TLS_CLIENT)
        server = ldap3.Server(self.ldap.host, port=self.ldap.ldaps_port, use_ssl=True, tls=tls, connect_timeout=10)
        connection = ldap3.Connection(server, self.ldap.bind_dn, self.ldap.bind_password)
        self.assertRaises(LDAPSocketOpenError, connection.bind)

    def test_tls_1_1_refused(self) -> None:
        """TLSProtocolMin 3.3: a TLS 1.0/1.1-only client gets no session."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(self.ldap.ca_path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as error:
            raise SkipTest(f"this OpenSSL cannot offer TLS 1.1: {error}") from None
        with socket.create_connection((self.ldap.host, self.ldap.ldaps_port), timeout=10) as raw:
            self.assertRaises((ssl.SSLError, OSError), context.wrap_socket, raw, server_hostname="localhost")
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # the same client, allowed TLS 1.2
        with socket.create_connection((self.ldap.host, self.ldap.ldaps_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                self.assertEqual(tls.version(), "TLSv1.2")

    def test_openldap_client_starttls(self) -> None:
        """OpenLDAP's own client (``ldapwhoami -ZZ``) verifies the server with the test CA."""
        binary = base.require_binary("ldapwhoami", "ldap-utils")
        env = {**os.environ, "LDAPTLS_CACERT": self.ldap.ca_path, "LDAPTLS_REQCERT": "demand"}
        alice = self.ldap.user_dn("alice")
        command = [binary, "-x", "-ZZ", "-H", self.ldap.url(), "-D", alice, "-w", "alice-password"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30, check=False)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"dn:{alice}"), result.stderr)
        result = subprocess.run(
            [binary, "-x", "-H", self.ldap.url(tls=True), "-D", alice, "-w", "wrong"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        self.assertEqual(result.returncode, 49, result.stderr)  # invalidCredentials

    def test_member_of_maintained(self) -> None:
        """add_user(member_of=...) and add_group keep the users' memberOf up to date."""
        dave = self.ldap.add_user(
            "dave",
            "dave-password",
            mail="dave@example.com",
            cn="Dave Example",
            ou="Finance",
            o="Example Corp",
            member_of=["mail", "cn=vpn,ou=groups,dc=example,dc=com"],
            attributes={"employeeType": "contractor"},
        )
        self.assertEqual(dave, "uid=dave,ou=people,dc=example,dc=com")
        self.assertEqual(
            self.ldap.member_of("dave"),
            ["cn=mail,ou=groups,dc=example,dc=com", "cn=vpn,ou=groups,dc=example,dc=com"],
        )
        group = self.ldap.add_group("finance", ["dave", self.ldap.user_dn("carol")])
        self.assertEqual(group, "cn=finance,ou=groups,dc=example,dc=com")
        self.assertIn(group, self.ldap.member_of("dave"))
        self.assertEqual(self.ldap.member_of("carol"), [group])
        connection = self.connect()
        connection.search(self.ldap.base_dn, "(&(mail=dave@example.com)(o=Example Corp))", attributes=["*", "memberOf"])
        [attributes] = entries(connection).values()
        self.assertEqual(len(attributes["memberOf"]), 3)
        self.assertEqual(
            (attributes["cn"], attributes["sn"], attributes["ou"], attributes["employeeType"]),
            (["Dave Example"], ["Example"], ["Finance"], ["contractor"]),
        )
        self.connect(dave, "dave-password")
        self.assertEqual(self.ldap.users["dave"], "dave-password")
        self.assertRaises(ValueError, self.ldap.add_group, "empty", [])

    def test_filter_metacharacters(self) -> None:
        """Escaped per RFC 4515, ``*)(uid=*`` matches no one; unescaped it would match all."""
        self.ldap.add_user("o'brien, jr+x", "tricky-password")
        self.connect(self.ldap.user_dn("o'brien, jr+x"), "tricky-password")
        connection = self.connect()
        connection.search(self.ldap.base_dn, f"(uid={escape_filter_chars('*)(uid=*')})", attributes=["uid"])
        self.assertEqual(connection.entries, [])
        connection.search(self.ldap.base_dn, "(uid=*)", attributes=["uid"])
        self.assertEqual(len(connection.entries), 4)
        connection.search(self.ldap.base_dn, f"(uid={escape_filter_chars('o*')})", attributes=["uid"])
        self.assertEqual(connection.entries, [])
        self.ldap.wait_for_log('filter="(uid=\\2A\\29\\28uid=\\2A)"')

    def test_stop_leaves_no_process(self) -> None:
        pid = self.ldap.pid
        assert pid is not None
        self.assertTrue(processes_running(str(self.ldap.config_path)))
        self.ldap.stop()
        self.assertEqual(group_members(pid), [])
        self.assertEqual(processes_running(str(self.ldap.config_path)), [])
        for port in self.ldap.listening_ports().values():
            self.assertFalse(port_listening(self.ldap.host, port))
        self.ldap.stop()  # idempotent


class SlapdLifecycleTests(SynchronousTestCase):
    def test_other_suffix_and_shared_pki(self) -> None:
        pki = TestPKI(test_directory(self))
        ldap = Slapd.started(self, suffix="o=corp", pki=pki, default_users=False, bind_password="s3cret")
        self.assertEqual((ldap.base_dn, ldap.bind_dn), ("ou=people,o=corp", "cn=mailgw,ou=services,o=corp"))
        self.assertEqual(ldap.ca_path, pki.ca_path)
        ldap.add_user("erin", "erin-password", member_of=["staff"])
        connection = ldap.connection(tls=True)
        self.addCleanup(connection.unbind)
        connection.search(ldap.base_dn, "(uid=*)", attributes=["memberOf"])
        self.assertEqual(
            entries(connection), {"uid=erin,ou=people,o=corp": {"memberOf": ["cn=staff,ou=groups,o=corp"]}}
        )

    def test_port_clash_retried(self) -> None:
        server = Slapd(test_directory(self))
        self.addCleanup(server.stop)
        taken = server.ldaps_port
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", taken))
            blocker.listen()
            server.start()
            self.assertNotEqual(server.ldaps_port, taken)
        self.assertIn("Address already in use", server.log_text())
        connection = server.connection(tls=True)
        self.addCleanup(connection.unbind)

    def test_context_manager_and_own_folder(self) -> None:
        with Slapd() as server:
            folder, pid = server.base_dir, server.pid
            self.assertTrue(server.running)
        assert pid is not None
        self.assertEqual(group_members(pid), [])
        self.assertFalse(folder.exists())

    def test_add_user_needs_running_server(self) -> None:
        server = Slapd(test_directory(self))
        self.assertRaises(RuntimeError, server.add_user, "x", "y")

    def test_ssha(self) -> None:
        value = ssha("secret", b"salt1234")
        self.assertTrue(value.startswith("{SSHA}"))
        decoded = base64.b64decode(value.removeprefix("{SSHA}"))
        self.assertEqual(decoded, hashlib.sha1(b"secretsalt1234").digest() + b"salt1234")  # noqa: S324
        self.assertNotEqual(ssha("secret"), ssha("secret"))  # random salt


# -- FreeRADIUS --------------------------------------------------------------------------


class FreeRadiusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.radius = FreeRadius.started(self)

    def auth(self, user: str, password: str) -> tuple[str | None, str | None]:
        reply = radclient(self.radius, "auth", {"User-Name": user, "User-Password": password})
        return reply.code, reply.text("Class")

    def test_accept_with_class(self) -> None:
        self.assertEqual(self.auth("alice", "alice-password"), ("Access-Accept", "OU=Finance;"))
        self.assertEqual(self.auth("bob", "bob-password"), ("Access-Accept", "Engineering"))
        self.assertEqual(self.auth("carol", "carol-password"), ("Access-Accept", None))
        self.radius.wait_for_log("Login OK: [alice]")

    def test_reject_at_once(self) -> None:
        started = time.monotonic()
        self.assertEqual(self.auth("alice", "wrong"), ("Access-Reject", None))
        self.assertEqual(self.auth("nobody", "alice-password"), ("Access-Reject", None))
        self.assertEqual(self.auth("alice", ""), ("Access-Reject", None))
        self.assertLess(time.monotonic() - started, 2.0)  # reject_delay = 0
        self.radius.wait_for_log("Login incorrect (pap: Cleartext password does not match")

    def test_message_authenticator_required(self) -> None:
        """Without Message-Authenticator an Access-Request is dropped unanswered."""
        radius = self.radius
        with_authenticator = access_request(radius.secret, "alice", "alice-password", message_authenticator=True)
        answer = udp_exchange(radius.host, radius.auth_port, with_authenticator, timeout=5)
        self.assertEqual(answer[:2] if answer else None, bytes([2, 7]))  # Access-Accept, same Id
        without = access_request(radius.secret, "alice", "alice-password", message_authenticator=False)
        self.assertIsNone(udp_exchange(radius.host, radius.auth_port, without))

    def test_wrong_secret_unanswered(self) -> None:
        packet = access_request("not-the-secret", "alice", "alice-password", message_authenticator=True)
        self.assertIsNone(udp_exchange(self.radius.host, self.radius.auth_port, packet))

    def test_challenge(self) -> None:
        first = radclient(self.radius, "auth", {"User-Name": "dave", "User-Password": "dave-password"})
        self.assertEqual(first.code, "Access-Challenge")
        self.assertEqual(first.text("Reply-Message"), CHALLENGE_PROMPT)
        self.assertIsNone(first.get("Class"))
        state = first.get("State")
        assert state is not None
        self.assertEqual(decode_octets(state), self.radius.challenge_state)
        attributes: dict[str, RadiusValue] = {
            "User-Name": "dave",
            "User-Password": "123456",
            "State": decode_octets(state),
        }
        second = radclient(self.radius, "auth", attributes)
        self.assertEqual((second.code, second.text("Class")), ("Access-Accept", "OU=Finance;"))
        attributes["User-Password"] = "654321"
        self.assertEqual(radclient(self.radius, "auth", attributes).code, "Access-Reject")

    def test_status_server(self) -> None:
        self.assertEqual(radclient(self.radius, "status", {}).code, "Access-Accept")

    def test_accounting_start_stop(self) -> None:
        start: dict[str, RadiusValue] = {
            "Acct-Status-Type": "Start",
            "User-Name": "alice",
            "Acct-Session-Id": "mailgw-0001",
            "Framed-IP-Address": "192.0.2.10",
            "NAS-Identifier": "mailgw",
            "Class": b"OU=Finance;",
        }
        self.assertEqual(radclient(self.radius, "acct", start).code, "Accounting-Response")
        stop: dict[str, RadiusValue] = {
            "Acct-Status-Type": "Stop",
            "User-Name": "alice",
            "Acct-Session-Id": "mailgw-0001",
            "Acct-Session-Time": 42,
            "Acct-Input-Octets": 1234,
            "Acct-Output-Octets": 5678,
            "Acct-Output-Gigawords": 1,
            "Acct-Terminate-Cause": "User-Request",
            "Calling-Station-Id": 'quote " and \\ backslash',
        }
        self.assertEqual(radclient(self.radius, "acct", stop).code, "Accounting-Response")
        first, second = self.radius.wait_for_accounting(2)
        self.assertEqual(
            {key: first[key] for key in ("Acct-Status-Type", "User-Name", "Acct-Session-Id", "Framed-IP-Address")},
            {
                "Acct-Status-Type": "Start",
                "User-Name": "alice",
                "Acct-Session-Id": "mailgw-0001",
                "Framed-IP-Address": "192.0.2.10",
            },
        )
        self.assertEqual(decode_octets(first["Class"]), b"OU=Finance;")
        self.assertEqual(second["Acct-Status-Type"], "Stop")
        self.assertEqual(
            [second[key] for key in ("Acct-Input-Octets", "Acct-Output-Octets", "Acct-Output-Gigawords")],
            ["1234", "5678", "1"],
        )
        self.assertEqual(second["Acct-Terminate-Cause"], "User-Request")
        self.assertEqual(second["Calling-Station-Id"], 'quote " and \\ backslash')
        self.assertIn("Timestamp", second)

    def test_stop_leaves_no_process(self) -> None:
        pid = self.radius.pid
        assert pid is not None
        self.assertTrue(processes_running(str(self.radius.raddb)))
        self.radius.stop()
        self.assertEqual(group_members(pid), [])
        self.assertEqual(processes_running(str(self.radius.raddb)), [])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((self.radius.host, self.radius.auth_port))  # free again
        self.radius.stop()  # idempotent


class FreeRadiusLifecycleTests(SynchronousTestCase):
    def test_custom_users_quoting(self) -> None:
        """Names, passwords and values are taken literally: quotes, %{...}, backslashes."""
        name, password = 'o\'brien "x"', "p%{User-Name}'\"\\ w"
        radius = FreeRadius.started(
            self,
            secret="other secret",
            users={
                name: RadiusUser(password, [("Class", "OU=A;"), ("Class", "%{x}"), ("Session-Timeout", "60")]),
                "u": "pw",
            },
        )
        reply = radclient(radius, "auth", {"User-Name": name, "User-Password": password})
        self.assertEqual(reply.code, "Access-Accept", reply.output)
        self.assertEqual(
            [(key, decode_octets(value)) for key, value in reply.attributes if key == "Class"],
            [("Class", b"OU=A;"), ("Class", b"%{x}")],
        )
        self.assertEqual(reply.get("Session-Timeout"), "60")
        self.assertEqual(radclient(radius, "auth", {"User-Name": "u", "User-Password": "pw"}).code, "Access-Accept")
        self.assertEqual(
            radclient(radius, "auth", {"User-Name": "alice", "User-Password": "alice-password"}).code, "Access-Reject"
        )
        self.assertRaises(ValueError, FreeRadius, test_directory(self), users={"x": "new\nline"})

    def test_set_user_while_running(self) -> None:
        radius = FreeRadius.started(self, users={"alice": "alice-password"})
        ports = (radius.auth_port, radius.acct_port)
        radius.set_user("zed", RadiusUser("zed-password", {"Class": "OU=Zed;"}))
        radius.set_user("alice", "new-password")
        self.assertEqual((radius.auth_port, radius.acct_port), ports)
        reply = radclient(radius, "auth", {"User-Name": "zed", "User-Password": "zed-password"})
        self.assertEqual((reply.code, reply.text("Class")), ("Access-Accept", "OU=Zed;"))
        reply = radclient(radius, "auth", {"User-Name": "alice", "User-Password": "new-password"})
        self.assertEqual(reply.code, "Access-Accept")
        self.assertRaises(ValueError, radius.set_user, "bad", "new\nline")
        self.assertNotIn("bad", radius.users)

    def test_port_clash_retried(self) -> None:
        server = FreeRadius(test_directory(self))
        self.addCleanup(server.stop)
        taken = server.acct_port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
            blocker.bind(("127.0.0.1", taken))
            server.start()
            self.assertNotEqual(server.acct_port, taken)
        self.assertIn("Address already in use", server.log_text())
        self.assertEqual(
            radclient(server, "acct", {"Acct-Status-Type": "Start", "User-Name": "a"}).code, "Accounting-Response"
        )

    def test_silent_udp_port(self) -> None:
        silent = silent_udp_port(self)
        packet = access_request("testing123", "alice", "alice-password", message_authenticator=True)
        for _ in range(2):
            self.assertIsNone(udp_exchange(silent.host, silent.port, packet, timeout=0.1))
        self.assertEqual(silent.wait_for_datagrams(2), [packet, packet])
        silent.close()
        silent.close()  # idempotent

    def test_silent_udp_port_context_manager(self) -> None:
        with SilentUdpPort() as silent:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(0.1)
                client.sendto(b"ping", (silent.host, silent.port))
                self.assertEqual(silent.wait_for_datagrams(1), [b"ping"])
                self.assertRaises(TimeoutError, client.recv, 100)

    def test_accounting_records_parser(self) -> None:
        radius = FreeRadius(test_directory(self))
        self.assertEqual(radius.accounting_records(), [])
        radius.detail_path.parent.mkdir(parents=True)
        radius.detail_path.write_text(
            "Mon Jan  1 00:00:00 2024\n"
            "\tAcct-Status-Type = Start\n"
            '\tUser-Name = "a\\"b\\\\c\\011\\303\\274"\n'
            "\tClass = 0x6869\n"
            "\tClass = 0x6a6b\n"
            "\n"
            "Mon Jan  1 00:00:01 2024\n"
            "\tAcct-Status-Type = Stop\n"
            "\n"
        )
        self.assertEqual(
            radius.accounting_records(),
            [
                {"Acct-Status-Type": "Start", "User-Name": 'a"b\\c\tü', "Class": "0x6869\n0x6a6b"},
                {"Acct-Status-Type": "Stop"},
            ],
        )
        self.assertRaises(TimeoutError, radius.wait_for_accounting, 3, timeout=0.05)


# -- missing binaries --------------------------------------------------------------------


class MissingServerTests(SynchronousTestCase):
    """Without the packages, the fixtures skip (developer machine) or fail (CI=true)."""

    def test_skip_without_ci(self) -> None:
        hide_binaries(self)
        set_environ(self, "CI", None)
        error = self.assertRaises(SkipTest, Slapd, test_directory(self))
        self.assertEqual(str(error), "slapd not found: apt-get install slapd")
        error = self.assertRaises(SkipTest, FreeRadius, test_directory(self))
        self.assertEqual(str(error), "freeradius not found: apt-get install freeradius")

    def test_fail_under_ci(self) -> None:
        hide_binaries(self)
        set_environ(self, "CI", "true")
        self.assertRaises(MissingBinaryError, Slapd, test_directory(self))
        self.assertRaises(MissingBinaryError, FreeRadius, test_directory(self))
        radius = object.__new__(FreeRadius)  # radclient alone (freeradius-utils) missing
        self.assertRaises(MissingBinaryError, radclient, radius, "status", {})
