"""Does GRPO teach? A small chat model SFT'd on arithmetic, then trained with `llmray rl`; held-out exact match.

    python bench/rl_learning.py [--quick] [--level 2] [--sft-problems 400] [--sft-steps 300] [--rl-steps N]

Everything from scratch on this machine, through the stages a user runs:

1. a byte-level BPE tokenizer (``llmray.tokenizer``) trained on GSM8K solutions from
   ../shared/data (general text: at this vocabulary most numbers stay split into digits);
2. a randomly initialised small Llama (``--dim``, ``--layers``), SFT'd (the ``sft`` stage, in
   process) on worked answers ("47 + 3 = 50") to the first ``--sft-problems`` training problems
   for ``--sft-steps`` (``_rl_setup.sft_model`` says why these defaults): the format and part of
   the skill;
3. the ``rl`` stage on *every* training problem: GRPO with the final-number reward plus the
   end-of-turn format reward, two rollout actors, the learner in process, for ``--rl-steps``.

Held-out problems are expressions never seen in SFT or RL (the split is by expression), scored
greedily before and after RL by the stage itself. Target (issue): >= 15 points of held-out exact
match gained within 10 CPU-minutes of RL, read strictly: ``rl_cpu_seconds`` = ``rl_seconds`` (the
whole rl stage, actor start-up and both held-out passes included) × the 2 cores it holds, at most
600; the full run's 650 steps fit in about 300 s of wall time. Last line: JSON with ``sft_exact_match``, ``rl_exact_match``,
``gain_points``, ``rl_seconds``, the training correct rate over the first and last tenth of the
steps and the machine fields (``idle``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _rl_setup  # noqa: E402
from _load import LoadWatch  # noqa: E402

from llmray import cluster, stages  # noqa: E402
from llmray import config as config_lib  # noqa: E402

CORES = 2  # Ray's CPUs for the learner and the rollout actors


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="llmray-rl-bench-"))
    tokenizer_dir, sft_model = _rl_setup.sft_model(root, args)
    rl = config_lib.from_dict(stages.STAGES["rl"].config_cls, {
        "model": str(sft_model), "tokenizer": str(tokenizer_dir),
        "prompts": [{"kind": "arithmetic", "level": args.level, "count": args.problems, "seed": _rl_setup.SEED}],
        "val_fraction": _rl_setup.VAL_FRACTION, "eval_problems": args.eval_problems, "seed": _rl_setup.SEED,
        "prompts_per_step": args.prompts_per_step, "group_size": args.group_size, "micro_batch_size": 64,
        "sampling": {"max_new_tokens": 16, "temperature": 1.0},
        "reward": {"kind": "final_number", "format_weight": 0.1},
        "grpo": {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0},
        "rollout": {"actors": 2, "actor_cpus": 0.5, "threads": 1},
        "train": {"steps": args.rl_steps, "log_every": 5, "optimizer": {"lr": args.rl_lr, "weight_decay": 0.0},
                  "schedule": {"warmup_steps": 3}},
        "execution": {"threads_per_worker": 2}})
    started = time.perf_counter()
    rl_result = stages.run_stage(stages.STAGES["rl"], rl, root / "runs")
    rl_seconds = time.perf_counter() - started
    summary = rl_result.manifest["summary"]
    history = json.loads((rl_result.output / "rollouts.json").read_text())
    print((rl_result.output / "report.md").read_text())
    held_out = json.loads((rl_result.output / "data.json").read_text())["held_out_problems"]
    window = max(1, len(history) // 10)
    mean = lambda records, key: sum(r[key] for r in records) / len(records)  # noqa: E731
    return {"sft_exact_match": summary["exact_match_before"], "rl_exact_match": summary["exact_match_after"],
            "gain_points": 100 * (summary["exact_match_after"] - summary["exact_match_before"]),
            "held_out_problems": held_out, "ci95_sft": summary["ci95_before"], "ci95_rl": summary["ci95_after"],
            "rl_seconds": rl_seconds, "rl_cpu_seconds": CORES * rl_seconds, "rl_steps": summary["steps"],
            "skipped_steps": summary["skipped_steps"],
            "train_correct_first_tenth": mean(history[:window], "correct_mean"),
            "train_correct_last_tenth": mean(history[-window:], "correct_mean"),
            "sft_steps": args.sft_steps, "sft_problems": args.sft_problems, "level": args.level,
            "target_gain_points": 15, "target_rl_cpu_seconds": 600}


def main() -> None:
    args = _rl_setup.arguments(__doc__.splitlines()[0], quick_rl_steps=100, full_rl_steps=650)
    load = LoadWatch(CORES)
    cluster.connect(cluster.RayConfig(num_cpus=CORES, object_store_memory_mb=512, dashboard=False))
    figures = run(args)
    print(json.dumps({**figures, **load.fields()}))


if __name__ == "__main__":
    main()
