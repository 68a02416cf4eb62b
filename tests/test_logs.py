"""The log observers' fast formatting [8.3, 10]: every text line and every JSON message
is the one Twisted's own functions make, for ordinary events and for the ones that go
to Twisted (callable fields, failures, formats that cannot be formatted)."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import (
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailgw.logs import TextLines, event_as_json, format_message, make_observer

FORMATS = [
    "New {protocol} session {session_id} from {client}",
    "Session {session_id}: {user} logged in as {mail_user} at {upstream} (group policy {group_policy})",
    "{a!r} and {a!s} and {a!a}",
    "{a:>12} {b:08.3f}",
    "{a:{width}}",
    "{items[0]} {items[1]}",
    "{a.real}",
    "{missing}",
    "{}",
    "{0}",
    "{a!x}",
    "{{literal}} {a}",
    "{call()}",
    "plain text",
    "two\nlines {a}",
    "",
    "{a",
    "}",
]
VALUES = st.one_of(st.integers(), st.text(max_size=12), st.floats(allow_nan=False), st.none())


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {
        "log_format": draw(st.sampled_from([*FORMATS, b"bytes {a}", None])),
        "a": draw(VALUES),
        "b": draw(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3))),
        "width": draw(st.sampled_from([3, 10, "x"])),
        "items": draw(st.lists(st.integers(), max_size=3)),
        "call": lambda: "called",
    }
    for key in ("protocol", "session_id", "client", "user", "mail_user", "upstream", "group_policy"):
        if draw(st.booleans()):
            event[key] = draw(st.text(max_size=10))
    if draw(st.booleans()):
        event["log_time"] = draw(st.floats(min_value=0, max_value=4e9, allow_nan=False))
    if draw(st.booleans()):
        event["log_namespace"] = draw(st.sampled_from(["mailgw.proxy.core", "x"]))
    if draw(st.booleans()):
        event["log_level"] = draw(st.sampled_from(list(LogLevel.iterconstants())))
    system = draw(st.sampled_from([None, "absent", "pop3s", 7]))
    if system != "absent":
        event["log_system"] = system
    if draw(st.integers(0, 9)) == 0:
        event["log_failure"] = Failure(ValueError("boom"))
    return event


def twisted_line(event: dict[str, Any]) -> str | None:
    """What Twisted's textFileLogObserver writes for C{event}."""
    return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, timeFormatRFC3339))


class TextLinesTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(st.lists(events(), min_size=1, max_size=6))
    def test_sameAsTwisted(self, batch: list[dict[str, Any]]) -> None:
        """Line for line the text Twisted writes (one formatter for the batch: its
        cached time stamp is reused across events)."""
        lines = TextLines()
        for event in batch:
            self.assertEqual(lines(event), twisted_line(event))
            self.assertEqual(format_message(event), formatEvent(event))

    def test_stampPerSecond(self) -> None:
        """Events of one second share a time stamp; the next second gets its own,
        also on the rounding edge (datetime rounds to microseconds)."""
        lines = TextLines()
        for when in (1_700_000_000.0, 1_700_000_000.25, 1_700_000_000.9999996, 1_700_000_001.5, 1_699_999_999.0):
            self.assertEqual(lines.stamp(when), formatTime(when, timeFormatRFC3339), when)
        self.assertEqual(lines.stamp(None), "-")

    def test_flattenedEvent(self) -> None:
        """An event that crossed a process (a worker's, as JSON) is formatted from
        its flattened fields, as Twisted does."""
        original = {"log_format": "{user} from {client()}", "user": "alice", "client": lambda: "192.0.2.7"}
        event = eventFromJSON(eventAsJSON(original))
        self.assertEqual(TextLines()(event), twisted_line(event))
        self.assertEqual(format_message(event), "alice from 192.0.2.7")

    def test_observerWritesTheLine(self) -> None:
        """The text observer (gateway.log_format = "text") writes those lines."""
        stream = io.StringIO()
        observer = make_observer("text", stream)
        event = {"log_format": "Session {session_id} closed", "session_id": "ab12", "log_time": 1e9,
                 "log_namespace": "mailgw", "log_level": LogLevel.info}  # fmt: skip
        observer(event)
        self.assertEqual(stream.getvalue(), twisted_line(event))


class JSONMessageTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(events())
    def test_messageAsTwisted(self, event: dict[str, Any]) -> None:
        """The JSON line's message is Twisted's formatEvent of the event."""
        self.assertEqual(json.loads(event_as_json(event))["message"], formatEvent(event))
