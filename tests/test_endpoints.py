"""Client endpoints: IP addresses are connected to without a name lookup."""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.endpoints import tcp_client_endpoint


class EndpointTests(SynchronousTestCase):
    def test_ipAddressesNeedNoLookup(self) -> None:
        """An IPv4 or IPv6 address (bracketed or not) connects at once over TCP (no
        resolver thread per connection); a name goes through HostnameEndpoint."""
        reactor = MemoryReactorClock()
        self.assertIsInstance(tcp_client_endpoint(reactor, "127.0.0.1", 110, 5), TCP4ClientEndpoint)
        self.assertIsInstance(tcp_client_endpoint(reactor, "::1", 110, 5), TCP6ClientEndpoint)
        self.assertIsInstance(tcp_client_endpoint(reactor, "[::1]", 110, 5), TCP6ClientEndpoint)
        self.assertIsInstance(tcp_client_endpoint(reactor, "mail.example.com", 110, 5), HostnameEndpoint)

    def test_connectsWithoutResolving(self) -> None:
        """The connection attempt to an IP address is made synchronously, with the timeout."""
        reactor = MemoryReactorClock()
        tcp_client_endpoint(reactor, "192.0.2.1", 995, 7).connect(None)  # type: ignore[arg-type]
        ((host, port, _, timeout, _),) = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.1", 995, 7))
