"""MAC addresses for the SSO policy [7]: the neighbour table, and inline learning
that admits a client by its MAC address."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.sso.identity import IdentityTable
from mailgw.sso.neighbours import NeighbourTable, parse_arp
from tests.test_proxy_pop3 import POP3Harness, login_upstream, make_config

ARP = """IP address       HW type     Flags       HW address            Mask     Device
10.0.0.5         0x1         0x2         AA:BB:CC:DD:EE:01     *        eth1
10.0.0.6         0x1         0x0         00:00:00:00:00:00     *        eth1
10.0.0.7         0x1         0x2         aa:bb:cc:dd:ee:02     *        eth0
"""


class ParseTests(SynchronousTestCase):
    def test_completeEntriesOfTheInterface(self) -> None:
        """Only complete entries count, lower-cased, of the interface when given."""
        self.assertEqual(parse_arp(ARP), {"10.0.0.5": "aa:bb:cc:dd:ee:01", "10.0.0.7": "aa:bb:cc:dd:ee:02"})
        self.assertEqual(parse_arp(ARP, "eth1"), {"10.0.0.5": "aa:bb:cc:dd:ee:01"})
        self.assertEqual(parse_arp("garbage\nx y\n"), {})


class TableTests(TestCase):
    async def test_readInAThread(self) -> None:
        """The table reads the file (in a thread) and answers from memory."""
        path = Path(self.mktemp())
        path.write_text(ARP)
        table = NeighbourTable(reactor, "eth1", path=path)
        await table.refresh()
        self.assertEqual(table.mac_of("10.0.0.5"), "aa:bb:cc:dd:ee:01")
        self.assertIsNone(table.mac_of("10.0.0.7"))


class _Neighbours:
    def __init__(self, macs: dict[str, str]) -> None:
        self.macs = macs

    def mac_of(self, ip: str) -> str | None:
        return self.macs.get(ip)


class InlineByMacTests(SynchronousTestCase):
    def test_policyByMac(self) -> None:
        """With a MAC address in sso.pop3.policy, a login from the address whose
        neighbour entry has that MAC is learnt (with the MAC); another is not."""
        config = make_config(pop3s={}, sso_policy=["aa:bb:cc:dd:ee:01"])
        harness = POP3Harness(config)
        table = IdentityTable(harness.clock, ttl=60)
        harness.env.identities = table
        harness.env.sso_inline = config.sso_pop3
        harness.env.neighbours = _Neighbours({"192.0.2.7": "aa:bb:cc:dd:ee:01"})  # type: ignore[assignment]
        for address in ("192.0.2.7", "192.0.2.8"):
            session, _ = harness.connect(address=address)
            session.dataReceived(b"USER alice\r\nPASS alice-pw\r\n")
            login_upstream(harness)
        entry = table.lookup("192.0.2.7")
        assert entry is not None
        self.assertEqual((entry.user, entry.mac), ("alice", "aa:bb:cc:dd:ee:01"))
        self.assertIsNone(table.lookup("192.0.2.8"))
