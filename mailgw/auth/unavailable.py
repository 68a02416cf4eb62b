"""Stand-in checker for server-group protocols this version cannot query yet.

The configuration contract accepts ``ldap``, ``radius`` and ``pop3`` groups (SPEC [3]);
until their checkers land, a login routed to such a group fails as "AAA unavailable"
with a reason naming the group, so the client gets the temporary-failure answer and the
log says exactly why.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from zope.interface import implementer

from mailgw.auth.portal import AAAUnavailable


@implementer(ICredentialsChecker)
class UnsupportedGroupChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, group_name: str, protocol: str) -> None:
        self.group_name = group_name
        self.protocol = protocol

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        return defer.fail(
            AAAUnavailable(
                f"server group {self.group_name!r}: protocol {self.protocol!r} is not supported by this version"
            )
        )
