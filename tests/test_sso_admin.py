"""The admin channel's SSO commands [7, 8.1] over a real gateway with POP3 SSO on:
list, lookup, remove and replay of the identity table (GatewayAdminBackend, and its
answers through AMP).  mailgwctl itself against twistd: tests/test_admin_daemon.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from mailgw.admin import commands as cmd
from mailgw.admin.responder import GatewayAdminBackend
from mailgw.sso.frames import DLT_EN10MB, build_frame
from mailgw.sso.identity import Change, IdentitySource
from mailgw.sso.pcapfile import CaptureRecord, write_pcap
from tests.gateway import start_gateway
from tests.servers.pki import TestPKI
from tests.test_admin import AMPPair
from tests.test_sso_monitor import USER_PASS_FAILED, USER_PASS_OK, session

#: the POP3 server of the captures (tests.test_sso_monitor's), one of sso.pop3.servers
SERVER = "192.0.2.10:110"


def write_capture(path: Path) -> int:
    """A pcap of three POP3 sessions to SERVER: alice logged in from 10.1.2.3, a
    failed login from 10.1.2.4, and a login from 172.16.0.9 (outside the policy).
    Returns the number of frames."""
    packets = (
        session(USER_PASS_OK, client="10.1.2.3", port=40001)
        + session(USER_PASS_FAILED, client="10.1.2.4", port=40002)
        + session(USER_PASS_OK, client="172.16.0.9", port=40003)
    )
    with path.open("wb") as stream:
        records = (CaptureRecord(1796190000.0 + i, DLT_EN10MB, build_frame(p), 0) for i, p in enumerate(packets))
        write_pcap(stream, records, linktype=DLT_EN10MB)
    return len(packets)


class SSOBackendTests(TestCase):
    """GatewayAdminBackend's sso commands over a gateway with inline SSO on."""

    timeout = 60

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        pki = TestPKI(self.directory / "pki")
        self.gateway = start_gateway(
            self,
            pki,
            {"alice": ("alice-pw", None)},
            {"default_server": {"host": "127.0.0.1", "port": 9, "tls": "none"}},
            sso={"pop3": {"enabled": True, "mode": "inline", "servers": [SERVER, "pop.example.net:110"],
                          "policy": ["10.0.0.0/8"], "ttl": 3600}},
        )  # fmt: skip
        service = self.gateway.service
        assert service is not None and service.identities is not None
        self.service = service
        self.table = service.identities
        self.backend: GatewayAdminBackend = service.admin_backend
        self.told: list[tuple[Change, str]] = []
        self.table.subscribe(lambda change, identity: self.told.append((change, identity.ip)))

    def test_listLookupRemove(self) -> None:
        """list: the live entries, IPv4 first, with the time left; lookup finds an
        entry by address (an IPv4 client seen as ::ffff:a.b.c.d too); remove ends
        it (a Stop is told) and answers with it; an address without an entry is
        NoSuchIdentity, a value that is no address InvalidArgument; status counts
        the entries."""
        self.table.learn("2001:db8::5", "bob", IdentitySource.PORTAL)
        self.table.learn("10.1.2.30", "alice", IdentitySource.INLINE, group_policy="Staff")
        self.table.learn("::ffff:10.1.2.4", "carol", IdentitySource.INLINE)
        listing = self.backend.sso_list()
        self.assertEqual([i["ip"] for i in listing], ["10.1.2.30", "::ffff:10.1.2.4", "2001:db8::5"])
        first = listing[0]
        self.assertEqual((first["user"], first["source"], first["group_policy"]), ("alice", "inline", "Staff"))
        self.assertLess(abs(first["expires_in"] - 3600.0), 5.0)
        self.assertEqual(self.backend.sso_lookup("10.1.2.4")["user"], "carol")
        self.assertEqual(self.backend.sso_lookup("2001:DB8:0:0::5")["user"], "bob")
        self.assertEqual(self.backend.status()["sso"], {"enabled": True, "mode": "inline", "running": True,
                                                          "state": "running", "entries": 3})  # fmt: skip
        removed = self.backend.sso_remove("10.1.2.30")
        self.assertEqual(removed["user"], "alice")
        self.assertIn((Change.STOP, "10.1.2.30"), self.told)
        self.assertIsNone(self.table.lookup("10.1.2.30"))
        self.assertRaises(cmd.NoSuchIdentity, self.backend.sso_lookup, "10.1.2.30")
        self.assertRaises(cmd.NoSuchIdentity, self.backend.sso_remove, "10.1.2.30")
        with self.assertRaises(cmd.InvalidArgument) as caught:
            self.backend.sso_lookup("alice")
        self.assertEqual(str(caught.exception), "not an IP address: 'alice'")
        self.assertEqual(len(self.backend.sso_list()), 2)

    def test_expiredNotListed(self) -> None:
        """An entry past its expiry (not swept yet) is neither listed nor found."""
        self.table.learn("10.1.2.3", "alice", IdentitySource.INLINE)
        self.table.ttl = -1.0  # the next learn is expired at once
        self.table.learn("10.1.2.5", "old", IdentitySource.INLINE)
        self.assertEqual([i["ip"] for i in self.backend.sso_list()], ["10.1.2.3"])
        self.assertRaises(cmd.NoSuchIdentity, self.backend.sso_lookup, "10.1.2.5")

    async def test_replay(self) -> None:
        """A capture replayed through the monitor path teaches the table the logins
        the server accepted from clients inside the policy (as monitor entries); the
        answer counts frames, logins seen and learnt, and those outside the policy."""
        path = self.directory / "capture.pcap"
        frames = write_capture(path)
        result = await self.backend.sso_replay(str(path))
        self.assertEqual(
            {key: result[key] for key in ("path", "frames", "logins", "learnt", "outside_policy", "streams_tls")},
            {"path": str(path), "frames": frames, "logins": 2, "learnt": 1, "outside_policy": 1, "streams_tls": 0},
        )
        self.assertEqual(result["statistics"]["streams_seen"], 3)
        entry = self.table.lookup("10.1.2.3")
        assert entry is not None
        self.assertEqual((entry.user, entry.source), ("alice", IdentitySource.MONITOR))
        self.assertIsNone(self.table.lookup("10.1.2.4"))
        self.assertIsNone(self.table.lookup("172.16.0.9"))
        # Through the channel: a JSON answer.
        answer = AMPPair(self.backend).remote(cmd.SsoList)
        identities: Any = []
        answer.addCallback(lambda a: identities.extend(a["identities"]))
        await answer
        self.assertEqual([i["ip"] for i in identities], ["10.1.2.3"])
        json.dumps(result)

    async def test_replayRefused(self) -> None:
        """A relative path is InvalidArgument (the daemon's folder is not the
        administrator's); a missing file and a file that is no capture fail with
        ReplayFailed, saying why."""
        self.assertRaises(cmd.InvalidArgument, self.backend.sso_replay, "capture.pcap")
        missing = str(self.directory / "missing.pcap")
        with self.assertRaises(cmd.ReplayFailed) as caught:
            await self.backend.sso_replay(missing)
        self.assertEqual(str(caught.exception), f"cannot read {missing}: No such file or directory")
        text = self.directory / "notes.pcap"
        text.write_text("not a capture file at all\n")
        with self.assertRaises(cmd.ReplayFailed) as caught:
            await self.backend.sso_replay(str(text))
        self.assertIn(f"{text} is not a capture file this gateway can read: ", str(caught.exception))
        self.assertEqual(len(self.table), 0)


class ReplayFileTests(TestCase):
    """sso.pop3.replay_file: a capture learnt once at start [7]."""

    timeout = 60

    async def test_replayedAtStart(self) -> None:
        """The logins of the configured capture file are learnt when the gateway
        starts: only the successful one from inside the policy."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        capture = directory / "mirror.pcap"
        write_capture(capture)
        pki = TestPKI(directory / "pki")
        gateway = start_gateway(
            self,
            pki,
            {"alice": ("alice-pw", None)},
            {"default_server": {"host": "127.0.0.1", "port": 9, "tls": "none"}},
            sso={"pop3": {"enabled": True, "servers": [SERVER], "policy": ["10.0.0.0/8"],
                          "replay_file": str(capture)}},
        )  # fmt: skip
        service = gateway.service
        assert service is not None and service.identities is not None and service.replayed is not None
        await service.replayed
        learnt = [(i.ip, i.user, i.source.value) for i in service.identities]
        self.assertEqual(learnt, [("10.1.2.3", "alice", "monitor")])
