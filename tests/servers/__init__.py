"""Real servers for integration tests, run from generated configuration on loopback.

- :mod:`tests.servers.base`: :class:`~tests.servers.base.ServerProcess` (the pattern
  every server follows), ``free_port(s)``, ``require_binary``, ``test_directory``.
- :mod:`tests.servers.pki`: :class:`~tests.servers.pki.TestPKI`, a throw-away CA.
- :mod:`tests.servers.dovecot`: :class:`~tests.servers.dovecot.Dovecot` (POP3, IMAP,
  submission) and the standard seeded messages.
- :mod:`tests.servers.smtpsink`: :class:`~tests.servers.smtpsink.SmtpSink`, a capturing
  SMTP server in a thread.
"""
