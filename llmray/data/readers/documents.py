"""Read "documents": any parquet or JSONL(.gz) file with a ``text`` column, in stable order.

The tokenizer trainer and the tokens stage both consume documents this way, so the curated
parquet of the curate stage (the Document contract in DESIGN.md: ``id``, ``text``, ``source``,
...) and a raw JSONL dump are read by the same code:

* :func:`list_files` turns a path (file, directory, or glob) into a **sorted** list of files,
  so everything derived from the order (shard contents, document sampling) is reproducible.
* :func:`read_batches` yields column batches ``{"id", "text", "source", "error", "message",
  "offset"}`` from one file. A record that cannot become a document (malformed JSON, missing
  or non-string ``text``, text that is not valid Unicode) is *not* raised: it comes out with
  ``error`` set so the caller can quarantine it and carry on. JSONL is read by
  :func:`llmray.jsonl.read_lines`; a document's ``offset`` is the 0-based line index (JSONL,
  blank lines counted) or row index (parquet), which ids are made of, while a record that comes
  out with ``error`` has the 1-based line as ``offset``, as its message names it (``file:12: ...``).
* A missing ``id`` is derived from the file's path relative to the input root and the record
  offset (stable when the corpus moves); a missing ``source`` is the file's name without its
  suffixes, so a folder of raw dumps (``c4.jsonl``, ``wiki.parquet``) is a source mixture.
* :func:`split_of` assigns a document to ``train`` or ``val`` from a hash of its id alone, so a
  document's split never changes when others are added or removed. The tokenizer trainer holds
  the same ``val`` documents out that the tokens stage puts in the validation split.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from llmray import jsonl, storage

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")
COLUMNS = ("id", "text", "source", "error", "message", "offset")
_GLOB_CHARS = set("*?[")


def is_glob(spec: str | Path) -> bool:
    return bool(_GLOB_CHARS & set(str(spec)))


def list_files(spec: str | Path) -> list[str]:
    """The document files named by ``spec`` (a file, a directory searched recursively, or a glob;
    a local path or a URI such as ``s3://bucket/run/curate/output/documents``), sorted."""
    spec = str(spec)
    if storage.is_remote(spec):
        matches = storage.glob(spec) if is_glob(spec) else [storage.normalize(spec)]
        folders = [m for m in matches if storage.is_dir(m)]
        found = {storage.join(f, rel) for f in folders for rel, _ in storage.list_files(f) if _is_document_name(rel)}
        singles = [m for m in matches if m not in folders and storage.is_file(m)]
    else:
        matches = [Path(p) for p in glob.glob(spec, recursive=True)] if is_glob(spec) else [Path(spec)]
        found = {str(p) for m in matches if m.is_dir() for p in m.rglob("*") if p.is_file() and _is_document_name(p.name)}
        singles = [str(m) for m in matches if m.is_file()]
    for single in singles:
        if not _is_document_name(storage.name(single)):
            raise ValueError(f"{single} is not a document file: expected one of {', '.join(SUFFIXES)}")
    files = found | set(singles)
    if not files:
        raise FileNotFoundError(f"no document files ({', '.join(SUFFIXES)}) found at {spec!r}")
    return sorted(files, key=lambda f: f.split("/"))  # path order, as pathlib sorts


def input_root(spec: str | Path) -> str:
    """The directory that document ids are made relative to: the non-glob prefix of ``spec``."""
    parts = str(spec).split("/")
    fixed = []
    for part in parts:
        if is_glob(part):
            break
        fixed.append(part)
    root = "/".join(fixed) or "."
    if storage.is_remote(root):
        return root if storage.is_dir(root) else root.rsplit("/", 1)[0]
    return str(Path(root) if Path(root).is_dir() else Path(root).parent)


def _is_document_name(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return not name.startswith((".", "_")) and name.endswith(SUFFIXES)


def source_name(path: str | Path) -> str:
    """Default source of a file without a ``source`` column: its name without document suffixes."""
    name = str(path).rsplit("/", 1)[-1]
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def derived_id(relative_path: str, offset: int) -> str:
    """A stable id for a record without one: hash of its path (relative to the input root) + offset."""
    return hashlib.sha1(f"{relative_path}#{offset}".encode()).hexdigest()[:20]


def split_of(doc_id: str, val_fraction: float) -> str:
    """``"val"`` for a fraction ``val_fraction`` of ids (by hash of the id alone), else ``"train"``."""
    if val_fraction <= 0:
        return "train"
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def read_batches(path: str | Path, root: str | Path, batch_docs: int = 1024,
                 batch_chars: int = 8 << 20) -> Iterator[dict[str, list]]:
    """Yield column batches (see :data:`COLUMNS`) of at most ``batch_docs`` records / ~``batch_chars``."""
    relative = _relative(str(path), str(root))
    records = _parquet_records(str(path)) if str(path).endswith(".parquet") else _jsonl_records(str(path))
    batch = _empty_batch()
    chars = 0
    for offset, line, record in records:
        where = f"{relative}:{line}" if line is not None else f"{relative} row {offset}"
        row = _document_row(record, relative, offset, where, source_name(path))
        if row["error"] is not None and line is not None:
            row["offset"] = line  # a quarantine row names the 1-based line, as its message does
        for column in COLUMNS:
            batch[column].append(row[column])
        chars += len(row["text"])
        if len(batch["id"]) >= batch_docs or chars >= batch_chars:
            yield batch
            batch, chars = _empty_batch(), 0
    if batch["id"]:
        yield batch


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` (ids are made of it), or its name when it lies elsewhere."""
    if storage.is_remote(path):
        return path[len(root) + 1:] if path.startswith(root.rstrip("/") + "/") else storage.name(path)
    local = Path(path)
    return local.relative_to(root).as_posix() if local.is_relative_to(root) else local.name


def iter_documents(spec: str | Path, batch_docs: int = 1024) -> Iterator[dict[str, list]]:
    """Every batch of every file named by ``spec``, in sorted file order."""
    root = input_root(spec)
    for path in list_files(spec):
        yield from read_batches(path, root, batch_docs)


def _empty_batch() -> dict[str, list]:
    return {column: [] for column in COLUMNS}


# Records come as (offset, line, record): ``offset`` is the 0-based row / line index that ids are
# made of, ``line`` the 1-based line number messages name (None for parquet rows).

def _parquet_records(path: str) -> Iterator[tuple[int, None, dict]]:
    with storage.open_input(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = set(parquet.schema_arrow.names)
        if "text" not in names:
            raise ValueError(f"{path}: parquet file has no 'text' column (columns: {sorted(names)})")
        columns = [c for c in ("id", "text", "source") if c in names]
        offset = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                yield offset, None, record
                offset += 1


def _jsonl_records(path: str) -> Iterator[tuple[int, int, dict | jsonl.BadLine]]:
    for line in jsonl.read_lines(path):
        yield line.index, line.number, line.record


_LINE_ERRORS = {jsonl.INVALID_JSON: "JSONDecodeError", jsonl.INVALID_UTF8: "UnicodeDecodeError",
                jsonl.NOT_AN_OBJECT: "TypeError", jsonl.TOO_LARGE: "DocumentTooLarge"}


def _document_row(record: dict | jsonl.BadLine, relative: str, offset: int, where: str,
                  default_source: str) -> dict:
    row = {"id": derived_id(relative, offset), "text": "", "source": default_source,
           "error": None, "message": None, "offset": offset}
    if isinstance(record, jsonl.BadLine):
        return {**row, "error": _LINE_ERRORS[record.reason], "message": f"{where}: {record.detail}"}
    if isinstance(record.get("id"), (str, int)) and str(record["id"]):
        row["id"] = str(record["id"])
    if isinstance(record.get("source"), str) and record["source"]:
        row["source"] = record["source"]
    text = record.get("text")
    if not isinstance(text, str):
        found = "missing" if "text" not in record else f"of type {type(text).__name__}"
        return {**row, "error": "BadText", "message": f"{where}: 'text' is {found}, expected a string"}
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return {**row, "error": "BadUnicode",
                "message": f"{where}: text is not valid Unicode ({exc.reason} at {exc.start})"}
    row["text"] = text
    return row


def lineage_inputs(spec: str) -> dict[str, str]:
    """Lineage inputs of a document spec: the path itself, or every file a glob matches."""
    if is_glob(spec):
        return {f"documents/{i:05d}": str(p) for i, p in enumerate(list_files(spec))}
    return {"documents": spec}
