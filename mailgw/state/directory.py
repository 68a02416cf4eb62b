"""The session directory's tables and statements [11]: who is logged in on which gateway.

Gateways that share a PostgreSQL database publish their logged-in sessions there (one
row a connection, with the node that holds it), beat a heartbeat (C{gateway_nodes}), and
ask each other to log sessions off (C{gateway_kills}, which each node takes its own
rows from).  Rows of a node whose heartbeat is older than the stale time do not count:
a gateway that died stops counting without anybody cleaning up after it.  Times are
the database server's (C{now()}), so the gateways' clocks need not agree.

The functions here run inside one transaction of the store
(L{mailgw.state.postgresql.PostgreSQLState.transaction}); L{mailgw.proxy.directory}
uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DIRECTORY_SCHEMA",
    "DirectorySession",
    "claim",
    "count_failures",
    "find_session",
    "forget_failures",
    "heartbeat",
    "live_sessions",
    "prune_failures",
    "record_failure",
    "request_kill",
    "take_kills",
    "withdraw",
]

#: the tables (PostgreSQL types; SQLite's migration maps them)
DIRECTORY_SCHEMA = (
    """
    CREATE TABLE gateway_nodes (
        node TEXT PRIMARY KEY,
        heartbeat TIMESTAMPTZ NOT NULL
    )
    """,
    """
    CREATE TABLE gateway_sessions (
        node TEXT NOT NULL,
        session_id TEXT NOT NULL,
        login_id TEXT NOT NULL,
        protocol TEXT NOT NULL,
        client TEXT NOT NULL,
        client_ip TEXT NOT NULL,
        username TEXT NOT NULL,
        mail_user TEXT,
        group_policy TEXT,
        upstream TEXT,
        started DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (node, session_id)
    )
    """,
    "CREATE INDEX gateway_sessions_user ON gateway_sessions (username)",
    """
    CREATE TABLE gateway_failures (
        ip TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL
    )
    """,
    "CREATE INDEX gateway_failures_ip ON gateway_failures (ip, at)",
    """
    CREATE TABLE gateway_kills (
        node TEXT NOT NULL,
        session_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (node, session_id)
    )
    """,
)

_COLUMNS = (
    "node, session_id, login_id, protocol, client, client_ip, username, mail_user, group_policy, upstream, started"
)
_LIVE = (
    f"SELECT {', '.join('s.' + c for c in _COLUMNS.split(', '))} FROM gateway_sessions s "  # noqa: S608 - fixed
    "JOIN gateway_nodes n ON n.node = s.node WHERE n.heartbeat > now() - %s * interval '1 second'"
)


@dataclass(frozen=True, slots=True)
class DirectorySession:
    """One logged-in connection as the directory holds it."""

    node: str
    session_id: str
    login_id: str
    protocol: str
    client: str
    client_ip: str
    user: str
    mail_user: str | None
    group_policy: str | None
    upstream: str | None
    started: float

    def values(self) -> tuple[Any, ...]:
        return (
            self.node, self.session_id, self.login_id, self.protocol, self.client, self.client_ip,
            self.user, self.mail_user, self.group_policy, self.upstream, self.started,
        )  # fmt: skip


def heartbeat(db: Any, node: str, sessions: Sequence[str]) -> None:
    """C{node} is alive and holds exactly C{sessions}: rows it published and no longer
    holds (a withdraw that failed while the database was away) go."""
    db.execute(
        "INSERT INTO gateway_nodes (node, heartbeat) VALUES (%s, now()) "
        "ON CONFLICT (node) DO UPDATE SET heartbeat = now()",
        (node,),
    )
    db.execute(
        "DELETE FROM gateway_sessions WHERE node = %s AND session_id <> ALL (%s::text[])", (node, list(sessions))
    )


def claim(db: Any, record: DirectorySession, stale: float) -> list[DirectorySession]:
    """Publish C{record} and return the user's live sessions on the other nodes.
    Claims of one user are serialized (an advisory lock for the transaction), so of
    two logins at once on two nodes the later sees the earlier."""
    db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("mailgw-login:" + record.user,))
    # The claiming node is alive (its first heartbeat may still be on its way).
    db.execute(
        "INSERT INTO gateway_nodes (node, heartbeat) VALUES (%s, now()) "
        "ON CONFLICT (node) DO UPDATE SET heartbeat = now()",
        (record.node,),
    )
    db.execute(
        f"INSERT INTO gateway_sessions ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "  # noqa: S608
        "ON CONFLICT (node, session_id) DO NOTHING",
        record.values(),
    )
    rows = db.execute(_LIVE + " AND s.username = %s AND s.node <> %s ORDER BY s.started", (
        float(stale), record.user, record.node,
    )).fetchall()  # fmt: skip
    return [DirectorySession(*row) for row in rows]


def withdraw(db: Any, node: str, session_id: str) -> None:
    db.execute("DELETE FROM gateway_sessions WHERE node = %s AND session_id = %s", (node, session_id))


def live_sessions(db: Any, stale: float) -> list[DirectorySession]:
    """Every live node's sessions, oldest first."""
    rows = db.execute(_LIVE + " ORDER BY s.started", (float(stale),)).fetchall()
    return [DirectorySession(*row) for row in rows]


def find_session(db: Any, session_id: str, stale: float) -> DirectorySession | None:
    """The live session C{session_id}, on whichever node holds it."""
    row = db.execute(_LIVE + " AND s.session_id = %s", (float(stale), session_id)).fetchone()
    return None if row is None else DirectorySession(*row)


def request_kill(db: Any, node: str, session_ids: Sequence[str], reason: str) -> None:
    for session_id in session_ids:
        db.execute(
            "INSERT INTO gateway_kills (node, session_id, reason) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (node, session_id, reason),
        )


def take_kills(db: Any, node: str) -> list[tuple[str, str]]:
    """The log-offs asked of C{node} (session id, reason), taken (deleted)."""
    rows = db.execute("DELETE FROM gateway_kills WHERE node = %s RETURNING session_id, reason", (node,)).fetchall()
    return [(row[0], row[1]) for row in rows]


# -- the failure penalty across gateways [4.10] ------------------------------------------


def record_failure(db: Any, ip: str, window: float, keep: int) -> None:
    """A failed login from C{ip}; the address keeps at most its C{keep} newest
    failures of the last C{window} seconds (older ones cannot raise the delay)."""
    db.execute("INSERT INTO gateway_failures (ip, at) VALUES (%s, now())", (ip,))
    db.execute(
        "DELETE FROM gateway_failures WHERE ip = %s AND (at <= now() - %s * interval '1 second' OR at < ("
        "SELECT min(at) FROM (SELECT at FROM gateway_failures WHERE ip = %s ORDER BY at DESC LIMIT %s) newest))",
        (ip, float(window), ip, keep),
    )


def count_failures(db: Any, ip: str, window: float) -> int:
    row = db.execute(
        "SELECT count(*) FROM gateway_failures WHERE ip = %s AND at > now() - %s * interval '1 second'",
        (ip, float(window)),
    ).fetchone()
    return int(row[0])


def forget_failures(db: Any, ip: str) -> None:
    db.execute("DELETE FROM gateway_failures WHERE ip = %s", (ip,))


def prune_failures(db: Any, window: float) -> None:
    """Every address's failures older than C{window} go (with the heartbeat)."""
    db.execute("DELETE FROM gateway_failures WHERE at <= now() - %s * interval '1 second'", (float(window),))
