"""Log output: text lines or one JSON object per line [8.3].

Events carry stable field names (``session_id``, ``protocol``, ``client``, ``user``,
``upstream``, ``reason``, …); the JSON observer writes those and the other plain scalar
fields of an event, never objects (which could serialize a secret).
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
    textFileLogObserver,
)

#: the field names that stay stable across releases (documented for log shippers)
STABLE_FIELDS = ("session_id", "protocol", "client", "user", "upstream", "reason")

_SCALARS = (str, int, float, bool, type(None))


def event_as_json(event: LogEvent) -> str:
    """One JSON line for an event: time, level, namespace, message and its fields."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
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
    return textFileLogObserver(stream)
