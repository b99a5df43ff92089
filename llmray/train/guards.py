"""Stability guards: decide, once per optimizer step, whether the step may update the weights.

The trainer computes the step's global loss and gradient norm *before* the optimizer step and
asks :class:`StabilityGuard` for a verdict, identically on every rank (both figures are already
reduced over ranks):

* non-finite loss or gradient norm → the step is skipped (gradients dropped, weights and
  optimizer state bit-unchanged) and counted; ``max_consecutive_nonfinite`` such steps in a row
  abort the run with :class:`TrainingDiverged` (a clear error, non-zero exit);
* a loss spike, i.e. a loss above ``spike_ratio`` × the running mean of the last ``window``
  accepted losses (``spike_mode: ratio``) or above mean + ``spike_sigma`` · std
  (``spike_mode: sigma``), is skipped the same way; after ``rollback_after`` consecutive spikes
  the verdict is ROLLBACK: the trainer restores the last checkpoint's weights, optimizer and
  step but keeps the data position, so the batches that caused the spike are skipped (PaLM,
  Chowdhery et al. 2022, §5.1). More than ``max_rollbacks`` rollbacks abort the run.

The guard's history is part of the checkpoint, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from llmray.config import param


class TrainingDiverged(RuntimeError):
    """Training cannot continue (persistent non-finite values or repeated spikes)."""


class Verdict(enum.Enum):
    STEP = "step"
    SKIP_NONFINITE = "skip_nonfinite"
    SKIP_SPIKE = "skip_spike"
    ROLLBACK = "rollback"


@dataclass
class GuardConfig:
    """When a step is skipped, rolled back or the run aborted."""

    max_consecutive_nonfinite: int = param(5, doc="abort after this many non-finite steps in a row", min=1)
    spike_mode: Literal["off", "ratio", "sigma"] = param(
        "ratio", doc="off; ratio: loss > spike_ratio x running mean; sigma: loss > mean + spike_sigma x std")
    spike_ratio: float = param(3.0, doc="ratio mode: multiple of the running mean that counts as a spike",
                               min=1.0)
    spike_sigma: float = param(6.0, doc="sigma mode: standard deviations above the mean", min=0.0)
    window: int = param(50, doc="accepted losses in the running mean/std", min=2)
    min_history: int = param(10, doc="accepted steps before spikes are detected at all", min=1)
    rollback_after: int = param(0, doc="consecutive spikes that trigger a rollback to the last "
                                       "checkpoint (0 = never roll back, only skip)", min=0)
    max_rollbacks: int = param(3, doc="abort when more rollbacks than this are needed", min=0)


class StabilityGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive_nonfinite = 0
        self.consecutive_spikes = 0
        self.counts = {"nonfinite_skips": 0, "spike_skips": 0, "rollbacks": 0}

    def is_spike(self, loss: float) -> bool:
        if self.cfg.spike_mode == "off" or len(self.history) < self.cfg.min_history:
            return False
        mean = sum(self.history) / len(self.history)
        if self.cfg.spike_mode == "ratio":
            return loss > self.cfg.spike_ratio * mean
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return loss > mean + self.cfg.spike_sigma * std

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """The verdict for optimizer step ``step`` (1-based) with this global loss and grad norm."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive_nonfinite += 1
            self.counts["nonfinite_skips"] += 1
            if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
                raise TrainingDiverged(
                    f"step {step}: loss={loss} grad_norm={grad_norm}; {self.consecutive_nonfinite} "
                    f"non-finite steps in a row (guards.max_consecutive_nonfinite="
                    f"{self.cfg.max_consecutive_nonfinite}); lower the learning rate or inspect the data")
            return Verdict.SKIP_NONFINITE
        self.consecutive_nonfinite = 0
        if self.is_spike(loss):
            self.consecutive_spikes += 1
            if self.cfg.rollback_after and self.consecutive_spikes >= self.cfg.rollback_after:
                self.consecutive_spikes = 0
                self.counts["rollbacks"] += 1
                if self.counts["rollbacks"] > self.cfg.max_rollbacks:
                    raise TrainingDiverged(
                        f"step {step}: loss spike {loss:.4g} persists after {self.cfg.max_rollbacks} "
                        f"rollbacks (guards.max_rollbacks)")
                return Verdict.ROLLBACK
            self.counts["spike_skips"] += 1
            return Verdict.SKIP_SPIKE
        self.consecutive_spikes = 0
        self.history.append(loss)
        return Verdict.STEP

    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive_nonfinite": self.consecutive_nonfinite,
                "consecutive_spikes": self.consecutive_spikes, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.consecutive_spikes = state["consecutive_spikes"]
        self.counts = dict(state["counts"])
