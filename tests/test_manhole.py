"""Tests for :mod:`mailgw.manhole` (SPEC [8.2]): OpenSSH's client logs in with a key."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.ssh import keys
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.config import Config, parse_config
from mailgw.manhole import (
    AuthorizedKeysFile,
    ManholeError,
    ensure_host_key,
    evaluate,
    manhole_endpoint,
    manhole_service,
)
from mailgw.metrics import AdminListener
from mailgw.proxy.registry import SessionRegistry, SessionState
from tests.servers.base import require_binary

SECRETS = ("ldap-bind-secret-1", "radius-secret-2")


PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def write_private_key(path: Path, key: PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)


def public_line(key: PrivateKey, comment: str = "admin@example") -> bytes:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public + b" " + comment.encode() + b"\n"


def config_with_secrets() -> Config:
    """A configuration holding an LDAP bind password and a RADIUS secret."""
    data = {
        "tls": {"generate_self_signed": True},
        "aaa_server_group": [
            {"name": "LOCAL", "protocol": "local", "users_file": "users.toml"},
            {
                "name": "corp-ldap",
                "protocol": "ldap",
                "servers": ["ldaps://dc1.example.com"],
                "base_dn": "ou=people,dc=example,dc=com",
                "bind_dn": "cn=gw,dc=example,dc=com",
                "bind_password": SECRETS[0],
            },
            {"name": "corp-radius", "protocol": "radius", "servers": [{"host": "10.0.0.1", "secret": SECRETS[1]}]},
        ],
    }
    return parse_config(data, Path("/etc/mailgw"), check_files=False)


class Owner:
    def terminate(self, reason: str, cause: str = "Admin-Reset") -> None:
        pass


class EndpointTests(SynchronousTestCase):
    """The Manhole listens on loopback only, whatever the configuration let through."""

    def test_loopback(self) -> None:
        """IPv4 and IPv6 loopback addresses give TCP endpoints."""
        self.assertIsInstance(manhole_endpoint(reactor, "ssh:2222:interface=127.0.0.1"), TCP4ServerEndpoint)
        self.assertIsInstance(manhole_endpoint(reactor, "ssh:port=2222:interface=\\:\\:1"), TCP6ServerEndpoint)
        self.assertIsInstance(manhole_endpoint(reactor, "ssh:0:interface=127.0.0.2:backlog=5"), TCP4ServerEndpoint)

    def test_notLoopback(self) -> None:
        """Any other address, or none (all interfaces), is refused with a clear error."""
        for description in (
            "ssh:2222",
            "ssh:2222:interface=0.0.0.0",
            "ssh:2222:interface=192.0.2.1",
            "ssh:2222:interface=\\:\\:",
            "ssh:2222:interface=localhost",
        ):
            error = self.assertRaises(ManholeError, manhole_endpoint, reactor, description)
            self.assertIn("loopback only", str(error))

    def test_malformed(self) -> None:
        """Other kinds, bad ports and unknown parameters are refused."""
        for description in (
            "tcp:2222:interface=127.0.0.1",
            "ssh",
            "ssh:99999:interface=127.0.0.1",
            "ssh:22:23:interface=127.0.0.1",
            "ssh:22:interface=127.0.0.1:mode=666",
        ):
            self.assertRaises(ManholeError, manhole_endpoint, reactor, description)


class HostKeyTests(SynchronousTestCase):
    """The host key is generated once, private, and of a modern type."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.path = self.folder / "manhole_host_key"

    def test_generatedOnce(self) -> None:
        """The first call writes an Ed25519 key with mode 0600; later calls load it."""
        key = ensure_host_key(self.path)
        self.assertEqual(key.type(), "Ed25519")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(ensure_host_key(self.path), key)

    def test_tooOpen(self) -> None:
        """A key others can read is made private again."""
        ensure_host_key(self.path)
        self.path.chmod(0o644)
        ensure_host_key(self.path)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_ecdsaAccepted(self) -> None:
        """An ECDSA key put there by the administrator is used."""
        write_private_key(self.path, ec.generate_private_key(ec.SECP256R1()))
        self.assertEqual(ensure_host_key(self.path).type(), "EC")

    def test_unusable(self) -> None:
        """A file that is no private key, or an RSA key, stops the start."""
        self.path.write_bytes(b"not a key\n")
        self.path.chmod(0o600)
        self.assertRaises(ManholeError, ensure_host_key, self.path)
        write_private_key(self.path, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        error = self.assertRaises(ManholeError, ensure_host_key, self.path)
        self.assertIn("Ed25519 or ECDSA", str(error))


class AuthorizedKeysTests(SynchronousTestCase):
    """The authorized-keys file, read at each login."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.key = ed25519.Ed25519PrivateKey.generate()

    def keys(self) -> list[keys.Key]:
        return list(AuthorizedKeysFile(self.path).getAuthorizedKeys(b"anyone"))

    def test_read(self) -> None:
        """Keys are read for any user name; comments and bad lines are skipped."""
        self.path.write_bytes(b"# admins\n\n" + public_line(self.key) + b"garbage line\n")
        self.assertEqual(self.keys(), [keys.Key(self.key.public_key())])

    def test_rereadAtEachLogin(self) -> None:
        """A key removed from the file is refused at the next login."""
        self.path.write_bytes(public_line(self.key))
        self.assertEqual(len(self.keys()), 1)
        self.path.write_bytes(b"")
        self.assertEqual(self.keys(), [])

    def test_missing(self) -> None:
        """A missing file lets nobody in."""
        self.assertEqual(self.keys(), [])

    def test_writableByOthers(self) -> None:
        """A file group or others may write is ignored (OpenSSH's StrictModes)."""
        self.path.write_bytes(public_line(self.key))
        self.path.chmod(0o664)
        self.assertEqual(self.keys(), [])


class EvaluateTests(SynchronousTestCase):
    """One command of C{ssh HOST 'COMMAND'}."""

    def test_expression(self) -> None:
        """An expression gives its value, evaluated over the namespace."""
        self.assertEqual(evaluate("len(items) + 1", {"items": [1, 2]}), (3, "", True))

    def test_statements(self) -> None:
        """Statements run; what they print is returned."""
        namespace: dict[str, Any] = {}
        self.assertEqual(evaluate("x = 2\nprint(x * 21)", namespace), (None, "42\n", True))
        self.assertEqual(namespace["x"], 2)

    def test_error(self) -> None:
        """An exception gives its traceback and a failure; the daemon goes on."""
        value, printed, ok = evaluate("1 / 0", {})
        self.assertIsNone(value)
        self.assertFalse(ok)
        self.assertIn("ZeroDivisionError", printed)
        _, printed, ok = evaluate("raise SystemExit(3)", {})
        self.assertFalse(ok)


class Collector(protocol.ProcessProtocol):
    """A subprocess's output, exit code, and input sent at start."""

    def __init__(self, stdin: bytes | None = None) -> None:
        self.stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[int] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[None]]] = []

    def when_output(self, text: bytes) -> defer.Deferred[None]:
        """Fires once the standard output holds C{text}."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((text, d))
        self._check()
        return d

    def _check(self) -> None:
        for text, d in list(self._waiting):
            if text in self.out:
                self._waiting.remove((text, d))
                d.callback(None)

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.stdin is not None:
            self.transport.write(self.stdin)
        else:
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", -1))


class ManholeOverSSHTests(TestCase):
    """OpenSSH's C{ssh} logs in to a running Manhole with a key."""

    timeout = 60

    def setUp(self) -> None:
        self.ssh = require_binary("ssh", "openssh-client")
        self.folder = Path(self.mktemp()).resolve()
        (self.folder / "home").mkdir(parents=True)
        self.key_path = self.folder / "admin_key"
        admin_key = ed25519.Ed25519PrivateKey.generate()
        write_private_key(self.key_path, admin_key)
        self.other_key_path = self.folder / "other_key"
        write_private_key(self.other_key_path, ed25519.Ed25519PrivateKey.generate())
        self.authorized = self.folder / "authorized_keys"
        self.authorized.write_bytes(public_line(admin_key))
        self.authorized.chmod(0o600)
        self.registry = SessionRegistry(reactor)
        for _ in range(2):
            self.registry.open("pop3", "192.0.2.1:4000", Owner())
        self.config = config_with_secrets()
        namespace = {"registry": self.registry, "config": self.config, "SessionState": SessionState}
        service = manhole_service(
            "ssh:0:interface=127.0.0.1",
            self.authorized,
            namespace,
            reactor,
            host_key=self.folder / "manhole_host_key",
        )
        assert isinstance(service, AdminListener)
        self.service = service
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        assert service.port is not None
        address = service.port.getHost()
        assert isinstance(address, IPv4Address)
        self.port = address.port

    def spawn_ssh(
        self, *command: str, key: Path | None = None, stdin: bytes | None = None, tty: bool = False
    ) -> Collector:
        """OpenSSH's client logging in to the Manhole as C{admin}, ignoring the user's
        configuration, agent and known hosts."""
        args = [
            self.ssh,
            "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no",
            "-o", "ConnectTimeout=20",
            "-o", "LogLevel=ERROR",
            "-i", str(key or self.key_path),
            "-p", str(self.port),
            "-l", "admin",
        ]  # fmt: skip
        if tty:
            args.append("-tt")
        args += ["127.0.0.1", *command]
        collector = Collector(stdin)
        env = {"HOME": str(self.folder / "home"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        reactor.spawnProcess(collector, self.ssh, args, env=env)
        return collector

    async def run_ssh(
        self, *command: str, key: Path | None = None, stdin: bytes | None = None, tty: bool = False
    ) -> tuple[int, str, str]:
        """Run C{ssh} to its end: its exit code, output and error output."""
        collector = self.spawn_ssh(*command, key=key, stdin=stdin, tty=tty)
        code = await collector.ended
        return code, collector.out.decode(errors="replace"), collector.err.decode(errors="replace")

    async def test_evaluateOverRegistry(self) -> None:
        """An expression over the session registry is evaluated in the daemon."""
        code, out, err = await self.run_ssh("len(registry)")
        self.assertEqual((code, out), (0, "2\n"), err)
        code, out, err = await self.run_ssh("sorted({s.state.value for s in registry})")
        self.assertEqual((code, out), (0, "['unauthenticated']\n"), err)

    async def test_interactiveShell(self) -> None:
        """The interactive shell (with a terminal) evaluates what is typed."""
        code, out, err = await self.run_ssh(tty=True, stdin=b"len(registry) + 4000\r\x04")
        self.assertIn("4002", out, (out, err))
        self.assertEqual(code, 0, err)

    async def test_exitLeavesShell(self) -> None:
        """C{exit()} in the shell ends the session, not the daemon."""
        code, _, err = await self.run_ssh(tty=True, stdin=b"raise SystemExit(3)\r")
        self.assertEqual(code, 0, err)
        code, out, err = await self.run_ssh("len(registry)")
        self.assertEqual((code, out), (0, "2\n"), err)

    async def test_wrongKeyRefused(self) -> None:
        """A key that is not in the authorized-keys file is refused."""
        code, out, err = await self.run_ssh("len(registry)", key=self.other_key_path)
        self.assertEqual(code, 255)
        self.assertEqual(out, "")
        self.assertIn("Permission denied", err)

    async def test_removedKeyRefused(self) -> None:
        """A key removed from the file is refused at once, without a restart."""
        self.authorized.write_bytes(b"")
        code, _, err = await self.run_ssh("len(registry)")
        self.assertEqual(code, 255)
        self.assertIn("Permission denied", err)

    async def test_configReprHidesSecrets(self) -> None:
        """repr(config) through the Manhole shows no secret."""
        code, out, err = await self.run_ssh("repr(config)")
        self.assertEqual(code, 0, err)
        self.assertIn("bind_dn='cn=gw,dc=example,dc=com'", out)
        self.assertIn("Secret('********')", out)
        for secret in SECRETS:
            self.assertNotIn(secret, out)

    async def test_errorsAndDeferreds(self) -> None:
        """A failing command exits 1 with its traceback; a Deferred's result is waited
        for; each command gets a fresh copy of the namespace."""
        code, out, _ = await self.run_ssh("1 / 0")
        self.assertEqual(code, 1)
        self.assertIn("ZeroDivisionError", out)
        code, out, _ = await self.run_ssh("__import__('twisted.internet.defer').internet.defer.succeed(7)")
        self.assertEqual((code, out), (0, "7\n"))
        code, _, _ = await self.run_ssh("registry = None")
        self.assertEqual(code, 0)
        code, out, _ = await self.run_ssh("len(registry)")
        self.assertEqual((code, out), (0, "2\n"))

    async def test_stopClosesSessions(self) -> None:
        """Stopping the service ends open Manhole sessions."""
        collector = self.spawn_ssh(tty=True, stdin=b"")
        await collector.when_output(b">>> ")
        await self.service.stopService()
        assert collector.transport is not None
        collector.transport.closeStdin()
        code = await collector.ended
        self.assertNotEqual(code, 0)


