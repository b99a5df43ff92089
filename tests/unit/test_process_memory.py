"""A child's peak resident memory is its own, not its parent's (``ru_maxrss`` carries the parent's across exec)."""

from __future__ import annotations

import subprocess
import sys

from llmray.process_memory import peak_resident_mb

CHILD = "from llmray.process_memory import peak_resident_mb; print(peak_resident_mb())"


def test_a_child_of_a_large_process_reports_its_own_peak():
    ballast = bytearray(400 * 2 ** 20)  # the parent holds 400 MiB more than the child will
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident, not just reserved
    child_peak = float(subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                                      text=True).stdout)
    assert peak_resident_mb() > 400
    assert child_peak < 200, child_peak

