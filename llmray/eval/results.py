"""Evaluation results as files: results.json, a markdown table of checkpoints, per-example samples,
and lm-evaluation-harness-schema results.

The table is ``report.md``, the stage fragment that the run report includes.
``lm_eval_results.json`` (:mod:`llmray.eval.lm_eval_results`) holds the checkpoint's results in
lm-evaluation-harness's schema; lm-eval's file describes one model, so with several checkpoints
each gets its own ``lm_eval_results.<checkpoint>.json``.

The JSON is the record (every metric with its standard error, the CORE aggregate with each
task's centered score, and what was evaluated how); the markdown is derived from it: one row
per (task, metric), one column per checkpoint, so base / SFT / DPO read side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmray import runs

RESULTS_FILE = "results.json"
LM_EVAL_FILE = "lm_eval_results.json"
TABLE_FILE = "report.md"  # the stage fragment the run report includes
SAMPLES_DIR = "samples"


def table(results: dict) -> str:
    """Markdown: rows (task, metric), columns checkpoints, cells ``value ± stderr``; CORE last."""
    names = list(results["checkpoints"])
    header = ["task", "metric", "n", "shots"] + names
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    task_rows: dict[tuple[str, str], dict] = {}
    for name, checkpoint in results["checkpoints"].items():
        for task, entry in checkpoint["tasks"].items():
            for metric, value in entry["metrics"].items():
                row = task_rows.setdefault((task, metric), {"n": entry["n"], "shots": entry["num_fewshot"]})
                row[name] = f"{value['value']:.4f} ± {value['stderr']:.4f}"
    for (task, metric), row in task_rows.items():
        cells = [task, metric, str(row["n"]), str(row["shots"])] + [row.get(n, "") for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    if any(c.get("core") for c in results["checkpoints"].values()):
        cells = ["**CORE**", "centered mean", "", ""]
        for name in names:
            core = results["checkpoints"][name].get("core")
            cells.append(f"**{core['value']:.4f} ± {core['stderr']:.4f}**" if core else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lm_eval_file(checkpoint: str, checkpoints: int) -> str:
    """``lm_eval_results.json``, or ``lm_eval_results.<checkpoint>.json`` when a run has several."""
    return LM_EVAL_FILE if checkpoints == 1 else LM_EVAL_FILE.replace(".json", f".{checkpoint}.json")


def write(output: str | Path, results: dict, samples: dict[str, dict[str, list[dict]]] | None,
          lm_eval: dict[str, dict]) -> None:
    """results.json, report.md (the table), the lm-eval-schema files of ``lm_eval`` (checkpoint ->
    dict) and (optionally) samples/<checkpoint>/<task>.jsonl under ``output``."""
    runs.write_json(runs.at(output, RESULTS_FILE), results)
    runs.write_text(runs.at(output, TABLE_FILE), table(results))
    for checkpoint, lm_eval_dict in lm_eval.items():
        runs.write_json(runs.at(output, lm_eval_file(checkpoint, len(lm_eval))), lm_eval_dict)
    for checkpoint, tasks in (samples or {}).items():
        for task, scores in tasks.items():
            runs.write_text(runs.at(output, SAMPLES_DIR, checkpoint, f"{task}.jsonl"),
                            "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in scores))
