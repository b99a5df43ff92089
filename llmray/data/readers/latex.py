"""LaTeX source → plain text for the pretraining mix.

A regex cleaner, not a TeX engine: it keeps what a reader of the PDF would read and drops what
only TeX reads. In order: comments; the preamble (text before ``\\begin{document}`` when
present); environments whose content is not prose (figures' float bodies are kept for their
captions, but ``tikzpicture``, ``tabular`` alignment marks and bibliography commands go);
reference-like commands whose argument is an identifier (``\\cite``, ``\\ref``, ``\\label``);
formatting commands whose argument is text (``\\textbf{x}`` → ``x``, ``\\section{x}`` → ``x``);
then remaining command names and braces. Inline math is kept as written (``$x^2$``): dropping
it would break sentences, and math is legitimate pretraining text.

Input is untrusted, so the work is linear in its size: no pattern rescans the rest of the file
from each of many unclosed openings. Dropped environments are paired by one scan plus a bisect
instead of a lazy ``.*?`` (an unclosed ``\\begin{tabular}`` after every paragraph made that
quadratic), optional ``[...]`` arguments are at most :data:`MAX_OPTIONAL_ARG` characters, and
macro uses are found with one generic pattern rather than an alternation of every defined name.
Macro expansion is the one step that grows the text (a few long macros used thousands of times
turn kilobytes into gigabytes), so ``max_chars`` refuses it with
:class:`~llmray.data.readers.errors.LatexExpansionTooLarge` before the expanded string is built.
"""

from __future__ import annotations

import bisect
import re

from llmray.data.readers.errors import LatexExpansionTooLarge

MAX_OPTIONAL_ARG = 256
"""Longest ``[...]`` optional argument recognised; a longer or unclosed ``[`` is left as text."""

_COMMENT = re.compile(r"(?<!\\)%.*$", re.MULTILINE)
_BEGIN_DOCUMENT = re.compile(r"\\begin\{document\}")
_END_DOCUMENT = re.compile(r"\\end\{document\}")
_DROPPED_ENVIRONMENTS = ("tikzpicture", "thebibliography", "comment", "lstlisting", "algorithmic", "tabular",
                         "tabular*", "tabularx")
_DROPPED_MARK = re.compile(
    r"\\(begin|end)\{(" + "|".join(re.escape(e) for e in _DROPPED_ENVIRONMENTS) + r")\}")
# Linear without a length bound: an unclosed body's scan can pass a later definition only if that
# one's body is closed (it then matches), so the scan ends at the next unclosed definition.
_SIMPLE_MACRO = re.compile(r"\\(?:re)?newcommand\*?\{?\\([A-Za-z]+)\}?\{((?:[^{}#]|\{[^{}#]*\})*)\}")
_MACRO_USE = re.compile(r"\\([A-Za-z]+)")
_OPTIONAL_ARG = r"\[[^\]]{0,%d}\]" % MAX_OPTIONAL_ARG
_ID_COMMANDS = re.compile(
    r"\\(?:cite[a-z]*|ref|eqref|autoref|cref|Cref|label|url|bibliographystyle|bibliography|"
    r"includegraphics|input|include|usepackage|documentclass|newcommand|renewcommand|vspace|hspace|footnote)\*?"
    r"(?:" + _OPTIONAL_ARG + r")*\{[^{}]*\}")
_SECTION = re.compile(r"\\(?:part|chapter|section|subsection|subsubsection|paragraph|caption|title)\*?"
                      r"(?:" + _OPTIONAL_ARG + r")?\{([^{}]*)\}")
_TEXT_COMMAND = re.compile(r"\\[A-Za-z]+\*?(?:" + _OPTIONAL_ARG + r")?\{([^{}]*)\}")
_ENV_MARK = re.compile(r"\\(?:begin|end)\{[^{}]*\}(?:" + _OPTIONAL_ARG + r")?")
_BARE_COMMAND = re.compile(r"\\[A-Za-z]+\*?")
_ESCAPED = {r"\%": "%", r"\&": "&", r"\_": "_", r"\#": "#", r"\$": "$", "~": " ", r"\\": "\n", "``": '"', "''": '"'}
_BLANKS = re.compile(r"[ \t]+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" +([.,;:!?])")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def latex_to_text(source: str, *, max_chars: int | None = None) -> str:
    """Plain text of ``source``.

    Raises :class:`LatexExpansionTooLarge` when macro expansion would grow the text past ``max_chars``
    characters (``None``: no cap; the caller caps the source itself).
    """
    text = _COMMENT.sub("", source)
    begin = _BEGIN_DOCUMENT.search(text)
    if begin:
        end = _END_DOCUMENT.search(text, begin.end())
        text = text[begin.end():end.start() if end else len(text)]
    text = _expand_simple_macros(text, source, max_chars)
    text = _drop_environments(text)
    text = _ID_COMMANDS.sub("", text)
    text = _SECTION.sub(lambda m: "\n\n" + m.group(1) + "\n\n", text)
    text = _ENV_MARK.sub("\n", text)
    for _ in range(3):  # nested \textbf{\emph{x}} unwraps one level per pass
        text = _TEXT_COMMAND.sub(r"\1", text)
    for escaped, plain in _ESCAPED.items():
        text = text.replace(escaped, plain)
    text = _BARE_COMMAND.sub("", text)
    text = text.replace("{", "").replace("}", "").replace("&", " ")
    text = _BLANKS.sub(" ", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)  # "fast \cite{x}." left "fast ."
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def _expand_simple_macros(text: str, source: str, max_chars: int | None) -> str:
    """Expand argument-free ``\\newcommand{\\name}{body}`` macros (paper names, abbreviations), in one pass."""
    macros = dict(_SIMPLE_MACRO.findall(source))
    if not macros:
        return text
    if max_chars is not None:
        growth = sum(len(macros[m[1]]) - len(m[0]) for m in _MACRO_USE.finditer(text) if m[1] in macros)
        if growth > 0 and len(text) + growth > max_chars:
            raise LatexExpansionTooLarge(
                f"LaTeX macros would expand {len(source):,} source chars to {len(text) + growth:,} chars, "
                f"over max_chars={max_chars:,}")
    return _MACRO_USE.sub(lambda m: macros.get(m[1], m[0]), text)


def _drop_environments(text: str) -> str:
    """Remove each dropped environment from its ``\\begin{E}`` to the first ``\\end{E}`` after it.

    What ``\\begin{E}.*?\\end{E}`` removed, without rescanning the rest of the text from every
    unclosed begin: an unclosed begin stays (``_ENV_MARK`` removes it later), scanning resumes
    after each removed span, so a begin inside one is removed with it.
    """
    begins, ends = [], {}
    for mark in _DROPPED_MARK.finditer(text):
        if mark[1] == "begin":
            begins.append((mark.start(), mark.end(), mark[2]))
        else:
            ends.setdefault(mark[2], []).append(mark.start())
    pieces, kept_from = [], 0
    for start, after, name in begins:
        if start < kept_from:
            continue
        positions = ends.get(name, [])
        index = bisect.bisect_left(positions, after)
        if index < len(positions):
            pieces.append(text[kept_from:start])
            kept_from = positions[index] + len(r"\end{}") + len(name)
    pieces.append(text[kept_from:])
    return "".join(pieces)
