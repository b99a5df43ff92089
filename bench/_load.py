"""The machine fields every bench's final JSON carries (DESIGN: bench output; issue: honest benchmarks).

A figure taken while other work competes for the cores is not a figure. :class:`LoadWatch`
samples the 1-minute load average from construction to ``fields()`` (every few seconds, in a
daemon thread) and reports it before, after and at its highest, with ``idle`` false when any
sample exceeded 1.5x the cores the bench uses (its own processes count, so the bound leaves them
room), plus what makes runs comparable: the CPU model, core count, torch threads and versions.

The load average cannot tell the bench's own threads from others', so it also measures the CPU
time of every process *outside* the bench's process tree (Ray's processes, started by the bench,
are inside it) from ``/proc``: ``others_cpu_cores`` is their average use in cores over the run, and
a run is idle only if that stayed under ``OTHERS_CPU_LIMIT`` as well.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from importlib import metadata

SAMPLE_SECONDS = 5.0
IDLE_FACTOR = 1.5
OTHERS_CPU_LIMIT = 0.25  # cores
SETTLED = 0.75  # LoadWatch.settle waits for the 1-minute load to fall to this share of the cores used
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


def _busy_ticks() -> int:
    """Clock ticks every CPU spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return sum(fields[:3]) + sum(fields[5:8])


def _process_ticks() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks of the process and of its waited-for children)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        found[int(entry)] = (int(fields[1]), sum(int(value) for value in fields[11:15]))
    return found


class _OthersCpu:
    """CPU ticks of processes outside this process's tree, accumulated between samples."""

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/stat")
        self.ticks = 0
        if self.available:
            self._busy, self._own = _busy_ticks(), self._own_ticks()

    def _own_ticks(self) -> dict[int, int]:
        processes = _process_ticks()
        tree, frontier = set(), {os.getpid()}
        while frontier:
            tree |= frontier
            frontier = {pid for pid, (parent, _) in processes.items() if parent in frontier} - tree
        return {pid: processes[pid][1] for pid in tree if pid in processes}

    def sample(self) -> None:
        if not self.available:
            return
        busy, own = _busy_ticks(), self._own_ticks()
        own_delta = sum(ticks - self._own.get(pid, 0) for pid, ticks in own.items())
        self.ticks += max(0, (busy - self._busy) - own_delta)
        self._busy, self._own = busy, own


class LoadWatch:
    """Starts sampling at construction; ``fields()`` stops it and returns the JSON fields."""

    def __init__(self, cores_used: int) -> None:
        self.cores_used = cores_used
        self.before = os.getloadavg()[0]
        self.highest = self.before
        self.settled_s = 0.0
        self._started = time.monotonic()
        self._others = _OthersCpu()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="load-watch", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.highest = max(self.highest, os.getloadavg()[0])
            self._others.sample()

    def settle(self, limit_s: float = 90.0) -> float:
        """Wait until the 1-minute load is at most ``SETTLED`` × the cores used (or ``limit_s`` passed);
        the seconds waited. Why: a bench that alternates peers would otherwise start each one while
        the previous one's processes (Ray Train workers exiting, a bare loop's threads) still weigh
        on the load, and their start-up on top of that leaves it above the idle bound although
        nothing else ran; waiting lets each timed run start from a quiet machine."""
        started = time.monotonic()
        while os.getloadavg()[0] > SETTLED * self.cores_used and time.monotonic() - started < limit_s:
            time.sleep(1.0)
        waited = time.monotonic() - started
        self.settled_s += waited
        return waited

    def fields(self) -> dict:
        self._stop.set()
        after = os.getloadavg()[0]
        self.highest = max(self.highest, after)
        self._others.sample()
        seconds = max(time.monotonic() - self._started, 1.0)  # a tick (10 ms) is no share of a blink
        others = self._others.ticks / os.sysconf("SC_CLK_TCK") / seconds if self._others.available else None
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = None
        return {"loadavg_before": round(self.before, 2), "loadavg_after": round(after, 2),
                "loadavg_max": round(self.highest, 2), "cores_used": self.cores_used,
                **({"settled_s": round(self.settled_s, 1)} if self.settled_s else {}),
                "others_cpu_cores": None if others is None else round(others, 3),
                "idle": self.highest <= IDLE_FACTOR * self.cores_used and (others or 0.0) <= OTHERS_CPU_LIMIT,
                "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads},
                "versions": versions()}
