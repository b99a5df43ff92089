"""The demo corpus that exists on any machine: real text found on a fresh Linux box with Python.

Why: the end-to-end demo and CI must run on a new machine with no downloads. A Linux machine
with Python already holds megabytes of real, varied text:

* ``python_stdlib``  the standard library's ``.py`` sources (code; one document per file);
* ``pydoc_topics``   ``pydoc_data.topics`` (English prose about Python; one document per topic);
* ``doc``            ``/usr/share/doc``: READMEs, changelogs and hundreds of ``copyright``
                     files that repeat the same licenses (real near-duplicates for dedup);
* ``man``            man pages when present (roff markup stripped to text).

Files are listed in sorted order so the corpus, and every id derived from it, is stable.
Reading is per file so Ray Data can spread files over tasks.
"""

from __future__ import annotations

import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llmray import byte_streams
from llmray.data.readers import errors

KINDS = ("python_stdlib", "pydoc_topics", "doc", "man")
DOC_ROOT = Path("/usr/share/doc")
MAN_ROOT = Path("/usr/share/man")
PYDOC_TOPICS = "pydoc_data/topics.py"

# Files under /usr/share/doc worth reading as text; images, html and binaries are skipped.
_DOC_SUFFIXES = {"", ".txt", ".md", ".rst", ".gz", ".Debian", ".news", ".changes"}
_MAX_FILE_BYTES = 2_000_000
# Only English man pages (section directories at the top level, not translations).
_MAN_SECTION = re.compile(r"man[1-9][a-z]*$")


@dataclass(frozen=True)
class MachineFile:
    """One file of the machine-local corpus: where it is and which kind of text it holds."""

    path: str
    kind: str


def discover(kinds: tuple[str, ...] | list[str] = KINDS, max_files_per_kind: int | None = None) -> list[MachineFile]:
    """List the files of each requested kind that exist here, sorted; missing roots are skipped."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown machine-text kind(s) {unknown}; expected some of {list(KINDS)}")
    found: list[MachineFile] = []
    for kind in kinds:
        paths = sorted(_DISCOVER[kind]())
        if max_files_per_kind is not None:
            paths = paths[:max_files_per_kind]
        found.extend(MachineFile(str(p), kind) for p in paths)
    return found


def _stdlib_sources() -> Iterator[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib.rglob("*.py"):
        relative = path.relative_to(stdlib).parts
        if relative[0] in ("site-packages", "dist-packages") or path.name == "topics.py":
            continue
        if path.stat().st_size <= _MAX_FILE_BYTES:
            yield path


def _pydoc_topics() -> Iterator[Path]:
    path = Path(sysconfig.get_paths()["stdlib"]) / PYDOC_TOPICS
    if path.is_file():
        yield path


def _doc_files() -> Iterator[Path]:
    if not DOC_ROOT.is_dir():
        return
    for path in DOC_ROOT.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.suffix in _DOC_SUFFIXES \
                and path.stat().st_size <= _MAX_FILE_BYTES:
            yield path


def _man_pages() -> Iterator[Path]:
    if not MAN_ROOT.is_dir():
        return
    for section in MAN_ROOT.iterdir():
        if section.is_dir() and _MAN_SECTION.match(section.name):
            yield from (p for p in section.iterdir() if p.is_file() and not p.is_symlink())


_DISCOVER = {"python_stdlib": _stdlib_sources, "pydoc_topics": _pydoc_topics,
             "doc": _doc_files, "man": _man_pages}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_bytes(path: str, limit: int) -> bytes:
    """The file's (decompressed) bytes; over ``limit`` raises :class:`~llmray.data.readers.errors.RecordTooLarge`."""
    with byte_streams.open_binary(path) as handle:
        data = byte_streams.read_at_most(handle, limit)
    if len(data) > limit:
        raise errors.RecordTooLarge(f"{path}: more than {limit} bytes (read stopped there)", len(data))
    return data


def looks_binary(data: bytes) -> bool:
    """NUL bytes in the first 8 KiB mark a binary file (the heuristic git and grep use)."""
    return b"\0" in data[:8192]


def read_documents(file: MachineFile, max_bytes: int) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(record_offset, text, meta)`` for each document in one machine file.

    Raises a :class:`~llmray.data.readers.errors.DataError` for a file that is binary or larger
    than ``max_bytes``, so the caller can quarantine it.
    """
    if file.kind == "pydoc_topics":
        yield from _pydoc_topic_documents()
        return
    data = read_bytes(file.path, max_bytes)
    if looks_binary(data):
        raise errors.DataError(f"{file.path} is binary, expected text")
    text = data.decode("utf-8", errors="replace")
    if file.kind == "man":
        text = strip_roff(text)
    yield 0, text, {"kind": file.kind, "path": file.path}


def _pydoc_topic_documents() -> Iterator[tuple[int, str, dict]]:
    from pydoc_data.topics import topics

    for offset, name in enumerate(sorted(topics)):
        yield offset, topics[name], {"kind": "pydoc_topics", "topic": name}


_ROFF_COMMENT = re.compile(r'^\.\\".*$|^\'\\".*$', re.MULTILINE)
_ROFF_REQUEST = re.compile(r"^\.(?:[A-Za-z]{1,3})(?:[ \t]+(.*))?$", re.MULTILINE)
_ROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")
_ROFF_ESCAPE = re.compile(r"\\(?:\(..|\[[^\]]*\]|[-e&|^%]|s[+-]?\d)")


def strip_roff(text: str) -> str:
    """Turn man-page roff source into readable text: drop comments and requests, keep arguments."""
    text = _ROFF_COMMENT.sub("", text)
    text = _ROFF_REQUEST.sub(lambda m: (m.group(1) or "").replace('"', ""), text)
    text = _ROFF_FONT.sub("", text)
    text = _ROFF_ESCAPE.sub(lambda m: "-" if m.group(0) == "\\-" else "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
