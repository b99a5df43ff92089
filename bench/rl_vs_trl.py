"""`llmray rl` vs TRL's GRPOTrainer: same SFT'd model, problems, reward, schedule, group size, steps, seeds and cores.

    python bench/rl_vs_trl.py [--quick] [--seeds N] [--first-seed S]

The starting point is the model of ``bench/rl_learning.py`` (a small Llama SFT'd on arithmetic
demonstrations, exported in Hugging Face layout), loaded by both sides. Both train GRPO on every
training-split problem under the settings with which ``rl_learning.py`` teaches (+30 held-out
points): the final-number exact-match reward plus 0.1 when the completion ends its turn (TRL's
reward function sees the end-of-turn token in ``completion_ids``; its decoded text drops it),
``--group-size`` completions per problem, ``--prompts-per-step`` problems per step, temperature 1,
up to 16 new tokens, DAPO token-mean loss with clip 0.2 / 0.28, no KL (TRL's default β = 0), AdamW
(β2 0.95, no weight decay), lr 3e-4 with 3 warm-up steps and a cosine decay to a tenth (TRL's
``cosine_with_min_lr``; its warm-up starts one step earlier, at lr 0), gradient clipping at 1, one
update per generation batch.

* TRL 1.16, ``GRPOTrainer`` in this process on CPU (``transformers`` generation), 2 torch threads.
* llmray: the ``rl`` training job (:func:`llmray.rl.stage.rl_job`) with 2 rollout actors of one
  thread each and the learner in this process: the same 2 cores.

**Seeds.** Every completion is sampled, so one run of either side is one draw: two full runs of
an earlier version whose starts differed in the last bits put llmray 10 points above TRL and then 9
below (``bench/RESULTS.md``). Each side therefore trains once per RL seed (``--seeds``: 0, 1, ...;
the seed of sampling and problem order, TRL's ``seed``), from the same SFT model and split, and
the reward figures are means over seeds, the gap with its standard error over seeds.

Timed: each side from the starting model on disk to the trained model on disk (loading, set-up,
generation, scoring, updates, saving; llmray's includes starting its rollout actors), completions
per second = all seeds' completions / all seeds' seconds. Each trained model is scored by the
same greedy held-out exact match (llmray's evaluator, so the comparison is of training only).
Targets (issue): llmray's held-out reward >= TRL's − 2 points (the mean gap over seeds);
completions/s >= 1.5x TRL's. Last line: JSON with ``llmray_reward``, ``trl_reward``,
``reward_gap_points`` (+ ``reward_gap_se_points`` and per seed), ``llmray_completions_per_s``,
``trl_completions_per_s``, ``speedup`` and the machine fields (``idle``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _rl_setup  # noqa: E402
from _load import LoadWatch  # noqa: E402

from llmray import cluster  # noqa: E402
from llmray import config as config_lib  # noqa: E402
from llmray.align.records import split_of  # noqa: E402
from llmray.rl.stage import RlConfig, held_out_exact_match, render_prompts, rl_job  # noqa: E402
from llmray.rl.tasks import arithmetic_problems, final_number  # noqa: E402
from llmray.tokenizer import load_tokenizer  # noqa: E402
from llmray.tokenizer.chat import PAD, ChatTemplate  # noqa: E402
from llmray.train.launch import launch  # noqa: E402

MAX_NEW_TOKENS = 16


def rl_config(model: Path, tokenizer_dir: Path, args) -> RlConfig:
    return config_lib.from_dict(RlConfig, {
        "model": str(model), "tokenizer": str(tokenizer_dir),
        "prompts": [{"kind": "arithmetic", "level": args.level, "count": args.problems, "seed": _rl_setup.SEED}],
        "val_fraction": _rl_setup.VAL_FRACTION, "seed": _rl_setup.SEED,
        "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
        "micro_batch_size": args.prompts_per_step * args.group_size,
        "sampling": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0},
        "reward": {"kind": "final_number", "format_weight": 0.1},
        "grpo": {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0, "aggregation": "token_mean"},
        "rollout": {"actors": 2, "actor_cpus": 0.5, "threads": 1},
        "train": {"steps": args.rl_steps, "log_every": 5, "grad_clip": 1.0,
                  "optimizer": {"lr": args.rl_lr, "weight_decay": 0.0, "beta2": 0.95},
                  "schedule": {"kind": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}},
        "execution": {"launcher": "process", "threads_per_worker": 2}})


def run_llmray(cfg: RlConfig, train, prompts, pad_id: int, root: Path) -> tuple[Path, float]:
    job = rl_job(cfg, train, prompts, pad_id, root / "llmray-checkpoints", export_dir=root / "llmray-model")
    started = time.perf_counter()
    launch(job, connect_ray=lambda: None)
    return root / "llmray-model", time.perf_counter() - started


def run_trl(cfg: RlConfig, train, root: Path) -> tuple[Path, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    started = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    end_of_turn = model.generation_config.eos_token_id
    end_of_turn = set(end_of_turn if isinstance(end_of_turn, list) else [end_of_turn])

    def exact_final_number_and_format(completions, completion_ids, answer, **_):
        """llmray's ``final_number`` reward: 1 for the right final number, + the format weight when
        generation stopped at the end-of-turn token (the last id TRL kept)."""
        return [float(final_number(c[0]["content"]) == a)
                + cfg.reward.format_weight * bool(ids and ids[-1] in end_of_turn)
                for c, ids, a in zip(completions, completion_ids, answer)]

    data = Dataset.from_list([{"prompt": list(p.messages), "answer": p.answer} for p in train])
    batch = cfg.prompts_per_step * cfg.group_size
    args = GRPOConfig(
        output_dir=str(root / "trl-run"), use_cpu=True, bf16=False, seed=cfg.seed, report_to=[], save_strategy="no",
        logging_steps=5, max_steps=cfg.train.steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=cfg.group_size, steps_per_generation=1, num_iterations=1,
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, beta=0.0, epsilon=cfg.grpo.clip_low,
        epsilon_high=cfg.grpo.clip_high, loss_type="dapo", scale_rewards="group",
        learning_rate=cfg.train.optimizer.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.train.schedule.min_lr_ratio},
        warmup_steps=cfg.train.schedule.warmup_steps, weight_decay=0.0,
        adam_beta2=cfg.train.optimizer.beta2, max_grad_norm=cfg.train.grad_clip, dataloader_num_workers=0,
        log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_final_number_and_format], args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(root / "trl-model"))
    tokenizer.save_pretrained(str(root / "trl-model"))
    return root / "trl-model", time.perf_counter() - started


def one_seed(cfg: RlConfig, seed: int, train, train_prompts, held_out, held_out_prompts, pad_id: int,
             root: Path) -> dict:
    """Both sides trained from the SFT model with RL seed ``seed``: held-out exact match and seconds."""
    cfg = dataclasses.replace(cfg, seed=seed)
    root.mkdir(parents=True)
    llmray_model, llmray_seconds = run_llmray(cfg, train, train_prompts, pad_id, root)
    trl_model, trl_seconds = run_trl(cfg, train, root)
    scored = {name: held_out_exact_match(directory, cfg, held_out, held_out_prompts)
              for name, directory in (("llmray", llmray_model), ("trl", trl_model))}
    return {"seed": seed, "llmray_reward": scored["llmray"]["exact_match"], "trl_reward": scored["trl"]["exact_match"],
            "llmray_finished": scored["llmray"]["finished_rate"], "trl_finished": scored["trl"]["finished_rate"],
            "llmray_seconds": llmray_seconds, "trl_seconds": trl_seconds}


def main() -> None:
    def seed_options(parser):
        parser.add_argument("--seeds", type=int, default=None,
                            help="RL seeds per side (default 2 with --quick, else 5)")
        parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one up")

    args = _rl_setup.arguments(__doc__.splitlines()[0], quick_rl_steps=12, full_rl_steps=100, add_options=seed_options)
    seeds = range(args.first_seed, args.first_seed + (args.seeds or (2 if args.quick else 5)))
    load = LoadWatch(2)
    cluster.connect(cluster.RayConfig(num_cpus=2, object_store_memory_mb=512, dashboard=False))
    with tempfile.TemporaryDirectory(prefix="llmray-rl-vs-trl-") as tmp:
        root = Path(tmp)
        tokenizer_dir, sft_model = _rl_setup.sft_model(root, args)
        cfg = rl_config(sft_model, tokenizer_dir, args)
        problems = arithmetic_problems(args.problems, args.level, _rl_setup.SEED)
        train = [p for p in problems if split_of(p.group, _rl_setup.VAL_FRACTION, _rl_setup.SEED) == "train"]
        held_out = [p for p in problems if split_of(p.group, _rl_setup.VAL_FRACTION, _rl_setup.SEED) == "val"]
        held_out = held_out[:args.eval_problems]
        tokenizer = load_tokenizer(tokenizer_dir)
        template, pad_id = ChatTemplate(tokenizer), tokenizer.token_to_id(PAD)
        train_prompts, held_out_prompts = render_prompts(template, train), render_prompts(template, held_out)
        sft = held_out_exact_match(sft_model, cfg, held_out, held_out_prompts)
        runs = []
        for seed in seeds:
            runs.append(one_seed(cfg, seed, train, train_prompts, held_out, held_out_prompts, pad_id,
                                 root / f"seed-{seed}"))
            print(f"seed {seed}: held-out exact match llmray {runs[-1]['llmray_reward']:.3f}, "
                  f"TRL {runs[-1]['trl_reward']:.3f} (SFT start {sft['exact_match']:.3f}); "
                  f"{runs[-1]['llmray_seconds']:.1f} s vs {runs[-1]['trl_seconds']:.1f} s", flush=True)
    gaps = [100 * (r["llmray_reward"] - r["trl_reward"]) for r in runs]
    completions = args.rl_steps * args.prompts_per_step * args.group_size * len(runs)
    llmray_rate = completions / sum(r["llmray_seconds"] for r in runs)
    trl_rate = completions / sum(r["trl_seconds"] for r in runs)
    print(json.dumps({
        "llmray_reward": statistics.mean(r["llmray_reward"] for r in runs),
        "trl_reward": statistics.mean(r["trl_reward"] for r in runs), "sft_reward": sft["exact_match"],
        "reward_gap_points": statistics.mean(gaps),
        "reward_gap_se_points": statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None,
        "reward_gap_points_per_seed": gaps, "seeds": len(runs), "runs": runs, "held_out_problems": len(held_out),
        "llmray_completions_per_s": llmray_rate, "trl_completions_per_s": trl_rate, "speedup": llmray_rate / trl_rate,
        "steps": args.rl_steps, "completions": completions,
        "targets": {"reward_gap_points": -2, "speedup": 1.5}, **load.fields()}))


if __name__ == "__main__":
    main()
