"""datatrove's side of bench/curate_filters.py; runs in the datatrove venv (not llmray's).

datatrove installs ``fasttext-numpy2-wheel``, which writes the same ``fasttext`` module files as
llmray's ``fasttext``; keeping it in its own venv (created by curate_filters.py) leaves the
product environment untouched (PITFALLS.md).

    python datatrove_peer.py speed INPUT.jsonl LID_MODEL          → one JSON line {docs, seconds, kept}
    python datatrove_peer.py decisions INPUT.jsonl LID_MODEL OUT  → OUT: one JSON line per doc {group: kept}

Filters are datatrove 0.10.1 defaults, called through ``filter(doc)`` in pipeline order with the
first failure ending a document (what a datatrove pipeline does, minus its I/O). The language
filter gets the local ``lid.176.ftz`` (datatrove would download ``lid.176.bin``).
"""

from __future__ import annotations

import json
import sys
import time


def build_filters(lid_model: str):
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LanguageFilter)
    from fasttext.FastText import _FastText

    language = LanguageFilter(languages=["en"], language_threshold=0.65)
    language.model._model = _FastText(lid_model)
    return {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
            "c4": C4QualityFilter(), "fineweb": FineWebQualityFilter(), "lid": language}


def passes(filter_, doc) -> bool:
    result = filter_.filter(doc)
    return result[0] if isinstance(result, tuple) else bool(result)


def load(path: str):
    from datatrove.data import Document

    with open(path, encoding="utf-8") as handle:
        return [Document(text=json.loads(line)["text"], id=str(i)) for i, line in enumerate(handle)]


def speed(path: str, lid_model: str) -> None:
    filters = build_filters(lid_model)
    docs = load(path)
    passes(filters["gopher_quality"], load(path)[0])  # load spaCy's tokenizer outside the timing
    started = time.perf_counter()
    kept = 0
    for doc in docs:
        if all(passes(f, doc) for f in filters.values()):  # all() stops at the first failure
            kept += 1
    print(json.dumps({"docs": len(docs), "seconds": time.perf_counter() - started, "kept": kept}))


def decisions(path: str, lid_model: str, out: str) -> None:
    from datatrove.data import Document

    filters = build_filters(lid_model)
    with open(out, "w", encoding="utf-8") as handle:
        for doc in load(path):
            row = {name: passes(f, Document(text=doc.text, id=doc.id)) for name, f in filters.items()}
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"speed": speed, "decisions": decisions}[mode](*args)
