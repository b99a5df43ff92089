"""What counts as bad *data*, as opposed to a bug.

Readers quarantine a record and go on only for the exceptions named in :data:`DATA_ERRORS`:
damaged streams (``OSError``, ``EOFError``, ``zlib.error``, ``tarfile.TarError``, ``csv.Error``),
text that is not text (``UnicodeError``), and the :class:`DataError` family that llmray's own
parsers raise (a record over its size limit, a LaTeX macro bomb). Anything else (``TypeError``,
``KeyError``, ``AttributeError``, a plain ``ValueError`` from our code) is a programming error:
it propagates with its traceback and fails the stage, so a regression can never turn a corpus
into quarantine rows that look like dirty input.
"""

from __future__ import annotations

import csv
import tarfile
import zlib


class DataError(ValueError):
    """A record that cannot become a document; ``kind`` is the quarantine row's ``error``."""

    kind = "DataError"

    def __init__(self, message: str):
        super().__init__(message)


class RecordTooLarge(DataError):
    """A record, line, member or file over ``max_doc_bytes`` (``size``: bytes seen, at least limit + 1)."""

    kind = "DocumentTooLarge"

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size

    def __reduce__(self):
        return RecordTooLarge, (str(self), self.size)


class UnsafeMember(DataError):
    """An archive member that is a link or whose name leaves the archive (``../``, absolute)."""

    kind = "UnsafeArchiveMember"


class LatexExpansionTooLarge(DataError):
    """LaTeX whose ``\\newcommand`` macros would expand past ``max_chars`` (a macro bomb)."""

    kind = "LatexExpansionTooLarge"


class QuarantineExceeded(RuntimeError):
    """More of a source's records were unreadable than ``max_quarantine_fraction`` allows: a wrong
    reader or field name, or a bug, rather than dirty data; the stage fails instead of finishing
    with (nearly) nothing."""


DATA_ERRORS: tuple[type[BaseException], ...] = (
    DataError, OSError, EOFError, zlib.error, tarfile.TarError, csv.Error, UnicodeError,
)


def error_kind(exc: BaseException) -> str:
    """The quarantine ``error`` of a data exception: the DataError's kind, else the class name."""
    return exc.kind if isinstance(exc, DataError) else type(exc).__name__
