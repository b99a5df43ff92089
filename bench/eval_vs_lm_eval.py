"""llmray eval vs lm-evaluation-harness (``lm_eval --model hf``): same export, same task YAMLs.

Model: the ``cpu-small`` preset (12.6M parameters), randomly initialised, with a BPE tokenizer
trained here by llmray's own trainer (which prepends BOS on encode, so lm-eval's Hugging Face
tokenizer starts every request with BOS exactly as llmray does), exported in HF layout. Scores sit
near chance, but both tools score the same model, so every number must agree.

Tasks (zero-shot), each written to a temp dir as an lm-eval task YAML over local files, and run
by both tools from that same YAML: ARC-Easy and ARC-Challenge (dev splits), PIQA (validation,
labels merged into the records), and HellaSwag when ``hellaswag/hellaswag_val.jsonl`` exists under
the shared data (it does not ship). Prompts are lm-eval's standard ones for these datasets.

Peers, on the same machine, with the same number of torch threads in all (2):

* lm-eval: ``simple_evaluate`` on an ``HFLM`` (``dtype=float32``, ``device=cpu``,
  ``batch_size`` 32) in a fresh process with 2 torch threads, offline (``HF_*_OFFLINE=1``);
  timed from building the ``HFLM`` (model load) to the results.
* llmray: ``evaluate_to`` (the body of ``llmray eval``) on a pool of 2 Ray actors with one torch
  thread each; timed from the call (tasks read, requests built, actors started, model loaded in
  each) to the results files. Ray itself is started before timing.

Requests/s counts one request per answer choice, as lm-eval counts them. Rounds alternate
between the peers; medians are reported. Agreement: acc and acc_norm per task in points, and
the largest difference of any per-choice log-likelihood.

Needs the ``bench`` extra's lm-eval with its Hugging Face backend (``lm-eval[hf]``: accelerate).

    python bench/eval_vs_lm_eval.py            # every item, 3 rounds
    python bench/eval_vs_lm_eval.py --quick    # first 200 items per task, 2 rounds (< 5 minutes)

The last line printed is one JSON object: max_abs_diff_points, llmray_requests_per_s,
lm_eval_requests_per_s, speedup_vs_lm_eval, the per-task numbers, and ``_load.LoadWatch``'s load
averages and ``idle``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _load import LoadWatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THREADS = 2
LM_EVAL_BATCH_SIZE = 32
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

MC_FIELDS = "dataset_path: json\noutput_type: multiple_choice\nmetric_list: [{metric: acc}, {metric: acc_norm}]\n"
ARC_PROMPT = ('doc_to_text: "Question: {{question.stem}}\\nAnswer:"\n'
              "doc_to_choice: \"{{question.choices | map(attribute='text') | list}}\"\n"
              "doc_to_target: \"{{(question.choices | map(attribute='label') | list).index(answerKey)}}\"\n")
PIQA_PROMPT = ('doc_to_text: "Question: {{goal}}\\nAnswer:"\n'
               'doc_to_choice: "{{[sol1, sol2]}}"\n'
               "doc_to_target: label\n")
# lm-eval's HellaSwag preprocessing (its process_docs) in Jinja, on the query and on each ending:
# strip, " [title]" -> ". ", drop [bracketed] artefacts, collapse double spaces (YAML block scalars,
# so the regex's backslashes reach Jinja as written)
HELLASWAG_PROMPT = (
    "doc_to_text: |-\n  {{(activity_label ~ ': ' ~ ctx_a ~ ' ' ~ ctx_b | capitalize) | trim"
    " | replace(' [title]', '. ') | regex_replace('\\\\[.*?\\\\]', '') | replace('  ', ' ')}}\n"
    "doc_to_choice: |-\n  {{endings | map('trim') | map('replace', ' [title]', '. ')"
    " | map('regex_replace', '\\\\[.*?\\\\]', '') | map('replace', '  ', ' ') | list}}\n"
    "doc_to_target: \"{{label | int}}\"\n")


def write_tasks(directory: Path, data: Path) -> dict[str, Path]:
    """Task name -> lm-eval task YAML (names prefixed so they never clash with lm-eval's own tasks)."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = {"arc_easy": (data / "arc" / "ARC-Easy-Dev.jsonl", ARC_PROMPT),
               "arc_challenge": (data / "arc" / "ARC-Challenge-Dev.jsonl", ARC_PROMPT)}
    piqa = directory / "piqa_valid.jsonl"
    labels = (data / "piqa" / "valid-labels.lst").read_text().split()
    records = (data / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    piqa.write_text("".join(json.dumps({**json.loads(r), "label": int(l)}) + "\n" for r, l in zip(records, labels)))
    sources["piqa"] = (piqa, PIQA_PROMPT)
    hellaswag = data / "hellaswag" / "hellaswag_val.jsonl"
    if hellaswag.is_file():
        sources["hellaswag"] = (hellaswag, HELLASWAG_PROMPT)
    tasks = {}
    for name, (path, prompt) in sources.items():
        tasks[f"bench_{name}"] = directory / f"bench_{name}.yaml"
        tasks[f"bench_{name}"].write_text(f"task: bench_{name}\n{MC_FIELDS}dataset_kwargs: {{data_files: "
                                          f"{{validation: {json.dumps(str(path))}}}}}\nvalidation_split: "
                                          f"validation\n{prompt}")
    return tasks


def build_model(directory: Path) -> Path:
    import torch

    from llmray.model import hf, llama
    from llmray.model.config import preset
    from llmray.tokenizer import train as tokenizer_train
    from tests.conftest import SHARED_DATA

    cfg = preset("cpu-small")
    text = (SHARED_DATA / "wikipedia_sample" / "wiki_demo.txt").read_text(encoding="utf-8")[:400_000]
    tokenizer = tokenizer_train.train_tokenizer(iter([text.splitlines()]), cfg.vocab_size)
    tokenizer_train.save(tokenizer, directory / "tokenizer")
    torch.manual_seed(0)
    return hf.export(directory / "model", cfg, llama.build(cfg).state_dict(), tokenizer_dir=directory / "tokenizer")


def lm_eval_peer(spec_file: str, out_file: str) -> None:
    """Run lm-eval once (in this fresh process) as ``spec_file`` says; write seconds, metrics, lls."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=spec["yaml_dir"])
    started = time.perf_counter()
    lm = HFLM(pretrained=spec["model"], device="cpu", dtype="float32", batch_size=spec["batch_size"])
    results = simple_evaluate(model=lm, tasks=spec["tasks"], task_manager=manager, num_fewshot=0,
                              limit=spec["limit"], bootstrap_iters=0, log_samples=True)
    seconds = time.perf_counter() - started
    out = {"seconds": seconds, "metrics": {}, "lls": {}}
    for task in spec["tasks"]:
        row = results["results"][task]
        out["metrics"][task] = {"acc": row["acc,none"], "acc_norm": row["acc_norm,none"]}
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        out["lls"][task] = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
    Path(out_file).write_text(json.dumps(out))


def run_lm_eval(work: Path, model_dir: Path, tasks: dict[str, Path], limit: int | None) -> dict:
    spec = {"model": str(model_dir), "tasks": list(tasks), "yaml_dir": str(next(iter(tasks.values())).parent),
            "limit": limit, "threads": THREADS, "batch_size": LM_EVAL_BATCH_SIZE}
    (work / "lm_eval_spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(THREADS), "HF_DATASETS_CACHE": str(work / "hf_cache")}
    subprocess.run([sys.executable, __file__, "--lm-eval-peer", str(work / "lm_eval_spec.json"),
                    str(work / "lm_eval_out.json")], env=env, check=True)
    return json.loads((work / "lm_eval_out.json").read_text())


def run_llmray(work: Path, model_dir: Path, tasks: dict[str, Path], limit: int | None) -> dict:
    from llmray.eval.runner import RunnerConfig
    from llmray.eval.stage import EvalConfig, evaluate_to
    from llmray.eval.tasks import TaskSpec

    cfg = EvalConfig(checkpoints={"bench": str(model_dir)}, limit=limit, bootstrap_iters=0,
                     task_specs={name: TaskSpec(format="lm_eval_yaml", path=str(path)) for name, path in tasks.items()},
                     runner=RunnerConfig(num_actors=THREADS, threads_per_actor=1))
    started = time.perf_counter()
    results = evaluate_to(cfg, work / "llmray_out")
    seconds = time.perf_counter() - started
    entry = results["checkpoints"]["bench"]["tasks"]
    out = {"seconds": seconds, "metrics": {}, "lls": {}}
    for task in tasks:
        out["metrics"][task] = {m: entry[task]["metrics"][m]["value"] for m in ("acc", "acc_norm")}
        samples = (work / "llmray_out" / "samples" / "bench" / f"{task}.jsonl").read_text().splitlines()
        out["lls"][task] = [json.loads(line)["loglikelihoods"] for line in samples]
    out["requests"] = sum(e.num_choices for task in cfg.load_tasks() for e in task.examples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first 200 items per task, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed runs per peer (default 3, quick 2)")
    parser.add_argument("--lm-eval-peer", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lm_eval_peer:
        lm_eval_peer(*args.lm_eval_peer)
        return
    missing = [name for name in ("lm_eval", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the lm-eval peer needs {', '.join(missing)}: pip install 'lm-eval[hf]'")
    import torch

    from llmray import cluster
    from tests.conftest import SHARED_DATA

    os.environ.update(OFFLINE)
    limit = 200 if args.quick else None
    rounds = args.rounds or (2 if args.quick else 3)
    load = LoadWatch(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="eval-vs-lm-eval-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work)
        tasks = write_tasks(work / "tasks", SHARED_DATA)
        cluster.connect(cluster.RayConfig(num_cpus=os.cpu_count(), dashboard=False))
        torch.set_num_threads(THREADS)
        runs: dict[str, list[dict]] = {"llmray": [], "lm_eval": []}
        for round_index in range(rounds):
            runs["llmray"].append(run_llmray(work, model_dir, tasks, limit))
            runs["lm_eval"].append(run_lm_eval(work, model_dir, tasks, limit))
            print(f"round {round_index + 1}: llmray {runs['llmray'][-1]['seconds']:.1f}s, "
                  f"lm-eval {runs['lm_eval'][-1]['seconds']:.1f}s", flush=True)
    requests = runs["llmray"][0]["requests"]
    ours, theirs = runs["llmray"][0], runs["lm_eval"][0]
    per_task, diffs, ll_diff = {}, [], 0.0
    for task in tasks:
        per_task[task] = {"llmray": ours["metrics"][task], "lm_eval": theirs["metrics"][task]}
        diffs += [abs(ours["metrics"][task][m] - theirs["metrics"][task][m]) * 100 for m in ("acc", "acc_norm")]
        for mine, peer in zip(ours["lls"][task], theirs["lls"][task], strict=True):
            ll_diff = max(ll_diff, max(abs(a - b) for a, b in zip(mine, peer, strict=True)))
        print(f"{task}: " + ", ".join(f"{m} llmray {ours['metrics'][task][m]:.4f} lm-eval "
                                      f"{theirs['metrics'][task][m]:.4f}" for m in ("acc", "acc_norm")))
    rate = {peer: requests / statistics.median(r["seconds"] for r in results) for peer, results in runs.items()}
    print(json.dumps({
        "max_abs_diff_points": round(max(diffs), 4), "llmray_requests_per_s": round(rate["llmray"], 1),
        "lm_eval_requests_per_s": round(rate["lm_eval"], 1),
        "speedup_vs_lm_eval": round(rate["llmray"] / rate["lm_eval"], 3),
        "max_loglikelihood_diff_nats": round(ll_diff, 6), "requests": requests, "limit": limit, "rounds": rounds,
        "threads": THREADS, "lm_eval_batch_size": LM_EVAL_BATCH_SIZE, "tasks": per_task,
        "seconds": {peer: [round(r["seconds"], 2) for r in results] for peer, results in runs.items()},
        **load.fields()}))


if __name__ == "__main__":
    main()
