"""The row that flows through the curate pipeline, and the three datasets it ends up in.

Why one row shape for everything: Ray Data cannot fork a stream without materialising it, so a
document, a rejected document and a quarantined (unreadable) record all travel in the same
stream and are routed when written:

* ``error`` set            → quarantine (``path``, ``offset``, ``error``, ``message``);
* ``reason`` set           → rejected (``id``, ``source``, ``stage``, ``reason``, ``value``);
* neither                  → a curated document (the Document contract in DESIGN.md).

Each slice of the ordered stream is routed and written by the Ray task that holds it
(:func:`llmray.data.funnel.write_slice`); only counts reach the driver.

**Contract for pipeline steps** (filters, classifiers, dedup): a step receives every row and
touches only *live* rows (``error`` and ``reason`` both null, see :func:`is_live`); to drop a
row it sets ``stage``/``reason``/``value`` and may shorten its text (rejected text is kept only
as a preview for ``sample_rejected``). A step that changes a row it keeps (dedup's boilerplate
lines, contamination flags) counts what it did with :func:`count_edits`, which the funnel sums per
stage. Every block carries the explicit :data:`ROW_SCHEMA`, so a block whose ``url`` values are
all null still has a string column (no schema drift).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("url", pa.string()),
    ("domain", pa.string()),          # "text" or "code": which filter set and classifiers apply
    ("path", pa.string()),
    ("offset", pa.int64()),
    ("bytes", pa.int64()),            # UTF-8 size of the text as read (funnel accounting)
    ("meta", pa.string()),            # JSON object
    ("lang", pa.string()),
    ("lang_score", pa.float64()),
    ("quality_score", pa.float64()),
    ("toxicity_score", pa.float64()),
    ("stage", pa.string()),           # where a rejected row was dropped
    ("reason", pa.string()),
    ("value", pa.float64()),
    ("detail", pa.string()),          # rejected by dedup: the id of the document kept (or the eval tasks)
    ("error", pa.string()),           # quarantine: exception type / error kind
    ("message", pa.string()),
    ("signals", pa.string()),         # JSON {signal: value} of every rule evaluated (histograms),
                                      # PII replacements (pii.*) and edits of kept rows (edit.*)
    ("unit", pa.int64()),             # index of the work unit (file) the row was read from, in plan order
    ("seq", pa.int64()),              # the row's position among its unit's rows: (unit, seq) orders
                                      # the stream and names the output files of each slice of it
])
COLUMNS = tuple(ROW_SCHEMA.names)

DOCUMENT_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in (
    "id", "text", "source", "url", "lang", "lang_score", "quality_score", "toxicity_score", "meta")])
REJECTED_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in ("id", "source", "stage", "reason", "value", "detail")])
QUARANTINE_SCHEMA = pa.schema([pa.field("source", pa.string()), *(ROW_SCHEMA.field(name) for name in (
    "path", "offset", "error", "message"))])

REJECTED_PREVIEW_CHARS = 2000  # text kept on a rejected row, for --sample-rejected inspection
EDIT_PREFIX = "edit."  # signals edit.<stage>.<count>: what a step changed in a row it kept


def document_id(source: str, path: str, offset: int) -> str:
    """Stable id: a hash of the source name, the file path (relative to its root) and record offset."""
    return hashlib.sha256(f"{source}\0{path}\0{offset}".encode()).hexdigest()[:24]


def empty_row() -> dict:
    return dict.fromkeys(COLUMNS)


def document_row(source: str, path: str, offset: int, text: str, *, domain: str, url: str | None = None,
                 meta: dict | None = None, id_path: str | None = None) -> dict:
    row = empty_row()
    row.update(id=document_id(source, id_path or path, offset), text=text, source=source, url=url,
               domain=domain, path=path, offset=offset, bytes=len(text.encode("utf-8")),
               meta=json.dumps(meta or {}, sort_keys=True, ensure_ascii=False))
    return row


def quarantine_row(source: str, path: str, offset: int, error: str, message: str) -> dict:
    row = empty_row()
    row.update(source=source, path=path, offset=offset, error=error, message=message[:1000], bytes=0)
    return row


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def is_live(row: dict) -> bool:
    """True for a row that is still a candidate document (not quarantined, not rejected)."""
    return row["error"] is None and row["reason"] is None


def live_mask(table: pa.Table) -> list[bool]:
    """:func:`is_live` of every row of a table."""
    errors = table.column("error").to_pylist()
    reasons = table.column("reason").to_pylist()
    return [e is None and r is None for e, r in zip(errors, reasons)]


def count_edits(row: dict, stage: str, counts: dict[str, float]) -> None:
    """Record in a kept row's signals what ``stage`` changed in it (``{"lines_removed": 3}``)."""
    signals = json.loads(row["signals"] or "{}")
    signals.update({f"{EDIT_PREFIX}{stage}.{name}": float(n) for name, n in counts.items()})
    row["signals"] = json.dumps(signals, sort_keys=True)


def reject(row: dict, stage: str, reason: str, value: float | None) -> None:
    """Mark a row dict as dropped at ``stage`` for ``reason`` (``value``: the measured signal)."""
    row["stage"], row["reason"] = stage, reason
    row["value"] = None if value is None else float(value)
    if row["text"] is not None:
        row["text"] = row["text"][:REJECTED_PREVIEW_CHARS]
