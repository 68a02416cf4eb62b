"""Runs one poll of one account in a process of its own, for the crash tests.

::

    python -m tests.servers.poller_runner --state DIR --smtp HOST:PORT --account ID \\
        [--node-name NAME] [--fault-at POINT [--fault-hit N]] [--log FILE]

The state folder holds ``state.sqlite3`` and ``poller.key`` as the daemon keeps them.
With ``--fault-at``, the process kills itself with SIGKILL the N-th time (default 1)
the poll reaches that fault point (L{mailgw.poller.poll.FAULT_POINTS}): no ``finally``,
no flush, no QUIT, exactly as a crash.  Log events go to ``--log`` as JSON lines; the
report is printed on stdout as JSON.  The exit status is 0 when the poll completed
without error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import globalLogBeginner

from mailgw.logs import json_observer
from mailgw.poller.poll import FAULT_POINTS, PollReport
from mailgw.poller.service import PollerService
from mailgw.state.sqlite import SQLiteState
from mailgw.upstream import Connector
from tests.servers.poller_fixtures import environment


def killer(point: str, hit: int) -> Any:
    seen = {"count": 0}

    def fault(name: str) -> None:
        if name == point:
            seen["count"] += 1
            if seen["count"] == hit:
                os.kill(os.getpid(), signal.SIGKILL)

    return fault


async def run(reactor: Any, options: argparse.Namespace) -> int:
    state_dir = Path(options.state)
    host, _, port = options.smtp.rpartition(":")
    state = SQLiteState(state_dir / "state.sqlite3", reactor)
    await state.start()
    try:
        fault = killer(options.fault_at, options.fault_hit) if options.fault_at else None
        service = PollerService(
            environment(state_dir, host, int(port), options.node_name),
            state,
            Connector(reactor),
            reactor,
            fault=fault,
        )
        report: PollReport = await service.poll(options.account)
    finally:
        await state.close()
    sys.stdout.write(json.dumps(report.as_dict()) + "\n")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", required=True)
    parser.add_argument("--smtp", required=True)
    parser.add_argument("--account", type=int, required=True)
    parser.add_argument("--node-name", default="mailgw-test")
    parser.add_argument("--fault-at", choices=FAULT_POINTS)
    parser.add_argument("--fault-hit", type=int, default=1)
    parser.add_argument("--log")
    options = parser.parse_args(argv)
    if options.log:
        stream = open(options.log, "a", encoding="utf-8")
        globalLogBeginner.beginLoggingTo([json_observer(stream)], redirectStandardIO=False)

    def react_main(reactor: Any) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(run(reactor, options))

    task.react(lambda reactor: react_main(reactor).addCallback(_exit_code))


def _exit_code(code: int) -> None:
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
