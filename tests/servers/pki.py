"""A throw-away PKI for tests, made with ``cryptography`` (ECDSA P-256: fast).

::

    pki = TestPKI(directory)
    cert, key = pki.server_cert()                  # localhost + 127.0.0.1
    client = pki.client_cert("alice", email="alice@example.com", upn="alice@corp.example")
    pki.ca_path                                    # trust anchor for clients
    pki.other_ca.server_cert()                     # signed by an unrelated CA ("wrong CA")
    TestPKI.combined_pem(*client)                  # one file with certificate + key

All files are PEM.  Keys are unencrypted PKCS#8 files of mode ``key_mode`` (0600 by
default; pass 0o644 when a server that drops privileges must read them).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = ["UPN_OID", "CertificateAuthority", "TestPKI"]

#: Microsoft User Principal Name, the otherName used by smart-card / AD client certs.
UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

_ONE_DAY = datetime.timedelta(days=1)


def _der_utf8_string(value: str) -> bytes:
    """DER encoding of an ASN.1 UTF8String (the value of a UPN otherName)."""
    data = value.encode("utf-8")
    if len(data) < 0x80:
        length = bytes([len(data)])
    else:
        octets = len(data).to_bytes((len(data).bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return b"\x0c" + length + data


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN when ``name`` parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "cert"


class CertificateAuthority:
    """A self-signed CA in ``directory`` that issues server and client certificates.

    Attributes: ``cert_path``, ``key_path`` (PEM file paths, ``str``), ``certificate``,
    ``private_key``, ``directory``, ``name``.  Issued files are named
    ``<name>-<server|client>-<cn>.{crt,key}.pem`` unless ``file_name`` is given.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        name: str = "ca",
        *,
        common_name: str = "mailgw test CA",
        key_mode: int = 0o600,
        valid_days: int = 3650,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key_mode = key_mode
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailgw tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        public_key = self.private_key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + valid_days * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.private_key, hashes.SHA256())
        )
        self.cert_path, self.key_path = self._write(name, self.certificate, self.private_key)

    # -- issuing -------------------------------------------------------------------------

    def server_cert(
        self,
        names: Sequence[str] = ("localhost", "127.0.0.1"),
        *,
        common_name: str | None = None,
        file_name: str | None = None,
        valid_days: int = 30,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[str, str]:
        """A TLS server certificate for ``names`` (DNS or IP SANs); ``(cert_path, key_path)``.

        ``not_before``/``not_after`` override the validity (e.g. an expired certificate).
        """
        if not names:
            raise ValueError("a server certificate needs at least one name")
        cn = common_name or names[0]
        return self._issue(
            file_name or f"server-{_file_stem(cn)}",
            [x509.NameAttribute(NameOID.COMMON_NAME, cn)],
            [_general_name(name) for name in names],
            ExtendedKeyUsageOID.SERVER_AUTH,
            valid_days,
            not_before,
            not_after,
        )

    def client_cert(
        self,
        common_name: str,
        *,
        email: str | None = None,
        organization: str | None = None,
        organizational_unit: str | None = None,
        country: str | None = None,
        extra_attributes: Iterable[tuple[ObjectIdentifier, str]] = (),
        san_emails: Iterable[str] = (),
        san_dns: Iterable[str] = (),
        upn: str | None = None,
        file_name: str | None = None,
        valid_days: int = 30,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[str, str]:
        """A TLS client certificate; ``(cert_path, key_path)``.

        The subject is ``C, O, OU, CN, emailAddress`` (those given) plus
        ``extra_attributes``.  ``email`` also goes into the subjectAltName as an
        rfc822Name (with ``san_emails``); ``upn`` adds a Microsoft UPN otherName.
        """
        attributes: list[x509.NameAttribute[str]] = []
        if country is not None:
            attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
        if organization is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        if organizational_unit is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit))
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        if email is not None:
            attributes.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
        attributes.extend(x509.NameAttribute(oid, value) for oid, value in extra_attributes)
        alt_names: list[x509.GeneralName] = []
        emails = ([email] if email is not None else []) + list(san_emails)
        alt_names.extend(x509.RFC822Name(address) for address in emails)
        alt_names.extend(x509.DNSName(name) for name in san_dns)
        if upn is not None:
            alt_names.append(x509.OtherName(UPN_OID, _der_utf8_string(upn)))
        return self._issue(
            file_name or f"client-{_file_stem(common_name)}",
            attributes,
            alt_names,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            valid_days,
            not_before,
            not_after,
        )

    def _issue(
        self,
        file_name: str,
        subject: list[x509.NameAttribute[str]],
        alt_names: list[x509.GeneralName],
        usage: ObjectIdentifier,
        valid_days: int,
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
    ) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start = not_before or now - _ONE_DAY
        end = not_after or now + valid_days * _ONE_DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
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
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self.private_key, hashes.SHA256())
        return self._write(f"{self.name}-{file_name}", certificate, key)

    def _write(self, stem: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
        cert_path = self.directory / f"{stem}.crt.pem"
        key_path = self.directory / f"{stem}.key.pem"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.key_mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key_bytes)
        os.chmod(key_path, self.key_mode)
        return str(cert_path), str(key_path)


class TestPKI(CertificateAuthority):
    """The test PKI of one test: its CA (this object) and, on demand, an unrelated one.

    ``server_cert``/``client_cert`` (inherited) issue from the main CA.  Attributes:
    ``ca_path``/``ca_key_path`` (= ``cert_path``/``key_path``), ``other_ca`` (an
    unrelated :class:`CertificateAuthority`, made on first use, for "wrong CA" tests),
    ``directory``.
    """

    __test__ = False  # not a test class, whatever a collector thinks of the name

    def __init__(self, directory: str | os.PathLike[str], *, key_mode: int = 0o600) -> None:
        super().__init__(directory, "ca", key_mode=key_mode)
        self._other_ca: CertificateAuthority | None = None

    @property
    def ca_path(self) -> str:
        return self.cert_path

    @property
    def ca_key_path(self) -> str:
        return self.key_path

    @property
    def other_ca(self) -> CertificateAuthority:
        if self._other_ca is None:
            self._other_ca = CertificateAuthority(
                self.directory,
                "other-ca",
                common_name="unrelated test CA",
                key_mode=self.key_mode,
            )
        return self._other_ca

    @staticmethod
    def combined_pem(
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        out_path: str | os.PathLike[str] | None = None,
    ) -> str:
        """Write certificate then key into one PEM file (default: ``<cert>.combined.pem``)."""
        cert = Path(cert_path)
        if out_path is not None:
            target = Path(out_path)
        else:
            target = cert.with_name(cert.name.removesuffix(".crt.pem") + ".combined.pem")
        data = cert.read_bytes() + Path(key_path).read_bytes()
        mode = Path(key_path).stat().st_mode & 0o777
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(target, mode)
        return str(target)
