"""LaTeX source → plain text for the pretraining mix.

A regex cleaner, not a TeX engine: it keeps what a reader of the PDF would read and drops what
only TeX reads. In order: comments; the preamble (text before ``\\begin{document}`` when
present); environments whose content is not prose (figures' float bodies are kept for their
captions, but ``tikzpicture``, ``tabular`` alignment marks and bibliography commands go);
reference-like commands whose argument is an identifier (``\\cite``, ``\\ref``, ``\\label``);
formatting commands whose argument is text (``\\textbf{x}`` → ``x``, ``\\section{x}`` → ``x``);
then remaining command names and braces. Inline math is kept as written (``$x^2$``): dropping
it would break sentences, and math is legitimate pretraining text.
"""

from __future__ import annotations

import re

_COMMENT = re.compile(r"(?<!\\)%.*$", re.MULTILINE)
_BEGIN_DOCUMENT = re.compile(r"\\begin\{document\}")
_END_DOCUMENT = re.compile(r"\\end\{document\}")
_DROPPED_ENVIRONMENTS = ("tikzpicture", "thebibliography", "comment", "lstlisting", "algorithmic", "tabular",
                         "tabular*", "tabularx")
_DROPPED_ENV = re.compile(
    r"\\begin\{(" + "|".join(re.escape(e) for e in _DROPPED_ENVIRONMENTS) + r")\}.*?\\end\{\1\}", re.DOTALL)
_SIMPLE_MACRO = re.compile(r"\\(?:re)?newcommand\*?\{?\\([A-Za-z]+)\}?\{((?:[^{}#]|\{[^{}#]*\})*)\}")
_ID_COMMANDS = re.compile(
    r"\\(?:cite[a-z]*|ref|eqref|autoref|cref|Cref|label|url|bibliographystyle|bibliography|"
    r"includegraphics|input|include|usepackage|documentclass|newcommand|renewcommand|vspace|hspace|footnote)\*?"
    r"(?:\[[^\]]*\])*\{[^{}]*\}")
_SECTION = re.compile(r"\\(?:part|chapter|section|subsection|subsubsection|paragraph|caption|title)\*?"
                      r"(?:\[[^\]]*\])?\{([^{}]*)\}")
_TEXT_COMMAND = re.compile(r"\\[A-Za-z]+\*?(?:\[[^\]]*\])?\{([^{}]*)\}")
_ENV_MARK = re.compile(r"\\(?:begin|end)\{[^{}]*\}(?:\[[^\]]*\])?")
_BARE_COMMAND = re.compile(r"\\[A-Za-z]+\*?")
_ESCAPED = {r"\%": "%", r"\&": "&", r"\_": "_", r"\#": "#", r"\$": "$", "~": " ", r"\\": "\n", "``": '"', "''": '"'}
_BLANKS = re.compile(r"[ \t]+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" +([.,;:!?])")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def latex_to_text(source: str) -> str:
    text = _COMMENT.sub("", source)
    begin = _BEGIN_DOCUMENT.search(text)
    if begin:
        end = _END_DOCUMENT.search(text, begin.end())
        text = text[begin.end():end.start() if end else len(text)]
    text = _expand_simple_macros(text, source)
    text = _DROPPED_ENV.sub("", text)
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


def _expand_simple_macros(text: str, source: str) -> str:
    """Expand argument-free ``\\newcommand{\\name}{body}`` macros (paper names, abbreviations)."""
    macros = {name: body for name, body in _SIMPLE_MACRO.findall(source)}
    if not macros:
        return text
    pattern = re.compile(r"\\(" + "|".join(sorted(map(re.escape, macros), key=len, reverse=True)) + r")(?![A-Za-z])")
    return pattern.sub(lambda m: macros[m.group(1)], text)
