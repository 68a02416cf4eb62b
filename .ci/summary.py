"""Runs trial with the given arguments, streams its output, and ends with the line
"N passed, N failed, N skipped" that CI reads.  Exit status: trial's."""

from __future__ import annotations

import re
import subprocess
import sys


def main(argv: list[str]) -> int:
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted.trial", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert process.stdout is not None
    summary = ""
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if re.match(r"^(PASSED|FAILED) \(", line):
            summary = line
    status = process.wait()
    counts = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", summary)}
    passed = counts.get("successes", 0)
    failed = (
        counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    )
    skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
    if status != 0 and failed == 0:
        failed = 1  # trial itself failed (import error, crash): never report green
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
