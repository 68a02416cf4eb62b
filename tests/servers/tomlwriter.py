"""A small TOML writer for configurations the tests and the demo generate (the
standard library reads TOML but does not write it)."""

from __future__ import annotations

import json
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def value(item: Any) -> str:
    """An inline TOML value."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, (int, float)):
        return repr(item)
    if isinstance(item, str):
        return json.dumps(item, ensure_ascii=False)
    if isinstance(item, (list, tuple)):
        return "[" + ", ".join(value(v) for v in item) + "]"
    if isinstance(item, dict):
        return "{ " + ", ".join(f"{key(k)} = {value(v)}" for k, v in item.items()) + " }"
    raise TypeError(f"cannot write {type(item).__name__} as TOML")


def _is_table_array(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(v, dict) for v in item)


def dumps(document: dict[str, Any]) -> str:
    """TOML text for C{document}: top-level dicts become tables (nested dicts become
    sub-tables), top-level lists of dicts become arrays of tables (their nested values
    are written inline)."""
    out: list[str] = []

    def table(path: str, body: dict[str, Any]) -> None:
        out.append(f"[{path}]")
        subtables = []
        for name, item in body.items():
            if isinstance(item, dict):
                subtables.append((name, item))
            else:
                out.append(f"{key(name)} = {value(item)}")
        out.append("")
        for name, item in subtables:
            table(f"{path}.{key(name)}", item)

    for name, body in document.items():
        if isinstance(body, dict):
            table(key(name), body)
        elif _is_table_array(body):
            for item in body:
                out.append(f"[[{key(name)}]]")
                out.extend(f"{key(k)} = {value(v)}" for k, v in item.items())
                out.append("")
        else:
            out.insert(0, f"{key(name)} = {value(body)}")
    return "\n".join(out) + "\n"
