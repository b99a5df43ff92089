"""One checkpoint's results in lm-evaluation-harness's results.json schema (``lm_eval_results.json``).

Tools built around lm-eval (its ``make_table``, leaderboards, comparison scripts) read its
results file; llmray writes the same shape beside its own ``results.json``, with the keys lm-eval
0.4 writes (``lm_eval/evaluator_utils.py``, ``lm_eval/result_schema.py``):

* ``results.<task>``: ``alias`` and, per metric, ``"<metric>,none"`` and
  ``"<metric>_stderr,none"`` (``none`` is lm-eval's name for "no output filter");
* ``configs.<task>``: the task config (an lm-eval YAML's own fields, or a built-in task
  described with lm-eval's keys), ``versions``, ``n-shot``, ``higher_is_better``,
  ``n-samples`` (``original``: examples in the split, ``effective``: evaluated after ``limit``),
  ``group_subtasks`` (empty: llmray has no task groups);
* ``config``: the model and run settings (``model: llmray``, ``model_args: pretrained=<dir>``,
  batch size, device, limit, bootstrap iterations, few-shot seed) and ``date`` (Unix time).

The metric names are lm-eval's: ``acc``, ``acc_norm`` (same definition, see
:mod:`llmray.eval.scoring`), ``perplexity``, ``exact_match``, ``bits_per_byte``.
"""

from __future__ import annotations

import time

from llmray.eval.tasks import Task

FILTER = "none"
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "exact_match": True, "perplexity": False,
                    "bits_per_byte": False}


def lm_eval_results(entry: dict, tasks: list[Task], run: dict) -> dict:
    """lm-eval's results dict for one checkpoint block of results.json; ``run`` fills ``config``."""
    by_name = {task.name: task for task in tasks}
    results, configs, versions, shots, higher, samples = {}, {}, {}, {}, {}, {}
    for name, result in entry["tasks"].items():
        task = by_name[name]
        metrics = {"alias": name}
        for metric, value in result["metrics"].items():
            metrics[f"{metric},{FILTER}"] = value["value"]
            metrics[f"{metric}_stderr,{FILTER}"] = value["stderr"]
        results[name] = metrics
        configs[name] = task.config or {"task": name}
        versions[name] = task.version
        shots[name] = task.spec.num_fewshot
        higher[name] = {metric: HIGHER_IS_BETTER.get(metric) for metric in result["metrics"]}
        samples[name] = {"original": task.total, "effective": result["n"]}
    return {"results": results, "group_subtasks": {name: [] for name in results}, "configs": configs,
            "versions": versions, "n-shot": shots, "higher_is_better": higher, "n-samples": samples,
            "config": {"model": "llmray", "model_args": f"pretrained={entry['path']}", **run},
            "date": time.time()}
