"""mailgw: an e-mail security gateway daemon on Twisted."""

__version__ = "0.1.0"
