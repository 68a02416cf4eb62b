"""forward_client_address end to end [4.7]: a real Dovecot that trusts the gateway's
network (``login_trusted_networks = 127.0.0.0/8``) behind the gateway, raw clients
bound to 127.0.0.2 in front of it, and one from 127.0.0.3 through a real HAProxy that
sends PROXY v2 headers.  Dovecot's own log tells what it believed: its login lines show
the client as ``rip=``, ``imap_id_log = *`` writes every ID it received, and its
submission service writes the client's address and HELO name into the Received header
of the relayed message.  Scripted servers stand in for a mail server that advertises
neither XCLIENT nor ID, and for a Postfix-like one that takes XCLIENT LOGIN.

Clients run in threads (the gateway runs in trial's reactor)."""

from __future__ import annotations

import base64
import re
import socket
import socketserver
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests.gateway import Gateway, start_gateway
from tests.servers.base import wait_for
from tests.servers.dovecot import Dovecot
from tests.servers.haproxy import HAProxy
from tests.servers.pki import TestPKI
from tests.servers.smtpsink import ThreadedServer
from tests.test_integration_pop3 import POLICIES, in_thread

MAIL_USERS = {"alice": "alice-mail"}
VPN_USERS: dict[str, tuple[str, str | None]] = {"alice": ("alice-mail", None)}
#: the direct clients' address, the load balancer's client's, and the gateway's
#: interface that expects PROXY headers (HAProxy's backend)
CLIENT = "127.0.0.2"
BALANCED_CLIENT = "127.0.0.3"
PROXY_INTERFACE = "127.0.0.4"
MESSAGE = b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: forwarded\r\n\r\nHello.\r\n"


class Client:
    """A blocking client connection from a chosen source address (implicit TLS with a
    context), reading lines."""

    def __init__(self, port: int, source: str, context: ssl.SSLContext | None, host: str = "127.0.0.1") -> None:
        raw = socket.create_connection((host, port), timeout=30, source_address=(source, 0))
        #: the client's own (address, port), as the gateway sees it without a balancer
        self.address: tuple[str, int] = raw.getsockname()[:2]
        self.sock: socket.socket = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        self.reader = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.reader.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, prefix: bytes) -> list[bytes]:
        """Lines up to and including the first starting with C{prefix}."""
        lines: list[bytes] = []
        while True:
            line = self.line()
            if not line:
                raise EOFError(f"closed before {prefix!r}: {lines!r}")
            lines.append(line)
            if line.startswith(prefix):
                return lines

    def reply(self) -> list[bytes]:
        """One SMTP reply (its lines)."""
        lines: list[bytes] = []
        while True:
            line = self.line()
            if not line:
                raise EOFError(f"closed in a reply: {lines!r}")
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def imap_login(client: Client, id_command: bytes | None = b'a ID ("name" "forwarding-test")\r\n') -> list[bytes]:
    """Greeting, the client's ID, LOGIN, LOGOUT; the LOGIN's answer lines."""
    client.line()
    if id_command is not None:
        client.send(id_command)
        client.until(id_command[:2])
    client.send(b"b LOGIN alice alice-mail\r\n")
    answer = client.until(b"b ")
    client.send(b"c LOGOUT\r\n")
    client.until(b"c ")
    client.close()
    return answer


def pop3_login(client: Client) -> bytes:
    """Greeting, USER/PASS, QUIT; the answer to PASS."""
    client.line()
    client.send(b"USER alice\r\n")
    client.line()
    client.send(b"PASS alice-mail\r\n")
    answer = client.line()
    client.send(b"QUIT\r\n")
    client.line()
    client.close()
    return answer


def smtp_submit(client: Client, helo: bytes = b"client.example.net", *, greeting: bool = True) -> list[bytes]:
    """(Greeting,) EHLO, AUTH PLAIN, one message, QUIT; the answers to AUTH and the
    message's final dot."""
    if greeting:
        client.reply()
    client.send(b"EHLO " + helo + b"\r\n")
    client.reply()
    client.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0alice-mail") + b"\r\n")
    auth = client.reply()
    client.send(b"MAIL FROM:<alice@example.com>\r\n")
    client.reply()
    client.send(b"RCPT TO:<bob@example.com>\r\n")
    client.reply()
    client.send(b"DATA\r\n")
    client.reply()
    client.send(MESSAGE + b".\r\n")
    done = client.reply()
    client.send(b"QUIT\r\n")
    client.reply()
    client.close()
    return [*auth, *done]


def session_id_of(gateway: Gateway, client: str) -> str:
    """The gateway's session id of the connection from C{client} ("addr:port")."""
    for event in gateway.events:
        if event.get("client") == client and "session_id" in event:
            return str(event["session_id"])
    raise AssertionError(f"no session from {client}: {gateway.log_text()[:2000]}")


def login_line(dovecot: Dovecot, service: str, session_id: str) -> str:
    """Dovecot's login line of the session the gateway names C{session_id} (Dovecot
    logs the session id the gateway told it); blocks up to 10 s for it."""
    return matching_lines(dovecot, f"{service}-login: Info: Login: user=<alice>", f"session=<{session_id}>")[0]


def matching_lines(dovecot: Dovecot, *needles: str, timeout: float = 10.0) -> list[str]:
    """The log lines holding all C{needles}, once there is one (Dovecot writes its log
    asynchronously); blocks up to C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in dovecot.log_text().splitlines() if all(n in line for n in needles)]
        if lines:
            return lines
        if time.monotonic() > deadline:
            raise TimeoutError(f"no log line with {needles!r}:\n{dovecot.log_tail()}")
        wait_for(0.02)


def rip_of(line: str) -> str:
    match = re.search(r"rip=([0-9a-f.:]+)", line)
    assert match is not None, line
    return match.group(1)


class ForwardingBase(TestCase):
    """Dovecot trusting 127.0.0.0/8 behind a gateway with forwarding on for the three
    proxies; the gateway listens on 127.0.0.1 and, for HAProxy, on 127.0.0.4 with
    PROXY headers."""

    timeout = 120
    forward = True

    def setUp(self) -> None:
        self.dovecot = Dovecot.started(
            self,
            users=MAIL_USERS,
            submission=True,
            login_trusted_networks="127.0.0.0/8",
            extra_config="imap_id_log = *",
        )
        assert self.dovecot.smtp_sink is not None
        self.sink = self.dovecot.smtp_sink
        self.pki = TestPKI(Path(self.mktemp()).absolute())
        self.gateway = self.start_gateway()

    def server(self, port: int | None, tls: str = "starttls") -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": port,
            "tls": tls,
            "ca": str(self.dovecot.ca_path),
            "forward_client_address": self.forward,
        }

    def start_gateway(self) -> Gateway:
        return start_gateway(
            self,
            self.pki,
            VPN_USERS,
            {"default_server": self.server(self.dovecot.pop3_port)},
            imap4s={"default_server": self.server(self.dovecot.imap_port)},
            smtps={
                "default_server": self.server(self.dovecot.submission_port),
                "authentication": ["aaa", "mailhost"],
            },
            interface=[
                {"name": "inside", "address": "127.0.0.1"},
                {"name": "balancer", "address": PROXY_INTERFACE, "proxy_protocol": True},
            ],
            group_policy=POLICIES,
        )

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_path))

    def client(self, protocol: str, source: str = CLIENT) -> Client:
        return Client(self.gateway.port(protocol), source, self.context())

    def haproxy(self) -> HAProxy:
        backends = {name: (PROXY_INTERFACE, self.gateway.port(name)) for name in ("pop3s", "imap4s", "smtps")}
        return HAProxy.started(self, backends=backends)


class ForwardedTests(ForwardingBase):
    """With forward_client_address, Dovecot sees the real client."""

    async def test_imapDirect(self) -> None:
        """IMAP from 127.0.0.2: Dovecot's ID log has the gateway's x-originating-*
        fields (the client's port among them) before the client's own, and its login
        line shows rip=127.0.0.2 with the gateway's session id."""
        client = await in_thread(self.client, "imap4s")
        answer = await in_thread(imap_login, client)
        self.assertTrue(answer[-1].startswith(b"b OK"), answer)
        session_id = session_id_of(self.gateway, f"{CLIENT}:{client.address[1]}")
        line = await in_thread(login_line, self.dovecot, "imap", session_id)
        self.assertEqual(rip_of(line), CLIENT)
        self.assertIn("lip=127.0.0.1", line)
        [sent] = await in_thread(matching_lines, self.dovecot, "ID sent:", f"x-session-id={session_id}")
        self.assertIn(
            f"ID sent: x-originating-ip={CLIENT}, x-originating-port={client.address[1]}, "
            f"x-connected-ip=127.0.0.1, x-connected-port={self.gateway.port('imap4s')}, "
            f"x-session-id={session_id}, name=forwarding-test",
            sent,
        )

    async def test_pop3Direct(self) -> None:
        """POP3 from 127.0.0.2: Dovecot's login line shows rip=127.0.0.2 and the
        gateway's session id (XCLIENT after its "[XCLIENT]" greeting)."""
        client = await in_thread(self.client, "pop3s")
        answer = await in_thread(pop3_login, client)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        session_id = session_id_of(self.gateway, f"{CLIENT}:{client.address[1]}")
        line = await in_thread(login_line, self.dovecot, "pop3", session_id)
        self.assertEqual(rip_of(line), CLIENT)

    async def test_smtpDirect(self) -> None:
        """SMTP from 127.0.0.2 to Dovecot's submission: its login line shows
        rip=127.0.0.2, and the relayed message's Received header the client's
        address."""
        client = await in_thread(self.client, "smtps")
        answers = await in_thread(smtp_submit, client)
        self.assertTrue(answers[0].startswith(b"235"), answers)
        self.assertTrue(answers[-1].startswith(b"250"), answers)
        session_id = session_id_of(self.gateway, f"{CLIENT}:{client.address[1]}")
        line = await in_thread(login_line, self.dovecot, "submission", session_id)
        self.assertEqual(rip_of(line), CLIENT)
        [message] = await in_thread(self.sink.wait_for_messages, 1, 30)
        self.assertRegex(message.data, rb"^Received: from \S+ \(\[127\.0\.0\.2\]\)\r\n")

    async def test_smtpHeloName(self) -> None:
        """The relayed message's Received header names the client's HELO name (the
        gateway's EHLO after XCLIENT is the client's), with its address."""
        client = await in_thread(self.client, "smtps")
        answers = await in_thread(smtp_submit, client)
        self.assertTrue(answers[-1].startswith(b"250"), answers)
        [message] = await in_thread(self.sink.wait_for_messages, 1, 30)
        self.assertTrue(message.data.startswith(b"Received: from client.example.net ([127.0.0.2])\r\n"), message.data)

    async def test_throughHAProxy(self) -> None:
        """From 127.0.0.3 through HAProxy (PROXY v2 to the gateway's 127.0.0.4
        interface): Dovecot sees 127.0.0.3, not HAProxy's or the gateway's address,
        for IMAP, POP3 and SMTP."""
        haproxy = self.haproxy()

        def balanced(protocol: str) -> Client:
            return Client(haproxy.ports[protocol], BALANCED_CLIENT, self.context())

        imap = await in_thread(balanced, "imap4s")
        answer = await in_thread(imap_login, imap)
        self.assertTrue(answer[-1].startswith(b"b OK"), answer)
        pop = await in_thread(balanced, "pop3s")
        self.assertTrue((await in_thread(pop3_login, pop)).startswith(b"+OK"))
        smtp = await in_thread(balanced, "smtps")
        self.assertTrue((await in_thread(smtp_submit, smtp))[0].startswith(b"235"))
        for protocol, client, service in (("imap4", imap, "imap"), ("pop3", pop, "pop3"), ("smtp", smtp, "submission")):
            # The gateway's session is from the client's own address and port.
            session_id = session_id_of(self.gateway, f"{BALANCED_CLIENT}:{client.address[1]}")
            line = await in_thread(login_line, self.dovecot, service, session_id)
            self.assertEqual(rip_of(line), BALANCED_CLIENT, protocol)
        [message] = await in_thread(self.sink.wait_for_messages, 1, 30)
        self.assertRegex(message.data, rb"^Received: from \S+ \(\[127\.0\.0\.3\]\)\r\n")

    async def test_hostileImapId(self) -> None:
        """The client's ID can neither speak for the gateway nor inject a command: its
        x-originating-ip and X-Forward-User, a literal with CRLF and a command, and (in
        a second ID) a NUL never reach Dovecot; a value with escaped quotes and one with
        spaces arrive as one value each; the login line shows the real client."""
        literal = b"x\r\nz LOGIN injected secret\r\n"
        hostile = (
            b'a ID ("x-originating-ip" "6.6.6.6" "os" "Mac OS X" '
            b'"vendor" "a\\" \\"x-originating-ip\\" \\"6.6.6.7" '
            b'"name" {%d}\r\n%s "X-Forward-User" "root" "support-url" "ok")\r\n' % (len(literal), literal)
        )

        def run() -> list[bytes]:
            client = self.client("imap4s")
            self.address = client.address
            client.line()
            client.send(hostile)
            client.until(b"a ")
            client.send(b'n ID ("name" {7}\r\nnul\x00zzz)\r\n')
            client.until(b"n ")
            client.send(b"b LOGIN alice alice-mail\r\n")
            answer = client.until(b"b ")
            client.send(b"c LOGOUT\r\n")
            client.until(b"c ")
            client.close()
            return answer

        answer = await in_thread(run)
        self.assertTrue(answer[-1].startswith(b"b OK"), answer)
        session_id = session_id_of(self.gateway, f"{CLIENT}:{self.address[1]}")
        line = await in_thread(login_line, self.dovecot, "imap", session_id)
        self.assertEqual(rip_of(line), CLIENT)
        [sent] = await in_thread(matching_lines, self.dovecot, "ID sent:", f"x-session-id={session_id}")
        self.assertIn(f"x-originating-ip={CLIENT},", sent)
        self.assertNotIn("x-originating-ip=6.6.6", sent)
        self.assertIn("os=Mac OS X", sent)
        self.assertIn("support-url=ok", sent)
        log = self.dovecot.log_text()
        self.assertIn('vendor=a" "x-originating-ip" "6.6.6.7,', sent)
        for trace in ("injected", "secret", "root", "nul", "zzz"):
            self.assertNotIn(trace, sent, trace)
        self.assertNotIn("injected", log)
        self.assertNotIn("rip=6.6.6", log)

    async def test_hostileHelo(self) -> None:
        """An EHLO name with a space is refused by the gateway (5xx); one that is no domain
        (x=ADDR=6.6.6.6) is not passed on: Dovecot's trace shows the gateway's own
        name and the real address, and 6.6.6.6 is nowhere."""

        def run() -> list[bytes]:
            client = self.client("smtps")
            self.address = client.address
            client.reply()
            client.send(b"EHLO evil ADDR=6.6.6.6\r\n")
            refused = client.reply()
            return refused + smtp_submit(client, b"x=ADDR=6.6.6.6", greeting=False)

        answers = await in_thread(run)
        self.assertTrue(answers[0].startswith(b"50"), answers)
        [message] = await in_thread(self.sink.wait_for_messages, 1, 30)
        self.assertTrue(message.data.startswith(b"Received: from mailgw-test ([127.0.0.2])\r\n"), message.data)
        self.assertNotIn(b"6.6.6.6", message.data)
        self.assertNotIn("6.6.6.6", self.dovecot.log_text())


class NotForwardedTests(ForwardingBase):
    """With forward_client_address off, Dovecot sees the gateway."""

    forward = False

    async def test_nothingSent(self) -> None:
        """IMAP, POP3 and SMTP from 127.0.0.2 log in; Dovecot logs every login from
        the gateway's 127.0.0.1, received no ID at all (not even the client's), and
        the trace names the gateway."""
        imap = await in_thread(self.client, "imap4s")
        self.assertTrue((await in_thread(imap_login, imap))[-1].startswith(b"b OK"))
        pop = await in_thread(self.client, "pop3s")
        self.assertTrue((await in_thread(pop3_login, pop)).startswith(b"+OK"))
        smtp = await in_thread(self.client, "smtps")
        self.assertTrue((await in_thread(smtp_submit, smtp))[0].startswith(b"235"))
        [message] = await in_thread(self.sink.wait_for_messages, 1, 30)
        for service in ("imap", "pop3", "submission"):
            line = await in_thread(self.dovecot.wait_for_log, f"{service}-login: Info: Login: user=<alice>", 10)
            self.assertEqual(rip_of(line), "127.0.0.1", service)
        self.assertNotIn("ID sent", self.dovecot.log_text())
        self.assertNotIn(b"127.0.0.2", message.data)
        self.assertTrue(message.data.startswith(b"Received: from mailgw-test ([127.0.0.1])"), message.data)


# -- scripted servers ---------------------------------------------------------------


class _ScriptHandler(socketserver.StreamRequestHandler):
    server: _ScriptServer

    def handle(self) -> None:
        script = self.server.script
        lines = script.new_connection()
        self.wfile.write(script.greeting)
        while True:
            line = self.rfile.readline(8192)
            if not line:
                return
            script.record(lines, line)
            answer = script.answer(line.rstrip(b"\r\n"))
            if answer is None:
                return
            self.wfile.write(answer)


class _ScriptServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    script: ScriptedMailServer


class ScriptedMailServer(ThreadedServer):
    """A mail server that plays a fixed script (POP3, IMAP or SMTP, each advertising
    neither XCLIENT nor ID unless told) and records every line it receives."""

    thread_name = "scripted-mail-server"

    def __init__(self, protocol: str, *, xclient: str | None = None) -> None:
        self.protocol = protocol
        self.xclient = xclient
        #: the lines received, per connection
        self.connections: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._server = _ScriptServer(("127.0.0.1", 0), _ScriptHandler)
        self._server.script = self
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self.greeting = {
            "pop3": b"+OK scripted POP3 ready\r\n",
            "imap4": b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] scripted IMAP ready\r\n",
            "smtp": b"220 scripted.test ESMTP\r\n",
        }[protocol]

    def new_connection(self) -> list[bytes]:
        lines: list[bytes] = []
        with self._lock:
            self.connections.append(lines)
        return lines

    def record(self, lines: list[bytes], line: bytes) -> None:
        with self._lock:
            lines.append(line)

    def received(self) -> list[bytes]:
        """The lines of the connection that logged in (the gateway may open others,
        e.g. to learn an SMTP server's extensions)."""
        with self._lock:
            for lines in self.connections:
                if any(line.split(b" ")[:2] in ([b"AUTH", b"PLAIN"], [b"mgw1", b"LOGIN"]) for line in lines):
                    return list(lines)
                if any(line.startswith((b"USER ", b"MAIL ")) for line in lines):
                    return list(lines)
            raise AssertionError(f"no login among {self.connections!r}")

    def everything(self) -> list[bytes]:
        """Every line of every connection."""
        with self._lock:
            return [line for lines in self.connections for line in lines]

    def answer(self, line: bytes) -> bytes | None:
        verb = line.split(b" ", 2)[1 if self.protocol == "imap4" else 0].upper() if line else b""
        if self.protocol == "pop3":
            if verb == b"CAPA":
                return b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
            if verb == b"QUIT":
                return b"+OK bye\r\n"
            return b"+OK\r\n" if verb != b"PASS" else b"+OK Logged in.\r\n"
        if self.protocol == "imap4":
            tag = line.split(b" ", 1)[0]
            if verb == b"LOGOUT":
                return b"* BYE bye\r\n" + tag + b" OK done\r\n"
            if verb == b"LOGIN":
                return tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
            return tag + b" OK done\r\n"
        if verb == b"EHLO":
            extra = b"250-XCLIENT " + self.xclient.encode() + b"\r\n" if self.xclient is not None else b""
            return b"250-scripted.test\r\n" + extra + b"250 AUTH PLAIN\r\n"
        if verb == b"XCLIENT":
            return b"220 scripted.test ESMTP\r\n"
        if verb == b"AUTH":
            return b"235 2.7.0 ok\r\n"
        if verb == b"QUIT":
            return b"221 bye\r\n"
        return b"250 ok\r\n"


class ScriptedServerTests(TestCase):
    """Servers that do not advertise XCLIENT or ID get neither; logins still work."""

    timeout = 60

    def start(self, protocol: str, section: str, **options: Any) -> tuple[ScriptedMailServer, Gateway]:
        server = ScriptedMailServer.started(self, protocol=protocol, xclient=options.pop("xclient", None))
        pki = TestPKI(Path(self.mktemp()).absolute())
        default_server = {"host": "127.0.0.1", "port": server.port, "tls": "none", "forward_client_address": True}
        proxy = {"default_server": default_server, **options}
        sections: dict[str, Any] = {section: proxy} if section != "pop3s" else {}
        gateway = start_gateway(
            self, pki, VPN_USERS, proxy if section == "pop3s" else None, group_policy=POLICIES, **sections
        )
        self.context = ssl.create_default_context(cafile=str(pki.ca_path))
        return server, gateway

    async def test_pop3(self) -> None:
        """POP3: CAPA without XCLIENT, so no XCLIENT; the login works."""
        server, gateway = self.start("pop3", "pop3s")
        client = await in_thread(Client, gateway.port("pop3s"), CLIENT, self.context)
        self.assertTrue((await in_thread(pop3_login, client)).startswith(b"+OK Logged in."))
        received = server.received()
        self.assertEqual(received[:3], [b"CAPA\r\n", b"USER alice\r\n", b"PASS alice-mail\r\n"])
        self.assertFalse(any(b"XCLIENT" in line for line in server.everything()), received)

    async def test_imap(self) -> None:
        """IMAP: no ID capability, so no ID (not even the client's); the login works."""
        server, gateway = self.start("imap4", "imap4s")
        client = await in_thread(Client, gateway.port("imap4s"), CLIENT, self.context)
        self.assertTrue((await in_thread(imap_login, client))[-1].startswith(b"b OK"))
        received = server.received()
        self.assertEqual(received[0], b'mgw1 LOGIN "alice" "alice-mail"\r\n')
        self.assertFalse(any(b" ID " in line for line in server.everything()), received)

    async def test_smtp(self) -> None:
        """SMTP: no XCLIENT keyword, so no XCLIENT; AUTH and the message go through."""
        server, gateway = self.start("smtp", "smtps", authentication=["aaa", "mailhost"])
        client = await in_thread(Client, gateway.port("smtps"), CLIENT, self.context)
        answers = await in_thread(smtp_submit, client)
        self.assertTrue(answers[0].startswith(b"235"), answers)
        received = server.received()
        self.assertEqual(received[0], b"EHLO mailgw-test\r\n")
        self.assertTrue(received[1].startswith(b"AUTH PLAIN "), received)
        self.assertFalse(any(b"XCLIENT" in line for line in server.everything()), received)

    async def test_smtpHostileLogin(self) -> None:
        """Relaying without upstream AUTH to a Postfix-like server: the name the client
        logged in with, spaces and '=' included, arrives xtext-encoded in one LOGIN
        attribute; ADDR is the real client's, once."""
        server, gateway = self.start(
            "smtp", "smtps", authentication=["aaa"], xclient="NAME ADDR PROTO HELO PORT LOGIN"
        )

        def run() -> list[bytes]:
            client = Client(gateway.port("smtps"), CLIENT, self.context)
            self.address = client.address
            client.reply()
            client.send(b"EHLO client.example.net\r\n")
            client.reply()
            credentials = b"\0alice:evil user=x ADDR=6.6.6.6\0alice-mail:unused"
            client.send(b"AUTH PLAIN " + base64.b64encode(credentials) + b"\r\n")
            answer = client.reply()
            client.send(b"QUIT\r\n")
            client.reply()
            client.close()
            return answer

        answer = await in_thread(run)
        self.assertTrue(answer[0].startswith(b"235"), answer)
        [xclient] = [line for line in server.everything() if line.startswith(b"XCLIENT")]
        self.assertRegex(
            xclient,
            rb"^XCLIENT NAME=\[UNAVAILABLE\] ADDR=127\.0\.0\.2 PORT=%d HELO=\S+ "
            rb"LOGIN=evil\+20user\+3Dx\+20ADDR\+3D6\.6\.6\.6\r\n$" % self.address[1],
        )
        self.assertEqual(xclient.count(b"ADDR="), 1)
