"""The curate stage's writers and its funnel report.

:func:`write_slice` runs in the Ray task that holds a slice of the ordered row stream: it routes
each row to ``documents/``, ``rejected/`` or ``quarantine/`` and writes one parquet file per
dataset for the slice (slices are cut by row count, so file and row-group boundaries never depend
on how Ray batched the stream). The same task counts the slice into a :class:`FunnelTally`
(documents, bytes and estimated tokens entering and leaving each stage, per source and per
reason, an even sample of every filter signal's values for the histograms, ``sample_rejected``
example texts per (stage, reason)); only that tally, as JSON, goes to the driver, which merges the tallies in stream
order. A stage that changes documents it keeps (dedup's boilerplate lines, contamination flags)
counts it in the rows' ``edit.*`` signals (``records.count_edits``); the sums appear on that
stage's funnel row as ``edits`` and in a "changed" column of the tables, which exists only when
some stage edited. :func:`write_report` writes ``funnel.json``, ``funnel.md`` and ``funnel_*.png``.
Each slice's drops per reason also feed the live counter ``llmray_docs_dropped_total{reason}`` as
its tally arrives, so the dashboard and the funnel agree.

Tokens are estimated as UTF-8 bytes / 4 (the usual ratio for English BPE vocabularies); the
tokenizer stage reports exact counts later.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmray import runs, storage
from llmray.data import records
from llmray.data.readers import errors

BYTES_PER_TOKEN = 4
MAX_SIGNAL_VALUES = 10_000  # per signal, for histograms and quantiles (see SignalSample)
SCORE_COLUMNS = ("lang_score", "quality_score", "toxicity_score")
FIRST_ERRORS = 3  # quarantine messages kept per source for the max_quarantine_fraction error


def write_slice(table: pa.Table, output: Path | str, output_cfg) -> tuple[dict[str, int], str]:
    """Route one slice of the ordered stream to ``documents/``, ``rejected/`` and ``quarantine/``
    and write each part as one parquet file; return ``{dataset: rows written}`` and the file name.

    Runs in the Ray task that holds the slice, so no document crosses to the driver. The name
    comes from the slice's first row, ``part-<unit>-<seq>.parquet`` (work unit in plan order, row
    within it): slices are cut by row count from a stream in input order, so names and bytes are
    the same whatever the cluster size, and sorting the names gives the stream order."""
    name = f"part-{table['unit'][0].as_py():06d}-{table['seq'][0].as_py():09d}.parquet"
    written = {}
    for dataset, schema, mask in _routes(table):
        part = table.filter(mask)
        if part.num_rows:
            _write_parquet(part.select(schema.names).cast(schema), runs.at(output, dataset, name), output_cfg)
            written[dataset] = part.num_rows
    return written, name


def write_empty(output: Path | str, dataset: str, output_cfg) -> str:
    """An empty dataset is still a readable parquet file with the schema."""
    name = "part-000000-000000000.parquet"
    _write_parquet(DATASET_SCHEMAS[dataset].empty_table(), runs.at(output, dataset, name), output_cfg)
    return name


DATASET_SCHEMAS = {"documents": records.DOCUMENT_SCHEMA, "rejected": records.REJECTED_SCHEMA,
                   "quarantine": records.QUARANTINE_SCHEMA}


def _routes(table: pa.Table) -> list[tuple[str, pa.Schema, pa.Array]]:
    quarantined = pc.is_valid(table["error"])
    rejected = pc.and_(pc.invert(quarantined), pc.is_valid(table["reason"]))
    kept = pc.invert(pc.or_(quarantined, rejected))
    return [("documents", records.DOCUMENT_SCHEMA, kept), ("rejected", records.REJECTED_SCHEMA, rejected),
            ("quarantine", records.QUARANTINE_SCHEMA, quarantined)]


def _write_parquet(table: pa.Table, location: Path | str, output_cfg) -> None:
    with storage.atomic_output(location) as handle:
        pq.write_table(table, handle, row_group_size=min(output_cfg.row_group_rows, max(1, table.num_rows)),
                       compression=output_cfg.compression)


class SignalSample:
    """The values of a stream at the positions that are multiples of ``stride``, never more than
    ``capacity`` of them.

    When the sample overflows, the stride doubles and the values off the new grid go, so the
    sample stays spread evenly over the whole stream in bounded memory (the driver merges one
    slice's sample after another: a "first N values" list would describe only the first slices,
    and an unbounded one grows with the corpus). A value added with ``weight`` w stands for w
    positions: a slice's own sample, taken every w-th row, keeps its share of the stream however
    many rows earlier filters left in the slice. The values kept depend only on the values added
    and their weights, in order, so merged slices give the sample of the whole stream."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.stride, self.seen = capacity, 1, 0
        self.values: list[float] = []
        self._positions: list[int] = []

    def extend(self, values, weight: int = 1) -> None:
        for value in values:
            if self.seen % self.stride == 0:
                self.values.append(value)
                self._positions.append(self.seen)
                while len(self.values) > self.capacity:
                    self.stride *= 2
                    kept = [i for i, position in enumerate(self._positions) if position % self.stride == 0]
                    self.values = [self.values[i] for i in kept]
                    self._positions = [self._positions[i] for i in kept]
            self.seen += weight


class FunnelTally:
    """The funnel's counts over part of the row stream: one slice (counted by the task that writes
    it, and sent to the driver as JSON) or, merged in stream order, the whole of it.

    Lists that keep "the first values" (rejected samples, first quarantine errors) and the signal
    samples stay in stream order because slices are merged in stream order."""

    def __init__(self, sample_rejected: int, signal_values: int = MAX_SIGNAL_VALUES) -> None:
        self.sample_rejected = sample_rejected
        self.signal_values = signal_values  # values sampled per signal (a slice sends few: they cross to the driver)
        self.samples: dict[tuple[str, str], list[dict]] = defaultdict(list)
        # (source, stage-dropped-at or "kept") → [docs, bytes as read]
        self.drops: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.reasons: Counter = Counter()  # (source, stage, reason) → docs
        self.dropped: Counter = Counter()  # reason (quarantined:<error> for unreadable records) → docs
        self.errors: Counter = Counter()  # (source, error) → records
        self.rows: Counter = Counter()  # source → records read (quarantined included)
        self.first_errors: dict[str, list[str]] = defaultdict(list)  # source → first quarantine messages
        self.kept_bytes: Counter = Counter()  # source → UTF-8 bytes of the curated text
        self.pii: Counter = Counter()
        self.edits: Counter = Counter()  # (source, stage, count) → sum of edit.<stage>.<count> signals
        self.signals: dict[str, SignalSample] = defaultdict(lambda: SignalSample(self.signal_values))
        self.stages_seen: list[str] = []  # stages rows were dropped at, in arrival order
        self.datasets: Counter = Counter()  # dataset → rows written
        self.files: dict[str, list[str]] = defaultdict(list)  # dataset → file names, in stream order

    def add(self, table: pa.Table) -> None:
        columns = {name: table.column(name).to_pylist() for name in
                   ("source", "bytes", "error", "stage", "reason", "signals", "text", *SCORE_COLUMNS)}
        messages = table.column("message").to_pylist()
        for i, source in enumerate(columns["source"]):
            self.rows[source] += 1
            error, reason = columns["error"][i], columns["reason"][i]
            if error is not None:
                self.dropped["quarantined:" + error] += 1
                self._count(source, "read", "quarantined:" + error, 0)
                self.errors[(source, error)] += 1
                if len(self.first_errors[source]) < FIRST_ERRORS:
                    self.first_errors[source].append(f"{error}: {messages[i]}")
                continue
            stage = columns["stage"][i] if reason is not None else "kept"
            self._count(source, stage, reason, columns["bytes"][i] or 0)
            if reason is not None:
                self.dropped[reason] += 1
                self._sample(table, i, columns)
            else:
                self.kept_bytes[source] += len(columns["text"][i].encode("utf-8"))
            self._collect_signals(columns, i, source)

    def add_files(self, written: dict[str, int], name: str) -> None:
        for dataset, rows in written.items():
            self.datasets[dataset] += rows
            self.files[dataset].append(name)

    def _count(self, source: str, stage: str, reason: str | None, size: int) -> None:
        entry = self.drops[(source, stage)]
        entry[0] += 1
        entry[1] += size
        if reason is not None:
            self.reasons[(source, stage, reason)] += 1
        if stage != "kept" and stage not in self.stages_seen:
            self.stages_seen.append(stage)

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
            elif self.signal_values:
                self.signals[name].extend((value,))

    # -- merging slices (worker → driver) -------------------------------------------------------

    _COUNTERS = ("reasons", "dropped", "errors", "rows", "kept_bytes", "pii", "edits", "datasets")

    def to_json(self) -> str:
        """This tally as JSON (tuple keys as lists), to return from the task that counted it."""
        return json.dumps({
            **{name: [[*_key(k), n] for k, n in getattr(self, name).items()] for name in self._COUNTERS},
            "drops": [[*k, *v] for k, v in self.drops.items()],
            "samples": [[*k, v] for k, v in self.samples.items()],
            "first_errors": self.first_errors,
            "signals": {name: [sample.stride, sample.values] for name, sample in self.signals.items()},
            "stages_seen": self.stages_seen,
            "files": self.files})

    def merge_json(self, text: str) -> Counter:
        """Add a slice's tally (from :meth:`to_json`), which follows every slice merged so far in the
        stream; returns that slice's drops per reason."""
        part = json.loads(text)
        for name in self._COUNTERS:
            counter = getattr(self, name)
            for *key, n in part[name]:
                counter[key[0] if len(key) == 1 else tuple(key)] += n
        for source, stage, docs, size in part["drops"]:
            entry = self.drops[(source, stage)]
            entry[0] += docs
            entry[1] += size
        for stage, reason, rows in part["samples"]:
            kept = self.samples[(stage, reason)]
            kept.extend(rows[:self.sample_rejected - len(kept)])
        for source, messages in part["first_errors"].items():
            self.first_errors[source].extend(messages[:FIRST_ERRORS - len(self.first_errors[source])])
        for name, (stride, values) in part["signals"].items():
            self.signals[name].extend(values, weight=stride)
        self.stages_seen += [stage for stage in part["stages_seen"] if stage not in self.stages_seen]
        for dataset, names in part["files"].items():
            self.files[dataset].extend(names)
        return Counter({reason: n for reason, n in part["dropped"]})

    # -- the whole stream -----------------------------------------------------------------------

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

    def samples_jsonl(self) -> str:
        return "".join(json.dumps(s, ensure_ascii=False) + "\n" for key in sorted(self.samples)
                       for s in self.samples[key])

    def summary(self, stage_order: list[str]) -> dict:
        """The funnel of every stage in ``stage_order`` (then any other stage rows were dropped at,
        e.g. dedup's, in arrival order), per source and in total."""
        stage_order = [*stage_order, *(s for s in self.stages_seen if s not in stage_order)]
        sources = sorted({source for source, _ in self.drops})
        per_source = {source: self._funnel(source, stage_order) for source in sources}
        total = self._funnel(None, stage_order)
        totals = {"documents_in": total[0]["docs_in"] if total else 0,
                  "documents_out": self.datasets["documents"], "rejected": self.datasets["rejected"],
                  "quarantined": self.datasets["quarantine"], "bytes_out": sum(self.kept_bytes.values()),
                  "est_tokens_out": sum(self.kept_bytes.values()) // BYTES_PER_TOKEN}
        reasons = [{"source": s, "stage": st, "reason": r, "docs": n}
                   for (s, st, r), n in sorted(self.reasons.items())]
        return {"totals": totals, "stages": total, "per_source": per_source, "reasons": reasons,
                "quarantine": [{"source": s, "error": e, "records": n} for (s, e), n in sorted(self.errors.items())],
                "pii": dict(sorted(self.pii.items())), "files": {d: self.files[d] for d in DATASET_SCHEMAS},
                "kept_bytes": dict(sorted(self.kept_bytes.items())), "signals": {name: sample.values for name, sample in self.signals.items()},
                "bytes_per_token": BYTES_PER_TOKEN}

    def _funnel(self, source: str | None, stage_order: list[str]) -> list[dict]:
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
        docs = sum(entry(stage)[0] for stage in stage_order) + kept[0]
        size = sum(entry(stage)[1] for stage in stage_order) + kept[1]
        rows = []
        for stage in stage_order:
            dropped_docs, dropped_bytes = entry(stage)
            rows.append({"stage": stage, "docs_in": docs, "docs_out": docs - dropped_docs, "bytes_in": size,
                         "bytes_out": size - dropped_bytes, "est_tokens_in": size // BYTES_PER_TOKEN,
                         "est_tokens_out": (size - dropped_bytes) // BYTES_PER_TOKEN})
            if edited := edits(stage):
                rows[-1]["edits"] = edited
            docs, size = docs - dropped_docs, size - dropped_bytes
        return rows


def _key(key) -> list:
    return list(key) if isinstance(key, tuple) else [key]


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
