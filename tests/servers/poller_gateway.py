"""A poller gateway in a process of its own, on a shared PostgreSQL state database, for
the lease tests [11] (one gateway of several; the test kills it with SIGKILL, or it
kills itself at a fault point).

::

    python -m tests.servers.poller_gateway --dsn DSN --password-file FILE --state DIR \\
        --smtp HOST:PORT --node-name NAME --interval SECONDS --log FILE \\
        [--account ID [--fault-at POINT [--fault-hit N]]]

With ``--account``, one poll of that account (as ``check-now``), its report printed on
stdout as JSON; with ``--fault-at``, the process kills itself with SIGKILL the N-th time
the poll reaches that point (no ``finally``, no lease release).  Without ``--account``,
the poller service runs its schedule (every account every ``--interval`` seconds) until
SIGTERM, then stops as the daemon does (running polls finish their message, leases are
released).  ``DIR`` holds ``poller.key``, which the gateways sharing the database share.
Log events go to ``--log`` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import globalLogBeginner

from mailgw.config import GatewayConfig, PollerConfig
from mailgw.logs import json_observer
from mailgw.poller.poll import FAULT_POINTS
from mailgw.poller.service import PollerService
from mailgw.state.postgresql import PostgreSQLState
from mailgw.upstream import Connector
from tests.servers.poller_fixtures import PollerEnvironmentForTests
from tests.servers.poller_runner import killer


def gateway_environment(
    state_dir: Path, smtp_host: str, smtp_port: int, node_name: str, interval: int
) -> PollerEnvironmentForTests:
    """``[poller]`` and ``[gateway]`` of one gateway: accounts without an interval of
    their own are polled every C{interval} seconds."""
    return PollerEnvironmentForTests(
        PollerConfig(enabled=True, default_interval=interval, smtp_host=smtp_host, smtp_port=smtp_port),
        GatewayConfig(state_dir=state_dir, log_format="json", node_name=node_name, workers=1),
    )


async def run(reactor: Any, options: argparse.Namespace) -> int:
    host, _, port = options.smtp.rpartition(":")
    state = PostgreSQLState(options.dsn, reactor, password_file=Path(options.password_file))
    await state.start()
    fault = killer(options.fault_at, options.fault_hit) if options.fault_at else None
    service = PollerService(
        gateway_environment(Path(options.state), host, int(port), options.node_name, options.interval),
        state,
        Connector(reactor),
        reactor,
        fault=fault,
    )
    if options.account is None:
        service.startService()
        stopped: defer.Deferred[None] = defer.Deferred()

        async def stop() -> None:
            await service.stopService()
            await state.close()
            stopped.callback(None)

        reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.Deferred.fromCoroutine(stop()))
        await stopped
        return 0
    try:
        report = await service.poll(options.account)
    finally:
        await state.close()
    sys.stdout.write(json.dumps(report.as_dict()) + "\n")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--smtp", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--interval", type=int, required=True)
    parser.add_argument("--account", type=int)
    parser.add_argument("--fault-at", choices=FAULT_POINTS)
    parser.add_argument("--fault-hit", type=int, default=1)
    parser.add_argument("--log", required=True)
    options = parser.parse_args(argv)
    stream = open(options.log, "a", encoding="utf-8")
    globalLogBeginner.beginLoggingTo([json_observer(stream)], redirectStandardIO=False)

    def react_main(reactor: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(run(reactor, options)).addCallback(_exit_code)

    task.react(react_main)


def _exit_code(code: int) -> None:
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
