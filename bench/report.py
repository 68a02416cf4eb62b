"""Medians over the runs, the table and the JSON document."""

from __future__ import annotations

import json
import statistics
from typing import Any

#: (scenario, metric, label, format); the headline rows first
ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("rate_pop3s", "cpu_ms_per_session", "POP3S x32: proxy CPU ms/session", "{:.3f}"),
    ("rate_pop3s", "sessions_per_second", "POP3S x32: sessions/s", "{:.0f}"),
    ("rate_imaps", "cpu_ms_per_session", "IMAPS x32: proxy CPU ms/session", "{:.3f}"),
    ("rate_imaps", "sessions_per_second", "IMAPS x32: sessions/s", "{:.0f}"),
    ("resume_pop3s", "cpu_ms_per_session", "POP3S x32 resumed: CPU ms/session", "{:.3f}"),
    ("resume_pop3s", "sessions_per_second", "POP3S x32 resumed: sessions/s", "{:.0f}"),
    ("resume_pop3s", "resumed_share", "POP3S x32 resumed: share resumed", "{:.2f}"),
    ("resume_imaps", "cpu_ms_per_session", "IMAPS x32 resumed: CPU ms/session", "{:.3f}"),
    ("resume_imaps", "sessions_per_second", "IMAPS x32 resumed: sessions/s", "{:.0f}"),
    ("resume_imaps", "resumed_share", "IMAPS x32 resumed: share resumed", "{:.2f}"),
    ("bcrypt_pop3s", "cpu_ms_per_session", "POP3S x32 200 cost-12 users: CPU ms/s.", "{:.3f}"),
    ("bcrypt_pop3s", "cpu_plus_auth_ms_per_session", "  same, + auth_http responder CPU", "{:.3f}"),
    ("bcrypt_pop3s", "sessions_per_second", "POP3S x32 200 cost-12 users: sess/s", "{:.0f}"),
    ("bcrypt_cold", "cpu_plus_auth_ms_per_session", "first login of each of 200: CPU ms", "{:.1f}"),
    ("retr", "cpu_ms_per_mib", "RETR 10 MiB: CPU ms/MiB", "{:.3f}"),
    ("retr", "mib_per_second", "RETR 10 MiB: MiB/s", "{:.0f}"),
    ("fetch", "cpu_ms_per_mib", "FETCH 10 MiB: CPU ms/MiB", "{:.3f}"),
    ("fetch", "mib_per_second", "FETCH 10 MiB: MiB/s", "{:.0f}"),
    ("idle", "pss_kib_per_session", "idle IMAPS: PSS KiB/session", "{:.1f}"),
    ("idle", "ssl_new_kib", "  of it: one SSL_new of its OpenSSL, KiB", "{:.1f}"),
    ("inspected", "cpu_ms_per_mib", "RETR inspected (clamd): CPU ms/MiB", "{:.3f}"),
    ("inspected", "clamd_cpu_ms_per_mib", "  clamd's own CPU ms/MiB", "{:.3f}"),
    ("poller", "messages_per_second", "poller 2000 msgs: messages/s", "{:.0f}"),
    ("poller", "cpu_ms_per_message", "poller 2000 msgs: CPU ms/message", "{:.3f}"),
)
#: the columns; the poller's reference ("nginx" column) is fetchmail
SERVERS = ("mailgw", "nginx", "dovecot")
INFO_ROWS: tuple[tuple[str, str, str], ...] = (
    ("client_cpu_ms_per_session", "client CPU ms/session", "{:.3f}"),
    ("client_cores", "client CPU used (cores of 1)", "{:.2f}"),
    ("proxy_cores", "server CPU used (cores of 1)", "{:.2f}"),
    ("backend_cpu_ms_per_session", "Dovecot behind it, CPU ms/session", "{:.3f}"),
    ("auth_cpu_ms_per_session", "auth_http responder CPU ms/session", "{:.3f}"),
    ("latency_ms_p50", "session latency p50 ms", "{:.0f}"),
    ("latency_ms_p95", "session latency p95 ms", "{:.0f}"),
    ("errors", "failed sessions", "{:.0f}"),
)


#: the workers scenario: mailgw with workers = 1 and 2, unpinned (columns workers1, workers2)
WORKER_SERVERS = ("workers1", "workers2")
WORKER_SCENARIOS = ("workers_pop3s", "workers_imaps")
WORKER_ROWS: tuple[tuple[str, str, str], ...] = (
    ("sessions_per_second", "sessions/s", "{:.0f}"),
    ("cpu_ms_per_session", "gateway CPU ms/session (all processes)", "{:.3f}"),
    ("supervisor_cpu_ms_per_session", "  of which the supervisor", "{:.3f}"),
    ("proxy_cores", "gateway CPU used (cores)", "{:.2f}"),
    ("client_cores", "client CPU used (cores)", "{:.2f}"),
    ("backend_cores", "Dovecot CPU used (cores)", "{:.2f}"),
    ("other_cores", "rest of the machine (cores)", "{:.2f}"),
    ("machine_busy_cores", "machine busy (cores of 2)", "{:.2f}"),
    ("machine_steal_cores", "  of which steal (hypervisor)", "{:.2f}"),
    ("client_cpu_ms_per_session", "client CPU ms/session", "{:.3f}"),
    ("backend_cpu_ms_per_session", "Dovecot CPU ms/session", "{:.3f}"),
    ("latency_ms_p50", "session latency p50 ms", "{:.0f}"),
    ("latency_ms_p95", "session latency p95 ms", "{:.0f}"),
    ("errors", "failed sessions", "{:.0f}"),
)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def medians(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """scenario -> server -> metric -> median over the runs (numbers only)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, by_server in results.items():
        for server, runs in by_server.items():
            keys = {k for run in runs for k, v in run.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            for key in sorted(keys):
                value = median([float(run[key]) for run in runs if isinstance(run.get(key), int | float)])
                if value is not None:
                    out.setdefault(scenario, {}).setdefault(server, {})[key] = value
    return out


def _cell(value: float | None, fmt: str) -> str:
    return fmt.format(value) if value is not None else "-"


def table(summary: dict[str, dict[str, dict[str, float]]], conditions: dict[str, Any]) -> str:
    lines = ["Conditions:"]
    for key, value in conditions.items():
        lines.append(f"  {key}: {value}")
    header = f"{'scenario / metric (median of runs)':<42} {'mailgw':>9} {'nginx':>9} {'dovecot':>9} {'mgw/ngx':>8}"
    lines += ["", header, "-" * len(header)]
    for scenario, metric, label, fmt in ROWS:
        row = summary.get(scenario, {})
        values = [row.get(server, {}).get(metric) for server in SERVERS]
        if all(v is None for v in values):
            continue
        mailgw, nginx = values[0], values[1]
        ratio = f"{mailgw / nginx:.2f}" if mailgw is not None and nginx else "-"
        if scenario == "poller":
            label += " (nginx col.: fetchmail)"
        lines.append(f"{label:<42} " + " ".join(f"{_cell(v, fmt):>9}" for v in values) + f" {ratio:>8}")
    lines += ["", "Load generator and side figures (rate scenarios):", header, "-" * len(header)]
    for scenario in ("rate_pop3s", "rate_imaps", "resume_pop3s", "resume_imaps", "bcrypt_pop3s"):
        if scenario not in summary:
            continue
        row = summary[scenario]
        for metric, label, fmt in INFO_ROWS:
            values = [row.get(server, {}).get(metric) for server in SERVERS]
            if all(v is None for v in values):
                continue
            name = f"{scenario}: {label}"
            lines.append(f"{name:<42} " + " ".join(f"{_cell(v, fmt):>9}" for v in values) + f" {'':>8}")
    if any(scenario in summary for scenario in WORKER_SCENARIOS):
        header = f"{'workers scenario (mailgw, unpinned)':<48} {'workers=1':>9} {'workers=2':>9} {'w2/w1':>8}"
        lines += ["", header, "-" * len(header)]
        for scenario in WORKER_SCENARIOS:
            row = summary.get(scenario, {})
            for metric, label, fmt in WORKER_ROWS:
                values = [row.get(server, {}).get(metric) for server in WORKER_SERVERS]
                if all(v is None for v in values):
                    continue
                one, two = values
                ratio = f"{two / one:.2f}" if one is not None and two is not None and one else "-"
                name = f"{scenario}: {label}"
                lines.append(f"{name:<48} " + " ".join(f"{_cell(v, fmt):>9}" for v in values) + f" {ratio:>8}")
    return "\n".join(lines)


def ratios(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for scenario, metric, _, _ in ROWS:
        row = summary.get(scenario, {})
        mailgw, nginx = row.get("mailgw", {}).get(metric), row.get("nginx", {}).get(metric)
        if mailgw is not None and nginx:
            out[f"{scenario}.{metric}"] = mailgw / nginx
    return out


def worker_ratios(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """workers = 2 over workers = 1, for every figure of the workers scenario."""
    out: dict[str, float] = {}
    for scenario in WORKER_SCENARIOS:
        row = summary.get(scenario, {})
        for metric, _, _ in WORKER_ROWS:
            one, two = (row.get(server, {}).get(metric) for server in WORKER_SERVERS)
            if one and two is not None:
                out[f"{scenario}.{metric}"] = two / one
    return out


def write_json(path: str, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=2, sort_keys=True, default=str)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as handle:
            handle.write(text + "\n")
