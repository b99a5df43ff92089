"""Progress lines for the long phases of a stage: done / total, rate and ETA, at most every few seconds.

Why one helper: dedup's shuffles and connected components, tokenizer training and the DPO
reference pass each run for minutes on real data with nothing on the console, which looks like a
hang. A phase reports through :class:`Progress`; the line goes to the stage's logger, so it
reaches the console (the CLI logs at INFO) and ``stage.log`` alike.

Design choices:

* Quiet when quick: nothing is printed until a phase has run for ``interval`` seconds, so a demo
  or a test is not flooded with lines for phases that take a second; a phase that printed a
  progress line also prints its final line (total, time, mean rate).
* Units are counted by the caller (characters, sequences, tasks); ``total=None`` (e.g. the rounds
  of connected components, which stop when the edge set stops changing) prints the rate without
  an ETA.
* :func:`wait` is the Ray form: it waits on object refs (tasks of a shuffle) with ``ray.wait``,
  counting finished tasks, without pulling their values to this process.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

DEFAULT_INTERVAL_S = 10.0


def _number(value: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(done: float, elapsed: float, unit: str) -> str:
    """``125.0k chars/s``, or ``30s per round`` below one unit a second."""
    rate = done / elapsed
    if rate >= 1 or done == 0:
        return f"{_number(rate)}{' ' + unit if unit else ''}/s"
    return f"{_duration(1 / rate)} per {unit.removesuffix('s') or 'unit'}"


class Progress:
    """Counts units of one phase and logs ``what: done/total unit (pct) | rate | ETA`` every ``interval`` s."""

    def __init__(self, what: str, total: float | None = None, unit: str = "", *,
                 logger: logging.Logger | None = None, interval: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit = what, total, unit
        self.log = logger or logging.getLogger("llmray.progress")
        self.interval, self.clock = interval, clock
        self.done = 0.0
        self.started = self.last = clock()
        self.printed = False

    def advance(self, n: float = 1) -> None:
        """Count ``n`` more units; log a line when ``interval`` seconds passed since the last one."""
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.printed = True
            self.log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self.clock()) - self.started, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            parts = [f"{self.what}: {_number(self.done)}/{_number(self.total)}{unit} "
                     f"({min(self.done / self.total, 1.0):.0%})", _rate(self.done, elapsed, self.unit)]
            left = (self.total - self.done) / rate if rate > 0 else None
            parts.append(f"ETA {_duration(max(left, 0.0))}" if left is not None else "ETA unknown")
        else:
            parts = [f"{self.what}: {_number(self.done)}{unit}", _rate(self.done, elapsed, self.unit)]
        parts.append(f"{_duration(elapsed)} elapsed")
        return " | ".join(parts)

    def finish(self, note: str = "") -> None:
        """Log the closing line (total and mean rate) if this phase logged progress before."""
        if not self.printed:
            return
        elapsed = max(self.clock() - self.started, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        self.log.info("%s: done, %s%s in %s (%s)%s", self.what, _number(self.done), unit, _duration(elapsed),
                      _rate(self.done, elapsed, self.unit), f"; {note}" if note else "")


def wait(refs: Sequence[Any], what: str, *, logger: logging.Logger | None = None,
         interval: float = DEFAULT_INTERVAL_S) -> None:
    """Block until every ref in ``refs`` is ready, logging ``what: k/n tasks`` progress (values stay put)."""
    import ray

    progress = Progress(what, len(refs), "tasks", logger=logger, interval=interval)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=interval, fetch_local=False)
        progress.advance(len(ready))
    progress.finish()
