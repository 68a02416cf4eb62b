"""Tests for :mod:`mailgw.auth.certificate` (SPEC [4.3], [5.3])."""

from __future__ import annotations

import ast
import datetime
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import NameAttribute, ObjectIdentifier
from cryptography.x509.name import _ASN1Type
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

import mailgw.auth.certificate
from mailgw.auth.certificate import (
    FIELD_NAMES,
    CertificateIdentity,
    CertificateRejected,
    _der_utf8_string,
    identity_from_certificate,
)
from mailgw.config import DN_FIELDS

# One key for the whole module: generating is the slow part, and the mapping never looks
# at keys or signatures.
_KEY = ec.generate_private_key(ec.SECP256R1())

C = ObjectIdentifier("2.5.4.6")
CN = ObjectIdentifier("2.5.4.3")
DNQ = ObjectIdentifier("2.5.4.46")
EMAIL = ObjectIdentifier("1.2.840.113549.1.9.1")
GENQ = ObjectIdentifier("2.5.4.44")
GN = ObjectIdentifier("2.5.4.42")
INITIALS = ObjectIdentifier("2.5.4.43")
L = ObjectIdentifier("2.5.4.7")
NAME = ObjectIdentifier("2.5.4.41")
O = ObjectIdentifier("2.5.4.10")  # noqa: E741
OU = ObjectIdentifier("2.5.4.11")
SERIAL = ObjectIdentifier("2.5.4.5")
SN = ObjectIdentifier("2.5.4.4")
ST = ObjectIdentifier("2.5.4.8")
TITLE = ObjectIdentifier("2.5.4.12")
UID = ObjectIdentifier("0.9.2342.19200300.100.1.1")
UNIQUE_ID = ObjectIdentifier("2.5.4.45")
UPN = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

#: Field name → attribute type, for the subject fields.
SUBJECT_OIDS = {
    "C": C, "CN": CN, "DNQ": DNQ, "EA": EMAIL, "GENQ": GENQ, "GN": GN, "I": INITIALS,
    "L": L, "N": NAME, "O": O, "OU": OU, "SER": SERIAL, "SN": SN, "SP": ST, "T": TITLE,
    "UID": UID,
}  # fmt: skip


def certificate(
    subject: list[NameAttribute[Any]] | x509.Name,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A certificate for ``subject``, through DER as a client would send it."""
    name = subject if isinstance(subject, x509.Name) else x509.Name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([NameAttribute(CN, "mailgw test CA")]))
        .public_key(_KEY.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return x509.load_der_x509_certificate(builder.sign(_KEY, hashes.SHA256()).public_bytes(Encoding.DER))


def upn(value: str) -> x509.OtherName:
    """A UPN otherName holding ``value`` as a DER UTF8String."""
    encoded = value.encode("utf-8")
    return x509.OtherName(UPN, b"\x0c" + der_length(len(encoded)) + encoded)


_UPN_TYPE_ID = bytes.fromhex("060a2b060104018237140203")


def with_upn_bytes(
    subject: list[NameAttribute[Any]], raw: bytes, san: Sequence[x509.GeneralName] = ()
) -> x509.Certificate:
    """A certificate whose UPN otherName holds ``raw`` (2 to 127 octets) verbatim, DER or not.

    The builder only takes well-formed DER, so a placeholder of the same size is patched.
    Any ``san`` names follow the UPN.
    """
    assert 2 <= len(raw) < 128
    placeholder = b"\x0c" + bytes([len(raw) - 2]) + b"P" * (len(raw) - 2)
    der = certificate(subject, san=[x509.OtherName(UPN, placeholder), *san]).public_bytes(Encoding.DER)
    start = der.index(_UPN_TYPE_ID + b"\xa0") + len(_UPN_TYPE_ID) + 2
    assert der[start : start + len(raw)] == placeholder
    return x509.load_der_x509_certificate(der[:start] + raw + der[start + len(raw) :])


def der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def fields(cert: x509.Certificate, primary: str, secondary: str = "none") -> CertificateIdentity:
    return identity_from_certificate(cert, mode="dn-fields", primary=primary, secondary=secondary)


def entire_dn(cert: x509.Certificate) -> str:
    identity = identity_from_certificate(cert, mode="entire-dn", primary="CN", secondary="OU")
    assert identity.secondary is None
    return identity.username


ALICE = [
    NameAttribute(C, "US"),
    NameAttribute(O, "Example Corp"),
    NameAttribute(OU, "Sales"),
    NameAttribute(CN, "alice"),
    NameAttribute(EMAIL, "alice@example.com"),
]


class FieldNamesTests(SynchronousTestCase):
    def test_fieldNames(self) -> None:
        """FIELD_NAMES holds exactly the seventeen fields of SPEC [5.3]."""
        self.assertEqual(
            FIELD_NAMES,
            {"C", "CN", "DNQ", "EA", "GENQ", "GN", "I", "L", "N", "O", "OU", "SER", "SN", "SP", "T", "UID", "UPN"},
        )

    def test_sameAsConfig(self) -> None:
        """The configuration accepts exactly the fields the mapping supports."""
        self.assertEqual(FIELD_NAMES, frozenset(DN_FIELDS))

    def test_pure(self) -> None:
        """The module imports nothing from Twisted (no reactor, no I/O)."""
        tree = ast.parse(Path(mailgw.auth.certificate.__file__).read_text(encoding="utf-8"))
        modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        self.assertEqual([name for name in modules if name.startswith("twisted")], [])

    def test_badArguments(self) -> None:
        """Arguments the configuration would have refused are programming errors."""
        cert = certificate(ALICE)
        self.assertRaises(ValueError, identity_from_certificate, cert, mode="dn", primary="CN", secondary="OU")
        self.assertRaises(ValueError, fields, cert, "XX")
        self.assertRaises(ValueError, fields, cert, "CN", "cn")
        self.assertRaises(ValueError, identity_from_certificate, cert, mode="entire-dn", primary="CN", secondary="")


class DnFieldsTests(SynchronousTestCase):
    def test_commonName(self) -> None:
        """CN gives the subject's common name."""
        self.assertEqual(fields(certificate(ALICE), "CN"), CertificateIdentity("alice", None))

    def test_organizationalUnit(self) -> None:
        """OU gives the subject's organizational unit."""
        self.assertEqual(fields(certificate(ALICE), "OU").username, "Sales")

    def test_userId(self) -> None:
        """UID gives the subject's userId (0.9.2342.19200300.100.1.1)."""
        cert = certificate([NameAttribute(CN, "Alice Smith"), NameAttribute(UID, "asmith")])
        self.assertEqual(fields(cert, "UID").username, "asmith")

    def test_emailAddressInSubject(self) -> None:
        """EA gives the subject's emailAddress attribute."""
        self.assertEqual(fields(certificate(ALICE), "EA").username, "alice@example.com")

    def test_emailAddressFromSubjectAltName(self) -> None:
        """Without an emailAddress in the subject, EA falls back to the SAN's rfc822Name."""
        cert = certificate(
            [NameAttribute(CN, "alice")],
            san=[x509.DNSName("alice.example.com"), x509.RFC822Name("alice@example.org")],
        )
        self.assertEqual(fields(cert, "EA").username, "alice@example.org")

    def test_emailAddressSubjectFirst(self) -> None:
        """A subject emailAddress wins over a SAN rfc822Name."""
        cert = certificate(ALICE, san=[x509.RFC822Name("other@example.org")])
        self.assertEqual(fields(cert, "EA").username, "alice@example.com")

    def test_emailAddressMissing(self) -> None:
        """EA is missing when neither the subject nor a SAN rfc822Name carries one."""
        cert = certificate([NameAttribute(CN, "alice")], san=[x509.DNSName("alice.example.com")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "EA")
        self.assertEqual(exc.reason, "certificate has no EA field")

    def test_userPrincipalName(self) -> None:
        """UPN gives the SAN otherName 1.3.6.1.4.1.311.20.2.3, decoded from its UTF8String."""
        cert = certificate([NameAttribute(CN, "Alice")], san=[upn("alice@corp.example.com")])
        self.assertEqual(fields(cert, "UPN").username, "alice@corp.example.com")

    def test_userPrincipalNameLongAndUnicode(self) -> None:
        """A UPN longer than 127 octets (long-form DER length) with non-ASCII text decodes."""
        value = "ångström-" + "x" * 200 + "@corp.example.com"
        cert = certificate([NameAttribute(CN, "Alice")], san=[upn(value)])
        self.assertEqual(fields(cert, "UPN").username, value)

    def test_userPrincipalNameIgnoresOtherOtherNames(self) -> None:
        """otherNames of other types are not UPNs."""
        cert = certificate(
            [NameAttribute(CN, "Alice")],
            san=[x509.OtherName(ObjectIdentifier("1.3.6.1.5.5.7.8.9"), b"\x0c\x03bob"), upn("alice@corp")],
        )
        self.assertEqual(fields(cert, "UPN").username, "alice@corp")

    def test_userPrincipalNameMissing(self) -> None:
        """A certificate without a UPN, or without any SAN, is refused for UPN."""
        for cert in (certificate(ALICE), certificate(ALICE, san=[x509.RFC822Name("a@b.example")])):
            exc = self.assertRaises(CertificateRejected, fields, cert, "UPN")
            self.assertEqual(exc.reason, "certificate has no UPN field")

    def test_everyField(self) -> None:
        """Every subject field reads its own attribute type and no other."""
        values = {
            "C": "DE", "CN": "Jürgen Müller", "DNQ": "dnq-1", "EA": "jm@example.de", "GENQ": "Jr.",
            "GN": "Jürgen", "I": "J. M.", "L": "München", "N": "jmueller", "O": "Beispiel GmbH",
            "OU": "Vertrieb", "SER": "0815", "SN": "Müller", "SP": "Bayern", "T": "Dr.", "UID": "jm42",
        }  # fmt: skip
        self.assertEqual(set(values) | {"UPN"}, FIELD_NAMES)
        cert = certificate(
            [NameAttribute(SUBJECT_OIDS[field], value) for field, value in values.items()],
            san=[upn("jm@corp.example.de")],
        )
        for field, value in values.items():
            self.assertEqual(fields(cert, field), CertificateIdentity(value, None), field)
        self.assertEqual(fields(cert, "UPN").username, "jm@corp.example.de")

    def test_everyFieldMissing(self) -> None:
        """Each field is refused, by name, on a certificate that lacks it."""
        cert = certificate([NameAttribute(ObjectIdentifier("2.5.4.9"), "Main Street 1")])
        for field in sorted(FIELD_NAMES):
            exc = self.assertRaises(CertificateRejected, fields, cert, field)
            self.assertEqual(exc.reason, f"certificate has no {field} field", field)

    def test_primaryMissing(self) -> None:
        """A certificate lacking the primary field is refused, naming the field."""
        cert = certificate([NameAttribute(O, "Example Corp"), NameAttribute(OU, "Sales")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "CN", "OU")
        self.assertEqual(exc.reason, "certificate has no CN field")

    def test_secondary(self) -> None:
        """SPEC [5.3]'s "EA and O": the address is the username, the organisation the secondary."""
        identity = fields(certificate(ALICE), "EA", "O")
        self.assertEqual(identity, CertificateIdentity("alice@example.com", "Example Corp"))

    def test_defaults(self) -> None:
        """The default pair, CN and OU, gives both values."""
        self.assertEqual(fields(certificate(ALICE), "CN", "OU"), CertificateIdentity("alice", "Sales"))

    def test_secondaryFromSubjectAltName(self) -> None:
        """The secondary field may come from the subjectAltName (UPN) too."""
        cert = certificate(ALICE, san=[upn("alice@corp")])
        self.assertEqual(fields(cert, "CN", "UPN"), CertificateIdentity("alice", "alice@corp"))

    def test_secondaryMissing(self) -> None:
        """A certificate lacking the configured secondary field is refused, naming the field."""
        cert = certificate([NameAttribute(CN, "alice"), NameAttribute(EMAIL, "alice@example.com")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "EA", "O")
        self.assertEqual(exc.reason, "certificate has no O field")

    def test_secondaryNone(self) -> None:
        """With secondary "none" nothing more is required and secondary is None."""
        cert = certificate([NameAttribute(CN, "alice")])
        self.assertEqual(fields(cert, "CN", "none"), CertificateIdentity("alice", None))


class MultipleValuesTests(SynchronousTestCase):
    """A field that occurs several times gives its first value in encoding order."""

    def test_firstOrganizationalUnit(self) -> None:
        """Of two OUs the first encoded (the more significant) is taken."""
        cert = certificate(
            [NameAttribute(C, "US"), NameAttribute(OU, "Sales"), NameAttribute(OU, "EMEA"), NameAttribute(CN, "alice")]
        )
        self.assertEqual(fields(cert, "OU").username, "Sales")
        # ... which is the last OU of the RFC 4514 string.
        self.assertEqual(entire_dn(cert), "CN=alice,OU=EMEA,OU=Sales,C=US")

    def test_firstCommonName(self) -> None:
        """Of two CNs the first encoded is taken."""
        cert = certificate([NameAttribute(CN, "alice"), NameAttribute(CN, "Alice Smith")])
        self.assertEqual(fields(cert, "CN").username, "alice")

    def test_multiValuedRdn(self) -> None:
        """Attributes inside one multi-valued RDN are found like any other."""
        rdn = x509.RelativeDistinguishedName([NameAttribute(CN, "alice"), NameAttribute(UID, "a42")])
        cert = certificate(x509.Name([x509.RelativeDistinguishedName([NameAttribute(O, "Corp")]), rdn]))
        self.assertEqual(fields(cert, "UID", "CN"), CertificateIdentity("a42", "alice"))
        self.assertEqual(entire_dn(cert), "CN=alice+UID=a42,O=Corp")

    def test_firstRfc822Name(self) -> None:
        """Of two SAN rfc822Names the first is taken."""
        cert = certificate(
            [NameAttribute(CN, "alice")],
            san=[x509.RFC822Name("first@example.com"), x509.RFC822Name("second@example.com")],
        )
        self.assertEqual(fields(cert, "EA").username, "first@example.com")

    def test_firstUserPrincipalName(self) -> None:
        """Of two UPNs the first is taken."""
        cert = certificate([NameAttribute(CN, "alice")], san=[upn("first@corp"), upn("second@corp")])
        self.assertEqual(fields(cert, "UPN").username, "first@corp")

    def test_firstValueOnly(self) -> None:
        """An unusable first value refuses the certificate; later values are not tried."""
        cert = certificate([NameAttribute(OU, "Sa\nles"), NameAttribute(OU, "EMEA"), NameAttribute(CN, "alice")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "CN", "OU")
        self.assertEqual(exc.reason, "OU contains a control character")
        bad_upn = x509.OtherName(UPN, b"\x16\x0afirst@corp")
        cert = certificate([NameAttribute(CN, "alice")], san=[bad_upn, upn("second@corp")])
        self.assertRaises(CertificateRejected, fields, cert, "UPN")
        # A subject emailAddress that is unusable does not fall back to the SAN either.
        cert = certificate([NameAttribute(EMAIL, "alice\n@example.com")], san=[x509.RFC822Name("alice@example.com")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "EA")
        self.assertEqual(exc.reason, "EA contains a control character")


class EntireDnTests(SynchronousTestCase):
    def test_order(self) -> None:
        """The RFC 4514 string puts the most specific RDN first, the reverse of encoding order."""
        cert = certificate(ALICE[:4])
        self.assertEqual(entire_dn(cert), "CN=alice,OU=Sales,O=Example Corp,C=US")

    def test_attributeNames(self) -> None:
        """Attribute types are named as OpenSSL's RFC 2253 output names them."""
        cert = certificate(
            [
                NameAttribute(C, "DE"),
                NameAttribute(SERIAL, "0815"),
                NameAttribute(DNQ, "q"),
                NameAttribute(GENQ, "Jr."),
                NameAttribute(GN, "Jo"),
                NameAttribute(INITIALS, "JM"),
                NameAttribute(L, "Bonn"),
                NameAttribute(NAME, "jm"),
                NameAttribute(O, "Org"),
                NameAttribute(OU, "Unit"),
                NameAttribute(SN, "Mu"),
                NameAttribute(ST, "NRW"),
                NameAttribute(TITLE, "Dr."),
                NameAttribute(UID, "jm42"),
                NameAttribute(CN, "Jo Mu"),
                NameAttribute(EMAIL, "jm@example.de"),
            ]
        )
        self.assertEqual(
            entire_dn(cert),
            "emailAddress=jm@example.de,CN=Jo Mu,UID=jm42,title=Dr.,ST=NRW,SN=Mu,OU=Unit,O=Org,name=jm,L=Bonn,"
            "initials=JM,GN=Jo,generationQualifier=Jr.,dnQualifier=q,serialNumber=0815,C=DE",
        )

    def test_escaping(self) -> None:
        """RFC 4514 special characters are escaped; non-ASCII is kept as it is."""
        cert = certificate(
            [
                NameAttribute(O, 'Smith, Jones + "Partners"'),
                NameAttribute(OU, "back\\slash;<angle>"),
                NameAttribute(CN, "#hash and trailing space "),
                NameAttribute(L, " leading space é"),
            ]
        )
        self.assertEqual(
            entire_dn(cert),
            r"L=\ leading space é,CN=\#hash and trailing space\ ,OU=back\\slash\;\<angle\>,"
            r"O=Smith\, Jones \+ \"Partners\"",
        )

    def test_unnamedAttributeTypes(self) -> None:
        """Other attribute types are written as dotted OIDs; a BIT STRING value as #hex."""
        cert = certificate(
            [
                NameAttribute(ObjectIdentifier("1.2.840.113549.1.9.2"), "unstructured"),
                NameAttribute(UNIQUE_ID, b"\x01\x02", _type=_ASN1Type.BitString),
                NameAttribute(CN, "alice"),
            ]
        )
        self.assertEqual(entire_dn(cert), "CN=alice,2.5.4.45=#0102,1.2.840.113549.1.9.2=unstructured")

    def test_ignoresFields(self) -> None:
        """entire-dn needs neither the primary nor the secondary field."""
        cert = certificate([NameAttribute(O, "Corp")])
        identity = identity_from_certificate(cert, mode="entire-dn", primary="UPN", secondary="EA")
        self.assertEqual(identity, CertificateIdentity("O=Corp", None))

    def test_emptySubject(self) -> None:
        """An empty subject DN gives no username."""
        exc = self.assertRaises(CertificateRejected, entire_dn, certificate([], san=[x509.RFC822Name("a@b.example")]))
        self.assertEqual(exc.reason, "certificate subject DN is empty")

    def test_controlCharacter(self) -> None:
        """A control character anywhere in the subject refuses the entire DN."""
        for value in ("a\nb", "a\x00b", "a\rb"):
            cert = certificate([NameAttribute(CN, "alice"), NameAttribute(ObjectIdentifier("2.5.4.9"), value)])
            exc = self.assertRaises(CertificateRejected, entire_dn, cert)
            self.assertEqual(exc.reason, "subject attribute 2.5.4.9 contains a control character")
        cert = certificate([NameAttribute(CN, "al\tice")])
        exc = self.assertRaises(CertificateRejected, entire_dn, cert)
        self.assertEqual(exc.reason, "subject attribute CN contains a control character")


class RefusedValueTests(SynchronousTestCase):
    def test_controlCharacters(self) -> None:
        """C0 controls, DEL, C1 controls and line separators are refused, and not logged."""
        for char in ("\r", "\n", "\x00", "\t", "\x1b", "\x1f", "\x7f", "\x85", "\x9b", "\u2028", "\u2029"):
            value = f"ali{char}ce"
            cert = certificate([NameAttribute(CN, value), NameAttribute(OU, f"Sa{char}les")])
            exc = self.assertRaises(CertificateRejected, fields, cert, "CN")
            self.assertEqual(exc.reason, "CN contains a control character", repr(char))
            self.assertNotIn(value, str(exc))
            exc = self.assertRaises(CertificateRejected, fields, cert, "OU")
            self.assertEqual(exc.reason, "OU contains a control character", repr(char))

    def test_controlCharacterInSecondary(self) -> None:
        """A control character in the secondary value is refused too."""
        cert = certificate([NameAttribute(CN, "alice"), NameAttribute(O, "Corp\r\nInjected: yes")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "CN", "O")
        self.assertEqual(exc.reason, "O contains a control character")

    def test_controlCharacterInSubjectAltName(self) -> None:
        """Control characters in a SAN rfc822Name or UPN are refused."""
        cert = certificate([NameAttribute(CN, "alice")], san=[x509.RFC822Name("alice\r\n@example.com")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "EA")
        self.assertEqual(exc.reason, "EA (subjectAltName rfc822Name) contains a control character")
        cert = certificate([NameAttribute(CN, "alice")], san=[upn("alice\x00@corp")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "UPN")
        self.assertEqual(exc.reason, "UPN contains a control character")

    def test_empty(self) -> None:
        """An empty value is no username."""
        cert = certificate([NameAttribute(CN, "alice"), NameAttribute(OU, "")], san=[upn("")])
        exc = self.assertRaises(CertificateRejected, fields, cert, "OU")
        self.assertEqual(exc.reason, "OU is empty")
        exc = self.assertRaises(CertificateRejected, fields, cert, "CN", "UPN")
        self.assertEqual(exc.reason, "UPN is empty")

    def test_upnNotUtf8String(self) -> None:
        """A UPN otherName holding any other type than UTF8String is refused."""
        cases = {
            b"\x16\x05alice": "UPN is not a UTF8String (tag 0x16)",  # IA5String
            b"\x13\x05alice": "UPN is not a UTF8String (tag 0x13)",  # PrintableString
            b"\x1e\x04\x00a\x00b": "UPN is not a UTF8String (tag 0x1e)",  # BMPString
            b"\x04\x05alice": "UPN is not a UTF8String (tag 0x04)",  # OCTET STRING
            b"\x2c\x07\x0c\x05alice": "UPN is not a UTF8String (tag 0x2c)",  # constructed: BER, not DER
            b"\x30\x07\x0c\x05alice": "UPN is not a UTF8String (tag 0x30)",  # SEQUENCE
        }
        for der, reason in cases.items():
            cert = certificate([NameAttribute(CN, "alice")], san=[x509.OtherName(UPN, der)])
            exc = self.assertRaises(CertificateRejected, fields, cert, "UPN")
            self.assertEqual(exc.reason, reason, der)

    def test_upnNotUtf8(self) -> None:
        """A UTF8String UPN whose octets are not UTF-8 is refused."""
        for der in (
            b"\x0c\x02\xc3\x28",  # truncated sequence
            b"\x0c\x02\xc0\xaf",  # overlong "/"
            b"\x0c\x03\xed\xa0\x80",  # an encoded surrogate
            b"\x0c\x01\xff",
        ):
            exc = self.assertRaises(CertificateRejected, fields, with_upn_bytes([NameAttribute(CN, "a")], der), "UPN")
            self.assertEqual(exc.reason, "UPN is not valid UTF-8", der)

    def test_upnMalformedEncoding(self) -> None:
        """A UPN that is not one well-formed DER element is refused."""
        for der in (
            b"\x0c\x80alice\x00\x00",  # indefinite length
            b"\x0c\x81\x05alice",  # non-minimal length
            b"\x0c\x82\x00\x05alice",
            b"\x0c\x85\x01\x00\x00\x00\x00",
            b"\x0c\x82\x01\x00",
            b"\x0c\x06alice",  # longer than what follows
            b"\x0c\x04alice",  # shorter than what follows
            b"\x0c\x05alice\x0c\x00",  # two elements
        ):
            cert = with_upn_bytes([NameAttribute(CN, "alice")], der)
            self.assertRaises(CertificateRejected, fields, cert, "UPN")

    def test_malformedSubject(self) -> None:
        """A subject cryptography cannot decode (a BIT STRING common name) is refused."""
        der = certificate([NameAttribute(CN, "ZZ")]).public_bytes(Encoding.DER)
        # The issuer is "mailgw test CA", so the only b"\x0c\x02ZZ" is the subject's CN.
        self.assertEqual(der.count(b"\x0c\x02ZZ"), 1)
        cert = x509.load_der_x509_certificate(der.replace(b"\x0c\x02ZZ", b"\x03\x02\x00Z"))
        exc = self.assertRaises(CertificateRejected, fields, cert, "CN")
        self.assertEqual(exc.reason, "certificate subject DN is malformed")
        self.assertRaises(CertificateRejected, entire_dn, cert)

    def test_malformedExtensions(self) -> None:
        """A subjectAltName cryptography cannot decode, or two of them, is refused."""
        der = certificate([NameAttribute(CN, "alice")], san=[x509.RFC822Name("zlice@example.com")]).public_bytes(
            Encoding.DER
        )
        cert = x509.load_der_x509_certificate(der.replace(b"zlice", b"\xfflice"))  # not an IA5String
        exc = self.assertRaises(CertificateRejected, fields, cert, "EA")
        self.assertEqual(exc.reason, "certificate extensions are malformed")

        builder_san = x509.SubjectAlternativeName([upn("alice@corp")])
        cert = certificate([NameAttribute(CN, "alice")], san=[upn("alice@corp")])
        der = (
            x509.CertificateBuilder(
                subject_name=cert.subject,
                issuer_name=cert.issuer,
                public_key=_KEY.public_key(),
                serial_number=1,
                not_valid_before=cert.not_valid_before_utc,
                not_valid_after=cert.not_valid_after_utc,
                extensions=[],
            )
            .add_extension(builder_san, critical=False)
            .add_extension(x509.IssuerAlternativeName(list(builder_san)), critical=False)
            .sign(_KEY, hashes.SHA256())
            .public_bytes(Encoding.DER)
        )
        # Make the issuerAltName (2.5.29.18) a second subjectAltName (2.5.29.17).
        self.assertEqual(der.count(b"\x06\x03\x55\x1d\x12"), 1)
        cert = x509.load_der_x509_certificate(der.replace(b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11"))
        exc = self.assertRaises(CertificateRejected, fields, cert, "UPN")
        self.assertEqual(exc.reason, "certificate extensions are malformed")


class DerUtf8StringTests(SynchronousTestCase):
    """The UPN decoder on its own.

    cryptography already refuses most of these framing errors when it decodes the
    subjectAltName; the decoder does not rely on it.
    """

    def test_decodes(self) -> None:
        """A DER UTF8String decodes, short or long form."""
        self.assertEqual(_der_utf8_string(b"\x0c\x05alice"), "alice")
        self.assertEqual(_der_utf8_string(upn("é" * 100).value), "é" * 100)
        self.assertEqual(_der_utf8_string(upn("x" * 300).value), "x" * 300)

    def test_refuses(self) -> None:
        """Anything but exactly one DER UTF8String of valid UTF-8 is refused, with its reason."""
        cases = {
            b"": "UPN is truncated",
            b"\x0c": "UPN is truncated",
            b"\x16\x05alice": "UPN is not a UTF8String (tag 0x16)",
            b"\x0c\x80alice\x00\x00": "UPN has an indefinite length (not DER)",
            b"\x0c\x81\x05alice": "UPN length is not minimally encoded (not DER)",
            b"\x0c\x82\x00\x05alice": "UPN length is not minimally encoded (not DER)",
            b"\x0c\x85\x01\x00\x00\x00\x00": "UPN length is malformed",
            b"\x0c\x82\x01": "UPN length is malformed",
            b"\x0c\x82\x01\x00": "UPN length does not match its encoding",
            b"\x0c\x06alice": "UPN length does not match its encoding",
            b"\x0c\x04alice": "UPN length does not match its encoding",
            b"\x0c\x05alice\x0c\x00": "UPN length does not match its encoding",
            b"\x0c\x02\xc3\x28": "UPN is not valid UTF-8",
        }
        for der, reason in cases.items():
            exc = self.assertRaises(CertificateRejected, _der_utf8_string, der)
            self.assertEqual(exc.reason, reason, der)

    @given(st.binary(max_size=40))
    def test_arbitraryBytes(self, der: bytes) -> None:
        """Arbitrary octets decode to text or raise CertificateRejected, nothing else."""
        try:
            _der_utf8_string(der)
        except CertificateRejected:
            pass


# --- properties ---------------------------------------------------------------------------

_REFUSED = {"Cc", "Cs", "Zl", "Zp"}

#: Values the mapping accepts: no controls, separators or surrogates.  At most 16 code
#: points keeps a CN within cryptography's 64-octet limit.
printable = st.text(alphabet=st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1, max_size=16)


def _fit(value: str, octets: int) -> str:
    """The longest prefix of value within ``octets`` UTF-8 octets."""
    fitted = ""
    for char in value:
        if len((fitted + char).encode("utf-8")) > octets:
            break
        fitted += char
    return fitted


class PropertyTests(SynchronousTestCase):
    @given(cn=printable, ou=printable)
    def test_roundTrip(self, cn: str, ou: str) -> None:
        """Printable CN and OU values come back exactly, as username or secondary."""
        cert = certificate([NameAttribute(O, "Corp"), NameAttribute(OU, ou), NameAttribute(CN, cn)])
        self.assertEqual(fields(cert, "CN", "OU"), CertificateIdentity(cn, ou))
        self.assertEqual(fields(cert, "OU", "CN"), CertificateIdentity(ou, cn))

    @given(cn=printable, ou=printable)
    def test_entireDnParsesBack(self, cn: str, ou: str) -> None:
        """The entire-DN username is an RFC 4514 string that parses back to the subject."""
        subject = x509.Name([NameAttribute(C, "US"), NameAttribute(OU, ou), NameAttribute(CN, cn)])
        username = entire_dn(certificate(subject))
        self.assertEqual(x509.Name.from_rfc4514_string(username), subject)

    @given(
        field=st.sampled_from(sorted(FIELD_NAMES)),
        value=st.text(max_size=20),
        string_type=st.sampled_from(
            [
                None,
                _ASN1Type.UTF8String,
                _ASN1Type.PrintableString,
                _ASN1Type.IA5String,
                _ASN1Type.BMPString,
                _ASN1Type.UniversalString,
                _ASN1Type.T61String,
                _ASN1Type.VisibleString,
            ]
        ),
        upn_der=st.one_of(
            st.binary(min_size=2, max_size=40),  # mostly not DER at all
            st.tuples(st.integers(0, 255), st.binary(max_size=20)).map(  # one element of any tag
                lambda element: bytes([element[0]]) + der_length(len(element[1])) + element[1]
            ),
            st.text(max_size=12).map(lambda text: upn(text).value),
        ),
        email=st.none() | st.text(alphabet=st.characters(max_codepoint=127), max_size=20),
        secondary=st.sampled_from(["none", *sorted(FIELD_NAMES)]),
    )
    def test_arbitraryValues(
        self,
        field: str,
        value: str,
        string_type: _ASN1Type | None,
        upn_der: bytes,
        email: str | None,
        secondary: str,
    ) -> None:
        """Whatever a field holds, the mapping answers an identity or CertificateRejected."""
        attributes = [NameAttribute(O, "Corp")]
        if field != "UPN":
            oid = SUBJECT_OIDS[field]
            # cryptography insists on 2 octets for C and 1 to 64 for CN.
            if field == "C":
                value = _fit(_fit(value, 2) + "XX", 2)
            elif field == "CN":
                value = _fit(value, 64) or "X"
            attributes.append(NameAttribute(oid, value, string_type))
        try:
            san: list[x509.GeneralName] = [] if email is None else [x509.RFC822Name(email)]
            cert = with_upn_bytes(attributes, upn_der, san)
        except ValueError:
            return  # cryptography will not encode or decode this; nor would a TLS stack
        for mode, primary in (("dn-fields", field), ("entire-dn", "CN")):
            try:
                identity = identity_from_certificate(cert, mode=mode, primary=primary, secondary=secondary)
            except CertificateRejected as e:
                self.assertIsInstance(e.reason, str)
                continue
            for text in (identity.username, identity.secondary or "x"):
                self.assertNotEqual(text, "")
                self.assertFalse({unicodedata.category(char) for char in text} & _REFUSED, repr(text))
