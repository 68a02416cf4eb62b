"""Session-ticket keys shared between contexts and rotated (L{mailgw.tlstickets}):
handshakes in memory between a gateway L{ServerTLS} context (pyOpenSSL) and Python's
C{ssl} client, which keeps the session and offers it again on the next connection."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import TestCase

from mailgw.auth.limits import PenaltyTable
from mailgw.systemd import SystemdNotifier
from mailgw.tls import ServerTLS
from mailgw.tlstickets import (
    ROTATE_SECONDS,
    TICKET_KEY_BYTES,
    TicketKeyControl,
    TicketKeyError,
    TicketKeyRotation,
    TicketKeys,
    _local_functions,
    new_ticket_key,
)
from mailgw.workers import commands as c
from mailgw.workers.sockets import AdoptedSockets, HeldSockets
from mailgw.workers.supervisor import WorkerPool
from mailgw.workers.worker import WorkerChannel
from tests.servers.pki import TestPKI


def handshake(
    server: ServerTLS, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession, bool]:
    """One connection in memory: the handshake, a few bytes from the server (so that the
    client reads the TLS 1.3 tickets that follow the handshake). Returns the client's
    session and whether it was resumed."""
    connection = SSL.Connection(server.getContext(), None)
    connection.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost", session=session)
    done = False
    for _ in range(20):
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            connection.bio_write(data)
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            while True:
                incoming.write(connection.bio_read(65536))
        except SSL.WantReadError:
            pass
        if done:
            break
    assert done, "the handshake did not finish"
    connection.send(b"+OK\r\n")
    incoming.write(connection.bio_read(65536))
    assert tls.read(5) == b"+OK\r\n"
    assert tls.session is not None
    return tls.session, tls.session_reused


class TicketKeyTests(TestCase):
    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.pki = TestPKI(folder)
        self.cert, self.key = self.pki.server_cert(["localhost"])

    def server(self) -> ServerTLS:
        return ServerTLS(Path(self.cert), Path(self.key))

    def client(self, maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki.ca_path)
        context.maximum_version = maximum
        return context

    def test_controlFound(self) -> None:
        """On this machine the ticket key can be set (the rest depends on it)."""
        self.assertIsInstance(TicketKeyControl.locate(), TicketKeyControl)

    def test_sharedKeyResumesOnAnotherContext(self) -> None:
        """A ticket issued by one context resumes on another context given the same
        key: what two workers, or the contexts before and after a reload, are. TLS 1.3
        and TLS 1.2 tickets."""
        for maximum in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            keys = TicketKeys()
            first, second = self.server(), self.server()
            keys.use(first.getContext())
            keys.use(second.getContext())
            client = self.client(maximum)
            session, reused = handshake(first, client)
            self.assertFalse(reused)
            _, reused = handshake(second, client, session)
            self.assertTrue(reused, maximum)

    def test_ownKeysDoNotResume(self) -> None:
        """The control of the test above: contexts with keys of their own (what every
        context has without L{TicketKeys}) do not resume each other's tickets (the server
        session cache is per context, so only a ticket could)."""
        first, second = self.server(), self.server()
        TicketKeys().use(first.getContext())
        TicketKeys().use(second.getContext())
        client = self.client()
        session, _ = handshake(first, client)
        _, reused = handshake(second, client, session)
        self.assertFalse(reused)
        third = self.server()
        session, _ = handshake(third, client)
        _, reused = handshake(self.server(), client, session)
        self.assertFalse(reused)

    def test_rotation(self) -> None:
        """Every ROTATE_SECONDS a new key, given to every context in use: a ticket of
        the old key no longer resumes (one full handshake), the new ticket does."""
        clock = Clock()
        keys = TicketKeys()
        rotation = TicketKeyRotation(clock, keys.key)
        rotation.subscribe(keys.set)
        rotation.startService()
        self.addCleanup(rotation.stopService)
        server = self.server()
        keys.use(server.getContext())
        client = self.client()
        session, _ = handshake(server, client)
        before = keys.key
        clock.advance(ROTATE_SECONDS - 1)
        self.assertEqual(keys.key, before)
        _, reused = handshake(server, client, session)
        self.assertTrue(reused)
        clock.advance(1)
        self.assertNotEqual(keys.key, before)
        self.assertEqual(rotation.key, keys.key)
        self.assertEqual(len(keys.key), TICKET_KEY_BYTES)
        old = session
        session, reused = handshake(server, client, old)
        self.assertFalse(reused)
        _, reused = handshake(server, client, session)
        self.assertTrue(reused)

    def test_rotationNeverLogsTheKey(self) -> None:
        clock = Clock()
        rotation = TicketKeyRotation(clock, new_ticket_key(), every=10)
        rotation.startService()
        self.addCleanup(rotation.stopService)
        with capturedLogs() as events:
            clock.advance(10)
        text = repr(events)
        self.assertIn("rotated", text)
        for form in (rotation.key.hex(), repr(rotation.key)[2:-1]):
            self.assertNotIn(form[:16], text)

    def test_contextAfterRotationGetsCurrentKey(self) -> None:
        """A context made after a rotation (a reload) gets the current key: tickets of
        the context before the reload resume on it."""
        keys = TicketKeys()
        keys.set(new_ticket_key())
        old = self.server()
        keys.use(old.getContext())
        client = self.client()
        session, _ = handshake(old, client)
        new = self.server()
        keys.use(new.getContext())
        _, reused = handshake(new, client, session)
        self.assertTrue(reused)

    def test_unavailableControl(self) -> None:
        """Without a way to set keys: one warning naming the reason, and contexts keep
        resuming their own tickets."""
        keys = TicketKeys(control="SSL_CTX_ctrl not found (test)")
        self.assertFalse(keys.shared)
        with capturedLogs() as events:
            server = self.server()
            keys.use(server.getContext())
            keys.use(self.server().getContext())
            keys.set(new_ticket_key())
        warnings = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["reason"], "SSL_CTX_ctrl not found (test)")
        client = self.client()
        session, _ = handshake(server, client)
        _, reused = handshake(server, client, session)
        self.assertTrue(reused)

    def test_wrongKeyLength(self) -> None:
        control = TicketKeyControl.locate()
        assert isinstance(control, TicketKeyControl)
        with self.assertRaises(TicketKeyError):
            control.set(self.server().getContext(), b"short")

    def test_notELF(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"#!/bin/sh\n" + bytes(100))
        with self.assertRaises(TicketKeyError):
            _local_functions(path, {b"SSL_CTX_ctrl"})


class RecordingChannel:
    """Stands in for a worker's AMP channel in the supervisor."""

    def __init__(self) -> None:
        self.sent: list[tuple[type[Any], dict[str, Any]]] = []

    def callRemote(self, command: type[Any], **arguments: Any) -> None:
        self.sent.append((command, arguments))


class WorkerKeyTests(TestCase):
    """The supervisor owns the key; every worker gets it when it says Hello and again
    on every rotation [10]."""

    def pool(self) -> tuple[WorkerPool, TicketKeyRotation, Clock]:
        clock = Clock()
        rotation = TicketKeyRotation(clock, new_ticket_key())
        pool = WorkerPool(
            2,
            Path("/nonexistent/mailgw.toml"),
            HeldSockets(),
            clock,
            node_name="gw",
            penalty=PenaltyTable(clock),
            notifier=SystemdNotifier(),
            limits={},
            ticket_rotation=rotation,
        )
        return pool, rotation, clock

    def test_helloAnswersTheKey(self) -> None:
        pool, rotation, _ = self.pool()
        channel = RecordingChannel()
        answer = pool.hello(pool.slots[0], channel, 1, 1234)  # type: ignore[arg-type]
        self.assertEqual(answer["ticket_key"], rotation.key)

    def test_rotationReachesEveryWorker(self) -> None:
        pool, rotation, clock = self.pool()
        channels = [RecordingChannel(), RecordingChannel()]
        for slot, channel in zip(pool.slots, channels, strict=True):
            slot.channel = channel  # type: ignore[assignment]
        rotation.startService()
        self.addCleanup(rotation.stopService)
        clock.advance(ROTATE_SECONDS)
        for channel in channels:
            self.assertEqual(channel.sent, [(c.TicketKey, {"key": rotation.key})])

    def test_workerTakesTheKey(self) -> None:
        """The worker's responder gives a pushed key to its gateway's contexts; before
        the gateway exists it is kept for it."""
        channel = WorkerChannel(AdoptedSockets(), Clock(), lambda: None)
        key = new_ticket_key()
        channel.ticket_key_changed(key)
        self.assertEqual(channel.ticket_key, key)
        received: list[bytes] = []
        channel.gateway = type("Gateway", (), {"ticket_keys": type("Keys", (), {"set": staticmethod(received.append)})})
        other = new_ticket_key()
        channel.ticket_key_changed(other)
        self.assertEqual(received, [other])
