"""One poll of one account by mailgw's poller, in a process of its own, timed.

::

    python -m bench.poller_worker --state DIR --smtp HOST:PORT --port PORT --ca FILE \\
        --user USER --password-file FILE --log FILE

The state folder (SQLite store, ``poller.key``) is created on the first call; the
account (implicit TLS, verified against ``--ca``, domain ``example.com``) is added when
the store has none.  The poll runs with the delivery journal as the daemon runs it, log
events go to ``--log`` as JSON lines (as the daemon's ``log_format = "json"``).  Prints
one JSON object: the report, ``seconds`` (wall clock) and ``cpu`` (this process, all its
threads, over the poll only: start-up and imports are left out), and of it ``cpu_user``
and ``cpu_system``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import globalLogBeginner

from mailgw.logs import json_observer
from mailgw.poller.service import PollerService
from mailgw.state.sqlite import SQLiteState
from mailgw.upstream import Connector
from tests.servers.poller_fixtures import DOMAIN, environment


async def run(reactor: Any, options: argparse.Namespace) -> dict[str, Any]:
    state_dir = Path(options.state)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host, _, port = options.smtp.rpartition(":")
    state = SQLiteState(state_dir / "state.sqlite3", reactor)
    await state.start()
    try:
        service = PollerService(environment(state_dir, host, int(port)), state, Connector(reactor), reactor)
        existing = await service.accounts.list()
        if existing:
            account_id = int(existing[0]["id"])
        else:
            added = await service.accounts.add(
                {
                    "host": "127.0.0.1",
                    "port": options.port,
                    "tls": "implicit",
                    "verify": True,
                    "ca": options.ca,
                    "username": options.user,
                    "password": Path(options.password_file).read_text().strip(),
                    "domain": DOMAIN,
                    "description": "bench mailbox",
                }
            )
            account_id = int(added["id"])
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        report = await service.poll(account_id)
        seconds, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await state.close()
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    cpu = {"cpu": user + system, "cpu_user": user, "cpu_system": system}
    return {"report": report.as_dict(), "seconds": seconds, **cpu}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", required=True)
    parser.add_argument("--smtp", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--log", required=True)
    options = parser.parse_args(argv)
    stream = open(options.log, "a", encoding="utf-8")
    globalLogBeginner.beginLoggingTo([json_observer(stream)], redirectStandardIO=False)

    def react_main(reactor: Any) -> defer.Deferred[None]:
        def done(result: dict[str, Any]) -> None:
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()

        return defer.Deferred.fromCoroutine(run(reactor, options)).addCallback(done)

    task.react(react_main)


if __name__ == "__main__":
    main()
