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
  goes on with the next record; only a damaged stream ends its own file (what was read before
  the damage is kept). Ray Data fails a whole dataset on one raised exception, so this matters.
  Only the data errors of :mod:`~llmray.data.readers.errors` are quarantined; any other
  exception is a bug and fails the stage with its traceback.
* **Bounded**: no reader holds more than ``max_doc_bytes + 1`` bytes of a record, line, file,
  gzip member or archive member (:mod:`llmray.byte_streams`), so a gzip bomb or a 1 GB line
  is quarantined as oversize at the cost of ``max_doc_bytes`` of memory.
* A document's ``offset`` (part of its id) is its position in its file: 0-based line index for
  JSONL (blank lines counted) and line-split text, paragraph index, data-row index for CSV and
  parquet, member index for archives, byte offset of the record for WARC (the compressed offset
  for ``.gz``, as Common Crawl's indexes use). A quarantine row's ``offset`` is where a person
  finds the bad record: the 1-based line for line formats (JSONL, CSV, text), as messages name
  it (``path:12: ...``), else the same position as a document's.
* ``meta`` keeps the source record's own id (``id_field``, default ``id``, when the record has
  it) as ``source_id`` and the fields named in ``meta_fields``, so a curated document can be
  traced back to the record it came from.
"""

from __future__ import annotations

import csv
import glob
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from llmray import byte_streams, jsonl, storage
from llmray.config import param
from llmray.data.readers import errors
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
    id_field: str | None = param("id", doc="jsonl/parquet/csv: column kept as meta.source_id when a "
                                           "record has it (null: none)")
    meta_fields: list[str] = param(default_factory=list, doc="jsonl/parquet/csv: further columns kept in "
                                                             "meta under their own names when present")
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
    max_quarantine_fraction: float = param(0.5, doc="fail the stage when more than this share of one "
                                                    "source's records is quarantined (a regression or a "
                                                    "wrong reader, not dirty data)", min=0.0, max=1.0)


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

def existing_paths(source: SourceConfig) -> list[str]:
    """The configured paths (globs expanded) that exist, sorted: local paths as written, URIs
    (``s3://bucket/raw/*.jsonl.gz``) through :mod:`llmray.storage`."""
    found: set[str] = set()
    for spec in source.paths:
        if storage.is_remote(spec):
            matches = storage.glob(spec) if _GLOB_CHARS & set(spec) else [storage.normalize(spec)]
            found.update(m for m in matches if storage.exists(m))
            continue
        matches = glob.glob(spec, recursive=True) if _GLOB_CHARS & set(spec) else [spec]
        found.update(str(Path(m)) for m in matches if Path(m).exists())
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
        files = sorted({found for root in roots for found in _files_under(root, source.kind)},
                       key=lambda found: (found[0].split("/"), found[1]))  # path order, as pathlib sorts
        if source.max_files is not None:
            files = files[:source.max_files]
        units.extend({"source": source.name, "path": file, "id_path": relative, "machine_kind": None}
                     for file, relative in files)
    return units


def _files_under(root: str, kind: str) -> Iterator[tuple[str, str]]:
    """``(file, path recorded in ids)`` of each file a source root holds: the root itself when it
    is a file, else the files below it (relative paths, so ids survive moving the corpus) that
    the source's kind reads."""
    if storage.is_remote(root):
        if storage.is_file(root):
            yield root, storage.name(root)
            return
        candidates = ((storage.join(root, rel), rel) for rel, _ in storage.list_files(root))
    else:
        base = Path(root)
        if base.is_file():
            yield root, base.name
            return
        candidates = ((str(path), str(path.relative_to(base))) for path in base.rglob("*")
                      if path.is_file() and not path.is_symlink())
    suffixes = _DEFAULT_SUFFIXES.get(kind, ())
    for file, relative in candidates:
        name = relative.rsplit("/", 1)[-1]
        if kind == "code" and (VENDORED_DIRS.intersection(relative.split("/")[:-1])
                               or name.endswith(GENERATED_SUFFIXES)):
            continue
        if name.lower().endswith(suffixes):
            yield file, relative


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
    count, last = 0, None
    try:
        for record in _RECORD_READERS[source.kind](path, source, unit, limits):
            if source.max_docs_per_file is not None and count >= source.max_docs_per_file:
                return
            count, last = count + 1, record
            yield _row(record, source.name, path, id_path, domain, limits)
    except errors.DATA_ERRORS as exc:  # the stream is damaged past this point; keep what was read
        where = 0 if last is None else last.position + 1
        after = "at its start" if last is None else f"after {last.where(path)}"
        yield records.quarantine_row(source.name, path, where, errors.error_kind(exc),
                                     f"{path}: unreadable {after}: {exc}")


@dataclass
class RawRecord:
    """What a reader found at one offset: text (str or bytes to decode), or an error."""

    offset: int
    text: str | bytes | None
    url: str | None = None
    meta: dict | None = None
    error: str | None = None
    message: str | None = None
    invalid_utf8: int = 0  # bytes a reader already replaced while decoding (JSONL, CSV)
    line: int | None = None  # 1-based line of the record's start, for line formats

    @property
    def position(self) -> int:
        """Where a quarantine row says the record is: its 1-based line, else its offset."""
        return self.offset if self.line is None else self.line

    def where(self, path: str) -> str:
        """How messages name the record: ``path:line`` or ``path@offset``."""
        return f"{path}@{self.offset}" if self.line is None else f"{path}:{self.line}"


def _failed(offset: int, exc: BaseException, at: str, line: int | None = None) -> RawRecord:
    """The quarantine record of one record a reader could not read (the file goes on); ``at``
    names the record in the message unless the exception's message already starts with it."""
    message = str(exc) if str(exc).startswith(at) else f"{at}: {exc}"
    return RawRecord(offset, None, error=errors.error_kind(exc), message=message, line=line)


def _row(record: RawRecord, source: str, path: str, id_path: str, domain: str, limits: ReadLimits) -> dict:
    position = record.position
    if record.error is not None:
        return records.quarantine_row(source, path, position, record.error, record.message or "")
    at = record.where(path)
    text = record.text
    meta = dict(record.meta or {})
    if isinstance(text, bytes):
        if len(text) > limits.max_doc_bytes:
            return _too_large(source, path, position, at, len(text), limits)
        if machine_text.looks_binary(text):
            return records.quarantine_row(source, path, position, "BinaryContent", f"{at}: NUL bytes, not text")
        text, invalid = normalize.decode(text)
        if normalize.invalid_fraction(text, invalid) > limits.max_invalid_utf8_fraction:
            return _invalid_utf8(source, path, position, at, invalid, text)
        if invalid:
            meta["repaired_utf8"] = invalid
    elif not isinstance(text, str):
        return records.quarantine_row(source, path, position, "NotText",
                                      f"{at}: expected a string, got {type(text).__name__}")
    else:
        text, surrogates = normalize.repair_surrogates(text)
        invalid = record.invalid_utf8 + surrogates
        if normalize.invalid_fraction(text, invalid) > limits.max_invalid_utf8_fraction:
            return _invalid_utf8(source, path, position, at, invalid, text)
        if invalid:
            meta["repaired_utf8"] = invalid
        if len(text) > limits.max_doc_bytes // 4 and len(text.encode("utf-8")) > limits.max_doc_bytes:
            return _too_large(source, path, position, at, len(text.encode("utf-8")), limits)
    return records.document_row(source, path, record.offset, text, domain=domain, url=record.url, meta=meta,
                                id_path=id_path)


def _invalid_utf8(source: str, path: str, offset: int, at: str, invalid: int, text: str) -> dict:
    return records.quarantine_row(source, path, offset, "InvalidUTF8",
                                  f"{at}: {invalid} invalid UTF-8 sequences in {len(text)} characters")


def _too_large(source: str, path: str, offset: int, at: str, size: int, limits: ReadLimits) -> dict:
    return records.quarantine_row(source, path, offset, errors.RecordTooLarge.kind,
                                  _too_large_message(at, size, limits.max_doc_bytes))


def _too_large_message(at: str, size: int, limit: int) -> str:
    seen = f"more than {limit} bytes (read stopped there)" if size == limit + 1 else f"{size} bytes"
    return f"{at}: {seen} > max_doc_bytes {limit}"


def _read_file(path: str, limits: ReadLimits) -> bytes:
    """A whole (decompressed) file, at most ``max_doc_bytes + 1`` bytes of it (``_row`` judges)."""
    with byte_streams.open_binary(path) as handle:
        return byte_streams.read_at_most(handle, limits.max_doc_bytes)


_JSONL_ERRORS = {jsonl.INVALID_JSON: "JSONDecodeError", jsonl.NOT_AN_OBJECT: "NotAnObject",
                 jsonl.INVALID_UTF8: "InvalidUTF8", jsonl.TOO_LARGE: errors.RecordTooLarge.kind}


def _jsonl_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    """Records of a JSONL(.gz) file; offset = 0-based line index (blank lines counted).

    Bad bytes inside a line are repaired (``normalize.decode``) and judged in :func:`_row`.
    """
    for line in jsonl.read_lines(path, decode=normalize.decode, max_line_bytes=limits.max_doc_bytes):
        if isinstance(line.record, jsonl.BadLine):
            yield RawRecord(line.index, None, error=_JSONL_ERRORS[line.record.reason], message=str(line.record),
                            line=line.number)
            continue
        for record in _field_records(line.record, line.index, source, path, line.number):
            record.invalid_utf8 = line.repaired
            yield record


def _field_records(obj, offset: int, source: SourceConfig, path: str, line: int | None = None
                   ) -> Iterator[RawRecord]:
    """The record of one JSON object / row, or nothing when ``where`` does not select it."""
    at = f"{path}:{line}" if line is not None else f"{path} record {offset}"
    if not isinstance(obj, dict):
        yield RawRecord(offset, None, error="NotAnObject", line=line,
                        message=f"{at}: expected a JSON object, got {type(obj).__name__}")
        return
    if all(str(obj.get(key)) in values for key, values in source.where.items()):
        yield _field_record(obj, offset, source, at, line)


def _field_record(obj: dict, offset: int, source: SourceConfig, at: str, line: int | None) -> RawRecord:
    if source.text_field not in obj:
        return RawRecord(offset, None, error="MissingField", line=line,
                         message=f"{at}: no '{source.text_field}' field (has {sorted(obj)[:10]})")
    meta = {name: obj[name] for name in source.meta_fields if obj.get(name) is not None}
    if source.id_field and obj.get(source.id_field) is not None:
        meta["source_id"] = str(obj[source.id_field])
    url = obj.get(source.url_field) if source.url_field else None
    return RawRecord(offset, obj[source.text_field], url=url if isinstance(url, str) else None, meta=meta,
                     line=line)


def _parquet_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    with storage.open_input(path) as handle:
        parquet = pq.ParquetFile(handle)
        wanted = [c for c in dict.fromkeys((source.text_field, source.id_field, source.url_field, *source.where,
                                            *source.meta_fields))
                  if c and c in parquet.schema_arrow.names]
        offset = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
            for obj in batch.to_pylist():
                yield from _field_records(obj, offset, source, path)
                offset += 1


def _csv_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    """Rows of a CSV file with a header (quoted fields may hold newlines); offset = data-row index.

    The field limit is ``max_doc_bytes`` (Python's default, 128 KiB, would fail a long document
    and the rest of the file with it); a longer line or field is quarantined and reading goes on.
    """
    csv.field_size_limit(max(csv.field_size_limit(), limits.max_doc_bytes))
    with byte_streams.open_binary(path) as handle:
        lines = _CsvLines(handle, path, limits.max_doc_bytes)
        reader = csv.reader(lines)
        header, offset = None, 0
        while True:
            start = lines.number + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, errors.RecordTooLarge) as exc:
                yield _failed(offset, exc, f"{path}:{start}", line=start)
                offset += 1
                continue
            if not row:
                continue
            if header is None:
                header = row
                continue
            for record in _field_records(dict(zip(header, row)), offset, source, path, start):
                record.invalid_utf8 = lines.take_repaired()
                yield record
            offset += 1


class _CsvLines:
    """The decoded lines the csv module parses, counted (1-based) and bounded: an oversize line
    raises :class:`~llmray.data.readers.errors.RecordTooLarge` from inside the csv reader."""

    def __init__(self, handle, path: str, limit: int) -> None:
        self._lines = byte_streams.bounded_lines(handle, limit)
        self.path, self.limit = path, limit
        self.number = 0
        self._repaired = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.number = line.number
        if line.data is None:
            raise errors.RecordTooLarge(_too_large_message(f"{self.path}:{line.number}", line.size, self.limit),
                                        line.size)
        text, repaired = normalize.decode(line.data)
        self._repaired += repaired
        return text

    def take_repaired(self) -> int:
        """Bytes replaced while decoding since the last call (the current record's)."""
        repaired, self._repaired = self._repaired, 0
        return repaired


def _text_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    if source.split == "file":
        data = _read_file(path, limits)
        if source.strip_gutenberg and len(data) <= limits.max_doc_bytes:
            data = strip_gutenberg(data)
        yield RawRecord(0, data)
        return
    with byte_streams.open_binary(path) as handle:
        lines = byte_streams.bounded_lines(handle, limits.max_doc_bytes)
        if source.split == "line":
            for line in lines:
                if line.data is None or line.data.strip():
                    yield _line_record(line.number - 1, line.number, line.data, line.size, limits)
            return
        yield from _paragraph_records(lines, limits)


def _paragraph_records(lines: Iterator[byte_streams.BoundedLine], limits: ReadLimits) -> Iterator[RawRecord]:
    """One record per blank-line-separated block; a block over the limit is kept as ``None`` (its
    size counted) until its end, so it is quarantined whole without being held."""
    block: list[bytes] | None = []
    index, first, size = 0, 0, 0
    for line in lines:
        if line.data is not None and not line.data.strip():
            if size:
                yield _line_record(index, first, None if block is None else b"".join(block), size, limits)
                index, block, size = index + 1, [], 0
            continue
        if not size:
            first = line.number
        size += line.size
        if block is not None and line.data is not None and size <= limits.max_doc_bytes:
            block.append(line.data)
        else:
            block = None
    if size:
        yield _line_record(index, first, None if block is None else b"".join(block), size, limits)


def _line_record(offset: int, line: int, data: bytes | None, size: int, limits: ReadLimits) -> RawRecord:
    if data is None:
        return RawRecord(offset, None, error=errors.RecordTooLarge.kind, line=line,
                         message=_too_large_message(f"line {line}", size, limits.max_doc_bytes))
    return RawRecord(offset, data.rstrip(b"\r\n"), line=line)


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


def _html_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    body = _read_file(path, limits)
    if len(body) > limits.max_doc_bytes:
        yield RawRecord(0, body)  # quarantined as too large by _row, without parsing
        return
    yield RawRecord(0, html_lib.extract_text(html_lib.decode_html(body), source.extractor))


def _warc_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    for doc in html_lib.iter_warc(path, source.kind, source.extractor, limits.max_doc_bytes):
        yield RawRecord(doc.offset, doc.text, url=doc.url, meta=doc.meta, error=doc.error, message=doc.message)


def _code_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    suffix = Path(path).suffix.lower()
    yield RawRecord(0, _read_file(path, limits), meta={"language": CODE_LANGUAGES.get(suffix, "unknown")})


def _latex_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    """``.tex`` files, or each ``.tex`` member of an e-print archive (offset = member index).

    Members that are links or whose names leave the archive (``../``, absolute paths) are
    quarantined, never followed; nothing is extracted to disk. A member's declared size is
    checked before anything is read.
    """
    if path.endswith(".tex"):
        yield _latex_record(0, _read_file(path, limits), limits, path)
        return
    with storage.open_input(path) as raw, tarfile.open(fileobj=raw, mode="r:*") as archive:
        members = sorted((m for m in archive.getmembers() if m.name.endswith(".tex")), key=lambda m: m.name)
        for index, member in enumerate(members):
            at = f"{path}!{member.name}"
            if member.issym() or member.islnk() or _leaves_archive(member.name):
                yield _failed(index, errors.UnsafeMember("a link or a path outside the archive; skipped"), at)
            elif member.isfile() and member.size > limits.max_doc_bytes:
                yield _failed(index, errors.RecordTooLarge(
                    _too_large_message(at, member.size, limits.max_doc_bytes), member.size), at)
            elif member.isfile():
                data = byte_streams.read_at_most(archive.extractfile(member), limits.max_doc_bytes)
                yield _latex_record(index, data, limits, at, meta={"member": member.name})


def _leaves_archive(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in Path(name).parts


def _latex_record(offset: int, data: bytes, limits: ReadLimits, at: str, meta: dict | None = None) -> RawRecord:
    if len(data) > limits.max_doc_bytes:
        return RawRecord(offset, data, meta=meta)  # quarantined as too large by _row
    try:
        text = latex_lib.latex_to_text(normalize.decode(data)[0], max_chars=limits.max_doc_bytes)
    except errors.DataError as exc:
        return _failed(offset, exc, at)
    return RawRecord(offset, text, meta=meta)


def _machine_records(path: str, source: SourceConfig, unit: dict, limits: ReadLimits) -> Iterator[RawRecord]:
    file = machine_text.MachineFile(path, unit["machine_kind"])
    for offset, text, meta in machine_text.read_documents(file, limits.max_doc_bytes):
        yield RawRecord(offset, text, meta=meta)


_RECORD_READERS = {
    "jsonl": _jsonl_records, "parquet": _parquet_records, "csv": _csv_records, "text": _text_records,
    "html": _html_records,
    "warc": _warc_records, "wet": _warc_records, "code": _code_records, "latex": _latex_records,
    "machine": _machine_records,
}
