"""``llmray tokens``: tokenize documents on Ray Data into train/val token shards.

The pipeline::

    input files (sorted)  ──read_files──►  document blocks  ──Encoder actor pool──►  token rows
      one read task per file, yielding       (streaming repartition to          tokenizer loaded once per
      ~read_batch_chars batches              encode_batch_docs rows/block)      actor; encode_batch_fast
                                                                                                │
    manifest.json, train/*.bin, val/*.bin, quarantine.jsonl  ◄── driver: ShardWriter per split ◄┘

Design choices:

* **Determinism across runs and ``num_cpus``**: the input files are sorted, every file is read
  in record order, and Ray Data runs with ``preserve_order=True``, so the driver receives the
  documents in input order whatever the parallelism. Shards are then cut by token count in that
  order, so their bytes (and sha256s) depend only on the documents and the tokenizer.
* **Writing on the driver**: shards are written by one sequential writer that streams over
  ordered results (bounded memory: blocks arrive as they finish). Tokens are ~4x smaller than
  the text they come from, so the driver moves far less data than the readers, and one writer
  is what makes cutting shards by size deterministic without a global sort.
* **Actors** hold the tokenizer (loaded once each), encode with special-token matching off
  (document text never produces control tokens), and get ``BOS`` from the tokenizer's
  post-processor. Each actor's tokenizer uses ``threads_per_actor`` Rayon threads (set in the
  actor's environment before its first encode; no ``runtime_env``, so actors start in Ray's
  pre-started workers), so actors x threads ~ cores.
* **Train/val split** by a hash of the document id (:func:`llmray.data.readers.documents.split_of`):
  a document's split never changes when others are added.
* **Small inputs skip Ray** (``plan: auto``): up to ``local_max_mb`` of input is tokenized in
  this process, one ``encode_batch_fast`` call per ``encode_batch_docs`` documents on all cores
  (Rayon), through the same reader, :class:`Encoder` and shard writer, so the shards are
  byte-identical to the actor plan's (tested). Measured on 2 cores with 12 MB: each encoder actor
  spent ~4 s of CPU importing Ray Data and the stage before its first batch, and Ray Data started
  helper actors of its own, about as much CPU as encoding the whole input.
* **Bad documents are quarantined, not fatal**: unreadable records come out of the reader with
  an error; if a batch fails to encode, its documents are encoded one by one and those that
  still fail are recorded. ``quarantine.jsonl`` lists ``path``, ``offset``, ``id``, ``error``,
  ``message`` for each; empty documents are skipped and counted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
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
_ROW_COLUMNS = ("id", "source", "split", "tokens", "error", "message", "path", "offset")


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
    encode_batch_docs: int = param(256, doc="documents per block sent to an encoder actor", min=1)
    read_batch_chars: int = param(8 << 20, doc="characters per batch a read task yields", min=1024)
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
    """map_batches UDF over rows ``{"path"}``: yields the documents of each file in record order."""
    for path in batch["path"]:
        for docs in documents.read_batches(str(path), root, batch_docs=1 << 30, batch_chars=batch_chars):
            yield {**docs, "path": [str(path)] * len(docs["id"])}


class Encoder:
    """Actor UDF: documents in, one row per document out with its tokens (BOS first) as bytes."""

    def __init__(self, tokenizer_dir: str, val_fraction: float, threads: int | None = 1) -> None:
        # Rayon sizes its pool on first use, so this holds in the fresh process an actor gets;
        # with one thread, tokenizers' parallelism is off altogether. None (in the driver): leave
        # the process's settings alone (Rayon's default is every core).
        if threads is not None:
            os.environ["RAYON_NUM_THREADS"] = str(threads)
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.tokenizer.encode_special_tokens = True
        self.dtype = shards_lib.token_dtype(self.tokenizer.get_vocab_size())
        self.val_fraction = val_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {c: batch.column(c).to_pylist() for c in ("id", "text", "source", "error", "message",
                                                              "path", "offset")}
        rows = {c: [] for c in _ROW_COLUMNS}
        readable = [i for i, error in enumerate(columns["error"]) if error is None and columns["text"][i]]
        encoded = self.encode([columns["text"][i] for i in readable])
        results: dict[int, tuple] = dict(zip(readable, encoded))
        for i, doc_id in enumerate(columns["id"]):
            # An empty document keeps tokens and error None: the driver skips and counts it.
            tokens, error, message = results.get(i, (None, columns["error"][i], columns["message"][i]))
            rows["id"].append(doc_id)
            rows["source"].append(columns["source"][i])
            rows["split"].append(documents.split_of(doc_id, self.val_fraction))
            rows["tokens"].append(tokens)
            rows["error"].append(error)
            rows["message"].append(message)
            rows["path"].append(columns["path"][i])
            rows["offset"].append(columns["offset"][i])
        return pa.table({**rows, "tokens": pa.array(rows["tokens"], type=pa.binary())})

    def encode(self, texts: list[str]) -> list[tuple[bytes | None, str | None, str | None]]:
        """``(token bytes, None, None)`` per text. The texts are valid strings (the reader
        quarantined the rest), so an exception here is a bug and fails the stage."""
        encodings = self.tokenizer.encode_batch_fast(texts)
        return [(np.asarray(e.ids, dtype=self.dtype).tobytes(), None, None) for e in encodings]


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


def build_dataset(cfg: TokensConfig, files: list[str], root: str, val_fraction: float, actors: int):
    """The lazy Ray Data pipeline from document files to ordered token rows."""
    import ray

    ds = ray.data.from_items([{"path": str(p)} for p in files], override_num_blocks=len(files))
    ds = ds.map_batches(read_files, fn_kwargs={"root": str(root), "batch_chars": cfg.read_batch_chars},
                        batch_size=1, num_cpus=READ_CPUS)
    ds = ds.repartition(target_num_rows_per_block=cfg.encode_batch_docs)
    return ds.map_batches(
        Encoder, fn_constructor_args=(cfg.tokenizer, val_fraction, cfg.threads_per_actor), batch_size=None,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.actor_cpus)


def local_rows(cfg: TokensConfig, files: list[str], root: str, val_fraction: float):
    """The actor plan's ordered token rows, computed in this process: same reader, same
    :class:`Encoder`, blocks of ``encode_batch_docs`` documents, tokenizer threads on every core."""
    encoder = Encoder(cfg.tokenizer, val_fraction, threads=None)
    for table in read_ahead(_document_blocks(files, root, cfg)):
        yield encoder(table)


def _document_blocks(files: list[str], root: str, cfg: TokensConfig) -> Iterator[pa.Table]:
    for file in files:
        for batch in read_files({"path": [str(file)]}, str(root), cfg.read_batch_chars):
            table = pa.table(batch)
            for start in range(0, table.num_rows, cfg.encode_batch_docs):
                yield table.slice(start, cfg.encode_batch_docs)


def choose_plan(cfg: TokensConfig, input_bytes: int) -> str:
    if cfg.plan != "auto":
        return cfg.plan
    return "local" if input_bytes <= cfg.local_max_mb * 1e6 else "actors"


def default_actors(cfg: TokensConfig) -> int:
    import ray

    return cfg.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))


def write_shards(rows, output: Path | str, dtype: np.dtype, shard_tokens: int) -> dict:
    """Consume ordered token rows (pyarrow batches); write shards and quarantine; return counts."""
    writers = {split: shards_lib.ShardWriter(output, split, dtype, shard_tokens) for split in shards_lib.SPLITS}
    quarantine: list[dict] = []
    skipped_empty = 0
    try:
        for batch in rows:
            columns = {c: batch.column(c).to_pylist() for c in _ROW_COLUMNS}
            for i, tokens in enumerate(columns["tokens"]):
                if columns["error"][i] is not None:
                    quarantine.append({k: columns[k][i] for k in ("path", "offset", "id", "error", "message")})
                    continue
                if tokens is None:
                    skipped_empty += 1
                    continue
                writers[columns["split"][i]].add(np.frombuffer(tokens, dtype=dtype), columns["source"][i])
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    storage.write_text(runs.at(output, shards_lib.QUARANTINE), "".join(json.dumps(q) + "\n" for q in quarantine))
    return {"splits": {split: writer.finish() for split, writer in writers.items()},
            "quarantined": len(quarantine), "skipped_empty": skipped_empty}


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
        counts = write_shards(local_rows(cfg, files, root, val_fraction), ctx.output, dtype, cfg.shard_tokens)
    else:
        counts = _tokenize_on_actors(cfg, ctx, files, root, val_fraction, dtype)
    seconds = time.perf_counter() - started
    manifest = {
        "format": shards_lib.FORMAT, "dtype": dtype.name, "byte_order": "little", "vocab_size": vocab_size,
        "bos_id": tokenizer.token_to_id(chat.BOS), "eos_id": tokenizer.token_to_id(chat.EOS),
        "pad_id": tokenizer.token_to_id(chat.PAD),
        "tokenizer": {"path": tokenizer_file, "sha256": storage.sha256_file(tokenizer_file)},
        "documents": cfg.documents, "val_fraction": val_fraction,
        "split_rule": "val when int(sha256(id)[:8 bytes]) / 2**64 < val_fraction, else train",
        "order": "input files sorted by path, records in file order; shards cut at shard_tokens",
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


def _tokenize_on_actors(cfg: TokensConfig, ctx, files: list[str], root: str, val_fraction: float,
                        dtype: np.dtype) -> dict:
    import ray

    ctx.connect_ray()
    actors = default_actors(cfg)
    ctx.logger.info("tokenizing %d files with %d actors (%s CPU each, %d threads)", len(files), actors,
                    cfg.actor_cpus, cfg.threads_per_actor)
    data_context = ray.data.DataContext.get_current()
    preserve_order = data_context.execution_options.preserve_order
    data_context.execution_options.preserve_order = True
    try:
        dataset = build_dataset(cfg, files, root, val_fraction, actors)
        return write_shards(dataset.iter_batches(batch_size=None, batch_format="pyarrow"),
                            ctx.output, dtype, cfg.shard_tokens)
    finally:
        data_context.execution_options.preserve_order = preserve_order
