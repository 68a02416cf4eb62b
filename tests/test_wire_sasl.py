"""Tests for :mod:`mailgw.wire.sasl`."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire.errors import BadBase64, ProtocolError
from mailgw.wire.sasl import (
    CANCEL,
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    decode_b64,
    decode_login_item,
    decode_login_username,
    decode_plain,
    encode_b64,
    encode_plain,
)

no_nul = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
no_nul_nonempty = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=30
)
# Inputs that look like base64 often enough to get past the decoder.
b64ish = st.one_of(
    st.binary(max_size=80),
    st.binary(max_size=60).map(base64.b64encode),
    st.text(alphabet="AQgw+/=", max_size=20).map(str.encode),
)

# Bytes that are not strict base64.
BAD_BASE64 = [
    b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n",
    b"AHRpbQB0YW5zdGFh ZnRhbnN0YWFm",
    b" AHRpbQB0YW5zdGFhZnRhbnN0YWFm",
    b"VXJzZWwAS3VydAB4aXBqM3BsbXE",
    b"VXJzZWwAS3VydAB4aXBqM3BsbXE==",
    b"VXJzZWwAS3VydAB4aXBqM3BsbXE=AAAA",
    b"==",
    b"=A",
    b"AA=",
    b"!!!!",
    b"AHRp-bQB_",
    b"*",
    b"\xff\xfe\xfd\xfc",
    b"\x00\x00\x00\x00",
]


class DecodePlainTests(SynchronousTestCase):
    """decode_plain: RFC 4616 messages in strict base64."""

    def test_knownAnswers(self) -> None:
        """RFC 4616's examples and a UTF-8 one decode to (authzid, authcid, password)."""
        cases = [
            (b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm", ("", "tim", "tanstaaftanstaaf")),
            (b"VXJzZWwAS3VydAB4aXBqM3BsbXE=", ("Ursel", "Kurt", "xipj3plmq")),
            (b"AGrDtnJnAHDDpHNzd8O2cmQ=", ("", "jörg", "pässwörd")),
        ]
        for data, expected in cases:
            self.assertEqual(decode_plain(data), expected)

    def test_badBase64(self) -> None:
        """Anything but strict base64 raises BadBase64, a ProtocolError."""
        for data in BAD_BASE64:
            self.assertRaises(BadBase64, decode_plain, data)
        self.assertTrue(issubclass(BadBase64, ProtocolError))

    def test_badMessages(self) -> None:
        """Wrong NUL count, non-UTF-8, empty authcid or password raise ProtocolError."""
        messages = [
            b"",
            b"user",
            b"\x00user",
            b"\x00user\x00pass\x00",
            b"a\x00b\x00c\x00d",
            b"\x00\x00pass",
            b"\x00user\x00",
            b"\x00us\xffer\x00pass",
            b"\x00user\x00pa\xc3",
            b"\xc0\x80\x00user\x00pass",
        ]
        for message in messages:
            self.assertRaises(ProtocolError, decode_plain, base64.b64encode(message))

    def test_emptyResponse(self) -> None:
        """'=' and the empty line are the empty response: not a PLAIN message."""
        self.assertEqual(decode_b64(b"="), b"")
        self.assertEqual(decode_b64(b""), b"")
        self.assertRaises(ProtocolError, decode_plain, b"=")
        self.assertRaises(ProtocolError, decode_plain, b"")

    def test_cancel(self) -> None:
        """CANCEL is the '*' a client sends to abort; it is not base64."""
        self.assertEqual(CANCEL, b"*")
        self.assertRaises(BadBase64, decode_b64, CANCEL)

    def test_errorsHoldNoSecret(self) -> None:
        """Error messages never repeat the decoded password."""
        with self.assertRaises(ProtocolError) as caught:
            decode_plain(base64.b64encode(b"\x00user\x00topsecret\x00"))
        self.assertNotIn("topsecret", str(caught.exception))

    @given(authzid=no_nul, authcid=no_nul_nonempty, password=no_nul_nonempty)
    def test_roundTrip(self, authzid: str, authcid: str, password: str) -> None:
        """encode_plain then decode_plain gives the three parts back."""
        encoded = encode_plain(authcid, password, authzid)
        self.assertNotIn(b"\n", encoded)
        self.assertEqual(decode_plain(encoded), (authzid, authcid, password))

    @given(data=b64ish)
    def test_onlyProtocolError(self, data: bytes) -> None:
        """Arbitrary bytes decode or raise ProtocolError, never anything else."""
        try:
            authzid, authcid, password = decode_plain(data)
        except ProtocolError:
            return
        self.assertTrue(authcid)
        self.assertTrue(password)
        self.assertNotIn("\x00", authzid + authcid + password)


class EncodePlainTests(SynchronousTestCase):
    """encode_plain refuses what could not be decoded back."""

    def test_knownAnswer(self) -> None:
        """encode_plain gives base64 without a newline; authzid defaults to empty."""
        self.assertEqual(encode_plain("tim", "tanstaaftanstaaf"), b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm")
        self.assertEqual(encode_plain("Kurt", "xipj3plmq", "Ursel"), b"VXJzZWwAS3VydAB4aXBqM3BsbXE=")

    def test_invalidParts(self) -> None:
        """An empty authcid or password or a NUL in any part is a ValueError."""
        for args in [("", "pw", ""), ("u", "", ""), ("u\x00", "pw", ""), ("u", "p\x00w", ""), ("u", "pw", "\x00")]:
            self.assertRaises(ValueError, encode_plain, *args)


class LoginItemTests(SynchronousTestCase):
    """AUTH LOGIN items: one base64 UTF-8 string each."""

    def test_knownAnswers(self) -> None:
        """Usernames and passwords decode from base64; '=' and the empty line are ''."""
        self.assertEqual(decode_login_item(b"dXNlcg=="), "user")
        self.assertEqual(decode_login_item(b"cMOkc3M="), "päss")
        self.assertEqual(decode_login_item(b"="), "")
        self.assertEqual(decode_login_item(b""), "")
        self.assertEqual(encode_b64("Username:"), b"VXNlcm5hbWU6")
        self.assertEqual(encode_b64(""), b"")

    def test_errors(self) -> None:
        """Bad base64 raises BadBase64; a non-UTF-8 item raises ProtocolError."""
        for data in BAD_BASE64:
            self.assertRaises(BadBase64, decode_login_item, data)
        self.assertRaises(ProtocolError, decode_login_item, base64.b64encode(b"\xff\xfe"))

    @given(text=st.text(max_size=60))
    def test_roundTrip(self, text: str) -> None:
        """encode_b64 then decode_login_item gives the string back; no newline is added."""
        encoded = encode_b64(text)
        self.assertNotIn(b"\n", encoded)
        self.assertEqual(decode_login_item(encoded), text)

    @given(data=b64ish)
    def test_onlyProtocolError(self, data: bytes) -> None:
        """Arbitrary bytes decode or raise ProtocolError, never anything else."""
        try:
            decode_login_item(data)
        except ProtocolError:
            pass

    @given(data=st.binary(max_size=60))
    def test_strictAgreesWithStandardLibrary(self, data: bytes) -> None:
        """Canonical base64 of any bytes decodes to those bytes."""
        self.assertEqual(decode_b64(base64.b64encode(data) or b"="), data)


class LoginUsernameTests(SynchronousTestCase):
    """decode_login_username: the first AUTH LOGIN answer, never empty."""

    def test_knownAnswers(self) -> None:
        """A base64 username decodes; the challenges are base64 'Username:'/'Password:'."""
        self.assertEqual(decode_login_username(b"dXNlcg=="), "user")
        self.assertEqual(decode_login_username(b"asO2cmc="), "jörg")
        self.assertEqual(base64.b64decode(LOGIN_USERNAME_CHALLENGE), b"Username:")
        self.assertEqual(base64.b64decode(LOGIN_PASSWORD_CHALLENGE), b"Password:")

    def test_errors(self) -> None:
        """Bad base64 raises BadBase64; non-UTF-8 and the empty username ('=', '')
        raise ProtocolError; so does CANCEL, which callers check first."""
        for data in BAD_BASE64:
            self.assertRaises(BadBase64, decode_login_username, data)
        for data in [b"=", b"", base64.b64encode(b"\xff\xfe")]:
            self.assertRaises(ProtocolError, decode_login_username, data)

    @given(text=st.text(min_size=1, max_size=60))
    def test_roundTrip(self, text: str) -> None:
        """encode_b64 then decode_login_username gives any non-empty username back."""
        self.assertEqual(decode_login_username(encode_b64(text)), text)

    @given(data=b64ish)
    def test_onlyProtocolError(self, data: bytes) -> None:
        """Arbitrary bytes give a non-empty username or raise ProtocolError, never
        anything else, and agree with decode_login_item."""
        try:
            username = decode_login_username(data)
        except ProtocolError:
            try:
                self.assertEqual(decode_login_item(data), "")
            except ProtocolError:
                pass
            return
        self.assertTrue(username)
        self.assertEqual(username, decode_login_item(data))
