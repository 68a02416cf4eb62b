"""POP3 single sign-on (SPEC [7]): learning "client IP → user" from POP3 logins.

The identity table, its export and the portal have their own modules.  The monitor
mode (learning from a mirror port) is built from pure pieces and one thin reactor shell:

  - L{mailgw.sso.frames}: raw Ethernet / Linux cooked / raw IP frames to TCP
    L{Packet<mailgw.sso.reassembly.Packet>}s (and back, for tests and tools);
  - L{mailgw.sso.pcapfile}: reading pcap and pcapng capture files, writing pcap;
  - L{mailgw.sso.reassembly}: TCP reassembly per connection to the configured POP3
    servers, bounded per stream and in the number of streams;
  - L{mailgw.wire.pop3dialogue}: the POP3 dialogue parser that spots accepted logins;
  - L{mailgw.sso.monitor}: L{Pop3Monitor<mailgw.sso.monitor.Pop3Monitor>} tying them
    together, and the offline replay of a capture file;
  - L{mailgw.sso.capture}: the live capture on an interface (an C{AF_PACKET} socket with
    a classic BPF filter, read by the reactor; nothing is ever sent on it).
"""
