"""Tests for the admin channel (SPEC [8.1]): the AMP contract of
:mod:`mailgw.admin.commands`, the responder and its backend over a real gateway, the
UNIX socket's safety rules, and ``mailgwctl``'s daemon commands."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

import mailgw
from mailgw.admin import commands as cmd
from mailgw.admin.channel import (
    SOCKET_MODE,
    AdminClient,
    AdminProtocolError,
    AdminSocketError,
    AdminUnavailable,
    UnsafeSocketPath,
    admin_service,
    check_socket_path,
)
from mailgw.admin.cli import format_duration, format_table, main, socket_from_config
from mailgw.admin.responder import GatewayAdminBackend, IAdminBackend, admin_protocol
from mailgw.config import AdminConfig
from tests.gateway import Gateway, start_gateway
from tests.servers.pki import TestPKI

SECRETS = ("ldap-bind-secret-4711", "radius-shared-secret-4711", "alice-admin-test-pw", "remote-pop-pw-4711")


def short_directory(testcase: SynchronousTestCase) -> Path:
    """A fresh folder with a short path (UNIX socket paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="mailgw-admin-", dir="/tmp"))
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def admin_config(path: Path) -> AdminConfig:
    return AdminConfig(socket=path, manhole="", manhole_authorized_keys=None, metrics="")


# --- A fake backend ------------------------------------------------------------------


SESSION = {
    "session_id": "a1b2c3d4e5f6",
    "protocol": "pop3",
    "client": "127.0.0.1:50000",
    "state": "authenticated",
    "user": "alice",
    "mail_user": "alice",
    "group_policy": "DfltGrpPolicy",
    "upstream": "127.0.0.1:110",
    "started": 1000.0,
    "last_activity": 1100.0,
    "bytes_from_client": 120,
    "bytes_to_client": 2_500_000,
    "age": 3725.0,
    "idle": 12.0,
}

STATUS = {
    "version": "0.1.0",
    "node_name": "gw1",
    "pid": 4242,
    "configuration": "/etc/mailgw/mailgw.toml",
    "started": 1000.0,
    "uptime": 90061.0,
    "listeners": [{"name": "pop3s/lo/995", "description": "pop3s/lo/995 (127.0.0.1, implicit TLS)", "running": True}],
    "sessions": {
        "total": 1,
        "by_protocol": {"pop3": {"unauthenticated": 0, "authenticating": 0, "authenticated": 1}},
    },
    "aaa_groups": [
        {
            "name": "RAD",
            "protocol": "radius",
            "servers": ["10.0.0.1:1812"],
            "health": "unknown",
            "last_test": None,
            # a backend that forgot itself: the channel drops these
            "secret": "radius-shared-secret-4711",
        }
    ],
    "poller": {"enabled": False, "running": False, "state": "not configured"},
    "sso": {"enabled": False, "mode": "inline", "running": False, "state": "not configured"},
    "reload": "available",
}


IDENTITY = {
    "ip": "10.1.2.3",
    "mac": None,
    "user": "alice",
    "source": "monitor",
    "group_policy": None,
    "first_seen": 1796190000.0,
    "renewed": 1796193600.0,
    "expires": 1796222400.0,
    "session_id": "0123456789abcdef",
    "expires_in": 28800.0,
}

SSO_OFF = "POP3 SSO is off in this daemon (sso.pop3.enabled = false): no identity table"


@implementer(IAdminBackend)
class FakeBackend:
    """Answers from canned data and records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.sessions_list = [SESSION]
        self.problems: list[str] = []
        self.reload_available = True
        self.accounts: dict[str, dict[str, Any]] = {
            "1": {"id": "1", "domain": "example.org", "host": "pop.isp.net", "username": "shop",
                  "enabled": True, "password": "remote-pop-pw-4711"},
            "2": {"id": "2", "domain": "example.com", "host": "pop.other.net", "username": "info",
                  "enabled": False, "password": "remote-pop-pw-4711"},
        }  # fmt: skip
        self.sso_enabled = True
        self.identities: dict[str, dict[str, Any]] = {
            "10.1.2.3": dict(IDENTITY),
            "2001:db8::5": dict(IDENTITY, ip="2001:db8::5", user="bob", source="inline", mac="00:11:22:33:44:55",
                                group_policy="Staff", expires_in=59.0),
        }  # fmt: skip
        #: the authentication cache: (group, user)
        self.cache = {("LOCAL", "alice"), ("LOCAL", "bob"), ("RAD", "carol")}

    def status(self) -> dict[str, Any]:
        self.calls.append(("status",))
        return json.loads(json.dumps(STATUS))  # type: ignore[no-any-return]

    def workers(self) -> list[dict[str, Any]]:
        return []

    def sessions(self, protocol: str | None) -> list[dict[str, Any]]:
        self.calls.append(("sessions", protocol))
        return list(self.sessions_list)

    def kill(self, session_id: str) -> dict[str, Any]:
        self.calls.append(("kill", session_id))
        if session_id != SESSION["session_id"]:
            raise cmd.NoSuchSession(f"no session {session_id!r}")
        return dict(SESSION)

    def reload(self) -> defer.Deferred[list[str]]:
        self.calls.append(("reload",))
        if not self.reload_available:
            raise cmd.NotAvailable("reload is not available in this daemon")
        return defer.succeed(list(self.problems))

    def aaa_test(self, group: str, user: str, password: str) -> defer.Deferred[dict[str, Any]]:
        self.calls.append(("aaa_test", group, user, password))
        if group != "LOCAL":
            raise cmd.NoSuchGroup(f"no AAA server group {group!r}")
        return defer.succeed(
            {
                "group": group,
                "user": user,
                "result": "accepted" if password == "alice-admin-test-pw" else "rejected",
                "reason": None if password == "alice-admin-test-pw" else "wrong password",
                "password": password,  # dropped by the channel
                "group_policy": {"name": "Staff", "simultaneous_logins": 2, "idle_timeout": 600,
                                 "max_session_time": 0},
                "attributes": {"server_group": "LOCAL", "radius_class": None, "ldap_policies": [],
                               "local_policy": "Staff"},
                "default_group_policy": "DfltGrpPolicy",
                "default_group_policy_from": "pop3s",
                "latency_ms": 3.5,
            }
        )  # fmt: skip

    def aaa_flush(self, group: str | None, user: str | None) -> dict[str, Any]:
        self.calls.append(("aaa_flush", group, user))
        if group not in (None, "LOCAL", "RAD"):
            raise cmd.NoSuchGroup(f"no AAA server group {group!r} (groups: LOCAL, RAD)")
        doomed = {k for k in self.cache if group in (None, k[0]) and user in (None, k[1])}
        self.cache -= doomed
        return {"group": group, "user": user, "flushed": len(doomed), "remaining": len(self.cache)}

    def _sso(self) -> dict[str, dict[str, Any]]:
        if not self.sso_enabled:
            raise cmd.NotAvailable(SSO_OFF)
        return self.identities

    def sso_list(self) -> list[dict[str, Any]]:
        self.calls.append(("sso_list",))
        return list(self._sso().values())

    def sso_lookup(self, ip: str) -> dict[str, Any]:
        self.calls.append(("sso_lookup", ip))
        if ip not in self._sso():
            raise cmd.NoSuchIdentity(f"no SSO identity for {ip}")
        return self.identities[ip]

    def sso_remove(self, ip: str) -> dict[str, Any]:
        self.calls.append(("sso_remove", ip))
        if ip not in self._sso():
            raise cmd.NoSuchIdentity(f"no SSO identity for {ip}")
        return self.identities.pop(ip)

    def sso_replay(self, path: str) -> defer.Deferred[dict[str, Any]]:
        self.calls.append(("sso_replay", path))
        self._sso()
        if not path.endswith(".pcap"):
            return defer.fail(cmd.ReplayFailed(f"{path} is not a capture file this gateway can read: bad magic"))
        return defer.succeed(
            {"path": path, "frames": 42, "logins": 3, "learnt": 2, "outside_policy": 1, "streams_tls": 1,
             "statistics": {"frames": 42, "logins": 3}}
        )  # fmt: skip

    def _account(self, account_id: str) -> dict[str, Any]:
        if account_id not in self.accounts:
            raise cmd.NoSuchAccount(f"no account {account_id!r}")
        return self.accounts[account_id]

    def accounts_list(self, domain: str | None) -> defer.Deferred[list[dict[str, Any]]]:
        self.calls.append(("accounts_list", domain))
        return defer.succeed([a for a in self.accounts.values() if domain is None or a["domain"] == domain])

    def accounts_add(self, fields: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        self.calls.append(("accounts_add", fields))
        if "host" not in fields:
            return defer.fail(cmd.InvalidAccount(["host: missing", "username: missing"]))
        account = {"id": "3", **fields}
        self.accounts["3"] = account
        return defer.succeed(account)

    def accounts_edit(self, account_id: str, fields: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        self.calls.append(("accounts_edit", account_id, fields))
        account = self._account(account_id)
        account.update(fields)
        return defer.succeed(account)

    def accounts_delete(self, account_id: str) -> defer.Deferred[None]:
        self.calls.append(("accounts_delete", account_id))
        self._account(account_id)
        del self.accounts[account_id]
        return defer.succeed(None)

    def accounts_check_now(
        self, account_id: str, progress: Callable[[str], None] | None = None
    ) -> defer.Deferred[dict[str, Any]]:
        self.calls.append(("accounts_check_now", account_id))
        self._account(account_id)
        if progress is not None:
            progress("account 1: 1 fetched, 1 delivered")
        return defer.succeed(
            {"fetched": 3, "delivered": 2, "deleted": 2, "skipped": [{"uidl": "u3", "reason": "no recipient"}]}
        )


class AMPPair:
    """An admin AMP server (the responder over C{backend}) and a client, connected in
    memory; C{call} is a synchronous call for code that expects one (the CLI)."""

    def __init__(self, backend: IAdminBackend) -> None:
        self.client: amp.AMP
        self.pump: IOPump
        self.progress: list[str] = []
        self.client, _, self.pump = connectedServerAndClient(
            lambda: admin_protocol(backend), lambda: amp.AMP(locator=ProgressCollector(self.progress))
        )

    def remote(self, command: type[amp.Command], **arguments: Any) -> defer.Deferred[dict[str, Any]]:
        # AMP treats an error nobody waits for when it arrives as unhandled: chain
        # before the answer is pumped through.
        answer: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.client.callRemote(command, **arguments).chainDeferred(answer)
        self.pump.flush()
        return answer

    def call(
        self, command: type[amp.Command], *, on_progress: Callable[[str], None] | None = None, **arguments: Any
    ) -> dict[str, Any]:
        results: list[Any] = []
        self.remote(command, **arguments).addBoth(results.append)
        assert results, "no answer"
        if on_progress is not None:
            for line in self.progress:
                on_progress(line)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        answer: dict[str, Any] = results[0]
        return answer


def assert_no_secret(testcase: SynchronousTestCase, value: object) -> None:
    text = json.dumps(value) if not isinstance(value, str) else value
    for secret in SECRETS:
        testcase.assertNotIn(secret, text)


# --- The contract over AMP -----------------------------------------------------------


class JSONArgumentTests(SynchronousTestCase):
    """The JSON argument type."""

    def test_roundTrip(self) -> None:
        """A value goes through toBox/fromBox unchanged."""
        argument = cmd.JSON()
        value = {"a": [1, 2.5, None, True], "é": "ü"}
        box: dict[bytes, bytes] = {}
        argument.toBox(b"value", box, {"value": value}, None)
        objects: dict[str, Any] = {}
        argument.fromBox(b"value", box, objects, None)
        self.assertEqual(objects, {"value": value})

    def test_longValueSplit(self) -> None:
        """A value longer than one AMP value is split over several keys, each within
        the limit, and joined again."""
        argument = cmd.JSON()
        value = ["x" * 1000] * 200
        box: dict[bytes, bytes] = {}
        argument.toBox(b"value", box, {"value": value}, None)
        self.assertGreater(len(box), 2)
        self.assertTrue(all(len(v) <= amp.MAX_VALUE_LENGTH for v in box.values()))
        objects: dict[str, Any] = {}
        argument.fromBox(b"value", box, objects, None)
        self.assertEqual(objects["value"], value)
        self.assertEqual(box, {})

    def test_optionalAbsent(self) -> None:
        """An optional JSON argument left out is None."""
        argument = cmd.JSON(optional=True)
        box: dict[bytes, bytes] = {}
        argument.toBox(b"value", box, {"value": None}, None)
        self.assertEqual(box, {})
        objects: dict[str, Any] = {}
        argument.fromBox(b"value", box, objects, None)
        self.assertEqual(objects, {"value": None})

    def test_scrub(self) -> None:
        """scrub drops secret-named keys at any depth, in any case."""
        value = {"a": 1, "Password": "x", "b": [{"secret": "y", "c": 2}], "d": {"bind_password": "z"}}
        self.assertEqual(cmd.scrub(value), {"a": 1, "b": [{"c": 2}], "d": {}})


class ResponderTests(SynchronousTestCase):
    """AdminResponder answers every command of the contract from its backend."""

    def setUp(self) -> None:
        self.backend = FakeBackend()
        self.pair = AMPPair(self.backend)

    def test_fakeBackendProvidesInterface(self) -> None:
        """The fake backend of these tests implements IAdminBackend."""
        self.assertTrue(verifyObject(IAdminBackend, self.backend))

    def test_status(self) -> None:
        """Status answers with the backend's status, secrets dropped."""
        status = self.successResultOf(self.pair.remote(cmd.Status))["status"]
        self.assertEqual(status["version"], "0.1.0")
        self.assertNotIn("secret", status["aaa_groups"][0])
        assert_no_secret(self, status)

    def test_sessions(self) -> None:
        """Sessions passes the protocol (None when left out) and answers with the list."""
        self.assertEqual(self.successResultOf(self.pair.remote(cmd.Sessions))["sessions"], [SESSION])
        self.successResultOf(self.pair.remote(cmd.Sessions, protocol="imap4"))
        self.assertEqual(self.backend.calls, [("sessions", None), ("sessions", "imap4")])

    def test_manySessions(self) -> None:
        """A session list longer than one AMP value gets through."""
        self.backend.sessions_list = [dict(SESSION, session_id=f"{i:012x}") for i in range(2000)]
        sessions = self.successResultOf(self.pair.remote(cmd.Sessions))["sessions"]
        self.assertEqual(len(sessions), 2000)
        self.assertEqual(sessions[-1]["session_id"], f"{1999:012x}")

    def test_kill(self) -> None:
        """Kill answers with the session it closed."""
        answer = self.successResultOf(self.pair.remote(cmd.Kill, session_id=SESSION["session_id"]))
        self.assertEqual(answer["session"]["user"], "alice")

    def test_killUnknown(self) -> None:
        """An unknown session id comes back as NoSuchSession with its message."""
        failure = self.failureResultOf(self.pair.remote(cmd.Kill, session_id="nope"), cmd.NoSuchSession)
        self.assertEqual(str(failure.value), "no session 'nope'")

    def test_reload(self) -> None:
        """Reload succeeds when the backend reports no problem."""
        self.assertEqual(self.successResultOf(self.pair.remote(cmd.Reload)), {})
        self.assertEqual(self.backend.calls, [("reload",)])

    def test_reloadFailed(self) -> None:
        """Problems come back as ReloadFailed carrying each problem."""
        self.backend.problems = ["pop3s.port: must be 1..65535, got 0", "gateway.log_format: must be text or json"]
        failure = self.failureResultOf(self.pair.remote(cmd.Reload), cmd.ReloadFailed)
        self.assertEqual(failure.value.problems, self.backend.problems)

    def test_reloadNotAvailable(self) -> None:
        """A backend without reload answers NotAvailable."""
        self.backend.reload_available = False
        self.failureResultOf(self.pair.remote(cmd.Reload), cmd.NotAvailable)

    def test_aaaTest(self) -> None:
        """AaaTest passes group, user and password; the answer never holds the password."""
        answer = self.successResultOf(
            self.pair.remote(cmd.AaaTest, group="LOCAL", user="alice", password="alice-admin-test-pw")
        )
        self.assertEqual(answer["result"]["result"], "accepted")
        self.assertEqual(self.backend.calls, [("aaa_test", "LOCAL", "alice", "alice-admin-test-pw")])
        self.assertNotIn("password", answer["result"])
        assert_no_secret(self, answer)

    def test_aaaTestUnknownGroup(self) -> None:
        """An unknown group comes back as NoSuchGroup."""
        self.failureResultOf(self.pair.remote(cmd.AaaTest, group="X", user="a", password="p"), cmd.NoSuchGroup)

    def test_aaaFlush(self) -> None:
        """AaaFlush passes the group and user (None when left out) and answers with
        the count; an unknown group comes back as NoSuchGroup naming the known ones."""
        result = self.successResultOf(self.pair.remote(cmd.AaaFlush, group="LOCAL", user="alice"))["result"]
        self.assertEqual((result["flushed"], result["remaining"]), (1, 2))
        self.assertEqual(self.successResultOf(self.pair.remote(cmd.AaaFlush, group="LOCAL"))["result"]["flushed"], 1)
        self.assertEqual(self.successResultOf(self.pair.remote(cmd.AaaFlush))["result"]["flushed"], 1)
        self.assertEqual(
            self.backend.calls,
            [("aaa_flush", "LOCAL", "alice"), ("aaa_flush", "LOCAL", None), ("aaa_flush", None, None)],
        )
        failure = self.failureResultOf(self.pair.remote(cmd.AaaFlush, group="NOPE"), cmd.NoSuchGroup)
        self.assertEqual(str(failure.value), "no AAA server group 'NOPE' (groups: LOCAL, RAD)")

    def test_ssoCommands(self) -> None:
        """SsoList, SsoLookup and SsoRemove answer with the entries; an address
        without one is NoSuchIdentity; SsoReplay passes the path and answers with
        the counts, or ReplayFailed."""
        identities = self.successResultOf(self.pair.remote(cmd.SsoList))["identities"]
        self.assertEqual([i["ip"] for i in identities], ["10.1.2.3", "2001:db8::5"])
        self.assertEqual(self.successResultOf(self.pair.remote(cmd.SsoLookup, ip="10.1.2.3"))["identity"], IDENTITY)
        removed = self.successResultOf(self.pair.remote(cmd.SsoRemove, ip="10.1.2.3"))["identity"]
        self.assertEqual(removed["user"], "alice")
        failure = self.failureResultOf(self.pair.remote(cmd.SsoLookup, ip="10.1.2.3"), cmd.NoSuchIdentity)
        self.assertEqual(str(failure.value), "no SSO identity for 10.1.2.3")
        self.failureResultOf(self.pair.remote(cmd.SsoRemove, ip="10.1.2.3"), cmd.NoSuchIdentity)
        result = self.successResultOf(self.pair.remote(cmd.SsoReplay, path="/tmp/c.pcap"))["result"]
        self.assertEqual((result["frames"], result["learnt"]), (42, 2))
        self.failureResultOf(self.pair.remote(cmd.SsoReplay, path="/tmp/c.txt"), cmd.ReplayFailed)
        self.assertEqual(self.backend.calls[-2:], [("sso_replay", "/tmp/c.pcap"), ("sso_replay", "/tmp/c.txt")])

    def test_ssoNotAvailable(self) -> None:
        """With SSO off every sso command comes back as NotAvailable."""
        self.backend.sso_enabled = False
        for command, arguments in [
            (cmd.SsoList, {}),
            (cmd.SsoLookup, {"ip": "10.1.2.3"}),
            (cmd.SsoRemove, {"ip": "10.1.2.3"}),
            (cmd.SsoReplay, {"path": "/tmp/c.pcap"}),
        ]:
            failure = self.failureResultOf(self.pair.remote(command, **arguments), cmd.NotAvailable)
            self.assertEqual(str(failure.value), SSO_OFF)

    def test_accountsList(self) -> None:
        """AccountsList passes the domain and answers without passwords."""
        accounts = self.successResultOf(self.pair.remote(cmd.AccountsList, domain="example.org"))["accounts"]
        self.assertEqual([a["id"] for a in accounts], ["1"])
        accounts = self.successResultOf(self.pair.remote(cmd.AccountsList))["accounts"]
        self.assertEqual([a["id"] for a in accounts], ["1", "2"])
        self.assertTrue(all("password" not in a for a in accounts))
        assert_no_secret(self, accounts)

    def test_accountsAdd(self) -> None:
        """AccountsAdd carries the fields (the password included) to the backend; the
        answer drops the password."""
        fields = {"host": "pop.x.net", "username": "u", "domain": "x.org", "password": "remote-pop-pw-4711"}
        account = self.successResultOf(self.pair.remote(cmd.AccountsAdd, fields=fields))["account"]
        self.assertEqual(self.backend.calls, [("accounts_add", fields)])
        self.assertEqual(account, {"id": "3", "host": "pop.x.net", "username": "u", "domain": "x.org"})

    def test_accountsAddInvalid(self) -> None:
        """Refused fields come back as InvalidAccount with each problem."""
        failure = self.failureResultOf(self.pair.remote(cmd.AccountsAdd, fields={}), cmd.InvalidAccount)
        self.assertEqual(failure.value.problems, ["host: missing", "username: missing"])

    def test_accountsEdit(self) -> None:
        """AccountsEdit passes the id and fields to the backend; the answer is the
        edited account, without its password."""
        account = self.successResultOf(self.pair.remote(cmd.AccountsEdit, id="2", fields={"enabled": True}))
        self.assertEqual(self.backend.calls, [("accounts_edit", "2", {"enabled": True})])
        self.assertEqual(
            account["account"],
            {"id": "2", "domain": "example.com", "host": "pop.other.net", "username": "info", "enabled": True},
        )

    def test_accountsUnknown(self) -> None:
        """An unknown account id comes back as NoSuchAccount, for every command."""
        calls: list[tuple[type[amp.Command], dict[str, Any]]] = [
            (cmd.AccountsEdit, {"id": "9", "fields": {"enabled": True}}),
            (cmd.AccountsDelete, {"id": "9"}),
            (cmd.AccountsCheckNow, {"id": "9"}),
        ]
        for command, arguments in calls:
            self.failureResultOf(self.pair.remote(command, **arguments), cmd.NoSuchAccount)

    def test_accountsDeleteAndCheckNow(self) -> None:
        """AccountsDelete answers empty; AccountsCheckNow with what happened."""
        result = self.successResultOf(self.pair.remote(cmd.AccountsCheckNow, id="1"))["result"]
        self.assertEqual(result["delivered"], 2)
        self.assertEqual(self.pair.progress, ["account 1: 1 fetched, 1 delivered"])
        self.assertEqual(self.successResultOf(self.pair.remote(cmd.AccountsDelete, id="1")), {})
        self.assertNotIn("1", self.backend.accounts)


# --- The backend over a real gateway -------------------------------------------------


class ClientProbe(protocol.Protocol):
    """A raw client connection: fires C{greeted} on the first bytes and C{lost}
    when the connection closes."""

    def __init__(self) -> None:
        self.greeted: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted.called:
            self.greeted.callback(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(None)


class AccountNotFound(KeyError):
    """As the poller's: a KeyError whose message names the account."""

    def __str__(self) -> str:
        return f"no remote POP account {self.args[0]}"


class AccountInvalid(ValueError):
    """As the poller's: a ValueError with the problems."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Report:
    """A poll report as a dataclass."""

    fetched: int
    skipped: list[str]


class ProgressCollector(amp.CommandLocator):
    """What mailgwctl does with the daemon's progress lines, for iosim clients."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    @cmd.CheckNowProgress.responder
    def progress(self, line: str) -> dict[str, Any]:
        self.lines.append(line)
        return {}


class FakePoller:
    """The poller's account API (L{PollerAdmin}): some answers plain values, some
    Deferreds, some coroutines."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def summary(self) -> Mapping[str, Any]:
        return {"accounts": 1}

    def list(self, domain: str | None = None) -> list[dict[str, Any]]:
        self.calls.append(("list", domain))
        return [{"id": 1, "domain": "example.org", "password": SECRETS[3]}]

    def add(self, fields: Mapping[str, Any]) -> defer.Deferred[dict[str, Any]]:
        self.calls.append(("add", dict(fields)))
        if "host" not in fields:
            return defer.fail(AccountInvalid(["host: missing", "port: must be 1..65535"]))
        return defer.succeed({"id": 2, **fields})

    async def edit(self, account_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        raise AccountNotFound(account_id)

    async def delete(self, account_id: str) -> None:
        self.calls.append(("delete", account_id))

    def check_now(self, account_id: str, progress: Callable[[Any], None] | None = None) -> Report:
        if progress is not None:
            progress(Report(fetched=1, skipped=[]))
        return Report(fetched=2, skipped=["u3: no recipient"])


class GatewayBackendTests(TestCase):
    """GatewayAdminBackend over a GatewayService built in this process."""

    timeout = 60

    def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        self.pki = TestPKI(directory / "pki")
        groups = [
            {"name": "LOCAL", "protocol": "local", "users_file": "users.toml"},
            {
                "name": "DIR",
                "protocol": "ldap",
                "servers": ["ldap://127.0.0.1:9"],
                "base_dn": "dc=example,dc=org",
                "bind_dn": "cn=reader,dc=example,dc=org",
                "bind_password": SECRETS[0],
            },
            {"name": "RAD", "protocol": "radius", "servers": [{"host": "127.0.0.1", "secret": SECRETS[1]}]},
        ]
        self.gateway: Gateway = start_gateway(
            self,
            self.pki,
            {"alice": (SECRETS[2], "Staff")},
            {"default_server": {"host": "127.0.0.1", "port": 9, "tls": "none"}, "allow_plaintext_auth": True},
            aaa_server_group=groups,
            group_policy=[{"name": "Staff", "simultaneous_logins": 2}],
        )
        assert self.gateway.service is not None
        self.service = self.gateway.service
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.backend = GatewayAdminBackend(self.service, started=reactor.seconds(), clock=reactor)  # type: ignore[attr-defined]

    def test_providesInterface(self) -> None:
        """GatewayAdminBackend implements IAdminBackend."""
        self.assertTrue(verifyObject(IAdminBackend, self.backend))

    async def connect(self) -> ClientProbe:
        probe = ClientProbe()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port("pop3s", implicit=False))
        await connectProtocol(endpoint, probe)
        await probe.greeted
        return probe

    def test_status(self) -> None:
        """Status: version, uptime by the clock, the listeners, sessions by protocol
        and state, the AAA groups with their servers, poller and SSO not running."""
        backend = GatewayAdminBackend(self.service, started=400.0, clock=self.clock)
        status = backend.status()
        self.assertEqual(status["version"], mailgw.__version__)
        self.assertEqual(status["uptime"], 600.0)
        self.assertEqual(status["node_name"], "mailgw-test")
        self.assertEqual(
            sorted(listener["name"] for listener in status["listeners"]),
            sorted(listener.name for listener in self.service.listeners()),
        )
        self.assertTrue(all(listener["running"] for listener in status["listeners"]))
        self.assertEqual(
            status["sessions"],
            {"total": 0, "by_protocol": {"pop3": {"unauthenticated": 0, "authenticating": 0, "authenticated": 0}}},
        )
        groups = {g["name"]: g for g in status["aaa_groups"]}
        self.assertEqual(groups["DIR"]["servers"], ["ldap://127.0.0.1:9"])
        self.assertEqual(groups["RAD"]["servers"], ["127.0.0.1:1812"])
        self.assertEqual(groups["LOCAL"]["health"], "unknown")
        self.assertEqual(status["poller"]["state"], "not configured")
        self.assertEqual(status["sso"]["state"], "not configured")
        self.assertEqual(status["reload"], "not available")
        json.dumps(status)  # JSON-ready

    def test_statusHasNoSecret(self) -> None:
        """Neither the LDAP bind password nor the RADIUS secret appears in the status,
        whatever the format."""
        status = self.backend.status()
        assert_no_secret(self, status)
        assert_no_secret(self, repr(status))
        out = StringIO()
        main(["status"], stdout=out, stderr=StringIO(), connect=lambda path, timeout: AMPPair(self.backend))
        assert_no_secret(self, out.getvalue())

    async def test_sessionsAndKill(self) -> None:
        """A connected client is listed (by protocol, with its state); kill closes it
        and answers with the session; a second kill is NoSuchSession."""
        probe = await self.connect()

        def local(result: Any) -> Any:
            assert not isinstance(result, defer.Deferred)  # one gateway: answered at once
            return result

        sessions = local(self.backend.sessions(None))
        self.assertEqual(len(sessions), 1)
        session = sessions[0]
        self.assertEqual((session["protocol"], session["state"]), ("pop3", "unauthenticated"))
        self.assertEqual([s["session_id"] for s in local(self.backend.sessions("pop3s"))], [session["session_id"]])
        self.assertEqual(self.backend.sessions("imap4"), [])
        self.assertEqual(self.backend.status()["sessions"]["by_protocol"]["pop3"]["unauthenticated"], 1)
        killed = local(self.backend.kill(session["session_id"]))
        self.assertEqual(killed["session_id"], session["session_id"])
        await probe.lost
        self.assertEqual(self.backend.sessions(None), [])
        self.assertRaises(cmd.NoSuchSession, self.backend.kill, session["session_id"])

    async def test_aaaTestAccepted(self) -> None:
        """aaa test through the local group: accepted, with the group policy and the
        attributes; the password is in neither the answer nor the log."""
        result = await self.backend.aaa_test("LOCAL", "alice", SECRETS[2])
        self.assertEqual(result["result"], "accepted")
        self.assertEqual(result["group_policy"]["name"], "Staff")
        self.assertEqual(result["group_policy"]["simultaneous_logins"], 2)
        self.assertEqual(result["attributes"]["local_policy"], "Staff")
        self.assertEqual(result["default_group_policy_from"], "pop3s")
        assert_no_secret(self, result)
        assert_no_secret(self, self.gateway.log_text())
        group = next(g for g in self.backend.status()["aaa_groups"] if g["name"] == "LOCAL")
        self.assertEqual((group["health"], group["last_test"]["result"]), ("reachable", "accepted"))

    async def test_aaaTestRejected(self) -> None:
        """A wrong password is rejected with the checker's reason; an unknown user too."""
        result = await self.backend.aaa_test("LOCAL", "alice", "wrong-pw-1234")
        self.assertEqual(result["result"], "rejected")
        self.assertIn("wrong password", result["reason"])
        self.assertNotIn("wrong-pw-1234", json.dumps(result))
        result = await self.backend.aaa_test("LOCAL", "mallory", "x")
        self.assertEqual(result["result"], "rejected")

    def test_aaaTestUnknownGroup(self) -> None:
        """An unknown group is NoSuchGroup."""
        self.assertRaises(cmd.NoSuchGroup, self.backend.aaa_test, "NOPE", "alice", "x")

    async def _flush(self, group: str | None, user: str | None) -> dict[str, Any]:
        result = self.backend.aaa_flush(group, user)
        return await result if isinstance(result, defer.Deferred) else result

    async def test_aaaFlush(self) -> None:
        """aaa flush forgets what the authentication cache remembers of a user, a
        group or all, and says how many; an unknown group is NoSuchGroup naming the
        known ones; a user without a group is InvalidArgument."""
        cache = self.service.auth_cache
        self.assertEqual((await self.backend.aaa_test("LOCAL", "alice", SECRETS[2]))["result"], "accepted")
        self.assertEqual(len(cache), 1)
        self.assertEqual((await self._flush("LOCAL", "mallory"))["flushed"], 0)
        result = (await self._flush("LOCAL", "alice"))
        self.assertEqual(result, {"group": "LOCAL", "user": "alice", "cache_ttl": 300, "flushed": 1, "remaining": 0})
        self.assertEqual(len(cache), 0)
        await self.backend.aaa_test("LOCAL", "alice", SECRETS[2])
        self.assertEqual((await self._flush("LOCAL", None))["flushed"], 1)
        await self.backend.aaa_test("LOCAL", "alice", SECRETS[2])
        self.assertEqual((await self._flush(None, None))["flushed"], 1)
        with self.assertRaises(cmd.NoSuchGroup) as caught:
            self.backend.aaa_flush("NOPE", None)
        self.assertEqual(str(caught.exception), "no AAA server group 'NOPE' (groups: LOCAL, DIR, RAD)")
        self.assertRaises(cmd.InvalidArgument, self.backend.aaa_flush, None, "alice")
        assert_no_secret(self, result)

    def test_ssoOff(self) -> None:
        """With sso.pop3.enabled = false every sso command is NotAvailable, saying
        so; status says SSO is not configured."""
        for call in (
            self.backend.sso_list,
            lambda: self.backend.sso_lookup("10.0.0.1"),
            lambda: self.backend.sso_remove("10.0.0.1"),
            lambda: self.backend.sso_replay("/tmp/x.pcap"),
        ):
            with self.assertRaises(cmd.NotAvailable) as caught:
                call()
            self.assertEqual(str(caught.exception), SSO_OFF)
        self.assertEqual(self.backend.status()["sso"]["state"], "not configured")

    def test_reloadNotWired(self) -> None:
        """Without a reload callable, reload is NotAvailable; with one, it is called."""
        self.assertRaises(cmd.NotAvailable, self.backend.reload)
        backend = GatewayAdminBackend(
            self.service, started=0.0, clock=self.clock, reload=lambda: defer.succeed(["x: bad"])
        )
        self.assertEqual(self.successResultOf(backend.reload()), ["x: bad"])

    def test_accountsNotAvailable(self) -> None:
        """Without a poller, every accounts command fails with NotAvailable."""
        for d in [
            self.backend.accounts_list(None),
            self.backend.accounts_add({}),
            self.backend.accounts_edit("1", {}),
            self.backend.accounts_delete("1"),
            self.backend.accounts_check_now("1"),
        ]:
            self.failureResultOf(d, cmd.NotAvailable)

    def test_accountsThroughPoller(self) -> None:
        """With a poller, the accounts commands reach it (plain values, Deferreds and
        coroutines alike); its KeyError and ValueError become NoSuchAccount and
        InvalidAccount; status shows its summary; over the channel the passwords
        are dropped."""
        poller = FakePoller()
        backend = GatewayAdminBackend(self.service, started=0.0, clock=self.clock, poller=poller)
        self.assertEqual(
            backend.status()["poller"], {"enabled": False, "running": True, "state": "running", "accounts": 1}
        )
        pair = AMPPair(backend)
        accounts = self.successResultOf(pair.remote(cmd.AccountsList, domain="example.org"))["accounts"]
        self.assertEqual(accounts, [{"id": 1, "domain": "example.org"}])
        added = self.successResultOf(pair.remote(cmd.AccountsAdd, fields={"host": "h", "password": SECRETS[3]}))
        self.assertEqual(added["account"], {"id": 2, "host": "h"})
        invalid = self.failureResultOf(pair.remote(cmd.AccountsAdd, fields={}), cmd.InvalidAccount)
        self.assertEqual(invalid.value.problems, ["host: missing", "port: must be 1..65535"])
        missing = self.failureResultOf(pair.remote(cmd.AccountsEdit, id="7", fields={"port": 1}), cmd.NoSuchAccount)
        self.assertEqual(str(missing.value), "no remote POP account 7")
        self.successResultOf(pair.remote(cmd.AccountsDelete, id="2"))
        report = self.successResultOf(pair.remote(cmd.AccountsCheckNow, id="1"))["result"]
        self.assertEqual(report, {"fetched": 2, "skipped": ["u3: no recipient"]})
        self.assertEqual(
            poller.calls,
            [("list", "example.org"), ("add", {"host": "h", "password": SECRETS[3]}), ("add", {}), ("delete", "2")],
        )


# --- The UNIX socket -----------------------------------------------------------------


class SocketPathTests(SynchronousTestCase):
    """check_socket_path refuses unsafe places and clears stale sockets."""

    def setUp(self) -> None:
        self.directory = short_directory(self)

    def test_missingFolderCreated(self) -> None:
        """A missing parent folder is created 0750."""
        path = self.directory / "run" / "admin.sock"
        check_socket_path(path)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o750)

    def test_pathTooLong(self) -> None:
        """A path longer than a UNIX socket's is refused with its length."""
        path = self.directory / ("x" * 100) / "admin.sock"
        with self.assertRaises(AdminSocketError) as raised:
            check_socket_path(path)
        self.assertIn("the path is too long", str(raised.exception))
        self.assertFalse(path.parent.exists())

    def test_worldWritableFolder(self) -> None:
        """A folder anyone may write to, without the sticky bit, is refused."""
        os.chmod(self.directory, 0o777)  # noqa: S103 - the unsafe folder under test
        with self.assertRaises(UnsafeSocketPath) as raised:
            check_socket_path(self.directory / "admin.sock")
        self.assertIn("writable by everyone", str(raised.exception))

    def test_stickyFolder(self) -> None:
        """A world-writable folder with the sticky bit (like /tmp) is accepted."""
        os.chmod(self.directory, 0o1777)  # noqa: S103 - the unsafe folder under test
        check_socket_path(self.directory / "admin.sock")

    def test_worldWritableAncestor(self) -> None:
        """A missing folder is not created inside an unsafe one."""
        os.chmod(self.directory, 0o777)  # noqa: S103 - the unsafe folder under test
        self.assertRaises(UnsafeSocketPath, check_socket_path, self.directory / "run" / "admin.sock")
        self.assertFalse((self.directory / "run").exists())

    def test_folderOfAnotherUser(self) -> None:
        """A folder another (non-root) user owns is refused."""
        if os.geteuid() != 0:
            raise self.skipTest("needs root to give a folder away")
        os.chown(self.directory, 65534, 65534)
        with self.assertRaises(UnsafeSocketPath) as raised:
            check_socket_path(self.directory / "admin.sock")
        self.assertIn("another user", str(raised.exception))

    def test_notASocket(self) -> None:
        """A path that exists and is not a socket (file, symlink) is refused and kept."""
        path = self.directory / "admin.sock"
        path.write_text("data")
        with self.assertRaises(UnsafeSocketPath) as raised:
            check_socket_path(path)
        self.assertIn("not a socket", str(raised.exception))
        self.assertEqual(path.read_text(), "data")
        link = self.directory / "link.sock"
        link.symlink_to(path)
        self.assertRaises(UnsafeSocketPath, check_socket_path, link)

    def test_staleSocketRemoved(self) -> None:
        """A socket nothing answers on is removed."""
        path = self.directory / "admin.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(str(path))
        check_socket_path(path)
        self.assertFalse(path.exists())

    def test_liveSocketRefused(self) -> None:
        """A socket something answers on (another daemon) is refused and kept."""
        path = self.directory / "admin.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
            live.bind(str(path))
            live.listen(1)
            with self.assertRaises(UnsafeSocketPath) as raised:
                check_socket_path(path)
        self.assertIn("already running", str(raised.exception))
        self.assertTrue(path.exists())


class ChannelTests(TestCase):
    """admin_service listens on the socket, answers AMP, cleans up."""

    timeout = 30

    def setUp(self) -> None:
        self.directory = short_directory(self)
        self.path = self.directory / "run" / "admin.sock"
        self.backend = FakeBackend()

    def start(self) -> Any:
        service = admin_service(admin_config(self.path), self.backend, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    async def test_listensAndAnswers(self) -> None:
        """The socket is created 0660 (even under a permissive umask) in a 0750
        folder; AdminClient gets answers and typed errors; stopping removes it."""
        previous = os.umask(0)
        try:
            service = self.start()
        finally:
            os.umask(previous)
        self.assertTrue(stat.S_ISSOCK(self.path.lstat().st_mode))
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), SOCKET_MODE)
        self.assertEqual(stat.S_IMODE(self.path.parent.stat().st_mode), 0o750)
        client = AdminClient(self.path, timeout=10)
        answer = await deferToThread(client.call, cmd.Status)
        self.assertEqual(answer["status"]["node_name"], "gw1")
        sessions = await deferToThread(client.call, cmd.Sessions, protocol=None)
        self.assertEqual(sessions["sessions"], [SESSION])
        error = await deferToThread(self.callFailing, client, cmd.Kill, session_id="nope")
        self.assertIsInstance(error, cmd.NoSuchSession)
        self.backend.problems = ["a: bad", "b: worse"]
        error = await deferToThread(self.callFailing, client, cmd.Reload)
        assert isinstance(error, cmd.ReloadFailed)
        self.assertEqual(error.problems, ["a: bad", "b: worse"])
        await service.stopService()
        self.assertFalse(self.path.exists())

    @staticmethod
    def callFailing(client: AdminClient, command: type[amp.Command], **arguments: Any) -> Exception:
        try:
            client.call(command, **arguments)
        except Exception as e:  # noqa: BLE001 - returned to the test
            return e
        raise AssertionError("no error")

    async def test_unexpectedError(self) -> None:
        """A backend bug: the client gets AdminProtocolError (the daemon logs it)."""

        def broken() -> dict[str, Any]:
            raise RuntimeError("bug")

        self.backend.status = broken  # type: ignore[method-assign]
        self.start()
        error = await deferToThread(self.callFailing, AdminClient(self.path, timeout=10), cmd.Status)
        self.assertIsInstance(error, AdminProtocolError)
        self.assertIn("could not complete the command", str(error))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_refusesToStart(self) -> None:
        """An unsafe path stops the start with UnsafeSocketPath; nothing listens."""
        self.path.parent.mkdir()
        self.path.write_text("not a socket")
        service = admin_service(admin_config(self.path), self.backend, reactor)
        self.assertRaises(UnsafeSocketPath, service.privilegedStartService)
        self.successResultOf(service.stopService())

    async def test_staleSocketReplaced(self) -> None:
        """A stale socket left by a crashed daemon is replaced."""
        self.path.parent.mkdir(mode=0o750)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(str(self.path))
        self.start()
        answer = await deferToThread(AdminClient(self.path, timeout=10).call, cmd.Status)
        self.assertIn("status", answer)


class AdminClientTests(SynchronousTestCase):
    """AdminClient's errors when the daemon cannot be reached."""

    def test_noSocket(self) -> None:
        """A missing socket: AdminUnavailable naming the path."""
        path = short_directory(self) / "admin.sock"
        with self.assertRaises(AdminUnavailable) as raised:
            AdminClient(path).call(cmd.Status)
        self.assertIn(str(path), str(raised.exception))
        self.assertIn("is the mailgw daemon running?", str(raised.exception))

    def test_staleSocket(self) -> None:
        """A socket nothing listens on: AdminUnavailable naming the path."""
        path = short_directory(self) / "admin.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(str(path))
        with self.assertRaises(AdminUnavailable) as raised:
            AdminClient(path).call(cmd.Status)
        self.assertIn(str(path), str(raised.exception))


# --- mailgwctl -----------------------------------------------------------------------


class TerminalInput(StringIO):
    def isatty(self) -> bool:
        return True


class CtlRun:
    """mailgwctl run in-process against a responder over a FakeBackend."""

    def __init__(
        self,
        argv: list[str],
        backend: FakeBackend | None = None,
        stdin: StringIO | None = None,
        getpass: Any = None,
    ) -> None:
        self.backend = backend or FakeBackend()
        self.stdout = StringIO()
        self.stderr = StringIO()
        self.connected: list[tuple[str, float | None]] = []

        def connect(path: str, timeout: float | None) -> AMPPair:
            self.connected.append((path, timeout))
            return AMPPair(self.backend)

        def no_getpass(prompt: str) -> str:
            raise AssertionError("getpass used")

        self.status = main(
            argv,
            stdin=stdin or StringIO(""),
            stdout=self.stdout,
            stderr=self.stderr,
            getpass=getpass or no_getpass,
            connect=connect,
        )

    @property
    def out(self) -> str:
        return self.stdout.getvalue()

    @property
    def err(self) -> str:
        return self.stderr.getvalue()


class FormattingTests(SynchronousTestCase):
    """Helpers of the text output."""

    def test_table(self) -> None:
        """Columns are padded to the widest cell; None and empty show as '-'."""
        self.assertEqual(
            format_table(("A", "BB"), [("xxx", None), ("y", True)]),
            "A    BB\nxxx  -\ny    yes\n",
        )

    def test_duration(self) -> None:
        """Durations read at a glance."""
        self.assertEqual(
            [format_duration(s) for s in (5, 65, 3725, 90061)],
            ["5s", "1m 05s", "1h 02m", "1d 1h"],
        )


class CtlTests(SynchronousTestCase):
    """mailgwctl's daemon commands: tables by default, JSON with --json."""

    def test_status(self) -> None:
        """status prints a readable summary and no secret."""
        run = CtlRun(["status"])
        self.assertEqual(run.status, 0, run.err)
        self.assertIn("mailgw 0.1.0 on gw1 (pid 4242), up 1d 1h", run.out)
        self.assertIn("pop3s/lo/995", run.out)
        self.assertRegex(run.out, r"pop3\s+0\s+0\s+1")
        self.assertRegex(run.out, r"RAD\s+radius\s+unknown")
        self.assertIn("Poller: not configured", run.out)
        assert_no_secret(self, run.out)

    def test_statusJSON(self) -> None:
        """status --json prints the status as JSON, without secrets."""
        run = CtlRun(["--json", "status"])
        status = json.loads(run.out)
        self.assertEqual(status["listeners"][0]["name"], "pop3s/lo/995")
        assert_no_secret(self, run.out)

    def test_socketPassed(self) -> None:
        """--socket and --timeout reach the connection; the default socket otherwise."""
        run = CtlRun(["--socket", "/tmp/s.sock", "--timeout", "7", "status"])
        self.assertEqual(run.connected, [("/tmp/s.sock", 7.0)])
        run = CtlRun(["status"])
        self.assertEqual(run.connected, [("/run/mailgw/admin.sock", 60.0)])

    def test_socketFromConfig(self) -> None:
        """--config reads admin.socket, resolved against the configuration's folder."""
        directory = short_directory(self)
        config = directory / "mailgw.toml"
        config.write_text('[admin]\nsocket = "run/admin.sock"\n[gateway]\nbogus = 1\n')
        run = CtlRun(["--config", str(config), "status"])
        self.assertEqual(run.connected, [(str(directory / "run" / "admin.sock"), 60.0)])
        config.write_text("[gateway]\n")
        self.assertEqual(socket_from_config(config), "/run/mailgw/admin.sock")
        config.write_text("[admin\n")
        run = CtlRun(["--config", str(config), "status"])
        self.assertEqual((run.status, run.connected), (1, []))
        self.assertIn(str(config), run.err)

    def test_sessions(self) -> None:
        """sessions prints one row per session; --protocol is passed on."""
        run = CtlRun(["sessions", "--protocol", "pop3"])
        self.assertEqual(run.status, 0)
        header, row = run.out.splitlines()
        self.assertEqual(
            header.split(), ["ID", "PROTOCOL", "STATE", "USER", "CLIENT", "UPSTREAM", "AGE", "IDLE", "IN", "OUT"]
        )
        self.assertEqual(
            row.split(),
            ["a1b2c3d4e5f6", "pop3", "authenticated", "alice", "127.0.0.1:50000", "127.0.0.1:110",
             "1h", "02m", "12s", "120", "B", "2.4", "MiB"],
        )  # fmt: skip
        self.assertEqual(run.backend.calls, [("sessions", "pop3")])

    def test_noSessions(self) -> None:
        """No session: a line saying so; --json: an empty list."""
        backend = FakeBackend()
        backend.sessions_list = []
        self.assertEqual(CtlRun(["sessions"], backend).out, "no sessions\n")
        self.assertEqual(json.loads(CtlRun(["--json", "sessions"], backend).out), [])

    def test_kill(self) -> None:
        """kill says which session it closed."""
        run = CtlRun(["kill", "a1b2c3d4e5f6"])
        self.assertEqual((run.status, run.out), (0, "session a1b2c3d4e5f6 (pop3, alice, 127.0.0.1:50000) closed\n"))

    def test_killUnknown(self) -> None:
        """kill of an unknown session: the daemon's message and exit 1."""
        run = CtlRun(["kill", "zzz"])
        self.assertEqual((run.status, run.out, run.err), (1, "", "mailgwctl: no session 'zzz'\n"))

    def test_reload(self) -> None:
        """reload: a line on success; on failure every problem and exit 1."""
        self.assertEqual(CtlRun(["reload"]).out, "configuration reloaded\n")
        backend = FakeBackend()
        backend.problems = ["pop3s.port: must be 1..65535, got 0", "x.y: bad"]
        run = CtlRun(["reload"], backend)
        self.assertEqual(run.status, 1)
        self.assertIn("  pop3s.port: must be 1..65535, got 0\n  x.y: bad\n", run.err)
        run = CtlRun(["--json", "reload"], backend)
        self.assertEqual(json.loads(run.out), {"reloaded": False, "problems": backend.problems})

    def test_reloadNotAvailable(self) -> None:
        """reload against a daemon without it: the message, exit 1."""
        backend = FakeBackend()
        backend.reload_available = False
        run = CtlRun(["reload"], backend)
        self.assertEqual((run.status, run.err), (1, "mailgwctl: reload is not available in this daemon\n"))

    def test_aaaTestFromStdin(self) -> None:
        """aaa test reads the password from stdin when it is not a terminal and never
        prints it."""
        run = CtlRun(["aaa", "test", "LOCAL", "alice"], stdin=StringIO("alice-admin-test-pw\n"))
        self.assertEqual(run.status, 0, run.err)
        self.assertEqual(run.backend.calls, [("aaa_test", "LOCAL", "alice", "alice-admin-test-pw")])
        self.assertIn("LOCAL: alice accepted (3.5 ms)", run.out)
        self.assertIn("group policy: Staff (simultaneous logins 2", run.out)
        self.assertIn("local policy: Staff", run.out)
        assert_no_secret(self, run.out + run.err)

    def test_aaaTestTerminal(self) -> None:
        """On a terminal the password is asked without echo; a rejection exits 1."""
        prompts: list[str] = []

        def getpass(prompt: str) -> str:
            prompts.append(prompt)
            return "bad"

        run = CtlRun(["--json", "aaa", "test", "LOCAL", "alice"], stdin=TerminalInput(), getpass=getpass)
        self.assertEqual(prompts, ["Password for alice: "])
        self.assertEqual(run.status, 1)
        self.assertEqual(json.loads(run.out)["result"], "rejected")

    def test_aaaTestUnknownGroup(self) -> None:
        """An unknown group: the message, exit 1."""
        run = CtlRun(["aaa", "test", "NOPE", "alice"], stdin=StringIO("x\n"))
        self.assertEqual((run.status, run.err), (1, "mailgwctl: no AAA server group 'NOPE'\n"))

    def test_aaaFlush(self) -> None:
        """aaa flush [GROUP [USER]]: how many cached logins were forgotten, of whom;
        an unknown group: the known ones named, exit 1."""
        run = CtlRun(["aaa", "flush", "LOCAL", "alice"])
        self.assertEqual((run.status, run.out), (0, "1 cached login forgotten (user alice of group LOCAL)\n"), run.err)
        self.assertEqual(run.backend.calls, [("aaa_flush", "LOCAL", "alice")])
        self.assertEqual(CtlRun(["aaa", "flush", "LOCAL"]).out, "2 cached logins forgotten (group LOCAL)\n")
        run = CtlRun(["aaa", "flush", "--json"])
        self.assertEqual((run.status, json.loads(run.out)["flushed"]), (0, 3))
        run = CtlRun(["aaa", "flush", "NOPE"])
        self.assertEqual((run.status, run.out), (1, ""))
        self.assertEqual(run.err, "mailgwctl: no AAA server group 'NOPE' (groups: LOCAL, RAD)\n")

    def test_ssoList(self) -> None:
        """sso list: one row per entry, times as date-times and durations; --json
        keeps the numbers."""
        run = CtlRun(["sso", "list"])
        self.assertEqual(run.status, 0, run.err)
        lines = run.out.splitlines()
        self.assertRegex(lines[0], r"^IP +USER +SOURCE +GROUP POLICY +MAC +FIRST SEEN +RENEWED +EXPIRES IN$")
        self.assertRegex(lines[1], r"^10\.1\.2\.3 +alice +monitor +- +- +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +.* 8h 00m$")
        self.assertRegex(lines[2], r"^2001:db8::5 +bob +inline +Staff +00:11:22:33:44:55 .* 59s$")
        self.assertNotIn("17961", run.out)
        run = CtlRun(["--json", "sso", "list"])
        self.assertEqual(json.loads(run.out)[0], IDENTITY)
        backend = FakeBackend()
        backend.identities = {}
        self.assertEqual(CtlRun(["sso", "list"], backend).out, "no SSO identities\n")

    def test_ssoLookupAndRemove(self) -> None:
        """sso lookup IP shows the entry; sso remove IP ends it; an address without
        an entry exits 1 with one line; a value that is no address is a usage error,
        sent nowhere; an address is sent in its canonical form."""
        run = CtlRun(["sso", "lookup", "10.1.2.3"])
        self.assertEqual(run.status, 0, run.err)
        self.assertTrue(run.out.startswith("10.1.2.3: alice (monitor)\n"), run.out)
        self.assertRegex(run.out, r"\n  expires: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n  expires in: 8h 00m\n")
        self.assertIn("  session id: 0123456789abcdef\n", run.out)
        self.assertNotIn("17961", run.out)
        run = CtlRun(["sso", "lookup", "--json", "2001:DB8:0::5"])
        self.assertEqual(json.loads(run.out)["user"], "bob")
        self.assertEqual(run.backend.calls, [("sso_lookup", "2001:db8::5")])
        run = CtlRun(["sso", "remove", "10.1.2.3"])
        self.assertEqual((run.status, run.out), (0, "SSO identity of alice at 10.1.2.3 removed\n"))
        run = CtlRun(["sso", "lookup", "10.9.9.9"])
        self.assertEqual((run.status, run.out, run.err), (1, "", "mailgwctl: no SSO identity for 10.9.9.9\n"))
        run = CtlRun(["sso", "remove", "alice"])
        self.assertEqual((run.status, run.backend.calls), (2, []))
        self.assertIn("argument IP: not an IP address: 'alice'", run.err)

    def test_ssoReplay(self) -> None:
        """sso replay FILE sends the file's absolute path (the daemon reads it) and
        prints the counts; a file the daemon cannot use exits 1 with one line."""
        run = CtlRun(["sso", "replay", "captures/c.pcap"])
        self.assertEqual(run.status, 0, run.err)
        path = os.path.abspath("captures/c.pcap")
        self.assertEqual(run.backend.calls, [("sso_replay", path)])
        self.assertEqual(
            run.out,
            f"{path}: 42 frames, 3 POP3 logins seen, 2 learnt, 1 outside sso.pop3.policy;"
            " 1 POP3 connection in TLS (not readable)\n",
        )
        self.assertEqual(json.loads(CtlRun(["--json", "sso", "replay", "/c.pcap"]).out)["learnt"], 2)
        run = CtlRun(["sso", "replay", "/etc/passwd"])
        self.assertEqual(run.status, 1)
        self.assertEqual(run.err, "mailgwctl: /etc/passwd is not a capture file this gateway can read: bad magic\n")

    def test_ssoOff(self) -> None:
        """With SSO off every sso command says so in one line and exits 1; an unknown
        sso action lists the valid ones (exit 2)."""
        backend = FakeBackend()
        backend.sso_enabled = False
        for argv in (["sso", "list"], ["sso", "lookup", "10.1.2.3"], ["sso", "remove", "10.1.2.3"],
                     ["--json", "sso", "replay", "/c.pcap"]):  # fmt: skip
            run = CtlRun(argv, backend)
            self.assertEqual((run.status, run.out, run.err), (1, "", f"mailgwctl: {SSO_OFF}\n"), argv)
        run = CtlRun(["sso", "bogus"])
        self.assertEqual(run.status, 2)
        self.assertIn("invalid choice: 'bogus' (choose from 'list', 'lookup', 'remove', 'replay')", run.err)

    def test_accountsList(self) -> None:
        """accounts list: a table of the accounts, --domain passed; no password."""
        run = CtlRun(["accounts", "list", "--domain", "example.org"])
        self.assertEqual(run.status, 0)
        lines = run.out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "ENABLED", "DOMAIN", "USERNAME", "HOST"])
        self.assertEqual(lines[1].split(), ["1", "yes", "example.org", "shop", "pop.isp.net"])
        self.assertEqual(len(lines), 2)
        run = CtlRun(["--json", "accounts", "list"])
        self.assertEqual([a["id"] for a in json.loads(run.out)], ["1", "2"])
        assert_no_secret(self, run.out)

    def test_accountsAdd(self) -> None:
        """accounts add sends the given fields as JSON, the password read from stdin
        with --password-prompt; the answer is printed without it."""
        run = CtlRun(
            [
                "accounts", "add", "--host", "pop.x.net", "--port", "995", "--tls", "implicit",
                "--username", "u", "--domain", "x.org", "--interval", "600", "--no-leave-on-server",
                "--disabled", "--set", "no_recipient_action=postmaster", "--set", "skip_received=2",
                "--password-prompt",
            ],
            stdin=StringIO("remote-pop-pw-4711\n"),
        )  # fmt: skip
        self.assertEqual(run.status, 0, run.err)
        fields = {
            "host": "pop.x.net", "port": 995, "tls": "implicit", "username": "u", "domain": "x.org",
            "interval": 600, "leave_on_server": False, "enabled": False, "no_recipient_action": "postmaster",
            "skip_received": 2, "password": "remote-pop-pw-4711",
        }  # fmt: skip
        self.assertEqual(run.backend.calls, [("accounts_add", fields)])
        self.assertIn("account 3 added", run.out)
        assert_no_secret(self, run.out + run.err)

    def test_accountsAddInvalid(self) -> None:
        """The daemon's validation problems are printed, exit 1."""
        backend = FakeBackend()
        backend.accounts_add = lambda fields: defer.fail(cmd.InvalidAccount(["port: must be 1..65535"]))  # type: ignore[method-assign]
        run = CtlRun(["accounts", "add", "--host", "h", "--username", "u", "--domain", "d"], backend)
        self.assertEqual((run.status, run.err), (1, "mailgwctl: port: must be 1..65535\n"))

    def test_accountsAddNeedsFields(self) -> None:
        """accounts add without --host/--username/--domain is a usage error."""
        self.assertEqual(CtlRun(["accounts", "add", "--host", "h"]).status, 2)

    def test_passwordNotOnCommandLine(self) -> None:
        """--set password=... is refused (it would show in ps and shell history)."""
        run = CtlRun(["accounts", "edit", "1", "--set", "password=x"])
        self.assertEqual(run.status, 2)
        self.assertIn("--password-prompt", run.err)

    def test_accountsEdit(self) -> None:
        """accounts edit sends only the given fields; nothing to change is an error."""
        run = CtlRun(["accounts", "edit", "2", "--enabled", "--description", "shop"])
        self.assertEqual(run.backend.calls, [("accounts_edit", "2", {"enabled": True, "description": "shop"})])
        self.assertIn("account 2 changed", run.out)
        run = CtlRun(["accounts", "edit", "2"])
        self.assertEqual((run.status, run.backend.calls), (1, []))
        self.assertIn("nothing to change", run.err)

    def test_accountsEditPasswordTerminal(self) -> None:
        """On a terminal --password-prompt asks twice without echo."""
        answers = ["pw-one", "pw-one"]
        run = CtlRun(
            ["accounts", "edit", "1", "--password-prompt"], stdin=TerminalInput(), getpass=lambda p: answers.pop(0)
        )
        self.assertEqual(run.status, 0, run.err)
        self.assertEqual(run.backend.calls, [("accounts_edit", "1", {"password": "pw-one"})])
        self.assertNotIn("pw-one", run.out)

    def test_accountsDeleteAndCheckNow(self) -> None:
        """accounts delete and check-now; an unknown id exits 1 with the message."""
        self.assertEqual(CtlRun(["accounts", "delete", "1"]).out, "account 1 deleted\n")
        run = CtlRun(["accounts", "check-now", "1"])
        self.assertIn("delivered: 2\n", run.out)
        self.assertIn("no recipient", run.out)
        run = CtlRun(["accounts", "delete", "9"])
        self.assertEqual((run.status, run.err), (1, "mailgwctl: no account '9'\n"))

    def test_daemonNotRunning(self) -> None:
        """No daemon at the socket: a message naming the socket, exit 1."""
        path = short_directory(self) / "admin.sock"
        err = StringIO()
        status = main(["--socket", str(path), "status"], stdout=StringIO(), stderr=err)
        self.assertEqual(status, 1)
        self.assertIn(f"the admin socket {path} does not exist: is the mailgw daemon running?", err.getvalue())

    def test_helpListsCommands(self) -> None:
        """--help lists the daemon commands."""
        run = CtlRun(["--help"])
        for name in ("status", "sessions", "kill", "reload", "aaa", "accounts", "sso"):
            self.assertIn(name, run.out)
