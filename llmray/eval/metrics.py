"""The ``evaluate`` metrics eval aggregates with (accuracy, exact match, perplexity), defined locally.

``evaluate.load("accuracy")`` resolves the name on the Hugging Face Hub, which fails offline
(the package ships no metric scripts). A metric is an ``evaluate.Metric`` subclass, and
instantiating one from an installed module works offline, so the three metrics eval needs
are defined here, each with the same definition as the Hub module of that name (accuracy =
fraction of predictions equal to their reference; exact match = fraction of equal strings;
perplexity = exp of the negative mean log-likelihood, from precomputed log-likelihoods rather
than by running a model). ``keep_in_memory=True`` keeps ``evaluate`` from writing Arrow cache
files. They are instantiated directly (no Hub lookup, no network).
"""

from __future__ import annotations

import math

import datasets
import evaluate

_CITATION = "lm-evaluation-harness (Gao et al. 2021); evaluate (Hugging Face)"


def _info(description: str, features: dict) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(description=description, citation=_CITATION, inputs_description=description,
                               features=datasets.Features(features))


class Accuracy(evaluate.Metric):
    """Fraction of integer predictions equal to their references."""

    def _info(self) -> evaluate.MetricInfo:
        return _info("accuracy", {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})

    def _compute(self, predictions, references) -> dict:
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(predictions)}


class ExactMatch(evaluate.Metric):
    """Fraction of prediction strings identical to their reference strings (already normalized)."""

    def _info(self) -> evaluate.MetricInfo:
        return _info("exact match", {"predictions": datasets.Value("string"),
                                     "references": datasets.Value("string")})

    def _compute(self, predictions, references) -> dict:
        return {"exact_match": sum(int(p == r) for p, r in zip(predictions, references)) / len(predictions)}


class Perplexity(evaluate.Metric):
    """exp(−mean log-likelihood) over items (lm-evaluation-harness's per-document perplexity)."""

    def _info(self) -> evaluate.MetricInfo:
        return _info("perplexity from log-likelihoods", {"predictions": datasets.Value("float64")})

    def _compute(self, predictions) -> dict:
        return {"perplexity": math.exp(-math.fsum(predictions) / len(predictions))}


def accuracy(predictions: list[int], references: list[int]) -> float:
    return Accuracy(keep_in_memory=True).compute(predictions=predictions, references=references)["accuracy"]


def exact_match(predictions: list[str], references: list[str]) -> float:
    return ExactMatch(keep_in_memory=True).compute(predictions=predictions,
                                                   references=references)["exact_match"]


def perplexity(loglikelihoods: list[float]) -> float:
    return Perplexity(keep_in_memory=True).compute(predictions=loglikelihoods)["perplexity"]
