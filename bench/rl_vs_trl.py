"""`llmray rl` vs TRL's GRPOTrainer: same SFT'd model, problems, reward, group size, steps, seed and cores.

    python bench/rl_vs_trl.py [--quick]

The starting point is the model of ``bench/rl_learning.py`` (a small Llama SFT'd on a few
arithmetic demonstrations, exported in Hugging Face layout), loaded by both sides. Both train
GRPO on every training-split problem with the final-number exact-match reward (no format
reward: TRL cannot see the end-of-turn token in decoded text), ``--group-size`` completions per
problem, ``--prompts-per-step`` problems per step, temperature 1, up to 16 new tokens, DAPO
token-mean loss with clip 0.2 / 0.28, no KL (TRL's default β = 0), AdamW (β2 0.95, no weight
decay), a constant learning rate, gradient clipping at 1, one update per generation batch.

* TRL 1.16, ``GRPOTrainer`` in this process on CPU (``transformers`` generation), 2 torch threads.
* llmray: the ``rl`` training job (:func:`llmray.rl.stage.rl_job`) with 2 rollout actors of one
  thread each and the learner in this process: the same 2 cores.

Timed: each side from the starting model on disk to the trained model on disk (loading, set-up,
generation, scoring, updates, saving; llmray's includes starting its rollout actors), completions
per second = steps × prompts × group size / seconds. Then both trained models are scored by the same greedy
held-out exact match (llmray's evaluator, so the comparison is of training only). Targets
(issue): llmray's held-out reward >= TRL's − 2 points; completions/s >= 1.5x TRL's. Last line:
JSON with ``llmray_reward``, ``trl_reward``, ``llmray_completions_per_s``,
``trl_completions_per_s``, ``speedup`` and the machine fields (``idle``).
"""

from __future__ import annotations

import dataclasses
import json
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
        "reward": {"kind": "final_number", "format_weight": 0.0},
        "grpo": {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0, "aggregation": "token_mean"},
        "rollout": {"actors": 2, "actor_cpus": 0.5, "threads": 1},
        "train": {"steps": args.rl_steps, "log_every": 5, "grad_clip": 1.0,
                  "optimizer": {"lr": args.rl_lr, "weight_decay": 0.0, "beta2": 0.95},
                  "schedule": {"kind": "constant", "warmup_steps": 0}},
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

    def exact_final_number(completions, answer, **_):
        return [float(final_number(c[0]["content"]) == a) for c, a in zip(completions, answer)]

    torch.set_num_threads(2)
    started = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": list(p.messages), "answer": p.answer} for p in train])
    batch = cfg.prompts_per_step * cfg.group_size
    args = GRPOConfig(
        output_dir=str(root / "trl-run"), use_cpu=True, bf16=False, seed=cfg.seed, report_to=[], save_strategy="no",
        logging_steps=5, max_steps=cfg.train.steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=cfg.group_size, steps_per_generation=1, num_iterations=1,
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, beta=0.0, epsilon=cfg.grpo.clip_low,
        epsilon_high=cfg.grpo.clip_high, loss_type="dapo", scale_rewards="group",
        learning_rate=cfg.train.optimizer.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta2=cfg.train.optimizer.beta2, max_grad_norm=cfg.train.grad_clip, dataloader_num_workers=0,
        log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_final_number], args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(root / "trl-model"))
    tokenizer.save_pretrained(str(root / "trl-model"))
    return root / "trl-model", time.perf_counter() - started


def main() -> None:
    args = _rl_setup.arguments(__doc__.splitlines()[0], quick_rl_steps=12, full_rl_steps=60)
    load = LoadWatch(2)
    root = Path(tempfile.mkdtemp(prefix="llmray-rl-vs-trl-"))
    cluster.connect(cluster.RayConfig(num_cpus=2, object_store_memory_mb=512, dashboard=False))
    tokenizer_dir, sft_model = _rl_setup.sft_model(root, args)
    cfg = rl_config(sft_model, tokenizer_dir, args)
    problems = arithmetic_problems(args.problems, args.level, _rl_setup.SEED)
    train = [p for p in problems if split_of(p.group, _rl_setup.VAL_FRACTION, _rl_setup.SEED) == "train"]
    held_out = [p for p in problems if split_of(p.group, _rl_setup.VAL_FRACTION, _rl_setup.SEED) == "val"]
    held_out = held_out[:args.eval_problems]
    tokenizer = load_tokenizer(tokenizer_dir)
    template, pad_id = ChatTemplate(tokenizer), tokenizer.token_to_id(PAD)
    llmray_model, llmray_seconds = run_llmray(cfg, train, render_prompts(template, train), pad_id, root)
    trl_model, trl_seconds = run_trl(cfg, train, root)
    held_out_prompts = render_prompts(template, held_out)
    scored = {name: held_out_exact_match(directory, dataclasses.replace(cfg, tokenizer=str(tokenizer_dir)),
                                         held_out, held_out_prompts)
              for name, directory in (("sft", sft_model), ("llmray", llmray_model), ("trl", trl_model))}
    completions = args.rl_steps * args.prompts_per_step * args.group_size
    llmray_rate, trl_rate = completions / llmray_seconds, completions / trl_seconds
    print(json.dumps({
        "llmray_reward": scored["llmray"]["exact_match"], "trl_reward": scored["trl"]["exact_match"],
        "sft_reward": scored["sft"]["exact_match"], "reward_gap_points": 100 * (scored["llmray"]["exact_match"]
                                                                                - scored["trl"]["exact_match"]),
        "ci95": {name: s["ci95"] for name, s in scored.items()}, "held_out_problems": len(held_out),
        "llmray_completions_per_s": llmray_rate, "trl_completions_per_s": trl_rate, "speedup": llmray_rate / trl_rate,
        "llmray_seconds": llmray_seconds, "trl_seconds": trl_seconds, "steps": args.rl_steps,
        "completions": completions, "targets": {"reward_gap_points": -2, "speedup": 1.5}, **load.fields()}))


if __name__ == "__main__":
    main()
