"""Client certificate → VPN username: the DN-field mapping of SPEC [4.3] and [5.3].

Pure: a verified :class:`cryptography.x509.Certificate` in, a :class:`CertificateIdentity`
out, or :class:`CertificateRejected` with a reason for the log.  Verifying the chain
against ``tls.client_ca`` is the TLS layer's business and happens before this is called.

``entire-dn``
    The subject DN as an RFC 4514 string: **most specific RDN first**
    (``CN=alice,OU=Sales,O=Corp,C=US`` for a certificate encoded ``C=US, O=Corp, OU=Sales,
    CN=alice``).  SPEC [5.3] asks for the RFC 4514 string, and it is the form administrators
    meet everywhere else: LDAP DNs, nginx's ``$ssl_client_s_dn``, Apache's
    ``SSL_CLIENT_S_DN``, ``openssl x509 -nameopt RFC2253``, Java's ``getName()``.  So a
    username can be pasted from those into a users file or compared with a directory entry.
    Attribute types are named as OpenSSL's RFC 2253 output names them (``emailAddress``,
    ``GN``, ``SN``, ``title``, ``serialNumber``, ``initials``, ``generationQualifier``,
    ``dnQualifier``, ``name``; ``C``, ``CN``, ``L``, ``ST``, ``O``, ``OU``, ``UID``, ``DC``,
    ``STREET`` as RFC 4514 has them), other types as dotted OIDs.  Special characters are
    escaped as RFC 4514 requires (``,`` ``+`` ``"`` ``\\`` ``<`` ``>`` ``;``, a leading
    ``#`` or space, a trailing space); non-ASCII characters stay as they are (OpenSSL would
    write them as ``\\XX`` hex escapes).  The secondary field plays no part: the identity's
    ``secondary`` is ``None``.

``dn-fields``
    The primary field's value is the username; unless the secondary field is ``"none"``,
    the certificate must carry that field too and its value becomes ``secondary`` (for
    ``{secondary}`` in an LDAP ``user_filter``).  Missing either: refused, naming the field.

A field that occurs several times (two ``OU`` RDNs, two UPNs) gives its **first value in
the certificate's encoding order**, as Cisco's ASA does and as OpenSSL's
``X509_NAME_get_index_by_NID`` (Dovecot's ``ssl_cert_username_field``) does.  For the
subject, encoding order is most significant first, the reverse of the RFC 4514 string: of
``C=US, O=Corp, OU=Sales, OU=EMEA, CN=alice`` the OU is ``Sales``.  Only the first value is
considered: if it is unusable the certificate is refused, later values are not tried.

``EA`` is the subject's ``emailAddress``; only when the subject has none is the first
``rfc822Name`` of the subjectAltName used.  ``UPN`` is the first subjectAltName ``otherName``
of type 1.3.6.1.4.1.311.20.2.3, which must be a DER ``UTF8String``.

A value that is empty, or that holds a control character (C0 including CR, LF, NUL and TAB;
DEL; C1), a line or paragraph separator (U+2028, U+2029) or a lone surrogate is refused:
the username ends up in LDAP filters, RADIUS attributes and log lines.  A reason names the
field and what is wrong with it, never the value.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import ObjectIdentifier

__all__ = [
    "DN_FIELDS_MODE",
    "ENTIRE_DN_MODE",
    "FIELD_NAMES",
    "NO_SECONDARY",
    "CertificateIdentity",
    "CertificateRejected",
    "identity_from_certificate",
]

ENTIRE_DN_MODE = "entire-dn"
DN_FIELDS_MODE = "dn-fields"
#: ``secondary_dn_field`` value meaning "no secondary field".
NO_SECONDARY = "none"

_EMAIL_ADDRESS = ObjectIdentifier("1.2.840.113549.1.9.1")
_UPN = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

# Field name → subject attribute type.  Dotted OIDs rather than NameOID constants, some
# of which (INITIALS) are younger than the cryptography release setup.cfg allows.
_SUBJECT_FIELDS: dict[str, ObjectIdentifier] = {
    "C": ObjectIdentifier("2.5.4.6"),
    "CN": ObjectIdentifier("2.5.4.3"),
    "DNQ": ObjectIdentifier("2.5.4.46"),
    "EA": _EMAIL_ADDRESS,
    "GENQ": ObjectIdentifier("2.5.4.44"),
    "GN": ObjectIdentifier("2.5.4.42"),
    "I": ObjectIdentifier("2.5.4.43"),
    "L": ObjectIdentifier("2.5.4.7"),
    "N": ObjectIdentifier("2.5.4.41"),
    "O": ObjectIdentifier("2.5.4.10"),
    "OU": ObjectIdentifier("2.5.4.11"),
    "SER": ObjectIdentifier("2.5.4.5"),
    "SN": ObjectIdentifier("2.5.4.4"),
    "SP": ObjectIdentifier("2.5.4.8"),
    "T": ObjectIdentifier("2.5.4.12"),
    "UID": ObjectIdentifier("0.9.2342.19200300.100.1.1"),
}

#: The DN field names ``primary_dn_field`` and ``secondary_dn_field`` may name.
FIELD_NAMES: frozenset[str] = frozenset({*_SUBJECT_FIELDS, "UPN"})

# Names for the entire-dn string beyond the ones cryptography already uses (C, CN, L, ST,
# O, OU, UID, DC, STREET): OpenSSL's, so the string matches `-nameopt RFC2253` and nginx.
_DN_ATTRIBUTE_NAMES: dict[ObjectIdentifier, str] = {
    _EMAIL_ADDRESS: "emailAddress",
    _SUBJECT_FIELDS["GN"]: "GN",
    _SUBJECT_FIELDS["SN"]: "SN",
    _SUBJECT_FIELDS["T"]: "title",
    _SUBJECT_FIELDS["SER"]: "serialNumber",
    _SUBJECT_FIELDS["I"]: "initials",
    _SUBJECT_FIELDS["GENQ"]: "generationQualifier",
    _SUBJECT_FIELDS["DNQ"]: "dnQualifier",
    _SUBJECT_FIELDS["N"]: "name",
}

_FIELD_BY_OID = {oid: name for name, oid in _SUBJECT_FIELDS.items()}

# Unicode categories refused in a value: controls (C0, DEL, C1), surrogates, and the
# line and paragraph separators, which some log readers treat as line breaks.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})

_UTF8_STRING_TAG = 0x0C


@dataclass(frozen=True)
class CertificateIdentity:
    """The VPN identity a client certificate maps to.

    ``secondary`` is the secondary DN field's value (SPEC [5.3]), or ``None`` when no
    secondary field is configured or the mode is ``entire-dn``.
    """

    username: str
    secondary: str | None


class CertificateRejected(Exception):
    """The certificate does not give a usable identity.

    ``reason`` is for the log: it names the field and the problem, never a value, a key
    or any other certificate material.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def identity_from_certificate(
    cert: x509.Certificate,
    *,
    mode: str,
    primary: str,
    secondary: str,
) -> CertificateIdentity:
    """Map a client certificate to a VPN identity as ``[*.authorization]`` configures.

    ``mode`` is ``"entire-dn"`` or ``"dn-fields"``; ``primary`` one of :data:`FIELD_NAMES`;
    ``secondary`` one of them or ``"none"``.  The configuration has validated these, so
    anything else is a programming error and raises :class:`ValueError`.

    :raises CertificateRejected: the certificate lacks a configured field, or a value is
        empty, holds a control character, or is malformed.
    """
    if mode not in (ENTIRE_DN_MODE, DN_FIELDS_MODE):
        raise ValueError(f"unknown username_from_certificate mode {mode!r}")
    if primary not in FIELD_NAMES:
        raise ValueError(f"unknown primary DN field {primary!r}")
    if secondary != NO_SECONDARY and secondary not in FIELD_NAMES:
        raise ValueError(f"unknown secondary DN field {secondary!r}")

    if mode == ENTIRE_DN_MODE:
        return CertificateIdentity(_entire_dn(cert), None)
    username = _field_value(cert, primary)
    second = None if secondary == NO_SECONDARY else _field_value(cert, secondary)
    return CertificateIdentity(username, second)


def _entire_dn(cert: x509.Certificate) -> str:
    subject = _subject(cert)
    if len(subject) == 0:
        raise CertificateRejected("certificate subject DN is empty")
    for attribute in subject:
        # Byte values (a BIT STRING x500UniqueIdentifier) are written as #hex: harmless.
        if isinstance(attribute.value, str):
            label = _FIELD_BY_OID.get(attribute.oid, attribute.oid.dotted_string)
            _checked(f"subject attribute {label}", attribute.value)
    return subject.rfc4514_string(_DN_ATTRIBUTE_NAMES)


def _field_value(cert: x509.Certificate, field: str) -> str:
    if field == "UPN":
        return _upn(cert)
    values = _subject(cert).get_attributes_for_oid(_SUBJECT_FIELDS[field])
    if values:
        return _checked(field, values[0].value)
    if field == "EA":
        san = _subject_alt_name(cert)
        if san is not None:
            addresses = san.get_values_for_type(x509.RFC822Name)
            if addresses:
                return _checked("EA (subjectAltName rfc822Name)", addresses[0])
    raise CertificateRejected(f"certificate has no {field} field")


def _upn(cert: x509.Certificate) -> str:
    san = _subject_alt_name(cert)
    if san is not None:
        for other_name in san.get_values_for_type(x509.OtherName):
            if other_name.type_id == _UPN:
                return _checked("UPN", _der_utf8_string(other_name.value))
    raise CertificateRejected("certificate has no UPN field")


def _subject(cert: x509.Certificate) -> x509.Name:
    try:
        return cert.subject
    except (ValueError, TypeError) as e:
        # cryptography decodes the subject lazily and raises ValueError for a malformed
        # string, TypeError for a BIT STRING where a character string belongs.
        raise CertificateRejected("certificate subject DN is malformed") from e


def _subject_alt_name(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise CertificateRejected("certificate extensions are malformed") from e


def _der_utf8_string(der: bytes) -> str:
    """Decode one DER UTF8String (definite, minimal length; nothing after it)."""
    if len(der) < 2:
        raise CertificateRejected("UPN is truncated")
    if der[0] != _UTF8_STRING_TAG:
        raise CertificateRejected(f"UPN is not a UTF8String (tag 0x{der[0]:02x})")
    length = der[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0:
            raise CertificateRejected("UPN has an indefinite length (not DER)")
        if count > 4 or len(der) < offset + count:
            raise CertificateRejected("UPN length is malformed")
        length = int.from_bytes(der[offset : offset + count], "big")
        if der[offset] == 0 or length < 0x80:
            raise CertificateRejected("UPN length is not minimally encoded (not DER)")
        offset += count
    if len(der) - offset != length:
        raise CertificateRejected("UPN length does not match its encoding")
    try:
        return der[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise CertificateRejected("UPN is not valid UTF-8") from e


def _checked(field: str, value: str | bytes) -> str:
    """Return ``value`` if it is a usable username or secondary value, else refuse it."""
    if not isinstance(value, str):
        raise CertificateRejected(f"{field} is not a character string")
    if not value:
        raise CertificateRejected(f"{field} is empty")
    if any(unicodedata.category(char) in _REFUSED_CATEGORIES for char in value):
        raise CertificateRejected(f"{field} contains a control character")
    return value
