"""The header block of one MIME entity, as L{mailgw.inspect.mime} needs it [4.9].

Pure and bounded: it only ever sees one header block (at most C{max_header_block}
octets).  L{split_fields} cuts a block into its fields losslessly (the raw octets of
the fields joined give the block back, so that a block can be rewritten field by
field); L{describe} gives what the inspector decides on: the content type, the
boundary, the transfer encoding and every file name the entity claims (RFC 2231
parameters and continuations, RFC 2047 encoded words), using the stdlib C{email}
package on single field values only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import HeaderParseError, MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value

__all__ = [
    "MAX_PARAMETERS",
    "MAX_PARAMETER_FIELD",
    "Entity",
    "Field",
    "decode_words",
    "describe",
    "split_fields",
    "unfold",
]

#: a field name: printable ASCII but the colon, then optional blanks before the colon
_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
#: the longest C{Content-Type}/C{Content-Disposition} value read (no mailer writes
#: more than a few hundred characters; the stdlib's parameter parsing is quadratic)
MAX_PARAMETER_FIELD = 8192
#: the most parameters (semicolons) read in one such field
MAX_PARAMETERS = 100
#: the fields whose parameters may carry a file name
_NAME_FIELDS = ("content-type", "content-disposition")
_NAME_PARAMS = ("filename", "name")
#: the stdlib's own failures on odd field values (it raises nothing else on strings)
_EMAIL_ERRORS = (HeaderParseError, MessageError, LookupError, UnicodeError, ValueError, TypeError, IndexError)


@dataclass(frozen=True, slots=True)
class Field:
    """
    One field of a header block.

    @ivar name: the lower-cased field name, or C{None} for a line that is no field (an
        mbox C{From } line, a stray continuation, garbage).
    @ivar raw: its octets, continuation lines and line ends included.
    """

    name: str | None
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value (after the colon, blanks around it removed)."""
        return unfold(self.raw.partition(b":")[2])


@dataclass(frozen=True, slots=True)
class Entity:
    """
    What an entity's header block says about it.

    @ivar content_type: the lower-cased C{type/subtype} of its first C{Content-Type}
        (the default when it has none or an invalid one).
    @ivar content_types: the raw values of all its C{Content-Type} fields.
    @ivar conflicting: its C{Content-Type} fields name different types (a recipient
        might follow another one than the inspector).
    @ivar oversized: a C{Content-Type} or C{Content-Disposition} field is over
        L{MAX_PARAMETER_FIELD} characters or L{MAX_PARAMETERS} parameters (and was not
        read).
    @ivar boundary: the multipart boundary (C{None}: none, or not a multipart).
    @ivar encoding: the lower-cased C{Content-Transfer-Encoding} (C{""}: none).
    @ivar names: every file name claimed (C{filename}/C{name} of C{Content-Disposition}
        and C{Content-Type}), decoded, in field order, without repeats.
    @ivar raw_names: the same names before RFC 2047 decoding (checked too).
    """

    content_type: str
    content_types: tuple[str, ...]
    conflicting: bool
    oversized: bool
    boundary: bytes | None
    encoding: str
    names: tuple[str, ...]
    raw_names: tuple[str, ...]


def unfold(raw: bytes) -> str:
    """A field value unfolded (line ends removed, RFC 5322 3.2.2) and stripped."""
    return raw.replace(b"\r", b"").replace(b"\n", b"").strip(b" \t").decode("utf-8", "surrogateescape")


def split_fields(block: bytes) -> list[Field]:
    """The fields of a header block; C{b"".join(f.raw for f in fields) == block}."""
    fields: list[Field] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields and fields[-1].name is not None:
            fields[-1] = Field(fields[-1].name, fields[-1].raw + line)
            continue
        match = _NAME.match(line)
        name = match.group(1).decode("ascii").lower() if match else None
        fields.append(Field(name, line))
    return fields


def decode_words(value: str) -> str:
    """C{value} with its RFC 2047 encoded words decoded (unchanged if it has none or
    they do not decode)."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except _EMAIL_ERRORS:
        return value


def _params(header: str, value: str) -> dict[str, str]:
    """The parameters of a field value (RFC 2231 decoded, continuations joined): the
    first of each lower-cased name, and C{""} for the value itself."""
    message = Message()
    message[header] = value
    params: dict[str, str] = {"": message.get_content_type() if header == "content-type" else ""}
    try:
        found = message.get_params(header=header) or []
        for name, raw in found[1:]:
            if name.lower() not in params:
                params[name.lower()] = str(collapse_rfc2231_value(raw))  # type: ignore[arg-type]
    except _EMAIL_ERRORS:
        pass
    return params


def describe(fields: list[Field], default_type: str) -> Entity:
    """What C{fields} (a header block) say about their entity (see L{Entity})."""
    types: list[str] = []
    encodings = [f.value for f in fields if f.name == "content-transfer-encoding"]
    content_type = default_type
    boundary: bytes | None = None
    kinds: set[str] = set()
    names: list[str] = []
    raw_names: list[str] = []
    oversized = False
    for field in fields:
        if field.name not in _NAME_FIELDS:
            continue
        value = field.value
        if len(value) > MAX_PARAMETER_FIELD or value.count(";") > MAX_PARAMETERS:
            oversized = True  # the stdlib's parameter parsing is quadratic
            continue
        params = _params(field.name, value)
        if field.name == "content-type":
            types.append(value)
            kinds.add(params[""])
            if len(types) == 1:
                # the stdlib falls back to text/plain for an invalid type
                content_type = params[""] if "/" in value.partition(";")[0] else default_type
                found = params.get("boundary")
                if content_type.startswith("multipart/") and found:
                    boundary = found.encode("utf-8", "surrogateescape")
        for param in _NAME_PARAMS:
            raw = params.get(param)
            if raw is None or raw in raw_names:
                continue
            raw_names.append(raw)
            decoded = decode_words(raw)
            if decoded not in names:
                names.append(decoded)
    return Entity(
        content_type=content_type,
        content_types=tuple(types),
        conflicting=len(kinds) > 1,
        oversized=oversized,
        boundary=boundary,
        encoding=encodings[0].lower() if encodings else "",
        names=tuple(names),
        raw_names=tuple(raw_names),
    )
