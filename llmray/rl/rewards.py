"""Rewards of completions: a verifiable answer check or a user function, plus a format reward.

* ``final_number``: 1 when the last number of the completion equals the problem's answer
  (:func:`llmray.rl.tasks.final_number`), else 0.
* ``function``: any Python callable named by import path (``package.module:name``), called as
  ``fn(completion: str, problem: Problem) -> float`` on the rollout actors (the module must be
  importable there, as any dependency of the job).
* ``reward_model``: the scalar of a reward model (``llmray reward train``) on the rendered prompt
  and completion, scored by the rollout actor that sampled it, in one batched pass
  (:mod:`llmray.rl.rollout`); group-normalised advantages make this the value-free (GRPO /
  RLOO-style) form of PPO with a learned reward.
* The format reward adds ``format_weight`` when the completion ended its turn (emitted the
  end-of-turn token) within its budget.

A reward function that raises, or returns a non-finite value, scores that sample 0 and the
sample carries the traceback (:class:`Scored`); the stream counts such samples, and fails the
stage with the traceback when every sample of a step failed (a broken function, not bad luck).
"""

from __future__ import annotations

import importlib
import math
import traceback
from dataclasses import dataclass
from typing import Callable, Literal

from llmray.config import param
from llmray.rl.tasks import Problem, final_number


@dataclass
class RewardConfig:
    """What a completion scores."""

    kind: Literal["final_number", "function", "reward_model"] = param(
        "final_number", doc="final_number: the last number equals the answer (GSM8K, arithmetic); "
                            "function: the callable named in `function`; reward_model: the model at `model`")
    function: str | None = param(None, doc="import path 'module:name' of fn(completion, problem) -> float")
    model: str | None = param(None, doc="kind reward_model: a reward model export (llmray reward train)")
    format_weight: float = param(0.1, doc="added when the completion ends its turn (0 = no format reward)",
                                 min=0.0)

    def __post_init__(self) -> None:
        if self.kind == "function" and not self.function:
            raise ValueError("reward kind 'function' needs function: 'module:name'")
        if self.kind == "reward_model" and not self.model:
            raise ValueError("reward kind 'reward_model' needs model: the reward model's directory")


@dataclass(frozen=True)
class Scored:
    reward: float  # the total: correctness (or the function's value) + the format reward
    correct: float  # the task reward alone
    error: str | None  # the traceback when the reward function failed (reward then 0)


def exact_final_number(completion: str, problem: Problem) -> float:
    return float(final_number(completion) == problem.answer)


def resolve_function(path: str) -> Callable[[str, Problem], float]:
    """The callable at ``module:name`` (or ``module.name``), with a clear error when it is not there."""
    module_name, _, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {path!r} is not an import path 'module:name'")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: {module_name} has no callable {attr!r}")
    return fn


class Rewarder:
    """Scores completions by ``cfg`` (built once per rollout actor)."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        if cfg.kind == "function":
            self.fn = resolve_function(cfg.function)
        else:  # a reward model scores in batches on the actor (``from_value``): no per-completion function
            self.fn = exact_final_number if cfg.kind == "final_number" else None

    def from_value(self, value: float, finished: bool) -> Scored:
        """The reward of a completion whose task reward was computed elsewhere (a reward model)."""
        return Scored(value + self.cfg.format_weight * finished, value, None)

    def __call__(self, completion: str, problem: Problem, finished: bool) -> Scored:
        try:
            correct = float(self.fn(completion, problem))
            if not math.isfinite(correct):
                raise ValueError(f"reward function returned {correct!r}, expected a finite number")
        except Exception:  # a user function's failure is data about this sample: counted, not fatal
            return Scored(0.0, 0.0, traceback.format_exc())
        return Scored(correct + self.cfg.format_weight * finished, correct, None)
