"""A streaming MIME inspector and rewriter [4.9]: pure (no Twisted), bounded memory.

    inspector = MimeInspector(profile)
    for chunk in message:                # the raw RFC 5322 octets, dot-stuffing undone
        send(inspector.feed(chunk))      # output ready so far (may be b"")
    send(inspector.finish())             # the rest; the message has ended
    inspector.findings                   # list[Finding], in message order
    inspector.rejected                   # the first Finding whose action is "reject"
    inspector.changed                    # the output differs from the input

The output is the input, octet for octet, unless something is stripped or tagged:

  - every entity (the message, each part of a multipart at any depth, the message
    inside a C{message/rfc822} part) is checked once its header block is complete:
    its file names (C{Content-Disposition} C{filename}, C{Content-Type} C{name}, RFC 2231
    and RFC 2047 decoded; see L{mailgw.inspect.mimeparams}) against
    C{attachments_deny}, its C{Content-Type} against C{content_types_deny}.  With
    C{attachment_action = "strip"} a denied part (headers, body, nested parts) becomes
    a C{text/plain} notice naming the file and the rule; a denied message keeps its
    other fields, gets new content fields and the notice as its body.  With
    C{"reject"} the finding sets L{MimeInspector.rejected}.
  - C{header_rules} apply to the message's own header block (each occurrence, the
    unfolded value and its RFC 2047 decoding): C{reject} sets C{rejected}; C{tag}
    puts the first matching rule's tag in front of the Subject (adding a Subject when
    there is none).
  - what hides structure gives a finding of kind C{malformed} (action C{reject}): a
    header block over C{max_header_block} octets, more than C{max_depth} nested
    multipart/C{message/rfc822} levels, conflicting C{Content-Type} fields, a
    C{Content-Type} or C{Content-Disposition} over 8192 characters or 100 parameters
    (the stdlib parses them in quadratic time), a boundary over 256
    octets or reused inside its own multipart, an encoded C{message/rfc822}.

Once C{rejected} is set, the output stops (the caller discards it).  The inspector
holds one header block at most, plus a line (at most 1001 octets) that may be a
boundary split between chunks (L{MimeInspector.held}); bodies stream through, or are
discarded as they arrive when stripped.  Boundaries (RFC 2046: C{--boundary} or
C{--boundary--} at a line start, then optional blanks) are found with C{bytes.find},
and a part also ends at a boundary of any enclosing multipart.
"""

from __future__ import annotations

import binascii
import enum
import re
from dataclasses import dataclass

from mailgw.config import InspectionProfile
from mailgw.inspect.mimeparams import (
    MAX_PARAMETER_FIELD,
    MAX_PARAMETERS,
    Entity,
    Field,
    decode_words,
    describe,
    split_fields,
)

__all__ = ["Finding", "MimeInspector"]

#: the longest boundary followed (RFC 2046 allows 70)
MAX_BOUNDARY = 256
#: the longest line that may be a boundary line (line end excluded): RFC 5322's 998
MAX_DELIMITER_LINE = 1000
#: findings recorded at most (stripping goes on beyond: a message of many tiny
#: denied parts must not grow the list with its size)
MAX_FINDINGS = 100

_CONTENT_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


@dataclass(frozen=True, slots=True)
class Finding:
    """
    One rule that applied to the message.

    @ivar kind: C{attachment}, C{content-type}, C{header} or C{malformed}.
    @ivar rule: the glob, the C{content_types_deny} entry, the header rule
        (C{X-Spam-Flag: ^YES}) or what is malformed.
    @ivar filename: the part's file name (control characters replaced), or C{None}.
    @ivar content_type: the part's C{type/subtype} (C{""} for a header rule).
    @ivar action: C{strip}, C{reject} or C{tag}.
    """

    kind: str
    rule: str
    filename: str | None
    content_type: str
    action: str


class _Mode(enum.Enum):
    HEAD = "head"  # collecting an entity's header block
    BODY = "body"  # a body, preamble or epilogue, passed through
    SKIP = "skip"  # what remains of a stripped entity, discarded
    DONE = "done"  # rejected: the rest is discarded unread


@dataclass(slots=True)
class _Level:
    """A multipart being walked."""

    dash: bytes  # b"--" + boundary
    depth: int  # of the multipart entity
    digest: bool  # multipart/digest: parts default to message/rfc822


@dataclass(frozen=True, slots=True)
class _Head:
    """The entity whose header block is being collected."""

    depth: int
    is_part: bool  # a part of a multipart (else the message or an encapsulated one)
    default_type: str


def _printable(name: str) -> str:
    cleaned = "".join("?" if ord(c) < 32 or c == "\x7f" or 0xD800 <= ord(c) < 0xE000 else c for c in name)
    return cleaned[:255]


def _newline(block: bytes) -> bytes:
    return b"\n" if b"\n" in block and b"\r\n" not in block else b"\r\n"


def _ambiguous(dash: bytes, other: bytes) -> bool:
    """Whether a boundary line could be read as either boundary's (C{--b} and C{--b--})."""
    short, long = sorted((dash, other), key=len)
    rest = long[len(short) :]
    return long.startswith(short) and (not rest or (rest.startswith(b"--") and not rest[2:].strip(b" \t")))


def _delimiter(line: bytes, levels: list[_Level]) -> tuple[int, bool] | None:
    """The level (index) whose boundary line C{line} is (line end removed) and whether
    it closes it, or C{None}; the innermost level wins."""
    if len(line) > MAX_DELIMITER_LINE:
        return None
    for index in range(len(levels) - 1, -1, -1):
        dash = levels[index].dash
        if line.startswith(dash):
            rest = line[len(dash) :]
            close = rest.startswith(b"--")
            if close:
                rest = rest[2:]
            if not rest.strip(b" \t"):
                return index, close
    return None


class MimeInspector:
    """
    One message's MIME inspection (see the module docstring).

    @ivar findings: what applied, in message order (at most L{MAX_FINDINGS}).
    @ivar rejected: the first finding whose action is C{reject}, or C{None}.
    @ivar changed: the output differs from the input (a part stripped, a tag).
    """

    def __init__(self, profile: InspectionProfile, *, max_header_block: int = 65536, max_depth: int = 32) -> None:
        self.profile = profile
        self.max_header_block = max_header_block
        self.max_depth = max_depth
        self.findings: list[Finding] = []
        self.rejected: Finding | None = None
        self.changed = False
        self._mode = _Mode.HEAD
        self._head = _Head(0, False, "text/plain")
        self._head_pos = 0  # where the unexamined lines of the header block start
        self._levels: list[_Level] = []
        self._dashes: tuple[bytes, ...] = ()
        self._starts = re.compile(b"(?!)")  # where lines starting with one of _dashes are
        self._buf = bytearray()
        self._line_start = True  # _buf[0] starts a line
        self._out: list[bytes] = []
        self._ended = False

    @property
    def held(self) -> int:
        """Octets of input held (a header block, or a line that may be a boundary)."""
        return len(self._buf)

    def feed(self, data: bytes) -> bytes:
        """Take the next octets of the message; give the output ready so far."""
        if self._ended:
            raise RuntimeError("MimeInspector.feed() after finish()")
        if self._mode is _Mode.DONE:
            return b""
        if not self._buf and not self._levels and self._mode is not _Mode.HEAD:
            # a body no boundary can end: streams straight through (or away)
            return data if self._mode is _Mode.BODY else b""
        self._buf += data
        self._run(eof=False)
        return self._take()

    def finish(self) -> bytes:
        """The message has ended: give the rest of the output."""
        if self._ended:
            raise RuntimeError("MimeInspector.finish() called twice")
        self._ended = True
        if self._mode is not _Mode.DONE:
            self._run(eof=True)
        return self._take()

    # -- the walk ---------------------------------------------------------------------

    def _take(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return b"" if self._mode is _Mode.DONE else out

    def _run(self, eof: bool) -> None:
        while self._buf or (eof and self._mode is _Mode.HEAD):
            if self._mode is _Mode.DONE:
                self._buf.clear()
                return
            if self._mode is _Mode.HEAD:
                progressed = self._scan_head(eof)
            else:
                progressed = self._scan_body(eof)
            if not progressed:
                return
            if eof and self._mode is _Mode.HEAD and not self._buf:
                # a boundary line ended the message: the new part is empty
                return

    def _release(self, end: int) -> None:
        """Pass on (or drop, when skipping) C{_buf[:end]}."""
        if end <= 0:
            return
        if self._mode is _Mode.BODY:
            self._out.append(bytes(self._buf[:end]))
        self._line_start = self._buf[end - 1] == 0x0A
        del self._buf[:end]

    def _scan_body(self, eof: bool) -> bool:
        """Walk a body up to the next boundary line of an enclosing multipart; C{False}
        when more input is needed."""
        buf = self._buf
        levels = self._levels
        if not levels:
            self._release(len(buf))
            return False
        dashes = tuple(level.dash for level in levels)
        if dashes != self._dashes:
            self._dashes = dashes
            self._starts = re.compile(b"\n(?:" + b"|".join(re.escape(dash) for dash in dashes) + b")")
        limit = MAX_DELIMITER_LINE + 2  # the line, b"\r", b"\n"
        at = 0 if self._line_start and buf.startswith(dashes) else self._candidate(0)
        while at >= 0:
            eol = buf.find(b"\n", at, at + limit)
            if eol >= 0:
                line, end = bytes(buf[at:eol]), eol + 1
            elif len(buf) - at < limit and not eof:
                self._release(at)  # the line may be a boundary: wait for its end
                return False
            elif len(buf) - at < limit:
                line, end = bytes(buf[at:]), len(buf)
            else:
                line, end = b"", 0  # too long to be a boundary line
            if line.endswith(b"\r"):
                line = line[:-1]
            match = _delimiter(line, levels) if end else None
            if match is not None:
                self._release(at)
                self._out.append(bytes(buf[: end - at]))
                del buf[: end - at]
                self._boundary(*match)
                return True
            at = self._candidate(at)
        # keep the last line if it may still become a boundary line
        last = buf.rfind(b"\n") + 1
        tail = bytes(buf[last:])
        if not eof and (last > 0 or self._line_start) and any(dash.startswith(tail) for dash in dashes):
            self._release(last)
            self._line_start = True
        else:
            self._release(len(buf))
        return False

    def _candidate(self, after: int) -> int:
        """Where the next line starting with a boundary starts after C{after}, or -1."""
        found = self._starts.search(self._buf, after)
        return found.start() + 1 if found is not None else -1

    def _scan_head(self, eof: bool) -> bool:
        """Collect a header block; C{False} when more input is needed."""
        buf = self._buf
        pos = self._head_pos
        limit = self.max_header_block
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                tail = bytes(buf[pos:])
                if eof:
                    match = self._head_delimiter(tail.removesuffix(b"\r"))
                    fields_end = pos if match is not None else len(buf)
                    if fields_end > limit:
                        self._malformed(f"a header block over {limit} octets", "")
                    else:
                        self._header_block(fields_end, fields_end, match, len(buf))
                    return True
                could_end = tail in (b"", b"\r") or (
                    bool(self._levels) and b"--".startswith(tail[:2]) and len(tail) <= MAX_DELIMITER_LINE + 1
                )
                if pos > limit or (len(buf) > limit and not could_end):
                    self._malformed(f"a header block over {limit} octets", "")
                    return True
                self._head_pos = pos
                return False
            if nl == pos or (nl == pos + 1 and buf[pos] == 0x0D):
                if pos > limit:
                    self._malformed(f"a header block over {limit} octets", "")
                    return True
                self._header_block(pos, nl + 1, None, nl + 1)
                return True
            if buf[pos] == 0x2D and self._levels:
                match = self._head_delimiter(bytes(buf[pos:nl]).removesuffix(b"\r"))
                if match is not None:
                    if pos > limit:
                        self._malformed(f"a header block over {limit} octets", "")
                        return True
                    self._header_block(pos, pos, match, nl + 1)
                    return True
            pos = nl + 1

    def _head_delimiter(self, line: bytes) -> tuple[int, bool] | None:
        return _delimiter(line, self._levels) if line.startswith(b"--") and self._levels else None

    def _header_block(self, fields_end: int, body_start: int, match: tuple[int, bool] | None, end: int) -> None:
        """The header block C{_buf[:fields_end]} is complete (its blank line up to
        C{body_start}); a boundary line ends at C{end} when C{match}."""
        buf = self._buf
        block = bytes(buf[:fields_end])
        terminator = bytes(buf[fields_end:body_start])
        delimiter = bytes(buf[body_start:end])
        del buf[:end]
        self._head_pos = 0
        self._line_start = True
        self._entity(block, terminator)
        if match is not None and self._mode is not _Mode.DONE:
            self._out.append(delimiter)
            self._boundary(*match)

    def _boundary(self, index: int, close: bool) -> None:
        """A boundary line of level C{index} was passed on: what follows it."""
        del self._levels[index + 1 :]
        level = self._levels[index]
        if close:
            del self._levels[index]
            self._mode = _Mode.BODY  # the epilogue
        else:
            self._mode = _Mode.HEAD
            default = "message/rfc822" if level.digest else "text/plain"
            self._head = _Head(level.depth + 1, True, default)
        self._line_start = True

    # -- decisions --------------------------------------------------------------------

    def _record(self, finding: Finding) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)
        if finding.action == "reject" and self.rejected is None:
            self.rejected = finding
            self._mode = _Mode.DONE
            self._buf.clear()
            self._levels.clear()

    def _malformed(self, what: str, content_type: str) -> None:
        self._record(Finding("malformed", what, None, content_type, "reject"))

    def _entity(self, block: bytes, terminator: bytes) -> None:
        """Decide on an entity whose header block is complete and pass it on."""
        head = self._head
        fields = split_fields(block)
        entity = describe(fields, head.default_type)
        tag = None
        if head.depth == 0:
            tag = self._header_rules(fields)
            if self._mode is _Mode.DONE:
                return
            if tag is not None:
                fields = self._tagged(fields, tag, _newline(block + terminator))
                self.changed = True
        if entity.oversized:
            what = f"{MAX_PARAMETER_FIELD} characters or {MAX_PARAMETERS} parameters"
            self._malformed(f"a Content-Type or Content-Disposition over {what}", "")
            return
        denied = self._denied(entity)
        if self._mode is _Mode.DONE:
            return
        if denied is not None:
            self._strip(fields, denied, head, _newline(block + terminator))
            return
        self._out.append(b"".join(f.raw for f in fields) if tag is not None else block)
        self._out.append(terminator)
        self._mode = _Mode.BODY
        if entity.conflicting:
            self._malformed("conflicting Content-Type fields", entity.content_type)
        elif entity.content_type.startswith("multipart/") and entity.boundary is not None:
            dash = b"--" + entity.boundary
            if len(entity.boundary) > MAX_BOUNDARY:
                self._malformed(f"a boundary over {MAX_BOUNDARY} octets", entity.content_type)
            elif any(_ambiguous(dash, level.dash) for level in self._levels):
                self._malformed("a boundary reused inside its own multipart", entity.content_type)
            elif self._nest(head, entity):
                digest = entity.content_type == "multipart/digest"
                self._levels.append(_Level(dash, head.depth, digest))
        elif entity.content_type in _MESSAGE_TYPES:
            if entity.encoding not in _IDENTITY_ENCODINGS:
                self._malformed(f"a {entity.content_type} part encoded {entity.encoding}", entity.content_type)
            elif self._nest(head, entity):
                self._mode = _Mode.HEAD
                self._head = _Head(head.depth + 1, False, "text/plain")

    def _nest(self, head: _Head, entity: Entity) -> bool:
        if head.depth + 1 > self.max_depth:
            self._malformed(f"more than {self.max_depth} nested levels", entity.content_type)
            return False
        return True

    def _header_rules(self, fields: list[Field]) -> str | None:
        """Apply C{header_rules} to the message's fields: the tag to put in front of the
        Subject, or C{None}."""
        tag = None
        for rule in self.profile.header_rules:
            wanted = rule.header.lower()
            for field in fields:
                if field.name != wanted:
                    continue
                value = field.value
                if rule.match.search(value) or rule.match.search(decode_words(value)):
                    name = f"{rule.header}: {rule.match.pattern}"
                    self._record(Finding("header", name, None, "", rule.action))
                    if rule.action == "reject":
                        return None
                    if tag is None:
                        tag = rule.tag
                    break
        return tag

    def _tagged(self, fields: list[Field], tag: str, nl: bytes) -> list[Field]:
        """C{fields} with C{tag} in front of the (first) Subject, or a Subject added."""
        if tag.isascii():
            prefix = tag.encode("ascii") + b" "
        else:
            prefix = b"=?utf-8?b?" + binascii.b2a_base64(tag.encode("utf-8"), newline=False) + b"?= "
        for index, field in enumerate(fields):
            if field.name == "subject":
                name, colon, rest = field.raw.partition(b":")
                blanks = len(rest) - len(rest.lstrip(b" \t"))
                raw = name + colon + rest[:blanks] + prefix + rest[blanks:]
                return [*fields[:index], Field("subject", raw), *fields[index + 1 :]]
        added = Field("subject", b"Subject: " + prefix.rstrip(b" ") + nl)
        if fields and not fields[-1].raw.endswith(b"\n"):
            fields = [*fields[:-1], Field(fields[-1].name, fields[-1].raw + nl)]
        return [*fields, added]

    def _denied(self, entity: Entity) -> Finding | None:
        """The finding for a denied entity (recorded), or C{None}."""
        profile = self.profile
        action = profile.attachment_action
        for name in entity.names + entity.raw_names:
            glob = profile.denied_attachment(name)
            if glob is not None:
                finding = Finding("attachment", glob, _printable(name), entity.content_type, action)
                break
        else:
            filename = _printable(entity.names[0]) if entity.names else None
            for value in (entity.content_type, *entity.content_types):
                denied = profile.denied_content_type(value)
                if denied is not None:
                    finding = Finding("content-type", denied, filename, entity.content_type, action)
                    break
            else:
                return None
        self._record(finding)
        return finding

    def _strip(self, fields: list[Field], finding: Finding, head: _Head, nl: bytes) -> None:
        """Replace a denied entity by the notice; skip what remains of it."""
        self.changed = True
        if finding.filename:
            text = f'The attachment "{finding.filename}" was removed by the mail gateway (rule: {finding.rule}).'
        else:
            what = finding.content_type
            text = f"A part of type {what} was removed by the mail gateway (rule: {finding.rule})."
        body = text.encode("utf-8", "replace")
        if body.isascii():
            encoding = b"7bit"
        else:
            encoding = b"quoted-printable"
            body = binascii.b2a_qp(body).replace(b"\n", nl)
        out: list[bytes] = []
        if not head.is_part:
            kept = [f.raw for f in fields if f.name not in _CONTENT_FIELDS]
            if kept and not kept[-1].endswith(b"\n"):
                kept[-1] += nl
            out.extend(kept)
            if not any(f.name == "mime-version" for f in fields):
                out.append(b"MIME-Version: 1.0" + nl)
        out.append(b"Content-Type: text/plain; charset=utf-8" + nl)
        out.append(b"Content-Transfer-Encoding: " + encoding + nl)
        out.append(nl + body + nl)
        self._out.append(b"".join(out))
        self._mode = _Mode.SKIP
