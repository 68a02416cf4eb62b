"""twistd glue: ``usage.Options`` and ``makeService`` only.

Whatever stops the daemon from starting ends with lines naming the problem and the
fix and exit status 1, never a traceback nor twistd's usage text [8.4]: an invalid
configuration (every problem, one per line), a problem of this machine found before
anything starts (L{mailgw.startup.host_problems}), or a failure while the service
tree is built or started (L{mailgw.startup.StartupGuard}).
"""

from __future__ import annotations

import sys

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
            # Not a UsageError: twistd would print its whole usage text before the
            # problems, burying them.  Logging has not started: this is the terminal.
            sys.stderr.write(f"mailgw: invalid configuration {self['config']} (the daemon did not start):\n")
            sys.stderr.write("".join(f"  {problem}\n" for problem in e.problems))
            sys.stderr.write(f"mailgw: check it with: mailgwctl check-config {self['config']}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mailgw.service import build
    from mailgw.startup import START_ERRORS, StartupGuard, describe_start_error, host_problems, refuse_to_start

    config = options["config_object"]
    # Before twistd starts logging (and daemonizing): problems go to the terminal.
    problems = host_problems(config, daemon=True)
    if problems:
        refuse_to_start(problems)
    try:
        gateway = build(config, reactor, install_signal_handlers=True)
    except START_ERRORS as e:
        refuse_to_start([describe_start_error(e, config)])
    return StartupGuard(gateway, config)
