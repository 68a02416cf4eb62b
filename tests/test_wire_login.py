"""Tests for :mod:`mailgw.wire.login` (SPEC [4.2])."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire.errors import LoginSyntaxError, ProtocolError
from mailgw.wire.login import LoginRequest, format_login, parse_login

_DNS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")

# Delimiter pairs (user, server) the properties run with; none is a host character
# except ":", which may appear in an IPv6 server.
delimiter_pairs = st.sampled_from([(":", "@"), ("#", "%"), ("/", "@"), ("%", "#"), ("::", "@@")])


#: Unicode categories a username must not contain: controls, invisible format characters,
#: line and paragraph separators, lone surrogates.
FORBIDDEN_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs")


def _part(delimiters: tuple[str, str], *, allow: str = "", min_size: int = 0) -> st.SearchStrategy[str]:
    """Text free of control and invisible characters and of the delimiters' characters."""
    banned = set("".join(delimiters)) - set(allow)
    return st.text(
        alphabet=st.characters(exclude_categories=["Cc", "Cf", "Zl", "Zp", "Cs"], exclude_characters="".join(banned)),
        min_size=min_size,
        max_size=15,
    )


def _password(delimiters: tuple[str, str], *, allow_user_delimiter: bool) -> st.SearchStrategy[str]:
    banned = "\x00\r\n" + ("" if allow_user_delimiter else delimiters[0])
    return st.text(
        alphabet=st.one_of(
            st.characters(exclude_categories=["Cs"], exclude_characters=banned),
            st.sampled_from(" \t:@#%" if allow_user_delimiter else " \t"),
        ).filter(lambda c: c not in banned),
        max_size=15,
    )


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
dns_names = (
    st.lists(_label, min_size=1, max_size=4).map(".".join).filter(lambda name: not name.split(".")[-1].isdigit())
)
servers = st.one_of(
    st.none(),
    dns_names,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[LoginRequest, tuple[str, str]]:
    """A LoginRequest that format_login can write, and the delimiters to write it with.

    No part holds the user delimiter (the mail password aside: it is split at the first
    one); the users may hold the server delimiter only when a server is named.
    """
    delimiters = draw(delimiter_pairs)
    server = draw(servers)
    allow = delimiters[1] if server is not None else ""
    mail_user = draw(_part(delimiters, allow=allow, min_size=1))
    mail_password = draw(_password(delimiters, allow_user_delimiter=True))
    if draw(st.booleans()):
        vpn_user, vpn_password = mail_user, mail_password
    else:
        vpn_user = draw(_part(delimiters, allow=allow, min_size=1))
        vpn_password = draw(_password(delimiters, allow_user_delimiter=False))
    request = LoginRequest(
        vpn_user=vpn_user,
        vpn_password=vpn_password,
        mail_user=mail_user,
        mail_password=mail_password,
        server=server,
    )
    return request, delimiters


# Strings heavy in the characters the parser cares about.
_tricky = st.lists(
    st.one_of(
        st.sampled_from([*":@#%[].-\x00\r\n\t \x7f\x85\u2028", "0x", "::1", "127.1", "a"]),
        st.characters(),
    ),
    max_size=40,
).map("".join)
usernames = st.one_of(st.text(max_size=40), _tricky)


class ParseLoginTests(SynchronousTestCase):
    """parse_login and format_login: known-answer tables and properties."""

    # (username, password) -> (vpn_user, vpn_password, mail_user, mail_password, server)
    cases: list[tuple[str, str, tuple[str, str, str, str, str | None]]] = [
        # The SPEC example.
        (
            "jdoe:john.doe@mail.example.com",
            "vpnpw:mailpw",
            ("jdoe", "vpnpw", "john.doe", "mailpw", "mail.example.com"),
        ),
        ("alice", "pw", ("alice", "pw", "alice", "pw", None)),
        ("alice", "p:w", ("alice", "p:w", "alice", "p:w", None)),
        ("alice@mail", "pw", ("alice", "pw", "alice", "pw", "mail")),
        ("vpn:alice", "vp:mp", ("vpn", "vp", "alice", "mp", None)),
        # The password is split at the first delimiter only.
        ("vpn:alice", "vp:m:p", ("vpn", "vp", "alice", "m:p", None)),
        # VPN part but no delimiter in the password: the same password serves both.
        ("vpn:alice", "secret", ("vpn", "secret", "alice", "secret", None)),
        # Empty VPN or mail password (certificate and piggyback logins need no VPN password).
        ("vpn:alice", ":mp", ("vpn", "", "alice", "mp", None)),
        ("vpn:alice", "vp:", ("vpn", "vp", "alice", "", None)),
        ("alice", "", ("alice", "", "alice", "", None)),
        # The username is split at the first user delimiter: the mail user may hold more.
        ("vpn:a:b", "x:y", ("vpn", "x", "a:b", "y", None)),
        # The server is split at the last server delimiter.
        (
            "john@example.com@mail.example.com",
            "pw",
            ("john@example.com", "pw", "john@example.com", "pw", "mail.example.com"),
        ),
        # Ambiguous: an address as mail user and no server named -> its domain is the server.
        ("john@example.com", "pw", ("john", "pw", "john", "pw", "example.com")),
        # Nothing after the last server delimiter: no server part.
        ("alice@", "pw", ("alice@", "pw", "alice@", "pw", None)),
        # A non-host character after the last server delimiter: no server part.
        ("alice@foo bar", "pw", ("alice@foo bar", "pw", "alice@foo bar", "pw", None)),
        ("alice@exämple.com", "pw", ("alice@exämple.com", "pw", "alice@exämple.com", "pw", None)),
        # ... and the VPN split still applies to the whole username.
        ("alice@fe80::1%eth0", "pw", ("alice@fe80", "pw", ":1%eth0", "pw", None)),
        # IP literals, bracketed or not; brackets are removed.
        ("alice@192.0.2.1", "pw", ("alice", "pw", "alice", "pw", "192.0.2.1")),
        ("alice@[192.0.2.1]", "pw", ("alice", "pw", "alice", "pw", "192.0.2.1")),
        ("alice@[2001:db8::1]", "pw", ("alice", "pw", "alice", "pw", "2001:db8::1")),
        ("alice@2001:db8::1", "pw", ("alice", "pw", "alice", "pw", "2001:db8::1")),
        ("vpn:alice@[::1]", "a:b", ("vpn", "a", "alice", "b", "::1")),
        ("vpn:alice@::ffff:192.0.2.1", "a:b", ("vpn", "a", "alice", "b", "::ffff:192.0.2.1")),
        # Host names: single labels, hyphens, digits, case kept.
        ("alice@localhost", "pw", ("alice", "pw", "alice", "pw", "localhost")),
        ("alice@Mail-1.Example.COM", "pw", ("alice", "pw", "alice", "pw", "Mail-1.Example.COM")),
        ("alice@0xdead.beef", "pw", ("alice", "pw", "alice", "pw", "0xdead.beef")),
        ("alice@3com.example", "pw", ("alice", "pw", "alice", "pw", "3com.example")),
        # Anything but NUL, CR, LF may be in a password; any non-control in a username.
        ("Jörg Müller", "p w\t\u2028!", ("Jörg Müller", "p w\t\u2028!", "Jörg Müller", "p w\t\u2028!", None)),
    ]

    # Logins refused with LoginSyntaxError.
    errors: list[tuple[str, str]] = [
        ("", "pw"),
        (":alice", "pw"),
        ("vpn:", "pw"),
        ("vpn:@mail.example.com", "pw"),
        (":@mail.example.com", "pw"),
        ("@mail.example.com", "pw"),
        ("@[::1]", "pw"),
        # Control characters anywhere in the username.
        ("alice\r\nRETR 1", "pw"),
        ("alice\n", "pw"),
        ("al\x00ice", "pw"),
        ("alice\t", "pw"),
        ("alice\x7f", "pw"),
        ("alice\x85", "pw"),
        ("alice@mail\r\n.example.com", "pw"),
        ("vpn:alice@mail.example.com\x00", "pw"),
        ("alice\ud800", "pw"),
        # Invisible format characters and line or paragraph separators.
        ("alice\u202e", "pw"),
        ("ad\u200bmin", "pw"),
        ("\ufeffalice", "pw"),
        ("alice\u00ad", "pw"),
        ("vpn\u2028:alice", "pw"),
        ("vpn:alice\u2029", "pw"),
        ("alice@mail\u200d.example.com", "pw"),
        # NUL, CR, LF in the password.
        ("alice", "pw\r\nDELE 1"),
        ("alice", "p\x00w"),
        ("alice", "pw\n"),
        ("vpn:alice", "vp\r:mp"),
        ("alice", "p\udfffw"),
        # Host-like but not a valid host.
        ("alice@a..b", "pw"),
        ("alice@.example.com", "pw"),
        ("alice@example.com.", "pw"),
        ("alice@-mail.example.com", "pw"),
        ("alice@mail-.example.com", "pw"),
        ("alice@" + "a" * 64 + ".example.com", "pw"),
        ("alice@" + ".".join(["abcdefgh"] * 30), "pw"),
        ("alice@mail.example.com:993", "pw"),
        ("alice@[mail.example.com]", "pw"),
        ("alice@[]", "pw"),
        ("alice@[::1", "pw"),
        ("alice@::1]", "pw"),
        ("alice@[[::1]]", "pw"),
        ("alice@:::", "pw"),
        ("alice@example.123", "pw"),
        # Numeric names the C library would read as addresses.
        ("alice@127.1", "pw"),
        ("alice@2130706433", "pw"),
        ("alice@0x7f000001", "pw"),
        ("alice@0x7f.0.0.1", "pw"),
        ("alice@0177.0.0.1", "pw"),
        ("alice@010.0.0.1", "pw"),
        ("alice@256.0.0.1", "pw"),
        ("alice@1.2.3.4.5", "pw"),
    ]

    def test_knownAnswers(self) -> None:
        """Each table row's username and password parse to its five parts."""
        for username, password, expected in self.cases:
            request = parse_login(username, password)
            self.assertEqual(
                (
                    request.vpn_user,
                    request.vpn_password,
                    request.mail_user,
                    request.mail_password,
                    request.server,
                ),
                expected,
                username,
            )

    def test_errors(self) -> None:
        """Each table row raises LoginSyntaxError, a ProtocolError."""
        for username, password in self.errors:
            with self.assertRaises(LoginSyntaxError, msg=repr(username)):
                parse_login(username, password)
        self.assertTrue(issubclass(LoginSyntaxError, ProtocolError))

    def test_errorMessagesHoldNoInput(self) -> None:
        """The error message never repeats the username or the password."""
        for username, password in [("bad\r\nuser", "secret"), ("alice", "sec\nret")]:
            with self.assertRaises(LoginSyntaxError) as caught:
                parse_login(username, password)
            self.assertNotIn("secret", str(caught.exception))
            self.assertNotIn("sec", str(caught.exception))
            self.assertNotIn("bad", str(caught.exception))

    def test_customDelimiters(self) -> None:
        """Other delimiters, multi-character ones included, follow the same rules."""
        request = parse_login(
            "jdoe#john.doe@example.com%mail.example.com",
            "vp#m#p",
            user_delimiter="#",
            server_delimiter="%",
        )
        self.assertEqual(
            request,
            LoginRequest("jdoe", "vp", "john.doe@example.com", "m#p", "mail.example.com"),
        )
        request = parse_login("a::b@@h", "x::y", user_delimiter="::", server_delimiter="@@")
        self.assertEqual(request, LoginRequest("a", "x", "b", "y", "h"))
        # With "%" as server delimiter an address is an ordinary mail user.
        request = parse_login("john@example.com", "pw", server_delimiter="%")
        self.assertEqual(request, LoginRequest("john@example.com", "pw", "john@example.com", "pw", None))

    def test_badDelimiters(self) -> None:
        """Empty, equal or control-character delimiters are a configuration error (ValueError)."""
        for user_delimiter, server_delimiter in [("", "@"), (":", ""), ("@", "@"), ("\n", "@"), (":", "\x00")]:
            self.assertRaises(
                ValueError,
                parse_login,
                "a",
                "b",
                user_delimiter=user_delimiter,
                server_delimiter=server_delimiter,
            )
            self.assertRaises(
                ValueError,
                format_login,
                LoginRequest("a", "b", "a", "b", None),
                user_delimiter=user_delimiter,
                server_delimiter=server_delimiter,
            )

    def test_reprHidesPasswords(self) -> None:
        """repr() of a LoginRequest shows users and server but never a password."""
        text = repr(parse_login("jdoe:john.doe@mail.example.com", "vpnsecret:mailsecret"))
        self.assertIn("jdoe", text)
        self.assertIn("mail.example.com", text)
        self.assertNotIn("vpnsecret", text)
        self.assertNotIn("mailsecret", text)

    def test_formatLogin(self) -> None:
        """format_login writes the VPN part only when it differs, and IPv6 servers in brackets."""
        self.assertEqual(
            format_login(LoginRequest("jdoe", "vpnpw", "john.doe", "mailpw", "mail.example.com")),
            ("jdoe:john.doe@mail.example.com", "vpnpw:mailpw"),
        )
        self.assertEqual(format_login(LoginRequest("a", "p", "a", "p", None)), ("a", "p"))
        self.assertEqual(format_login(LoginRequest("a", "p", "a", "q", "::1")), ("a:a@[::1]", "p:q"))

    @given(generated=requests())
    def test_roundTrip(self, generated: tuple[LoginRequest, tuple[str, str]]) -> None:
        """format_login then parse_login gives the parts back, for parts free of delimiters."""
        request, (user_delimiter, server_delimiter) = generated
        username, password = format_login(request, user_delimiter=user_delimiter, server_delimiter=server_delimiter)
        parsed = parse_login(username, password, user_delimiter=user_delimiter, server_delimiter=server_delimiter)
        self.assertEqual(parsed, request)

    @given(username=usernames, password=usernames, delimiters=delimiter_pairs)
    def test_onlyLoginSyntaxError(self, username: str, password: str, delimiters: tuple[str, str]) -> None:
        """Arbitrary strings either parse or raise LoginSyntaxError; when they parse, the
        result is clean: no control character in a user or server, no NUL/CR/LF in a
        password, the server free of the server delimiter and a valid host."""
        user_delimiter, server_delimiter = delimiters
        try:
            request = parse_login(username, password, user_delimiter=user_delimiter, server_delimiter=server_delimiter)
        except LoginSyntaxError:
            return
        for name in (request.vpn_user, request.mail_user, request.server or ""):
            self.assertFalse([c for c in name if unicodedata.category(c) in FORBIDDEN_CATEGORIES])
        for secret in (request.vpn_password, request.mail_password):
            self.assertFalse(set(secret) & {"\x00", "\r", "\n"})
        self.assertTrue(request.vpn_user)
        self.assertTrue(request.mail_user)
        if request.server is not None:
            self.assertNotIn(server_delimiter, request.server)
            if user_delimiter in request.server:
                # Only an IPv6 address may hold ":".
                ipaddress.IPv6Address(request.server)
            self.assertTrue(_is_valid_host(request.server), request.server)

    @given(
        before=usernames,
        after=usernames,
        bad=st.sampled_from(["\r", "\n", "\x00", "\r\n", "\x1b", "\x7f"]),
        password=st.text(max_size=10),
    )
    def test_controlsNeverSurvive(self, before: str, after: str, bad: str, password: str) -> None:
        """A username holding CR, LF, NUL or another control character is always refused."""
        with self.assertRaises(LoginSyntaxError):
            parse_login(before + bad + after, password)

    def test_invisibleCharacterNamed(self) -> None:
        """The error names an invisible or control character by its code point and its
        kind, never raw."""
        cases = [
            ("alice\u202e", "user name contains the invisible character U+202E"),
            ("\u200balice", "user name contains the invisible character U+200B"),
            ("alice\ufeff@mail.example.com", "user name contains the invisible character U+FEFF"),
            ("vpn\u2028:alice", "user name contains the line separator U+2028"),
            ("vpn:alice\u2029", "user name contains the paragraph separator U+2029"),
            ("alice\r\n", "user name contains the control character U+000D"),
            ("alice\x85", "user name contains the control character U+0085"),
            ("alice\ud800", "user name contains the lone surrogate U+D800"),
        ]
        for username, message in cases:
            with self.assertRaises(LoginSyntaxError) as caught:
                parse_login(username, "pw")
            self.assertEqual(str(caught.exception), message)

    @given(
        before=usernames,
        after=usernames,
        bad=st.characters(categories=["Cc", "Cf", "Zl", "Zp"]),
        password=st.text(max_size=10),
        delimiters=delimiter_pairs,
    )
    def test_invisibleNeverSurvive(
        self, before: str, after: str, bad: str, password: str, delimiters: tuple[str, str]
    ) -> None:
        """A username holding a control character, an invisible format character or a
        line or paragraph separator anywhere (VPN user, mail user or server) is always
        refused, and the message does not hold the character."""
        user_delimiter, server_delimiter = delimiters
        with self.assertRaises(LoginSyntaxError) as caught:
            parse_login(
                before + bad + after, password, user_delimiter=user_delimiter, server_delimiter=server_delimiter
            )
        message = str(caught.exception)
        self.assertTrue(message.startswith("user name contains the "), message)
        self.assertFalse([c for c in message if unicodedata.category(c) in FORBIDDEN_CATEGORIES])

    @given(
        generated=requests(),
        position=st.sampled_from(["vpn_user", "mail_user"]),
        bad=st.sampled_from(
            ["\u202e", "\u200b", "\ufeff", "\u2028", "\u2029", "\u00ad", "\u2066", "\x00", "\r", "\x1b"]
        ),
    )
    def test_invisibleInAnyPart(self, generated: tuple[LoginRequest, tuple[str, str]], position: str, bad: str) -> None:
        """A login that parses cleanly is refused once a forbidden character is put into
        its VPN user or mail user: names without them parse as before."""
        request, (user_delimiter, server_delimiter) = generated
        username, password = format_login(request, user_delimiter=user_delimiter, server_delimiter=server_delimiter)
        self.assertEqual(
            parse_login(username, password, user_delimiter=user_delimiter, server_delimiter=server_delimiter), request
        )
        value = getattr(request, position)
        tainted = replace(request, **{position: value[:1] + bad + value[1:]})
        username, password = format_login(tainted, user_delimiter=user_delimiter, server_delimiter=server_delimiter)
        with self.assertRaises(LoginSyntaxError):
            parse_login(username, password, user_delimiter=user_delimiter, server_delimiter=server_delimiter)

    @given(username=st.text(alphabet="abc:@.[]1", max_size=20), password=st.text(max_size=10))
    def test_serverIsSuffix(self, username: str, password: str) -> None:
        """A parsed server is what follows the last '@', brackets removed."""
        try:
            request = parse_login(username, password)
        except LoginSyntaxError:
            return
        if request.server is not None:
            tail = username.rpartition("@")[2]
            self.assertIn(tail, (request.server, f"[{request.server}]"))


def _is_valid_host(server: str) -> bool:
    try:
        ipaddress.ip_address(server)
    except ValueError:
        return bool(_DNS_NAME.match(server)) and not server.split(".")[-1].isdigit()
    return True
