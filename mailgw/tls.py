"""
The gateway's TLS contexts.

- L{ServerTLS}: the one server-side L{OpenSSL.SSL.Context} the proxies present, built once
  from the C{[tls]} configuration and shared by every connection [4.1], [10].
- L{client_tls_options}: connection creators for upstream mail servers [4.7].
- L{ensure_self_signed}: the self-signed pair generated on first start.
- L{peer_certificate} and L{tune_tcp}: small helpers over TLS and TCP transports.

Nothing here imports the reactor, and nothing keeps module-level state: every object is
created by its caller (normally C{mailgw.service.build}) and lives as long as it keeps it.
All file reading happens at construction time (start-up or reload), never per connection.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    ITCPTransport,
)
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw import systls
from mailgw.eagerwrite import make_eager

if TYPE_CHECKING:
    # Public in Twisted's documentation, importable only from the private module.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "ClientCertificateMode",
    "ClientTLSCache",
    "MinimumVersion",
    "ServerTLS",
    "TLSConfigError",
    "client_tls_options",
    "ensure_self_signed",
    "peer_certificate",
    "tls_failure_text",
    "tune_tcp",
]

MinimumVersion = Literal["TLSv1.2", "TLSv1.3"]
ClientCertificateMode = Literal["none", "optional", "required"]

_PROTOCOL_VERSIONS: dict[str, int] = {
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
_SYSTEM_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_SYSTEM_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

# TLS 1.2 suites: ECDHE key exchange with AEAD ciphers only (Mozilla "intermediate" minus
# DHE, which would need DH parameters). AES-128-GCM first: fastest with AES-NI. Only the
# suites matching the certificate's key type (ECDSA or RSA) are ever selected. TLS 1.3
# suites are OpenSSL's defaults, all AEAD.
_CIPHERS_TLS12 = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# The key types Context.use_privatekey accepts from cryptography.
_ServerKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_SUPPORTED_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_SELF_SIGNED_VALIDITY = timedelta(days=3653)  # 10 years
_CLOCK_SKEW = timedelta(minutes=5)


class TLSConfigError(Exception):
    """
    A TLS file or setting is unusable. The message names the offending file (also in
    C{path}) and never contains key material.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------------------
# Self-signed certificate


def ensure_self_signed(
    cert_path: Path, key_path: Path, hostname: str, *, now: datetime | None = None
) -> bool:
    """
    Generate an ECDSA P-256 key and a self-signed certificate when neither file exists.

    The certificate names C{hostname} and C{localhost} (DNS) and 127.0.0.1 and ::1 (IP),
    and is valid for 10 years from C{now} (default: the current time; this runs once at
    start-up, before the reactor). Missing folders are created with mode 0700. Each file
    is written to a temporary file in its folder (the key with mode 0600 from its
    creation), fsynced, then moved into place without ever replacing an existing file.

    @return: True if the pair was generated, False if both files already existed.
    @raise TLSConfigError: only one of the two files exists (refusing to overwrite it
        with a pair that would not match), or a file could not be written.
    """
    cert_exists, key_exists = cert_path.exists(), key_path.exists()
    if cert_exists and key_exists:
        return False
    if cert_exists != key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise TLSConfigError(
            f"{missing}: missing while {present} exists; not generating a self-signed "
            f"pair that would overwrite it (remove {present} or provide {missing})",
            missing,
        )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        cert = _self_signed_certificate(key, hostname, now or datetime.now(UTC))
    except (ValueError, UnicodeError) as e:
        raise TLSConfigError(
            f"{cert_path}: cannot make a certificate for host name {hostname!r}", cert_path
        ) from e
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # The key goes first: a crash in between leaves a key without a certificate, which
    # the next start reports instead of silently generating a mismatching pair.
    _write_new_file(key_path, key_pem, 0o600)
    _write_new_file(cert_path, cert_pem, 0o644)
    return True


def _self_signed_certificate(
    key: ec.EllipticCurvePrivateKey, hostname: str, now: datetime
) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for name in (hostname, "localhost"):
        general = _general_name(name)
        if general not in names:
            names.append(general)
    for ip in ("127.0.0.1", "::1"):
        general = x509.IPAddress(ipaddress.ip_address(ip))
        if general not in names:
            names.append(general)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """
    Write C{data} to a new file at C{path}, atomically and durably, never replacing an
    existing file.
    """
    folder = path.parent
    try:
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True)
            os.chmod(folder, 0o700)  # whatever the umask
        # mkstemp creates the file with mode 0600, so the key is never readable by others.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot create: {e.strerror}", path) from e
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            _publish(tmp, path)
            _fsync_folder(folder)
        except OSError as e:
            raise TLSConfigError(f"{path}: cannot write: {e.strerror}", path) from e
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path) -> None:
    # A hard link is an atomic rename that refuses to replace an existing file.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise TLSConfigError(
            f"{path}: appeared while generating; not overwritten", path
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # File systems without hard links: a rename, after checking.
        if path.exists():
            raise TLSConfigError(
                f"{path}: appeared while generating; not overwritten", path
            ) from e
        os.rename(tmp, path)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# Server side


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read {what}: {e.strerror}", path) from e


def _load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{path}: no valid PEM certificate ({what})", path) from e


def tls_failure_text(reason: Failure) -> str | None:
    """OpenSSL's reason when C{reason} (a connection's end) is a TLS error of either
    library, else None."""
    error = reason.value
    if isinstance(error, SSL.Error):
        return ssl_error_text(error)
    if isinstance(error, ssl.SSLError):
        return systls.error_text(error)
    return None


def ssl_error_text(error: SSL.Error) -> str:
    # SSL.Error.args[0] is a list of (library, function, reason) tuples.
    parts: list[str] = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            parts.append(str(entry[-1]))
    return "; ".join(parts) or str(error)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    The gateway's server-side TLS configuration: one L{SSL.Context}, built and checked at
    construction, shared by every connection.

    Provides L{IOpenSSLServerConnectionCreator}, so it is what
    C{TLSMemoryBIOFactory(server_tls, False, wrapped)}, C{SSL4ServerEndpoint},
    C{reactor.listenSSL} and a server transport's C{startTLS(server_tls)} expect; each
    connection is C{SSL.Connection(context)} with no further per-connection setup. It
    also provides the older L{IOpenSSLContextFactory} (C{getContext}, the same context).

    The context uses C{TLS_server_method}: handed by mistake to client code it fails the
    handshake instead of connecting without verification.

    Settings: minimum TLS 1.2 (or 1.3), no compression, server cipher preference, no
    renegotiation, ECDHE + AEAD suites for TLS 1.2, ECDHE groups chosen automatically
    (OpenSSL >= 1.1.0 always does, from its defaults: X25519, P-256, ...; nothing calls
    C{set_tmp_ecdh}, which would pin one curve), read/write buffers released
    while a connection is idle (memory per idle session, [10]). Session resumption: the
    server session cache and session tickets (TLS 1.2 and 1.3) are on, with a session id
    context derived from the configuration, which OpenSSL requires to resume sessions
    when client certificates are requested; a resumed session keeps its verified client
    certificate. The ticket key is random per context until the gateway gives the
    context its shared, rotated key (L{mailgw.tlstickets.TicketKeys.use}): then tickets
    resume across reloads and worker processes, not across restarts.

    Client certificates: C{"none"} requests none; C{"optional"} requests one and
    verifies it if sent (an invalid certificate fails the handshake; no certificate is
    fine); C{"required"} also fails the handshake without one. The only trust anchors
    are the certificates in C{client_ca} (the system store is not loaded) and their
    subject names are sent in the CertificateRequest. OpenSSL's own verification result
    decides: there is no Python verify callback that could accept a failed chain. The
    chain must lead to a self-signed certificate in C{client_ca} (no partial chains).

    @ivar options: the C{SSL.OP_*} bitmask set on the context.
    @ivar certificate: the leaf certificate (for logging its subject and expiry).
    """

    def __init__(
        self,
        cert_path: Path,
        key_path: Path,
        *,
        minimum_version: MinimumVersion = "TLSv1.2",
        client_certificate: ClientCertificateMode = "none",
        client_ca: Path | None = None,
    ) -> None:
        """
        @param cert_path: PEM file: the certificate, then any intermediates.
        @param key_path: PEM file: the unencrypted private key of the certificate.
        @raise TLSConfigError: a file is missing, unreadable, not PEM, encrypted, or the
            key does not match the certificate; or a setting is invalid. The message
            names the file.
        """
        if minimum_version not in _PROTOCOL_VERSIONS:
            raise TLSConfigError(
                f"minimum_version: must be TLSv1.2 or TLSv1.3, got {minimum_version!r}"
            )
        if client_certificate not in ("none", "optional", "required"):
            raise TLSConfigError(
                "client_certificate: must be none, optional or required, "
                f"got {client_certificate!r}"
            )
        if client_certificate != "none" and client_ca is None:
            raise TLSConfigError(
                f"client_certificate = {client_certificate!r} needs a client_ca file"
            )
        self.cert_path = cert_path
        self.key_path = key_path
        self.minimum_version: MinimumVersion = minimum_version
        self.client_certificate: ClientCertificateMode = client_certificate
        self.client_ca = client_ca

        chain = _load_certificates(cert_path, "certificate")
        self.certificate: x509.Certificate = chain[0]
        key = self._load_key(key_path)

        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(_PROTOCOL_VERSIONS[minimum_version])
        self.options: int = ctx.set_options(
            SSL.OP_NO_COMPRESSION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
            | SSL.OP_NO_RENEGOTIATION
        )
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_cipher_list(_CIPHERS_TLS12)
        try:
            ctx.use_certificate_chain_file(os.fsencode(cert_path))
        except SSL.Error as e:
            raise TLSConfigError(
                f"{cert_path}: cannot use the certificate chain: {ssl_error_text(e)}",
                cert_path,
            ) from e
        try:
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except SSL.Error as e:
            raise TLSConfigError(
                f"{key_path}: the private key does not match the certificate in "
                f"{cert_path}",
                key_path,
            ) from e

        fingerprint = hashlib.sha256(b"mailgw-session-id-context")
        for cert in chain:
            fingerprint.update(cert.fingerprint(hashes.SHA256()))
        fingerprint.update(client_certificate.encode("ascii"))
        if client_ca is not None:
            cas = _load_certificates(client_ca, "client CA")
            for ca in cas:
                fingerprint.update(ca.fingerprint(hashes.SHA256()))
            try:
                ctx.load_verify_locations(os.fsencode(client_ca))
            except SSL.Error as e:
                raise TLSConfigError(
                    f"{client_ca}: cannot load the client CAs: {ssl_error_text(e)}",
                    client_ca,
                ) from e
            for ca in cas:
                ctx.add_client_ca(ca)
        if client_certificate == "required":
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        elif client_certificate == "optional":
            ctx.set_verify(SSL.VERIFY_PEER)
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        # At most 32 bytes (SSL_MAX_SID_CTX_LENGTH); a SHA-256 digest is exactly that.
        ctx.set_session_id(fingerprint.digest())
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        self._context = ctx
        #: the same settings on the system's OpenSSL, for the implicit-TLS listeners
        #: (L{mailgw.systls}); None when that library cannot be reached, and why
        self.system_context: ssl.SSLContext | None = None
        library = systls.LibSSL.load()
        self.system_problem: str | None = library if isinstance(library, str) else None
        if self.system_problem is not None:
            return
        try:
            self.system_context = systls.server_context(
                cert_path,
                key_path,
                minimum_version=_SYSTEM_VERSIONS[minimum_version],
                verify_mode=_SYSTEM_VERIFY[client_certificate],
                client_ca=client_ca,
                ciphers=_CIPHERS_TLS12.decode("ascii"),
                session_id_context=fingerprint.digest(),
            )
        except systls.SystemTLSError as e:
            raise TLSConfigError(f"{cert_path}: {e}", cert_path) from e

    @staticmethod
    def _load_key(key_path: Path) -> _ServerKey:
        # Loaded with cryptography, not use_privatekey_file: an encrypted key would make
        # OpenSSL prompt for a passphrase on the terminal.
        data = _read(key_path, "private key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as e:
            raise TLSConfigError(
                f"{key_path}: encrypted private keys are not supported", key_path
            ) from e
        except ValueError as e:
            raise TLSConfigError(
                f"{key_path}: not a valid PEM private key", key_path
            ) from e
        if not isinstance(key, _SUPPORTED_KEYS):
            raise TLSConfigError(
                f"{key_path}: unsupported private key type {type(key).__name__}", key_path
            )
        return key

    def getContext(self) -> SSL.Context:
        """
        The shared context (L{IOpenSSLContextFactory}).
        """
        return self._context

    def serverConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        A new connection on the shared context (L{IOpenSSLServerConnectionCreator}).
        """
        return SSL.Connection(self._context, None)


def peer_certificate(transport: object) -> x509.Certificate | None:
    """
    The verified certificate of the peer of a TLS transport, or None.

    Works on a L{TLSMemoryBIOProtocol} (what a protocol behind C{TLSMemoryBIOFactory},
    C{SSL4ServerEndpoint} or C{wrapClientTLS} gets as its transport), on a TCP transport
    after C{startTLS}, and on wrappers forwarding C{getHandle}. Returns None for a
    plaintext transport, before the handshake, when no certificate was sent, and when
    the connection does not verify its peer (C{VERIFY_NONE}: L{ServerTLS} with
    C{client_certificate = "none"}, L{client_tls_options} with C{verify=False}). With
    C{VERIFY_PEER} and no verify callback accepting failures (L{ServerTLS},
    L{client_tls_options}), a certificate present after the handshake was verified.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    handle = get_handle()
    if isinstance(handle, ssl.SSLObject):  # an implicit-TLS listener's (mailgw.systls)
        if handle.context.verify_mode == ssl.CERT_NONE:
            return None
        der = handle.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    if not isinstance(handle, SSL.Connection):
        return None
    if not handle.get_verify_mode() & SSL.VERIFY_PEER:
        return None
    return handle.get_peer_certificate(as_cryptography=True)


# --------------------------------------------------------------------------------------
# Client side (upstream mail servers)


def _trust_root_from_file(ca: Path) -> IOpenSSLTrustRoot:
    # Twisted's certificate helpers are unannotated; these names give them types.
    make_certificate: Callable[[X509], Certificate] = Certificate
    make_trust_root: Callable[[list[Certificate]], IOpenSSLTrustRoot] = (
        trustRootFromCertificates
    )
    return make_trust_root(
        [make_certificate(X509.from_cryptography(c)) for c in _load_certificates(ca, "CA")]
    )


def _platform_trust() -> IOpenSSLTrustRoot:
    make_trust_root: Callable[[], IOpenSSLTrustRoot] = platformTrust
    return make_trust_root()


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """
    Encryption without authentication: any server certificate is accepted.

    INSECURE: anyone on the path can impersonate the server and read the traffic,
    passwords included. For upstream servers with verify_certificate = false only.
    """

    def __init__(self, hostname: str) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_verify(SSL.VERIFY_NONE)
        self._context = ctx
        # SNI for DNS names only (RFC 6066 forbids IP literals), like optionsForClientTLS.
        self._server_name = (
            None if _is_ip_literal(hostname) else hostname.encode("idna")
        )

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _VerifiedClientTLS:
    """
    C{optionsForClientTLS} with a fail-closed name check.

    The context, trust root, SNI and chain verification are Twisted's. Its name check
    is replaced: in Twisted 26.10 the verify callback of C{optionsForClientTLS} logs
    any exception other than C{VerificationError} and then I{accepts} the certificate,
    so a certificate from a trusted CA carrying one malformed DNS SAN (an IP address
    written as a dNSName, a bare C{*}, ...), on which service-identity raises
    C{CertificateError}, passes for any host name. Here both refuse the certificate, and
    anything else raised propagates, which pyOpenSSL turns into a failed handshake.
    """

    def __init__(self, hostname: str, trust_root: IOpenSSLTrustRoot) -> None:
        self._hostname = hostname
        self._is_ip = _is_ip_literal(hostname)
        self._inner = optionsForClientTLS(hostname, trust_root)

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tls_protocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._callback(tls_protocol)
        )
        return connection

    def _callback(
        self, tls_protocol: TLSMemoryBIOProtocol
    ) -> Callable[[SSL.Connection, X509, int, int, int], bool]:
        # The protocol reference is dropped once used, so that the connection (which
        # holds this callback) does not keep its protocol alive.
        holder: list[TLSMemoryBIOProtocol] = [tls_protocol]

        def verify(
            connection: SSL.Connection, cert: X509, error: int, depth: int, ok: int
        ) -> bool:
            if not ok:
                return False  # the chain failed: OpenSSL reports why
            if depth != 0:
                return True  # the name is checked on the leaf only
            try:
                if self._is_ip:
                    verify_certificate_ip_address(cert.to_cryptography(), self._hostname)
                else:
                    verify_certificate_hostname(cert.to_cryptography(), self._hostname)
            except (VerificationError, CertificateError):
                if holder:
                    # Twisted's methods are unannotated; typed names for them.
                    fail: Callable[[Failure], None] = holder.pop().failVerification
                    current_failure: Callable[[], Failure] = Failure
                    fail(current_failure())
                return False
            holder.clear()
            return True

        return verify


def _is_ip_literal(hostname: str) -> bool:
    return bool(isIPAddress(hostname) or isIPv6Address(hostname))


def client_tls_options(
    hostname: str, *, verify: bool, ca: Path | None
) -> IOpenSSLClientConnectionCreator:
    """
    A connection creator for an upstream mail server, for C{wrapClientTLS},
    C{transport.startTLS} or C{TLSMemoryBIOFactory(creator, True, wrapped)}.

    With C{verify}: C{optionsForClientTLS(hostname, trustRoot)}, whose trust root is
    every certificate in the PEM file C{ca}, or the platform's store when C{ca} is None;
    service-identity checks the name, failing closed (see L{_VerifiedClientTLS}). A
    DNS name is matched against the certificate's DNS SANs and sent as SNI. An IPv4 or
    IPv6 literal (brackets allowed) is matched against its IP-address SANs only (not
    DNS SANs, not the CN) and is not sent as SNI (RFC 6066), as Twisted 26.10's
    C{optionsForClientTLS} does.

    Without C{verify}: encrypted, but B{no verification at all} — INSECURE against an
    active attacker; only for mail servers whose certificate cannot be checked.

    Each call builds a new creator whose single L{SSL.Context} is made on its first
    connection and then shared by all of its connections (optionsForClientTLS caches
    it inside the L{CertificateOptions} it creates). Building one reads C{ca}, so
    callers keep them: see L{ClientTLSCache}.

    @raise TLSConfigError: C{ca} is unreadable or holds no certificate, or C{hostname}
        is not a valid host name.
    """
    if hostname.startswith("[") and hostname.endswith("]"):
        hostname = hostname[1:-1]
    if not hostname:
        raise TLSConfigError("upstream TLS: empty host name")
    try:
        if not verify:
            return _UnverifiedClientTLS(hostname)  # type: ignore[return-value, unused-ignore]
        trust_root = _platform_trust() if ca is None else _trust_root_from_file(ca)
        return _VerifiedClientTLS(hostname, trust_root)  # type: ignore[return-value, unused-ignore]
    except UnicodeError as e:
        raise TLSConfigError(f"upstream TLS: invalid host name {hostname!r}") from e


class ClientTLSCache:
    """
    Upstream connection creators, one per (hostname, verify, ca), built on first use.

    Owned by whoever connects upstream (one per configuration; a reload makes a new one,
    which re-reads the CA files). Callers pass the server name as configured (never as a
    client spelled it), so the entries are bounded by the configured servers; the cache
    is bounded all the same (least recently used dropped beyond C{max_entries}), since
    a creator with the system trust store costs about a megabyte.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._max = max_entries
        self._creators: OrderedDict[
            tuple[str, bool, Path | None], IOpenSSLClientConnectionCreator
        ] = OrderedDict()

    def __len__(self) -> int:
        return len(self._creators)

    def get(
        self, hostname: str, *, verify: bool, ca: Path | None
    ) -> IOpenSSLClientConnectionCreator:
        key = (hostname, verify, ca)
        creator = self._creators.get(key)
        if creator is None:
            creator = client_tls_options(hostname, verify=verify, ca=ca)
            self._creators[key] = creator
            while len(self._creators) > self._max:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end(key)
        return creator


# --------------------------------------------------------------------------------------
# TCP_NODELAY


def tune_tcp(transport: object) -> None:
    """
    Turn Nagle's algorithm off on the TCP connection under C{transport} [10], and give
    it eager writes (L{mailgw.eagerwrite}: sent at once when nothing is queued).

    Works on a TCP transport (before or after C{startTLS}) and on a
    L{TLSMemoryBIOProtocol} or another protocol wrapper over one: wrappers are followed
    down their C{transport} attribute to the TCP transport. Does nothing on other
    transports (UNIX sockets, test transports) or on a connection already closed.
    """
    current: object | None = transport
    for _ in range(_MAX_WRAPPERS):
        if current is None:
            return
        # Protocol wrappers claim their transport's interfaces (ProtocolWrapper copies
        # them), so skip past them to the real TCP connection.
        if ITCPTransport.providedBy(current) and not isinstance(current, ProtocolWrapper):
            try:
                current.setTcpNoDelay(True)  # type: ignore[attr-defined, unused-ignore]
            except OSError:
                return  # the socket is already closed
            make_eager(current)
            return
        current = getattr(current, "transport", None)


_MAX_WRAPPERS = 8
