"""The curate stage's writers and its funnel report.

:class:`CurateWriter` consumes the ordered row stream on the driver and routes each row to
``documents/``, ``rejected/`` or ``quarantine/`` (parquet, cut by row count so file and row-group
boundaries never depend on how Ray batched the stream), keeps ``sample_rejected`` example texts
per (stage, reason), and accumulates the funnel: documents, bytes and estimated tokens entering
and leaving each stage, per source and per reason, plus every filter signal's values for the
histograms. A stage that changes documents it keeps (dedup's boilerplate lines, contamination
flags) counts it in the rows' ``edit.*`` signals (``records.count_edits``); the sums appear on that
stage's funnel row as ``edits`` and in a "changed" column of the tables, which exists only when
some stage edited. :func:`write_report` writes ``funnel.json``, ``funnel.md`` and ``funnel_*.png``.
Each batch's drops per reason also go to ``on_dropped`` as they are counted (curate feeds the
live counter ``llmray_docs_dropped_total{reason}``), so the dashboard and the funnel agree.

Tokens are estimated as UTF-8 bytes / 4 (the usual ratio for English BPE vocabularies); the
tokenizer stage reports exact counts later.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmray import runs, storage
from llmray.data import records
from llmray.data.readers import errors

BYTES_PER_TOKEN = 4
MAX_SIGNAL_VALUES = 200_000  # per signal, for histograms (first values in stream order)
SCORE_COLUMNS = ("lang_score", "quality_score", "toxicity_score")
FIRST_ERRORS = 3  # quarantine messages kept per source for the max_quarantine_fraction error


class ParquetSetWriter:
    """Rows → ``<dir>/part-NNNNN.parquet``: fixed rows per file and per row group, atomic per file."""

    def __init__(self, directory: Path | str, schema: pa.Schema, rows_per_file: int, row_group_rows: int,
                 compression: str) -> None:
        self.directory, self.schema = directory, schema
        self.rows_per_file, self.row_group_rows = rows_per_file, min(row_group_rows, rows_per_file)
        self.compression = compression
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[str] = []
        self.rows = 0
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table.select(self.schema.names).cast(self.schema))
            self.pending_rows += table.num_rows
        while self.pending_rows >= self.row_group_rows:
            self._write_group(self.row_group_rows)

    def finish(self) -> list[str]:
        while self.pending_rows:
            self._write_group(min(self.pending_rows, self.row_group_rows))
        if not self.files and self._writer is None:
            self._open()  # an empty dataset is still a readable parquet file with the schema
        self._close()
        return self.files

    def abort(self) -> None:
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._stack = self._writer = None

    def _write_group(self, rows: int) -> None:
        rows = min(rows, self.rows_per_file - self._file_rows) if self._writer else rows
        table = pa.concat_tables(self.pending)
        group, rest = table.slice(0, rows), table.slice(rows)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None:
            self._open()
        self._writer.write_table(group, row_group_size=rows)
        self._file_rows += rows
        self.rows += rows
        if self._file_rows >= self.rows_per_file:
            self._close()

    def _open(self) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        self._stack = contextlib.ExitStack()
        handle = self._stack.enter_context(storage.atomic_output(runs.at(self.directory, name)))
        self._writer = pq.ParquetWriter(handle, self.schema, compression=self.compression)
        self._file_rows = 0
        self.files.append(name)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stack.close()
            self._stack = self._writer = None


class CurateWriter:
    """Routes ordered rows to the three datasets and accumulates the funnel statistics."""

    def __init__(self, output: Path | str, output_cfg, stage_order: list[str], sample_rejected: int,
                 on_dropped: Callable[[str, int], None] | None = None) -> None:
        def parquet_set(name: str, schema: pa.Schema) -> ParquetSetWriter:
            return ParquetSetWriter(runs.at(output, name), schema, output_cfg.rows_per_file, output_cfg.row_group_rows,
                                    output_cfg.compression)

        self.output = output
        self.documents = parquet_set("documents", records.DOCUMENT_SCHEMA)
        self.rejected = parquet_set("rejected", records.REJECTED_SCHEMA)
        self.quarantine = parquet_set("quarantine", records.QUARANTINE_SCHEMA)
        self.stage_order = list(stage_order)
        self.sample_rejected = sample_rejected
        self.samples: dict[tuple[str, str], list[dict]] = defaultdict(list)
        # (source, stage-dropped-at or "kept") → [docs, bytes as read]
        self.drops: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.reasons: Counter = Counter()  # (source, stage, reason) → docs
        self.errors: Counter = Counter()  # (source, error) → records
        self.rows: Counter = Counter()  # source → records read (quarantined included)
        self.first_errors: dict[str, list[str]] = defaultdict(list)  # source → first quarantine messages
        self.kept_bytes: Counter = Counter()  # source → UTF-8 bytes of the curated text
        self.pii: Counter = Counter()
        self.edits: Counter = Counter()  # (source, stage, count) → sum of edit.<stage>.<count> signals
        self.signals: dict[str, list[float]] = defaultdict(list)
        self.on_dropped = on_dropped  # (reason, documents) of each batch, e.g. a live counter

    def add(self, table: pa.Table) -> None:
        columns = {name: table.column(name).to_pylist() for name in
                   ("source", "bytes", "error", "stage", "reason", "signals", "text", *SCORE_COLUMNS)}
        quarantined = [e is not None for e in columns["error"]]
        rejected = [not q and r is not None for q, r in zip(quarantined, columns["reason"])]
        kept = [not q and not r for q, r in zip(quarantined, rejected)]
        self.quarantine.add(table.filter(pa.array(quarantined)))
        self.rejected.add(table.filter(pa.array(rejected)))
        self.documents.add(table.filter(pa.array(kept)))
        messages = table.column("message").to_pylist()
        dropped: Counter = Counter()  # reason -> documents of this batch
        for i, source in enumerate(columns["source"]):
            self.rows[source] += 1
            if quarantined[i]:
                dropped["quarantined:" + columns["error"][i]] += 1
                self._count(source, "read", "quarantined:" + columns["error"][i], 0)
                self.errors[(source, columns["error"][i])] += 1
                if len(self.first_errors[source]) < FIRST_ERRORS:
                    self.first_errors[source].append(f"{columns['error'][i]}: {messages[i]}")
                continue
            stage = columns["stage"][i] if rejected[i] else "kept"
            self._count(source, stage, columns["reason"][i] if rejected[i] else None, columns["bytes"][i] or 0)
            if rejected[i]:
                dropped[columns["reason"][i]] += 1
                self._sample(table, i, columns)
            else:
                self.kept_bytes[source] += len(columns["text"][i].encode("utf-8"))
            self._collect_signals(columns, i, source)
        if self.on_dropped is not None:
            for reason, count in dropped.items():
                self.on_dropped(reason, count)

    def _count(self, source: str, stage: str, reason: str | None, size: int) -> None:
        entry = self.drops[(source, stage)]
        entry[0] += 1
        entry[1] += size
        if reason is not None:
            self.reasons[(source, stage, reason)] += 1
        if stage not in self.stage_order and stage != "kept":
            self.stage_order.append(stage)  # a step added later (e.g. dedup) appears in arrival order

    def _sample(self, table: pa.Table, i: int, columns: dict) -> None:
        key = (columns["stage"][i], columns["reason"][i])
        if len(self.samples[key]) < self.sample_rejected:
            row = {k: table.column(k)[i].as_py() for k in ("id", "source", "stage", "reason", "value", "text")}
            self.samples[key].append(row)

    def _collect_signals(self, columns: dict, i: int, source: str) -> None:
        signals = json.loads(columns["signals"][i]) if columns["signals"][i] else {}
        for name in SCORE_COLUMNS:
            if columns[name][i] is not None:
                signals[name] = columns[name][i]
        for name, value in signals.items():
            if name.startswith("pii."):
                self.pii[name.removeprefix("pii.")] += int(value)
            elif name.startswith(records.EDIT_PREFIX):
                stage, count = name.removeprefix(records.EDIT_PREFIX).split(".", 1)
                self.edits[(source, stage, count)] += int(value)
            elif len(self.signals[name]) < MAX_SIGNAL_VALUES:
                self.signals[name].append(value)

    def check_quarantine(self, max_fraction: float) -> None:
        """Raise :class:`~llmray.data.readers.errors.QuarantineExceeded` naming every source whose quarantined share of
        records is above ``max_fraction``, with its first errors."""
        over = []
        for source, rows in sorted(self.rows.items()):
            share = sum(n for (s, _), n in self.errors.items() if s == source) / rows
            if share > max_fraction:
                first = "\n    ".join(self.first_errors[source])
                over.append(f"source '{source}': {share:.0%} of {rows} records quarantined; first errors:\n    "
                            f"{first}")
        if over:
            raise errors.QuarantineExceeded(
                f"more than max_quarantine_fraction={max_fraction} of a source's records could not be read "
                f"(a wrong reader or field, or a bug; raise limits.max_quarantine_fraction if the data is "
                f"really this dirty):\n  " + "\n  ".join(over))

    def finish(self) -> dict:
        files = {"documents": self.documents.finish(), "rejected": self.rejected.finish(),
                 "quarantine": self.quarantine.finish()}
        if self.sample_rejected:
            lines = [json.dumps(s, ensure_ascii=False) + "\n" for key in sorted(self.samples)
                     for s in self.samples[key]]
            storage.write_text(runs.at(self.output, "rejected_samples.jsonl"), "".join(lines))
        return self.summary(files)

    def abort(self) -> None:
        for writer in (self.documents, self.rejected, self.quarantine):
            writer.abort()

    def summary(self, files: dict) -> dict:
        sources = sorted({source for source, _ in self.drops})
        per_source = {source: self._funnel(source) for source in sources}
        total = self._funnel(None)
        totals = {"documents_in": total[0]["docs_in"] if total else 0,
                  "documents_out": self.documents.rows, "rejected": self.rejected.rows,
                  "quarantined": self.quarantine.rows, "bytes_out": sum(self.kept_bytes.values()),
                  "est_tokens_out": sum(self.kept_bytes.values()) // BYTES_PER_TOKEN}
        reasons = [{"source": s, "stage": st, "reason": r, "docs": n}
                   for (s, st, r), n in sorted(self.reasons.items())]
        return {"totals": totals, "stages": total, "per_source": per_source, "reasons": reasons,
                "quarantine": [{"source": s, "error": e, "records": n} for (s, e), n in sorted(self.errors.items())],
                "pii": dict(sorted(self.pii.items())), "files": files,
                "kept_bytes": dict(sorted(self.kept_bytes.items())), "signals": dict(self.signals),
                "bytes_per_token": BYTES_PER_TOKEN}

    def _funnel(self, source: str | None) -> list[dict]:
        def entry(stage: str) -> list[int]:
            if source is not None:
                return self.drops.get((source, stage), [0, 0])
            return [sum(v[k] for (s, st), v in self.drops.items() if st == stage) for k in (0, 1)]

        def edits(stage: str) -> dict[str, int]:
            found = Counter()
            for (s, st, count), n in self.edits.items():
                if st == stage and source in (None, s):
                    found[count] += n
            return dict(sorted(found.items(), key=lambda item: (not item[0].startswith("documents"), item[0])))

        kept = entry("kept")
        docs = sum(entry(stage)[0] for stage in self.stage_order) + kept[0]
        size = sum(entry(stage)[1] for stage in self.stage_order) + kept[1]
        rows = []
        for stage in self.stage_order:
            dropped_docs, dropped_bytes = entry(stage)
            rows.append({"stage": stage, "docs_in": docs, "docs_out": docs - dropped_docs, "bytes_in": size,
                         "bytes_out": size - dropped_bytes, "est_tokens_in": size // BYTES_PER_TOKEN,
                         "est_tokens_out": (size - dropped_bytes) // BYTES_PER_TOKEN})
            if edited := edits(stage):
                rows[-1]["edits"] = edited
            docs, size = docs - dropped_docs, size - dropped_bytes
        return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def write_report(output: Path | str, summary: dict, seconds: float) -> str:
    """Write funnel.json, funnel.md and histogram PNGs; return the console table."""
    signals = summary.pop("signals")
    plots = _plot_histograms(output, signals)
    summary["seconds"] = round(seconds, 3)
    summary["signal_stats"] = {name: _stats(values) for name, values in sorted(signals.items())}
    summary["plots"] = plots
    storage.write_json(runs.at(output, "funnel.json"), summary)
    table = _stage_table(summary["stages"])
    storage.write_text(runs.at(output, "funnel.md"), _markdown(summary, table))
    return table


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(values), "min": ordered[0], "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9),
            "max": ordered[-1]} if ordered else {"n": 0}


def _stage_table(stages: list[dict]) -> str:
    """The funnel as a markdown table; a "changed" column (kept documents a stage edited) only
    when some stage edited."""
    changed = any("edits" in row for row in stages)
    lines = ["| stage | docs in | docs out | kept % | MB in | MB out | est. tokens out |" + (" changed |" * changed),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---|" * changed)]
    for row in stages:
        share = 100.0 * row["docs_out"] / row["docs_in"] if row["docs_in"] else 100.0
        edits = ", ".join(f"{n:,} {name.replace('_', ' ')}" for name, n in row.get("edits", {}).items())
        lines.append(f"| {row['stage']} | {row['docs_in']:,} | {row['docs_out']:,} | {share:.1f} | "
                     f"{row['bytes_in'] / 1e6:.2f} | {row['bytes_out'] / 1e6:.2f} | {row['est_tokens_out']:,} |"
                     + (f" {edits} |" * changed))
    return "\n".join(lines)


def _markdown(summary: dict, stage_table: str) -> str:
    totals = summary["totals"]
    parts = ["# Curation funnel", "",
             f"{totals['documents_in']:,} records in, {totals['documents_out']:,} documents out "
             f"({totals['bytes_out'] / 1e6:.2f} MB, ~{totals['est_tokens_out']:,} tokens at "
             f"{summary['bytes_per_token']} bytes/token), {totals['rejected']:,} rejected, "
             f"{totals['quarantined']:,} quarantined, in {summary['seconds']:.1f} s.", "",
             "## All sources", "", stage_table, ""]
    for source, stages in summary["per_source"].items():
        parts += [f"## Source `{source}`", "", _stage_table(stages), ""]
    parts += ["## Drops by reason", "", "| source | stage | reason | docs |", "|---|---|---|---:|"]
    parts += [f"| {r['source']} | {r['stage']} | {r['reason']} | {r['docs']:,} |" for r in summary["reasons"]]
    parts += ["", "## Quarantined records", "", "| source | error | records |", "|---|---|---:|"]
    parts += [f"| {q['source']} | {q['error']} | {q['records']:,} |" for q in summary["quarantine"]]
    parts += ["", "## PII redacted", "", "| kind | replacements |", "|---|---:|"]
    parts += [f"| {kind} | {n:,} |" for kind, n in summary["pii"].items()]
    parts += ["", "## Signals (documents reaching each rule)", "",
              "| signal | n | p10 | p50 | p90 |", "|---|---:|---:|---:|---:|"]
    parts += [f"| {name} | {s['n']:,} | {s['p10']:.3g} | {s['p50']:.3g} | {s['p90']:.3g} |"
              for name, s in summary["signal_stats"].items() if s["n"]]
    parts += [""] + [f"![{Path(p).stem}]({p})" for p in summary["plots"]]
    return "\n".join(parts) + "\n"


def _plot_histograms(output: Path | str, signals: dict[str, list[float]]) -> list[str]:
    """One PNG per rule group (``funnel_<group>.png``), a histogram per signal."""
    if not signals:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(signals):
        groups[name.split(".")[0] if "." in name else "scores"].append(name)
    written = []
    for group, names in sorted(groups.items()):
        columns = min(4, len(names))
        rows = -(-len(names) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            counts, edges = np.histogram(signals[name], bins=40)
            ax.stairs(counts, edges, fill=True, color="#4C72B0")
            ax.set_title(name.split(".", 1)[-1], fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        figure.suptitle(group, fontsize=10)
        figure.subplots_adjust(hspace=0.6, wspace=0.35)  # tight_layout costs seconds per figure
        name = f"funnel_{group}.png"
        with storage.atomic_output(runs.at(output, name)) as handle:
            figure.savefig(handle, format="png", dpi=80, metadata={"Software": None})
        plt.close(figure)
        written.append(name)
    return written
