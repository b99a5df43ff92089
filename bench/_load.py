"""The machine fields every bench's final JSON carries (DESIGN: bench output; issue: honest benchmarks).

A figure taken while other work competes for the cores is not a figure. :class:`LoadWatch`
samples the 1-minute load average from construction to ``fields()`` (every few seconds, in a
daemon thread) and reports it before, after and at its highest, with ``idle`` false when any
sample exceeded 1.5x the cores the bench uses (its own processes count, so the bound leaves them
room), plus what makes runs comparable: the CPU model, core count, torch threads and versions.
"""

from __future__ import annotations

import os
import platform
import threading
from importlib import metadata

SAMPLE_SECONDS = 5.0
IDLE_FACTOR = 1.5
VERSIONED = ("torch", "ray", "tokenizers", "pyarrow", "numpy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class LoadWatch:
    """Starts sampling at construction; ``fields()`` stops it and returns the JSON fields."""

    def __init__(self, cores_used: int) -> None:
        self.cores_used = cores_used
        self.before = os.getloadavg()[0]
        self.highest = self.before
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="load-watch", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.highest = max(self.highest, os.getloadavg()[0])

    def fields(self) -> dict:
        self._stop.set()
        after = os.getloadavg()[0]
        self.highest = max(self.highest, after)
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = None
        return {"loadavg_before": round(self.before, 2), "loadavg_after": round(after, 2),
                "loadavg_max": round(self.highest, 2), "cores_used": self.cores_used,
                "idle": self.highest <= IDLE_FACTOR * self.cores_used,
                "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads},
                "versions": versions()}
