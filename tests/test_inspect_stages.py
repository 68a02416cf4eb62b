"""The inspecting relay stages [4.9] over a recording relay: ordering, holding,
verdicts, replay with flow control, spooling.  The scanner here is a scripted stand-in
(tests/test_inspection.py runs the same paths against a real clamd)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.config import HeaderRule, InspectionProfile
from mailgw.inspect.check import MessageCheck, Verdict
from mailgw.inspect.clamd import Clean, Failed, Infected, ScanResult
from mailgw.inspect.imap4 import ImapInspectingStage
from mailgw.inspect.pop3 import Pop3InspectingStage
from mailgw.inspect.smtp import SmtpInspectingStage
from mailgw.inspect.spool import MEMORY_LIMIT
from mailgw.inspect.stage import InspectingStage
from mailgw.proxy.registry import SessionInfo, SessionState
from mailgw.proxy.relay import IRelayStage
from mailgw.testing import RecordingEnds
from mailgw.wire.framing import dot_stuff

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".leading dot line\r\n"
    b"Bye.\r\n"
)


def exe_message() -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"Subject: tool\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="XX"\r\n'
        b"\r\n"
        b"--XX\r\n"
        b"Content-Type: text/plain\r\n"
        b"\r\n"
        b"See the tool.\r\n"
        b"--XX\r\n"
        b'Content-Type: application/octet-stream; name="tool.exe"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
        b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n"
        b"--XX--\r\n"
    )


def profile(**changes: Any) -> InspectionProfile:
    values: dict[str, Any] = {
        "name": "strict",
        "max_message_size": 10_000_000,
        "scan_limit": 10_000_000,
        "scan_limit_action": "refuse",
        "clamd": None,
        "clamd_timeout": 30.0,
        "on_scanner_failure": "tempfail",
        "attachments_deny": ("*.exe",),
        "content_types_deny": ("application/x-msdownload",),
        "attachment_action": "strip",
        "header_rules": (),
    }
    values.update(changes)
    return InspectionProfile(**values)


class ScriptedScan:
    """Stands in for L{mailgw.inspect.clamd.Scan}: records what it is given; the test
    answers with L{answer}."""

    def __init__(self) -> None:
        self.result: Deferred[ScanResult] = Deferred(lambda d: None)
        self.data = bytearray()
        self.finished = False
        self.producer: Any = None
        self.done = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def write(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def answer(self, result: ScanResult) -> None:
        self.done = True
        self.result.callback(result)


class ScriptedScanner:
    def __init__(self) -> None:
        self.scans: list[ScriptedScan] = []

    def scan(self) -> ScriptedScan:
        self.scans.append(ScriptedScan())
        return self.scans[-1]


class Context:
    """An L{mailgw.inspect.stage.InspectionContext} that records the verdicts."""

    def __init__(self, folder: Path, prof: InspectionProfile, scanner: Any = None) -> None:
        self.profile = prof
        self.scanner = scanner
        self.spool_folder = folder
        self.clock = Clock()
        self.node_name = "gw.example"
        self.verdicts: list[tuple[str, Verdict]] = []

    def record(self, info: SessionInfo, message: MessageCheck, verdict: Verdict, where: str) -> None:
        self.verdicts.append((where, verdict))


def info(protocol: str) -> SessionInfo:
    return SessionInfo(
        session_id="s1",
        protocol=protocol,
        client="198.51.100.7:40000",
        started=0.0,
        owner=None,  # type: ignore[arg-type]
        state=SessionState.AUTHENTICATED,
        user="alice",
    )


class StageBase(SynchronousTestCase):
    stage_class: type[InspectingStage] = Pop3InspectingStage
    protocol = "pop3"

    def make(self, scanner: Any = None, **changes: Any) -> tuple[Any, RecordingEnds, Context]:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.folder = folder
        context = Context(folder, profile(clamd=object() if scanner is not None else None, **changes), scanner)
        stage = self.stage_class(context, info(self.protocol))  # type: ignore[arg-type]
        ends = RecordingEnds()
        stage.attach(ends)
        return stage, ends, context


class Pop3StageTests(StageBase):
    def test_interface(self) -> None:
        stage, _, _ = self.make()
        self.assertTrue(verifyObject(IRelayStage, stage))

    def test_cleanPassesIdentical(self) -> None:
        """A clean message reaches the client exactly as the server sent it, and the
        answers around it keep their order."""
        stage, ends, context = self.make()
        stage.from_client(b"LIST\r\nRETR 1\r\nNOOP\r\n")
        self.assertEqual(b"".join(ends.server), b"LIST\r\nRETR 1\r\nNOOP\r\n")
        answer = b"+OK 1 messages\r\n1 120\r\n.\r\n+OK 120 octets\r\n" + dot_stuff(MESSAGE) + b"+OK\r\n"
        for i in range(len(answer)):  # one octet at a time
            stage.from_server(answer[i : i + 1])
        self.assertEqual(b"".join(ends.client), answer)
        self.assertEqual([(where, type(v).__name__) for where, v in context.verdicts], [("RETR 1", "Passed")])
        self.assertEqual(list(self.folder.iterdir()), [])

    def test_topInspectedNotPadded(self) -> None:
        """TOP answers are inspected too (what they show of a denied attachment is
        stripped), and never padded: their size is not the message's."""
        stage, ends, context = self.make()
        top = exe_message()
        stage.from_client(b"TOP 1 200\r\n")
        stage.from_server(b"+OK top of message follows\r\n" + dot_stuff(top))
        out = b"".join(ends.client)
        self.assertIn(b'"tool.exe"', out)
        self.assertNotIn(b"TVqQAAMAAAAEAAAA", out)
        self.assertFalse(out.endswith(b" \r\n.\r\n"))
        self.assertEqual(context.verdicts[0][0], "TOP 1 200")

    def test_heldWhileJudged(self) -> None:
        """While the scanner has not answered, the server side is held and what it
        sent after the message waits; the verdict lets both go, in order."""
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        stage.from_client(b"RETR 1\r\nNOOP\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(MESSAGE) + b"+OK noop\r\n")
        self.assertTrue(ends.server_held)
        self.assertEqual(ends.client, [])
        self.assertEqual(bytes(scanner.scans[0].data), MESSAGE)
        self.assertTrue(scanner.scans[0].finished)
        scanner.scans[0].answer(Clean())
        self.assertFalse(ends.server_held)
        self.assertEqual(b"".join(ends.client), b"+OK\r\n" + dot_stuff(MESSAGE) + b"+OK noop\r\n")

    def test_scannerBackPressure(self) -> None:
        """clamd that cannot keep up holds the server side (through the scan's producer)."""
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\nFrom: a\r\n")
        scanner.scans[0].producer.pauseProducing()
        self.assertTrue(ends.server_held)
        scanner.scans[0].producer.resumeProducing()
        self.assertFalse(ends.server_held)

    def test_infectedReplaced(self) -> None:
        """An infected message is replaced by a notice naming the signature, padded to
        the original's size (LIST still holds); nothing of the original but the
        identifying headers."""
        scanner = ScriptedScanner()
        stage, ends, context = self.make(scanner)
        original = MESSAGE + b"x" * 3000 + b"\r\n"
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(original))
        scanner.scans[0].answer(Infected("Eicar-Test-Signature"))
        out = b"".join(ends.client)
        self.assertTrue(out.startswith(b"+OK\r\n") and out.endswith(b"\r\n.\r\n"))
        body = out[len(b"+OK\r\n") : -len(b".\r\n")]
        self.assertIn(b'virus "Eicar-Test-Signature"', body)
        self.assertIn(b"Message-ID: <m1@example.com>", body)
        self.assertNotIn(b"xxxx", body)
        self.assertEqual(len(body), len(original))
        self.assertEqual(context.verdicts[0][1].reason, "virus")  # type: ignore[union-attr]

    def test_scannerFailure(self) -> None:
        """clamd failing: -ERR [SYS/TEMP] with tempfail, the message with pass."""
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(MESSAGE))
        scanner.scans[0].answer(Failed("cannot connect"))
        self.assertEqual(b"".join(ends.client)[:16], b"-ERR [SYS/TEMP] ")
        stage, ends, _ = self.make(scanner, on_scanner_failure="pass")
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(MESSAGE))
        scanner.scans[-1].answer(Failed("cannot connect"))
        self.assertEqual(b"".join(ends.client), b"+OK\r\n" + dot_stuff(MESSAGE))

    def test_strippedAttachment(self) -> None:
        """A denied attachment is replaced by a notice naming the file; the text part
        stays; the result is padded to the original size."""
        stage, ends, context = self.make()
        original = exe_message()
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(original))
        out = b"".join(ends.client)[len(b"+OK\r\n") : -len(b".\r\n")]
        self.assertIn(b"See the tool.\r\n", out)
        self.assertIn(b"tool.exe", out)
        self.assertNotIn(b"TVqQAAMAAAAEAAAA", out)
        self.assertGreaterEqual(len(out), len(original))
        self.assertEqual(context.verdicts[0][1].label, "stripped")  # type: ignore[union-attr]

    def test_sizeLimit(self) -> None:
        """Beyond max_message_size the message is withheld, and nothing more of it is
        kept while the rest arrives."""
        stage, ends, context = self.make(max_message_size=1000)
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + MESSAGE)
        for _ in range(50):
            stage.from_server(b"y" * 1000 + b"\r\n")
            assert stage.check is not None
            self.assertLess(stage.check.held, 2000)
        stage.from_server(b".\r\n")
        self.assertIn(b"larger than the limit of 1000 octets", b"".join(ends.client))
        self.assertEqual(context.verdicts[0][1].reason, "size")  # type: ignore[union-attr]

    def test_scanLimit(self) -> None:
        """Beyond scan_limit the scan stops: "refuse" withholds the message, "pass"
        lets it through unscanned."""
        scanner = ScriptedScanner()
        stage, ends, context = self.make(scanner, scan_limit=100)
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(MESSAGE * 2))
        self.assertTrue(scanner.scans[0].result.called)  # cancelled: clamd is not waited for
        self.assertIn(b"too large to be scanned", b"".join(ends.client))
        self.assertEqual(context.verdicts[0][1].reason, "scan_limit")  # type: ignore[union-attr]
        stage, ends, context = self.make(scanner, scan_limit=100, scan_limit_action="pass")
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(MESSAGE * 2))
        self.assertEqual(b"".join(ends.client), b"+OK\r\n" + dot_stuff(MESSAGE * 2))
        self.assertIn("scan limit", context.verdicts[0][1].unscanned)  # type: ignore[union-attr]

    def test_headerRules(self) -> None:
        """A reject rule withholds the message; a tag rule marks its Subject."""
        rule = HeaderRule("X-Spam-Flag", re.compile("^YES"), "reject")
        stage, ends, _ = self.make(header_rules=(rule,))
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(b"X-Spam-Flag: YES\r\n" + MESSAGE))
        self.assertIn(b"header rule", b"".join(ends.client))
        tag = HeaderRule("X-Spam-Flag", re.compile("^YES"), "tag", "[SPAM]")
        stage, ends, _ = self.make(header_rules=(tag,))
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + dot_stuff(b"X-Spam-Flag: YES\r\n" + MESSAGE))
        self.assertIn(b"Subject: [SPAM] hello\r\n", b"".join(ends.client))

    def test_replayFollowsFlowControl(self) -> None:
        """A large passed message is written a chunk at a time, only while the client
        can take more; it was spooled to a 0600 file, removed once written."""
        stage, ends, _ = self.make()
        full = [False]

        def to_client(data: bytes) -> None:  # every write fills the client's buffer
            ends.client.append(data)
            if full[0]:
                stage.client_writable(False)

        stage.to_client.retarget(to_client)
        original = MESSAGE + (b"z" * 998 + b"\r\n") * 1000  # 1 MB
        stage.from_client(b"RETR 1\r\n")
        stage.client_writable(False)
        full[0] = True
        stage.from_server(b"+OK\r\n" + dot_stuff(original))
        (spooled,) = self.folder.iterdir()
        self.assertEqual(spooled.stat().st_mode & 0o777, 0o600)
        self.assertEqual(ends.client, [b"+OK\r\n"])
        self.assertTrue(ends.server_held)
        rounds = 0
        while stage.replaying is not None:
            before = len(ends.client)
            stage.client_writable(True)
            rounds += 1
            self.assertLessEqual(len(ends.client) - before, 1)
            self.assertLessEqual(len(ends.client[-1]), 65536 + 200)
            self.assertLess(rounds, 100)
        self.assertEqual(b"".join(ends.client), b"+OK\r\n" + dot_stuff(original))
        self.assertEqual(list(self.folder.iterdir()), [])
        self.assertGreater(rounds, 10)
        self.assertFalse(ends.server_held)

    def test_closedReleases(self) -> None:
        """The relay closing mid-message or mid-replay removes the spool file and
        cancels the scan."""
        scanner = ScriptedScanner()
        stage, _, _ = self.make(scanner)
        stage.from_client(b"RETR 1\r\n")
        stage.from_server(b"+OK\r\n" + MESSAGE + b"a" * (MEMORY_LIMIT + 10) + b"\r\n")
        self.assertEqual(len(list(self.folder.iterdir())), 1)
        stage.closed()
        self.assertEqual(list(self.folder.iterdir()), [])
        self.assertTrue(scanner.scans[0].result.called)


class ImapStageTests(StageBase):
    stage_class = ImapInspectingStage
    protocol = "imap4"

    def fetch(self, message: bytes, item: bytes = b"BODY[]") -> bytes:
        return b"* 1 FETCH (UID 7 " + item + b" {%d}\r\n" % len(message) + message + b")\r\nA1 OK done\r\n"

    def test_cleanPassesIdentical(self) -> None:
        stage, ends, context = self.make()
        stage.from_client(b"A1 FETCH 1 BODY.PEEK[]\r\n")
        self.assertEqual(ends.server, [b"A1 FETCH 1 BODY.PEEK[]\r\n"])
        answer = self.fetch(MESSAGE)
        for i in range(0, len(answer), 7):
            stage.from_server(answer[i : i + 7])
        self.assertEqual(b"".join(ends.client), answer)
        self.assertEqual(context.verdicts[0][0], "FETCH 1 BODY[]")

    def test_strippedLiteralLength(self) -> None:
        """A stripped message's literal has its new length."""
        stage, ends, _ = self.make()
        stage.from_server(self.fetch(exe_message()))
        out = b"".join(ends.client)
        match = re.search(rb"\{(\d+)\}\r\n", out)
        assert match is not None
        literal = out[match.end() : match.end() + int(match.group(1))]
        self.assertTrue(out[match.end() + int(match.group(1)) :].startswith(b")\r\nA1 OK"))
        self.assertIn(b"tool.exe", literal)
        self.assertNotIn(b"TVqQAAMAAAAEAAAA", literal)

    def test_infectedReplaced(self) -> None:
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        stage.from_server(self.fetch(MESSAGE, b"RFC822"))
        scanner.scans[0].answer(Infected("Eicar-Test-Signature"))
        out = b"".join(ends.client)
        match = re.search(rb"\{(\d+)\}\r\n", out)
        assert match is not None
        literal = out[match.end() : match.end() + int(match.group(1))]
        self.assertIn(b"Eicar-Test-Signature", literal)
        self.assertNotIn(b"leading dot", literal)
        self.assertTrue(out.endswith(b")\r\nA1 OK done\r\n"))

    def test_partGetsScanOnly(self) -> None:
        """A part literal (BODY[2]) is scanned, not walked as a message."""
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        part = b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n"
        stage.from_server(self.fetch(part, b"BODY[2]"))
        self.assertEqual(bytes(scanner.scans[0].data), part)
        scanner.scans[0].answer(Clean())
        self.assertEqual(b"".join(ends.client), self.fetch(part, b"BODY[2]"))

    def test_scannerFailureEndsSession(self) -> None:
        """clamd failing with tempfail: the literal becomes NIL, the answer is closed
        and the session ends with BYE [UNAVAILABLE] (the FETCH never completes)."""
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        stage.from_server(self.fetch(MESSAGE))
        scanner.scans[0].answer(Failed("timeout"))
        assert ends.ended is not None
        self.assertIn(b"NIL)\r\n* BYE [UNAVAILABLE]", ends.ended[1])
        self.assertNotIn(b"A1 OK", b"".join(ends.client))


class SmtpStageTests(StageBase):
    stage_class = SmtpInspectingStage
    protocol = "smtp"

    def transaction(self, stage: Any, ends: RecordingEnds) -> None:
        stage.from_client(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(b"".join(ends.server), b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertEqual(ends.client, [])
        stage.from_server(b"250 2.1.0 Ok\r\n")
        stage.from_server(b"250 2.1.5 Ok\r\n")
        replies = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        self.assertEqual(b"".join(ends.client), replies)
        del ends.client[:], ends.server[:]

    def test_cleanDelivered(self) -> None:
        """The server sees DATA only once the message passed, then the message; its
        final reply is the client's."""
        stage, ends, _ = self.make()
        self.transaction(stage, ends)
        stage.from_client(dot_stuff(MESSAGE))
        self.assertEqual(ends.server, [b"DATA\r\n"])
        stage.from_server(b"354 go ahead\r\n")
        self.assertEqual(b"".join(ends.server), b"DATA\r\n" + dot_stuff(MESSAGE))
        self.assertEqual(ends.client, [])
        stage.from_server(b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(ends.client, [b"250 2.0.0 Ok: queued\r\n"])

    def test_serverRefusesData(self) -> None:
        """The server refusing the gateway's DATA: its reply is the client's answer,
        the message is not sent, and the next command goes on."""
        stage, ends, _ = self.make()
        self.transaction(stage, ends)
        stage.from_client(dot_stuff(MESSAGE) + b"RSET\r\n")
        self.assertEqual(ends.server, [b"DATA\r\n"])
        stage.from_server(b"554 5.5.1 No valid recipients\r\n")
        self.assertEqual(ends.client, [b"554 5.5.1 No valid recipients\r\n"])
        self.assertEqual(b"".join(ends.server), b"DATA\r\nRSET\r\n")
        self.assertEqual(list(self.folder.iterdir()), [])

    def test_infectedNeverReachesServer(self) -> None:
        """An infected message: 550 5.7.1 naming the signature; the server gets RSET
        (its reply not passed on), never DATA nor the end of data."""
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        self.transaction(stage, ends)
        stage.from_client(dot_stuff(MESSAGE) + b"QUIT\r\n")
        self.assertEqual(ends.server, [])
        scanner.scans[0].answer(Infected("Eicar-Test-Signature"))
        self.assertEqual(ends.client[0][:10], b"550 5.7.1 ")
        self.assertIn(b"Eicar-Test-Signature", ends.client[0])
        self.assertEqual(b"".join(ends.server), b"RSET\r\nQUIT\r\n")
        stage.from_server(b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")
        self.assertEqual(b"".join(ends.client[1:]), b"221 2.0.0 Bye\r\n")

    def test_scannerFailure(self) -> None:
        scanner = ScriptedScanner()
        stage, ends, _ = self.make(scanner)
        self.transaction(stage, ends)
        stage.from_client(dot_stuff(MESSAGE))
        scanner.scans[0].answer(Failed("timeout"))
        self.assertEqual(ends.client[0][:10], b"451 4.7.1 ")
        self.assertEqual(ends.server, [b"RSET\r\n"])

    def test_sizeAtMailFrom(self) -> None:
        """MAIL FROM with SIZE= above the limit: 552 at once, not passed on."""
        stage, ends, _ = self.make(max_message_size=1000)
        stage.from_client(b"MAIL FROM:<a@example.com> SIZE=5000\r\n")
        self.assertEqual(ends.server, [])
        self.assertEqual(ends.client[0][:10], b"552 5.3.4 ")
        stage.from_client(b"MAIL FROM:<a@example.com> SIZE=500\r\n")
        self.assertEqual(ends.server, [b"MAIL FROM:<a@example.com> SIZE=500\r\n"])

    def test_sizeAfterData(self) -> None:
        stage, ends, _ = self.make(max_message_size=100)
        self.transaction(stage, ends)
        stage.from_client(dot_stuff(MESSAGE * 3))
        self.assertEqual(ends.client[0][:10], b"552 5.3.4 ")
        self.assertEqual(ends.server, [b"RSET\r\n"])

    def test_noRecipients(self) -> None:
        """DATA with no accepted recipient is answered by the gateway, as the server would."""
        stage, ends, _ = self.make()
        stage.from_client(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n")
        stage.from_server(b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n")
        self.assertEqual(ends.client[-1][:10], b"554 5.5.1 ")
        stage.from_client(b"RSET\r\n")
        self.assertEqual(ends.server[-1], b"RSET\r\n")

    def test_bdat(self) -> None:
        """BDAT chunks are answered by the gateway; the passed message goes to the
        server as one BDAT LAST."""
        stage, ends, _ = self.make()
        stage.from_client(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        stage.from_server(b"250 Ok\r\n250 Ok\r\n")
        del ends.client[:], ends.server[:]
        half = len(MESSAGE) // 2
        stage.from_client(b"BDAT %d\r\n" % half + MESSAGE[:half])
        self.assertEqual(ends.client[0][:10], b"250 2.0.0 ")
        rest = MESSAGE[half:]
        stage.from_client(b"BDAT %d LAST\r\n" % len(rest) + rest)
        self.assertEqual(b"".join(ends.server), b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)
        stage.from_server(b"250 2.0.0 queued\r\n")
        self.assertEqual(ends.client[-1], b"250 2.0.0 queued\r\n")

    def test_attachmentRejected(self) -> None:
        """attachment_action = reject: 550 5.7.1 naming the file."""
        stage, ends, _ = self.make(attachment_action="reject")
        self.transaction(stage, ends)
        stage.from_client(dot_stuff(exe_message()))
        self.assertEqual(ends.client[0][:10], b"550 5.7.1 ")
        self.assertIn(b"tool.exe", ends.client[0])
        self.assertEqual(ends.server, [b"RSET\r\n"])
