"""Tests for :mod:`mailgw.auth.passwords` and :mod:`mailgw.auth.users` (SPEC [5.1])."""

from __future__ import annotations

from pathlib import Path

import bcrypt
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.auth.passwords import BCRYPT_MAX_PASSWORD_BYTES, hash_password, hash_scheme, verify_password
from mailgw.auth.users import LocalUser, load_users_file, parse_users
from mailgw.config import ConfigError

# Computed once: bcrypt at cost 12 and argon2id at its defaults are slow on purpose.
BCRYPT_HASH = hash_password("correct horse", "bcrypt")
ARGON2_HASH = hash_password("correct horse", "argon2")
# A cheap bcrypt hash (cost 4) for the tests that need many.
FAST_HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


class HashPasswordTests(SynchronousTestCase):
    """hash_password makes hashes that name their scheme."""

    def test_bcrypt(self) -> None:
        """bcrypt hashes are $2b$ at cost 12, and verify."""
        self.assertTrue(BCRYPT_HASH.startswith("$2b$12$"))
        self.assertEqual(hash_scheme(BCRYPT_HASH), "bcrypt")
        self.assertTrue(verify_password(BCRYPT_HASH, "correct horse"))

    def test_argon2(self) -> None:
        """argon2 hashes are argon2id, and verify."""
        self.assertTrue(ARGON2_HASH.startswith("$argon2id$"))
        self.assertEqual(hash_scheme(ARGON2_HASH), "argon2")
        self.assertTrue(verify_password(ARGON2_HASH, "correct horse"))

    def test_defaultIsBcrypt(self) -> None:
        """Without a scheme, the hash is bcrypt."""
        self.assertEqual(hash_scheme(hash_password("x")), "bcrypt")

    def test_salted(self) -> None:
        """Two hashes of the same password differ."""
        self.assertNotEqual(hash_password("same", "argon2"), hash_password("same", "argon2"))

    def test_unknownScheme(self) -> None:
        """An unknown scheme is a ValueError."""
        self.assertRaises(ValueError, hash_password, "x", "md5")

    def test_emptyPassword(self) -> None:
        """An empty password is refused."""
        self.assertRaises(ValueError, hash_password, "")

    def test_bcryptLengthLimit(self) -> None:
        """bcrypt refuses passwords over 72 bytes (counted in UTF-8); argon2 takes them."""
        self.assertRaises(ValueError, hash_password, "é" * 37)  # 74 bytes
        long_password = "x" * 200
        hashed = hash_password(long_password, "argon2")
        self.assertTrue(verify_password(hashed, long_password))
        self.assertFalse(verify_password(hashed, long_password[:72]))

    def test_bcryptAtTheLimit(self) -> None:
        """A 72-byte password is accepted by bcrypt and must match whole."""
        password = "p" * BCRYPT_MAX_PASSWORD_BYTES
        hashed = hash_password(password)
        self.assertTrue(verify_password(hashed, password))
        self.assertFalse(verify_password(hashed, password[:-1]))

    def test_unicodeAndNul(self) -> None:
        """Non-ASCII and NUL characters are part of the password, not terminators."""
        hashed = hash_password("pä\x00ss", "bcrypt")
        self.assertTrue(verify_password(hashed, "pä\x00ss"))
        self.assertFalse(verify_password(hashed, "pä"))

    def test_surrogates(self) -> None:
        """A password that is not encodable text is refused."""
        self.assertRaises(ValueError, hash_password, "\udc80")


class VerifyPasswordTests(SynchronousTestCase):
    """verify_password answers True or False and never raises."""

    def test_wrongPassword(self) -> None:
        """A wrong password is False for both schemes."""
        self.assertFalse(verify_password(BCRYPT_HASH, "wrong horse"))
        self.assertFalse(verify_password(ARGON2_HASH, "wrong horse"))

    def test_malformedHashes(self) -> None:
        """Malformed or unknown hashes give False."""
        for stored in [
            "",
            "correct horse",
            "$1$abc$def",
            "$5$rounds=5000$salt$hash",
            "$2b$",
            "$2b$12$short",
            "$2b$99$" + "a" * 53,
            BCRYPT_HASH[:-1],
            BCRYPT_HASH + "x",
            "$argon2id$",
            "$argon2id$v=19$m=1,t=1,p=1$AAAA$AAAA",
            ARGON2_HASH[:-5],
            ARGON2_HASH + "!",
            "$argon2id$v=19$m=65536,t=3,p=4$" + "é" * 10,
            "{SSHA}abcdef",
        ]:
            self.assertFalse(verify_password(stored, "correct horse"), stored)

    def test_otherBcryptPrefixes(self) -> None:
        """$2a$ and $2y$ hashes (htpasswd, PHP) verify too."""
        for prefix in ("$2a$", "$2y$"):
            stored = prefix + FAST_HASH[4:]
            self.assertEqual(hash_scheme(stored), "bcrypt")
            self.assertTrue(verify_password(stored, "pw"))

    def test_tooLongForBcrypt(self) -> None:
        """A password over 72 bytes never matches a bcrypt hash (no silent truncation)."""
        stored = bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(4)).decode()
        self.assertTrue(verify_password(stored, "a" * 72))
        self.assertFalse(verify_password(stored, "a" * 73))

    @given(st.text(max_size=80), st.text(max_size=30))
    def test_neverRaises(self, stored: str, password: str) -> None:
        """Arbitrary text as hash and password gives a bool, never an exception."""
        self.assertIsInstance(verify_password(stored, password), bool)

    @given(st.sampled_from(["$2b$04$", "$2y$04$", "$argon2id$v=19$m=8,t=1,p=1$", "$argon2i$"]), st.text(max_size=60))
    def test_neverRaisesOnPrefixes(self, prefix: str, rest: str) -> None:
        """Hash-like text after a known prefix gives a bool, never an exception."""
        self.assertIsInstance(verify_password(prefix + rest, "pw"), bool)

    @settings(max_examples=10)
    @given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20))
    def test_roundTrip(self, password: str) -> None:
        """A password verifies against its own argon2 hash, and a different one does not."""
        hashed = hash_password(password, "argon2")
        self.assertTrue(verify_password(hashed, password))
        self.assertFalse(verify_password(hashed, password + "x"))


class UsersFileTests(SynchronousTestCase):
    """The local users file."""

    def write(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.write_text(text)
        return path

    def test_load(self) -> None:
        """Users with and without a group policy."""
        path = self.write(
            f'[users.alice]\npassword_hash = "{FAST_HASH}"\ngroup_policy = "MailUsers"\n'
            f'[users."bob@example.com"]\npassword_hash = "{ARGON2_HASH}"\n'
            f'[users.carol]\npassword_hash = "{FAST_HASH}"\ngroup_policy = ""\n'
        )
        self.assertEqual(
            load_users_file(path),
            {
                "alice": LocalUser("alice", FAST_HASH, "MailUsers"),
                "bob@example.com": LocalUser("bob@example.com", ARGON2_HASH, None),
                "carol": LocalUser("carol", FAST_HASH, None),
            },
        )

    def test_emptyFile(self) -> None:
        """A file without users is valid and empty."""
        self.assertEqual(load_users_file(self.write("# nobody yet\n")), {})

    def test_reprHidesHash(self) -> None:
        """A user's repr does not show the hash."""
        self.assertNotIn(FAST_HASH, repr(LocalUser("alice", FAST_HASH, None)))

    def test_problems(self) -> None:
        """Every problem of the file is reported with its key path."""
        _, problems = parse_users(
            {
                "users": {
                    "alice": {"group_policy": "MailUsers"},
                    "bob": {"password_hash": 5},
                    "carol": {"password_hash": "secret123"},
                    "dave": {"password_hash": FAST_HASH, "group_policy": "x"},
                    "erin": {"password_hash": FAST_HASH, "grop_policy": "MailUsers"},
                    "frank": "hash",
                    "a b": {"password_hash": FAST_HASH},
                    "gina": {"password_hash": FAST_HASH, "group_policy": 3},
                },
                "groups": {},
            }
        )
        self.assertEqual(
            problems,
            [
                "groups: unknown key",
                "users.alice.password_hash: missing",
                "users.bob.password_hash: must be a string, got integer",
                "users.carol.password_hash: not a bcrypt or argon2 hash (make one with `mailgwctl hash-password`)",
                "users.dave.group_policy: must be 4-15 letters and digits, got 'x'",
                "users.erin.grop_policy: unknown key",
                "users.frank: must be a table, got string",
                'users."a b": user name must be at most 255 printable characters without spaces',
                "users.gina.group_policy: must be a string, got integer",
            ],
        )

    def test_problemsNeverShowTheHashField(self) -> None:
        """A bad password_hash value (maybe a pasted password) is not echoed."""
        _, problems = parse_users({"users": {"alice": {"password_hash": "Sup3rS3cret!"}}})
        self.assertNotIn("Sup3rS3cret", "\n".join(problems))

    def test_loadRaisesConfigError(self) -> None:
        """load_users_file raises ConfigError with all problems."""
        path = self.write('[users.alice]\ngroup_policy = "Staff"\n[users.bob]\npassword_hash = "x"\n')
        with self.assertRaises(ConfigError) as raised:
            load_users_file(path)
        self.assertEqual(
            raised.exception.problems,
            [
                "users.alice.password_hash: missing",
                "users.bob.password_hash: not a bcrypt or argon2 hash (make one with `mailgwctl hash-password`)",
            ],
        )

    def test_syntaxError(self) -> None:
        """A TOML error names the file, line and column."""
        path = self.write("[users.alice]\npassword_hash = \n")
        with self.assertRaises(ConfigError) as raised:
            load_users_file(path)
        self.assertEqual(raised.exception.problems, [f"{path}: line 2, column 17: invalid TOML: Invalid value"])

    def test_missingFile(self) -> None:
        """A missing file is a ConfigError naming it."""
        path = Path(self.mktemp())
        self.assertRaises(ConfigError, load_users_file, path)

    def test_sampleUsersFile(self) -> None:
        """The sample users file has the demo user with password "demo-password"."""
        users = load_users_file(Path(__file__).resolve().parent.parent / "etc" / "users.toml")
        self.assertEqual(list(users), ["demo"])
        self.assertTrue(users["demo"].password_hash.startswith("$2b$"))
        self.assertTrue(verify_password(users["demo"].password_hash, "demo-password"))
        self.assertFalse(verify_password(users["demo"].password_hash, "demo"))
