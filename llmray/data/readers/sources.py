"""Raw sources → rows: planning (which files, in which order) and reading (records of one file).

Every source is a named entry of the curate config (:class:`SourceConfig`) with a ``kind``:

========  ==================================================================================
jsonl     JSON lines, optionally ``.gz``; ``text_field`` / ``id_field`` / ``url_field`` name columns
parquet   parquet files; same field names; read in record batches
csv       CSV with a header row (``.gz`` ok); same field names
text      plain text (``.gz`` ok): one document per file, per paragraph block, or per line
html      raw HTML files → main text (Resiliparse)
warc      Common Crawl WARC: HTML responses → main text
wet       Common Crawl WET: the ``conversion`` records' text as is
code      source trees: language from the extension; vendored, generated and binary files skipped
latex     ``.tex`` files or ``.tar.gz`` e-prints: each ``.tex`` member → text with markup stripped
machine   the machine-local demo corpus (:mod:`llmray.data.readers.machine_text`)
========  ==================================================================================

Design choices:

* **Planning is on the driver and sorted** (:func:`plan`): a work unit is one file; the list is
  sorted by source then path, so ids, order and output bytes do not depend on the cluster.
  Caps are per source (``max_files``) and per file (``max_docs_per_file``) so they are decided
  locally and deterministically; a missing ``optional`` source is skipped with a log line.
* **Readers never raise for bad data** (:func:`read_unit`): a malformed JSON line, a record
  that is not valid UTF-8 beyond repair, a document over ``max_doc_bytes``, a truncated ``.gz``
  or a broken WARC record becomes a *quarantine* row (path, offset, error, message) and reading
  goes on with the next record; only a truncated stream ends its own file (what was read before
  the break is kept). Ray Data fails a whole dataset on one raised exception, so this matters.
* ``offset`` is the record's position in its file: 0-based line index for JSONL (blank lines
  counted) and line-split text, paragraph index, row index for parquet, member index for
  archives, byte offset of the record for WARC (the compressed offset for ``.gz``, as Common
  Crawl's indexes use). JSONL is read by :func:`llmray.jsonl.read_lines`, and its messages name
  the 1-based line (``path:12: ...``), as an editor shows it.
"""

from __future__ import annotations

import glob
import gzip
import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from llmray import jsonl
from llmray.config import param
from llmray.data.readers import html as html_lib
from llmray.data.readers import latex as latex_lib
from llmray.data.readers import machine_text
from llmray.data.filters import normalize
from llmray.data import records

log = logging.getLogger("llmray.data.readers.sources")

Kind = Literal["jsonl", "parquet", "csv", "text", "html", "warc", "wet", "code", "latex", "machine"]
_GLOB_CHARS = set("*?[")

# Language by extension for code sources; files with other extensions are not listed.
CODE_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp",
    ".cxx": "cpp", ".rs": "rust", ".go": "go", ".java": "java", ".kt": "kotlin", ".scala": "scala",
    ".js": "javascript", ".mjs": "javascript", ".ts": "typescript", ".tsx": "typescript", ".rb": "ruby",
    ".php": "php", ".cs": "csharp", ".swift": "swift", ".sh": "shell", ".bash": "shell", ".pl": "perl",
    ".lua": "lua", ".r": "r", ".jl": "julia", ".hs": "haskell", ".ml": "ocaml", ".sql": "sql",
    ".f90": "fortran", ".m": "objective-c", ".zig": "zig", ".el": "lisp", ".clj": "clojure",
}
VENDORED_DIRS = {"node_modules", "vendor", "third_party", "thirdparty", "external", ".git", ".hg", ".svn",
                 "__pycache__", "site-packages", "dist-packages", "build", "dist", ".tox", ".venv", "venv"}
GENERATED_SUFFIXES = (".min.js", ".min.css", "_pb2.py", "_pb2_grpc.py", ".pb.go", ".generated.cs")
_DEFAULT_SUFFIXES = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson"),
    "parquet": (".parquet",),
    "csv": (".csv", ".csv.gz"),
    "text": (".txt", ".txt.gz", ".md", ".rst", ".text"),
    "html": (".html", ".htm", ".html.gz"),
    "warc": (".warc", ".warc.gz"),
    "wet": (".wet", ".wet.gz", ".warc.wet.gz"),
    "latex": (".tex", ".tar.gz", ".tgz", ".tar"),
    "code": tuple(CODE_LANGUAGES),
}


@dataclass
class SourceConfig:
    """One named raw source of the curate stage."""

    name: str = param(doc="source name written into every document's 'source' column")
    kind: Kind = param(doc="reader: jsonl, parquet, text, html, warc, wet, code, latex, machine")
    paths: list[str] = param(default_factory=list, doc="files, directories (searched recursively) or "
                                                       "globs; unused for kind 'machine'")
    optional: bool = param(False, doc="skip this source with a log line when none of its paths exist "
                                      "(instead of failing)")
    text_field: str = param("text", doc="jsonl/parquet: column holding the text")
    id_field: str | None = param(None, doc="jsonl/parquet: column kept as meta.source_id")
    url_field: str | None = param(None, doc="jsonl/parquet: column holding the URL")
    where: dict[str, list[str]] = param(default_factory=dict, doc="jsonl/parquet/csv: keep only records "
                                        "whose field (as a string) is one of the listed values, e.g. a label")
    split: Literal["file", "paragraph", "line"] = param("file", doc="text: one document per file, per "
                                                                    "blank-line-separated block, or per line")
    strip_gutenberg: bool = param(False, doc="text: keep only what lies between Project Gutenberg's "
                                             "'*** START OF' and '*** END OF' lines")
    extractor: html_lib.Extractor = param("resiliparse", doc="html/warc: main-text extractor")
    machine_kinds: list[str] = param(default_factory=lambda: list(machine_text.KINDS),
                                     doc=f"machine: kinds of local text ({', '.join(machine_text.KINDS)})")
    domain: Literal["text", "code"] | None = param(None, doc="which filters/classifiers apply (empty: code "
                                                            "for kind 'code' and machine python_stdlib, else text)")
    filter_groups: list[str] | None = param(None, doc="heuristic filter groups for this source, in order "
                                                      "(empty: the domain's default groups)")
    max_files: int | None = param(None, doc="read at most this many files (sorted order); for machine, "
                                            "per kind", min=1)
    max_docs_per_file: int | None = param(None, doc="read at most this many records of each file", min=1)

    def __post_init__(self) -> None:
        if self.kind != "machine" and not self.paths:
            raise ValueError(f"source '{self.name}' of kind '{self.kind}' needs at least one path")


@dataclass
class ReadLimits:
    """Per-record guards applied by every reader."""

    max_doc_bytes: int = param(10 << 20, doc="records larger than this (UTF-8 bytes) are quarantined",
                               min=1)
    max_invalid_utf8_fraction: float = param(0.01, doc="records whose share of undecodable bytes exceeds "
                                                       "this are quarantined (below it they are repaired)",
                                             min=0.0, max=1.0)


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

def existing_paths(source: SourceConfig) -> list[Path]:
    """The configured paths (globs expanded) that exist, sorted."""
    found: set[Path] = set()
    for spec in source.paths:
        matches = glob.glob(spec, recursive=True) if _GLOB_CHARS & set(spec) else [spec]
        found.update(Path(m) for m in matches if Path(m).exists())
    return sorted(found)


def plan(sources: list[SourceConfig]) -> list[dict]:
    """Work units ``{source, kind, path, id_path, machine_kind}`` in a stable order; one per file."""
    units: list[dict] = []
    for source in sources:
        if source.kind == "machine":
            files = machine_text.discover(source.machine_kinds, source.max_files)
            units.extend({"source": source.name, "path": f.path, "id_path": f.path, "machine_kind": f.kind}
                         for f in files)
            continue
        roots = existing_paths(source)
        if not roots:
            message = f"source '{source.name}': none of {source.paths} exists"
            if not source.optional:
                raise FileNotFoundError(message + " (set optional: true to skip it)")
            log.warning("%s; skipped (optional)", message)
            continue
        files = sorted({(file, root) for root in roots for file in _files_under(root, source.kind)})
        if source.max_files is not None:
            files = files[:source.max_files]
        units.extend({"source": source.name, "path": str(file), "id_path": _relative(file, root),
                      "machine_kind": None} for file, root in files)
    return units


def _relative(file: Path, root: Path) -> str:
    """The path recorded in ids: relative to the configured root, so ids survive moving the corpus."""
    if root.is_file():
        return file.name
    return str(file.relative_to(root))


def _files_under(root: Path, kind: str) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    suffixes = _DEFAULT_SUFFIXES.get(kind, ())
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        if kind == "code" and (VENDORED_DIRS.intersection(path.relative_to(root).parts[:-1])
                               or path.name.endswith(GENERATED_SUFFIXES)):
            continue
        if path.name.lower().endswith(suffixes):
            yield path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def domain_of(source: SourceConfig, machine_kind: str | None) -> str:
    if source.domain is not None:
        return source.domain
    return "code" if source.kind == "code" or machine_kind == "python_stdlib" else "text"


def read_unit(unit: dict, source: SourceConfig, limits: ReadLimits) -> Iterator[dict]:
    """Rows (documents or quarantine entries) of one work unit, in record order. Never raises for data."""
    path, id_path = unit["path"], unit["id_path"]
    domain = domain_of(source, unit["machine_kind"])
    count = 0
    try:
        for record in _RECORD_READERS[source.kind](path, source, unit):
            if source.max_docs_per_file is not None and count >= source.max_docs_per_file:
                return
            count += 1
            yield _row(record, source.name, path, id_path, domain, limits)
    except Exception as exc:  # noqa: BLE001 - the file is broken past this point; keep what was read
        yield records.quarantine_row(source.name, path, count, type(exc).__name__, f"{path}: {exc}")


@dataclass
class RawRecord:
    """What a reader found at one offset: text (str or bytes to decode), or an error."""

    offset: int
    text: str | bytes | None
    url: str | None = None
    meta: dict | None = None
    error: str | None = None
    message: str | None = None
    invalid_utf8: int = 0  # bytes a reader already replaced while decoding (JSON lines)
    location: str | None = None  # what messages call it (JSONL: ``path:line``); default ``path@offset``


def _row(record: RawRecord, source: str, path: str, id_path: str, domain: str, limits: ReadLimits) -> dict:
    if record.error is not None:
        return records.quarantine_row(source, path, record.offset, record.error, record.message or "")
    at = record.location or f"{path}@{record.offset}"
    text = record.text
    meta = dict(record.meta or {})
    if isinstance(text, bytes):
        if len(text) > limits.max_doc_bytes:
            return _too_large(source, path, record.offset, at, len(text), limits)
        if machine_text.looks_binary(text):
            return records.quarantine_row(source, path, record.offset, "BinaryContent", f"{at}: NUL bytes, not text")
        text, invalid = normalize.decode(text)
        if normalize.invalid_fraction(text, invalid) > limits.max_invalid_utf8_fraction:
            return _invalid_utf8(source, path, record.offset, at, invalid, text)
        if invalid:
            meta["repaired_utf8"] = invalid
    elif not isinstance(text, str):
        return records.quarantine_row(source, path, record.offset, "NotText",
                                      f"{at}: expected a string, got {type(text).__name__}")
    else:
        text, surrogates = normalize.repair_surrogates(text)
        invalid = record.invalid_utf8 + surrogates
        if normalize.invalid_fraction(text, invalid) > limits.max_invalid_utf8_fraction:
            return _invalid_utf8(source, path, record.offset, at, invalid, text)
        if invalid:
            meta["repaired_utf8"] = invalid
        if len(text) > limits.max_doc_bytes // 4 and len(text.encode("utf-8")) > limits.max_doc_bytes:
            return _too_large(source, path, record.offset, at, len(text.encode("utf-8")), limits)
    return records.document_row(source, path, record.offset, text, domain=domain, url=record.url, meta=meta,
                                id_path=id_path)


def _invalid_utf8(source: str, path: str, offset: int, at: str, invalid: int, text: str) -> dict:
    return records.quarantine_row(source, path, offset, "InvalidUTF8",
                                  f"{at}: {invalid} invalid UTF-8 sequences in {len(text)} characters")


def _too_large(source: str, path: str, offset: int, at: str, size: int, limits: ReadLimits) -> dict:
    return records.quarantine_row(source, path, offset, "DocumentTooLarge",
                                  f"{at}: {size} bytes > max_doc_bytes {limits.max_doc_bytes}")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


_JSONL_ERRORS = {jsonl.INVALID_JSON: "JSONDecodeError", jsonl.NOT_AN_OBJECT: "NotAnObject",
                 jsonl.INVALID_UTF8: "InvalidUTF8"}


def _jsonl_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    """Records of a JSONL(.gz) file; offset = 0-based line index (blank lines counted).

    Bad bytes inside a line are repaired (``normalize.decode``) and judged in :func:`_row`.
    """
    for line in jsonl.read_lines(path, decode=normalize.decode):
        location = f"{path}:{line.number}"
        if isinstance(line.record, jsonl.BadLine):
            yield RawRecord(line.index, None, error=_JSONL_ERRORS[line.record.reason], message=str(line.record),
                            location=location)
            continue
        for record in _field_records(line.record, line.index, source, path, location):
            record.invalid_utf8 = line.repaired
            yield record


def _field_records(obj, offset: int, source: SourceConfig, path: str, location: str | None = None
                   ) -> Iterator[RawRecord]:
    """The record of one JSON object / row, or nothing when ``where`` does not select it."""
    at = location or f"{path} record {offset}"
    if not isinstance(obj, dict):
        yield RawRecord(offset, None, error="NotAnObject",
                        message=f"{at}: expected a JSON object, got {type(obj).__name__}", location=location)
        return
    if all(str(obj.get(key)) in values for key, values in source.where.items()):
        yield _field_record(obj, offset, source, at, location)


def _field_record(obj: dict, offset: int, source: SourceConfig, at: str, location: str | None) -> RawRecord:
    if source.text_field not in obj:
        return RawRecord(offset, None, error="MissingField", location=location,
                         message=f"{at}: no '{source.text_field}' field (has {sorted(obj)[:10]})")
    meta = {"source_id": str(obj.get(source.id_field))} if source.id_field and source.id_field in obj else {}
    url = obj.get(source.url_field) if source.url_field else None
    return RawRecord(offset, obj[source.text_field], url=url if isinstance(url, str) else None, meta=meta,
                     location=location)


def _parquet_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    wanted = [c for c in (source.text_field, source.id_field, source.url_field, *source.where)
              if c and c in parquet.schema_arrow.names]
    offset = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
        for obj in batch.to_pylist():
            yield from _field_records(obj, offset, source, path)
            offset += 1


def _csv_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    """Rows of a CSV file with a header (quoted fields may hold newlines); offset = row index."""
    import csv
    import io

    with _open_binary(path) as handle:
        reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline=""))
        for offset, row in enumerate(reader):
            yield from _field_records(row, offset, source, path)


def _text_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    if source.split == "file":
        with _open_binary(path) as handle:
            data = handle.read()
        if source.strip_gutenberg:
            data = strip_gutenberg(data)
        yield RawRecord(0, data)
        return
    with _open_binary(path) as handle:
        if source.split == "line":
            for line_number, line in enumerate(handle):
                if line.strip():
                    yield RawRecord(line_number, line.rstrip(b"\r\n"))
            return
        block: list[bytes] = []
        index = 0
        for line in handle:
            if line.strip():
                block.append(line)
            elif block:
                yield RawRecord(index, b"".join(block))
                index, block = index + 1, []
        if block:
            yield RawRecord(index, b"".join(block))


_GUTENBERG_START = b"*** START OF"
_GUTENBERG_END = b"*** END OF"


def strip_gutenberg(data: bytes) -> bytes:
    """The book between Project Gutenberg's START and END marker lines (unchanged if absent)."""
    start = data.find(_GUTENBERG_START)
    if start >= 0:
        newline = data.find(b"\n", start)
        data = data[newline + 1:] if newline >= 0 else b""
    end = data.find(_GUTENBERG_END)
    return data[:end] if end >= 0 else data


def _html_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    with _open_binary(path) as handle:
        body = handle.read()
    yield RawRecord(0, html_lib.extract_text(html_lib.decode_html(body), source.extractor))


def _warc_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    for doc in html_lib.iter_warc(path, source.kind, source.extractor):
        yield RawRecord(doc.offset, doc.text, url=doc.url, meta=doc.meta, error=doc.error, message=doc.message)


def _code_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    suffix = Path(path).suffix.lower()
    yield RawRecord(0, Path(path).read_bytes(), meta={"language": CODE_LANGUAGES.get(suffix, "unknown")})


def _latex_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    if path.endswith(".tex"):
        yield RawRecord(0, latex_lib.latex_to_text(_decoded(Path(path).read_bytes())))
        return
    with tarfile.open(path, "r:*") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.endswith(".tex")),
                         key=lambda m: m.name)
        for index, member in enumerate(members):
            data = archive.extractfile(member).read()
            yield RawRecord(index, latex_lib.latex_to_text(_decoded(data)), meta={"member": member.name})


def _decoded(data: bytes) -> str:
    return normalize.decode(data)[0]


def _machine_records(path: str, source: SourceConfig, unit: dict) -> Iterator[RawRecord]:
    file = machine_text.MachineFile(path, unit["machine_kind"])
    try:
        for offset, text, meta in machine_text.read_documents(file):
            yield RawRecord(offset, text, meta=meta)
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        yield RawRecord(0, None, error=type(exc).__name__, message=f"{path}: {exc}")


_RECORD_READERS = {
    "jsonl": _jsonl_records, "parquet": _parquet_records, "csv": _csv_records, "text": _text_records,
    "html": _html_records,
    "warc": _warc_records, "wet": _warc_records, "code": _code_records, "latex": _latex_records,
    "machine": _machine_records,
}
