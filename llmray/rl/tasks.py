"""RL prompts with a checkable answer: a synthetic arithmetic task, GSM8K, and user JSONL.

Why a synthetic task: GSM8K is out of reach of a model small enough to train on a laptop CPU,
so RL on it would show no learning there. Arithmetic at graded difficulty gives such a model
something it can get right part of the time, which is what group-relative advantages need
(a group where every completion scores the same teaches nothing).

* :func:`arithmetic_problems` draws distinct problems from a seeded generator: level 1 adds two
  one-digit numbers, level 2 adds a one-digit to a two-digit number, level 3 adds or subtracts
  two-digit numbers, level 4 chains three two-digit terms, level 5 multiplies a two-digit by a
  one-digit number and adds a third. The same seed and level give the same problems on every
  machine (Python's ``random.Random`` is specified to).
* :func:`final_number` is the verifier of both tasks: the last number in the text, commas and a
  trailing ``.0`` ignored (GSM8K's convention: the reference answer follows ``####``).
* Every prompt is a :class:`Problem`: chat messages (a user turn) and the answer as a string.
  A generated problem's id is its expression, so repeats of one expression share the train /
  held-out split: held-out arithmetic is never seen in training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from llmray.align.records import Quarantined, RecordError, check_messages, field, read_jsonl
from llmray.config import param

LEVELS = (1, 2, 3, 4, 5)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    id: str
    messages: tuple[dict, ...]  # the conversation up to the assistant's turn
    answer: str  # the expected final number, as text

    @property
    def group(self) -> str:
        """The unit of the train/held-out split (:func:`llmray.align.records.split_sources`)."""
        return self.id


@dataclass
class PromptSource:
    """Prompts with answers: generated arithmetic, GSM8K problems, or user JSONL."""

    kind: Literal["arithmetic", "gsm8k", "jsonl"] = param(
        "arithmetic", doc="arithmetic: generated problems; gsm8k: {question, answer '... #### N'} JSONL; "
                          "jsonl: {prompt | messages, answer} records")
    path: str = param("", doc="the JSONL(.gz) file (gsm8k, jsonl)")
    count: int = param(512, doc="problems to use: generated (distinct; fewer where the level has fewer), "
                                    "or the first in file order", min=1)
    level: int = param(1, doc="arithmetic difficulty 1-5 (see llmray.rl.tasks)", min=1, max=5)
    seed: int = param(0, doc="arithmetic: seed of the generator", min=0)
    name: str | None = param(None, doc="source name in counts; null = the kind (arithmetic: with its level)")

    def __post_init__(self) -> None:
        if self.kind != "arithmetic" and not self.path:
            raise ValueError(f"a {self.kind} prompt source needs a path")

    @property
    def label(self) -> str:
        return self.name or (f"arithmetic-level{self.level}" if self.kind == "arithmetic" else self.kind)


def final_number(text: str) -> str | None:
    """The last number in ``text`` in canonical form ('1,234.0' → '1234'), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value if value not in ("", "-") else None


def arithmetic_problems(count: int, level: int, seed: int) -> list[Problem]:
    """``count`` distinct problems of difficulty ``level`` from a generator seeded with ``seed`` (all
    of the level's problems when it has fewer, e.g. the 100 of level 1)."""
    if level not in LEVELS:
        raise ValueError(f"arithmetic level must be one of {LEVELS}, got {level}")
    rng = random.Random(f"llmray-arithmetic:{level}:{seed}")
    problems: dict[str, Problem] = {}
    for _ in range(50 * count):  # far more draws than needed unless the level runs out of problems
        if len(problems) == count:
            break
        expression, value = _expression(rng, level)
        problems.setdefault(expression, Problem(f"arithmetic:{expression}",
                                                ({"role": "user", "content": f"What is {expression}?"},), str(value)))
    return list(problems.values())


def _expression(rng: random.Random, level: int) -> tuple[str, int]:
    """An expression of difficulty ``level`` and its value (left to right; * binds first)."""
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b}", a + b
    if level == 2:
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        return f"{a} + {b}", a + b
    if level == 5:
        a, b, c = rng.randint(10, 99), rng.randint(2, 9), rng.randint(10, 99)
        return f"{a} * {b} + {c}", a * b + c
    terms = [rng.randint(10, 99) for _ in range(level - 1)]  # level 3: two terms, level 4: three
    text, value = str(terms[0]), terms[0]
    for term in terms[1:]:
        sign = rng.choice("+-")
        text, value = f"{text} {sign} {term}", value + term if sign == "+" else value - term
    return text, value


def read_problems(src: PromptSource) -> Iterator[Problem | Quarantined]:
    """The problems of ``src``; a bad file record comes out as Quarantined naming its line."""
    if src.kind == "arithmetic":
        yield from arithmetic_problems(src.count, src.level, src.seed)
        return
    produced = 0
    for line, record in read_jsonl(src.path):
        if produced == src.count:
            return
        if isinstance(record, Quarantined):
            yield record
            continue
        try:
            yield _file_problem(record, line, src)
            produced += 1
        except RecordError as exc:
            yield Quarantined(src.path, line, exc.error, f"{src.path}:{line}: {exc}")


def _file_problem(record: dict, line: int, src: PromptSource) -> Problem:
    key = f"{src.kind}:{Path(src.path).name}:{line}"
    if src.kind == "gsm8k":
        question = field(record, "question", str, "problem")
        solution = field(record, "answer", str, "problem")
        if "####" not in solution:
            raise RecordError("missing_field", "problem.answer has no '#### <number>' final line")
        answer = final_number(solution.rsplit("####", 1)[1])
        messages: list[dict] = [{"role": "user", "content": question}]
    else:
        if "messages" in record:
            messages = check_messages(field(record, "messages", list, "record"))
        else:
            messages = [{"role": "user", "content": field(record, "prompt", str, "record")}]
        answer = final_number(str(field(record, "answer", (str, int, float), "record")))
    if answer is None:
        raise RecordError("wrong_type", "the answer holds no number")
    if messages[-1]["role"] == "assistant":
        raise RecordError("wrong_type", "the prompt ends with an assistant turn; it must end before one")
    return Problem(key, tuple(messages), answer)
