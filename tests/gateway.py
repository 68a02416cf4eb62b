"""A mailgw gateway for integration tests: configuration written to a temporary
folder, the service tree built in the test's reactor on free loopback ports, stopped
on cleanup.  Real clients talk to it from threads or subprocesses (never blocking the
reactor the gateway runs in)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import bcrypt
from twisted.internet import defer, reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mailgw.config import Config, load_config
from mailgw.service import GatewayService, build
from tests.servers import tomlwriter
from tests.servers.base import free_ports
from tests.servers.pki import TestPKI


def fast_hash(password: str, cost: int = 4) -> str:
    """A bcrypt hash, at the lowest cost unless told (tests only)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


class Gateway:
    """A configured, running gateway in the test's reactor."""

    def __init__(self, directory: Path, pki: TestPKI, users: dict[str, tuple[str, str | None]]) -> None:
        self.directory = directory
        self.pki = pki
        self.users = users
        self.cert_path, self.key_path = pki.server_cert(["localhost", "127.0.0.1"], file_name="gateway")
        self.ca_path = pki.ca_path
        self.service: GatewayService | None = None
        # UNIX socket paths are limited to 107 bytes: trial's folders are too deep.
        self.socket_dir = tempfile.mkdtemp(prefix="mgw-", dir="/tmp")
        self.events = EventLoggingObserver()
        #: bcrypt cost of the users file (12 is what `mailgwctl hash-password` makes)
        self.hash_cost = 4

    def write_users(self) -> Path:
        path = self.directory / "users.toml"
        lines = []
        for name, (password, policy) in self.users.items():
            lines.append(f"[users.{json.dumps(name)}]")
            lines.append(f"password_hash = {json.dumps(fast_hash(password, self.hash_cost))}")
            if policy:
                lines.append(f"group_policy = {json.dumps(policy)}")
            lines.append("")
        path.write_text("\n".join(lines))
        return path

    def config_data(self, pop3s: dict[str, Any] | None, **sections: Any) -> dict[str, Any]:
        ports = free_ports(6)
        proxies = {"pop3s": pop3s, "imap4s": sections.pop("imap4s", None), "smtps": sections.pop("smtps", None)}
        data: dict[str, Any] = {
            "gateway": {"state_dir": "state", "node_name": "mailgw-test"},
            "tls": {"certificate": str(self.cert_path), "private_key": str(self.key_path)},
            "interface": [{"name": "loopback", "address": "127.0.0.1"}],
            "aaa_server_group": [{"name": "LOCAL", "protocol": "local", "users_file": "users.toml"}],
            "poller": {"enabled": False},
            "admin": {"socket": f"{self.socket_dir}/admin.sock"},
        }
        for i, (name, options) in enumerate(proxies.items()):
            if options is None:
                data[name] = {"enabled": False}
            else:
                data[name] = {"port": ports[2 * i], "starttls_port": ports[2 * i + 1], **options}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return data

    def write_config(self, data: dict[str, Any]) -> Path:
        self.write_users()
        path = self.directory / "mailgw.toml"
        path.write_text(tomlwriter.dumps(data))
        return path

    def start(self, data: dict[str, Any], *, failure_delay: float = 0.05) -> GatewayService:
        config: Config = load_config(self.write_config(data))
        self.config = config
        self.service = build(config, reactor, failure_delay=failure_delay, grace_period=2.0)
        globalLogPublisher.addObserver(self.events)
        self.service.startService()
        return self.service

    async def stop(self) -> None:
        globalLogPublisher.removeObserver(self.events)
        if self.service is not None and self.service.running:
            for session in list(self.service.registry):
                session.owner.terminate("test over")
            await defer.maybeDeferred(self.service.stopService)
            # Let the closing connections finish, so trial finds a clean reactor.
            for _ in range(50):
                if not len(self.service.registry):
                    break
                await deferLater(0.02)

    def port(self, protocol: str = "pop3s", implicit: bool = True) -> int:
        assert self.service is not None
        proxy = getattr(self.service.config, protocol)
        return int(proxy.port if implicit else proxy.starttls_port)

    def reasons(self) -> list[str]:
        return [str(e["reason"]) for e in self.events if "reason" in e]

    def log_text(self) -> str:
        return repr(list(self.events))


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def start_gateway(
    testcase: TestCase,
    pki: TestPKI,
    users: dict[str, tuple[str, str | None]],
    pop3s: dict[str, Any] | None,
    *,
    hash_cost: int = 4,
    failure_delay: float = 0.05,
    **sections: Any,
) -> Gateway:
    directory = Path(testcase.mktemp()).absolute()
    directory.mkdir(parents=True)
    gateway = Gateway(directory, pki, users)
    gateway.hash_cost = hash_cost
    testcase.addCleanup(shutil.rmtree, gateway.socket_dir, True)
    gateway.start(gateway.config_data(pop3s, **sections), failure_delay=failure_delay)
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(gateway.stop()))
    return gateway
