"""Does GRPO teach? A small chat model SFT'd on arithmetic, then trained with `llmray rl`; held-out exact match.

    python bench/rl_learning.py [--quick] [--level 2] [--sft-steps N] [--rl-steps N]

Everything from scratch on this machine, through the stages a user runs:

1. a byte-level BPE tokenizer (``llmray.tokenizer``) trained on GSM8K solutions from
   ../shared/data (general text: at this vocabulary most numbers stay split into digits);
2. a randomly initialised small Llama (``--dim``, ``--layers``), SFT'd (the ``sft`` stage, in
   process) on worked answers ("47 - 12 = 35") to the first ``--sft-problems`` training problems
   for ``--sft-steps``: few demonstrations, enough to learn the format and part of the skill;
3. the ``rl`` stage on *every* training problem: GRPO with the final-number reward plus the
   end-of-turn format reward, two rollout actors, the learner in process, for ``--rl-steps``.

Held-out problems are expressions never seen in SFT or RL (the split is by expression), scored
greedily before and after RL by the stage itself. Target (issue): >= 15 points of held-out exact
match gained within 10 CPU-minutes of RL. Last line: JSON with ``sft_exact_match``,
``rl_exact_match``, ``gain_points``, ``rl_seconds``, the reward curve's first/last values and
the machine fields (``idle``).
"""

from __future__ import annotations

import argparse
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
from llmray.align.records import split_of  # noqa: E402
from llmray.rl.tasks import arithmetic_problems  # noqa: E402

VAL_FRACTION = 0.1
SEED = 0


def worked(problem) -> str:
    return f"{problem.messages[0]['content'].removeprefix('What is ').removesuffix('?')} = {problem.answer}"


def write_sft_data(root: Path, args) -> Path:
    """The SFT demonstrations: the first ``--sft-problems`` training-split problems with worked answers
    ("47 + 3 = 50"). RL then trains on every training-split problem: few demonstrations, many
    problems with a verifier, the regime RL is for."""
    problems = arithmetic_problems(args.problems, args.level, SEED)
    train = [p for p in problems if split_of(p.group, VAL_FRACTION, SEED) == "train"][:args.sft_problems]
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [*p.messages, {"role": "assistant", "content": worked(p)}]}) + "\n"
                           for p in train))
    return sft


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="llmray-rl-bench-"))
    tokenizer_dir = _rl_setup.tokenizer(root, args.vocab)
    init = _rl_setup.initial_model(root, tokenizer_dir, args.vocab, args.dim, args.layers, SEED)
    sft_data = write_sft_data(root, args)
    runs_dir = root / "runs"
    sft = config_lib.from_dict(stages.STAGES["sft"].config_cls, {
        "model": str(init), "tokenizer": str(tokenizer_dir), "val_fraction": 0.0,
        "sources": [{"kind": "messages", "path": str(sft_data), "name": "arithmetic"}],
        "batch": {"seq_len": 95, "micro_batch_size": 32},
        "train": {"steps": args.sft_steps, "log_every": 50, "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
                  "schedule": {"warmup_steps": 20}},
        "samples": {"prompts": 0}, "execution": {"threads_per_worker": 2}})
    sft_result = stages.run_stage(stages.STAGES["sft"], sft, runs_dir)
    rl = config_lib.from_dict(stages.STAGES["rl"].config_cls, {
        "model": str(sft_result.output / "model"), "tokenizer": str(tokenizer_dir),
        "prompts": [{"kind": "arithmetic", "level": args.level, "count": args.problems, "seed": SEED}],
        "val_fraction": VAL_FRACTION, "eval_problems": args.eval_problems, "seed": SEED,
        "prompts_per_step": args.prompts_per_step, "group_size": args.group_size, "micro_batch_size": 64,
        "sampling": {"max_new_tokens": 16, "temperature": 1.0},
        "reward": {"kind": "final_number", "format_weight": 0.1},
        "grpo": {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0},
        "rollout": {"actors": 2, "actor_cpus": 0.5, "threads": 1},
        "train": {"steps": args.rl_steps, "log_every": 5, "optimizer": {"lr": args.rl_lr, "weight_decay": 0.0},
                  "schedule": {"warmup_steps": 3}},
        "execution": {"threads_per_worker": 1}})
    started = time.perf_counter()
    rl_result = stages.run_stage(stages.STAGES["rl"], rl, runs_dir)
    rl_seconds = time.perf_counter() - started
    summary = rl_result.manifest["summary"]
    history = json.loads((rl_result.output / "rollouts.json").read_text())
    print((rl_result.output / "report.md").read_text())
    return {"sft_exact_match": summary["exact_match_before"], "rl_exact_match": summary["exact_match_after"],
            "gain_points": 100 * (summary["exact_match_after"] - summary["exact_match_before"]),
            "held_out_problems": rl_result.manifest["summary"].get("held_out_problems", args.eval_problems),
            "ci95_sft": summary["ci95_before"], "ci95_rl": summary["ci95_after"], "rl_seconds": rl_seconds,
            "rl_steps": summary["steps"], "reward_first": summary["reward_first"], "reward_last": summary["reward_last"],
            "correct_first": history[0]["correct_mean"], "correct_last": history[-1]["correct_mean"],
            "sft_steps": args.sft_steps, "sft_problems": args.sft_problems, "level": args.level,
            "target_gain_points": 15, "target_rl_seconds": 600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer SFT and RL steps (under 5 minutes)")
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--problems", type=int, default=4000)
    parser.add_argument("--sft-problems", type=int, default=300, help="training problems given as SFT demonstrations")
    parser.add_argument("--eval-problems", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--rl-steps", type=int, default=None)
    parser.add_argument("--rl-lr", type=float, default=5e-4)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    args.sft_steps = args.sft_steps or (150 if args.quick else 300)
    args.rl_steps = args.rl_steps or (40 if args.quick else 120)
    load = LoadWatch(2)
    cluster.connect(cluster.RayConfig(num_cpus=2, object_store_memory_mb=512, dashboard=False))
    figures = run(args)
    print(json.dumps({**figures, **load.fields()}))


if __name__ == "__main__":
    main()
