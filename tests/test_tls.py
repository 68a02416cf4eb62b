"""
Tests for L{mailgw.tls}: files and settings on their own, then real TLS over loopback
with Twisted clients and with C{openssl s_client}.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.tls import (
    ClientTLSCache,
    ServerTLS,
    TLSConfigError,
    client_tls_options,
    ensure_self_signed,
    peer_certificate,
    tune_tcp,
)

OPENSSL = shutil.which("openssl")


def _reactor() -> Any:
    """
    The global reactor, imported when a test runs (no module-level reactor import).
    """
    from twisted.internet import reactor

    return reactor


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------
# A small throw-away PKI (ECDSA P-256: fast to generate and to handshake)


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class _CA:
    """
    A certificate authority writing PEM files into C{folder}.
    """

    issued: _Issued

    def __init__(self, folder: Path, name: str, issuer: _CA | None = None) -> None:
        self.folder = folder
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            self._builder(subject, key, issuer)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
        )
        signer = issuer.issued.key if issuer else key
        self.issued = _Issued(builder.sign(signer, hashes.SHA256()), key)
        self.path = folder / f"{name}.pem"
        self.path.write_bytes(self.issued.cert_pem())

    def _builder(
        self, subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: _CA | None
    ) -> x509.CertificateBuilder:
        now = datetime.now(UTC)
        issuer_name = issuer.issued.cert.subject if issuer else subject
        issuer_key = issuer.issued.key if issuer else key
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )

    def issue(
        self,
        common_name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        client: bool = False,
    ) -> _Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            self._builder(subject, key, self)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _Issued(builder.sign(self.issued.key, hashes.SHA256()), key)

    def write(self, issued: _Issued, stem: str, *chain: _CA) -> tuple[Path, Path]:
        """
        Write C{issued} as C{stem}.pem (followed by the C{chain} certificates) and
        C{stem}.key; return both paths.
        """
        cert_path = self.folder / f"{stem}.pem"
        key_path = self.folder / f"{stem}.key"
        cert_path.write_bytes(issued.cert_pem() + b"".join(c.issued.cert_pem() for c in chain))
        key_path.write_bytes(issued.key_pem())
        key_path.chmod(0o600)
        return cert_path, key_path


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class _PKI:
    """
    The test fixtures: a CA for servers and clients, an unrelated CA, a localhost
    server certificate, and a client certificate of each CA.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = _CA(folder, "Test-CA")
        self.other_ca = _CA(folder, "Other-CA")
        self.server = self.ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1", "::1"])
        self.server_cert, self.server_key = self.ca.write(self.server, "server")
        self.client = self.ca.issue("alice", client=True)
        self.client_cert, self.client_key = self.ca.write(self.client, "alice")
        self.stranger = self.other_ca.issue("mallory", client=True)
        self.stranger_cert, self.stranger_key = self.other_ca.write(self.stranger, "mallory")

    def server_tls(self, **kwargs: Any) -> ServerTLS:
        return ServerTLS(self.server_cert, self.server_key, **kwargs)


def _client_creator(
    trust: _CA, hostname: str = "localhost", client: _Issued | None = None
) -> IOpenSSLClientConnectionCreator:
    """
    A verifying Twisted client, optionally presenting a client certificate.
    """
    certificate = (
        PrivateCertificate.loadPEM(client.cert_pem() + client.key_pem()) if client else None
    )
    return optionsForClientTLS(
        hostname, Certificate.loadPEM(trust.issued.cert_pem()), certificate
    )


# --------------------------------------------------------------------------------------
# Loopback harness


@implementer(IHandshakeListener)
class _ServerProtocol(Protocol):
    """
    After the handshake: records what the TLS layer says, greets, and closes.
    """

    def __init__(self) -> None:
        self.handshake_done = False
        self.peer: x509.Certificate | None = None
        self.context: SSL.Context | None = None
        self.server_name: bytes | None = None
        self.version: str | None = None
        self.reason: Failure | None = None
        self._waiters: list[Deferred[None]] = []

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        self.handshake_done = True
        self.peer = peer_certificate(self.transport)
        self.context = handle.get_context()
        self.server_name = handle.get_servername()
        self.version = handle.get_protocol_version_name()
        self.transport.write(b"+OK mailgw\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason or Failure(ConnectionError("connection lost"))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def when_lost(self) -> Deferred[None]:
        if self.reason is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d


class _ServerFactory(Factory):
    def __init__(
        self,
        make: Callable[[], _ServerProtocol] = _ServerProtocol,
        server_tls: object = None,
    ) -> None:
        self.make = make
        self.server_tls = server_tls  # for protocols that start TLS themselves
        self.accepted: DeferredQueue[_ServerProtocol] = DeferredQueue()
        self.built: list[_ServerProtocol] = []

    def buildProtocol(self, addr: object) -> _ServerProtocol:
        p = self.make()
        p.factory = self
        self.built.append(p)
        self.accepted.put(p)
        return p


@implementer(IHandshakeListener)
class _ClientProtocol(_ServerProtocol):
    """
    Records the handshake and what the server sent; the server closes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data = b""
        self.ca_names: list[x509.Name] = []

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        self.handshake_done = True
        self.peer = peer_certificate(self.transport)
        self.context = handle.get_context()
        self.ca_names = handle.get_client_ca_list(as_cryptography=True)

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class _StartTLSServer(_ServerProtocol):
    """
    Plaintext greeting; C{STLS} switches to TLS with the factory's L{ServerTLS}.
    """

    nodelay: tuple[int, int] = (0, 0)

    def connectionMade(self) -> None:
        self.transport.write(b"+OK plain\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if data == b"STLS\r\n":
            sock = self.transport.getHandle()  # type: ignore[union-attr]
            tune_tcp(self.transport)
            before = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            self.transport.write(b"+OK begin TLS\r\n")  # type: ignore[union-attr]
            assert isinstance(self.factory, _ServerFactory)
            self.transport.startTLS(self.factory.server_tls)  # type: ignore[union-attr]
            tune_tcp(self.transport)  # after startTLS
            after = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            self.nodelay = (int(before != 0), int(after != 0))


class _StartTLSClient(_ClientProtocol):
    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        super().__init__()
        self.creator = creator
        self.plain = b""

    def dataReceived(self, data: bytes) -> None:
        if self.handshake_done or self.plain.endswith(b"+OK begin TLS\r\n"):
            self.data += data
            return
        self.plain += data
        if self.plain == b"+OK plain\r\n":
            self.transport.write(b"STLS\r\n")  # type: ignore[union-attr]
        elif self.plain.endswith(b"+OK begin TLS\r\n"):
            self.transport.startTLS(self.creator)  # type: ignore[union-attr]


class _NoDelayServer(_ServerProtocol):
    nodelay: int = -1

    def handshakeCompleted(self) -> None:
        tune_tcp(self.transport)
        tcp = self.transport.transport  # type: ignore[union-attr]
        self.nodelay = tcp.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        super().handshakeCompleted()


def _failed(proto: _ServerProtocol) -> bool:
    return proto.reason is not None and proto.reason.check(SSL.Error) is not None


class _LoopbackMixin:
    """
    Listening and connecting on loopback; every listener and connection is cleaned up
    and waited for.
    """

    addCleanup: Callable[..., None]

    def listen(
        self,
        server_tls: object,
        *,
        interface: str = "127.0.0.1",
        make: Callable[[], _ServerProtocol] = _ServerProtocol,
        wrap: bool = True,
    ) -> tuple[int, _ServerFactory]:
        factory = _ServerFactory(make, server_tls)
        wrapped: IProtocolFactory = (
            TLSMemoryBIOFactory(server_tls, False, factory) if wrap else factory  # type: ignore[arg-type]
        )
        port = _reactor().listenTCP(0, wrapped, interface=interface)
        self.addCleanup(self._close_all, factory.built)
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    async def connect(
        self,
        port: int,
        creator: object,
        host: str = "127.0.0.1",
        proto: _ClientProtocol | None = None,
        wrap: bool = True,
    ) -> _ClientProtocol:
        """
        Connect, and wait until the connection is closed.
        """
        client = proto or _ClientProtocol()
        factory: IProtocolFactory = ClientFactory.forProtocol(lambda: client)
        if wrap:
            factory = TLSMemoryBIOFactory(creator, True, factory)  # type: ignore[arg-type]
        _reactor().connectTCP(host, port, factory)
        self.addCleanup(self._close_all, [client])
        await client.when_lost()
        return client

    @staticmethod
    async def _close_all(protocols: list[_ServerProtocol]) -> None:
        for p in protocols:
            if p.reason is None and p.transport is not None:
                p.transport.abortConnection()  # type: ignore[attr-defined]
            await p.when_lost()

    async def s_client(self, port: int, *args: str) -> tuple[int, str]:
        """
        Run C{openssl s_client} against 127.0.0.1:C{port}; return its exit code and
        output. stdin is empty; C{-ign_eof} keeps it reading until the server closes.
        """
        if OPENSSL is None:
            raise AssertionError("openssl not found")
        out, err, code = await getProcessOutputAndValue(
            OPENSSL,
            ["s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args],
            env=dict(os.environ),
            reactor=_reactor(),
            stdinBytes=b"",
        )
        return code, (out + err).decode("utf-8", "replace")


def _needs_openssl(cls: type) -> type:
    if OPENSSL is None:
        cls.skip = "the openssl command is not installed"  # type: ignore[attr-defined]
    return cls


# --------------------------------------------------------------------------------------
# ensure_self_signed


class EnsureSelfSignedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp()) / "state" / "tls"
        self.cert = self.folder / "gateway.pem"
        self.key = self.folder / "gateway.key"

    def test_generates(self) -> None:
        """
        With neither file present, an ECDSA P-256 key (mode 0600) and a 10-year
        self-signed certificate for the host name, localhost, 127.0.0.1 and ::1 are
        written into a folder created with mode 0700; it returns True, leaves no
        temporary file, and the pair loads.
        """
        now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        self.assertTrue(ensure_self_signed(self.cert, self.key, "mail.example.com", now=now))
        self.assertEqual(stat.S_IMODE(self.key.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.folder.stat().st_mode), 0o700)
        self.assertEqual(sorted(p.name for p in self.folder.iterdir()),
                         ["gateway.key", "gateway.pem"])
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        self.assertEqual(cert.public_key(), key.public_key())
        self.assertEqual(cert.subject, cert.issuer)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName),
                         ["mail.example.com", "localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertLessEqual(cert.not_valid_before_utc, now)
        self.assertGreaterEqual(cert.not_valid_after_utc - now, timedelta(days=3652))
        ServerTLS(self.cert, self.key)

    def test_ipHostname(self) -> None:
        """
        An IP-literal host name goes into an IP-address SAN, not a DNS one.
        """
        ensure_self_signed(self.cert, self.key, "192.0.2.7")
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertIn(ipaddress.ip_address("192.0.2.7"), san.get_values_for_type(x509.IPAddress))

    def test_doesNotOverwrite(self) -> None:
        """
        With both files present, nothing is written and it returns False.
        """
        self.assertTrue(ensure_self_signed(self.cert, self.key, "mail.example.com"))
        before = (self.cert.read_bytes(), self.key.read_bytes())
        self.assertFalse(ensure_self_signed(self.cert, self.key, "other.example.com"))
        self.assertEqual((self.cert.read_bytes(), self.key.read_bytes()), before)

    def test_halfPairRefused(self) -> None:
        """
        With only one of the two files present, it raises L{TLSConfigError} naming the
        missing file and writes nothing: a new pair would not match the existing file.
        """
        self.folder.mkdir(parents=True)
        self.cert.write_bytes(b"existing")
        error = self.assertRaises(
            TLSConfigError, ensure_self_signed, self.cert, self.key, "mail.example.com"
        )
        self.assertEqual(error.path, self.key)
        self.assertIn(str(self.key), str(error))
        self.assertEqual(self.cert.read_bytes(), b"existing")
        self.assertFalse(self.key.exists())
        self.assertEqual([p.name for p in self.folder.iterdir()], ["gateway.pem"])


# --------------------------------------------------------------------------------------
# ServerTLS: loading and settings


class ServerTLSConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = _PKI(Path(self.mktemp()))

    def assertConfigError(self, path: Path, *args: Any, **kwargs: Any) -> TLSConfigError:
        error: TLSConfigError = self.assertRaises(TLSConfigError, ServerTLS, *args, **kwargs)
        self.assertEqual(error.path, path)
        self.assertIn(str(path), str(error))
        return error

    def test_interfaces(self) -> None:
        """
        L{ServerTLS} provides L{IOpenSSLServerConnectionCreator} and the older
        L{IOpenSSLContextFactory}; C{getContext} always returns the same context.
        """
        server_tls = self.pki.server_tls()
        verifyObject(IOpenSSLServerConnectionCreator, server_tls)
        verifyObject(IOpenSSLContextFactory, server_tls)
        self.assertIs(server_tls.getContext(), server_tls.getContext())
        self.assertEqual(server_tls.certificate, self.pki.server.cert)

    def test_options(self) -> None:
        """
        Compression off, server cipher preference, renegotiation off, session tickets
        on, server session cache on.
        """
        server_tls = self.pki.server_tls()
        self.assertTrue(server_tls.options & SSL.OP_NO_COMPRESSION)
        self.assertTrue(server_tls.options & SSL.OP_CIPHER_SERVER_PREFERENCE)
        self.assertTrue(server_tls.options & SSL.OP_NO_RENEGOTIATION)
        self.assertFalse(server_tls.options & SSL.OP_NO_TICKET)
        self.assertEqual(
            server_tls.getContext().get_session_cache_mode(), SSL.SESS_CACHE_SERVER
        )

    def test_verifyModes(self) -> None:
        """
        none: no request; optional: VERIFY_PEER only; required: VERIFY_PEER and
        VERIFY_FAIL_IF_NO_PEER_CERT.
        """
        ca = self.pki.ca.path
        modes = {
            "none": SSL.VERIFY_NONE,
            "optional": SSL.VERIFY_PEER,
            "required": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        }
        for mode, expected in modes.items():
            server_tls = self.pki.server_tls(client_certificate=mode, client_ca=ca)
            self.assertEqual(server_tls.getContext().get_verify_mode(), expected, mode)

    def test_mismatchedKey(self) -> None:
        """
        A key that is not the certificate's gives L{TLSConfigError} naming the key file.
        """
        _, other_key = self.pki.ca.write(self.pki.ca.issue("x"), "x")
        error = self.assertConfigError(other_key, self.pki.server_cert, other_key)
        self.assertIn("does not match", str(error))

    def test_missingFiles(self) -> None:
        """
        A missing certificate, key or client CA file is named in the error.
        """
        missing = self.pki.folder / "nope.pem"
        self.assertConfigError(missing, missing, self.pki.server_key)
        self.assertConfigError(missing, self.pki.server_cert, missing)
        self.assertConfigError(
            missing,
            self.pki.server_cert,
            self.pki.server_key,
            client_certificate="required",
            client_ca=missing,
        )

    def test_garbage(self) -> None:
        """
        Files that are not PEM are named in the error.
        """
        garbage = self.pki.folder / "garbage"
        garbage.write_bytes(b"not PEM at all\n")
        self.assertConfigError(garbage, garbage, self.pki.server_key)
        self.assertConfigError(garbage, self.pki.server_cert, garbage)

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is refused with a clear message (OpenSSL would otherwise
        prompt for a passphrase on the terminal).
        """
        encrypted = self.pki.folder / "encrypted.key"
        encrypted.write_bytes(
            self.pki.server.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        error = self.assertConfigError(encrypted, self.pki.server_cert, encrypted)
        self.assertIn("encrypted", str(error))

    def test_clientCertificateNeedsCA(self) -> None:
        """
        Requesting client certificates without client_ca is a configuration error.
        """
        for mode in ("optional", "required"):
            self.assertRaises(TLSConfigError, self.pki.server_tls, client_certificate=mode)

    def test_badSettings(self) -> None:
        """
        Unknown minimum versions and client certificate modes are refused.
        """
        self.assertRaises(TLSConfigError, self.pki.server_tls, minimum_version="TLSv1.1")
        self.assertRaises(TLSConfigError, self.pki.server_tls, client_certificate="maybe")

    def test_notForClients(self) -> None:
        """
        The context is server-only (TLS_server_method): used as a client it cannot
        start a handshake, so it never becomes an unverified client by mistake.
        """
        connection = SSL.Connection(self.pki.server_tls().getContext(), None)
        connection.set_connect_state()
        self.assertRaises(SSL.Error, connection.do_handshake)


# --------------------------------------------------------------------------------------
# ServerTLS on the wire


class ServerTLSConnectionTests(_LoopbackMixin, TestCase):
    def setUp(self) -> None:
        self.pki = _PKI(Path(self.mktemp()))

    async def test_accepts(self) -> None:
        """
        A verifying client connects (TLS 1.3 by default) and gets the greeting; the
        server sees no client certificate.
        """
        port, factory = self.listen(self.pki.server_tls())
        client = await self.connect(port, _client_creator(self.pki.ca))
        server = await factory.accepted.get()
        await server.when_lost()
        self.assertTrue(client.handshake_done)
        self.assertEqual(client.data, b"+OK mailgw\r\n")
        self.assertEqual(server.version, "TLSv1.3")
        self.assertIsNone(server.peer)
        self.assertEqual(client.peer, self.pki.server.cert)

    async def test_contextReused(self) -> None:
        """
        Every connection runs on the one context built at construction.
        """
        server_tls = self.pki.server_tls()
        port, factory = self.listen(server_tls)
        for _ in range(3):
            await self.connect(port, _client_creator(self.pki.ca))
        contexts = [s.context for s in factory.built]
        self.assertEqual(len(contexts), 3)
        for context in contexts:
            self.assertIs(context, server_tls.getContext())

    async def test_chain(self) -> None:
        """
        The intermediates after the leaf in the certificate file are sent: a client
        trusting only the root verifies the server.
        """
        intermediate = _CA(self.pki.folder, "Intermediate-CA", issuer=self.pki.ca)
        leaf = intermediate.issue("localhost", dns=["localhost"])
        cert, key = intermediate.write(leaf, "chained", intermediate)
        port, _ = self.listen(ServerTLS(cert, key))
        client = await self.connect(port, _client_creator(self.pki.ca))
        self.assertTrue(client.handshake_done)
        self.assertEqual(client.data, b"+OK mailgw\r\n")

    async def test_endpoint(self) -> None:
        """
        L{ServerTLS} is accepted as the context factory of L{SSL4ServerEndpoint}.
        """
        factory = _ServerFactory()
        endpoint = SSL4ServerEndpoint(
            _reactor(), 0, self.pki.server_tls(), interface="127.0.0.1"
        )
        port = await endpoint.listen(factory)
        self.addCleanup(self._close_all, factory.built)
        self.addCleanup(port.stopListening)
        client = await self.connect(port.getHost().port, _client_creator(self.pki.ca))
        self.assertEqual(client.data, b"+OK mailgw\r\n")

    async def test_startTLS(self) -> None:
        """
        L{ServerTLS} and L{client_tls_options} work with C{transport.startTLS} on
        both sides; L{peer_certificate} and L{tune_tcp} work on a TCP transport
        after startTLS.
        """
        pki = self.pki
        server_tls = pki.server_tls(client_certificate="optional", client_ca=pki.ca.path)
        port, factory = self.listen(server_tls, make=_StartTLSServer, wrap=False)
        client_creator = _client_creator(pki.ca, client=pki.client)
        client = await self.connect(
            port, None, proto=_StartTLSClient(client_creator), wrap=False
        )
        server = await factory.accepted.get()
        await server.when_lost()
        assert isinstance(server, _StartTLSServer)
        self.assertTrue(client.handshake_done)
        self.assertEqual(client.data, b"+OK mailgw\r\n")
        self.assertEqual(server.peer, pki.client.cert)
        self.assertIs(server.context, server_tls.getContext())
        self.assertEqual(server.nodelay, (1, 1))


# --------------------------------------------------------------------------------------
# Protocol versions, compression and resumption, seen by openssl s_client


@_needs_openssl
class OpenSSLClientTests(_LoopbackMixin, TestCase):
    def setUp(self) -> None:
        self.pki = _PKI(Path(self.mktemp()))

    async def assertHandshake(self, port: int, *args: str) -> str:
        code, output = await self.s_client(port, *args)
        self.assertIn("+OK mailgw", output)
        self.assertEqual(code, 0, output)
        return output

    async def assertRefused(
        self, port: int, factory: _ServerFactory, *args: str
    ) -> str:
        code, output = await self.s_client(port, *args)
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("+OK mailgw", output)
        server = factory.built[-1]
        await server.when_lost()
        self.assertFalse(server.handshake_done)
        self.assertTrue(_failed(server), server.reason)
        return output

    async def test_defaultVersions(self) -> None:
        """
        By default TLS 1.2 and 1.3 are accepted, without compression; TLS 1.1 is
        refused by the server (the client is allowed to offer it: SECLEVEL=0).
        """
        port, factory = self.listen(self.pki.server_tls())
        for version in ("-tls1_2", "-tls1_3"):
            output = await self.assertHandshake(port, version)
            self.assertIn("Compression: NONE", output)
        output = await self.assertRefused(
            port, factory, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"
        )
        self.assertIn("alert protocol version", output)
        self.assertEqual([s.version for s in factory.built[:2]], ["TLSv1.2", "TLSv1.3"])

    async def test_minimumTLS13(self) -> None:
        """
        With minimum_version TLSv1.3, TLS 1.2 is refused and TLS 1.3 accepted.
        """
        port, factory = self.listen(self.pki.server_tls(minimum_version="TLSv1.3"))
        output = await self.assertRefused(port, factory, "-tls1_2")
        self.assertIn("alert protocol version", output)
        await self.assertHandshake(port, "-tls1_3")

    async def test_tls12Ciphers(self) -> None:
        """
        TLS 1.2 negotiates ECDHE with an AEAD cipher; a CBC-only client is refused.
        """
        port, factory = self.listen(self.pki.server_tls())
        output = await self.assertHandshake(port, "-tls1_2")
        self.assertRegex(output, r"Cipher is ECDHE-ECDSA-(AES128-GCM|AES256-GCM|CHACHA20)")
        await self.assertRefused(port, factory, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")

    async def _resume(self, port: int, *args: str) -> tuple[str, str]:
        session = os.path.join(self.mktemp() + ".session")
        first = await self.assertHandshake(port, "-sess_out", session, *args)
        second = await self.assertHandshake(port, "-sess_in", session, *args)
        return first, second

    async def test_resumption(self) -> None:
        """
        Sessions resume, with TLS 1.3 tickets, TLS 1.2 tickets and TLS 1.2 session
        ids (server cache).
        """
        port, _ = self.listen(self.pki.server_tls())
        for args in (("-tls1_3",), ("-tls1_2",), ("-tls1_2", "-no_ticket")):
            first, second = await self._resume(port, *args)
            self.assertIn("New, TLSv1", first, args)
            self.assertIn("Reused, TLSv1", second, args)

    async def test_resumptionWithClientCertificate(self) -> None:
        """
        With client certificates required, sessions resume (the session id context is
        set), and the resumed session still carries the verified client certificate.
        """
        pki = self.pki
        server_tls = pki.server_tls(client_certificate="required", client_ca=pki.ca.path)
        port, factory = self.listen(server_tls)
        cert = ("-cert", str(pki.client_cert), "-key", str(pki.client_key))
        for version in ("-tls1_3", "-tls1_2"):
            _, second = await self._resume(port, version, *cert)
            self.assertIn("Reused, TLSv1", second, version)
            resumed = factory.built[-1]
            self.assertTrue(resumed.handshake_done)
            self.assertEqual(resumed.peer, pki.client.cert)

    async def test_caNamesSent(self) -> None:
        """
        The CertificateRequest lists the client CAs' names.
        """
        pki = self.pki
        port, _ = self.listen(
            pki.server_tls(client_certificate="optional", client_ca=pki.ca.path)
        )
        output = await self.assertHandshake(port, "-tls1_2")
        self.assertIn("Acceptable client certificate CA names\nCN = Test-CA", output)


# --------------------------------------------------------------------------------------
# Client certificates


class ClientCertificateTests(_LoopbackMixin, TestCase):
    def setUp(self) -> None:
        self.pki = _PKI(Path(self.mktemp()))

    async def handshake(
        self, mode: str, client: _Issued | None
    ) -> tuple[_ClientProtocol, _ServerProtocol]:
        pki = self.pki
        server_tls = pki.server_tls(client_certificate=mode, client_ca=pki.ca.path)
        port, factory = self.listen(server_tls)
        client_proto = await self.connect(port, _client_creator(pki.ca, client=client))
        server = await factory.accepted.get()
        await server.when_lost()
        return client_proto, server

    def assertAccepted(self, client: _ClientProtocol, server: _ServerProtocol) -> None:
        self.assertTrue(server.handshake_done, server.reason)
        self.assertEqual(client.data, b"+OK mailgw\r\n")

    def assertRefused(self, client: _ClientProtocol, server: _ServerProtocol) -> None:
        self.assertFalse(server.handshake_done)
        self.assertTrue(_failed(server), server.reason)
        self.assertEqual(client.data, b"")
        self.assertTrue(_failed(client), client.reason)

    async def test_requiredAccepted(self) -> None:
        """
        required: a certificate from client_ca is accepted and L{peer_certificate}
        returns it; the client was offered the CA's name.
        """
        client, server = await self.handshake("required", self.pki.client)
        self.assertAccepted(client, server)
        self.assertEqual(server.peer, self.pki.client.cert)
        self.assertEqual(client.ca_names, [self.pki.ca.issued.cert.subject])

    async def test_requiredNoCertificate(self) -> None:
        """
        required: a client without a certificate is refused.
        """
        self.assertRefused(*await self.handshake("required", None))

    async def test_requiredOtherCA(self) -> None:
        """
        required: a certificate from another CA is refused.
        """
        self.assertRefused(*await self.handshake("required", self.pki.stranger))

    async def test_optionalNoCertificate(self) -> None:
        """
        optional: a client without a certificate is accepted; no peer certificate.
        """
        client, server = await self.handshake("optional", None)
        self.assertAccepted(client, server)
        self.assertIsNone(server.peer)

    async def test_optionalAccepted(self) -> None:
        """
        optional: a certificate from client_ca is accepted and returned.
        """
        client, server = await self.handshake("optional", self.pki.client)
        self.assertAccepted(client, server)
        self.assertEqual(server.peer, self.pki.client.cert)

    async def test_optionalOtherCA(self) -> None:
        """
        optional: a certificate that fails verification is refused, not ignored.
        """
        self.assertRefused(*await self.handshake("optional", self.pki.stranger))

    async def test_none(self) -> None:
        """
        none: no certificate is requested, so none is seen even if the client has one.
        """
        client, server = await self.handshake("none", self.pki.client)
        self.assertAccepted(client, server)
        self.assertIsNone(server.peer)
        self.assertEqual(client.ca_names, [])


# --------------------------------------------------------------------------------------
# client_tls_options


class ClientTLSOptionsTests(_LoopbackMixin, TestCase):
    def setUp(self) -> None:
        self.pki = _PKI(Path(self.mktemp()))

    async def roundtrip(
        self,
        creator: IOpenSSLClientConnectionCreator,
        server_tls: ServerTLS | None = None,
        interface: str = "127.0.0.1",
    ) -> tuple[_ClientProtocol, _ServerProtocol]:
        port, factory = self.listen(server_tls or self.pki.server_tls(), interface=interface)
        client = await self.connect(port, creator, host=interface)
        server = await factory.accepted.get()
        await server.when_lost()
        return client, server

    def assertConnected(self, client: _ClientProtocol) -> None:
        self.assertTrue(client.handshake_done, client.reason)
        self.assertEqual(client.data, b"+OK mailgw\r\n")

    def assertVerificationFailed(self, client: _ClientProtocol, server: _ServerProtocol) -> None:
        """
        The client refused the server: a chain error (SSL.Error), a name mismatch
        (VerificationError) or a malformed name (CertificateError); the server never
        completed a handshake.
        """
        self.assertEqual(client.data, b"")
        assert client.reason is not None
        expected = (SSL.Error, VerificationError, CertificateError)
        self.assertIsNotNone(client.reason.check(*expected), client.reason)
        self.assertFalse(server.handshake_done)
        self.assertIsNotNone(server.reason)

    async def test_verified(self) -> None:
        """
        "localhost" with the right CA: connected, the server's certificate is the
        verified peer, and the name went out as SNI.
        """
        creator = client_tls_options("localhost", verify=True, ca=self.pki.ca.path)
        client, server = await self.roundtrip(creator)
        self.assertConnected(client)
        self.assertEqual(client.peer, self.pki.server.cert)
        self.assertEqual(server.server_name, b"localhost")

    async def test_wrongHostname(self) -> None:
        """
        A name the certificate does not carry fails the handshake.
        """
        creator = client_tls_options("mail.example.com", verify=True, ca=self.pki.ca.path)
        self.assertVerificationFailed(*await self.roundtrip(creator))

    async def test_wrongCA(self) -> None:
        """
        A certificate not issued by the configured CA fails the handshake.
        """
        creator = client_tls_options("localhost", verify=True, ca=self.pki.other_ca.path)
        self.assertVerificationFailed(*await self.roundtrip(creator))

    async def test_platformTrust(self) -> None:
        """
        Without a CA file the platform store is used, which does not know the test CA.
        """
        creator = client_tls_options("localhost", verify=True, ca=None)
        self.assertVerificationFailed(*await self.roundtrip(creator))

    async def test_severalCAs(self) -> None:
        """
        Every certificate of a CA file is a trust anchor, not only the first.
        """
        bundle = self.pki.folder / "bundle.pem"
        bundle.write_bytes(self.pki.other_ca.path.read_bytes() + self.pki.ca.path.read_bytes())
        client, _ = await self.roundtrip(client_tls_options("localhost", verify=True, ca=bundle))
        self.assertConnected(client)

    async def test_unverified(self) -> None:
        """
        verify=False connects whatever the name and issuer (insecure by design), and
        L{peer_certificate} reports no verified certificate; SNI is still sent.
        """
        creator = client_tls_options("mail.example.com", verify=False, ca=None)
        client, server = await self.roundtrip(creator)
        self.assertConnected(client)
        self.assertIsNone(client.peer)
        self.assertEqual(server.server_name, b"mail.example.com")

    async def test_ipLiteral(self) -> None:
        """
        An IPv4 literal is matched against the IP-address SANs, and not sent as SNI.
        """
        creator = client_tls_options("127.0.0.1", verify=True, ca=self.pki.ca.path)
        client, server = await self.roundtrip(creator)
        self.assertConnected(client)
        self.assertIsNone(server.server_name)

    async def test_ipLiteralNeedsIPSAN(self) -> None:
        """
        An IP literal is not matched against DNS SANs or the CN: a certificate whose
        CN is the address and whose only SAN is a DNS name does not match it.
        """
        cert = self.pki.ca.issue("127.0.0.1", dns=["localhost"])
        server_tls = ServerTLS(*self.pki.ca.write(cert, "dns-only"))
        creator = client_tls_options("127.0.0.1", verify=True, ca=self.pki.ca.path)
        self.assertVerificationFailed(*await self.roundtrip(creator, server_tls))

    async def test_malformedSANFailsClosed(self) -> None:
        """
        A certificate from the trusted CA with a malformed DNS SAN (an IP address as a
        dNSName, a bare wildcard) is refused for a name it does not carry. (Twisted
        26.10's optionsForClientTLS accepts it: its callback swallows service-identity's
        CertificateError.)
        """
        for i, bad in enumerate(["127.0.0.1", "*"]):
            cert = self.pki.ca.issue("evil", dns=["evil.example", bad])
            server_tls = ServerTLS(*self.pki.ca.write(cert, f"malformed{i}"))
            for host in ("mail.example.com", "127.0.0.1", "evil.example"):
                creator = client_tls_options(host, verify=True, ca=self.pki.ca.path)
                self.assertVerificationFailed(*await self.roundtrip(creator, server_tls))

    async def test_ipv6Literal(self) -> None:
        """
        An IPv6 literal, with or without brackets, is matched against IP SANs.
        """
        if not _ipv6_loopback():
            raise self.skipTest("no IPv6 loopback")
        for host in ("::1", "[::1]"):
            creator = client_tls_options(host, verify=True, ca=self.pki.ca.path)
            client, server = await self.roundtrip(creator, interface="::1")
            self.assertConnected(client)
            self.assertIsNone(server.server_name)

    async def test_contextShared(self) -> None:
        """
        One creator builds one context and shares it between its connections.
        """
        creator = client_tls_options("localhost", verify=True, ca=self.pki.ca.path)
        unverified = client_tls_options("localhost", verify=False, ca=None)
        port, _ = self.listen(self.pki.server_tls())
        for c in (creator, unverified):
            first = await self.connect(port, c)
            second = await self.connect(port, c)
            self.assertIsNotNone(first.context)
            self.assertIs(first.context, second.context)

    def test_badCAFile(self) -> None:
        """
        A missing or empty CA file is a configuration error naming it.
        """
        missing = self.pki.folder / "missing.pem"
        empty = self.pki.folder / "empty.pem"
        empty.write_bytes(b"")
        for path in (missing, empty):
            error = self.assertRaises(
                TLSConfigError, client_tls_options, "localhost", verify=True, ca=path
            )
            self.assertEqual(error.path, path)
            self.assertIn(str(path), str(error))

    def test_interface(self) -> None:
        """
        Both kinds of creator provide L{IOpenSSLClientConnectionCreator}.
        """
        for verify in (True, False):
            creator = client_tls_options("localhost", verify=verify, ca=self.pki.ca.path)
            verifyObject(IOpenSSLClientConnectionCreator, creator)

    def test_cache(self) -> None:
        """
        L{ClientTLSCache} builds one creator per (hostname, verify, ca).
        """
        cache = ClientTLSCache()
        ca = self.pki.ca.path
        first = cache.get("localhost", verify=True, ca=ca)
        self.assertIs(cache.get("localhost", verify=True, ca=ca), first)
        self.assertIsNot(cache.get("localhost", verify=False, ca=ca), first)
        self.assertIsNot(cache.get("localhost", verify=True, ca=None), first)
        self.assertIsNot(cache.get("127.0.0.1", verify=True, ca=ca), first)


# --------------------------------------------------------------------------------------
# tune_tcp, peer_certificate on plain transports, imports


class HelperTests(_LoopbackMixin, TestCase):
    async def test_nodelayTLS(self) -> None:
        """
        On a L{TLSMemoryBIOProtocol} transport, TCP_NODELAY is set on the TCP socket.
        """
        pki = _PKI(Path(self.mktemp()))
        port, factory = self.listen(pki.server_tls(), make=_NoDelayServer)
        await self.connect(port, _client_creator(pki.ca))
        server = factory.built[0]
        assert isinstance(server, _NoDelayServer)
        self.assertNotEqual(server.nodelay, 0)

    def test_nodelayNotApplicable(self) -> None:
        """
        Transports without TCP (a test transport, None) are left alone.
        """
        tune_tcp(StringTransport())
        tune_tcp(None)
        tune_tcp(object())

    def test_peerCertificatePlain(self) -> None:
        """
        A transport without TLS has no peer certificate.
        """
        self.assertIsNone(peer_certificate(StringTransport()))
        self.assertIsNone(peer_certificate(object()))

    async def test_noReactorImport(self) -> None:
        """
        Importing L{mailgw.tls} does not import (install) the reactor.
        """
        code = (
            "import sys, mailgw.tls; "
            "sys.exit('twisted.internet.reactor' in sys.modules)"
        )
        _, err, status = await getProcessOutputAndValue(
            sys.executable, ["-c", code], env=dict(os.environ), reactor=_reactor()
        )
        self.assertEqual(status, 0, err)
