"""twistd glue: ``usage.Options`` and ``makeService`` only."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from mailgw.config import ConfigError, load_config


class Options(usage.Options):
    """Command line of ``twistd mailgw``: the configuration is loaded and validated
    here, so that an invalid one stops twistd with every problem listed."""

    optParameters = [
        ["config", "c", "/etc/mailgw/mailgw.toml", "Path of the TOML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["config_object"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration {self['config']}:\n{e}") from None
        except OSError as e:
            raise usage.UsageError(f"cannot read configuration {self['config']}: {e.strerror}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mailgw.service import build

    return build(options["config_object"], reactor, install_signal_handlers=True)
