"""Remote POP accounts [6]: validation with clear errors, the password key file and
encryption at rest, and the API the admin channel calls (through the PollerService,
with the admin channel's error types)."""

from __future__ import annotations

import os
import stat
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.admin.commands import InvalidAccount, NoSuchAccount, NotAvailable
from mailgw.admin.responder import GatewayAdminBackend
from mailgw.poller.accounts import (
    AccountInvalid,
    AccountNotFound,
    Accounts,
    KeyFileError,
    PasswordCipher,
    PasswordUnreadable,
    load_or_create_key,
    validate_fields,
)
from mailgw.poller.message import DEFAULT_RECIPIENT_HEADERS
from mailgw.poller.service import PollerService
from mailgw.state.sqlite import SQLiteState
from mailgw.upstream import Connector
from tests.servers.poller_fixtures import environment

PASSWORD = "Sup3r-Secret-Passw0rd"
VALID = {"host": "pop.isp.example", "username": "sales", "password": PASSWORD, "domain": "Example.COM"}


class ValidationTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """An add needs host, username, password and domain; the rest defaults (port
        by TLS mode), names are normalised."""
        values = validate_fields(VALID)
        self.assertEqual(values["port"], 995)
        self.assertEqual(values["tls"], "implicit")
        self.assertEqual(values["domain"], "example.com")
        self.assertEqual(values["recipient_headers"], DEFAULT_RECIPIENT_HEADERS)
        self.assertEqual(values["no_recipient_action"], "delete")
        self.assertEqual(validate_fields({**VALID, "tls": "STARTTLS"})["port"], 110)

    def test_stringsFromTheCommandLine(self) -> None:
        """Numbers, booleans and header lists are accepted as the CLI types them."""
        values = validate_fields(
            {
                **VALID,
                "port": "1995",
                "verify": "no",
                "leave_on_server": "yes",
                "leave_days": "7",
                "recipient_headers": "X-Original-To, To/Cc",
                "interval": "default",
            }
        )
        self.assertEqual(values["port"], 1995)
        self.assertIs(values["verify"], False)
        self.assertEqual(values["leave_days"], 7)
        self.assertEqual(values["recipient_headers"], ("X-Original-To", "To/Cc"))
        self.assertIsNone(values["interval"])

    def test_problemsNameTheirField(self) -> None:
        """Every problem is reported at once, each line starting with its field."""
        with self.assertRaises(AccountInvalid) as caught:
            validate_fields(
                {
                    "host": "bad host!",
                    "port": 99999,
                    "tls": "ssl",
                    "username": "two words",
                    "password": "a\nb",
                    "domain": "",
                    "interval": 1,
                    "recipient_headers": ["To:"],
                    "no_recipient_action": "bounce",
                    "colour": "red",
                    "verify": "maybe",
                }
            )
        problems = caught.exception.problems
        fields = sorted(line.split(":", 1)[0] for line in problems)
        self.assertEqual(
            fields,
            sorted(
                [
                    "host",
                    "port",
                    "tls",
                    "username",
                    "password",
                    "domain",
                    "interval",
                    "recipient_headers",
                    "no_recipient_action",
                    "colour",
                    "verify",
                ]
            ),
        )
        self.assertIn("port: must be 1..65535, got 99999", problems)

    def test_required(self) -> None:
        """A missing required field is named."""
        with self.assertRaises(AccountInvalid) as caught:
            validate_fields({"host": "h"})
        self.assertEqual(
            sorted(caught.exception.problems), ["domain: required", "password: required", "username: required"]
        )

    def test_ca(self) -> None:
        """A CA file must be an existing absolute path."""
        self.assertRaises(AccountInvalid, validate_fields, {**VALID, "ca": "relative.pem"})
        self.assertRaises(AccountInvalid, validate_fields, {**VALID, "ca": "/nonexistent/ca.pem"})
        path = Path(self.mktemp()).absolute()
        path.write_text("x")
        self.assertEqual(validate_fields({**VALID, "ca": str(path)})["ca"], str(path))

    def test_leaveDays(self) -> None:
        """leave_days needs leave_on_server."""
        self.assertRaises(AccountInvalid, validate_fields, {**VALID, "leave_days": 3})
        self.assertEqual(validate_fields({**VALID, "leave_days": 3, "leave_on_server": True})["leave_days"], 3)


class KeyFileTests(SynchronousTestCase):
    def test_created0600(self) -> None:
        """The key file is created 0600 and reused afterwards."""
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "poller.key"
        key = load_or_create_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(load_or_create_key(path), key)
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["poller.key"])

    def test_refusedWhenReadable(self) -> None:
        """A key file readable by others, or not a key, is refused."""
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "poller.key"
        load_or_create_key(path)
        os.chmod(path, 0o644)
        self.assertRaises(KeyFileError, load_or_create_key, path)
        os.chmod(path, 0o600)
        path.write_bytes(b"not a key")
        self.assertRaises(KeyFileError, load_or_create_key, path)

    def test_roundTrip(self) -> None:
        """Encrypted passwords decrypt with the same key only."""
        folder = Path(self.mktemp())
        folder.mkdir()
        cipher = PasswordCipher.from_key_file(folder / "a.key")
        token = cipher.encrypt(PASSWORD)
        self.assertNotIn(PASSWORD.encode(), token)
        self.assertEqual(cipher.decrypt(token), PASSWORD)
        other = PasswordCipher.from_key_file(folder / "b.key")
        self.assertRaises(PasswordUnreadable, other.decrypt, token)


class AccountsAPITests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        self.state = SQLiteState(self.folder / "state.sqlite3", reactor)
        await self.state.start()
        self.addCleanup(self.state.close)
        self.clock = Clock()
        self.clock.advance(1000)
        self.service = PollerService(
            environment(self.folder, "127.0.0.1", 25), self.state, Connector(reactor), reactor, clock=self.clock
        )
        self.accounts: Accounts = self.service.accounts

    async def test_addListEditDelete(self) -> None:
        """The account round trip: add answers the account without its password;
        list filters by domain; edit changes only the fields given; delete removes."""
        added = await self.accounts.add(VALID)
        self.assertEqual(added["id"], 1)
        self.assertNotIn("password", added)
        self.assertIs(added["password_set"], True)
        self.assertEqual(added["effective_interval"], 300)
        await self.accounts.add({**VALID, "domain": "other.example", "username": "info"})
        self.assertEqual([a["username"] for a in await self.accounts.list()], ["sales", "info"])
        self.assertEqual([a["id"] for a in await self.accounts.list("other.example")], [2])
        self.assertEqual(await self.accounts.list("nowhere.example"), [])
        edited = await self.accounts.edit("1", {"port": 1110, "tls": "starttls", "enabled": False})
        self.assertEqual(
            (edited["port"], edited["tls"], edited["enabled"], edited["username"]), (1110, "starttls", False, "sales")
        )
        await self.accounts.delete(2)
        self.assertEqual([a["id"] for a in await self.accounts.list()], [1])
        await self.assertFailure(defer_(self.accounts.delete(2)), AccountNotFound)
        await self.assertFailure(defer_(self.accounts.edit("x", {})), AccountNotFound)

    async def test_passwordNeverShownAndEncrypted(self) -> None:
        """The password is in no answer and not in the database file in clear; a new
        password is encrypted too."""
        account = await self.accounts.add(VALID)
        await self.accounts.edit(account["id"], {"password": "Another-Secret-42"})
        for answer in [await self.accounts.get(1), *await self.accounts.list()]:
            self.assertNotIn(PASSWORD, repr(answer))
            self.assertNotIn("Another-Secret-42", repr(answer))
        await self.state.close()
        for path in self.folder.iterdir():
            data = path.read_bytes()
            self.assertNotIn(b"Another-Secret-42", data, path)
            self.assertNotIn(PASSWORD.encode(), data, path)
        self.assertEqual(stat.S_IMODE(os.stat(self.folder / "poller.key").st_mode), 0o600)

    async def test_storedPasswordDecrypts(self) -> None:
        """The poller gets the password back for the login."""
        account = await self.accounts.add(VALID)
        record = await self.accounts.record(account["id"])
        self.assertEqual(self.accounts.password(record), PASSWORD)

    async def test_invalidNothingStored(self) -> None:
        """Refused fields store nothing."""
        await self.assertFailure(defer_(self.accounts.add({**VALID, "port": 0})), AccountInvalid)
        self.assertEqual(await self.accounts.list(), [])

    def backend(self, accounts: Accounts) -> GatewayAdminBackend:
        """The admin channel's backend with this poller (its other commands, which
        need a running gateway, are not used here)."""
        return GatewayAdminBackend(cast(Any, None), started=0.0, clock=self.clock, poller=accounts)

    async def test_throughTheAdminChannel(self) -> None:
        """The admin channel's backend takes the Accounts object as it is: ids as
        typed, its errors mapped to NoSuchAccount and InvalidAccount, no password in
        any answer, run-time details and counters in the listing."""
        backend = self.backend(self.accounts)
        added = await backend.accounts_add(dict(VALID))
        self.assertNotIn("password", added)
        [listed] = await backend.accounts_list(None)
        self.assertEqual(listed["metrics"]["delivered"], 0)
        self.assertEqual((listed["polling"], listed["last_poll"], listed["last_result"]), (False, None, None))
        self.assertEqual(await backend.accounts_list("elsewhere.example"), [])
        with self.assertRaises(InvalidAccount) as invalid:
            await backend.accounts_add({"host": "h"})
        self.assertIn("domain: required", invalid.exception.problems)
        with self.assertRaises(NoSuchAccount) as missing:
            await backend.accounts_edit("7", {"port": 1})
        self.assertEqual(str(missing.exception), "no remote POP account 7")
        await self.assertFailure(backend.accounts_edit(str(added["id"]), {"port": 0}), InvalidAccount)
        await self.assertFailure(backend.accounts_delete("7"), NoSuchAccount)
        await self.assertFailure(backend.accounts_check_now("x"), NoSuchAccount)
        await backend.accounts_delete(str(added["id"]))
        self.assertEqual(await backend.accounts_list(None), [])
        self.assertEqual(self.accounts.summary()["polls"], 0)

    async def test_checkNowWhenDisabled(self) -> None:
        """With [poller] enabled = false, check-now answers NotAvailable."""
        service = PollerService(
            environment(self.folder, "127.0.0.1", 25, enabled=False), self.state, Connector(reactor), reactor
        )
        added = await service.accounts.add(VALID)
        await self.assertFailure(self.backend(service.accounts).accounts_check_now(str(added["id"])), NotAvailable)


def defer_(coroutine: Coroutine[Any, Any, Any]) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(coroutine)
