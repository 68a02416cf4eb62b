"""The real-server fixtures of tests/servers/ work against the real thing.

These tests block in the test thread (poplib, imaplib, smtplib, curl): they test the
fixtures, not the gateway, and use no reactor.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.servers.base import (
    MissingBinaryError,
    ServerStartError,
    free_port,
    free_ports,
    group_members,
    port_listening,
    require_binary,
    require_file,
    set_environ,
    test_directory,
)
from tests.servers.dovecot import (
    BIG_MESSAGE_SIZE,
    Dovecot,
    big_message,
    standard_messages,
    wire_form,
)
from tests.servers.pki import UPN_OID, TestPKI


def pop3_messages(client: poplib.POP3, count: int) -> list[bytes]:
    """RETR 1..count, each re-assembled into the bytes the server sent (CRLF lines)."""
    messages = []
    for number in range(1, count + 1):
        _, lines, _ = client.retr(number)
        messages.append(b"".join(line + b"\r\n" for line in lines))
    return messages


def close_imap(client: imaplib.IMAP4) -> None:
    """Cleanup for an IMAP client that may already be logged out."""
    try:
        client.shutdown()
    except OSError:
        pass


def imap_fetch(client: imaplib.IMAP4, number: int) -> bytes:
    status, data = client.fetch(str(number), "(BODY.PEEK[])")
    assert status == "OK", data
    item = data[0]
    assert isinstance(item, tuple), data
    return item[1]


class RequireBinaryTests(SynchronousTestCase):
    def test_found(self) -> None:
        path = require_binary("sh", "dash")
        self.assertTrue(os.path.isabs(path))
        self.assertTrue(os.access(path, os.X_OK))

    def test_searches_sbin(self) -> None:
        """Daemons are found in the sbin folders even when PATH lacks them."""
        if not os.path.exists("/usr/sbin/dovecot"):
            raise SkipTest("needs /usr/sbin/dovecot")
        set_environ(self, "PATH", "/nonexistent")
        self.assertEqual(require_binary("dovecot", "dovecot-core"), "/usr/sbin/dovecot")

    def test_missing_skips_outside_ci(self) -> None:
        set_environ(self, "CI", None)
        error = self.assertRaises(SkipTest, require_binary, "mailgw-no-such-daemon", "no-such-pkg")
        self.assertEqual(str(error), "mailgw-no-such-daemon not found: apt-get install no-such-pkg")

    def test_missing_fails_under_ci(self) -> None:
        """With CI=true a missing server is an error (failing the test), not a skip."""
        set_environ(self, "CI", "true")
        error = self.assertRaises(MissingBinaryError, require_binary, "mailgw-no-such-daemon", "no-such-pkg")
        self.assertNotIsInstance(error, SkipTest)
        self.assertIn("apt-get install no-such-pkg", str(error))

    def test_require_file(self) -> None:
        set_environ(self, "CI", None)
        self.assertEqual(require_file(["/nonexistent", "/bin/sh"], "dash"), Path("/bin/sh"))
        self.assertRaises(SkipTest, require_file, ["/nonexistent"], "pkg")
        set_environ(self, "CI", "true")
        self.assertRaises(MissingBinaryError, require_file, ["/nonexistent"], "pkg")


class PortTests(SynchronousTestCase):
    def test_free_ports_distinct(self) -> None:
        ports = free_ports(8)
        self.assertEqual(len(set(ports)), 8)
        for port in ports:
            self.assertGreater(port, 1023)

    def test_free_port_bindable(self) -> None:
        port = free_port()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
            self.assertFalse(port_listening("127.0.0.1", port))
            sock.listen()
            self.assertTrue(port_listening("127.0.0.1", port))


class PKITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())

    def load(self, path: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())

    def test_server_cert(self) -> None:
        cert_path, key_path = self.pki.server_cert()
        cert = self.load(cert_path)
        cert.verify_directly_issued_by(self.load(self.pki.ca_path))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, list(usage))
        self.assertEqual(os.stat(key_path).st_mode & 0o777, 0o600)
        # Certificate and key fit together.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)

    def test_client_cert(self) -> None:
        cert_path, key_path = self.pki.client_cert(
            "Alice Example",
            email="alice@example.com",
            organization="Example Corp",
            organizational_unit="Sales",
            country="DE",
            upn="alice@corp.example",
        )
        cert = self.load(cert_path)
        self.assertEqual(
            cert.subject.rfc4514_string(),
            "1.2.840.113549.1.9.1=alice@example.com,CN=Alice Example,OU=Sales,O=Example Corp,C=DE",
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.RFC822Name), ["alice@example.com"])
        [upn] = [name for name in san if isinstance(name, x509.OtherName)]
        self.assertEqual(upn.type_id, UPN_OID)
        self.assertEqual(upn.value, b"\x0c\x12alice@corp.example")
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.CLIENT_AUTH, list(usage))
        combined = TestPKI.combined_pem(cert_path, key_path)
        ssl.create_default_context().load_cert_chain(combined)

    def test_other_ca_unrelated(self) -> None:
        cert_path, _ = self.pki.other_ca.server_cert()
        self.assertNotEqual(self.pki.other_ca.cert_path, self.pki.ca_path)
        cert = self.load(cert_path)
        cert.verify_directly_issued_by(self.load(self.pki.other_ca.cert_path))
        self.assertRaises((ValueError, Exception), cert.verify_directly_issued_by, self.load(self.pki.ca_path))


class MessageTests(SynchronousTestCase):
    def test_big_message(self) -> None:
        message = big_message()
        self.assertEqual(len(message), BIG_MESSAGE_SIZE)
        self.assertEqual(message, big_message())
        _, _, body = message.partition(b"\r\n\r\n")
        lines = body.split(b"\r\n")
        self.assertEqual(lines[-1], b"")  # ends with CRLF
        self.assertEqual({len(line) for line in lines[:-2]}, {76})
        self.assertLessEqual(len(lines[-2]), 76)
        self.assertNotIn(b"\n", body.replace(b"\r\n", b""))
        self.assertTrue(any(line.startswith(b".") for line in lines))

    def test_standard_messages_crlf(self) -> None:
        for message in standard_messages():
            self.assertEqual(wire_form(message), message)
            self.assertTrue(message.endswith(b"\r\n"))

    def test_wire_form(self) -> None:
        self.assertEqual(wire_form(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n")


class DovecotTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dovecot = Dovecot.started(self, users={"alice": "alice-password", "bob": "bob pass"})
        self.context = self.dovecot.ssl_context()

    def pop3(self, user: str = "alice", password: str = "alice-password") -> poplib.POP3:  # noqa: S107
        client = poplib.POP3(self.dovecot.host, self.dovecot.pop3_port, timeout=10)
        self.addCleanup(client.close)
        self.assertIn("STLS", client.capa())
        client.stls(self.context)
        client.user(user)
        client.pass_(password)
        return client

    def test_pop3_stls_byte_identical(self) -> None:
        """Plain POP3 with STLS: LIST sizes and RETR bytes equal the seeded messages."""
        expected = self.dovecot.seed_standard("alice")
        client = self.pop3()
        _, listing, _ = client.list()
        self.assertEqual(listing, [b"%d %d" % (n, len(m)) for n, m in enumerate(expected, 1)])
        self.assertEqual(len(expected[-1]), 10 * 1024 * 1024)
        self.assertEqual(pop3_messages(client, len(expected)), expected)
        _, uidls, _ = client.uidl()
        self.assertEqual(len(uidls), len(expected))
        client.quit()

    def test_pop3s_verified(self) -> None:
        expected = self.dovecot.seed_standard("bob")
        client = poplib.POP3_SSL("localhost", self.dovecot.pop3s_port, context=self.context, timeout=10)
        self.addCleanup(client.close)
        client.user("bob")
        client.pass_("bob pass")
        self.assertEqual(client.stat(), (len(expected), sum(map(len, expected))))
        self.assertEqual(pop3_messages(client, len(expected)), expected)
        client.quit()

    def test_pop3_plaintext_login(self) -> None:
        """Without TLS, plaintext USER/PASS works on the plain port."""
        self.dovecot.deliver("alice", b"Subject: x\r\n\r\nbody\r\n")
        client = poplib.POP3(self.dovecot.host, self.dovecot.pop3_port, timeout=10)
        self.addCleanup(client.close)
        self.assertTrue(client.getwelcome().startswith(b"+OK"))
        client.user("alice")
        client.pass_("alice-password")
        self.assertEqual(client.stat(), (1, 20))
        client.quit()

    def test_imap_starttls_fetch(self) -> None:
        expected = self.dovecot.seed_standard("alice")
        client = imaplib.IMAP4(self.dovecot.host, self.dovecot.imap_port, timeout=10)
        self.addCleanup(close_imap, client)
        self.assertIn("STARTTLS", client.capabilities)
        client.starttls(self.context)
        client.login("alice", "alice-password")
        status, data = client.select("INBOX", readonly=True)
        self.assertEqual((status, data), ("OK", [str(len(expected)).encode()]))
        self.assertEqual(imap_fetch(client, 3), expected[2])
        client.logout()

    def test_imaps_fetch_big(self) -> None:
        expected = self.dovecot.seed_standard("alice")
        client = imaplib.IMAP4_SSL("127.0.0.1", self.dovecot.imaps_port, ssl_context=self.context, timeout=10)
        self.addCleanup(close_imap, client)
        client.login("alice", "alice-password")
        client.select("INBOX", readonly=True)
        self.assertEqual(imap_fetch(client, 1), expected[0])
        self.assertEqual(imap_fetch(client, 4), expected[3])
        client.logout()

    def test_curl_pop3s_list(self) -> None:
        curl = require_binary("curl", "curl")
        expected = self.dovecot.seed_standard("alice")
        result = subprocess.run(
            [
                curl,
                "--silent",
                "--show-error",
                "--cacert",
                self.dovecot.ca_path,
                "--user",
                "alice:alice-password",
                f"pop3s://127.0.0.1:{self.dovecot.pop3s_port}/",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"".join(b"%d %d\r\n" % (n, len(m)) for n, m in enumerate(expected, 1)))

    def test_wrong_password(self) -> None:
        client = poplib.POP3(self.dovecot.host, self.dovecot.pop3_port, timeout=10)
        self.addCleanup(client.close)
        client.user("alice")
        error = self.assertRaises(poplib.error_proto, client.pass_, "wrong")
        self.assertIn(b"-ERR", error.args[0])
        imap = imaplib.IMAP4(self.dovecot.host, self.dovecot.imap_port, timeout=10)
        self.addCleanup(close_imap, imap)
        self.assertRaises(imaplib.IMAP4.error, imap.login, "alice", "wrong")
        line = self.dovecot.wait_for_log("Password mismatch")
        self.assertIn("alice", line)

    def test_untrusted_ca_rejected(self) -> None:
        context = ssl.create_default_context(cafile=self.dovecot.pki.other_ca.cert_path)
        self.assertRaises(
            ssl.SSLCertVerificationError,
            poplib.POP3_SSL,
            "127.0.0.1",
            self.dovecot.pop3s_port,
            context=context,
            timeout=10,
        )

    def test_deliver_while_running(self) -> None:
        self.dovecot.deliver("alice", b"Subject: first\r\n\r\n1\r\n")
        self.pop3().quit()  # the first session moves it to cur/ and assigns UID 1
        self.dovecot.deliver("alice", b"Subject: second\n\nLF only\n")
        client = self.pop3()
        self.assertEqual(
            pop3_messages(client, 2),
            [b"Subject: first\r\n\r\n1\r\n", b"Subject: second\r\n\r\nLF only\r\n"],
        )
        client.quit()

    def test_set_user_while_running(self) -> None:
        self.dovecot.set_user("carol", "carol-password")
        self.dovecot.deliver("carol", b"Subject: hi carol\r\n\r\n.\r\n")
        client = self.pop3("carol", "carol-password")
        self.assertEqual(pop3_messages(client, 1), [b"Subject: hi carol\r\n\r\n.\r\n"])
        client.quit()
        self.dovecot.set_user("carol", "new-password")
        self.assertRaises(poplib.error_proto, self.pop3, "carol", "carol-password")
        self.pop3("carol", "new-password").quit()

    def test_stop_kills_everything(self) -> None:
        pid = self.dovecot.pid
        assert pid is not None
        self.pop3().quit()
        self.assertTrue(group_members(pid))
        self.dovecot.stop()
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertEqual(group_members(pid), [])
        for port in self.dovecot.listening_ports().values():
            self.assertFalse(port_listening(self.dovecot.host, port))
        self.assertFalse(self.dovecot.running)
        self.dovecot.stop()  # idempotent


class DovecotLifecycleTests(SynchronousTestCase):
    def test_bad_config_reports_log(self) -> None:
        server = Dovecot(test_directory(self), extra_config="mailgw_no_such_setting = 1")
        self.addCleanup(server.stop)
        error = self.assertRaises(ServerStartError, server.start)
        self.assertIn("mailgw_no_such_setting", str(error))
        self.assertIsNone(server._process)

    def test_port_clash_retried(self) -> None:
        """A port taken between allocation and start: start again on new ports."""
        server = Dovecot(test_directory(self))
        self.addCleanup(server.stop)
        taken = server.imaps_port
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", taken))
            blocker.listen()
            server.start()
            self.assertNotEqual(server.imaps_port, taken)
            self.assertIn("Address already in use", server.log_text() + server.log_tail())
        client = poplib.POP3(server.host, server.pop3_port, timeout=10)
        client.user("alice")
        client.pass_("alice-password")
        client.quit()

    def test_context_manager_and_own_folder(self) -> None:
        with Dovecot() as server:
            folder = server.base_dir
            self.assertTrue(server.running)
            pid = server.pid
        assert pid is not None
        self.assertEqual(group_members(pid), [])
        self.assertFalse(folder.exists())

    def test_submission_relays_to_sink(self) -> None:
        server = Dovecot.started(self, submission=True)
        assert server.submission_port is not None and server.smtp_sink is not None
        message = b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: relay\r\n\r\n.dot\r\nok\r\n"
        with smtplib.SMTP(server.host, server.submission_port, timeout=10) as client:
            client.starttls(context=server.ssl_context())
            client.ehlo()
            self.assertRaises(
                smtplib.SMTPSenderRefused, client.sendmail, "alice@example.com", ["bob@example.com"], message
            )
            client.rset()
            client.login("alice", "alice-password")
            client.sendmail("alice@example.com", ["bob@example.com"], message)
        [received] = server.smtp_sink.wait_for_messages(1)
        self.assertEqual(received.mail_from, "alice@example.com")
        self.assertEqual(received.rcpt_to, ["bob@example.com"])
        self.assertTrue(received.data.endswith(b"\r\n.dot\r\nok\r\n"), received.data)
        assert server.submissions_port is not None
        with smtplib.SMTP_SSL("localhost", server.submissions_port, context=server.ssl_context(), timeout=10) as client:
            client.login("bob", "bob-password")
            client.sendmail("bob@example.com", ["alice@example.com"], b"Subject: 2\r\n\r\nx\r\n")
        self.assertEqual(len(server.smtp_sink.wait_for_messages(2)), 2)
