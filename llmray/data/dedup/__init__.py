"""Deduplication and decontamination of a Ray Dataset of documents: the orchestration.

``deduplicate(documents, cfg)`` returns the kept documents, the rejected ones (``value`` of a
duplicate is the id kept instead), the edits made to kept documents (:class:`KeptEdits`) and
funnel statistics. Stages, in the order they claim a document: **boilerplate** lines
(``boilerplate.py``), **exact_dedup** (xxh3-128 of normalized text), **near_dedup** (MinHash LSH
candidates in ``minhash.py``, verified by exact shingle Jaccard, clustered by ``components.py``),
**decontamination** (``decontam.py``: drop, or keep with ``meta.contamination``).

Design choices:

* One pass makes a small key row per document; everything after is hash-partitioned shuffles of
  key rows and edges between Ray tasks (``shuffle.py``, per-partition steps in ``partition.py``),
  so the driver holds only references and counters, and a last pass filters the documents.
* The passes over documents are plain Ray tasks over slices of ``block_rows`` consecutive rows
  (spanning small blocks, :func:`row_slices`), not Ray Data ``map_batches``: Ray Data 2.60
  starts each execution with zero resources until its autoscaling coordinator grants a
  reservation, so a short pass ran one task at a time (8 tasks of 65 ms: 0.70 s against 0.29 s
  as tasks, on 2 CPUs).
* **Plans** (``plan: auto``): when the key rows are at most ``local_max_mb``, everything after the
  key pass runs in one task on one partition (``LocalShuffler``), which skips ~15 rounds of
  shuffle tasks; larger inputs shuffle across the cluster. Both give the same documents, rejected
  rows and statistics (tested). On 2 CPUs the one-task plan was faster up to ~20k documents of
  ~300 words (68 MB of key rows: 2.5 s against 2.9 s) and slower at 50k (171 MB: 5.7 s against
  5.1 s), hence the default of 96 MiB.
* Node ids are xxh3-64 hashes of document ids, so clusters do not depend on block layout or
  partition count (deterministic), at a ~n²/2^65 collision risk (3e-8 for a million documents).
* The driver blocks only where it needs a count; each such wait names its phase in a progress
  line (tasks done, rate, ETA: :mod:`llmray.progress`) when it lasts, so a long shuffle is seen
  to move.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from llmray import progress
from llmray.config import param
from llmray.data.dedup import boilerplate as boilerplate_lib
from llmray.data.dedup import partition
from llmray.data.dedup.components import connected_components
from llmray.data.dedup.decontam import EvalIndex
from llmray.data.dedup.minhash import MinHasher, distinct_rows, sorted_distinct
from llmray.data.dedup.shuffle import (LocalShuffler, RayShuffler, column, concat, fetch_broadcast, log,
                                       route_to_slices)

# ``position``: the document's row number in the input (its order among all rows).
REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("stage", pa.string()),
                             ("reason", pa.string()), ("value", pa.string()), ("position", pa.int64())])
# Which rows of a batch dedup considers (one bool per row); see ``deduplicate(consider=...)``.
Consider = Callable[[pa.Table], "list[bool] | np.ndarray"]
STAGES = ("boilerplate", "exact_dedup", "near_dedup", "decontamination")

DEFAULT_EVAL_TASKS = {
    "arc": ["arc/ARC-Easy-Dev.jsonl", "arc/ARC-Challenge-Dev.jsonl"],
    "boolq": ["boolq/boolq.jsonl"],
    "piqa": ["piqa/valid.jsonl"],
    "commonsense_qa": ["commonsense_qa/commonsense_qa.jsonl"],
    "copa": ["copa/copa.jsonl"],
    "openbookqa": ["openbookqa/test.jsonl"],
    "winogrande": ["winogrande/winogrande.jsonl"],
    "lambada": ["lambada/lambada_test.jsonl"],
    "gsm8k": ["gsm8k/test.jsonl"],
    "humaneval": ["humaneval/HumanEval.jsonl.gz"],
    "mbpp": ["mbpp/mbpp.jsonl"],
}


@dataclass
class MinHashConfig:
    """MinHash LSH near-duplicate detection (defaults: FineWeb's 14 bands x 8 rows, word 5-grams).

    A band match alone is a loose test: with 14x8 the probability of becoming candidates is 0.21
    at Jaccard 0.6, 0.57 at 0.7, 0.92 at 0.8 and 0.99 at 0.85, and connected components then chain
    such false edges into clusters of distinct documents (pairwise precision 0.43 on
    bench/dedup_quality.py). So by default (``verify``) every candidate edge is checked by the
    exact Jaccard of the two documents' shingle sets (shingle hashes compared on 40 bits:
    ``minhash.row_jaccard``) and kept only at ``threshold`` or above (precision 1.0, F1 0.99
    there); the shingles of documents in candidate edges go through two
    more shuffles, and the key rows carry every document's shingles (about the size of the text).
    ``verify: false`` is FineWeb's setting: faster, more aggressive."""

    enabled: bool = param(True, doc="remove near-duplicates with MinHash LSH")
    ngram: int = param(5, doc="words per shingle", min=1, max=64)
    num_perm: int = param(112, doc="MinHash permutations (signature length)", min=1, max=1024)
    bands: int = param(14, doc="LSH bands; documents sharing any band become candidates", min=1)
    rows: int = param(8, doc="signature values per band (bands*rows <= num_perm)", min=1)
    verify: bool = param(True, doc="keep only candidate edges whose exact shingle Jaccard is >= threshold")
    threshold: float = param(0.8, doc="Jaccard a verified edge needs (used when verify is on)", min=0.0, max=1.0)

    def __post_init__(self) -> None:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"minhash.bands * minhash.rows = {self.bands * self.rows} exceeds "
                             f"minhash.num_perm = {self.num_perm}")


@dataclass
class BoilerplateConfig:
    """Removal of lines that repeat across many documents (cookie banners, menus, footers)."""

    enabled: bool = param(False, doc="remove lines repeated in more than max_documents documents")
    max_documents: int = param(100, doc="a line found in more documents than this is boilerplate", min=1)
    min_chars: int = param(20, doc="lines shorter than this (after whitespace collapse) are never "
                                   "counted or removed", min=1)
    min_words: int = param(1, doc="a document that loses lines and is left with fewer words than this is "
                                  "rejected (1: only emptied ones, reason empty_after_boilerplate; more: "
                                  "too_short_after_boilerplate)", min=1)

    def reject_reason(self) -> str:
        return "empty_after_boilerplate" if self.min_words <= 1 else "too_short_after_boilerplate"


@dataclass
class DecontamConfig:
    """Drop or flag training documents that share an n-gram with an evaluation item."""

    enabled: bool = param(True, doc="check documents against the evaluation tasks")
    ngram: int = param(13, doc="words per n-gram (GPT-3 used 13)", min=5, max=64)
    min_words: int = param(8, doc="evaluation texts shorter than ngram words but at least this long "
                                  "are matched whole; shorter ones are skipped", min=3, max=64)
    action: Literal["drop", "flag"] = param("drop", doc="drop contaminated documents, or keep them "
                                                        "with meta.contamination listing the tasks")
    data_dir: str = param("../shared/data", doc="directory relative task paths are resolved against")
    tasks: dict[str, list[str]] = param(default_factory=lambda: dict(DEFAULT_EVAL_TASKS),
                                        doc="task name -> JSONL(.gz) files of its evaluation items "
                                            "(every string in a record is indexed)")

    @property
    def flags(self) -> bool:
        """Whether kept documents get ``meta.contamination`` (enabled, ``action: flag``)."""
        return self.enabled and self.action == "flag"

    def task_files(self) -> dict[str, list[Path]]:
        """Resolved task files; a missing one is an error naming the task and the path."""
        files = {}
        for task, paths in self.tasks.items():
            resolved = [p if p.is_absolute() else Path(self.data_dir) / p for p in map(Path, paths)]
            for path in resolved:
                if not path.is_file():
                    raise FileNotFoundError(f"decontam.tasks.{task}: evaluation file {path} does not "
                                            f"exist (set decontam.data_dir or the task's paths)")
            files[task] = resolved
        return files


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal, boilerplate lines, evaluation decontamination."""

    exact: bool = param(True, doc="remove exact duplicates (xxh3-128 of lower-cased, "
                                  "whitespace-collapsed text)")
    minhash: MinHashConfig = param(default_factory=MinHashConfig, doc="near-duplicate detection")
    keep: partition.KeepRule = param("first_id", doc="which duplicate survives: smallest id, "
                                                      "longest text, or highest quality_score "
                                                      "(ties: longer, then smallest id)")
    boilerplate: BoilerplateConfig = param(default_factory=BoilerplateConfig, doc="boilerplate lines")
    decontam: DecontamConfig = param(default_factory=DecontamConfig, doc="evaluation decontamination")
    seed: int = param(1, doc="seed of every hash function (same seed, same result)", min=0)
    num_partitions: int = param(0, doc="hash partitions of every shuffle; 0: one per CPU of the cluster, "
                                       "more when the key rows would give a reducer over 128 MiB (each "
                                       "reducer holds one partition)", min=0, max=4096)
    batch_size: int = param(512, doc="documents per batch in the key and filter passes", min=1)
    plan: Literal["auto", "local", "distributed"] = param(
        "auto", doc="where the steps after the key pass run: local (one task, one partition: no shuffle "
                    "start-up, which dominates small inputs), distributed (hash-partitioned shuffles "
                    "across the cluster), or auto (local when the key rows are at most local_max_mb)")
    local_max_mb: float = param(96.0, doc="auto plan: key rows up to this many MiB (about the text's size "
                                          "with minhash.verify) are deduplicated in one task", min=0.0)
    block_rows: int = param(8192, doc="documents per slice (one task of each pass, one piece of each shuffle): "
                                      "small input blocks are joined, large ones split, and slices are cut "
                                      "smaller when there would be under two per CPU",
                            min=1)

    def inputs(self) -> dict[str, str]:
        """Evaluation files, for the lineage fingerprint of the stage that runs dedup."""
        if not self.decontam.enabled:
            return {}
        return {f"decontam.{task}.{i}": str(path) for task, paths in self.decontam.task_files().items()
                for i, path in enumerate(paths)}


@dataclass(frozen=True)
class KeptEdits:
    """What dedup changes in the documents it keeps: boilerplate lines leave ``text`` and, with
    ``decontam.action: flag``, ``meta.contamination`` lists the tasks a document overlaps.

    Dedup's own output pass applies it, and so does curate, which marks its rows in place instead
    of taking dedup's output, so both write the same texts and flags. The arrays travel as object
    refs (fetched once per worker, see ``shuffle.fetch_broadcast``) or, without Ray, as values."""

    boilerplate_ref: Any = None  # sorted uint64 hashes of boilerplate lines; None: none removed
    min_chars: int = 0
    flags_ref: Any = None  # (sorted node ids, task bitmasks) of the documents to flag; None: none
    task_names: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.boilerplate_ref is not None or self.flags_ref is not None

    def apply(self, batch: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """``batch`` (``id``, ``text``, optionally ``meta``) edited, and per row the lines removed
        and whether it was flagged."""
        lines_removed, flagged = np.zeros(batch.num_rows, np.int64), np.zeros(batch.num_rows, bool)
        if self.boilerplate_ref is not None:
            texts, lines_removed = boilerplate_lib.remove_from_texts(
                batch.column("text").to_pylist(), fetch_broadcast(self.boilerplate_ref), self.min_chars)
            batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
        if self.flags_ref is not None:
            batch, flagged = _flag_contaminated(batch, fetch_broadcast(self.flags_ref), self.task_names)
        return batch, lines_removed, flagged


@dataclass
class DedupResult:
    rejected: Any  # ray.data.Dataset with REJECTED_SCHEMA
    stats: dict = field(default_factory=dict)
    edits: KeptEdits = field(default_factory=KeptEdits)  # applied to ``documents``
    kept: Callable[[], Any] = lambda: None  # builds ``documents``
    slices: list[RowSlice] = field(default_factory=list)  # the input, in order
    drops: list = field(default_factory=list)  # per slice: its rejected rows (REJECTED_SCHEMA, by position)

    @functools.cached_property
    def documents(self) -> Any:
        """The kept documents, edited (a ray.data.Dataset, same schema and order as the input).
        Its filter tasks start on first access only: curate marks rows from ``slices``, ``drops``
        and ``edits`` instead, and must not pay for a copy of every kept document."""
        return self.kept()


# ---------------------------------------------------------------------------------------------
# Passes over the documents (Ray tasks over row ranges of the input's blocks)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSlice:
    """Consecutive rows of the input, the first of them row ``position`` of the whole input: the
    unit of work of every document pass. ``pieces`` are ``(block ref, start, stop)`` row ranges
    of consecutive blocks, so a slice can span many small blocks (curate's are 1,024 rows)."""

    pieces: tuple[tuple[Any, int, int], ...]
    position: int

    def table(self) -> pa.Table:
        """The slice's rows, fetched inside the task that reads them (a ref nested in an
        argument is not resolved by Ray; ``ray.get`` maps the blocks from the object store)."""
        import ray
        from ray.data.block import BlockAccessor

        blocks = ray.get([ref for ref, _, _ in self.pieces])
        return pa.concat_tables([BlockAccessor.for_block(block).to_arrow().slice(start, stop - start)
                                 for block, (_, start, stop) in zip(blocks, self.pieces)],
                                promote_options="default")


def row_slices(documents: Any, block_rows: int, cpus: int) -> list[RowSlice]:
    """Slices covering ``documents`` in order, executing it if it is lazy (its blocks stay in the
    object store, as dedup reads them twice). Every slice but the last holds the same number of
    rows whatever the blocks: ``block_rows``, or fewer when that would give under two slices per
    CPU, so a few large blocks still use every core.

    Why slices span blocks: each slice is a task of every pass and a piece of every shuffle, so
    one slice per small block made thousands of tiny shuffle pieces, which Ray keeps in the
    driver (the owner) and copies into every reducer's task spec (measured: ~230 MB of the
    driver's 560 MB peak on 200 MB of input in 256-row blocks)."""
    blocks = [(entry.ref, entry.metadata.num_rows) for bundle in documents.iter_internal_ref_bundles()
              for entry in bundle.blocks]
    total = sum(rows for _, rows in blocks)
    rows_per_slice = max(1, min(block_rows, -(-total // (2 * cpus))))
    slices: list[RowSlice] = []
    pieces: list[tuple[Any, int, int]] = []
    filled = 0
    for ref, rows in blocks:
        start = 0
        while start < rows:
            stop = min(rows, start + rows_per_slice - filled)
            pieces.append((ref, start, stop))
            filled += stop - start
            start = stop
            if filled == rows_per_slice:
                slices.append(RowSlice(tuple(pieces), len(slices) * rows_per_slice))
                pieces, filled = [], 0
    if pieces:
        slices.append(RowSlice(tuple(pieces), len(slices) * rows_per_slice))
    return slices


def _slice_task(fn: Callable[..., pa.Table], batch_size: int, consider: Consider | None, row_slice: RowSlice,
                *args: Any) -> pa.Table:
    """``fn(batch, positions, *args)`` over the slice's batches of considered rows (``positions``:
    their row numbers in the input), concatenated: one output table per slice."""
    table = row_slice.table()
    outputs = []
    for offset in range(0, table.num_rows, batch_size):
        batch = table.slice(offset, batch_size)
        positions = np.arange(batch.num_rows, dtype=np.int64) + row_slice.position + offset
        if consider is not None:
            mask = np.asarray(consider(batch), dtype=bool)
            batch, positions = batch.filter(pa.array(mask)), positions[mask]
        outputs.append(fn(batch, positions, *args))
    return concat(outputs)


def node_ids(ids: list[str]) -> np.ndarray:
    return np.fromiter((xxhash.xxh3_64_intdigest(i.encode("utf-8")) for i in ids), dtype=np.uint64,
                       count=len(ids))


def text_hash(text: str) -> tuple[int, int]:
    digest = xxhash.xxh3_128_intdigest(" ".join(text.lower().split()).encode("utf-8"))
    return digest >> 64, digest & 0xFFFFFFFFFFFFFFFF


def _clean_texts(batch: pa.Table, cfg: DedupConfig, boilerplate_ref: Any) -> tuple[list[str], np.ndarray]:
    texts = batch.column("text").to_pylist()
    if not cfg.boilerplate.enabled:
        return texts, np.zeros(len(texts), dtype=np.int64)
    return boilerplate_lib.remove_from_texts(texts, fetch_broadcast(boilerplate_ref), cfg.boilerplate.min_chars)


def _line_counts_batch(batch: pa.Table, positions: np.ndarray, min_chars: int) -> pa.Table:
    hashes, counts = boilerplate_lib.document_line_hashes(batch.column("text").to_pylist(), min_chars)
    return pa.table({"line": hashes, "count": counts})


def _keys_batch(batch: pa.Table, positions: np.ndarray, cfg: DedupConfig, broadcasts: tuple[Any, Any]) -> pa.Table:
    boilerplate_ref, index_ref = broadcasts
    texts, lines_removed = _clean_texts(batch, cfg, boilerplate_ref)
    ids = batch.column("id").to_pylist()
    n = len(texts)
    mh = cfg.minhash
    hasher = MinHasher(ngram=mh.ngram, num_perm=mh.num_perm, bands=mh.bands, rows=mh.rows, seed=cfg.seed)
    words = hasher.word_hashes(texts) if (mh.enabled or cfg.decontam.enabled) else None
    shingles = hasher.shingle_hashes(*words) if mh.enabled else None
    if shingles is not None:
        bands, has_shingles = hasher.shingle_band_keys(*shingles)
    else:
        bands, has_shingles = np.zeros((n, 0), dtype=np.uint64), np.zeros(n, dtype=bool)
    contaminated = fetch_broadcast(index_ref).match(*words) if cfg.decontam.enabled else np.zeros(n, np.uint64)
    exact = np.array([text_hash(t) for t in texts] if cfg.exact else np.zeros((n, 2)), dtype=np.uint64).reshape(n, 2)
    original_bytes = pc.binary_length(pc.cast(batch.column("text"), pa.binary())).to_numpy(zero_copy_only=False)
    clean_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=n)
    quality = (batch.column("quality_score").cast(pa.float64()) if "quality_score" in batch.column_names
               else pa.nulls(n, pa.float64()))
    verify_columns = {"shingles": pa.LargeListArray.from_arrays(shingles[1], shingles[0])} \
        if mh.enabled and mh.verify else {}
    return pa.table({
        "node": node_ids(ids), "id": ids, "source": batch.column("source").cast(pa.string()),
        "chars": np.fromiter(map(len, texts), dtype=np.int64, count=n), "bytes": original_bytes.astype(np.int64),
        "boilerplate_bytes": original_bytes.astype(np.int64) - clean_bytes, "lines_removed": lines_removed,
        "quality": quality, "exact_hi": exact[:, 0], "exact_lo": exact[:, 1],
        "bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.reshape(-1), pa.uint64()), bands.shape[1])
        if bands.shape[1] else pa.nulls(n, pa.list_(pa.uint64())),
        "has_shingles": has_shingles, "contaminated": contaminated,
        "too_short": boilerplate_lib.too_short(texts, lines_removed, cfg.boilerplate.min_words),
        "position": positions, **verify_columns,
    })


def _kept_batch(batch: pa.Table, positions: np.ndarray, drops: pa.Table, edits: KeptEdits) -> pa.Table:
    dropped = partition.contains(column(drops, "position"), positions)
    return edits.apply(batch.filter(pa.array(~dropped)))[0]


def _flag_contaminated(batch: pa.Table, flags: tuple[np.ndarray, np.ndarray],
                       task_names: tuple[str, ...]) -> tuple[pa.Table, np.ndarray]:
    """Set ``meta.contamination`` (the task names) on the flagged rows; return the rows flagged."""
    flagged_nodes, masks = flags
    nodes = node_ids(batch.column("id").to_pylist())
    hit = partition.contains(flagged_nodes, nodes)
    if not hit.any():
        return batch, hit
    meta = batch.column("meta").to_pylist() if "meta" in batch.column_names else [None] * batch.num_rows
    for i in np.flatnonzero(hit):
        mask = int(masks[np.searchsorted(flagged_nodes, nodes[i])])
        record = json.loads(meta[i]) if meta[i] else {}
        record["contamination"] = [t for bit, t in enumerate(task_names) if mask >> bit & 1]
        meta[i] = json.dumps(record, sort_keys=True, ensure_ascii=False)
    column_ = pa.array(meta, pa.string())
    if "meta" in batch.column_names:
        return batch.set_column(batch.schema.get_field_index("meta"), "meta", column_), hit
    return batch.append_column("meta", column_), hit


# ---------------------------------------------------------------------------------------------
# Shuffle-side helpers (run inside Ray tasks)
# ---------------------------------------------------------------------------------------------

# The map sides below select their columns before filtering rows: a filter copies every column
# it is given, and the key rows carry every document's shingles.

def _exact_rows(keys: pa.Table) -> pa.Table:
    return keys.select(partition.INFO_COLUMNS + ["exact_hi", "exact_lo"]).filter(pc.invert(keys["too_short"]))


def _band_rows(keys: pa.Table) -> pa.Table:
    keys = keys.select(["node", "bands"]).filter(pc.and_(keys["has_shingles"], pc.invert(keys["too_short"])))
    bands = keys["bands"].combine_chunks()
    width = bands.type.list_size if keys.num_rows else 0
    return pa.table({"band_key": bands.flatten() if keys.num_rows else pa.array([], pa.uint64()),
                     "node": np.repeat(column(keys, "node"), width)})


@dataclass(frozen=True)
class _candidate_shingles:
    """Map side of the shingle shuffle: ``(node, shingles)`` of the documents in any candidate
    edge (``candidates_ref``: their sorted node ids), so only those documents' shingles move;
    each document's shingles sorted and distinct once here, not once per edge."""

    candidates_ref: Any

    def __call__(self, keys: pa.Table) -> pa.Table:
        wanted = partition.contains(fetch_broadcast(self.candidates_ref), column(keys, "node"))
        rows = keys.select(["node", "shingles"]).filter(pa.array(wanted))
        offsets, values = distinct_rows(*partition.ragged(rows.column("shingles").combine_chunks()))
        return pa.table({"node": rows["node"], "shingles": pa.LargeListArray.from_arrays(offsets, values)})


def _info_rows(keys: pa.Table) -> pa.Table:
    return keys.select(partition.INFO_COLUMNS)


def _edge_nodes(*edges: pa.Table) -> np.ndarray:
    ends = [column(e, end) for e in edges for end in ("src", "dst")]
    return sorted_distinct(np.concatenate(ends)) if ends else np.zeros(0, np.uint64)


def _sorted_nodes(*tables: pa.Table) -> np.ndarray:
    nodes = [column(t, "node") for t in tables if t.num_rows]
    return sorted_distinct(np.concatenate(nodes)) if nodes else np.zeros(0, np.uint64)


def _removed_summary(table: pa.Table) -> tuple[int, int]:
    return table.num_rows, int(pc.sum(table["bytes"]).as_py() or 0)


def _to_rejected(table: pa.Table, stage: str, reason: str) -> pa.Table:
    return pa.table({"id": table["id"], "source": table["source"], "stage": [stage] * table.num_rows,
                     "reason": [reason] * table.num_rows, "value": table["kept_id"],
                     "position": table["position"]}, schema=REJECTED_SCHEMA)


def _keys_summary(keys: pa.Table) -> dict:
    contaminated = column(keys, "contaminated")
    return {"documents": keys.num_rows, "bytes": int(pc.sum(keys["bytes"]).as_py() or 0), "key_bytes": keys.nbytes,
            "too_short": int(pc.sum(pc.cast(keys["too_short"], pa.int64())).as_py() or 0),
            "too_short_bytes": int(pc.sum(pc.if_else(keys["too_short"], keys["bytes"], 0)).as_py() or 0),
            "boilerplate_bytes": int(pc.sum(pc.if_else(keys["too_short"], 0, keys["boilerplate_bytes"])).as_py()
                                     or 0),
            "lines_removed": int(pc.sum(keys["lines_removed"]).as_py() or 0),
            "task_hits": [int(((contaminated >> np.uint64(b)) & np.uint64(1)).sum()) for b in range(64)]}


def _contaminated_rows(keys: pa.Table, duplicates_removed: np.ndarray, task_names: list[str]) -> pa.Table:
    """Documents that survive dedup and overlap an evaluation task: id, source, tasks, bytes."""
    contaminated = column(keys, "contaminated")
    mask = (contaminated != 0) & ~column(keys, "too_short") & ~partition.contains(duplicates_removed,
                                                                                  column(keys, "node"))
    rows = keys.filter(pa.array(mask))
    tasks = [",".join(t for bit, t in enumerate(task_names) if int(m) >> bit & 1)
             for m in column(rows, "contaminated")]
    return pa.table({"node": rows["node"], "id": rows["id"], "source": rows["source"], "bytes": rows["bytes"],
                     "mask": rows["contaminated"], "kept_id": pa.array(tasks, pa.string()),
                     "position": rows["position"]})


def _too_short_rows(keys: pa.Table) -> pa.Table:
    rows = keys.filter(keys["too_short"])
    return pa.table({"node": rows["node"], "id": rows["id"], "source": rows["source"], "bytes": rows["bytes"],
                     "kept_id": pa.array([""] * rows.num_rows, pa.string()), "position": rows["position"]})


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def deduplicate(documents: Any, cfg: DedupConfig, consider: Consider | None = None) -> DedupResult:
    """Run boilerplate removal, exact and near dedup and decontamination on a Ray Dataset of
    documents (``id``, ``text``, ``source``, optionally ``quality_score`` and ``meta``).

    ``consider`` (a picklable function of a batch, one bool per row) limits dedup to the rows it
    selects; the others take no part, and the caller applies ``drops`` to ``slices`` itself
    (curate passes its rows with the already-rejected ones, so that positions are its own)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    shuffler = RayShuffler(cpus)
    parts = cfg.num_partitions or _auto_partitions(cpus, 0)
    slices = row_slices(documents, cfg.block_rows, cpus)

    def each_slice(fn: Callable[..., pa.Table], *args: Any) -> list:
        # A ref passed as an argument is resolved anew for each task; broadcasts go inside a tuple
        # so that fetch_broadcast fetches them once per worker.
        return [shuffler.run(_slice_task, fn, cfg.batch_size, consider, s, *args) for s in slices]

    boilerplate_ref, lines_flagged = None, 0
    if cfg.boilerplate.enabled:
        counts = each_slice(_line_counts_batch, cfg.boilerplate.min_chars)
        frequent = shuffler.shuffle(counts, "line", parts, _frequent_lines(cfg.boilerplate.max_documents)) \
            if counts else []
        progress.wait(frequent, "dedup: boilerplate line counts", logger=log)
        boilerplate_ref = shuffler.run(_concat_sorted, *frequent)
        lines_flagged = int(ray.get(shuffler.run(len, boilerplate_ref)))

    index = EvalIndex.build(cfg.decontam.task_files(), cfg.decontam.ngram, cfg.decontam.min_words,
                                cfg.seed) if cfg.decontam.enabled else None
    index_ref = ray.put(index) if index is not None else None
    keys = each_slice(_keys_batch, cfg, (boilerplate_ref, index_ref))
    if not keys:
        empty = ray.data.from_arrow(REJECTED_SCHEMA.empty_table())
        return DedupResult(empty, {"input": {"documents": 0, "bytes": 0}}, kept=lambda: documents)
    progress.wait(keys, "dedup: document keys", logger=log)
    summaries = ray.get([shuffler.run(_keys_summary, k) for k in keys])
    key_bytes = sum(summary["key_bytes"] for summary in summaries)
    plan = choose_plan(cfg, key_bytes)
    if plan == "local":
        found_ref, flags_ref, rejected_ref = shuffler.run(
            _dedup_keys_in_one_task, cfg, index_ref, summaries, lines_flagged, *keys, num_returns=3)
        found, rejected_parts = ray.get(found_ref), [rejected_ref]
    else:
        parts = cfg.num_partitions or _auto_partitions(cpus, key_bytes)
        found, flags_ref, rejected_parts = _dedup_keys(shuffler, keys, summaries, lines_flagged, cfg, parts, index)
    # Without flag mode there are no flags (the local plan's task returned a ref to None).
    flags_ref = flags_ref if cfg.decontam.flags else None
    edits = KeptEdits(boilerplate_ref, cfg.boilerplate.min_chars, flags_ref, tuple(index.tasks if index else ()))
    drops = route_to_slices(shuffler, rejected_parts, "position", [s.position for s in slices], parts)

    def kept() -> Any:
        if consider is not None:
            raise ValueError("deduplicate(consider=...) leaves the documents to the caller: apply "
                             "result.drops to result.slices")
        return ray.data.from_arrow_refs([shuffler.run(_slice_task, _kept_batch, cfg.batch_size, None, s, d, edits)
                                         for s, d in zip(slices, drops)])

    return DedupResult(ray.data.from_arrow_refs(rejected_parts), {"plan": plan, **found}, edits, kept, slices, drops)


def choose_plan(cfg: DedupConfig, key_bytes: int) -> str:
    """``local`` (every step after the key pass in one task) when the key rows are at most
    ``local_max_mb``, else ``distributed``; an explicit ``plan`` wins."""
    if cfg.plan != "auto":
        return cfg.plan
    return "local" if key_bytes <= cfg.local_max_mb * 2**20 else "distributed"


def _dedup_keys_in_one_task(cfg: DedupConfig, index: EvalIndex | None, summaries: list[dict], lines_flagged: int,
                            *keys: pa.Table) -> tuple[dict, Any, pa.Table]:
    """The local plan: :func:`_dedup_keys` over all key rows in this process, one partition."""
    found, flags, rejected = _dedup_keys(LocalShuffler(), keys, summaries, lines_flagged, cfg, 1, index)
    return found, flags, pa.concat_tables([REJECTED_SCHEMA.empty_table(), *rejected])


def _dedup_keys(shuffler: LocalShuffler | RayShuffler, keys: list, summaries: list[dict], lines_flagged: int,
                cfg: DedupConfig, parts: int, index: EvalIndex | None) -> tuple[dict, Any, list]:
    """Everything decided from the key rows, with ``shuffler`` (values in process, refs on Ray):
    returns the statistics, the decontamination flags (or None) and the rejected rows' tables
    (every removed document once)."""
    stats: dict[str, Any] = {"partitions": parts}
    stats["input"] = {"documents": sum(s["documents"] for s in summaries), "bytes": sum(s["bytes"] for s in summaries)}
    stats["boilerplate"] = {"enabled": cfg.boilerplate.enabled, "lines_flagged": lines_flagged,
                            "lines_removed": sum(s["lines_removed"] for s in summaries),
                            "documents_removed": sum(s["too_short"] for s in summaries),
                            "bytes_removed": sum(s["too_short_bytes"] + s["boilerplate_bytes"] for s in summaries)}
    rejected_parts = [shuffler.run(_to_rejected, shuffler.run(_too_short_rows, k), "boilerplate",
                                   cfg.boilerplate.reject_reason()) for k in keys]

    exact_removed: list = []
    if cfg.exact:
        results = shuffler.shuffle(keys, "exact_hi", parts, _keep_exact(cfg.keep), map_fn=_exact_rows, num_returns=2)
        exact_removed = [r for r, _ in results]
        groups = _group_sizes(shuffler, [s for _, s in results], "dedup: exact duplicates")
        stats["exact_dedup"] = _stage_stats(shuffler, exact_removed, duplicate_groups=sum(groups.values()))
        rejected_parts += [shuffler.run(_to_rejected, r, "exact_dedup", "exact_duplicate") for r in exact_removed]
    exact_set = shuffler.run(_sorted_nodes, *exact_removed)

    near_removed: list = []
    if cfg.minhash.enabled:
        near_removed, near_stats = _near_duplicates(shuffler, keys, exact_set, cfg, parts)
        stats["near_dedup"] = {**_stage_stats(shuffler, near_removed), **near_stats}
        rejected_parts += [shuffler.run(_to_rejected, r, "near_dedup", "near_duplicate") for r in near_removed]

    flags = None
    if cfg.decontam.enabled:
        duplicate_set = shuffler.run(_sorted_nodes, *exact_removed, *near_removed)
        contaminated = [shuffler.run(_contaminated_rows, k, duplicate_set, index.tasks) for k in keys]
        stats["decontamination"] = _decontam_stats(shuffler, contaminated, summaries, index, cfg.decontam)
        if cfg.decontam.action == "drop":
            rejected_parts += [shuffler.run(_to_rejected, c, "decontamination", "eval_ngram_overlap")
                               for c in contaminated]
        else:
            flags = shuffler.run(_flag_table, *contaminated)

    # Each stage removes documents no earlier stage removed, and removal is by row position now,
    # so the stages' counts add up to the rows removed.
    removed_docs = sum(stats.get(s, {}).get("documents_removed", 0) for s in STAGES)
    removed_bytes = sum(stats.get(s, {}).get("bytes_removed", 0) for s in STAGES)
    stats["output"] = {"documents": stats["input"]["documents"] - removed_docs,
                       "bytes": stats["input"]["bytes"] - removed_bytes}
    return stats, flags, rejected_parts


def _near_duplicates(shuffler: LocalShuffler | RayShuffler, keys: list, exact_set: Any, cfg: DedupConfig,
                     parts: int) -> tuple[list, dict]:
    edges = shuffler.shuffle(keys, "band_key", parts, partition.bucket_edges(chain=cfg.minhash.verify), map_fn=_band_rows,
                             side_inputs=[(exact_set,)] * parts)
    counts = {"candidate_edges": sum(shuffler.get([shuffler.run(len, e) for e in edges],
                                                  "dedup: LSH buckets (candidate edges)"))}
    if cfg.minhash.verify and counts["candidate_edges"]:
        edges = _verified_edges(shuffler, keys, edges, cfg, parts)
        counts["verified_edges"] = sum(shuffler.get([shuffler.run(len, e) for e in edges],
                                                    "dedup: verifying candidate edges"))
    num_edges = counts.get("verified_edges", counts["candidate_edges"])
    if num_edges == 0:
        return [], {**counts, "clusters": 0, "cluster_size_histogram": {}, "rounds": 0}
    roots, rounds = connected_components(edges, shuffler, parts)
    members = shuffler.shuffle(roots, "node", parts, partition.distinct_members,
                               map_fn=partition.with_roots_as_members)
    clustered = shuffler.shuffle(keys, "node", parts, partition.attach_roots, map_fn=_info_rows,
                                 side_inputs=[(m,) for m in members])
    results = shuffler.shuffle(clustered, "root", parts, _keep_cluster(cfg.keep), num_returns=2)
    histogram = _group_sizes(shuffler, [s for _, s in results], "dedup: one document per cluster")
    return [r for r, _ in results], {**counts, "clusters": sum(histogram.values()),
                                     "cluster_size_histogram": histogram, "rounds": rounds}


def _verified_edges(shuffler: LocalShuffler | RayShuffler, keys: list, edges: list, cfg: DedupConfig, parts: int) -> list:
    """Candidate edges whose documents' exact shingle Jaccard reaches ``minhash.threshold``: two
    joins with the shingle rows, partitioned by node (first on ``src``, then on ``dst``)."""
    candidates = shuffler.run(_edge_nodes, *edges)
    shingles = shuffler.shuffle(keys, "node", parts, partition.sorted_by_node,
                                map_fn=_candidate_shingles(candidates))
    with_source = shuffler.shuffle(edges, "src", parts, partition.attach_source_shingles,
                                   side_inputs=[(s,) for s in shingles])
    return shuffler.shuffle(with_source, "dst", parts, partition.similar_edges(cfg.minhash.threshold),
                            side_inputs=[(s,) for s in shingles])


PARTITION_BYTES = 128 * 2**20


def _auto_partitions(cpus: int, data_bytes: int) -> int:
    """One partition per CPU of the cluster (every core reduces), more when ``data_bytes`` would
    give a reducer more than ``PARTITION_BYTES``."""
    return max(1, cpus, -(-data_bytes // PARTITION_BYTES))


def _group_sizes(shuffler: LocalShuffler | RayShuffler, sizes: list, what: str) -> dict[int, int]:
    """How many duplicate groups have each size, summed over the partitions' group-size arrays
    (counted where they are: the driver gets one small histogram per partition, not a number
    per group)."""
    total: dict[int, int] = {}
    for histogram in shuffler.get([shuffler.run(_histogram, s) for s in sizes], what):
        for size, count in histogram.items():
            total[size] = total.get(size, 0) + count
    return dict(sorted(total.items()))


def _histogram(sizes: np.ndarray) -> dict[int, int]:
    return {int(size): int(count) for size, count in zip(*np.unique(sizes, return_counts=True))}


def _stage_stats(shuffler: LocalShuffler | RayShuffler, removed: list, **extra: Any) -> dict:
    sums = shuffler.get([shuffler.run(_removed_summary, r) for r in removed])
    return {"documents_removed": sum(n for n, _ in sums), "bytes_removed": sum(b for _, b in sums), **extra}


def _decontam_stats(shuffler: LocalShuffler | RayShuffler, contaminated: list, summaries: list[dict],
                    index: EvalIndex, cfg: DecontamConfig) -> dict:
    sums = shuffler.get([shuffler.run(_removed_summary, c) for c in contaminated])
    report = shuffler.get(shuffler.run(_contamination_report, index.tasks, *contaminated))
    for task in index.tasks:
        bit = index.tasks.index(task)
        report[task]["documents_matched_before_dedup"] = sum(s["task_hits"][bit] for s in summaries)
        report[task]["eval_texts_indexed"] = index.texts_indexed[task]
    flagged = sum(n for n, _ in sums)
    return {"action": cfg.action, "ngram": cfg.ngram, "documents_flagged": flagged,
            "documents_removed": flagged if cfg.action == "drop" else 0,
            "bytes_removed": sum(b for _, b in sums) if cfg.action == "drop" else 0, "tasks": report}


def _contamination_report(task_names: list[str], *tables: pa.Table, examples: int = 5) -> dict:
    report = {t: {"documents": 0, "example_ids": []} for t in task_names}
    for table in tables:
        for doc_id, mask in zip(table["id"].to_pylist(), column(table, "mask").tolist()):
            for bit, task in enumerate(task_names):
                if mask >> bit & 1:
                    report[task]["documents"] += 1
                    report[task]["example_ids"].append(doc_id)
    for entry in report.values():
        entry["example_ids"] = sorted(entry["example_ids"])[:examples]
    return report


def _flag_table(*tables: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    nodes = np.concatenate([column(t, "node") for t in tables] or [np.zeros(0, np.uint64)])
    masks = np.concatenate([column(t, "mask") for t in tables] or [np.zeros(0, np.uint64)])
    order = np.argsort(nodes)
    return nodes[order], masks[order]


def _concat_sorted(*arrays: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint64)


@dataclass(frozen=True)
class _frequent_lines:
    """Reducer: sorted hashes of lines counted in more than ``more_than`` documents."""

    more_than: int

    def __call__(self, table: pa.Table) -> np.ndarray:
        return boilerplate_lib.sum_counts(column(table, "line"), column(table, "count"), self.more_than)


@dataclass(frozen=True)
class _keep_exact:
    rule: str

    def __call__(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        return partition.choose_kept(table, ["exact_hi", "exact_lo"], self.rule)


@dataclass(frozen=True)
class _keep_cluster:
    rule: str

    def __call__(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        return partition.choose_kept(table, ["root"], self.rule)

