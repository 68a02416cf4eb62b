"""py-spy profiles of mailgw under the benchmark's load, summarised as text.

``record`` attaches ``py-spy record --format raw`` (collapsed stacks, idle threads
left out) to a running process, or starts a command under it; ``summarize`` turns the
collapsed stacks into the functions with the most own time (the innermost frame of a
sample) and the most cumulative time (any frame of a sample, counted once per sample).

::

    python -m bench.profile STACKS.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def record_argv(output: Path, *, pid: int | None = None, seconds: float | None = None, rate: int = 250) -> list[str]:
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is missing: .venv/bin/pip install py-spy")
    argv = [binary, "record", "--format", "raw", "--rate", str(rate), "--output", str(output), "--nonblocking"]
    if seconds is not None:
        argv += ["--duration", str(max(1, round(seconds)))]
    if pid is not None:
        argv += ["--pid", str(pid)]
    else:
        argv.append("--")
    return argv


def attach(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` for ``seconds`` (wait for the returned process)."""
    return subprocess.Popen(  # noqa: S603
        record_argv(output, pid=pid, seconds=seconds), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('function')} ({path})"


def summarize(stacks: Path, top: int = 25, exclude: str | None = "<frozen importlib") -> str:
    """The top functions of ``stacks``; samples with a frame containing ``exclude``
    (by default: module imports, the start-up of a process run under py-spy) are left out."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit() or (exclude and exclude in stack):
            continue
        count = int(count_text)
        frames = [
            _short(f) for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", f"own time (innermost frame), top {top}:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", f"cumulative time (anywhere on the stack), top {top}:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in cumulative.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args(argv)
    print(summarize(options.stacks, options.top))


if __name__ == "__main__":
    main()
