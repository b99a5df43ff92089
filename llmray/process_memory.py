"""A process's resident memory and its own peak: for training logs, and for tests and benchmarks that bound memory.

Why not ``ru_maxrss``: Linux carries it across ``exec`` from the forking parent, so a process
started by a large one (pytest holding a test's inputs, a benchmark's driver) reports at least the
parent's size. ``VmHWM`` in ``/proc/self/status`` is the high-water mark of this program's own
memory. Without ``/proc`` (macOS) ``ru_maxrss`` is what there is.
"""

from __future__ import annotations

import resource
import sys


def resident_mb() -> float:
    """Resident memory of this process now, MiB (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_resident_mb() -> float:
    """Peak resident memory of this process since its program started, MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except FileNotFoundError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
