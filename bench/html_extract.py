"""HTML main-text extraction: Resiliparse vs trafilatura on the real Common Crawl pages in shared/data.

    python bench/html_extract.py [--quick] [--repeats N]

Both extractors get the same decoded HTML of every ``response`` record in ../shared/data/web_cc_warc
(one thread, same process, alternating, median of ``--repeats``). Speed is pages/s and MB of
HTML per second. There is no gold main text for these pages, so quality is shown by proxies:
pages with any text extracted, mean characters extracted, the share of extracted lines that are
short (≤ 30 characters: navigation/boilerplate-like), and the word-set overlap (Jaccard) of the two
extractors' outputs per page. For the Wikipedia page that has a Common Crawl WET record, the
share of the WET text's words each extractor recovers is also reported.

The last line printed is one JSON object with those figures. trafilatura is in the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _load import LoadWatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmray.data.readers import html  # noqa: E402

WARCS = REPO.parent / "shared" / "data" / "web_cc_warc"


def pages() -> list[tuple[str, str]]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    found = []
    for path in sorted(WARCS.glob("*.warc*")):
        if ".wat" in path.name or ".wet" in path.name:
            continue
        with open(path, "rb") as handle:
            for record in ArchiveIterator(handle, record_types=WarcRecordType.response, parse_http=True):
                found.append((record.headers.get("WARC-Target-URI"),
                              html.decode_html(record.reader.read(), record.http_charset)))
    return found


def wet_text(url: str) -> str | None:
    for doc in html.iter_warc(WARCS / "whirlwind.warc.wet.gz", "wet", "resiliparse", 10 << 20):
        if doc.url == url:
            return doc.text
    return None


def words(text: str) -> set[str]:
    return set(text.lower().split())


def quality(outputs: list[str]) -> dict:
    lines = [line for text in outputs for line in text.splitlines() if line.strip()]
    return {"pages_with_text": sum(bool(t.strip()) for t in outputs),
            "mean_chars": round(statistics.mean(len(t) for t in outputs), 1),
            "short_line_share": round(sum(len(line.strip()) <= 30 for line in lines) / max(1, len(lines)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timing round (the page set is small anyway)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load = LoadWatch(1)
    repeats = 1 if args.quick else args.repeats
    docs = pages()
    megabytes = sum(len(h.encode()) for _, h in docs) / 1e6
    timings: dict[str, list[float]] = {"resiliparse": [], "trafilatura": []}
    outputs: dict[str, list[str]] = {}
    for _ in range(repeats):
        for name in timings:
            started = time.perf_counter()
            outputs[name] = [html.extract_text(h, name) for _, h in docs]
            timings[name].append(time.perf_counter() - started)
    result = {"pages": len(docs), "html_mb": round(megabytes, 3), "repeats": repeats}
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        result[name] = {"pages_per_s": round(len(docs) / median, 1), "mb_per_s": round(megabytes / median, 3),
                        **quality(outputs[name])}
    overlaps = []
    for a, b in zip(outputs["resiliparse"], outputs["trafilatura"]):
        union = words(a) | words(b)
        overlaps.append(len(words(a) & words(b)) / len(union) if union else 1.0)
    result["jaccard_between_extractors"] = round(statistics.mean(overlaps), 3)
    for i, (url, _) in enumerate(docs):
        reference = wet_text(url) if "wikipedia" in (url or "") else None
        if reference:
            ref = words(reference)
            result["wet_word_recall"] = {name: round(len(words(outputs[name][i]) & ref) / len(ref), 3)
                                         for name in timings}
    result["speedup_resiliparse"] = round(result["resiliparse"]["pages_per_s"] / result["trafilatura"]["pages_per_s"], 1)
    print(json.dumps({**result, **load.fields()}))


if __name__ == "__main__":
    main()
