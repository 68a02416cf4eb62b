"""The 200 bcrypt cost-12 users of the login-rate scenario, hashed once and cached.

Hashing 200 passwords at cost 12 takes about a minute of CPU, so the hashes are kept in
``~/.cache/mailgw-bench/users-cost12.json`` (override with ``MAILGW_BENCH_CACHE``) and
reused as long as the names, passwords and cost match.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import bcrypt

COST = 12
COUNT = 200


def user_name(index: int) -> str:
    return f"user{index:03d}"


def user_password(index: int) -> str:
    return f"bench-pw-{index:03d}-x"


def accounts(count: int = COUNT) -> dict[str, str]:
    """name -> password of the first ``count`` users."""
    return {user_name(i): user_password(i) for i in range(count)}


def cache_path() -> Path:
    root = os.environ.get("MAILGW_BENCH_CACHE") or str(Path.home() / ".cache" / "mailgw-bench")
    return Path(root) / f"users-cost{COST}.json"


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST)).decode()


def hashes(count: int = COUNT, workers: int = 2) -> dict[str, str]:
    """name -> cost-12 bcrypt hash of its password, from the cache where it matches."""
    path = cache_path()
    cached: dict[str, str] = {}
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    wanted = accounts(count)
    result = {name: value for name, value in cached.items() if name in wanted}
    # One spot check (a quarter second) that the cache holds these passwords.
    sample = next(iter(result), None)
    if sample is not None and not bcrypt.checkpw(wanted[sample].encode(), result[sample].encode()):
        result = {}
    missing = [name for name in wanted if name not in result]
    if missing:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for name, value in zip(missing, pool.map(_hash, [wanted[n] for n in missing]), strict=True):
                result[name] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**cached, **result}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(merged, indent=0, sort_keys=True))
        os.replace(temporary, path)
    return result


if __name__ == "__main__":
    print(len(hashes()), "hashes in", cache_path())
