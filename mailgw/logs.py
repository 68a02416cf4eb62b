"""Log output: text lines or one JSON object per line [8.3].

Events carry stable field names (``session_id``, ``protocol``, ``client``, ``user``,
``upstream``, ``reason``, …); the JSON observer writes those and the other plain scalar
fields of an event, never objects (which could serialize a secret).

Both write what Twisted's own observers write, more cheaply [10]: a session logs a few
lines, and Twisted formats each with C{string.Formatter} (pure Python) and a new time
zone and C{datetime} per line — about a tenth of the gateway's Python time under a
login load (bench/README.md). Here the message of an ordinary event is C{str.format_map} of its format
(the same parser and field rules, in C), the time stamp is made once per second, and
anything else (a C{{callable()}} field, a flattened or failing event, a format that
cannot be formatted) goes to Twisted's functions, so every line is the same as theirs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

#: the field names that stay stable across releases (documented for log shippers)
STABLE_FIELDS = ("session_id", "protocol", "client", "user", "upstream", "reason")

_SCALARS = (str, int, float, bool, type(None))


def _plain_message(event: LogEvent) -> str | None:
    """The event's message by C{str.format_map}, or C{None} where Twisted must make
    it (a C{{callable()}} field, a flattened event, a format that fails: Twisted's
    L{formatEvent} says what went wrong)."""
    text = event.get("log_format")
    if type(text) is not str or "()" in text or "log_flattened" in event:
        return None
    try:
        return text.format_map(event)
    except Exception:  # noqa: BLE001 (see above)
        return None


def format_message(event: LogEvent) -> str:
    """The event's message, as L{twisted.logger.formatEvent} makes it."""
    message = _plain_message(event)
    return formatEvent(event) if message is None else message


class TextLines:
    """Twisted's classic text line for an event (L{formatEventAsClassicLogText} with
    RFC 3339 time stamps, as L{twisted.logger.textFileLogObserver} writes), or C{None}
    for an event without text."""

    def __init__(self) -> None:
        self._second: datetime | None = None
        self._stamp = "-"

    def stamp(self, when: float | None) -> str:
        """The time stamp of C{when}, made once per second (it shows no fraction; the
        second is the one C{datetime} rounds C{when} to, as Twisted's)."""
        if when is None:
            return "-"
        second = datetime.fromtimestamp(when, UTC).replace(microsecond=0)
        if second != self._second:
            self._stamp = formatTime(when, timeFormatRFC3339)
            self._second = second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        system = event.get("log_system")
        plain = "log_failure" not in event and (system is None or type(system) is str)
        message = _plain_message(event) if plain else None
        if message is None:
            return formatEventAsClassicLogText(event, formatTime=self.stamp)
        if not message:
            return None
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        line = f"{self.stamp(event.get('log_time'))} [{system}] {message}"
        return line.replace("\n", "\n\t") + "\n"


def text_observer(stream: IO[str]) -> ILogObserver:
    """An observer writing Twisted's classic text lines to C{stream}."""
    return FileLogObserver(stream, TextLines())


def event_as_json(event: LogEvent) -> str:
    """One JSON line for an event: time, level, namespace, message and its fields."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": format_message(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or not isinstance(value, _SCALARS):
            continue
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"


def json_observer(stream: IO[str]) -> ILogObserver:
    """An observer writing one JSON object per line to C{stream}."""
    return FileLogObserver(stream, event_as_json)


def make_observer(log_format: str, stream: IO[str]) -> ILogObserver:
    """The observer for C{gateway.log_format} ("text" or "json")."""
    if log_format == "json":
        return json_observer(stream)
    return text_observer(stream)
