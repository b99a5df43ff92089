"""Model outputs -> per-example scores -> task metrics with standard errors -> CORE aggregate.

Design choices (lm-evaluation-harness and nanochat/DCLM conventions):

* Multiple choice: the prediction is the choice with the highest total log-likelihood of its
  continuation (``acc``) or the highest log-likelihood per **character of the answer text as
  written**, without the delimiter before it (``acc_norm``), so long answers are not penalised
  for their length. That is lm-evaluation-harness's ``acc_norm`` (``ll / len(choice)`` over its
  ``doc_to_choice`` strings), so the numbers agree with it; dividing by the UTF-8 bytes of the
  scored continuation instead moved acc_norm by 0.1–0.3 points. Ties go to the first choice.
  Winogrande-style partial scoring needs nothing special here: its choices share a continuation
  and differ in context, so ``acc`` compares the same scored text (its acc_norm divides by the
  options' lengths, as lm-evaluation-harness's does).
* LAMBADA: ``acc`` is 1 when every target token is the model's argmax (greedy), ``perplexity``
  is ``exp(−mean log-likelihood)`` over passages (lm-evaluation-harness's definition).
* GSM8K: the number after ``####`` in the completion, else its last number, compared after
  normalization (commas, ``$`` and trailing dots removed) with the reference: ``exact_match``.
  A task with its own ``answer_of`` (an lm-eval ``generate_until`` YAML) compares
  ``answer_of(completion)`` with ``answer_of(reference)`` instead.
* Bits per byte on held-out text: total negative log-likelihood in bits over total UTF-8
  bytes, which does not depend on the tokenizer, so models with different vocabularies compare.
* Standard errors: ``std/√n`` (ddof 1) for means of per-example scores; a seeded bootstrap over
  examples for perplexity and bits per byte, which are not means.
* CORE (nanochat / DCLM): each task's score is centered against its random baseline,
  ``(score − baseline) / (1 − baseline)`` (0 = chance, 1 = perfect), and the centered scores are
  averaged; its standard error propagates the tasks' (independent) standard errors.
* Means go through the ``evaluate`` metrics of :mod:`llmray.eval.metrics`.
"""

from __future__ import annotations

import math
import re

import numpy as np

from llmray.eval.tasks import Example, Task, normalize_number

LN2 = math.log(2)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_MARKED_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


# ---------------------------------------------------------------------------------------------
# Per example
# ---------------------------------------------------------------------------------------------

def choose(loglikelihoods: list[float], lengths: list[int]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character); ties go to the first choice."""
    per_char = [ll / max(n, 1) for ll, n in zip(loglikelihoods, lengths)]
    return int(np.argmax(loglikelihoods)), int(np.argmax(per_char))


def extract_answer(completion: str) -> str:
    """The final numeric answer of a generated solution ('' when it has no number)."""
    marked = _MARKED_ANSWER.search(completion)
    if marked:
        return normalize_number(marked.group(1))
    numbers = _NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else ""


def score_example(task: Task, example: Example, results: list) -> dict:
    """One example's scores from its requests' results.

    ``results`` holds ``(loglikelihood, is_greedy)`` per log-likelihood request, or the completion
    string of a generation request.
    """
    if task.kind == "multiple_choice":
        lls = [float(ll) for ll, _ in results]
        pred, pred_norm = choose(lls, example.norm_lengths())
        return {"id": example.id, "gold": example.gold, "loglikelihoods": lls, "pred": pred,
                "pred_norm": pred_norm, "acc": int(pred == example.gold), "acc_norm": int(pred_norm == example.gold)}
    if task.kind == "last_word":
        (ll, greedy), = results
        return {"id": example.id, "loglikelihood": float(ll), "acc": int(bool(greedy))}
    if task.kind == "generate":
        completion, = results
        if task.answer_of is None:
            prediction, answer = extract_answer(completion), example.answer
        else:
            prediction, answer = task.answer_of(completion), task.answer_of(example.answer)
        return {"id": example.id, "completion": completion, "prediction": prediction, "answer": answer,
                "exact_match": int(prediction == answer)}
    nll = -math.fsum(ll for ll, _ in results)
    return {"id": example.id, "nll": nll, "bytes": len(example.continuations[0].encode("utf-8"))}


# ---------------------------------------------------------------------------------------------
# Per task
# ---------------------------------------------------------------------------------------------

def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean, ddof 1 (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(len(values)))


def bootstrap_stderr(statistic, columns: list[np.ndarray], iters: int, seed: int) -> float:
    """Std (ddof 1) of ``statistic(*resampled columns)`` over ``iters`` seeded bootstrap resamples."""
    n = len(columns[0])
    if n < 2 or iters < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(iters, n))
    values = statistic(*(column[index] for column in columns))  # (iters,)
    return float(np.std(values, ddof=1))


def _metric(value: float, stderr: float) -> dict:
    return {"value": float(value), "stderr": float(stderr)}


def aggregate(task: Task, scores: list[dict], bootstrap_iters: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Task metrics ``{name: {"value", "stderr"}}`` from the per-example scores."""
    from llmray.eval import metrics  # imports `evaluate` (seconds): only when aggregating

    if task.kind == "multiple_choice":
        golds = [s["gold"] for s in scores]
        return {"acc": _metric(metrics.accuracy([s["pred"] for s in scores], golds),
                               mean_stderr([s["acc"] for s in scores])),
                "acc_norm": _metric(metrics.accuracy([s["pred_norm"] for s in scores], golds),
                                    mean_stderr([s["acc_norm"] for s in scores]))}
    if task.kind == "last_word":
        lls = np.asarray([s["loglikelihood"] for s in scores], dtype=np.float64)
        return {"acc": _metric(metrics.accuracy([s["acc"] for s in scores], [1] * len(scores)),
                               mean_stderr([s["acc"] for s in scores])),
                "perplexity": _metric(metrics.perplexity(lls.tolist()),
                                      bootstrap_stderr(lambda x: np.exp(-x.mean(axis=1)), [lls],
                                                       bootstrap_iters, seed))}
    if task.kind == "generate":
        return {"exact_match": _metric(metrics.exact_match([s["prediction"] for s in scores],
                                                           [s["answer"] for s in scores]),
                                       mean_stderr([s["exact_match"] for s in scores]))}
    nll = np.asarray([s["nll"] for s in scores], dtype=np.float64)
    size = np.asarray([s["bytes"] for s in scores], dtype=np.float64)
    return {"bits_per_byte": _metric(
        nll.sum() / (LN2 * size.sum()),
        bootstrap_stderr(lambda a, b: a.sum(axis=1) / (LN2 * b.sum(axis=1)), [nll, size], bootstrap_iters, seed))}


# ---------------------------------------------------------------------------------------------
# Across tasks
# ---------------------------------------------------------------------------------------------

def centered(value: float, baseline: float) -> float:
    """0 at chance, 1 at a perfect score."""
    return (value - baseline) / (1.0 - baseline)


def core_score(task_results: dict[str, dict]) -> dict | None:
    """CORE-style aggregate over tasks given ``{name: {"metric", "value", "stderr", "baseline"}}``."""
    if not task_results:
        return None
    centered_scores = {name: centered(r["value"], r["baseline"]) for name, r in task_results.items()}
    variance = sum((r["stderr"] / (1.0 - r["baseline"])) ** 2 for r in task_results.values())
    return {"value": float(np.mean(list(centered_scores.values()))),
            "stderr": math.sqrt(variance) / len(task_results),
            "centered": centered_scores,
            "tasks": {name: {k: r[k] for k in ("metric", "value", "baseline")} for name, r in task_results.items()}}
