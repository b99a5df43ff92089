"""The machine-load fields every bench's final JSON carries (DESIGN: bench output).

A figure taken while other work competes for the cores is not a figure: the JSON records the
1-minute load average before and after the run and ``idle``, false when either exceeded 1.5x the
cores the bench uses (its own processes count, so the bound leaves them room).
"""

from __future__ import annotations

import os


class LoadWatch:
    """Reads the load average at construction; ``fields()`` at the end returns the JSON fields."""

    def __init__(self, cores_used: int) -> None:
        self.cores_used = cores_used
        self.before = os.getloadavg()[0]

    def fields(self) -> dict:
        after = os.getloadavg()[0]
        return {"loadavg_before": round(self.before, 2), "loadavg_after": round(after, 2),
                "cores_used": self.cores_used, "idle": max(self.before, after) <= 1.5 * self.cores_used}
