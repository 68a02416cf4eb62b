"""twistd plugin: ``twistd mailgw --config PATH``.

Kept tiny: it imports neither the reactor nor the mailgw package; ``ServiceMaker``
resolves ``mailgw.tap`` only when the plugin is used.
"""

from twisted.application.service import ServiceMaker

mailgw = ServiceMaker(
    "mailgw",
    "mailgw.tap",
    "E-mail security gateway (POP3S/IMAP4S/SMTPS proxies, AAA, poller, SSO)",
    "mailgw",
)
