"""What a sweep leaves behind: the trial table, the best config as YAML, plots and a report fragment.

* ``trials.csv`` / ``trials.md``: one row per trial: its swept values, the metric (last reported
  value), status (``completed``, ``stopped`` early by the scheduler or the time budget,
  ``error`` with its message), the furthest step, and any ``table_metrics``;
* ``best_config.yaml``: the best *completed* trial's values set into the base configs, ready to
  run: a stage config when a trial is one stage (``llmray <stage> --config best_config.yaml``),
  else a pipeline config (``llmray pipeline --config best_config.yaml``);
* ``metric_vs_step.png`` (one line per trial) and ``metric_vs_keys.png`` (a panel per swept key);
* ``lineage.md`` (from :mod:`llmray.tune.ablation`): which stages each trial ran or reused;
* ``report.md``: all of the above, included by the run report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from llmray import runs, storage
from llmray import stages as stages_lib
from llmray.report import escape_markdown
from llmray.tune import ablation
from llmray.tune import space as space_lib
from llmray.tune.trial import COMPLETED


def _last(frame, column: str) -> float | None:
    if frame is None or column not in getattr(frame, "columns", []):
        return None
    values = [v for v in frame[column].tolist() if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(values[-1]) if values else None


def _error_message(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (errors[-1] if errors else lines[-1] if lines else type(error).__name__)[:300]


def trial_rows(grid, cfg, metric_steps: str | None = None) -> list[dict]:
    """One dict per trial, sorted by trial id."""
    time_attr = metric_steps or cfg.scheduler.time_attr
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = Path(result.path).name
        if result.error is not None:
            status = "error"
        elif metrics.get(COMPLETED):
            status = "completed"
        else:
            status = "stopped"
        steps = _last(frame, time_attr) if time_attr in getattr(frame, "columns", []) else metrics.get(time_attr)
        row = {"trial_id": trial_id, "status": status, "config": dict(result.config or {}),
               "metric": _last(frame, cfg.metric), "steps": int(steps) if steps is not None else None,
               "error": _error_message(result.error), "frame": frame}
        row["extra"] = {name: metrics.get(name, _last(frame, name)) for name in cfg.table_metrics}
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The best trial by the metric among completed trials (any trial with a value if none completed)."""
    scored = [r for r in rows if r["metric"] is not None and r["status"] == "completed"] or \
        [r for r in rows if r["metric"] is not None]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r["metric"])


def best_config_yaml(cfg, best: dict, run_name: str) -> str:
    stages = space_lib.with_values(cfg.stages, best["config"])
    header = (f"# Best trial {best['trial_id']} of sweep '{run_name}': {cfg.metric} = {best['metric']:.6g}\n"
              + "".join(f"#   {k} = {v!r}\n" for k, v in best["config"].items()))
    if len(stages) == 1:
        (body,) = stages.values()
        stage = stages_lib.STAGES[next(iter(stages))]
        header += f"# Run it: llmray {' '.join(filter(None, (stage.name, stage.verb)))} --config best_config.yaml\n"
    else:
        body = {"name": f"{run_name}-best", "stages": stages}
        header += "# Run it: llmray pipeline --config best_config.yaml\n"
    return header + yaml.safe_dump(body, sort_keys=False)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_markdown(rows: list[dict], cfg, keys: list[str]) -> str:
    head = ["trial", *keys, cfg.metric, *cfg.table_metrics, "status", cfg.scheduler.time_attr, "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial_id"], *(_fmt(r["config"].get(k)) for k in keys), _fmt(r["metric"]),
                 *(_fmt(r["extra"].get(m)) for m in cfg.table_metrics), r["status"], _fmt(r["steps"]),
                 escape_markdown(r["error"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict], cfg, keys: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", *keys, cfg.metric, *cfg.table_metrics, "status", "steps", "error"])
    for r in rows:
        writer.writerow([r["trial_id"], *(r["config"].get(k) for k in keys), r["metric"],
                         *(r["extra"].get(m) for m in cfg.table_metrics), r["status"], r["steps"], r["error"]])
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path | str) -> None:
    with storage.atomic_output(path) as handle:
        fig.savefig(handle, format="png", dpi=110)


def plot_metric_vs_step(rows: list[dict], metric: str, time_attr: str, path: Path | str) -> bool:
    curves = []
    for r in rows:
        frame = r["frame"]
        if frame is None or metric not in frame.columns:
            continue
        x_col = time_attr if time_attr in frame.columns else "training_iteration"
        points = [(x, y) for x, y in zip(frame[x_col].tolist(), frame[metric].tolist())
                  if isinstance(y, (int, float)) and math.isfinite(y) and isinstance(x, (int, float))
                  and math.isfinite(x)]
        if points:
            curves.append((r, x_col, points))
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, x_col, points in curves:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=".", linewidth=1.2, linestyle="-" if r["status"] == "completed" else "--",
                label=f"{r['trial_id'][-5:]} ({r['status']})")
    ax.set_xlabel(curves[0][1])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_metric_vs_keys(rows: list[dict], metric: str, domains: dict, path: Path | str) -> bool:
    scored = [r for r in rows if r["metric"] is not None]
    if not scored or not domains:
        return False
    plt = _pyplot()
    keys = list(domains)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    colors = {"completed": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    for ax, key in zip(axes.flat, keys):
        values = [r["config"].get(key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({json.dumps(v) for v in values}) if not numeric else []
        xs = values if numeric else [labels.index(json.dumps(v)) for v in values]
        ax.scatter(xs, [r["metric"] for r in scored], c=[colors[r["status"]] for r in scored])
        if numeric and domains[key].kind.startswith(("log", "qlog")):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} by swept key (blue completed, orange stopped early)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def write_results(grid, cfg, work: Path | str, output: Path | str, run_name: str) -> tuple[dict, list[dict]]:
    """Write every result file into ``output``; returns the stage summary and the trial rows."""
    domains = cfg.domains()
    keys = list(domains)
    rows = trial_rows(grid, cfg)
    best = best_row(rows, cfg.mode)
    lineage = ablation.lineage(work, [r["trial_id"] for r in rows])
    runs.write_text(runs.at(output, "trials.csv"), table_csv(rows, cfg, keys))
    table = table_markdown(rows, cfg, keys)
    runs.write_text(runs.at(output, "trials.md"), table)
    runs.write_json(runs.at(output, "lineage.json"), lineage)
    lineage_md = ablation.lineage_markdown(lineage)
    runs.write_text(runs.at(output, "lineage.md"), lineage_md)
    parts = [f"# Sweep: {cfg.metric} ({cfg.mode}), {len(rows)} trials, search {cfg.search}, "
             f"scheduler {cfg.scheduler.kind}", "", table]
    if best is None:
        parts += [f"**No trial reported `{cfg.metric}`**: check the metric name against the reported keys "
                  "(progress.csv of a trial under work/ray_results/sweep).", ""]
    else:
        runs.write_text(runs.at(output, "best_config.yaml"), best_config_yaml(cfg, best, run_name))
        parts += [f"Best completed trial: **{best['trial_id']}**, {cfg.metric} = {best['metric']:.6g}, "
                  + ", ".join(f"`{k}={v!r}`" for k, v in best["config"].items())
                  + "; its config is in `best_config.yaml`.", ""]
    if plot_metric_vs_step(rows, cfg.metric, cfg.scheduler.time_attr, runs.at(output, "metric_vs_step.png")):
        parts += ["![metric per trial](metric_vs_step.png)", ""]
    if plot_metric_vs_keys(rows, cfg.metric, domains, runs.at(output, "metric_vs_keys.png")):
        parts += ["![metric by swept key](metric_vs_keys.png)", ""]
    parts += ["## Stage lineage per trial", "", lineage_md]
    runs.write_text(runs.at(output, "report.md"), "\n".join(parts) + "\n")
    counts = {status: sum(r["status"] == status for r in rows) for status in ("completed", "stopped", "error")}
    summary = {"trials": len(rows), **counts, "metric": cfg.metric,
               "best_trial": best["trial_id"] if best else None,
               "best_metric": best["metric"] if best else None,
               "best_config": best["config"] if best else None}
    return summary, rows
