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
* Outputs are Hugging Face files: ``tokenizer.json`` and ``tokenizer_config.json`` (special
  tokens and the Jinja chat template), loadable with ``AutoTokenizer.from_pretrained(dir)``.
* Long runs report progress (:mod:`llmray.progress`): characters counted, then characters of
  the sample fed to BPE against the expected sample size (rate, ETA); the merges that follow
  have no progress hook in ``tokenizers``, so the last line says they started.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from llmray import runs, storage
from llmray.config import param
from llmray.data.readers import documents
from llmray.progress import Progress
from llmray.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TRAINING_FILE, chat, special_ids

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
# Sampling the training text
# ---------------------------------------------------------------------------------------------

def _unit_hash(seed: int, doc_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _training_rows(cfg: TokenizerConfig) -> Iterator[tuple[str, str, str]]:
    """(id, source, clipped text) of every readable training-split document, in file order."""
    for batch in documents.iter_documents(cfg.documents):
        for doc_id, text, source, error in zip(batch["id"], batch["text"], batch["source"], batch["error"]):
            if error is None and text:
                yield doc_id, source, text[: cfg.max_doc_chars]


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


@dataclass
class Sample:
    """What the sampler saw and chose: the realised mixture and the text kept for the report."""

    available_chars: dict[str, int]
    keep_probability: dict[str, float]
    chars: dict[str, int]
    documents: dict[str, int]
    report_texts: dict[str, list[str]]
    held_out_texts: list[str]


def sample_texts(cfg: TokenizerConfig, sample: Sample, batch_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Yield batches of sampled training text, filling ``sample``'s counters and report texts."""
    report_budget: dict[str, int] = {}
    held_out_budget = 0
    batch: list[str] = []
    size = 0
    for doc_id, source, text in _training_rows(cfg):
        if documents.split_of(doc_id, cfg.val_fraction) == "val":
            if held_out_budget < cfg.report_chars:
                sample.held_out_texts.append(text)
                held_out_budget += len(text)
            continue
        if report_budget.get(source, 0) < cfg.report_chars:
            sample.report_texts.setdefault(source, []).append(text)
            report_budget[source] = report_budget.get(source, 0) + len(text)
        if _unit_hash(cfg.seed, doc_id) >= sample.keep_probability.get(source, 0.0):
            continue
        sample.chars[source] = sample.chars.get(source, 0) + len(text)
        sample.documents[source] = sample.documents.get(source, 0) + 1
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_chars(cfg: TokenizerConfig, progress: Progress | None = None) -> dict[str, int]:
    """Characters of training-split text per source (documents clipped to ``max_doc_chars``)."""
    counts: dict[str, int] = {}
    for doc_id, source, text in _training_rows(cfg):
        if progress is not None:
            progress.advance(len(text))
        if documents.split_of(doc_id, cfg.val_fraction) == "train":
            counts[source] = counts.get(source, 0) + len(text)
    return counts


def counted(batches: Iterable[list[str]], progress: Progress, note: str = "") -> Iterator[list[str]]:
    """``batches`` unchanged, their characters counted into ``progress`` as BPE consumes them."""
    for batch in batches:
        progress.advance(sum(map(len, batch)))
        yield batch
    progress.finish(note)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def run_tokenizer(cfg: TokenizerConfig, ctx) -> dict:
    """Train the tokenizer, write it and its report under ``ctx.output``; return a summary."""
    from llmray.tokenizer import report as report_lib

    started = time.perf_counter()
    counting = Progress("tokenizer: counting characters", unit="chars", logger=ctx.logger)
    available = count_chars(cfg, counting)
    counting.finish()
    if not available:
        raise ValueError(f"no readable training documents with text at {cfg.documents!r}")
    sample = Sample(available, keep_probabilities(available, cfg), {}, {}, {}, [])
    ctx.logger.info("sampling %s chars from %s", f"{cfg.char_budget:,}",
                    {s: f"{c:,}" for s, c in available.items()})
    expected = sum(available[s] * p for s, p in sample.keep_probability.items())  # the sample's expected size
    feeding = Progress("tokenizer: reading the sample into BPE", expected, "chars", logger=ctx.logger)
    texts = counted(sample_texts(cfg, sample), feeding, f"computing the merges of {cfg.vocab_size:,} tokens ...")
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
    train_seconds = time.perf_counter() - started
    ids = save(tokenizer, ctx.output)
    training = {"seconds": round(train_seconds, 3), "chars": sample.chars, "documents": sample.documents,
                "available_chars": available, "keep_probability": sample.keep_probability,
                "val_fraction": cfg.val_fraction, "seed": cfg.seed, "special_ids": ids,
                "vocab_size": tokenizer.get_vocab_size()}
    storage.write_json(runs.at(ctx.output, TRAINING_FILE), training)
    report = report_lib.build_report(tokenizer, sample.report_texts, sample.held_out_texts)
    report_lib.write_report(report, training, ctx.output)
    ctx.log_metrics(train_seconds=train_seconds, train_chars=sum(sample.chars.values()),
                    held_out_bytes_per_token=report["held_out"]["bytes_per_token"] if report["held_out"] else None)
    return {"vocab_size": tokenizer.get_vocab_size(), "train_chars": sum(sample.chars.values()),
            "train_seconds": round(train_seconds, 3),
            "held_out_bytes_per_token": report["held_out"]["bytes_per_token"] if report["held_out"] else None,
            "special_ids": ids}

