"""Learning-rate schedules as pure functions of the optimizer step.

Design choices:

* A schedule is a small picklable object mapping the step (0-based count of optimizer steps
  taken) to a multiplier of the peak learning rate. :class:`LRScheduler` applies it to any
  number of optimizers (pipeline ranks hold one per stage); its state is only the step count,
  so a restored run continues the curve exactly and the peak lr is always the config's (a run
  started from another run's checkpoint, e.g. a PBT exploit with a mutated lr, uses its own).
* ``cosine``: linear warmup to the peak, then a half cosine down to ``min_lr_ratio``.
* ``wsd`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): linear warmup, a constant plateau,
  then a linear decay to ``min_lr_ratio`` over the last ``decay_fraction`` of training. The
  plateau lets a run be extended or branched without re-warming.
* ``constant``: warmup then the peak forever (fine-tuning, debugging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from llmray.config import param


@dataclass
class ScheduleConfig:
    """How the learning rate moves over training."""

    kind: Literal["cosine", "wsd", "constant"] = param("cosine", doc="cosine: warmup + cosine decay; "
                                                        "wsd: warmup-stable-decay; constant: warmup + flat")
    warmup_steps: int = param(100, doc="optimizer steps of linear warmup from 0 to the peak lr", min=0)
    min_lr_ratio: float = param(0.1, doc="final lr as a fraction of the peak", min=0.0, max=1.0)
    decay_fraction: float = param(0.2, doc="wsd only: fraction of all steps spent in the final decay",
                                  min=0.0, max=1.0)


@dataclass
class Schedule:
    """Multiplier of the peak lr at optimizer step ``step`` of ``total_steps``."""

    cfg: ScheduleConfig
    total_steps: int

    def __call__(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.kind == "constant":
            return 1.0
        if cfg.kind == "cosine":
            span = max(1, self.total_steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(cfg.decay_fraction * self.total_steps))
        decay_start = max(cfg.warmup_steps, self.total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1 - cfg.min_lr_ratio) * progress


class LRScheduler:
    """Sets each parameter group's lr to its peak × ``schedule(step)``; ``step()`` after each optimizer step.

    A group's peak is the lr the optimizer factory gave it (one value for AdamW; Muon's hidden
    matrices have their own), read here once, before any checkpoint is loaded: a restored
    optimizer state brings back the old run's lr, which the config's peak then overrides.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], cfg: ScheduleConfig, total_steps: int,
                 peak_lr: float):
        self.optimizers, self.schedule, self.peak_lr = optimizers, Schedule(cfg, total_steps), peak_lr
        self.group_peaks = [[group["lr"] for group in optimizer.param_groups] for optimizer in optimizers]
        self.steps_taken = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step (of groups at ``peak_lr``: the reported one)."""
        return self.peak_lr * self.schedule(self.steps_taken)

    def step(self) -> None:
        self.steps_taken += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints written through torch's LambdaLR hold the same count as ``last_epoch``
        self.steps_taken = int(state["steps_taken"] if "steps_taken" in state else state["last_epoch"])
        self._apply()

    def _apply(self) -> None:
        multiplier = self.schedule(self.steps_taken)
        for optimizer, peaks in zip(self.optimizers, self.group_peaks, strict=True):
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak * multiplier
