"""The identity table's accounting export [7] against a real FreeRADIUS: Start,
Interim-Update and Stop of an entry reach the collector with one Acct-Session-Id,
the user, the address, the Calling-Station-Id and the Class."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailgw.auth.radius import RadiusClient
from mailgw.config import RadiusCollector, Secret
from mailgw.sso.export import AccountingExport
from mailgw.sso.identity import IdentitySource, IdentityTable
from tests.edge import in_thread
from tests.servers.freeradius import FreeRadius, decode_octets


class AccountingExportTests(TestCase):
    timeout = 60

    async def test_startInterimStop(self) -> None:
        """Learning, renewing and removing an entry send Start, Interim-Update and
        Stop for one session; expiry sends a Stop with Session-Timeout."""
        radius = FreeRadius.started(self)
        client = RadiusClient(reactor)
        self.addCleanup(client.close)
        collector = RadiusCollector("127.0.0.1", radius.acct_port, Secret(radius.secret))
        export = AccountingExport(client, [collector], "mailgw-test")
        self.addCleanup(export.close)
        table = IdentityTable(reactor, ttl=3600)  # type: ignore[arg-type]
        table.subscribe(export)
        table.learn("10.1.2.3", "alice", IdentitySource.INLINE, group_policy="Staff", mac="00:11:22:33:44:55")
        table.learn("10.1.2.3", "alice", IdentitySource.INLINE)
        table.remove("10.1.2.3")
        records = await in_thread(radius.wait_for_accounting, 3)
        self.assertEqual([r["Acct-Status-Type"] for r in records], ["Start", "Interim-Update", "Stop"])
        self.assertEqual(len({r["Acct-Session-Id"] for r in records}), 1)
        for record in records:
            self.assertEqual(record["User-Name"], "alice")
            self.assertEqual(record["Framed-IP-Address"], "10.1.2.3")
            self.assertEqual(record["Calling-Station-Id"], "00:11:22:33:44:55")
            self.assertEqual(record["NAS-Identifier"], "mailgw-test")
        self.assertEqual(records[-1]["Acct-Terminate-Cause"], "User-Request")
        self.assertEqual(decode_octets(records[0]["Class"]), b"Staff")
