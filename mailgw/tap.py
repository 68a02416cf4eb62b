"""twistd glue: ``usage.Options`` and ``makeService`` only."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage


class Options(usage.Options):
    """Command line of ``twistd mailgw``."""

    optParameters = [
        ["config", "c", "/etc/mailgw/mailgw.toml", "Path of the TOML configuration file."],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mailgw.service import buildFromPath

    return buildFromPath(options["config"], reactor)
