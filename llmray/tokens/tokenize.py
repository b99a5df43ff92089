"""``llmray tokens``: tokenize documents on Ray Data into train/val token shards.

The pipeline::

    input files (sorted)  ──read_files──►  work units  ──Encoder actor pool──►  shards on storage
      one read task per file, cutting it       (file, part): ~read_batch_chars   + one small summary
      into units of ~read_batch_chars          of whole documents                row per unit
                                                                                        │
    manifest.json, quarantine.jsonl  ◄── driver: summaries sorted by unit, merged ◄─────┘

Design choices:

* **Workers write the bulk**: the actor that encodes a work unit writes its shards itself
  (``<split>/<file>-<part>-<k>.bin``, local disk or object store through
  :mod:`llmray.storage`), and returns only their names, sizes, hashes and counts. The driver
  holds the plan and those summaries, and writes the manifest and the quarantine list.
* **Determinism across runs and ``num_cpus``**: the input files are sorted, a file is cut into
  units of whole documents in record order by ``read_batch_chars``, and a shard's name and bytes
  depend only on its unit, so which actor encodes which unit, and when, changes nothing; the
  driver orders the units' shards by (file, part) in the manifest. A unit is never split
  between actors: each row carries its unit's size and an actor refuses a partial unit (a bug).
* **Actors** hold the tokenizer (loaded once each), encode with special-token matching off
  (document text never produces control tokens), and get ``BOS`` from the tokenizer's
  post-processor. Each actor's tokenizer uses ``threads_per_actor`` Rayon threads (set in the
  actor's environment before its first encode; no ``runtime_env``, so actors start in Ray's
  pre-started workers), so actors x threads ~ cores.
* **Train/val split** by a hash of the document id (:func:`llmray.data.readers.documents.split_of`):
  a document's split never changes when others are added.
* **Small inputs skip Ray** (``plan: auto``): up to ``local_max_mb`` of input is tokenized in
  this process, one ``encode_batch_fast`` call per ``encode_batch_docs`` documents on all cores
  (Rayon), through the same reader, units and :class:`Encoder`, so the shards are byte-identical
  to the actor plan's (tested). Measured on 2 cores with 12 MB: each encoder actor spent ~4 s of
  CPU importing Ray Data and the stage before its first batch, and Ray Data started helper
  actors of its own, about as much CPU as encoding the whole input.
* **Bad documents are quarantined, not fatal**: unreadable records come out of the reader with
  an error and are listed in ``quarantine.jsonl`` (``path``, ``offset``, ``id``, ``error``,
  ``message``); empty documents are skipped and counted. The texts are valid strings by then,
  so an encoding failure is a bug and fails the stage.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa

from llmray import runs, storage
from llmray.config import param
from llmray.data.readers import documents
from llmray.read_ahead import read_ahead
from llmray.tokenizer import TOKENIZER_FILE, chat, load_tokenizer, read_training
from llmray.tokens import shards as shards_lib

READ_CPUS = 0.25  # read tasks are light (parse + slice); leave the cores to the encoders
DEFAULT_VAL_FRACTION = 0.005
_UNIT_COLUMNS = ("unit", "part", "part_rows")


@dataclass
class TokensConfig:
    """Tokenize documents into token shards with a Ray Data actor pool."""

    documents: str = param("{run_dir}/curate/output/documents",
                           doc="parquet/JSONL(.gz) documents with a 'text' column: file, directory or glob")
    tokenizer: str = param("{run_dir}/tokenizer/output", doc="directory holding tokenizer.json")
    val_fraction: float | None = param(None, doc="fraction of document ids in the val split (empty: the "
                                                 "tokenizer's held-out fraction, so the tokenizer never "
                                                 "saw val text)", min=0.0, max=0.5)
    shard_tokens: int = param(100_000_000, doc="a shard is closed once it holds this many tokens", min=1)
    encode_batch_docs: int = param(256, doc="documents per encode_batch_fast call", min=1)
    read_batch_chars: int = param(8 << 20, doc="characters per work unit: a file is cut into units of whole "
                                               "documents of about this many characters; one actor encodes a "
                                               "unit into its own shards (one per split, more past "
                                               "shard_tokens)", min=1024, max=16 << 20)
    actors: int | None = param(None, doc="encoder actors (empty: one per CPU of the cluster)", min=1)
    actor_cpus: float = param(0.5, doc="logical CPUs each encoder actor reserves (fractional so read "
                                       "tasks still get scheduled on small machines)", min=0.01)
    threads_per_actor: int = param(1, doc="Rayon threads each actor's tokenizer uses", min=1)
    plan: Literal["auto", "local", "actors"] = param(
        "auto", doc="where to encode: local (this process, all cores), actors (a Ray Data actor pool), "
                    "auto (local when the input is at most local_max_mb)")
    local_max_mb: float = param(256.0, doc="auto plan: inputs up to this many MB are tokenized locally", min=0.0)

    def inputs(self) -> dict[str, str]:
        return {**documents.lineage_inputs(self.documents), "tokenizer": self.tokenizer}


# ---------------------------------------------------------------------------------------------
# Ray Data stages (plain callables: unit-testable without Ray)
# ---------------------------------------------------------------------------------------------

def read_files(batch: dict[str, np.ndarray], root: str, batch_chars: int):
    """map_batches UDF over rows ``{"path", "unit"}``: yields each file's work units, its
    documents in record order cut at ~``batch_chars`` characters, each row tagged with its unit
    (``unit`` = the file's index, ``part``) and the unit's size (``part_rows``)."""
    for path, unit in zip(batch["path"], batch["unit"]):
        parts = documents.read_batches(str(path), root, batch_docs=1 << 30, batch_chars=batch_chars)
        for part, docs in enumerate(parts):
            rows = len(docs["id"])
            yield {**docs, "path": [str(path)] * rows, "unit": [int(unit)] * rows, "part": [part] * rows,
                   "part_rows": [rows] * rows}


class Encoder:
    """Actor UDF: work units in, their shards written to ``output``, one summary row per unit out."""

    def __init__(self, tokenizer_dir: str, val_fraction: float, output: str, shard_tokens: int,
                 encode_batch_docs: int, threads: int | None = 1) -> None:
        # Rayon sizes its pool on first use, so this holds in the fresh process an actor gets;
        # with one thread, tokenizers' parallelism is off altogether. None (in the driver): leave
        # the process's settings alone (Rayon's default is every core).
        if threads is not None:
            os.environ["RAYON_NUM_THREADS"] = str(threads)
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.tokenizer.encode_special_tokens = True
        self.dtype = shards_lib.token_dtype(self.tokenizer.get_vocab_size())
        self.val_fraction, self.output = val_fraction, output
        self.shard_tokens, self.encode_batch_docs = shard_tokens, encode_batch_docs

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = [json.dumps(self.write_unit(unit)) for unit in units_of(batch)]
        return pa.table({"summary": pa.array(summaries, pa.string())})

    def write_unit(self, table: pa.Table) -> dict:
        """Encode one work unit and write its shards; return what the manifest needs of it."""
        columns = {c: table.column(c).to_pylist() for c in ("id", "text", "source", "error", "message",
                                                             "path", "offset")}
        unit, part = table.column("unit")[0].as_py(), table.column("part")[0].as_py()
        prefix = f"{unit:06d}-{part:06d}-"
        writers = {split: shards_lib.ShardWriter(self.output, split, self.dtype, self.shard_tokens, prefix)
                   for split in shards_lib.SPLITS}
        readable = [i for i, error in enumerate(columns["error"]) if error is None and columns["text"][i]]
        try:
            for start in range(0, len(readable), self.encode_batch_docs):
                chunk = readable[start: start + self.encode_batch_docs]
                for i, tokens in zip(chunk, self.encode([columns["text"][i] for i in chunk])):
                    split = documents.split_of(columns["id"][i], self.val_fraction)
                    writers[split].add(np.frombuffer(tokens, dtype=self.dtype), columns["source"][i])
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        quarantine = [{k: columns[k][i] for k in ("path", "offset", "id", "error", "message")}
                      for i, error in enumerate(columns["error"]) if error is not None]
        return {"unit": unit, "part": part, "splits": {split: w.finish() for split, w in writers.items()},
                "quarantine": quarantine, "skipped_empty": table.num_rows - len(readable) - len(quarantine)}

    def encode(self, texts: list[str]) -> list[bytes]:
        """Token bytes (BOS first) per text. The texts are valid strings (the reader quarantined
        the rest), so an exception here is a bug and fails the stage."""
        return [np.asarray(e.ids, dtype=self.dtype).tobytes() for e in self.tokenizer.encode_batch_fast(texts)]


def units_of(batch: pa.Table) -> list[pa.Table]:
    """The work units in a block, each whole; a partial unit (Ray Data split one) is a bug."""
    units, parts, sizes = (batch.column(c).to_numpy() for c in _UNIT_COLUMNS)
    starts = np.flatnonzero(np.r_[True, (units[1:] != units[:-1]) | (parts[1:] != parts[:-1])])
    tables = []
    for start, stop in zip(starts, np.r_[starts[1:], len(units)]):
        if stop - start != sizes[start]:
            raise RuntimeError(f"work unit {units[start]}/{parts[start]} reached an encoder with {stop - start} of "
                               f"its {sizes[start]} rows: a block split it, and its shards would be incomplete")
        tables.append(batch.slice(start, stop - start))
    return tables


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def resolve_val_fraction(cfg: TokensConfig) -> float:
    if cfg.val_fraction is not None:
        return cfg.val_fraction
    try:
        return float(read_training(cfg.tokenizer)["val_fraction"])
    except (FileNotFoundError, KeyError):
        return DEFAULT_VAL_FRACTION


def encoder_args(cfg: TokensConfig, val_fraction: float, output) -> tuple:
    return cfg.tokenizer, val_fraction, str(output), cfg.shard_tokens, cfg.encode_batch_docs


def build_dataset(cfg: TokensConfig, files: list[str], root: str, val_fraction: float, output, actors: int):
    """The lazy Ray Data pipeline from document files to one summary row per work unit."""
    import ray

    ds = ray.data.from_items([{"path": str(p), "unit": i} for i, p in enumerate(files)],
                             override_num_blocks=len(files))
    ds = ds.map_batches(read_files, fn_kwargs={"root": str(root), "batch_chars": cfg.read_batch_chars},
                        batch_size=1, num_cpus=READ_CPUS)
    return ds.map_batches(
        Encoder, fn_constructor_args=(*encoder_args(cfg, val_fraction, output), cfg.threads_per_actor),
        batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.actor_cpus)


def local_summaries(cfg: TokensConfig, files: list[str], root: str, val_fraction: float, output) -> Iterator[dict]:
    """The actor plan's work, in this process: same reader, same units, same :class:`Encoder`
    (tokenizer threads on every core), the next unit read while one is encoded."""
    encoder = Encoder(*encoder_args(cfg, val_fraction, output), threads=None)
    for unit in read_ahead(_units(files, root, cfg)):
        yield encoder.write_unit(unit)


def _units(files: list[str], root: str, cfg: TokensConfig) -> Iterator[pa.Table]:
    for index, file in enumerate(files):
        for unit in read_files({"path": [str(file)], "unit": [index]}, str(root), cfg.read_batch_chars):
            yield pa.table(unit)


def choose_plan(cfg: TokensConfig, input_bytes: int) -> str:
    if cfg.plan != "auto":
        return cfg.plan
    return "local" if input_bytes <= cfg.local_max_mb * 1e6 else "actors"


def default_actors(cfg: TokensConfig) -> int:
    import ray

    return cfg.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))


def merge_summaries(summaries: Iterator[dict], output) -> dict:
    """The manifest's counts from the units' summaries (in unit order), and ``quarantine.jsonl``."""
    ordered = sorted(summaries, key=lambda s: (s["unit"], s["part"]))
    quarantine = [q for s in ordered for q in s["quarantine"]]
    storage.write_text(runs.at(output, shards_lib.QUARANTINE), "".join(json.dumps(q) + "\n" for q in quarantine))
    return {"splits": {split: shards_lib.merge_splits([s["splits"][split] for s in ordered])
                       for split in shards_lib.SPLITS},
            "quarantined": len(quarantine), "skipped_empty": sum(s["skipped_empty"] for s in ordered)}


def run_tokens(cfg: TokensConfig, ctx) -> dict:
    """Tokenize ``cfg.documents`` into ``ctx.output``; return a summary of tokens per split."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer_file = storage.join(cfg.tokenizer, TOKENIZER_FILE)
    vocab_size = tokenizer.get_vocab_size()
    dtype = shards_lib.token_dtype(vocab_size)
    val_fraction = resolve_val_fraction(cfg)
    files = documents.list_files(cfg.documents)
    root = documents.input_root(cfg.documents)
    input_bytes = sum(map(storage.size, files))
    plan = choose_plan(cfg, input_bytes)
    started = time.perf_counter()
    if plan == "local":
        ctx.logger.info("tokenizing %d files (%.1f MB) in this process", len(files), input_bytes / 1e6)
        summaries = local_summaries(cfg, files, root, val_fraction, ctx.output)
    else:
        summaries = _summaries_from_actors(cfg, ctx, files, root, val_fraction)
    counts = merge_summaries(summaries, ctx.output)
    seconds = time.perf_counter() - started
    manifest = {
        "format": shards_lib.FORMAT, "dtype": dtype.name, "byte_order": "little", "vocab_size": vocab_size,
        "bos_id": tokenizer.token_to_id(chat.BOS), "eos_id": tokenizer.token_to_id(chat.EOS),
        "pad_id": tokenizer.token_to_id(chat.PAD),
        "tokenizer": {"path": tokenizer_file, "sha256": storage.sha256_file(tokenizer_file)},
        "documents": cfg.documents, "val_fraction": val_fraction,
        "split_rule": "val when int(sha256(id)[:8 bytes]) / 2**64 < val_fraction, else train",
        "order": "input files sorted by path, records in file order, cut into work units of ~read_batch_chars "
                 "characters; shards per unit, cut at shard_tokens",
        **counts, "source_mixture": shards_lib.source_mixture(counts["splits"]),
    }
    ctx.logger.info("tokenized with the %s plan in %.1f s", plan, seconds)
    storage.write_json(runs.at(ctx.output, shards_lib.MANIFEST), manifest)
    tokens = {split: entry["tokens"] for split, entry in counts["splits"].items()}
    ctx.log_metrics(seconds=seconds, tokens=sum(tokens.values()),
                    tokens_per_s=sum(tokens.values()) / max(seconds, 1e-9))
    return {"tokens": tokens, "documents": {s: e["documents"] for s, e in counts["splits"].items()},
            "shards": {s: len(e["shards"]) for s, e in counts["splits"].items()},
            "quarantined": counts["quarantined"], "skipped_empty": counts["skipped_empty"], "plan": plan,
            "seconds": round(seconds, 3), "tokens_per_s": round(sum(tokens.values()) / max(seconds, 1e-9))}


def _summaries_from_actors(cfg: TokensConfig, ctx, files: list[str], root: str, val_fraction: float) -> Iterator[dict]:
    ctx.connect_ray()
    actors = default_actors(cfg)
    ctx.logger.info("tokenizing %d files with %d actors (%s CPU each, %d threads)", len(files), actors,
                    cfg.actor_cpus, cfg.threads_per_actor)
    dataset = build_dataset(cfg, files, root, val_fraction, ctx.output, actors)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from map(json.loads, batch.column("summary").to_pylist())
