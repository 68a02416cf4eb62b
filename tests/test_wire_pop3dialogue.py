"""Tests for L{mailgw.wire.pop3dialogue}."""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.wire.errors import ProtocolError
from mailgw.wire.pop3dialogue import (
    AUTHENTICATED,
    BACKLOG,
    LINE_TOO_LONG,
    NOT_POP3,
    QUIT,
    REFUSED,
    TLS,
    DialogueError,
    DialogueEvent,
    Ended,
    Login,
    Pop3Dialogue,
)

C = "client"
S = "server"
#: One message of a transcript: who sent it, and the bytes.
Message = tuple[str, bytes]

GREETING: Message = (S, b"+OK Dovecot ready.\r\n")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\x00{user}\x00{password}".encode())


@dataclass
class Outcome:
    """What a dialogue gave: every event, and the reason it was dropped (if it was)."""

    events: list[DialogueEvent]
    error: str | None


def feed(chunks: list[Message], **kwargs: int) -> Outcome:
    """Feed C{chunks} in order to a new dialogue; collect events and the error."""
    dialogue = Pop3Dialogue(**kwargs)
    events: list[DialogueEvent] = []
    error = None
    for direction, data in chunks:
        try:
            if direction == C:
                events += dialogue.client_data(data)
            else:
                events += dialogue.server_data(data)
        except DialogueError as e:
            error = e.reason
            assert dialogue.ended == e.reason
    return Outcome(events, error)


def logged_in(user: str, mechanism: str) -> list[DialogueEvent]:
    return [Login(user, mechanism), Ended(AUTHENTICATED)]


# Known answers: a transcript (in causal order) and the events and error it must give.
KNOWN_ANSWERS: list[tuple[str, list[Message], list[DialogueEvent], str | None]] = [
    (
        "USER/PASS accepted",
        [GREETING, (C, b"USER alice\r\n"), (S, b"+OK\r\n"), (C, b"PASS secret\r\n"), (S, b"+OK Logged in.\r\n")],
        logged_in("alice", "USER"),
        None,
    ),
    (
        "USER/PASS refused, then QUIT",
        [
            GREETING,
            (C, b"USER alice\r\n"),
            (S, b"+OK\r\n"),
            (C, b"PASS wrong\r\n"),
            (S, b"-ERR [AUTH] Authentication failed.\r\n"),
            (C, b"QUIT\r\n"),
            (S, b"+OK Logging out\r\n"),
        ],
        [Ended(QUIT)],
        None,
    ),
    (
        "USER refused, PASS refused",
        [GREETING, (C, b"USER x\r\n"), (S, b"-ERR no\r\n"), (C, b"PASS y\r\n"), (S, b"-ERR no\r\n")],
        [],
        None,
    ),
    (
        "a failed PASS, then the right one for the accepted USER",
        [
            GREETING,
            (C, b"USER alice\r\n"),
            (S, b"+OK\r\n"),
            (C, b"PASS wrong\r\n"),
            (S, b"-ERR [AUTH] Authentication failed.\r\n"),
            (C, b"PASS secret\r\n"),
            (S, b"+OK\r\n"),
        ],
        logged_in("alice", "USER"),
        None,
    ),
    (
        "a second USER replaces the first",
        [
            GREETING,
            (C, b"user alice\r\n"),
            (S, b"+OK\r\n"),
            (C, b"USER bob\r\n"),
            (S, b"+OK\r\n"),
            (C, b"pass secret\r\n"),
            (S, b"+ok\r\n"),
        ],
        logged_in("bob", "USER"),
        None,
    ),
    (
        "PASS without USER accepted: logged in, nobody to name",
        [GREETING, (C, b"PASS secret\r\n"), (S, b"+OK\r\n")],
        [Ended(AUTHENTICATED)],
        None,
    ),
    (
        "an unreadable line between USER and PASS forgets the name",
        [
            GREETING,
            (C, b"USER alice\r\n"),
            (S, b"+OK\r\n"),
            (C, b"USER \xff\xfe\r\n"),
            (S, b"+OK\r\n"),
            (C, b"PASS secret\r\n"),
            (S, b"+OK\r\n"),
        ],
        [Ended(AUTHENTICATED)],
        None,
    ),
    (
        "pipelined USER and PASS (bare LF line ends)",
        [GREETING, (C, b"USER alice\nPASS secret\n"), (S, b"+OK\n+OK Logged in.\n")],
        logged_in("alice", "USER"),
        None,
    ),
    (
        "AUTH PLAIN with an initial response",
        [GREETING, (C, b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n"), (S, b"+OK Logged in.\r\n")],
        logged_in("alice", "PLAIN"),
        None,
    ),
    (
        "AUTH PLAIN with an authorization identity: that user",
        [GREETING, (C, b"AUTH plain " + plain("admin", "secret", "bob") + b"\r\n"), (S, b"+OK\r\n")],
        logged_in("bob", "PLAIN"),
        None,
    ),
    (
        "AUTH PLAIN by continuation",
        [
            GREETING,
            (C, b"AUTH PLAIN\r\n"),
            (S, b"+ \r\n"),
            (C, plain("j\xf6rg", "p\xe4ss") + b"\r\n"),
            (S, b"+OK Logged in.\r\n"),
        ],
        logged_in("j\xf6rg", "PLAIN"),
        None,
    ),
    (
        "AUTH PLAIN refused",
        [GREETING, (C, b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n"), (S, b"-ERR [AUTH] failed\r\n")],
        [],
        None,
    ),
    (
        "AUTH PLAIN cancelled",
        [GREETING, (C, b"AUTH PLAIN\r\n"), (S, b"+ \r\n"), (C, b"*\r\n"), (S, b"-ERR Authentication aborted\r\n")],
        [],
        None,
    ),
    (
        "AUTH LOGIN, both steps",
        [
            GREETING,
            (C, b"AUTH LOGIN\r\n"),
            (S, b"+ VXNlcm5hbWU6\r\n"),
            (C, b64(b"alice") + b"\r\n"),
            (S, b"+ UGFzc3dvcmQ6\r\n"),
            (C, b64(b"secret") + b"\r\n"),
            (S, b"+OK Logged in.\r\n"),
        ],
        logged_in("alice", "LOGIN"),
        None,
    ),
    (
        "AUTH LOGIN with the user name as initial response",
        [
            GREETING,
            (C, b"AUTH LOGIN " + b64(b"alice") + b"\r\n"),
            (S, b"+ UGFzc3dvcmQ6\r\n"),
            (C, b64(b"secret") + b"\r\n"),
            (S, b"+OK\r\n"),
        ],
        logged_in("alice", "LOGIN"),
        None,
    ),
    (
        "AUTH LOGIN refused after the password",
        [
            GREETING,
            (C, b"AUTH LOGIN\r\n"),
            (S, b"+ VXNlcm5hbWU6\r\n"),
            (C, b64(b"alice") + b"\r\n"),
            (S, b"+ UGFzc3dvcmQ6\r\n"),
            (C, b64(b"wrong") + b"\r\n"),
            (S, b"-ERR [AUTH] Authentication failed.\r\n"),
        ],
        [],
        None,
    ),
    (
        "an unsupported mechanism refused, then PLAIN",
        [
            GREETING,
            (C, b"AUTH GSSAPI\r\n"),
            (S, b"-ERR Unsupported authentication mechanism.\r\n"),
            (C, b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n"),
            (S, b"+OK\r\n"),
        ],
        logged_in("alice", "PLAIN"),
        None,
    ),
    (
        "another mechanism accepted: logged in, nobody to name",
        [
            GREETING,
            (C, b"AUTH CRAM-MD5\r\n"),
            (S, b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n"),
            (C, b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n"),
            (S, b"+OK\r\n"),
        ],
        [Ended(AUTHENTICATED)],
        None,
    ),
    (
        "APOP accepted: logged in, nobody to name",
        [GREETING, (C, b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"), (S, b"+OK\r\n")],
        [Ended(AUTHENTICATED)],
        None,
    ),
    (
        "CAPA and a bare AUTH: multi-line answers are skipped, even lines that look like status",
        [
            GREETING,
            (C, b"CAPA\r\n"),
            (S, b"+OK\r\nCAPA\r\nTOP\r\n+OK\r\n-ERR\r\nSASL PLAIN LOGIN\r\n..\r\n.\r\n"),
            (C, b"AUTH\r\n"),
            (S, b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
            (C, b"USER alice\r\n"),
            (S, b"+OK\r\n"),
            (C, b"PASS secret\r\n"),
            (S, b"+OK\r\n"),
        ],
        logged_in("alice", "USER"),
        None,
    ),
    (
        "STLS accepted: TLS from then on",
        [GREETING, (C, b"STLS\r\n"), (S, b"+OK Begin TLS negotiation now.\r\n"), (C, b"\x16\x03\x01\x02\x00")],
        [Ended(TLS)],
        None,
    ),
    (
        "STLS refused, then a login in clear",
        [
            GREETING,
            (C, b"STLS\r\n"),
            (S, b"-ERR TLS support isn't enabled.\r\n"),
            (C, b"USER alice\r\nPASS secret\r\n"),
            (S, b"+OK\r\n+OK\r\n"),
        ],
        logged_in("alice", "USER"),
        None,
    ),
    (
        "implicit TLS (POP3S) on a monitored port: the client's ClientHello",
        [(C, b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03")],
        [Ended(TLS)],
        None,
    ),
    (
        "implicit TLS: a server speaking TLS first",
        [(S, b"\x16\x03\x03\x00\x7a\x02")],
        [Ended(TLS)],
        None,
    ),
    (
        "AUTH LOGIN accepted without the password step: nobody to name",
        [GREETING, (C, b"AUTH LOGIN " + b64(b"alice") + b"\r\n"), (S, b"+OK\r\n")],
        [Ended(AUTHENTICATED)],
        None,
    ),
    (
        "a refusing greeting",
        [(S, b"-ERR [SYS/TEMP] too many connections\r\n")],
        [Ended(REFUSED)],
        None,
    ),
    (
        "a user name with an invisible character is not reported",
        [GREETING, (C, "USER ali\u202ece\r\n".encode()), (S, b"+OK\r\n"), (C, b"PASS x\r\n"), (S, b"+OK\r\n")],
        [Ended(AUTHENTICATED)],
        None,
    ),
    (
        "after the login, the mailbox is not read",
        [
            GREETING,
            (C, b"USER alice\r\nPASS secret\r\nRETR 1\r\n"),
            (S, b"+OK\r\n+OK\r\n+OK 12 octets\r\nUSER mallory\r\n+OK\r\n.\r\n"),
        ],
        logged_in("alice", "USER"),
        None,
    ),
    (
        "not POP3",
        [(S, b"HTTP/1.1 200 OK\r\n")],
        [],
        NOT_POP3,
    ),
    (
        "a continuation that answers no AUTH",
        [GREETING, (C, b"USER alice\r\n"), (S, b"+ go on\r\n")],
        [],
        NOT_POP3,
    ),
    (
        "an overlong status line",
        [GREETING, (C, b"NOOP\r\n"), (S, b"-ERR " + b"x" * 2000 + b"\r\n")],
        [],
        LINE_TOO_LONG,
    ),
    (
        "more commands than the backlog allows without answers",
        [GREETING, (C, b"NOOP\r\n" * 17)],
        [],
        BACKLOG,
    ),
]


class KnownAnswerTests(SynchronousTestCase):
    """The events of known transcripts."""

    def test_knownAnswers(self) -> None:
        """Each transcript gives exactly its events (Login only on +OK to PASS after an
        accepted USER, or to AUTH PLAIN / LOGIN), and the expected drop reason."""
        for name, transcript, events, error in KNOWN_ANSWERS:
            self.assertEqual(feed(transcript), Outcome(events, error), name)

    def test_byteByByte(self) -> None:
        """Each transcript fed one byte at a time, server and client alternating as the
        transcript allows, gives the same events."""
        for name, transcript, events, error in KNOWN_ANSWERS:
            chunks = [(direction, data[i : i + 1]) for direction, data in transcript for i in range(len(data))]
            self.assertEqual(feed(chunks), Outcome(events, error), name)

    def test_afterEndNothing(self) -> None:
        """Once ended, a dialogue ignores what follows, in both directions."""
        dialogue = Pop3Dialogue()
        dialogue.server_data(b"+OK\r\n")
        self.assertEqual(dialogue.client_data(b"STLS\r\n"), [])
        self.assertEqual(dialogue.server_data(b"+OK go\r\n"), [Ended(TLS)])
        self.assertEqual(dialogue.ended, TLS)
        self.assertEqual(dialogue.client_data(b"USER a\r\nPASS b\r\n"), [])
        self.assertEqual(dialogue.server_data(b"+OK\r\n+OK\r\n"), [])
        self.assertEqual(dialogue.buffered_bytes(), 0)

    def test_droppedOnce(self) -> None:
        """A dropped dialogue raises DialogueError (a ProtocolError) once, then ignores
        everything."""
        dialogue = Pop3Dialogue()
        error = self.assertRaises(DialogueError, dialogue.server_data, b"SSH-2.0-OpenSSH_9.2\r\n")
        self.assertIsInstance(error, ProtocolError)
        self.assertEqual(error.reason, NOT_POP3)
        self.assertEqual(dialogue.server_data(b"+OK\r\n"), [])
        self.assertEqual(dialogue.client_data(b"USER a\r\n"), [])

    def test_noSecretKept(self) -> None:
        """No event, error or repr holds the password."""
        dialogue = Pop3Dialogue()
        dialogue.server_data(b"+OK\r\n")
        dialogue.client_data(b"USER alice\r\nPASS s3cr3t-pw\r\n")
        self.assertNotIn("s3cr3t", repr(dialogue))
        events = dialogue.server_data(b"+OK\r\n+OK\r\n")
        self.assertNotIn("s3cr3t", repr(events))
        self.assertEqual(dialogue.buffered_bytes(), 0)

    def test_arguments(self) -> None:
        """max_backlog must be positive."""
        self.assertRaises(ValueError, Pop3Dialogue, max_backlog=0)


# -- properties --------------------------------------------------------------------------

users = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N"], include_characters="._@-"), min_size=1)
passwords = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1, max_size=20)
eols = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def transcripts(draw: st.DrawFn) -> tuple[list[Message], list[DialogueEvent]]:
    """A plausible POP3 session with failures and noise, and the events it must give.

    The session ends with a terminal exchange (a login, STLS or QUIT), after which
    the streams carry more bytes that must be ignored.
    """
    eol = draw(eols)
    messages: list[Message] = [(S, b"+OK ready" + eol)]

    def line(direction: str, text: bytes) -> None:
        messages.append((direction, text + eol))

    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["pass-fail", "plain-fail", "login-fail", "capa", "noop", "junk", "stls-no"]))
        user = draw(users).encode()
        if kind == "pass-fail":
            line(C, b"USER " + user)
            line(S, b"+OK")
            line(C, b"PASS " + draw(passwords).encode())
            line(S, b"-ERR [AUTH] Authentication failed.")
        elif kind == "plain-fail":
            line(C, b"AUTH PLAIN " + plain(user.decode(), draw(passwords)))
            line(S, b"-ERR [AUTH] Authentication failed.")
        elif kind == "login-fail":
            line(C, b"AUTH LOGIN")
            line(S, b"+ VXNlcm5hbWU6")
            line(C, b64(user))
            line(S, b"+ UGFzc3dvcmQ6")
            line(C, b"*")
            line(S, b"-ERR Authentication aborted")
        elif kind == "capa":
            line(C, b"CAPA")
            line(S, b"+OK" + eol + b"+OK" + eol + b"USER" + eol + b"SASL PLAIN LOGIN" + eol + b".")
        elif kind == "noop":
            line(C, b"NOOP")
            line(S, b"-ERR Unknown command.")
        elif kind == "junk":
            # Not a TLS record: that would be a TLS stream if it came first.
            line(C, draw(st.binary(max_size=40)).replace(b"\n", b"").lstrip(b"\x16"))
            line(S, b"-ERR Unknown command.")
        else:
            line(C, b"STLS")
            line(S, b"-ERR TLS support isn't enabled.")
    user_text = draw(users)
    user = user_text.encode()
    password = draw(passwords).encode()
    end = draw(st.sampled_from(["user", "pipelined", "plain", "plain-cont", "login", "stls", "quit"]))
    events: list[DialogueEvent]
    if end == "user":
        line(C, b"USER " + user)
        line(S, b"+OK")
        line(C, b"PASS " + password)
        line(S, b"+OK Logged in.")
        events = logged_in(user_text, "USER")
    elif end == "pipelined":
        messages.append((C, b"USER " + user + eol + b"PASS " + password + eol))
        messages.append((S, b"+OK" + eol + b"+OK Logged in." + eol))
        events = logged_in(user_text, "USER")
    elif end == "plain":
        line(C, b"AUTH PLAIN " + plain(user_text, password.decode()))
        line(S, b"+OK Logged in.")
        events = logged_in(user_text, "PLAIN")
    elif end == "plain-cont":
        line(C, b"AUTH PLAIN")
        line(S, b"+ ")
        line(C, plain(user_text, password.decode()))
        line(S, b"+OK Logged in.")
        events = logged_in(user_text, "PLAIN")
    elif end == "login":
        line(C, b"AUTH LOGIN")
        line(S, b"+ VXNlcm5hbWU6")
        line(C, b64(user))
        line(S, b"+ UGFzc3dvcmQ6")
        line(C, b64(password))
        line(S, b"+OK Logged in.")
        events = logged_in(user_text, "LOGIN")
    elif end == "stls":
        line(C, b"STLS")
        line(S, b"+OK Begin TLS negotiation now.")
        events = [Ended(TLS)]
    else:
        line(C, b"QUIT")
        line(S, b"+OK Logging out.")
        events = [Ended(QUIT)]
    # What follows the end is never read: the mailbox, TLS records, anything.
    messages.append((C, draw(st.binary(max_size=60))))
    messages.append((S, draw(st.binary(max_size=60))))
    return messages, events


@st.composite
def causal_schedules(draw: st.DrawFn, transcript: list[Message]) -> list[Message]:
    """The transcript's two streams cut into chunks at arbitrary points and interleaved
    arbitrarily, except that server bytes never come before the client bytes of the
    messages before them (an answer follows its command)."""
    streams: dict[str, bytearray] = {C: bytearray(), S: bytearray()}
    # For each server byte: how many client bytes precede it in the transcript.
    needs: list[int] = []
    for direction, data in transcript:
        if direction == S:
            needs += [len(streams[C])] * len(data)
        streams[direction] += data
    chunks: dict[str, list[tuple[bytes, int]]] = {}
    for direction, stream in streams.items():
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)) | {0, len(stream)})
        chunks[direction] = [
            (bytes(stream[a:b]), needs[b - 1] if direction == S else 0) for a, b in itertools.pairwise(cuts) if b > a
        ]
    schedule: list[Message] = []
    fed_client = 0
    client, server = chunks[C], chunks[S]
    while client or server:
        server_ready = bool(server) and server[0][1] <= fed_client
        if server_ready and (not client or draw(st.booleans())):
            schedule.append((S, server.pop(0)[0]))
        else:
            data = client.pop(0)[0]
            fed_client += len(data)
            schedule.append((C, data))
    return schedule


class PropertyTests(SynchronousTestCase):
    """Split and interleaving invariance; robustness on arbitrary bytes."""

    @given(st.data())
    def test_anyCausalSchedule(self, data: st.DataObject) -> None:
        """Any cutting and causal interleaving of a session gives its events, the same as
        feeding it message by message.  (The schedule lets the client run ahead of every
        answer, so the backlog is made large enough for a whole session.)"""
        transcript, events = data.draw(transcripts())
        self.assertEqual(feed(transcript), Outcome(events, None))
        schedule = data.draw(causal_schedules(transcript))
        self.assertEqual(feed(schedule, max_backlog=200), Outcome(events, None))

    @given(st.data())
    def test_anySchedule(self, data: st.DataObject) -> None:
        """With a backlog as large as the session, even answers fed before their commands
        give the same events: lines are paired by position, not by arrival."""
        transcript, events = data.draw(transcripts())
        client = b"".join(d for direction, d in transcript if direction == C)
        server = b"".join(d for direction, d in transcript if direction == S)
        cut_client = data.draw(st.integers(0, len(client)))
        cut_server = data.draw(st.integers(0, len(server)))
        schedule = [
            (S, server[:cut_server]),
            (C, client[:cut_client]),
            (S, server[cut_server:]),
            (C, client[cut_client:]),
        ]
        self.assertEqual(feed(schedule, max_backlog=1000), Outcome(events, None))

    @given(st.lists(st.tuples(st.sampled_from([C, S]), st.binary(max_size=300)), max_size=20))
    def test_arbitraryBytes(self, chunks: list[Message]) -> None:
        """Arbitrary bytes raise nothing but DialogueError, and the dialogue holds no more
        than its bounds (partial lines plus the backlog, per direction)."""
        dialogue = Pop3Dialogue(max_line=64, max_backlog=4)
        for direction, data in chunks:
            try:
                if direction == C:
                    dialogue.client_data(data)
                else:
                    dialogue.server_data(data)
            except DialogueError:
                pass
            self.assertLessEqual(dialogue.buffered_bytes(), 2 * (63 + 4 * 64))

    @given(
        st.lists(
            st.sampled_from([b"+OK\r\n", b"+ \r\n", b"-ERR\r\n", b"+OK\r\n.\r\n", b".\r\n", b"\r\n", b"+OK x"]),
            max_size=12,
        ),
        st.lists(
            st.sampled_from(
                [
                    *(b"USER a\r\n", b"PASS b\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH\r\n", b"CAPA\r\n"),
                    *(b"*\r\n", b"=\r\n", b"AGEAYg==\r\n", b"YQ==\r\n", b"STLS\r\n", b"\x16\r\n", b"QUIT\r\n"),
                ]
            ),
            max_size=12,
        ),
    )
    def test_pop3ishBytes(self, answers: list[bytes], commands: list[bytes]) -> None:
        """Sequences of POP3-like lines in any combination raise nothing but
        DialogueError, and a Login names a user that was sent."""
        events = feed([(S, b"+OK\r\n"), (C, b"".join(commands)), (S, b"".join(answers))], max_backlog=100).events
        for event in events:
            if isinstance(event, Login):
                self.assertIn(event.user, ("a",))
