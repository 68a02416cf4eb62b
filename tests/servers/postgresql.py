"""A private PostgreSQL 15 for integration tests: the shared state database [11].

::

    postgres = PostgreSQL.started(self)             # its own instance, stopped on cleanup
    postgres = PostgreSQL.shared(self)              # one instance for the whole test class
    postgres.stop(); postgres.start()               # an outage (same port, same data)
    dsn = postgres.fresh_database(self)             # an empty database, dropped on cleanup
    store = PostgreSQLState(dsn, reactor, password_file=postgres.password_file)

The instance is Debian's ``postgresql-15`` (``/usr/lib/postgresql/15/bin``, which is
not on ``$PATH``; a ``postgres`` found there may be another version), run from a
cluster made by ``initdb`` in ``<base_dir>/data`` with a generated ``postgresql.conf``
and ``pg_hba.conf``: it listens on ``127.0.0.1`` at a free port, its UNIX socket is in
a folder of its own (``unix_socket_directories``), and ``fsync`` is off (a test cluster
need not survive a power cut).  ``postgres -D <base_dir>/data`` runs in the foreground,
logging to :attr:`PostgreSQL.log_path`, and is stopped by PID with SIGINT (fast
shutdown: clients are disconnected, nothing waits for them).  The system's cluster and
service are never touched.

PostgreSQL refuses to run as root.  Run as root (as the tests are), ``initdb`` and
``postgres`` run as the ``postgres`` user through ``setpriv`` (no PAM session, no
extra process: the PID is the server's), the folder belongs to ``postgres``, and the
server gets SIGINT if the test process dies without stopping it (``--pdeathsig``).
Run as anyone else, they run as that user.

Accounts: the superuser ``postgres`` (over the UNIX socket only, ``trust``: only root
and ``postgres`` can reach the folder) and :attr:`PostgreSQL.user` with
:attr:`PostgreSQL.password` (over TCP, ``scram-sha-256``), who owns the database
:attr:`PostgreSQL.database` and every database of :meth:`PostgreSQL.fresh_database`.
:attr:`PostgreSQL.password_file` holds the password (mode 0600), as ``[state]
dsn_password_file`` would; :attr:`PostgreSQL.dsn` carries none.

Missing package: the tests skip (``apt-get install postgresql-15``), or fail with
``CI=true``, like the other servers of :mod:`tests.servers`.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.servers.base import (
    LOOPBACK,
    MissingBinaryError,
    ServerProcess,
    ServerStartError,
    free_port,
    is_root,
    require_binary,
    require_file,
    wait_for,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["DEBIAN_PACKAGE", "PostgreSQL"]

DEBIAN_PACKAGE = "postgresql-15"
#: the longest UNIX socket path the kernel takes (sun_path), less ".s.PGSQL.NNNNN"
_SOCKET_DIRECTORY_MAX = 107 - len("/.s.PGSQL.65535")


def _unavailable(message: str) -> Exception:
    if os.environ.get("CI", "").lower() == "true":
        return MissingBinaryError(f"{message} (CI=true: integration tests must run, so this is a failure)")
    return SkipTest(message)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PostgreSQL(ServerProcess):
    """A private PostgreSQL instance.

    Constructor: ``PostgreSQL(base_dir=None, *, user="mailgw",
    password="mailgw-db-password", database="mailgw", host="127.0.0.1",
    startup_timeout=30.0, stop_timeout=10.0)``.

    Attributes: ``host``, ``port``, ``user``, ``password``, ``password_file``,
    ``database``, ``dsn`` (of ``database``, without the password), ``data_dir``,
    ``socket_dir``, ``log_path``, ``base_dir``, ``pid``.
    """

    name: ClassVar[str] = "postgresql"
    #: where the server binaries are looked for (Debian keeps them off ``$PATH``)
    binary_directories: ClassVar[Sequence[str]] = ("/usr/lib/postgresql/15/bin",)
    port_clash_markers = ("Address already in use", "could not create any TCP/IP sockets")

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        user: str = "mailgw",
        password: str = "mailgw-db-password",  # noqa: S107 - a test fixture
        database: str = "mailgw",
        host: str = LOOPBACK,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.port = 0
        self._socket_tmp: Path | None = None
        super().__init__(base_dir, host=host, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.user = user
        self.password = password
        self.database = database
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.password_file = self.base_dir / "db-password"
        self.password_file.write_text(password + "\n")
        os.chmod(self.password_file, 0o600)

    # -- ServerProcess hooks -------------------------------------------------------------

    def check_requirements(self) -> None:
        directories = [Path(d) for d in self.binary_directories]
        self.postgres_binary = str(require_file([d / "postgres" for d in directories], DEBIAN_PACKAGE))
        self.initdb_binary = str(require_file([d / "initdb" for d in directories], DEBIAN_PACKAGE))
        self._run_as: list[str] = []
        if is_root():
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise _unavailable(f"no postgres user to run PostgreSQL as: apt-get install {DEBIAN_PACKAGE}") from None
            self._uid, self._gid = account.pw_uid, account.pw_gid
            setpriv = require_binary("setpriv", "util-linux")
            self._run_as = [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", "--pdeathsig=INT", "--"]
        if importlib.util.find_spec("psycopg") is None:
            raise _unavailable("the Python module psycopg is not installed: .venv/bin/pip install 'psycopg[binary]'")

    def allocate_ports(self) -> None:
        self.port = free_port(self.host)

    def listening_ports(self) -> dict[str, int]:
        return {"postgresql": self.port}

    def prepare(self) -> None:
        self._own(self.base_dir)
        if len(str(self.socket_dir)) > _SOCKET_DIRECTORY_MAX:
            # trial's folders are deep: the socket goes to a short folder of its own.
            self._socket_tmp = Path(tempfile.mkdtemp(prefix="mailgw-pg-"))
            self.socket_dir = self._socket_tmp
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._own(self.socket_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        (self.data_dir / "postgresql.conf").write_text(self._config())
        (self.data_dir / "pg_hba.conf").write_text(self._hba())
        for name in ("postgresql.conf", "pg_hba.conf"):
            self._own(self.data_dir / name)

    def command(self) -> list[str]:
        return [*self._run_as, self.postgres_binary, "-D", str(self.data_dir)]

    def is_ready(self) -> bool:
        # It listens while it is still starting up ("the database system is starting up").
        import psycopg

        try:
            with self.connect():
                return True
        except psycopg.OperationalError:
            return False

    def after_start(self) -> None:
        import psycopg

        try:
            with self.connect() as db:
                if db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,)).fetchone() is None:
                    db.execute(
                        f"CREATE ROLE {self._identifier(self.user)} LOGIN PASSWORD {_sql_literal(self.password)}"
                    )
                if db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone() is None:
                    db.execute(f"CREATE DATABASE {self._identifier(self.database)} OWNER {self._identifier(self.user)}")
        except psycopg.Error as error:
            raise ServerStartError(
                f"postgresql: setting up {self.user}/{self.database} failed: {error}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            ) from None

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT: sessions are ended, nothing waits for clients),
        then the base class's clean-up (SIGTERM/SIGKILL of anything left)."""
        if self.running and self.pid is not None:
            os.kill(self.pid, signal.SIGINT)
            deadline = time.monotonic() + self.stop_timeout
            while self.running and time.monotonic() < deadline:
                wait_for(0.02)
        super().stop()
        if self._socket_tmp is not None:
            shutil.rmtree(self._socket_tmp, ignore_errors=True)
            self._socket_tmp = None
            self.socket_dir = self.base_dir / "socket"

    # -- clients -------------------------------------------------------------------------

    def dsn_for(self, database: str) -> str:
        """The URI of ``database`` as :attr:`user`, without the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    def connect(self, database: str = "postgres") -> psycopg.Connection[Any]:
        """A superuser connection over the UNIX socket, in autocommit mode."""
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        )

    def execute(
        self,
        sql: str,
        params: Sequence[object] = (),
        *,
        database: str | None = None,
        schema: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser in ``database`` (default: :attr:`database`),
        with ``schema`` first in the search path; returns its rows (``[]`` when it
        returns none)."""
        with self.connect(database or self.database) as db:
            if schema is not None:
                db.execute(f"SET search_path TO {self._identifier(schema)}")
            cursor = db.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    def fresh_schema(self, testcase: SynchronousTestCase) -> tuple[str, str]:
        """A new empty schema in :attr:`database`, owned by :attr:`user` and dropped on
        cleanup: its name, and a DSN whose sessions use it (``search_path``).  Much
        quicker than a database of its own (:meth:`fresh_database`)."""
        name = f"test_{secrets.token_hex(6)}"
        with self.connect(self.database) as db:
            db.execute(f"CREATE SCHEMA {name} AUTHORIZATION {self._identifier(self.user)}")

        def drop() -> None:
            if self.running:
                with self.connect(self.database) as db:
                    db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

        testcase.addCleanup(drop)
        return name, f"{self.dsn}?options=-csearch_path%3D{name}"

    def fresh_database(self, testcase: SynchronousTestCase) -> str:
        """A new empty database owned by :attr:`user`, dropped on cleanup; its DSN."""
        name = f"test_{secrets.token_hex(6)}"
        with self.connect() as db:
            db.execute(f"CREATE DATABASE {name} OWNER {self._identifier(self.user)}")

        def drop() -> None:
            if self.running:
                with self.connect() as db:
                    db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

        testcase.addCleanup(drop)
        return self.dsn_for(name)

    @classmethod
    def shared(cls, testcase: SynchronousTestCase) -> Self:
        """The running instance of ``testcase``'s class in this process, started on first
        use (PostgreSQL takes a second to start; the tests of a class share it and each
        take a :meth:`fresh_database`).  It is stopped when the process exits (the safety
        net of :mod:`tests.servers.base`, and SIGINT on the test process's death)."""
        key = f"{type(testcase).__module__}.{type(testcase).__qualname__}"
        server = _SHARED.get(key)
        if server is None:
            # A folder of its own that stop() keeps, so that a test may stop and start
            # the server again (an outage); removed at exit.
            server = cls(tempfile.mkdtemp(prefix="mailgw-postgresql-"))
            _SHARED[key] = server
        if not server.running:
            server.start()
        assert isinstance(server, cls)
        return server

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _identifier(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def _own(self, path: Path) -> None:
        if self._run_as:
            os.chown(path, self._uid, self._gid)

    def _initdb(self) -> None:
        argv = [
            *self._run_as,
            self.initdb_binary,
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        with open(self.base_dir / "initdb.out", "wb") as output:
            status = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, check=False, timeout=120
            ).returncode
        if status != 0:
            log = (self.base_dir / "initdb.out").read_text(errors="replace")
            raise ServerStartError(f"initdb failed with status {status} ({' '.join(argv)}):\n{log}")

    def _config(self) -> str:
        settings = {
            "listen_addresses": _sql_literal(self.host),
            "port": str(self.port),
            "unix_socket_directories": _sql_literal(str(self.socket_dir)),
            "unix_socket_permissions": "0700",
            "max_connections": "50",
            "shared_buffers": "16MB",
            "dynamic_shared_memory_type": "posix",
            # A test cluster: speed over durability.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "autovacuum": "off",
            "password_encryption": "'scram-sha-256'",
            "log_destination": "'stderr'",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "lc_messages": "'C'",
            "timezone": "'UTC'",
        }
        lines = ["# Generated by tests/servers/postgresql.py for one test instance."]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    def _hba(self) -> str:
        return (
            "# Generated by tests/servers/postgresql.py: the superuser over the socket only.\n"
            "local all postgres trust\n"
            f"host all all {self.host}/32 scram-sha-256\n"
        )


_SHARED: dict[str, PostgreSQL] = {}


@atexit.register
def _stop_shared() -> None:
    """Stop the shared instances and remove their folders (before the base module's
    safety net, which atexit runs later)."""
    for server in _SHARED.values():
        server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)
    _SHARED.clear()
