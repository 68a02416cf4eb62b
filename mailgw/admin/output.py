"""The text forms of ``mailgwctl``'s answers: tables, durations, local date-times.

Nothing here prints an epoch number: keys that hold a point in time (L{TIME_KEYS})
become local date-times, keys that hold a length of time (L{DURATION_KEYS}) become
durations such as C{2h 03m}.  The JSON form (``--json``) keeps the daemon's numbers
(seconds since the epoch), which scripts can compute with.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mailgw.tlsdiag import explain

__all__ = [
    "DURATION_KEYS",
    "TIME_KEYS",
    "format_aaa_flush",
    "format_aaa_result",
    "format_accounts",
    "format_bytes",
    "format_check_now",
    "format_duration",
    "format_identities",
    "format_identity",
    "format_mapping",
    "format_replay",
    "format_sessions",
    "format_status",
    "format_table",
    "format_time",
    "text",
]

#: keys whose value is a point in time (seconds since the epoch)
TIME_KEYS = frozenset(
    {
        "at",
        "created",
        "expires",
        "finished",
        "first_seen",
        "last_activity",
        "last_poll",
        "last_poll_finished",
        "last_poll_started",
        "next_poll",
        "renewed",
        "started",
        "updated",
    }
)
#: keys whose value is a length of time in seconds
DURATION_KEYS = frozenset(
    {"age", "cache_ttl", "effective_interval", "expires_in", "idle", "idle_timeout", "interval", "uptime"}
)

#: hints for TLS failures of a remote POP account (the options that fix them)
ACCOUNT_HINTS = {"ca": "set --ca", "tls": "try --tls starttls or none"}
#: hints for TLS failures of an AAA server group (the settings that fix them)
GROUP_HINTS = {"ca": "set the server's ca in the group", "tls": "check the server's tls in the group"}


def format_time(seconds: float) -> str:
    """A point in time as a local date-time: C{2026-12-02 14:03:07}."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def format_duration(seconds: float) -> str:
    """C{3d 4h}, C{2h 03m}, C{5m 07s}, C{12s}."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_bytes(count: int) -> str:
    """C{512 B}, C{2.4 MiB}."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def text(value: object, key: str = "") -> str:
    """One value as a table cell or after C{key:}; C{-} for nothing."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and key in TIME_KEYS:
        return format_time(float(value))
    if isinstance(value, int | float) and key in DURATION_KEYS:
        return format_duration(float(value))
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e6 else f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(text(v) for v in value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """A plain text table: one header line, columns padded to the widest cell."""
    cells = [[c if isinstance(c, str) else text(c) for c in row] for row in rows]
    cells = [[c or "-" for c in row] for row in cells]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *cells]:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def format_mapping(value: Mapping[str, Any], indent: str = "") -> str:
    """One C{key: value} line per field; nested mappings and lists indented below
    their key; times and durations readable."""
    out = []
    for key, item in value.items():
        label = f"{indent}{key.replace('_', ' ')}:"
        if isinstance(item, Mapping) and item:
            out.append(f"{label}\n{format_mapping(item, indent + '  ')}")
        elif isinstance(item, list) and item:
            out.append(f"{label}\n")
            for element in item:
                if isinstance(element, Mapping):
                    lines = format_mapping(element).splitlines() or ["-"]
                    out.append(f"{indent}  - {lines[0]}\n")
                    out.extend(f"{indent}    {line}\n" for line in lines[1:])
                else:
                    out.append(f"{indent}  - {text(element)}\n")
        elif isinstance(item, Mapping):
            out.append(f"{label} -\n")
        else:
            out.append(f"{label} {text(item, key)}\n")
    return "".join(out)


# --- status ---------------------------------------------------------------------------

_LISTENER = re.compile(r"^\S+ \((?P<address>[^,]+), (?P<mode>[^)]+)\)$")

#: the poller's counters, in the order and with the names the status line shows
_POLLER_FIELDS = (
    ("scheduled_accounts", "accounts scheduled"),
    ("polls_running", "polls running"),
    ("polls", "polls"),
    ("failed_polls", "failed"),
    ("fetched", "fetched"),
    ("delivered", "delivered"),
    ("deleted", "deleted"),
    ("skipped", "skipped"),
    ("possible_duplicates", "possible duplicates"),
)


def _listener_rows(listeners: Sequence[Mapping[str, Any]]) -> list[Sequence[object]]:
    rows: list[Sequence[object]] = []
    for item in listeners:
        match = _LISTENER.match(str(item.get("description", "")))
        address, mode = (match["address"], match["mode"]) if match else ("-", str(item.get("description") or "-"))
        rows.append((item["name"], address, mode, "listening" if item.get("running") else "stopped"))
    return rows


def _last_test(group: Mapping[str, Any], now: float | None) -> str:
    last = group.get("last_test") or {}
    if not last.get("result"):
        return "-"
    at = last.get("at")
    if now is None or not isinstance(at, int | float):
        return str(last["result"])
    return f"{last['result']} ({format_duration(now - at)} ago)"


def _summary_line(name: str, summary: Mapping[str, Any], fields: Sequence[tuple[str, str]]) -> str:
    state = summary.get("state") or ("running" if summary.get("running") else "not running")
    details = [f"{label} {text(summary[key])}" for key, label in fields if key in summary]
    known = {key for key, _ in fields} | {"state", "running", "enabled", "mode"}
    details += [f"{key.replace('_', ' ')} {text(v, key)}" for key, v in sorted(summary.items()) if key not in known]
    line = f"{name}: {state}"
    if summary.get("mode") and state == "running":
        line += f" ({summary['mode']})"
    return line + ("\n  " + ", ".join(details) if details else "") + "\n"


def format_status(status: Mapping[str, Any]) -> str:
    """The text form of C{mailgwctl status}."""
    started, uptime = status.get("started"), status.get("uptime", 0)
    now = float(started) + float(uptime) if isinstance(started, int | float) else None
    head = f"mailgw {status.get('version', '?')} on {status.get('node_name', '?')} (pid {status.get('pid', '?')})"
    head += f", up {format_duration(float(uptime))}"
    if now is not None:
        head += f" (since {format_time(float(started))})"  # type: ignore[arg-type]
    out = [head + "\n"]
    if status.get("configuration"):
        out.append(f"Configuration: {status['configuration']}\n")
    listeners = status.get("listeners", [])
    out.append(f"\nListeners: {len(listeners)}\n")
    if listeners:
        out.append(format_table(("NAME", "ADDRESS", "TLS", "STATE"), _listener_rows(listeners), indent="  "))
    workers = status.get("workers") or []
    if workers:
        out.append(f"\nWorkers: {len(workers)}\n")
        worker_rows: list[Sequence[object]] = [
            (
                w.get("worker", "?"),
                w.get("pid") or "-",
                w.get("state", "?"),
                (w.get("sessions") or {}).get("total", "-"),
                format_duration(float(w["uptime"])) if w.get("uptime") is not None else "-",
                w.get("restarts", 0),
                w.get("last_exit") or "-",
            )
            for w in workers
        ]
        headers = ("WORKER", "PID", "STATE", "SESSIONS", "UP", "RESTARTS", "LAST EXIT")
        out.append(format_table(headers, worker_rows, indent="  "))
    sessions = status.get("sessions", {})
    out.append(f"\nSessions: {sessions.get('total', 0)}\n")
    by_protocol: Mapping[str, Mapping[str, int]] = sessions.get("by_protocol", {})
    if by_protocol:
        states = ["unauthenticated", "authenticating", "authenticated"]
        rows: list[Sequence[object]] = [
            (protocol, *(counts.get(s, 0) for s in states)) for protocol, counts in by_protocol.items()
        ]
        out.append(format_table(("PROTOCOL", *(s.upper() for s in states)), rows, indent="  "))
    groups = status.get("aaa_groups", [])
    out.append(f"\nAAA server groups: {len(groups)}\n")
    if groups:
        rows = [
            (group["name"], group["protocol"], group["health"], _last_test(group, now), group["servers"])
            for group in groups
        ]
        out.append(format_table(("NAME", "PROTOCOL", "HEALTH", "LAST TEST", "SERVERS"), rows, indent="  "))
    profiles = status.get("inspection") or []
    if profiles:
        out.append(f"\nInspection profiles: {len(profiles)}\n")
        rows = [
            (
                p["profile"],
                p.get("clamd") or "-",
                p.get("health", "-") if p.get("clamd") else "-",
                format_time(float(p["checked"])) if p.get("checked") is not None else "-",
                p.get("detail") or "",
            )
            for p in profiles
        ]
        out.append(format_table(("PROFILE", "CLAMD", "HEALTH", "CHECKED", "DETAIL"), rows, indent="  "))
    out.append("\n")
    out.append(_summary_line("Poller", dict(status.get("poller") or {}), _POLLER_FIELDS))
    out.append(_summary_line("SSO", dict(status.get("sso") or {}), ()))
    if status.get("reload"):
        out.append(f"Reload: {status['reload']}\n")
    return "".join(out)


# --- sessions, accounts, AAA tests ------------------------------------------------------


def format_sessions(sessions: Sequence[Mapping[str, Any]]) -> str:
    """The text form of C{mailgwctl sessions}."""
    if not sessions:
        return "no sessions\n"
    # Gateways sharing a database list each other's sessions: then a NODE column.
    nodes = len({s.get("node") for s in sessions}) > 1
    rows = [
        (
            s["session_id"],
            *((s.get("node"),) if nodes else ()),
            s["protocol"],
            s["state"],
            s.get("user") or s.get("mail_user"),
            s["client"],
            s.get("upstream"),
            format_duration(float(s.get("age") or 0)),
            format_duration(float(s["idle"])) if s.get("idle") is not None else "-",
            format_bytes(int(s.get("bytes_from_client", 0))) if "bytes_from_client" in s else "-",
            format_bytes(int(s.get("bytes_to_client", 0))) if "bytes_to_client" in s else "-",
        )
        for s in sessions
    ]
    headers = ("ID", *(("NODE",) if nodes else ()), "PROTOCOL", "STATE", "USER", "CLIENT", "UPSTREAM", "AGE", "IDLE")
    return format_table((*headers, "IN", "OUT"), rows)


_ACCOUNT_COLUMNS = (
    ("id", "ID"),
    ("enabled", "ENABLED"),
    ("domain", "DOMAIN"),
    ("username", "USERNAME"),
    ("host", "HOST"),
    ("port", "PORT"),
    ("tls", "TLS"),
    ("interval", "INTERVAL"),
    ("leave_on_server", "LEAVE"),
    ("last_poll", "LAST POLL"),
    ("last_result", "LAST RESULT"),
    ("description", "DESCRIPTION"),
)


def _account_cell(account: Mapping[str, Any], key: str) -> object:
    if key == "interval":  # the interval in force (the default when unset)
        return text(account.get("effective_interval", account.get("interval")), "interval")
    if key == "leave_on_server" and account.get("leave_on_server") and account.get("leave_days"):
        return f"{account['leave_days']}d"
    if key == "last_result" and isinstance(account.get(key), str):
        return explain(account[key], ACCOUNT_HINTS)
    return text(account.get(key), key)


def format_accounts(accounts: Sequence[Mapping[str, Any]]) -> str:
    """The text form of C{mailgwctl accounts list}: the known columns that any
    account has."""
    if not accounts:
        return "no accounts\n"
    columns = [(key, title) for key, title in _ACCOUNT_COLUMNS if any(key in a for a in accounts)]
    rows = [[_account_cell(a, key) for key, _ in columns] for a in accounts]
    return format_table([title for _, title in columns], rows)


def format_check_now(result: Mapping[str, Any], detail: str | None = None) -> str:
    """The text form of C{accounts check-now}: a verdict line, then the report.
    C{detail} is what a TLS probe found out about a failed verification."""
    report = dict(result)
    error = report.pop("error", None)
    report.pop("ok", None)
    if error:
        reason = explain(str(error), ACCOUNT_HINTS, detail=detail)
        head = f"FAILED: {reason}\n"
    else:
        head = "OK\n" if "ok" in result else ""
    started, finished = report.get("started"), report.get("finished")
    if isinstance(started, int | float) and isinstance(finished, int | float):
        report["took"] = f"{max(0.0, finished - started):.1f} s"
    return head + format_mapping(report)


def format_aaa_result(result: Mapping[str, Any]) -> str:
    """The text form of C{mailgwctl aaa test}."""
    verdict = result["result"]
    out = [f"{result['group']}: {result['user']} {verdict}"]
    if result.get("reason"):
        out[0] += f": {explain(str(result['reason']), GROUP_HINTS)}"
    out[0] += f" ({text(result.get('latency_ms'))} ms)\n"
    policy = result.get("group_policy")
    if policy:
        longest = policy["max_session_time"]
        out.append(
            f"  group policy: {policy['name']} (simultaneous logins {policy['simultaneous_logins']},"
            f" idle timeout {format_duration(policy['idle_timeout'])},"
            f" max session time {format_duration(longest) if longest else 'unlimited'})\n"
        )
    if result.get("authenticated_user") and result["authenticated_user"] != result["user"]:
        out.append(f"  authenticated as: {result['authenticated_user']}\n")
    for key, value in sorted((result.get("attributes") or {}).items()):
        if value and key != "server_group":
            out.append(f"  {key.replace('_', ' ')}: {text(value)}\n")
    out.append(
        f"  default group policy: {result['default_group_policy']} (from {result['default_group_policy_from']})\n"
    )
    return "".join(out)


def format_aaa_flush(result: Mapping[str, Any]) -> str:
    """The text form of C{mailgwctl aaa flush}: how many cached logins were
    forgotten, and of whom."""
    count = int(result.get("flushed", 0))
    group, user = result.get("group"), result.get("user")
    scope = f"user {user} of group {group}" if user else f"group {group}" if group else "all groups"
    line = f"{count} cached login{'' if count == 1 else 's'} forgotten ({scope})"
    if group and result.get("cache_ttl") == 0:
        line += f"; group {group} caches nothing (cache_ttl = 0)"
    return line + "\n"


_IDENTITY_COLUMNS = (
    ("ip", "IP"),
    ("user", "USER"),
    ("source", "SOURCE"),
    ("group_policy", "GROUP POLICY"),
    ("mac", "MAC"),
    ("first_seen", "FIRST SEEN"),
    ("renewed", "RENEWED"),
    ("expires_in", "EXPIRES IN"),
)


def format_identities(identities: Sequence[Mapping[str, Any]]) -> str:
    """The text form of C{mailgwctl sso list}."""
    if not identities:
        return "no SSO identities\n"
    rows = [[text(identity.get(key), key) for key, _ in _IDENTITY_COLUMNS] for identity in identities]
    return format_table([title for _, title in _IDENTITY_COLUMNS], rows)


def format_identity(identity: Mapping[str, Any]) -> str:
    """The text form of C{mailgwctl sso lookup}: who, then the details."""
    details = {key: identity.get(key) for key in
               ("group_policy", "mac", "first_seen", "renewed", "expires", "expires_in", "session_id")}  # fmt: skip
    return f"{identity['ip']}: {identity['user']} ({identity['source']})\n" + format_mapping(details, "  ")


def format_replay(result: Mapping[str, Any]) -> str:
    """The text form of C{mailgwctl sso replay}."""
    logins, learnt = int(result.get("logins", 0)), int(result.get("learnt", 0))
    line = (
        f"{result['path']}: {result.get('frames', 0)} frames, {logins} POP3 login{'' if logins == 1 else 's'} seen,"
        f" {learnt} learnt"
    )
    if result.get("outside_policy"):
        line += f", {result['outside_policy']} outside sso.pop3.policy"
    tls = int(result.get("streams_tls") or 0)
    if tls:
        line += f"; {tls} POP3 connection{'' if tls == 1 else 's'} in TLS (not readable)"
    return line + "\n"
