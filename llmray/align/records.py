"""What every alignment data loader shares: reading JSONL records, checking messages, quarantine.

Loaders yield either a good item or a :class:`Quarantined` record (``path``, ``offset``,
``error``, ``message``: the quarantine contract of DESIGN.md), never raise on bad data, so a
stage finishes on dirty input and every dropped record is explained. ``offset`` is the 1-based
line number of the record in its file. ``error`` is a short machine-readable reason
(``invalid_json``, ``wrong_type``, ``missing_field``, ``bad_role``, ``empty_content``,
``no_assistant_turn``, ``bad_turn_order``, ...); ``message`` says which field and what was expected.

Train/validation membership is a hash of a record's *group* (an OASST tree, a source record),
so related conversations never straddle the split and a record's split never changes when
others are added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from llmray import jsonl, storage
from llmray.config import param
from llmray.data.readers.errors import QuarantineExceeded

ROLES = ("system", "user", "assistant")


@dataclass
class RecordSource:
    """What every SFT and DPO data source names: a JSONL file of one ``kind`` and how much of it to use."""

    path: str = param("", doc="JSONL(.gz) file")
    name: str | None = param(None, doc="source name in metrics and ids; null = the kind")
    max_records: int | None = param(None, doc="use at most this many records' items (conversations, pairs), "
                                              "the first in file order; null = all", min=1)
    include_synthetic: bool = param(False, doc="oasst only: keep model-written (synthetic) trees")

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"{self.kind} source needs a path")  # kind: the subclass's format field

    @property
    def label(self) -> str:
        return self.name or self.kind


class RecordError(ValueError):
    """A record that does not have the expected shape; ``error`` is the reason code."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


@dataclass(frozen=True)
class Quarantined:
    path: str
    offset: int
    error: str
    message: str

    def to_dict(self) -> dict:
        return {"path": self.path, "offset": self.offset, "error": self.error, "message": self.message}


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict | Quarantined]]:
    """(1-based line number, JSON object or Quarantined) for every non-blank line of a (.gz) JSONL
    file (:func:`llmray.jsonl.read_lines`); a line that is not a JSON object is quarantined."""
    path = storage.normalize(path)
    if not storage.is_file(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    for line in jsonl.read_lines(path):
        if isinstance(line.record, jsonl.BadLine):
            bad = line.record
            yield line.number, Quarantined(str(path), line.number, _LINE_ERRORS[bad.reason], str(bad))
        else:
            yield line.number, line.record


_LINE_ERRORS = {jsonl.INVALID_UTF8: "invalid_utf8", jsonl.INVALID_JSON: "invalid_json",
                jsonl.NOT_AN_OBJECT: "wrong_type", jsonl.TOO_LARGE: "too_large"}


def read_source_items(src: Any, readers: dict[str, Callable[[Any, int, Any], Iterator[Any]]]) -> Iterator[Any]:
    """Every item ``readers[src.kind]`` makes from the JSONL at ``src.path``, in file order, up to
    ``src.max_records``; a bad record comes out as :class:`Quarantined` (with its line) instead."""
    reader = readers[src.kind]
    produced = 0
    for line, record in read_jsonl(src.path):
        if isinstance(record, Quarantined):
            yield record
            continue
        try:
            items = list(reader(record, line, src))
        except RecordError as exc:
            yield Quarantined(src.path, line, exc.error, str(exc))
            continue
        for item in items:
            if src.max_records is not None and produced >= src.max_records:
                return
            produced += 1
            yield item


def field(record: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[name]`` checked to exist and be of ``kind``."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"{where} is a {type(record).__name__}, expected a JSON object")
    if name not in record or record[name] is None:
        raise RecordError("missing_field", f"{where} has no '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RecordError("wrong_type", f"{where}.{name} is a {type(value).__name__}, expected {expected}")
    return value


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """Validated ``[{"role", "content"}]``: known roles, non-empty string contents, system only first.

    Extra keys of a message are dropped (the chat template only knows role and content).
    """
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"{where} is a {type(messages).__name__}, expected a list of messages")
    if not messages:
        raise RecordError("empty_content", f"{where} is empty")
    clean = []
    for index, message in enumerate(messages):
        at = f"{where}[{index}]"
        role = field(message, "role", str, at)
        if role not in ROLES:
            raise RecordError("bad_role", f"{at}.role is {role!r}, expected one of {list(ROLES)}")
        if role == "system" and index != 0:
            raise RecordError("bad_turn_order", f"{at} is a system message after the first turn")
        content = field(message, "content", str, at)
        if not content.strip():
            raise RecordError("empty_content", f"{at}.content ({role}) is empty")
        clean.append({"role": role, "content": content})
    return clean


def check_conversation(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """Messages for SFT: valid, with an assistant turn, ending with one (the last turn is learned)."""
    clean = check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in clean):
        raise RecordError("no_assistant_turn", f"{where} has no assistant turn to learn from")
    if clean[-1]["role"] != "assistant":
        raise RecordError("bad_turn_order", f"{where} ends with a {clean[-1]['role']} turn, expected assistant")
    return clean


def unit_hash(key: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by ``key`` and ``seed``."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(group: str, val_fraction: float, seed: int = 0) -> str:
    """'val' for a ``val_fraction`` share of groups (by hash), else 'train'."""
    return "val" if unit_hash(group, seed) < val_fraction else "train"


def split_sources(sources: list[Any], read: Callable[[Any], Iterator[Any]], val_fraction: float, seed: int,
                  max_quarantine_fraction: float, copies: Callable[[Any, Any], int] | None = None
                  ) -> tuple[list, list, list[Quarantined], dict]:
    """Read every source and split its items into train and validation by group hash.

    Returns ``(train, val, quarantined, counts)`` with per-source counts of read / train / val /
    quarantined items; ``copies(item, src)`` repeats a training item (mixture weights; default 1).
    A source with more than ``max_quarantine_fraction`` of its records quarantined raises
    :class:`~llmray.data.readers.errors.QuarantineExceeded` (a wrong format or a bug, not dirt).
    """
    train, val, quarantined, counts = [], [], [], {}
    for src in sources:
        count = counts.setdefault(src.label, {"read": 0, "train": 0, "val": 0, "quarantined": 0})
        first_bad = len(quarantined)
        for item in read(src):
            if isinstance(item, Quarantined):
                quarantined.append(item)
                count["quarantined"] += 1
                continue
            count["read"] += 1
            if split_of(item.group, val_fraction, seed) == "val":
                val.append(item)
                count["val"] += 1
                continue
            n = copies(item, src) if copies else 1
            train.extend([item] * n)
            count["train"] += n
        _check_quarantine(src, count, quarantined[first_bad:first_bad + 3], max_quarantine_fraction)
    return train, val, quarantined, counts


def _check_quarantine(src: Any, count: dict, first: list[Quarantined], max_fraction: float) -> None:
    records = count["read"] + count["quarantined"]
    if records and count["quarantined"] / records > max_fraction:
        errors = "".join(f"\n    {q.error}: " + (q.message if q.message.startswith(f"{q.path}:")
                                                   else f"{q.path}:{q.offset}: {q.message}") for q in first)
        raise QuarantineExceeded(
            f"source '{src.label}' ({src.path}): {count['quarantined']} of {records} records quarantined, more "
            f"than max_quarantine_fraction={max_fraction} (check the source's kind and format; raise the "
            f"limit if the data is really this dirty); first errors:{errors}")
