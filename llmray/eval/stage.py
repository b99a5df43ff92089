"""``llmray eval``: score one or more checkpoints on a task suite; results.json, report.md (table), samples.

Design choices:

* One config holds the task declarations (``task_specs``, usually pulled in with ``include:``
  from ``configs/eval/tasks/*.yaml``) and the selection (``tasks``; empty = every declared
  task), so ``llmray eval --config configs/eval/core.yaml tasks=arc_easy,piqa`` narrows a suite
  without editing files.
* ``checkpoints`` maps a name to a model directory (HF layout: config.json + model.safetensors
  + tokenizer.json); several names (base / sft / dpo) become columns of one table. Names listed
  in ``chat_models`` are prompted through the chat template.
* Lineage: the inputs are every checkpoint directory and every task file, so re-running an
  unchanged evaluation is skipped and a new checkpoint or edited task file re-runs it.
* :func:`evaluate_to` is the stage body without the stage machinery, so the trainer's
  background evaluation (:mod:`llmray.eval.background`) writes the very same files, including
  each checkpoint's results in lm-evaluation-harness's schema (:mod:`llmray.eval.lm_eval_results`).
* A task can be an lm-evaluation-harness task YAML on local files
  (``task_specs.<name>: {format: lm_eval_yaml, path: my_task.yaml}``, :mod:`llmray.eval.lm_eval_tasks`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmray.config import param
from llmray.eval import results as results_lib
from llmray.eval import scoring
from llmray.eval.lm_eval_results import lm_eval_results
from llmray.eval.runner import RunnerConfig, evaluate_model
from llmray.eval.tasks import Task, TaskSpec, load_task, task_files, with_fewshot


@dataclass
class EvalConfig:
    """Which checkpoints to score on which tasks, and how to run the requests."""

    checkpoints: dict[str, str] = param(
        default_factory=lambda: {"base": "{run_dir}/pretrain/output/model"},
        doc="name -> model directory (config.json + model.safetensors + tokenizer.json); several names "
            "are compared in one table, e.g. checkpoints.sft=runs/x/sft/output/model")
    chat_models: list[str] = param(default_factory=list,
                                   doc="checkpoint names scored through the chat template (SFT/DPO models)")
    tokenizer: str | None = param(None, doc="directory with tokenizer.json when a checkpoint has none")
    task_specs: dict[str, TaskSpec] = param(default_factory=dict,
                                            doc="task name -> declaration (see configs/eval/tasks/*.yaml)")
    tasks: list[str] | str = param(default_factory=list, doc="tasks to run: a list, or comma-separated "
                                                           "(tasks=arc_easy,piqa); empty = all declared")
    data_dir: str = param("../shared/data", doc="directory relative task paths are resolved against")
    limit: int | None = param(None, doc="evaluate only the first N examples of each task (null = all)", min=1)
    num_fewshot: int | None = param(None, doc="few-shot examples for every task (null = each task's own)", min=0)
    seed: int = param(1234, doc="seed of few-shot sampling and bootstrap resampling")
    bootstrap_iters: int = param(1000, doc="bootstrap resamples for the stderr of perplexity and bits/byte",
                                 min=0)
    write_samples: bool = param(True, doc="write per-example scores to samples/<checkpoint>/<task>.jsonl")
    runner: RunnerConfig = param(default_factory=RunnerConfig, doc="actor pool and batching")

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [name.strip() for name in self.tasks.split(",") if name.strip()]
        if not self.checkpoints:
            raise ValueError("checkpoints: give at least one name -> model directory")
        unknown = [t for t in self.tasks if t not in self.task_specs]
        if unknown:
            raise ValueError(f"tasks {unknown} are not declared in task_specs "
                             f"(declared: {', '.join(self.task_specs) or 'none'})")
        if not self.selected_tasks():
            raise ValueError("no tasks: declare some under task_specs (e.g. include: tasks/arc.yaml)")
        stray = [name for name in self.chat_models if name not in self.checkpoints]
        if stray:
            raise ValueError(f"chat_models {stray} are not names in checkpoints ({', '.join(self.checkpoints)})")

    def selected_tasks(self) -> list[str]:
        return list(self.tasks) or list(self.task_specs)

    def inputs(self) -> dict[str, str]:
        inputs = {f"checkpoint.{name}": path for name, path in self.checkpoints.items()}
        if self.tokenizer:
            inputs["tokenizer"] = self.tokenizer
        for task in self.selected_tasks():
            spec = with_fewshot(self.task_specs[task], self.num_fewshot)
            for role, path in task_files(spec, self.data_dir).items():
                inputs[f"task.{task}.{role}"] = str(path)
        return inputs

    def load_tasks(self) -> list[Task]:
        return [load_task(name, self.task_specs[name], self.data_dir, self.limit, self.num_fewshot)
                for name in self.selected_tasks()]


def evaluate_to(cfg: EvalConfig, output: str | Path, log_metrics: Callable[..., Any] | None = None,
                logger=None) -> dict:
    """Evaluate every checkpoint on every selected task; write the result files under ``output``."""
    tasks = cfg.load_tasks()
    checkpoints: dict[str, dict] = {}
    samples: dict[str, dict[str, list[dict]]] = {}
    lm_eval: dict[str, dict] = {}
    run = {"batch_size": cfg.runner.batch_size, "device": cfg.runner.device, "model_dtype": cfg.runner.precision,
           "limit": cfg.limit, "bootstrap_iters": cfg.bootstrap_iters, "fewshot_seed": cfg.seed}
    for name, model_dir in cfg.checkpoints.items():
        started = time.time()
        evaluated = evaluate_model(model_dir, tasks, cfg.runner, chat=name in cfg.chat_models, seed=cfg.seed,
                                   tokenizer_dir=cfg.tokenizer, bootstrap_iters=cfg.bootstrap_iters, label=name)
        entry = checkpoint_entry(model_dir, name in cfg.chat_models, tasks, evaluated)
        entry["seconds"] = round(time.time() - started, 3)
        checkpoints[name] = entry
        samples[name] = {task: result["scores"] for task, result in evaluated.items()}
        lm_eval[name] = lm_eval_results(entry, tasks, run)
        if log_metrics is not None:
            log_metrics(checkpoint=name, **flat_metrics(entry))
        if logger is not None:
            core = entry["core"]
            logger.info("%s: CORE %s in %.1fs", name, f"{core['value']:.4f}" if core else "n/a", entry["seconds"])
    results = {"checkpoints": checkpoints, "seed": cfg.seed, "limit": cfg.limit}
    results_lib.write(output, results, samples if cfg.write_samples else None, lm_eval)
    return results


def checkpoint_entry(model_dir: str | Path, chat: bool, tasks: list[Task], evaluated: dict[str, dict]) -> dict:
    """One checkpoint's block of results.json: per-task metrics and the CORE aggregate."""
    entry: dict = {"path": str(model_dir), "chat_template": chat, "tasks": {}}
    core_inputs = {}
    for task in tasks:
        metrics = evaluated[task.name]["metrics"]
        baseline = task.random_baseline()
        entry["tasks"][task.name] = {"metrics": metrics, "n": len(task.examples), "kind": task.kind,
                                     "num_fewshot": task.spec.num_fewshot, "random_baseline": baseline}
        if task.spec.core and task.kind != "bits_per_byte":
            if task.spec.core_metric not in metrics:
                raise ValueError(f"task {task.name}: core_metric {task.spec.core_metric!r} is not one of "
                                 f"its metrics {list(metrics)}")
            chosen = metrics[task.spec.core_metric]
            core_inputs[task.name] = {"metric": task.spec.core_metric, "value": chosen["value"],
                                      "stderr": chosen["stderr"], "baseline": baseline}
    entry["core"] = scoring.core_score(core_inputs)
    return entry


def flat_metrics(entry: dict) -> dict[str, float]:
    """``{"arc_easy/acc": 0.41, ..., "core": 0.12}`` for metrics.jsonl and training logs."""
    flat = {f"{task}/{metric}": value["value"]
            for task, result in entry["tasks"].items() for metric, value in result["metrics"].items()}
    if entry["core"]:
        flat["core"] = entry["core"]["value"]
    return flat


def run_eval(cfg: EvalConfig, ctx) -> dict:
    if cfg.runner.num_actors:
        ctx.connect_ray()
    results = evaluate_to(cfg, ctx.output, ctx.log_metrics, ctx.logger)
    return {name: flat_metrics(entry) for name, entry in results["checkpoints"].items()}
