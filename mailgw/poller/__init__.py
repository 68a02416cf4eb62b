"""The remote POP account poller [6]: downloads mail from remote POP3 mailboxes and
redistributes it to the users of a local domain over SMTP, never losing a message and
duplicating one only in the instant no protocol can close.

- L{mailgw.poller.accounts}: account validation, encrypted passwords, the account API;
- L{mailgw.poller.poll}: one poll (SPEC [6] steps 1-5) and its L{PollReport}, with
  L{mailgw.poller.delivery} (one message's delivery, steps 2-5),
  L{mailgw.poller.transfer} (streaming RETR to SMTP DATA) and
  L{mailgw.poller.polltypes} (its settings, faults and report);
- L{mailgw.poller.service}: the scheduler, a Twisted service, and the admin calls;
- L{mailgw.poller.pop3} and L{mailgw.poller.smtp}: the two client protocols;
- L{mailgw.poller.message}: the pure parts (listings, headers, recipients, trace).
"""
