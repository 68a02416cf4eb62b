"""Real servers for integration tests, run from generated configuration on loopback.

- :mod:`tests.servers.base`: :class:`~tests.servers.base.ServerProcess` (the pattern
  every server follows), ``free_port(s)``, ``require_binary``, ``test_directory``.
- :mod:`tests.servers.pki`: :class:`~tests.servers.pki.TestPKI`, a throw-away CA.
- :mod:`tests.servers.dovecot`: :class:`~tests.servers.dovecot.Dovecot` (POP3, IMAP,
  submission) and the standard seeded messages.
- :mod:`tests.servers.smtpsink`: :class:`~tests.servers.smtpsink.SmtpSink`, a capturing
  SMTP server in a thread.
- :mod:`tests.servers.slapd`: :class:`~tests.servers.slapd.Slapd`, OpenLDAP with LDAPS,
  StartTLS, a service account and memberOf.
- :mod:`tests.servers.freeradius`: :class:`~tests.servers.freeradius.FreeRadius` with
  PAP users, Class replies and a detail accounting log; ``silent_udp_port`` for timeouts.
- :mod:`tests.servers.haproxy`: :class:`~tests.servers.haproxy.HAProxy`, a real HAProxy
  in front of the gateway with ``send-proxy-v2``.
- :mod:`tests.servers.postgresql`: :class:`~tests.servers.postgresql.PostgreSQL`, a
  PostgreSQL 15 from ``initdb`` in a temporary folder, run as ``postgres``.
- :mod:`tests.servers.clamd`: :class:`~tests.servers.clamd.Clamd`, clamd with a
  signature database the fixture writes (EICAR), on a UNIX socket and TCP.
- :mod:`tests.servers.demo`: ``make run``'s demo (Dovecot + the gateway on the sample).
- :mod:`tests.servers.tomlwriter`: writes the TOML configurations the tests generate.
"""
