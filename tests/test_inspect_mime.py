"""Tests for L{mailgw.inspect.mime}: the streaming MIME inspector and rewriter [4.9]."""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import HeaderRule, InspectionProfile
from mailgw.inspect.mime import MAX_FINDINGS, Finding, MimeInspector

# -- helpers -------------------------------------------------------------------------------


def profile(**overrides: Any) -> InspectionProfile:
    """An inspection profile denying C{*.exe} and C{application/x-msdownload} (strip)."""
    values: dict[str, Any] = {
        "name": "strict",
        "max_message_size": 50 * 1024 * 1024,
        "scan_limit": 50 * 1024 * 1024,
        "scan_limit_action": "pass",
        "clamd": None,
        "clamd_timeout": 10.0,
        "on_scanner_failure": "reject",
        "attachments_deny": ("*.exe",),
        "content_types_deny": ("application/x-msdownload",),
        "attachment_action": "strip",
        "header_rules": (),
    }
    values.update(overrides)
    return InspectionProfile(**values)


STRICT = profile()
#: denies nothing at all
PERMISSIVE = profile(attachments_deny=(), content_types_deny=())


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """Cut C{data} at the given offsets (clamped, in any order, repeats allowed)."""
    cuts = sorted({min(max(point, 0), len(data)) for point in points})
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


@dataclass
class Result:
    output: bytes
    findings: list[Finding]
    rejected: Finding | None
    changed: bool


def inspect(chunks: Sequence[bytes], prof: InspectionProfile = STRICT, **kwargs: Any) -> Result:
    """Feed C{chunks} to a new inspector; what it gave."""
    inspector = MimeInspector(prof, **kwargs)
    output = b"".join(inspector.feed(chunk) for chunk in chunks) + inspector.finish()
    return Result(output, inspector.findings, inspector.rejected, inspector.changed)


def lines(*parts: str, nl: str = "\r\n") -> bytes:
    return "".join(part + nl for part in parts).encode("utf-8")


# -- generated MIME trees ------------------------------------------------------------------


@dataclass
class Node:
    """A MIME entity to render: C{kind} C{leaf}, C{multipart} or C{message}."""

    kind: str
    headers: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    boundary: str = ""
    denied: bool = False  # carries a denied name or type (under the default profile)

    def render(self, nl: str) -> str:
        head = "".join(h + nl for h in self.headers) + nl
        if self.kind == "leaf":
            return head + "".join(line + nl for line in self.body)
        if self.kind == "message":
            return head + self.children[0].render(nl)
        out = head + "".join(line + nl for line in self.body)  # the preamble
        for child in self.children:
            out += f"--{self.boundary}{nl}" + child.render(nl)
        # an epilogue that looks like a denied part (it is none)
        return out + f"--{self.boundary}--{nl}Content-Type: application/x-msdownload{nl}{nl}MZ{nl}"

    def any_denied(self) -> bool:
        return self.denied or any(child.any_denied() for child in self.children)


TEXT = st.lists(st.text(st.sampled_from("abc -=.:;\"'"), max_size=20), max_size=4)
NAMES = st.sampled_from(
    [
        ("filename=report.pdf", False),
        ('filename="tool.exe"', True),
        ("name=tool.exe", True),
        ("filename*=utf-8''tool%2Eexe", True),
        ("filename*0*=utf-8''tool; filename*1=.exe", True),
        ('filename="=?utf-8?B?dG9vbC5leGU=?="', True),
        ('filename="=?utf-8?B?cmVwb3J0LnBkZg==?="', False),
        ("filename*=utf-8''r%C3%A9sum%C3%A9.doc", False),
    ]
)


@st.composite
def leaves(draw: st.DrawFn) -> Node:
    if draw(st.booleans()):
        return Node("leaf", ["Content-Type: text/plain; charset=utf-8"], draw(TEXT))
    name, denied = draw(NAMES)
    ctype = draw(st.sampled_from(["application/octet-stream", "application/x-msdownload", "image/png"]))
    if draw(st.booleans()):
        headers = [f"Content-Type: {ctype}", f"Content-Disposition: attachment; {name}"]
    else:
        headers = [f"Content-Type: {ctype}; {name}"]
    headers.append("Content-Transfer-Encoding: base64")
    payload = base64.encodebytes(draw(st.binary(max_size=200))).decode("ascii").splitlines()
    return Node("leaf", headers, payload, denied=denied or ctype == "application/x-msdownload")


def containers(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    @st.composite
    def build(draw: st.DrawFn) -> Node:
        if draw(st.integers(0, 3)) == 0:
            inner = draw(children)
            inner = replace(inner, headers=["From: a@example.com", "Subject: inner", *inner.headers])
            return Node("message", ["Content-Type: message/rfc822"], children=[inner])
        sub = draw(st.sampled_from(["mixed", "alternative", "related"]))
        boundary = draw(st.sampled_from(["b1", "=_b2", "b3 x", "b4'(+_,-./:=?"]))
        parts = draw(st.lists(children, min_size=1, max_size=3))
        fold = draw(st.sampled_from([" ", "\r\n\t"]))
        headers = [f'Content-Type: multipart/{sub};{fold}boundary="{boundary}"']
        return Node("multipart", headers, draw(TEXT), parts, boundary)

    return build()


def unique(node: Node, path: str = "") -> Node:
    """C{node} with a boundary of its own for each multipart (as mailers make them)."""
    children = [unique(child, f"{path}.{index}") for index, child in enumerate(node.children)]
    if node.kind != "multipart":
        return replace(node, children=children)
    boundary = node.boundary + path
    headers = [h.replace(f'"{node.boundary}"', f'"{boundary}"') for h in node.headers]
    return replace(node, headers=headers, children=children, boundary=boundary)


TREES = st.recursive(leaves(), containers, max_leaves=8).map(
    lambda node: unique(
        replace(node, headers=["From: a@example.com", "Subject: hi", "MIME-Version: 1.0", *node.headers])
    )
)
NEWLINES = st.sampled_from(["\r\n", "\n"])
SPLITS = st.lists(st.integers(0, 4000), max_size=12)

#: MIME-ish tokens: garbage that is likely to hit the structure
TOKENS = st.lists(
    st.sampled_from(
        [
            b"\r\n",
            b"\n",
            b"\r",
            b"--",
            b"--B",
            b"--B--",
            b"--C",
            b" ",
            b"Content-Type: multipart/mixed; boundary=B",
            b"Content-Type: multipart/digest; boundary=C",
            b"Content-Type: message/rfc822",
            b"Content-Type: application/x-msdownload",
            b"Content-Disposition: attachment; filename=x.exe",
            b"Content-Transfer-Encoding: base64",
            b"Subject: s",
            b"X-Spam-Flag: YES",
            b"abc",
            b"\xff\x00",
        ]
    ),
    max_size=60,
).map(b"".join)

TAGGING = profile(header_rules=(HeaderRule("X-Spam-Flag", re.compile("^YES"), "tag", "[SPAM]"),))


class PropertyTests(SynchronousTestCase):
    """Properties over generated MIME trees and arbitrary octets."""

    @given(TREES, NEWLINES, SPLITS)
    def test_splitAnywhere(self, tree: Node, nl: str, points: list[int]) -> None:
        """
        However the message is cut into chunks, the output and the findings are those
        of the whole message fed at once.
        """
        message = tree.render(nl).encode("utf-8")
        whole = inspect([message])
        self.assertEqual(inspect(split_at(message, points)), whole)

    @given(TREES, NEWLINES, SPLITS)
    def test_nothingDeniedIsIdentity(self, tree: Node, nl: str, points: list[int]) -> None:
        """With nothing denied, the output is the input octet for octet."""
        message = tree.render(nl).encode("utf-8")
        result = inspect(split_at(message, points), PERMISSIVE)
        self.assertEqual((result.output, result.findings, result.changed), (message, [], False))

    @given(TREES, NEWLINES)
    def test_deniedPartsStripped(self, tree: Node, nl: str) -> None:
        """
        A message changes exactly when it has a denied part; its output, inspected
        again, has nothing left to strip.
        """
        message = tree.render(nl).encode("utf-8")
        result = inspect([message])
        self.assertEqual(result.changed, tree.any_denied())
        self.assertEqual(bool(result.findings), tree.any_denied())
        self.assertIsNone(result.rejected)
        self.assertEqual(result.output == message, not tree.any_denied())
        again = inspect([result.output])
        self.assertEqual((again.output, again.findings), (result.output, []))

    @given(st.binary(max_size=2000), SPLITS)
    def test_arbitraryOctets(self, data: bytes, points: list[int]) -> None:
        """Arbitrary octets never raise; without findings the output is the input."""
        result = inspect(split_at(data, points), TAGGING)
        if not result.findings:
            self.assertEqual(result.output, data)
        self.assertEqual(result, inspect([data], TAGGING))

    @given(TOKENS, SPLITS)
    def test_mimeLikeGarbage(self, data: bytes, points: list[int]) -> None:
        """
        MIME-like garbage never raises, splits do not matter, and without findings the
        output is the input.
        """
        result = inspect(split_at(data, points), TAGGING, max_depth=4, max_header_block=200)
        self.assertEqual(result, inspect([data], TAGGING, max_depth=4, max_header_block=200))
        if not result.findings:
            self.assertEqual(result.output, data)
        permissive = inspect([data], PERMISSIVE, max_header_block=10**6)
        if not permissive.findings:
            self.assertEqual(permissive.output, data)


# -- examples ------------------------------------------------------------------------------


def text_part(boundary: str = "B") -> bytes:
    return lines(f"--{boundary}", "Content-Type: text/plain; charset=us-ascii", "", "Hello,", "see attached.")


TEXT_PART = text_part()
PAYLOAD = lines("TVqQAAMAAAAEAAAA", "//8AALgAAAAA")


def with_attachment(*headers: str, boundary: str = "B", payload: bytes = PAYLOAD) -> bytes:
    return (
        lines(
            "From: a@example.com",
            "Subject: hi",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/mixed; boundary="{boundary}"',
            "",
        )
        + text_part(boundary)
        + lines(f"--{boundary}", *headers, "Content-Transfer-Encoding: base64", "")
        + payload
        + lines(f"--{boundary}--")
    )


def notice(filename: str = "tool.exe", rule: str = "*.exe") -> bytes:
    return f'The attachment "{filename}" was removed by the mail gateway (rule: {rule}).'.encode()


NOTICE = notice()


class AttachmentTests(SynchronousTestCase):
    """Denied attachments and types."""

    def assertStripped(self, message: bytes, filename: str = "tool.exe", rule: str = "*.exe") -> Result:
        result = inspect([message])
        self.assertIsNone(result.rejected)
        self.assertTrue(result.changed)
        self.assertEqual(
            [(f.kind, f.rule, f.filename, f.action) for f in result.findings][:1],
            [("attachment", rule, filename, "strip")],
        )
        self.assertIn(TEXT_PART, result.output)
        self.assertIn(notice(filename, rule), result.output)
        self.assertNotIn(b"TVqQ", result.output)
        self.assertTrue(result.output.endswith(b"--B--\r\n"))
        return result

    def test_filename(self) -> None:
        """A C{filename} matching C{*.exe} strips the part, the text part intact."""
        result = self.assertStripped(
            with_attachment(
                "Content-Type: application/octet-stream", "Content-Disposition: attachment; filename=tool.exe"
            )
        )
        self.assertEqual(
            result.output,
            with_attachment("Content-Type: application/octet-stream").partition(
                b"--B\r\nContent-Type: application/octet"
            )[0]
            + b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            + NOTICE
            + b"\r\n--B--\r\n",
        )
        self.assertEqual(result.findings[0].content_type, "application/octet-stream")

    def test_nameOnly(self) -> None:
        """The C{name} parameter of C{Content-Type} counts too."""
        self.assertStripped(with_attachment('Content-Type: application/octet-stream; name="tool.exe"'))

    def test_rfc2231(self) -> None:
        """An RFC 2231 encoded file name is decoded before matching."""
        self.assertStripped(
            with_attachment(
                "Content-Type: application/octet-stream", "Content-Disposition: attachment; filename*=utf-8''tool%2Eexe"
            )
        )

    def test_rfc2231Continuations(self) -> None:
        """RFC 2231 continuations are joined before matching."""
        self.assertStripped(
            with_attachment(
                "Content-Type: application/octet-stream",
                "Content-Disposition: attachment;",
                " filename*0*=utf-8''to%6Fl; filename*1=.exe",
            )
        )

    def test_rfc2047(self) -> None:
        """An RFC 2047 encoded word as a file name is decoded before matching."""
        self.assertStripped(
            with_attachment(
                "Content-Type: application/octet-stream",
                'Content-Disposition: attachment; filename="=?utf-8?B?dG9vbC5leGU=?="',
            )
        )

    def test_uppercaseAndPath(self) -> None:
        """Names match case-insensitively, on the part after a path."""
        self.assertStripped(
            with_attachment('Content-Type: application/octet-stream; name="C:\\\\temp\\\\TOOL.EXE"'),
            filename="C:\\temp\\TOOL.EXE",
        )

    def test_insideMessageRfc822(self) -> None:
        """An attachment inside a message/rfc822 inside a multipart is stripped too."""
        inner = with_attachment(
            "Content-Type: application/octet-stream", "Content-Disposition: attachment; filename=tool.exe", boundary="I"
        )
        message = (
            lines("From: a@example.com", "Content-Type: multipart/mixed; boundary=B", "")
            + lines("--B", "Content-Type: message/rfc822", "")
            + inner
            + lines("--B--")
        )
        result = inspect([message])
        self.assertEqual(
            [(f.kind, f.filename, f.action) for f in result.findings], [("attachment", "tool.exe", "strip")]
        )
        self.assertIn(NOTICE + b"\r\n--I--\r\n--B--\r\n", result.output)
        self.assertNotIn(b"TVqQ", result.output)
        self.assertIn(
            b"--I\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nHello,\r\nsee attached.\r\n", result.output
        )

    def test_contentType(self) -> None:
        """A type in C{content_types_deny} strips the part; the notice names the type."""
        result = inspect([with_attachment("Content-Type: application/x-msdownload")])
        self.assertEqual(
            result.findings,
            [Finding("content-type", "application/x-msdownload", None, "application/x-msdownload", "strip")],
        )
        self.assertIn(
            b"A part of type application/x-msdownload was removed by the mail gateway"
            b" (rule: application/x-msdownload).",
            result.output,
        )

    def test_reject(self) -> None:
        """With C{attachment_action = "reject"} the message is rejected."""
        inspector = MimeInspector(profile(attachment_action="reject"))
        inspector.feed(with_attachment("Content-Type: application/octet-stream; name=tool.exe"))
        inspector.finish()
        self.assertEqual(
            inspector.rejected, Finding("attachment", "*.exe", "tool.exe", "application/octet-stream", "reject")
        )
        self.assertEqual(inspector.findings, [inspector.rejected])
        self.assertEqual(inspector.held, 0)

    def test_topLevel(self) -> None:
        """
        A denied message that is no multipart keeps its other fields; its content
        fields are replaced and its body is the notice.
        """
        message = lines(
            "From: a@example.com",
            "Subject: x",
            "Content-Type: application/octet-stream; name=tool.exe",
            "Content-Transfer-Encoding: base64",
            "",
            "TVqQ",
            nl="\n",
        )
        result = inspect([message])
        self.assertEqual(
            result.output,
            b"From: a@example.com\nSubject: x\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
            b"Content-Transfer-Encoding: 7bit\n\n" + NOTICE + b"\n",
        )

    def test_nonAsciiNotice(self) -> None:
        """A non-ASCII file name gives a quoted-printable notice; control characters in
        it cannot forge a boundary line."""
        name = "=?utf-8?B?" + base64.b64encode("tür\r\n--B--\r\n.exe".encode()).decode() + "?="
        result = inspect([with_attachment(f'Content-Type: application/octet-stream; name="{name}"')])
        self.assertEqual(result.findings[0].filename, "tür??--B--??.exe")
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", result.output)
        self.assertEqual(result.output.count(b"--B--"), 2)  # the notice's and the real one
        self.assertEqual(result.output.count(b"\r\n--B--\r\n"), 1)

    def test_digest(self) -> None:
        """Parts of a multipart/digest default to message/rfc822 and are walked."""
        message = lines(
            "Content-Type: multipart/digest; boundary=D",
            "",
            "--D",
            "",
            "From: x",
            "Content-Type: application/x-msdownload",
            "",
            "MZ",
            "--D--",
        )
        result = inspect([message])
        self.assertEqual([f.kind for f in result.findings], ["content-type"])
        self.assertNotIn(b"\r\nMZ\r\n", result.output)

    def test_brokenInnerMultipart(self) -> None:
        """An inner multipart without its close delimiter ends at the outer boundary."""
        message = lines(
            "Content-Type: multipart/mixed; boundary=O", "", "--O", "Content-Type: multipart/mixed; boundary=I", "",
            "--I", "Content-Type: text/plain", "", "inner",
            "--O", "Content-Type: application/x-msdownload", "", "MZ", "--O--",
        )  # fmt: skip
        result = inspect([message])
        self.assertEqual([f.kind for f in result.findings], ["content-type"])
        self.assertNotIn(b"MZ", result.output)
        self.assertIn(b"inner\r\n--O\r\nContent-Type: text/plain; charset=utf-8", result.output)

    def test_boundaryWithBlanks(self) -> None:
        """A boundary line may end in blanks (RFC 2046); a longer word is no boundary."""
        message = lines(
            "Content-Type: multipart/mixed; boundary=B", "", "--B \t", "Content-Type: text/plain", "", "--Bx",
            "--B", "Content-Type: application/x-msdownload", "", "MZ", "--B--  ",
        )  # fmt: skip
        result = inspect([message])
        self.assertEqual(len(result.findings), 1)
        self.assertIn(b"--Bx\r\n--B\r\nContent-Type: text/plain; charset=utf-8", result.output)
        self.assertTrue(result.output.endswith(b").\r\n--B--  \r\n"))

    def test_everySplit(self) -> None:
        """
        A message full of near-boundaries gives the same result cut in two anywhere:
        a boundary line split between chunks is recognised once complete.
        """
        message = lines(
            "Content-Type: multipart/mixed; boundary=B", "", "--Bx", "--B ",
            "Content-Type: multipart/mixed; boundary=C", "", "--C", "Content-Type: application/x-msdownload", "",
            "MZ", "--C-", "--C--\t", "Content-Type: a/b; name=x.exe",
            "", "--B", "", "--B--", "Content-Type: application/x-msdownload", "", "MZ", "-", "--", "--B",
        )  # fmt: skip
        whole = inspect([message])
        self.assertEqual([f.kind for f in whole.findings], ["content-type"])
        self.assertIn(b"--B--\r\nContent-Type: application/x-msdownload\r\n\r\nMZ\r\n", whole.output)
        for cut in range(len(message) + 1):
            self.assertEqual(inspect([message[:cut], message[cut:]]), whole, cut)
            self.assertEqual(
                inspect([message[:cut], message[cut:]], max_header_block=60),
                inspect([message], max_header_block=60),
                cut,
            )
        # byte by byte
        self.assertEqual(inspect(split_at(message, range(len(message)))), whole)

    def test_stdlibMessage(self) -> None:
        """
        A message written by the stdlib's C{email} package (alternative, attachments, a
        forwarded message with a non-ASCII RFC 2231 name), CRLF or LF: unchanged when
        nothing is denied; stripped, the stdlib reads the result with the notices.
        """
        inner = EmailMessage()
        inner["Subject"] = "fwd"
        inner.set_content("inner text")
        inner.add_attachment(b"MZ\x90\x00" * 100, maintype="application", subtype="octet-stream", filename="tööl.exe")
        outer = EmailMessage()
        outer["Subject"] = "Grüße"
        outer.set_content("Hello")
        outer.add_alternative("<p>Hello</p>", subtype="html")
        outer.add_attachment(b"MZ" * 1000, maintype="application", subtype="x-msdownload", filename="setup.bin")
        outer.add_attachment(b"%PDF" * 100, maintype="application", subtype="pdf", filename="report.pdf")
        outer.add_attachment(inner)
        for linesep in ("\r\n", "\n"):
            message = outer.as_bytes(policy=email.policy.default.clone(linesep=linesep))
            self.assertEqual(inspect([message], PERMISSIVE).output, message)
            result = inspect(split_at(message, range(0, len(message), 100)))
            self.assertEqual(
                [(f.kind, f.filename) for f in result.findings],
                [("content-type", "setup.bin"), ("attachment", "tööl.exe")],
            )
            parsed = email.message_from_bytes(result.output, policy=email.policy.default)
            parts = [(part.get_content_type(), part.get_filename()) for part in parsed.walk()]
            self.assertEqual(
                parts,
                [
                    *[("multipart/mixed", None), ("multipart/alternative", None)],
                    *[
                        ("text/plain", None),
                        ("text/html", None),
                        ("text/plain", None),
                        ("application/pdf", "report.pdf"),
                    ],
                    *[("message/rfc822", None), ("multipart/mixed", None), ("text/plain", None), ("text/plain", None)],
                ],
            )
            notices = [part.get_content() for part in parsed.walk() if "removed" in str(part.get_payload())]
            self.assertEqual(
                notices,
                [
                    'The attachment "setup.bin" was removed by the mail gateway (rule: application/x-msdownload).',
                    'The attachment "tööl.exe" was removed by the mail gateway (rule: *.exe).',
                ],
            )

    def test_tooManyFindings(self) -> None:
        """Findings are recorded up to L{MAX_FINDINGS}; stripping goes on."""
        part = lines("--B", "Content-Type: application/x-msdownload", "", "MZ")
        message = lines("Content-Type: multipart/mixed; boundary=B", "") + part * (MAX_FINDINGS + 5) + lines("--B--")
        result = inspect([message])
        self.assertEqual(len(result.findings), MAX_FINDINGS)
        self.assertNotIn(b"MZ", result.output)


class HeaderRuleTests(SynchronousTestCase):
    """C{header_rules} on the message's own header block."""

    MESSAGE = lines(
        "From: a@example.com", "X-Spam-Flag: NO", "x-spam-flag:  YES", "Subject: =?utf-8?q?hi?=", "", "body"
    )

    def test_reject(self) -> None:
        """A matching C{reject} rule rejects the message (any occurrence, any case)."""
        rule = HeaderRule("X-Spam-Flag", re.compile("^YES"), "reject")
        result = inspect([self.MESSAGE], profile(header_rules=(rule,)))
        self.assertEqual(result.rejected, Finding("header", "X-Spam-Flag: ^YES", None, "", "reject"))
        self.assertEqual(result.output, b"")

    def test_tagOnce(self) -> None:
        """Matching C{tag} rules put the (first) tag in front of the Subject, once."""
        rules = (
            HeaderRule("X-Spam-Flag", re.compile("^YES"), "tag", "[SPAM]"),
            HeaderRule("from", re.compile("example"), "tag", "[EXT]"),
        )
        result = inspect([self.MESSAGE], profile(header_rules=rules))
        self.assertEqual(result.output, self.MESSAGE.replace(b"Subject: =?utf", b"Subject: [SPAM] =?utf"))
        self.assertEqual(
            [(f.rule, f.action) for f in result.findings], [("X-Spam-Flag: ^YES", "tag"), ("from: example", "tag")]
        )
        self.assertTrue(result.changed)

    def test_tagAddsSubject(self) -> None:
        """Without a Subject, one is added."""
        message = lines("From: a@example.com", "X-Spam-Flag: YES", "", "body", nl="\n")
        result = inspect([message], TAGGING)
        self.assertEqual(
            result.output, lines("From: a@example.com", "X-Spam-Flag: YES", "Subject: [SPAM]", "", "body", nl="\n")
        )

    def test_decodedValue(self) -> None:
        """Rules also see the RFC 2047 decoding of a value."""
        rule = HeaderRule("Subject", re.compile("viagra"), "reject")
        message = lines("Subject: =?utf-8?B?dmlhZ3Jh?=", "", "x")
        self.assertIsNotNone(inspect([message], profile(header_rules=(rule,))).rejected)

    def test_partsNotConcerned(self) -> None:
        """Header rules do not apply to the headers of parts."""
        message = lines("Content-Type: multipart/mixed; boundary=B", "", "--B", "X-Spam-Flag: YES", "", "x", "--B--")
        self.assertEqual(inspect([message], TAGGING).output, message)


class MalformedTests(SynchronousTestCase):
    """What hides structure is rejected."""

    def assertMalformed(self, result: Result, rule: str) -> None:
        self.assertEqual((result.rejected and (result.rejected.kind, result.rejected.rule)), ("malformed", rule))

    def test_headerBlockLimit(self) -> None:
        """A header block over C{max_header_block} octets is rejected, whole or in pieces."""
        message = b"Subject: x\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\nbody"
        self.assertMalformed(inspect([message]), "a header block over 65536 octets")
        inspector = MimeInspector(profile())
        for chunk in split_at(message, range(0, len(message), 1000)):
            inspector.feed(chunk)
            self.assertLessEqual(inspector.held, 65536 + 1002)
        self.assertIsNotNone(inspector.rejected)

    def test_headerBlockAtLimit(self) -> None:
        """A header block of exactly C{max_header_block} octets passes."""
        block = b"X: " + b"a" * 95 + b"\r\n"
        message = block + b"\r\nbody"
        self.assertEqual(inspect([message], max_header_block=len(block)).output, message)
        self.assertMalformed(
            inspect([message], max_header_block=len(block) - 1), f"a header block over {len(block) - 1} octets"
        )

    def test_headerBlockLimitAtEnd(self) -> None:
        """The limit holds for a header block that the end of the message ends."""
        message = lines("Content-Type: multipart/mixed; boundary=B", "", "--B", "X: " + "a" * 150) + b"--" + b"x" * 100
        self.assertMalformed(inspect([message], max_header_block=200), "a header block over 200 octets")
        self.assertEqual(inspect([message], max_header_block=300).output, message)

    def test_partHeaderBlockLimit(self) -> None:
        """The limit holds for the header block of a part."""
        message = lines("Content-Type: multipart/mixed; boundary=B", "", "--B") + b"X: " + b"a" * 300
        self.assertMalformed(inspect([message], max_header_block=200), "a header block over 200 octets")

    def nested(self, levels: int) -> bytes:
        head = b"".join(lines(f"Content-Type: multipart/mixed; boundary=b{i}", "", f"--b{i}") for i in range(levels))
        return (
            head
            + lines("Content-Type: text/plain", "", "deep")
            + b"".join(lines(f"--b{i}--") for i in reversed(range(levels)))
        )

    def test_depthLimit(self) -> None:
        """Up to C{max_depth} levels are walked; one more is rejected."""
        self.assertEqual(inspect([self.nested(32)]).findings, [])
        self.assertMalformed(inspect([self.nested(33)]), "more than 32 nested levels")
        self.assertMalformed(inspect([self.nested(4)], max_depth=3), "more than 3 nested levels")

    def test_depthLimitRfc822(self) -> None:
        """message/rfc822 levels count towards the depth limit."""
        message = lines("Content-Type: message/rfc822", "") * 5 + lines("", "x")
        self.assertEqual(inspect([message], max_depth=5).findings, [])
        self.assertMalformed(inspect([message], max_depth=4), "more than 4 nested levels")

    def test_conflictingTypes(self) -> None:
        """Two different Content-Type fields are rejected."""
        message = lines(
            "Content-Type: text/plain", "Content-Type: multipart/mixed; boundary=B", "", "--B", "", "x", "--B--"
        )
        self.assertMalformed(inspect([message]), "conflicting Content-Type fields")

    def test_encodedRfc822(self) -> None:
        """An encoded message/rfc822 cannot be walked and is rejected."""
        message = lines("Content-Type: message/rfc822", "Content-Transfer-Encoding: base64", "", "RnJvbTogeA==")
        self.assertMalformed(inspect([message]), "a message/rfc822 part encoded base64")

    def test_oversizedParameters(self) -> None:
        """A Content-Type or Content-Disposition over 8192 characters or 100 parameters
        is rejected (the stdlib's parsing of parameters is quadratic)."""
        rule = "a Content-Type or Content-Disposition over 8192 characters or 100 parameters"
        message = lines("Content-Disposition: attachment" + "; x=" + "y" * 8000, "", "x")
        self.assertEqual(inspect([message]).findings, [])
        message = lines("Content-Disposition: attachment" + "; x=" + "y" * 8200, "", "x")
        self.assertMalformed(inspect([message]), rule)
        message = lines("Content-Type: a/b" + "; x=y" * 100, "", "x")
        self.assertEqual(inspect([message]).findings, [])
        message = lines("Content-Type: a/b" + "; x=y" * 101, "", "x")
        self.assertMalformed(inspect([message]), rule)

    def test_reusedBoundary(self) -> None:
        """An inner multipart reusing an enclosing boundary is rejected."""
        message = lines(
            "Content-Type: multipart/mixed; boundary=B",
            "",
            "--B",
            "Content-Type: multipart/mixed; boundary=B",
            "",
            "--B--",
        )
        self.assertMalformed(inspect([message]), "a boundary reused inside its own multipart")


class StreamingTests(SynchronousTestCase):
    """Bounded memory and the calling protocol."""

    def big(self, name: str) -> bytes:
        payload = base64.encodebytes(bytes(range(256)) * (3 * 1024 * 1024 // 256)).replace(b"\n", b"\r\n")
        return with_attachment(f"Content-Type: application/octet-stream; name={name}", payload=payload)

    def assertBounded(self, message: bytes) -> bytes:
        inspector = MimeInspector(profile())
        out = []
        for start in range(0, len(message), 65536):
            out.append(inspector.feed(message[start : start + 65536]))
            self.assertLess(inspector.held, 70 * 1024)
        out.append(inspector.finish())
        return b"".join(out)

    def test_bigAttachmentBounded(self) -> None:
        """A 4 MB attachment fed in 64 KiB chunks is never held, and passes unchanged."""
        message = self.big("data.bin")
        self.assertGreater(len(message), 4 * 1024 * 1024)
        self.assertEqual(self.assertBounded(message), message)

    def test_bigStrippedBounded(self) -> None:
        """A 4 MB stripped attachment is discarded as it arrives."""
        out = self.assertBounded(self.big("tool.exe"))
        self.assertIn(NOTICE, out)
        self.assertLess(len(out), 1000)

    def test_afterFinish(self) -> None:
        """feed() or finish() after finish() raise L{RuntimeError}."""
        inspector = MimeInspector(profile())
        inspector.feed(b"Subject: x\r\n")
        self.assertEqual(inspector.finish(), b"Subject: x\r\n")
        self.assertRaises(RuntimeError, inspector.feed, b"x")
        self.assertRaises(RuntimeError, inspector.finish)

    def test_truncated(self) -> None:
        """A message ending mid-header, mid-boundary or without line end passes as it is."""
        message = with_attachment("Content-Type: text/plain")
        for end in range(len(message)):
            self.assertEqual(inspect([message[:end]]).output, message[:end], end)
