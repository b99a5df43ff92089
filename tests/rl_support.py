"""Reward functions and hooks the RL tests name by import path (rollout actors import them)."""

from __future__ import annotations


def digit_share(completion: str, problem) -> float:
    """A reward a random tiny model earns in varying amounts, so groups have non-zero advantages."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def digit_share_failing_sometimes(completion: str, problem) -> float:
    """Fails on about a third of completions (those whose length is a multiple of 3)."""
    if len(completion) % 3 == 0:
        raise ArithmeticError(f"completion of {len(completion)} characters: this reward function breaks")
    return digit_share(completion, problem)


def always_failing(completion: str, problem) -> float:
    raise LookupError("the reward service is unreachable")


class Interrupted(RuntimeError):
    pass


class CrashAfter:
    """Hook factory: the run dies after step ``step`` (its checkpoint written), as a killed job would."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, trainer):
        def hook(step: int, metrics: dict) -> None:
            if step == self.step:
                raise Interrupted(f"interrupted after step {step}")
        return hook
