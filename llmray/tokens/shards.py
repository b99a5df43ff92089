"""Token shards on disk: flat little-endian token files plus one ``manifest.json``.

Layout of a tokens output directory::

    manifest.json          what a reader needs (below)
    train/<unit>-<k>.bin   the training split's shards (``unit`` names the work unit that wrote it)
    val/<unit>-<k>.bin     the validation split's shards
    quarantine.jsonl       documents that could not be tokenized (path, offset, id, error, message)

A shard is the concatenation of whole documents, each starting with BOS (documents are
delimited by BOS; no EOS is appended). Tokens are ``uint16`` when the vocabulary has at most
65,536 ids, else ``uint32``, little-endian, with no header, so ``numpy.memmap`` reads them in
place. A shard is closed once it holds at least ``shard_tokens`` tokens (documents are never
split across shards); a writer of one work unit numbers its shards ``k = 0, 1, ...`` after the
unit's name, so shard names and bytes depend on the input, not on who wrote them.

``manifest.json`` (format ``llmray-tokens/1``)::

    {"format": "llmray-tokens/1", "dtype": "uint16", "byte_order": "little",
     "vocab_size": ..., "bos_id": ..., "eos_id": ..., "pad_id": ...,
     "tokenizer": {"path": ..., "sha256": <sha256 of tokenizer.json>},
     "val_fraction": ..., "split_rule": ..., "order": ...,
     "splits": {"train": {"tokens": ..., "documents": ...,
                          "sources": {<source>: {"documents": ..., "tokens": ...}},
                          "shards": [{"path": "train/000000-000000-000000.bin", "tokens": ..., "documents": ...,
                                      "sha256": ...}, ...]},
                "val": {...}},
     "source_mixture": {<source>: {"tokens": ..., "fraction": ...}},
     "quarantined": ..., "skipped_empty": ...}

Only numpy is needed here, so anything may read shards without importing Ray or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmray import runs, storage

FORMAT = "llmray-tokens/1"
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A token shard or its manifest is missing, malformed, or does not match its checksum."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass
class ShardWriter:
    """Appends documents' tokens to ``<directory>/<split>/<prefix>NNNNNN.bin``, rolling over at ``shard_tokens``.

    Each shard is written through :func:`llmray.storage.atomic_output` (it appears at its final
    location, local or on an object store, only once complete) and hashed while it is written.
    """

    directory: Path | str
    split: str
    dtype: np.dtype
    shard_tokens: int
    prefix: str = ""  # the work unit's name, so that writers of different units never collide
    shards: list[dict] = field(default_factory=list)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    _stack: contextlib.ExitStack | None = None
    _handle: object = None
    _digest: object = None
    _tokens: int = 0
    _documents: int = 0

    def add(self, tokens: np.ndarray, source: str) -> None:
        """Append one document's tokens (already starting with BOS)."""
        if self._handle is None:
            self._open()
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._handle.write(data.data)  # no copy: the array's buffer goes to the file and the hash
        self._digest.update(data.data)
        self._tokens += len(tokens)
        self._documents += 1
        counts = self.sources.setdefault(source, {"documents": 0, "tokens": 0})
        counts["documents"] += 1
        counts["tokens"] += len(tokens)
        if self._tokens >= self.shard_tokens:
            self._close()

    def finish(self) -> dict:
        """Close the open shard; return the split's manifest entry."""
        if self._handle is not None:
            self._close()
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards),
                "sources": dict(sorted(self.sources.items())), "shards": self.shards}

    def _open(self) -> None:
        relative = f"{self.split}/{self.prefix}{len(self.shards):06d}.bin"
        self._stack = contextlib.ExitStack()
        self._handle = self._stack.enter_context(storage.atomic_output(runs.at(self.directory, relative)))
        self._digest = hashlib.sha256()
        self._tokens = self._documents = 0
        self.shards.append({"path": relative})

    def _close(self) -> None:
        self._stack.close()
        self.shards[-1].update(tokens=self._tokens, documents=self._documents, sha256=self._digest.hexdigest())
        self._stack = self._handle = self._digest = None

    def abort(self) -> None:
        """Drop a half-written shard (its temp file is removed)."""
        if self._stack is not None:
            self._stack.__exit__(ShardError, ShardError("aborted"), None)
            self._stack = self._handle = None


def merge_splits(entries: list[dict]) -> dict:
    """One split's manifest entry from the entries of its work units (``ShardWriter.finish``), in order."""
    sources: dict[str, dict[str, int]] = {}
    for entry in entries:
        for source, counts in entry["sources"].items():
            total = sources.setdefault(source, {"documents": 0, "tokens": 0})
            total["documents"] += counts["documents"]
            total["tokens"] += counts["tokens"]
    return {"tokens": sum(e["tokens"] for e in entries), "documents": sum(e["documents"] for e in entries),
            "sources": dict(sorted(sources.items())), "shards": [s for e in entries for s in e["shards"]]}


def source_mixture(splits: dict[str, dict]) -> dict[str, dict]:
    """Tokens per source over all splits, with each source's fraction of all tokens."""
    totals: dict[str, int] = {}
    for entry in splits.values():
        for source, counts in entry["sources"].items():
            totals[source] = totals.get(source, 0) + counts["tokens"]
    grand = sum(totals.values()) or 1
    return {s: {"tokens": t, "fraction": round(t / grand, 6)} for s, t in sorted(totals.items())}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_manifest(directory: str | Path) -> dict:
    """The manifest of a tokens directory, checked for format and required keys."""
    path = storage.join(directory, MANIFEST)
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ShardError(f"{path} does not exist; is {directory} the output of `llmray tokens`?") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("dtype", "vocab_size", "bos_id", "splits"):
        if key not in manifest:
            raise ShardError(f"{path}: required key {key!r} is missing")
    return manifest


def split_shards(manifest: dict, split: str, directory: str | Path) -> list[dict]:
    """The shard entries of ``split``; a clear error when the split is absent or empty."""
    entry = manifest["splits"].get(split)
    if not entry or not entry.get("shards"):
        available = [s for s, e in manifest["splits"].items() if e.get("shards")]
        raise ShardError(f"{storage.join(directory, MANIFEST)}: split {split!r} has no shards; splits with "
                         f"shards: {available}")
    return entry["shards"]


def check_shard(directory: str | Path, shard: dict, dtype: np.dtype, verify_sha256: bool = True) -> Path:
    """The local path of a shard (on an object store: this node's cached copy, see
    :func:`llmray.storage.local_copy`), refused when its size or (when asked) sha256 differs from
    its manifest entry."""
    location = storage.join(directory, shard["path"])
    if not storage.is_file(location):
        raise ShardError(f"shard {location} listed in the manifest does not exist")
    expected_bytes, size = shard["tokens"] * dtype.itemsize, storage.size(location)
    if size != expected_bytes:
        raise ShardError(f"shard {location} has {size} bytes; the manifest says "
                         f"{shard['tokens']} {dtype.name} tokens = {expected_bytes} bytes")
    path = storage.local_copy(location)
    if verify_sha256:
        actual = runs.sha256_file(path)
        if actual != shard["sha256"]:
            raise ShardError(f"shard {path} is corrupt: sha256 {actual} does not match the manifest's "
                             f"{shard['sha256']}; re-run `llmray tokens --force` to rebuild it")
    return path


def open_shard(path: Path, dtype: np.dtype) -> np.memmap:
    """A read-only memory map of a shard (nothing is read until it is indexed)."""
    return np.memmap(path, dtype=dtype, mode="r")
