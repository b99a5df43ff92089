"""``llmray curate``: raw sources → curated documents, on a streaming Ray Data pipeline.

plan (sorted work units, one per file) → read (readers; bad records → quarantine rows) → clean
(normalize, heuristic filters) → classify (fastText actor pool: LID, quality, toxicity) → redact
(PII) → dedup (optional: boilerplate lines, exact, MinHash, decontamination) → write (documents/,
rejected/, quarantine/, funnel report). Adding a step is one line in :func:`build_dataset`.

Design choices:

* A step touches only live rows (:func:`llmray.data.records.is_live`): it drops a document by
  setting ``stage``/``reason``/``value`` and counts a change to a kept one with
  ``records.count_edits``, so the funnel explains every drop and edit.
* Deterministic: sorted work units, record order within a file, pure per-row steps,
  ``preserve_order=True`` and slices cut by exact row count give byte-identical output for the
  same input and config, whatever ``num_cpus``.
* Workers write the bulk: the task holding a slice writes its files (to local disk or an object
  store, :mod:`llmray.storage`) and returns only counts; the driver holds plans, counts and the
  funnel report.
* Nothing half-written: the output is built in a temporary directory and swapped in on success.
* Bugs fail loudly: steps quarantine nothing themselves (only readers do, for the data errors of
  :mod:`llmray.data.readers.errors`), and a source with more than ``max_quarantine_fraction`` of
  its records quarantined fails the stage, so a regression cannot produce an empty corpus that
  is marked complete.
* CPU sharing: tasks ask for fractional CPUs so an actor pool never starves the readers on 2 cores.
* Live: drops are counted per reason into ``llmray_docs_dropped_total`` (Ray dashboard,
  Prometheus) as the stream is written, the same counts as the funnel's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from llmray import dashboard_metrics, storage
from llmray import runs as runs_lib
from llmray.config import param
from llmray.data import dedup as dedup_lib
from llmray.data import funnel, records
from llmray.data.dedup.shuffle import fetch_broadcast
from llmray.data.filters import classifiers, normalize
from llmray.data.filters import heuristics as filters_lib
from llmray.data.filters import pii as pii_lib
from llmray.data.readers import sources as sources_lib
from llmray.data.repartition import repartition_rows


@dataclass
class OutputConfig:
    """How the curated datasets are written."""

    rows_per_file: int = param(20_000, doc="rows per slice of the stream: each slice is written by the "
                                           "task holding it as one parquet file per dataset (documents, "
                                           "rejected, quarantine), so a file holds at most this many rows",
                               min=1)
    row_group_rows: int = param(10_000, doc="rows per parquet row group", min=1)
    compression: str = param("zstd", doc="parquet compression codec")


@dataclass
class ExecutionConfig:
    """How the pipeline uses the Ray cluster."""

    read_cpus: float = param(0.25, doc="logical CPUs per read task", min=0.01)
    clean_cpus: float = param(0.5, doc="logical CPUs per clean/redact task (Ray fuses clean into the "
                                       "classifier actors when it can)", min=0.01)
    batch_rows: int = param(1024, doc="rows per block after reading (unit of work of clean/classify; the "
                                      "driver tracks every block, so smaller blocks cost it memory)", min=1)
    read_batch_rows: int = param(1024, doc="max rows a read task yields per batch", min=1)
    actors: int | None = param(None, doc="classifier actors (empty: one per cluster CPU)", min=1)
    actor_cpus: float = param(0.5, doc="logical CPUs per classifier actor (fractional: leave read tasks "
                                       "room on small machines)", min=0.01)


@dataclass
class CurateConfig:
    """Curate raw sources into documents: ingest, normalize, filter, classify, redact PII."""

    sources: list[sources_lib.SourceConfig] = param(default_factory=list, doc="raw sources (named entries)")
    limits: sources_lib.ReadLimits = param(default_factory=sources_lib.ReadLimits, doc="per-record read guards")
    filters: filters_lib.FilterConfig = param(default_factory=filters_lib.FilterConfig, doc="heuristic filters")
    classify: classifiers.ClassifyConfig = param(default_factory=classifiers.ClassifyConfig,
                                                 doc="fastText language ID / quality / toxicity")
    pii: pii_lib.PIIConfig = param(default_factory=pii_lib.PIIConfig, doc="PII redaction")
    dedup: dedup_lib.DedupConfig | None = param(None, doc="deduplication, boilerplate-line removal "
                                                          "(dedup.boilerplate) and decontamination "
                                                          "(dedup.decontam: drop or flag) after "
                                                          "redaction (empty: off)")
    signal_sample: int = param(1000, doc="filter-signal values sampled per slice of rows_per_file rows for the "
                                         "funnel's histograms and quantiles (spread evenly over the slice; they "
                                         "are all that crosses to the driver besides counts, which keeps an "
                                         "even sample of 10,000 per signal)", min=0)
    sample_rejected: int = param(0, doc="keep this many example texts per (stage, reason) in "
                                        "rejected_samples.jsonl", min=0)
    output: OutputConfig = param(default_factory=OutputConfig, doc="output files")
    execution: ExecutionConfig = param(default_factory=ExecutionConfig, doc="Ray execution")

    def __post_init__(self) -> None:
        for source in self.sources:
            self.filters.groups_for(source.domain or "text", source.filter_groups)  # validates names
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {duplicates}")

    def inputs(self) -> dict[str, str]:
        """The files that will be read and the model files, for the lineage cache.

        Machine-local sources are not fingerprinted (hashing /usr/share/doc on every call would
        cost more than curating a demo slice of it); their selection (kinds, caps) is part of
        the config hash, and ``--force`` reruns after a system update.
        """
        found = {}
        for unit in sources_lib.plan([s for s in self.sources if s.kind != "machine"]):
            found[f"source.{unit['source']}.{unit['id_path']}"] = unit["path"]  # the files read, exactly
        for name in ("quality", "toxicity"):
            score = getattr(self.classify, name)
            if score.available():
                found[f"model.{name}"] = score.model
        dedup, _ = effective_dedup(self.dedup)
        if dedup is not None:
            found.update(dedup.inputs())
        return found

    def stage_order(self) -> list[str]:
        """Every stage a row can be dropped at, in pipeline order (the funnel's rows)."""
        groups = self.filters.text_groups + self.filters.code_groups
        for source in self.sources:
            groups += source.filter_groups or []
        dedup = list(dedup_lib.STAGES) if self.dedup is not None else []
        return ["read", "normalize", *dict.fromkeys(groups), "lid", "quality", "toxicity", *dedup]


def effective_dedup(cfg: dedup_lib.DedupConfig | None) -> tuple[dedup_lib.DedupConfig | None, list[str]]:
    """The dedup config to run: evaluation tasks whose files are missing are skipped (with a note),
    so that the demo runs without ``../shared/data``; no task left turns decontamination off."""
    if cfg is None or not cfg.decontam.enabled:
        return cfg, []
    tasks, notes = {}, []
    for task, paths in cfg.decontam.tasks.items():
        resolved = [p if p.is_absolute() else Path(cfg.decontam.data_dir) / p for p in map(Path, paths)]
        missing = [str(p) for p in resolved if not p.is_file()]
        if missing:
            notes.append(f"decontamination: skipping task {task!r}: missing {', '.join(missing)}")
        else:
            tasks[task] = paths
    decontam = dataclasses.replace(cfg.decontam, tasks=tasks, enabled=bool(tasks))
    if not tasks:
        notes.append("decontamination: no evaluation task files found; decontamination is off")
    return dataclasses.replace(cfg, decontam=decontam), notes


# ---------------------------------------------------------------------------------------------
# Steps (plain callables on pyarrow tables: unit-testable without Ray)
# ---------------------------------------------------------------------------------------------

def read_step(batch: dict, source_configs: dict, limits: sources_lib.ReadLimits, batch_rows: int):
    """map_batches over work units: yields row tables of each unit's records, in record order."""
    for unit_json in batch["unit"]:
        unit = json.loads(unit_json)
        rows = []
        for seq, row in enumerate(sources_lib.read_unit(unit, source_configs[unit["source"]], limits)):
            row["unit"], row["seq"] = unit["index"], seq
            rows.append(row)
            if len(rows) >= batch_rows:
                yield records.to_table(rows)
                rows = []
        if rows:
            yield records.to_table(rows)


def clean_step(table: pa.Table, filter_cfg: filters_lib.FilterConfig,
               source_groups: dict[str, list[str] | None]) -> pa.Table:
    """Normalize live rows, drop empty ones, and apply the heuristic filters of each row's source/domain."""
    rows = table.to_pylist()
    for row in rows:
        if not records.is_live(row):
            continue
        row["text"] = normalize.normalize(row["text"])
        if not row["text"]:
            records.reject(row, "normalize", "empty", 0.0)
            continue
        groups = filter_cfg.groups_for(row["domain"], source_groups.get(row["source"]))
        result = filters_lib.apply_filters(row["text"], groups, filter_cfg)
        row["signals"] = json.dumps(result.signals, sort_keys=True)
        row["text"] = result.text
        if result.reason is not None:
            records.reject(row, result.stage, result.reason, result.value)
    return records.to_table(rows)


class ClassifyStep:
    """Actor UDF: fastText language ID, then quality and toxicity scores; drops by thresholds."""

    def __init__(self, cfg: classifiers.ClassifyConfig) -> None:
        self.cfg = cfg
        lid = cfg.lid
        self.lid = classifiers.load_model(lid.model or classifiers.bundled_lid_model()) if lid.enabled else None
        self.scorers = {name: classifiers.load_model(getattr(cfg, name).model)
                        for name in ("quality", "toxicity") if getattr(cfg, name).available()}

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        prose = [r for r in rows if records.is_live(r) and r["domain"] == "text"]
        for row in rows:
            if records.is_live(row) and row["domain"] == "code":
                row["lang"] = "code"
        if self.lid is not None and prose:
            lid = self.cfg.lid
            for row, (lang, score) in zip(prose, classifiers.predict_language(
                    self.lid, [r["text"] for r in prose], lid.max_chars)):
                row["lang"], row["lang_score"] = lang, score
                if lid.languages and lang not in lid.languages:
                    records.reject(row, "lid", f"language_{lang}", score)
                elif score < lid.min_score:
                    records.reject(row, "lid", "low_confidence", score)
            prose = [r for r in prose if records.is_live(r)]
        for name, model in self.scorers.items():
            score_cfg: classifiers.ScoreModelConfig = getattr(self.cfg, name)
            if not prose:
                break
            for row, score in zip(prose, classifiers.predict_positive(
                    model, [r["text"] for r in prose], score_cfg.max_chars)):
                row[f"{name}_score"] = score
                if score_cfg.min_score is not None and score < score_cfg.min_score:
                    records.reject(row, name, f"{name}_below_min", score)
                elif score_cfg.max_score is not None and score > score_cfg.max_score:
                    records.reject(row, name, f"{name}_above_max", score)
            prose = [r for r in prose if records.is_live(r)]
        return records.to_table(rows)


def redact_step(table: pa.Table, pii_cfg: pii_lib.PIIConfig) -> pa.Table:
    """Replace PII in live rows; counts go into the row's signals (``pii.email`` ...)."""
    if not pii_cfg.enabled:
        return table
    rows = table.to_pylist()
    for row in rows:
        if not records.is_live(row):
            continue
        row["text"], counts = pii_lib.redact(row["text"], pii_cfg)
        if any(counts.values()):
            signals = json.loads(row["signals"] or "{}")
            signals.update({f"pii.{kind}": float(n) for kind, n in counts.items() if n})
            row["signals"] = json.dumps(signals, sort_keys=True)
    return records.to_table(rows)


def _mark_dropped(table: pa.Table, first_position: int, dropped: pa.Table, edits: dedup_lib.KeptEdits) -> pa.Table:
    """Reject the rows dedup dropped (``dropped``: this slice's rejected rows, each with its
    ``position`` among all rows, so row ``position - first_position`` here), then apply dedup's
    ``edits`` to the rows still live."""
    if not dropped.num_rows and not edits.active:
        return table
    rows = table.to_pylist()
    for position, stage, reason, value in zip(*(dropped.column(c).to_pylist()
                                                for c in ("position", "stage", "reason", "value"))):
        row = rows[position - first_position]
        records.reject(row, stage, reason, None)
        row["detail"] = value or None  # boilerplate drops keep no other id
    if edits.active:
        _apply_edits([row for row in rows if records.is_live(row)], edits)
    return records.to_table(rows)


def _mark_slice(batch: dict, plan: tuple) -> pa.Table:
    """map_batches over slice numbers: that slice's rows, marked with its own dedup drops (``plan``:
    a broadcast of the slices, one drops ref per slice, and the edits; only refs and sizes)."""
    import ray

    slices, drops, edits = fetch_broadcast(plan[0])
    index = int(batch["slice"][0])
    return _mark_dropped(slices[index].table(), slices[index].position, ray.get(drops[index]), edits)


def _apply_edits(rows: list[dict], edits: dedup_lib.KeptEdits) -> None:
    """Dedup's edits on kept rows, in place (new ``text`` and ``meta``), counted per row for the
    funnel: lines and bytes of boilerplate removed, documents flagged as contaminated."""
    if not rows:
        return
    edited, lines_removed, flagged = edits.apply(records.to_table(rows))
    for row, text, meta, lines, flag in zip(rows, edited.column("text").to_pylist(),
                                            edited.column("meta").to_pylist(), lines_removed.tolist(),
                                            flagged.tolist()):
        if lines:
            records.count_edits(row, "boilerplate", {
                "documents_changed": 1, "lines_removed": lines,
                "bytes_removed": len(row["text"].encode("utf-8")) - len(text.encode("utf-8"))})
        if flag:
            records.count_edits(row, "decontamination", {"documents_flagged": 1})
        row["text"], row["meta"] = text, meta


def dedup_step(ds, cfg: dedup_lib.DedupConfig, clean_cpus: float):
    """Deduplicate the live rows of ``ds``, mark the dropped ones and edit the kept ones (rows keep
    their order).

    ``ds`` is materialised first because dedup reads its input twice (keys, then marking) and
    read+classify must not run twice. Dedup routes each decision to the slice of rows it concerns
    (a join on the cluster by row position), so a marking task reads only its own slice's drops
    and nothing but refs and counts reaches the driver; dedup's output documents are not used: its
    edits (boilerplate lines, flags: broadcasts bounded by the frequent lines and the flagged
    documents) are applied here."""
    import ray

    ds = ds.materialize()
    result = dedup_lib.deduplicate(ds, cfg, consider=records.live_mask)
    if not result.slices:  # no rows at all
        return ds, result.stats
    plan = ray.put((result.slices, result.drops, result.edits))
    slices = ray.data.from_items([{"slice": i} for i in range(len(result.slices))],
                                 override_num_blocks=max(1, len(result.slices)))
    return slices.map_batches(_mark_slice, fn_kwargs={"plan": (plan,)}, batch_size=1, num_cpus=clean_cpus), \
        result.stats


# ---------------------------------------------------------------------------------------------
# The dataset and the stage
# ---------------------------------------------------------------------------------------------

def build_dataset(cfg: CurateConfig, units: list[dict], actors: int, dedup: dedup_lib.DedupConfig | None = None):
    """The Ray Data pipeline from work units to ordered, classified rows, and dedup's statistics
    (lazy unless ``dedup`` is given: dedup executes the pipeline up to redaction)."""
    import ray

    ex = cfg.execution
    source_configs = {s.name: s for s in cfg.sources}
    ds = ray.data.from_items([{"unit": json.dumps({**u, "index": i})} for i, u in enumerate(units)],
                             override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(read_step, fn_kwargs={"source_configs": source_configs, "limits": cfg.limits,
                                              "batch_rows": ex.read_batch_rows},
                        batch_size=1, num_cpus=ex.read_cpus)
    ds = repartition_rows(ds, ex.batch_rows, ex.read_cpus)
    source_groups = {s.name: s.filter_groups for s in cfg.sources}
    ds = ds.map_batches(clean_step, fn_kwargs={"filter_cfg": cfg.filters, "source_groups": source_groups},
                        batch_size=None,
                        batch_format="pyarrow", num_cpus=ex.clean_cpus)
    ds = ds.map_batches(ClassifyStep, fn_constructor_args=(cfg.classify,), batch_size=None,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=ex.actor_cpus)
    ds = ds.map_batches(redact_step, fn_kwargs={"pii_cfg": cfg.pii}, batch_size=None, batch_format="pyarrow",
                        num_cpus=ex.clean_cpus)
    stats = {}
    if dedup is not None:
        ds, stats = dedup_step(ds, dedup, ex.clean_cpus)
    return ds, stats


def write_dataset(ds, output, cfg: CurateConfig):
    """Cut the ordered stream into slices of ``output.rows_per_file`` rows (exact, so the slices
    are the same on any cluster) and have the task holding each slice write it
    (:func:`funnel.write_slice`) and count it; the result holds one tally per slice, no text."""
    ds = repartition_rows(ds, cfg.output.rows_per_file, cfg.execution.clean_cpus, strict=True)
    return ds.map_batches(_write_and_count, fn_kwargs={"output": output, "cfg": cfg}, batch_size=None,
                          batch_format="pyarrow", num_cpus=cfg.execution.clean_cpus)


def _write_and_count(table: pa.Table, output, cfg: CurateConfig) -> pa.Table:
    written, name = funnel.write_slice(table, output, cfg.output)
    tally = funnel.FunnelTally(cfg.sample_rejected, cfg.signal_sample)
    tally.add(table)
    tally.add_files(written, name)
    return pa.table({"tally": [tally.to_json()]})


def run_curate(cfg: CurateConfig, ctx) -> dict:
    """Curate ``cfg.sources`` into ``ctx.output`` (documents/, rejected/, quarantine/, funnel.*)."""
    import ray

    for note in cfg.classify.check_models():
        ctx.logger.warning(note)
    dedup, notes = effective_dedup(cfg.dedup)
    for note in notes:
        ctx.logger.info(note)
    units = sources_lib.plan(cfg.sources)
    ctx.logger.info("curating %d files from %d sources", len(units), len(cfg.sources))
    ctx.connect_ray()
    classifiers.check_models_on_every_node(cfg.classify)
    actors = cfg.execution.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    data_context = ray.data.DataContext.get_current()
    preserve_order = data_context.execution_options.preserve_order
    data_context.execution_options.preserve_order = True
    started = time.perf_counter()
    tally = funnel.FunnelTally(cfg.sample_rejected)
    try:
        if units:
            dataset, dedup_stats = build_dataset(cfg, units, actors, dedup)
            if dedup_stats:
                storage.write_json(runs_lib.at(ctx.output, "dedup_stats.json"), dedup_stats)
            for batch in write_dataset(dataset, ctx.output, cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
                for text in batch.column("tally").to_pylist():
                    for reason, count in tally.merge_json(text).items():
                        dashboard_metrics.count_dropped(ctx.run_name, ctx.stage, reason, count)
    finally:
        data_context.execution_options.preserve_order = preserve_order
    tally.check_quarantine(cfg.limits.max_quarantine_fraction)
    for name in funnel.DATASET_SCHEMAS:
        if not tally.files[name]:
            tally.files[name].append(funnel.write_empty(ctx.output, name, cfg.output))
    if cfg.sample_rejected:
        storage.write_text(runs_lib.at(ctx.output, "rejected_samples.jsonl"), tally.samples_jsonl())
    summary = tally.summary(cfg.stage_order())
    seconds = time.perf_counter() - started
    report = funnel.write_report(ctx.output, summary, seconds)
    ctx.logger.info("funnel:\n%s", report)
    ctx.log_metrics(seconds=round(seconds, 3), **summary["totals"])
    return {"seconds": round(seconds, 3), **summary["totals"]}
