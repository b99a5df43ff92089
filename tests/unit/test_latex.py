"""LaTeX → text: unchanged output on ordinary papers, linear time on unclosed constructs, and a cap
on macro expansion (expected strings were produced by the cleaner before it was made linear)."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from llmray.data.readers.errors import LatexExpansionTooLarge
from llmray.data.readers.latex import latex_to_text

PAPER = (
    "\\documentclass{article}\n\\usepackage{amsmath}\n\\newcommand{\\method}{\\textsc{Verif}}\n"
    "\\begin{document}\n\\title{Checking Claims}\n\\maketitle\n"
    "\\section{Introduction}\\label{sec:intro}\n"
    "We propose \\method{}, a \\textbf{fast} and \\emph{\\textit{simple}} verifier~\\cite[p.~3]{smith2020}. "
    "It costs 5\\% of the budget (see Table~\\ref{tab:main}). % TODO: cite more\n"
    "The loss is $\\mathcal{L} = \\sum_i x_i^2$ for inputs $x \\in \\mathbb{R}^d$.\n\n"
    "\\subsection*{Results}\n"
    "\\begin{table}[t]\n\\centering\n\\begin{tabular}{lr}\n\\toprule Model & F1 \\\\ \\midrule Ours & 71.2 \\\\\n"
    "\\bottomrule\n\\end{tabular}\n\\caption{Main results on the \\textbf{dev} set.}\n\\end{table}\n"
    "\\begin{figure}[h]\\begin{tikzpicture}\\draw (0,0) -- (1,1);\\end{tikzpicture}"
    "\\caption{A line.}\\end{figure}\n"
    "\\begin{itemize}\n\\item First point.\n\\item[b)] Second point\\footnote{A note.}.\n\\end{itemize}\n"
    "``Quoted'' text \\& more.\n\\end{document}\nIgnored after the end.\n"
)
PAIRS = {
    "nested": "a \\begin{tabular}{l} x \\begin{tabular}{l} y \\end{tabular} z \\end{tabular} b",
    "unclosed": "a \\begin{tabular}{l} x \\begin{comment} c \\end{comment} y",
    "star": "a \\begin{tabular*}{l} x \\end{tabular} y \\end{tabular*} b \\begin{tabularx}{l} z",
    "other_end": "a \\end{tikzpicture} b \\begin{tikzpicture} c \\end{lstlisting} d",
    "empty": "a \\begin{comment}\\end{comment}\\end{comment} b",
}
MACROS = (
    "\\newcommand{\\dataset}{SciFact}\n\\newcommand\\ie{i.e.}\n\\newcommand*{\\etal}{et al.}\n"
    "\\renewcommand{\\dataset}{SciFact-Open}\n\\newcommand{\\pair}{(claim, {abstract})}\n"
    "\\newcommand{\\arg}[1]{#1!}\n\\begin{document}\n"
    "We release \\dataset{} and \\dataset, \\ie{} \\pair. Smith \\etal\\ agree; \\datasets and \\arg{x} are not macros."
)
PARAGRAPH = ("We study the \\textbf{robustness} of language models to noisy input, following prior work"
             "~\\cite{smith2020}. Let $x_i \\in \\mathbb{R}^d$ be the embedding of token $i$; the loss is averaged"
             " over the batch.\n\n")
TEN_MB = 10_000_000


def repeated(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def test_paper_text_is_unchanged():
    assert latex_to_text(PAPER) == (
        "Checking Claims\n\nIntroduction\n\n"
        "We propose Verif, a fast and simple verifier. It costs 5% of the budget (see Table ).\n"
        "The loss is $L = _i x_i^2$ for inputs $x R^d$.\n\nResults\n\nMain results on the dev set.\n\nA line.\n\n"
        "First point.\n[b)] Second point.\n\n\"Quoted\" text more.")


@pytest.mark.parametrize("case, expected", [
    ("nested", "a z\nb"), ("unclosed", "a\nl x y"), ("star", "a b\nl z"), ("other_end", "a\nb\nc\nd"),
    ("empty", "a\nb")])
def test_dropped_environment_pairing_is_unchanged(case, expected):
    assert latex_to_text(PAIRS[case]) == expected


def test_simple_macros_expand_as_before():
    assert latex_to_text(MACROS) == (
        "We release SciFact-Open and SciFact-Open, i.e. (claim, abstract). Smith et al.\\ agree; and x are not macros.")


@pytest.mark.parametrize("hostile", [
    "\\begin{tabular}{ll}\n",  # an environment opened after every paragraph and never closed
    "\\cite[see \\emph[\\section[short ",  # optional arguments opened and never closed
])
def test_unclosed_constructs_take_linear_time(hostile):
    source = repeated(PARAGRAPH + hostile, TEN_MB)
    started = time.perf_counter()
    text = latex_to_text(source)
    assert time.perf_counter() - started < 5
    assert text.count("robustness of language models to noisy input") == source.count("robustness}") > 40_000


def test_macro_bomb_is_refused_before_it_is_built():
    bodies = {name: f"{name} " * 1000 for name in ("alpha", "beta", "gamma")}
    source = ("".join(f"\\newcommand{{\\{name}}}{{{body}}}\n" for name, body in bodies.items())
              + "\\begin{document}\n" + "\\alpha \\beta \\gamma\n" * 2000 + "\\end{document}\n")
    assert len(source) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(LatexExpansionTooLarge, match=f"{len(source):,} source chars to 3[0-9],[0-9,]+ chars, "
                                                         "over max_chars=1,000,000") as raised:
            latex_to_text(source, max_chars=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000
    assert raised.value.kind == "LatexExpansionTooLarge"


def test_cap_counts_the_expanded_text_only():
    source = "\\newcommand{\\x}{xyz}\\begin{document}\\x\\x\\end{document}"
    assert latex_to_text(source, max_chars=6) == latex_to_text(source) == "xyzxyz"
    with pytest.raises(LatexExpansionTooLarge):
        latex_to_text(source, max_chars=5)
    shrinking = "\\newcommand{\\longname}{x}\\begin{document}\\longname\\longname\\end{document}"
    assert latex_to_text(shrinking, max_chars=5) == "xx"  # the input's own size is the caller's limit
    assert latex_to_text(MACROS, max_chars=10_000) == latex_to_text(MACROS)
