"""The run report: one ``report.md`` with PNG plots for a whole run directory.

Built only from what the stages already wrote, so it can be regenerated at any time
(``llmray report --run NAME``) and never needs a stage to know about it:

* ``manifest.json`` of each stage: status, wall time, resources, summary → the stage table and the
  cost accounting (CPU-hours and GPU-hours = wall time × the resources the stage had);
* ``metrics.jsonl`` of each stage: every numeric series is plotted against ``step`` (or record
  order) into ``<stage>_metrics.png``; unreadable lines (a writer killed mid-line) are skipped
  and counted in the section;
* ``output/report.md`` of a stage, when it writes one (curation funnel, tokenizer stats, eval
  table, sample completions): included as that stage's section, with its images re-linked.

The report directory is meant to be shared, and fragments embed text taken from data (held-out
prompts, sampled replies). So stages write such text through :func:`escape_markdown`, and the
report copies an image only from inside that stage's own output directory; any other image link
stays as inert text.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from llmray import runs, storage

log = logging.getLogger("llmray.report")
REPORT_DIR = "report"
_MAX_SERIES_PER_PLOT = 9
_IGNORED_SERIES = {"time", "step", "epoch"}
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]()<>!|~&#])")


def escape_markdown(text: str) -> str:
    """``text`` taken from data (a prompt, a reply, a token, an error message), made plain markdown.

    Why: stage fragments embed such text and the run report includes the fragments; unescaped, a
    held-out prompt like ``![x](../../secret)`` would be an image link the report resolves (and
    ``<img>``/links would render). A backslash before every character that can start markdown or
    HTML syntax keeps the text readable, works inline and inside table cells (``|``), and leaves
    no ``![`` for the report's link matching to find.
    """
    return _MARKDOWN_SYNTAX.sub(r"\\\1", text)


def stage_dirs(run_root: Path | str) -> list[runs.StageDir]:
    """Stage directories of a run (local or on an object store), in the order their stages started."""
    found = []
    for name in storage.list_dirs(run_root):
        if name == REPORT_DIR:
            continue
        stage_dir = runs.StageDir(runs.at(run_root, name), name)
        manifest = stage_dir.read_manifest()
        if manifest:
            found.append((manifest.get("started_at", ""), stage_dir))
    return [stage_dir for _, stage_dir in sorted(found, key=lambda item: item[0])]


def _latest_per_step(metrics: list[dict]) -> list[dict]:
    """One record per step, its keys merged with the later value winning: a restarted or resumed
    stage logs some steps again (the curve shows the attempt that produced the outputs), and hooks
    log other figures at the same step (DPO's preference metrics beside the loss). Records without a
    step are stage-level figures, not points of a curve; with no steps at all, records are the x axis."""
    stepped = [record for record in metrics if "step" in record]
    if not stepped:
        return metrics
    merged: dict[int, dict] = {}
    for record in stepped:
        merged.setdefault(record["step"], {}).update(record)
    return [merged[step] for step in sorted(merged)]


def _numeric_series(metrics: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(_latest_per_step(metrics)):
        x = record.get("step", index)
        for key, value in record.items():
            if key in _IGNORED_SERIES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(x)
            ys.append(value)
    return {k: v for k, v in series.items() if len(v[0]) >= 2}


def _plotted(series: dict[str, tuple[list[float], list[float]]]) -> list[str]:
    """The series worth a panel: loss, then held-out figures, then the rest; a flat line says nothing."""
    varying = [name for name, (_, ys) in series.items() if max(ys) != min(ys)]
    return sorted(varying, key=lambda k: (k != "loss", not k.startswith("val_"), k))[:_MAX_SERIES_PER_PLOT]


def plot_metrics(metrics: list[dict], title: str, path: Path) -> list[str]:
    """One figure with a panel per numeric series; returns the names of the series plotted."""
    series = _numeric_series(metrics)
    names = _plotted(series)
    if not names:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = series[name]
        ax.plot(xs, ys, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step" if any("step" in record for record in metrics) else "record")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with runs.atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return names


def _cost(manifest: dict) -> tuple[float, float]:
    seconds = manifest.get("seconds") or 0.0
    resources = manifest.get("resources", {})
    return seconds / 3600 * resources.get("cpus", 0), seconds / 3600 * resources.get("gpus", 0)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, default=str)[:120] + "`"
    return str(value)


def _stage_fragment(stage_dir: runs.StageDir, report_dir: Path) -> str:
    fragment = runs.at(stage_dir.output, "report.md")
    if not storage.is_file(fragment):
        return ""
    text = storage.read_text(fragment)

    def relink(match: re.Match) -> str:
        """Copy a file of the stage's own output beside the report; anything else stays as text
        and nothing is copied."""
        target = match.group(2)
        source = _inside(stage_dir.output, target)
        if source is None:
            return escape_markdown(match.group(0))
        copied = f"{stage_dir.stage}_{storage.name(target)}"
        (report_dir / copied).write_bytes(storage.read_bytes(source))
        return f"![{match.group(1)}]({copied})"

    # Demote the fragment's headings so they nest under the stage heading.
    text = re.sub(r"^(#+)", r"\1##", text, flags=re.MULTILINE)
    return _IMAGE_LINK.sub(relink, text)


def _inside(output: Path | str, target: str) -> Path | str | None:
    """The file ``target`` names if it lies inside ``output``, else None. Locally symlinks are
    resolved, so neither ``..`` nor a link leads out; on an object store (no links) a relative
    key without ``..`` is required."""
    if storage.is_remote(output):
        if "://" in target or target.startswith("/") or ".." in target.split("/"):
            return None
        source = storage.join(output, target)
        return source if storage.is_file(source) else None
    root = Path(output).resolve()
    source = (Path(output) / target).resolve()
    return source if source.is_relative_to(root) and source.is_file() else None


def build_report(run_root: Path | str) -> Path | str:
    """Write ``<run_root>/report/report.md`` (and its PNGs) atomically; returns the report path.
    The run folder may be on an object store: the report is drawn locally and uploaded."""
    dirs = stage_dirs(run_root)
    if not dirs:
        raise FileNotFoundError(f"{run_root} holds no stage with a manifest; nothing to report")
    with runs.replace_dir(runs.at(run_root, REPORT_DIR)) as target, storage.staged_folder(target) as out:
        lines = [f"# Run report: {storage.name(run_root)}", "",
                 "| stage | status | started | wall time | CPU-hours | GPU-hours | summary |",
                 "|---|---|---|---|---|---|---|"]
        total_seconds = total_cpu = total_gpu = 0.0
        sections = []
        for stage_dir in dirs:
            manifest = stage_dir.read_manifest()
            cpu_hours, gpu_hours = _cost(manifest)
            seconds = manifest.get("seconds") or 0.0
            total_seconds, total_cpu, total_gpu = total_seconds + seconds, total_cpu + cpu_hours, total_gpu + gpu_hours
            summary = ", ".join(f"{k}={_format(v)}" for k, v in list(manifest.get("summary", {}).items())[:6])
            lines.append(f"| {stage_dir.stage} | {manifest.get('status')} | {manifest.get('started_at', '')} | "
                         f"{seconds:.1f} s | {cpu_hours:.3f} | {gpu_hours:.3f} | {summary} |")
            sections.append(_stage_section(stage_dir, manifest, out))
        lines.append(f"| **total** | | | {total_seconds:.1f} s | {total_cpu:.3f} | {total_gpu:.3f} | |")
        lines += ["", "CPU-/GPU-hours are wall time × the CPUs/GPUs the stage's Ray cluster had; multiply by "
                      "your hourly prices for cost.", ""]
        runs.write_text(out / "report.md", "\n".join(lines + sections) + "\n")
    return runs.at(run_root, REPORT_DIR, "report.md")


def _stage_section(stage_dir: runs.StageDir, manifest: dict, out: Path) -> str:
    parts = [f"## {stage_dir.stage}", ""]
    summary = manifest.get("summary", {})
    if summary:
        parts += ["| key | value |", "|---|---|"]
        parts += [f"| {key} | {_format(value)} |" for key, value in summary.items()]
        parts.append("")
    image = f"{stage_dir.stage}_metrics.png"
    metrics, bad = stage_dir.read_metrics()
    plotted = plot_metrics(metrics, f"{stage_dir.stage} metrics", out / image)
    if plotted:
        parts += [f"![{stage_dir.stage}: {', '.join(plotted)}]({image})", ""]
    if bad:
        log.warning("[%s] skipped %d unreadable metrics line(s); the first: %s", stage_dir.stage, len(bad), bad[0])
        parts += [f"*metrics.jsonl: {len(bad)} unreadable line(s) skipped (the first: line {bad[0].number}, "
                  f"{bad[0].detail}).*", ""]
    fragment = _stage_fragment(stage_dir, out)
    if fragment:
        parts += [fragment, ""]
    return "\n".join(parts)


def add_parser(subparsers) -> None:
    """``llmray report``: (re)build the report of a run directory."""
    parser = subparsers.add_parser("report", help="build report.md and plots for a run directory",
                                   description=build_report.__doc__)
    parser.add_argument("--run", required=True, help="run name (or a path to the run directory)")
    parser.add_argument("--runs-dir", default="runs",
                        help="root of run directories, a local path or a URI such as s3://bucket/runs "
                             "(default: %(default)s)")
    parser.set_defaults(handler=_report_command)


def _report_command(args) -> int:
    named = storage.is_remote(args.run) or Path(args.run).is_dir()
    run_root = runs.at(args.run) if named else runs.run_root(args.runs_dir, args.run)
    print(f"report: {storage.normalize(build_report(run_root))}")
    return 0
