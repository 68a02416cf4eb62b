"""Worker processes with the PostgreSQL backend [10, 11]: each worker is a node of the
shared session directory (``mailgw-test/w1``, ``/w2``), so simultaneous logins hold
across the workers through the database (as across gateways); the supervisor lists
each session once and kills any.  A real PostgreSQL 15, real POP3S clients."""

from __future__ import annotations

from tests.gateway import deferLater
from tests.servers.postgresql import PostgreSQL
from tests.test_integration_pop3 import in_thread
from tests.test_workers import WorkersBase


class WorkersPostgreSQLTests(WorkersBase):
    def setUp(self) -> None:
        super().setUp()
        postgres = PostgreSQL.shared(self)
        if not postgres.running:
            postgres.start()
        self.data["state"] = {
            "backend": "postgresql",
            "dsn": postgres.fresh_database(self),
            "dsn_password_file": str(postgres.password_file),
        }

    async def test_limitsThroughTheDatabase(self) -> None:
        """simultaneous_logins = 1 over both workers: only the last of alice's
        logins stays open; sessions lists each session once, with its worker's
        node; kill works on either worker."""
        await self.start()
        clients, seen = [], set()
        for i in range(20):
            clients.append(await in_thread(self.login, "alice", f"127.0.0.{20 + i}"))
            seen.add(await self.worker_of(clients[-1]))
            if len(clients) >= 4 and seen == {1, 2}:
                break
            await deferLater(1.2)  # each worker takes the log-offs asked of it every second
        self.assertEqual(seen, {1, 2})
        await deferLater(1.5)
        states = [await in_thread(self.works, c) for c in clients]
        self.assertEqual(states, [False] * (len(clients) - 1) + [True])
        bob = await in_thread(self.login, "bob")
        listed = await self.sessions()
        self.assertEqual(sorted(s["user"] for s in listed), ["alice", "bob"])
        self.assertTrue({s["node"] for s in listed} <= {"mailgw-test/w1", "mailgw-test/w2"})
        for session in listed:
            result = await self.ctl("kill", session["session_id"])
            self.assertEqual(result.code, 0, result.err)
        await deferLater(0.5)
        self.assertFalse(await in_thread(self.works, bob))
        self.assertFalse(await in_thread(self.works, clients[-1]))
        for c in [*clients, bob]:
            c.sock.close()
