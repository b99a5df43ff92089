"""``llmray tokenizer train``: a byte-level BPE tokenizer trained on a budgeted sample of the corpus.

Design choices:

* **Byte-level BPE, no normalizer**: every UTF-8 string encodes and decodes back exactly (a
  property test checks random Unicode); there is no unknown token.
* **GPT-4-style pre-tokenization** (:data:`SPLIT_PATTERN`): words with an optional leading
  space, contractions, punctuation runs and newlines are split before BPE, and digits are split
  into groups of at most 3 so numbers tokenize uniformly.
* **Special tokens** take ids 0..6 in the order of :data:`llmray.tokenizer.chat.SPECIAL_TOKENS`;
  a post-processor puts ``<|bos|>`` in front of every encoded text, so "documents start with
  BOS" holds for anyone calling ``encode`` (``add_special_tokens=False`` turns it off).
* **Character budget and mixture**: BPE only needs a representative sample, not the corpus. A
  first pass counts characters per source (documents clipped to ``max_doc_chars`` so one huge
  file cannot dominate the statistics); each source then gets ``char_budget * weight`` and
  every document is kept with probability ``quota / available`` decided by a hash of
  ``(seed, id)``, so the sample is reproducible and independent of file order. A source with
  less text than its quota contributes all of it (the realised mixture is reported).
* **Held-out text**: documents whose id hashes into the validation split (same rule and default
  fraction as the tokens stage, :func:`llmray.data.readers.documents.split_of`) are never trained on;
  the report measures compression on them.
* **The driver holds counts and refs** (ray plan): each pass is one Ray task per input file
  (:func:`file_chars`, :func:`sample_file`). The driver gets back per-source counts only, sums
  them in file order and computes the keep probabilities; each file's sampled texts and report
  texts stay in the object store, passed on as refs. The sample there is bounded by
  ``char_budget`` (plus at most ``report_chars`` per source and file for the report), not by
  the corpus, and the driver's memory does not grow with either.
* **Training runs where the cluster puts it**: one task reserving ``train_cpus`` (its Rayon
  threads) gets the refs in file order, fetches one file's sample at a time and feeds BPE in the
  order one sequential pass would (file order, record order, ~1 MiB batches), merges the files'
  report texts under the same budgets (:class:`~llmray.tokenizer.report.ReportTexts`: a bucket
  keeps a prefix, so per-file gathering loses nothing), writes every output file to
  ``ctx.output`` (any storage location: the task may run on another node) and returns the
  summary alone.
* **Small inputs skip Ray** (``plan: auto``): up to ``local_max_mb`` of input the very same
  per-file functions and :func:`train_and_write` run one after another in this process, which
  then holds the sample (at most the input); both plans write byte-identical files
  (``training.json`` differs in ``seconds`` only; tested). Measured on 2 idle cores: starting
  Ray took 3.8 s; on a running Ray the ray plan took 0.10 s against 0.08 s locally on 0.7 MB
  (4 files), and 6.5 s against 5.9 s on 205 MB (1,200 files), where each reading pass takes
  ~2.5 s locally (~90 MB/s). So below a few hundred MB the local plan saves the start-up, the
  per-task overhead and the object-store round trip of the sample, and costs seconds at most;
  the ray plan is for inputs whose passes need many cores (or more memory than one process).
* Outputs are Hugging Face files: ``tokenizer.json`` and ``tokenizer_config.json`` (special
  tokens and the Jinja chat template), loadable with ``AutoTokenizer.from_pretrained(dir)``.
* Long runs report progress (:mod:`llmray.progress`): files counted and sampled (tasks done, in
  the ray plan), then characters of the sample fed to BPE against the sample's size (rate,
  ETA); the merges that follow have no progress hook in ``tokenizers``, so the last line says
  they started. In the ray plan the BPE lines come from the training task's worker (Ray
  forwards them to the driver's console), not from the driver's ``stage.log``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from llmray import progress, runs, storage
from llmray.config import param
from llmray.data.readers import documents
from llmray.progress import Progress
from llmray.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TRAINING_FILE, chat, special_ids
from llmray.tokenizer import report as report_lib
from llmray.tokenizer.report import ReportTexts

BYTE_ALPHABET = 256

# GPT-4 (cl100k) pre-tokenization: contractions, letters with one optional leading non-letter,
# digits in groups of <= 3, punctuation runs with trailing newlines, newlines, other whitespace.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class TokenizerConfig:
    """Byte-level BPE training on a character budget drawn from the documents."""

    documents: str = param("{run_dir}/curate/output/documents",
                           doc="parquet/JSONL(.gz) documents with a 'text' column: file, directory or glob")
    vocab_size: int = param(32768, doc="vocabulary size including the 256 bytes and the special tokens",
                            min=BYTE_ALPHABET + len(chat.SPECIAL_TOKENS) + 1, max=1 << 20)
    char_budget: int = param(250_000_000, doc="characters of text sampled for BPE training", min=1000)
    max_doc_chars: int = param(10_000, doc="each document is clipped to this many characters for training",
                               min=100)
    source_weights: dict[str, float] = param(
        default_factory=dict, doc="mixture weight per document source (empty: proportional to the text "
                                  "available); sources left out are not sampled")
    val_fraction: float = param(0.005, doc="fraction of document ids held out (the tokens stage's "
                                           "validation split by default)", min=0.0, max=0.5)
    min_frequency: int = param(2, doc="a pair must occur this often to be merged", min=1)
    seed: int = param(0, doc="seed of the document sample")
    report_chars: int = param(2_000_000, doc="characters per source (and of held-out text) encoded for "
                                             "the report", min=1000)
    plan: Literal["auto", "local", "ray"] = param(
        "auto", doc="where to read and train: local (this process), ray (a task per file, BPE in a task), "
                    "auto (local when the input is at most local_max_mb)")
    local_max_mb: float = param(256.0, doc="auto plan: inputs up to this many MB are read and trained on "
                                          "locally", min=0.0)
    train_cpus: int | None = param(None, doc="ray plan: CPUs the BPE task reserves and trains on (empty: "
                                             "every CPU of the largest node)", min=1)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.source_weights.items() if v < 0}
        if bad:
            raise ValueError(f"source_weights must be >= 0, got {bad}")
        if self.source_weights and sum(self.source_weights.values()) <= 0:
            raise ValueError("source_weights must have a positive sum")

    def inputs(self) -> dict[str, str]:
        return documents.lineage_inputs(self.documents)


# ---------------------------------------------------------------------------------------------
# The tokenizer object
# ---------------------------------------------------------------------------------------------

def new_tokenizer():
    """An untrained byte-level BPE tokenizer with this project's pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterator[list[str]], vocab_size: int, min_frequency: int = 2):
    """Train BPE on batches of texts; special tokens get ids 0..6 and BOS is prepended on encode."""
    from tokenizers import pre_tokenizers, processors, trainers

    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(chat.SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(chat.BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{chat.BOS} $A", pair=f"{chat.BOS} $A {chat.BOS} $B", special_tokens=[(chat.BOS, bos_id)])
    return tokenizer


def hf_tokenizer_config() -> dict:
    """``tokenizer_config.json``: what ``transformers`` needs besides ``tokenizer.json``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": chat.BOS,
        "eos_token": chat.EOS,
        "pad_token": chat.PAD,
        "additional_special_tokens": [chat.SYSTEM, chat.USER, chat.ASSISTANT, chat.END],
        "chat_template": chat.JINJA_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }


def save(tokenizer, directory: Path | str) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` atomically (any location, see
    :mod:`llmray.storage`); return the special ids."""
    storage.write_text(runs.at(directory, TOKENIZER_FILE), tokenizer.to_str(pretty=True))
    storage.write_json(runs.at(directory, TOKENIZER_CONFIG_FILE), hf_tokenizer_config())
    return special_ids(tokenizer)


# ---------------------------------------------------------------------------------------------
# Sampling the training text: one call per file (a Ray task in the ray plan)
# ---------------------------------------------------------------------------------------------

def _unit_hash(seed: int, doc_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _rows(path: str, root: str, cfg: TokenizerConfig) -> Iterator[tuple[str, str, str]]:
    """(id, source, clipped text) of every readable document with text in one file, in record order."""
    for batch in documents.read_batches(path, root):
        for doc_id, text, source, error in zip(batch["id"], batch["text"], batch["source"], batch["error"]):
            if error is None and text:
                yield doc_id, source, text[: cfg.max_doc_chars]


def file_chars(path: str, root: str, cfg: TokenizerConfig) -> dict[str, int]:
    """Pass 1: characters of one file's training-split text per source."""
    counts: dict[str, int] = {}
    for doc_id, source, text in _rows(path, root, cfg):
        if documents.split_of(doc_id, cfg.val_fraction) == "train":
            counts[source] = counts.get(source, 0) + len(text)
    return counts


def keep_probabilities(chars_per_source: dict[str, int], cfg: TokenizerConfig) -> dict[str, float]:
    """Probability of sampling a document of each source so each gets ``char_budget * weight``."""
    available = {s: c for s, c in chars_per_source.items() if c > 0}
    if cfg.source_weights:
        unknown = sorted(set(cfg.source_weights) - set(available))
        if unknown:
            raise ValueError(f"source_weights names sources {unknown} that have no training text; "
                             f"sources found: {sorted(available)}")
        weights = {s: cfg.source_weights.get(s, 0.0) for s in available}
    else:
        weights = dict(available)
    total = sum(weights.values())
    return {s: min(1.0, cfg.char_budget * weights[s] / total / available[s]) for s in available}


def sample_file(path: str, root: str, cfg: TokenizerConfig, keep_probability: dict[str, float]
                ) -> tuple[list[str], dict[str, dict[str, int]], ReportTexts]:
    """Pass 2: one file's sampled training texts (record order), its ``chars`` and ``documents``
    sampled per source, and its report texts. Three values so that, as a Ray task with three
    returns, the driver fetches the counters alone and passes the texts on by reference."""
    texts: list[str] = []
    chars: dict[str, int] = {}
    docs: dict[str, int] = {}
    report = ReportTexts(cfg.report_chars)
    for doc_id, source, text in _rows(path, root, cfg):
        if documents.split_of(doc_id, cfg.val_fraction) == "val":
            report.add(None, text)
            continue
        report.add(source, text)
        if _unit_hash(cfg.seed, doc_id) < keep_probability.get(source, 0.0):
            texts.append(text)
            chars[source] = chars.get(source, 0) + len(text)
            docs[source] = docs.get(source, 0) + 1
    return texts, {"chars": chars, "documents": docs}, report


def summed(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Per-source counts of the files added up in file order, so the sources keep the order one
    pass over all files meets them (the mixture's float sums then round the same way)."""
    total: dict[str, int] = {}
    for part in parts:
        for source, count in part.items():
            total[source] = total.get(source, 0) + count
    return total


# ---------------------------------------------------------------------------------------------
# Training: one call (a Ray task in the ray plan) fed the files' samples in file order
# ---------------------------------------------------------------------------------------------

def batched(samples: Iterable[list[str]], batch_chars: int = 1 << 20) -> Iterator[list[str]]:
    """The files' sampled texts in order, regrouped into batches of about ``batch_chars``."""
    batch: list[str] = []
    size = 0
    for texts in samples:
        for text in texts:
            batch.append(text)
            size += len(text)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def counted(batches: Iterable[list[str]], progress: Progress, note: str = "") -> Iterator[list[str]]:
    """``batches`` unchanged, their characters counted into ``progress`` as BPE consumes them."""
    for batch in batches:
        progress.advance(sum(map(len, batch)))
        yield batch
    progress.finish(note)


def train_and_write(cfg: TokenizerConfig, output: Path | str, samples: Iterable[list[str]],
                    reports: Iterable[ReportTexts], training: dict, seconds_before: float, logger) -> dict:
    """Train BPE on the files' samples, write the tokenizer, ``training.json`` and the report to
    ``output`` (any location); return the stage's summary.

    ``samples`` and ``reports`` hold one item per file in file order and are consumed one file at
    a time (the ray plan fetches each from the object store as it is reached), so beyond BPE's own
    counts this holds one file's sample, then the report's text. ``training`` is the sampler's
    record; ``seconds_before`` the time the stage ran before this call."""
    started = time.perf_counter()
    feeding = Progress("tokenizer: reading the sample into BPE", sum(training["chars"].values()), "chars",
                       logger=logger)
    texts = counted(batched(samples), feeding, f"computing the merges of {cfg.vocab_size:,} tokens ...")
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
    training = {**training, "seconds": round(seconds_before + time.perf_counter() - started, 3),
                "special_ids": save(tokenizer, output), "vocab_size": tokenizer.get_vocab_size()}
    storage.write_json(runs.at(output, TRAINING_FILE), training)
    report_texts = ReportTexts(cfg.report_chars)
    for part in reports:
        report_texts.extend(part)
    report = report_lib.build_report(tokenizer, report_texts.sources, report_texts.held_out)
    report_lib.write_report(report, training, output)
    return {"vocab_size": training["vocab_size"], "train_chars": sum(training["chars"].values()),
            "train_seconds": training["seconds"],
            "held_out_bytes_per_token": report["held_out"]["bytes_per_token"] if report["held_out"] else None,
            "special_ids": training["special_ids"]}


def _train_task(cfg: TokenizerConfig, output: Path | str, sample_refs: list, report_refs: list,
                training: dict, seconds_before: float, cpus: int) -> dict:
    """The ray plan's training task: :func:`train_and_write` on ``cpus`` threads, fetching the
    refs one at a time (they come inside lists, so Ray does not resolve them all up front)."""
    import ray

    # Rayon sizes its pool on first use, so this holds in a worker that has not run tokenizers yet.
    os.environ["RAYON_NUM_THREADS"] = str(cpus)
    logging.basicConfig(level=logging.WARNING)  # a worker has no handler: INFO progress would be dropped
    logger = logging.getLogger("llmray.tokenizer")
    logger.setLevel(logging.INFO)
    return train_and_write(cfg, output, map(ray.get, sample_refs), map(ray.get, report_refs), training,
                           seconds_before, logger)


# ---------------------------------------------------------------------------------------------
# The stage: the same steps on either plan
# ---------------------------------------------------------------------------------------------

def choose_plan(cfg: TokenizerConfig, input_bytes: int) -> str:
    if cfg.plan != "auto":
        return cfg.plan
    return "local" if input_bytes <= cfg.local_max_mb * 1e6 else "ray"


class LocalPlan:
    """Every per-file call and the training, one after another in this process (no Ray)."""

    def __init__(self, logger) -> None:
        self.logger = logger

    def each_file(self, fn, files: list[str], *args, what: str, returns: int = 1) -> list:
        done = Progress(f"tokenizer: {what}", len(files), "files", logger=self.logger)
        results = []
        for file in files:
            results.append(fn(file, *args))
            done.advance()
        done.finish()
        return results

    def get(self, values) -> list:
        """The per-file results, already in this process."""
        return list(values)

    def train(self, cfg: TokenizerConfig, output, samples, reports, training: dict, seconds_before: float) -> dict:
        return train_and_write(cfg, output, samples, reports, training, seconds_before, self.logger)


class RayPlan:
    """One task per file and one training task; the driver waits on their refs and gets only the
    per-file counts and the summary."""

    def __init__(self, ctx) -> None:
        ctx.connect_ray()
        self.logger = ctx.logger

    def each_file(self, fn, files: list[str], *args, what: str, returns: int = 1) -> list:
        import ray

        task = ray.remote(fn).options(num_returns=returns, name=f"tokenizer: {what}")
        refs = [task.remote(file, *args) for file in files]
        # a task's returns are ready together: count tasks by their first
        progress.wait([r[0] for r in refs] if returns > 1 else refs, f"tokenizer: {what}", logger=self.logger)
        return refs

    def get(self, refs) -> list:
        """Fetch small per-file results (counts) to the driver."""
        import ray

        return ray.get(list(refs))

    def train(self, cfg: TokenizerConfig, output, samples, reports, training: dict, seconds_before: float) -> dict:
        import ray

        cpus = self.train_cpus(cfg)
        task = ray.remote(_train_task).options(num_cpus=cpus, name="tokenizer: BPE")
        ref = task.remote(cfg, output, list(samples), list(reports), training, seconds_before, cpus)
        progress.wait([ref], "tokenizer: training BPE", logger=self.logger)
        return ray.get(ref)

    @staticmethod
    def train_cpus(cfg: TokenizerConfig) -> int:
        """``cfg.train_cpus`` (default: all), at most the largest node's CPUs, so the task can be placed."""
        import ray

        largest = max(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"])
        return max(1, min(cfg.train_cpus or largest, largest))


def run_tokenizer(cfg: TokenizerConfig, ctx) -> dict:
    """Train the tokenizer, write it and its report under ``ctx.output``; return a summary."""
    started = time.perf_counter()
    files = documents.list_files(cfg.documents)
    root = documents.input_root(cfg.documents)
    input_bytes = sum(map(storage.size, files))
    plan_name = choose_plan(cfg, input_bytes)
    ctx.logger.info("training the tokenizer on %d files (%.1f MB) with the %s plan", len(files), input_bytes / 1e6,
                    plan_name)
    plan = RayPlan(ctx) if plan_name == "ray" else LocalPlan(ctx.logger)
    available = summed(plan.get(plan.each_file(file_chars, files, root, cfg, what="counting characters")))
    if not available:
        raise ValueError(f"no readable training documents with text at {cfg.documents!r}")
    keep = keep_probabilities(available, cfg)
    ctx.logger.info("sampling %s chars from %s", f"{cfg.char_budget:,}", {s: f"{c:,}" for s, c in available.items()})
    samples, counts, reports = zip(*plan.each_file(sample_file, files, root, cfg, keep, what="sampling", returns=3))
    counts = plan.get(counts)
    training = {"chars": summed(c["chars"] for c in counts), "documents": summed(c["documents"] for c in counts),
                "available_chars": available, "keep_probability": keep, "val_fraction": cfg.val_fraction,
                "seed": cfg.seed}
    summary = plan.train(cfg, ctx.output, samples, reports, training, time.perf_counter() - started)
    ctx.log_metrics(train_seconds=summary["train_seconds"], train_chars=summary["train_chars"],
                    held_out_bytes_per_token=summary["held_out_bytes_per_token"])
    return {**summary, "plan": plan_name}
