"""The tokenizer report: how well the vocabulary compresses each source and held-out text.

Figures (``report.json`` + a readable ``report.md`` beside the tokenizer):

* **bytes per token** of UTF-8 text, per source (on that source's training-split documents, up
  to ``report_chars``) and on held-out documents (the validation split, never trained on). The
  trivial baseline is a byte-level tokenizer (vocabulary 256, exactly 1 byte per token), so
  ``bytes_per_token`` is also how many times shorter sequences are than with raw bytes.
* **vocabulary usage**: the share of ids that occur at least once in all the report text;
  a low share on a large sample means merges were spent on rare strings.
* **longest tokens** by decoded byte length (often runs of ``=`` or whitespace, or boilerplate).

``report.json`` repeats ``training.json`` without its wall time (``seconds``, kept in
``training.json`` and ``report.md``), so the same data and config give the same bytes whichever
plan trained the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmray import runs, storage
from llmray.report import escape_markdown

LONGEST = 20


@dataclass
class ReportTexts:
    """The text the report encodes, taken in document order: per source (training split) and
    held out (``source`` None), each bucket taking texts while it holds fewer than ``budget``
    characters.

    A bucket so keeps a prefix of its texts. Gathering one per file and then :meth:`extend`-ing
    them in file order therefore keeps exactly what one pass over all the files keeps, while each
    file sends on at most about ``budget`` characters per bucket."""

    budget: int
    sources: dict[str, list[str]] = field(default_factory=dict)
    held_out: list[str] = field(default_factory=list)
    _chars: dict[str | None, int] = field(default_factory=dict, repr=False)

    def add(self, source: str | None, text: str) -> None:
        held = self._chars.get(source, 0)
        if held < self.budget:
            (self.held_out if source is None else self.sources.setdefault(source, [])).append(text)
            self._chars[source] = held + len(text)

    def extend(self, other: ReportTexts) -> None:
        for source, texts in other.sources.items():
            for text in texts:
                self.add(source, text)
        for text in other.held_out:
            self.add(None, text)


def compression(tokenizer, texts: list[str]) -> dict | None:
    """Documents, bytes, tokens (no BOS) and bytes per token of ``texts``; None when empty."""
    if not texts:
        return None
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    size = sum(len(t.encode("utf-8")) for t in texts)
    return {"documents": len(texts), "bytes": size, "tokens": tokens,
            "bytes_per_token": round(size / max(tokens, 1), 4),
            "tokens_vs_byte_baseline": round(tokens / max(size, 1), 4)}


def used_ids(tokenizer, texts: list[str]) -> set[int]:
    used: set[int] = set()
    for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
        used.update(encoding.ids)
    return used


def longest_tokens(tokenizer, count: int = LONGEST) -> list[dict]:
    """The ``count`` vocabulary entries with the most bytes, decoded (specials excluded)."""
    from tokenizers import decoders

    byte_decoder = decoders.ByteLevel()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    entries = []
    for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
        if token in special:
            continue
        text = byte_decoder.decode([token])
        entries.append({"id": token_id, "text": text, "bytes": len(token)})  # one char per byte
    entries.sort(key=lambda e: (-e["bytes"], e["id"]))
    return entries[:count]


def build_report(tokenizer, source_texts: dict[str, list[str]], held_out_texts: list[str]) -> dict:
    all_texts = [t for texts in source_texts.values() for t in texts] + held_out_texts
    used = used_ids(tokenizer, all_texts)
    vocab_size = tokenizer.get_vocab_size()
    return {
        "vocab_size": vocab_size,
        "byte_baseline": {"vocab_size": 256, "bytes_per_token": 1.0},
        "sources": {source: compression(tokenizer, texts) for source, texts in sorted(source_texts.items())},
        "held_out": compression(tokenizer, held_out_texts),
        "vocab_usage": {"used": len(used), "fraction": round(len(used) / vocab_size, 4)},
        "longest_tokens": longest_tokens(tokenizer),
    }


def write_report(report: dict, training: dict, directory: Path | str) -> None:
    timeless = {key: value for key, value in training.items() if key != "seconds"}
    storage.write_json(runs.at(directory, "report.json"), {**report, "training": timeless})
    storage.write_text(runs.at(directory, "report.md"), render_markdown(report, training))


def render_markdown(report: dict, training: dict) -> str:
    lines = [f"# Tokenizer report (vocabulary {report['vocab_size']:,})", "",
             f"Trained in {training['seconds']} s on {sum(training['chars'].values()):,} characters: "
             + ", ".join(f"{s} {c:,}" for s, c in sorted(training["chars"].items())) + ".", "",
             "| text | documents | bytes | tokens | bytes/token | tokens vs bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = [(name, stats) for name, stats in report["sources"].items()]
    rows.append(("held-out (val split)", report["held_out"]))
    for name, stats in rows:
        if stats is None:
            lines.append(f"| {name} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {name} | {stats['documents']:,} | {stats['bytes']:,} | {stats['tokens']:,} | "
                     f"{stats['bytes_per_token']:.3f} | {stats['tokens_vs_byte_baseline']:.3f} |")
    lines.append("| byte-level baseline | | | | 1.000 | 1.000 |")
    usage = report["vocab_usage"]
    lines += ["", f"Vocabulary usage on the report text: {usage['used']:,} of {report['vocab_size']:,} ids "
                  f"({usage['fraction']:.1%}).", "", "Longest tokens:", ""]
    # tokens are learnt from the data: escaped, not in a code span (a token may hold backticks)
    lines += [f"- {entry['bytes']} bytes, id {entry['id']}: {escape_markdown(repr(entry['text']))}"
              for entry in report["longest_tokens"]]
    return "\n".join(lines) + "\n"
