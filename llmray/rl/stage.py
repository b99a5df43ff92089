"""``llmray rl``: GRPO with verifiable rewards, rollout actors feeding the one training core.

Read the prompt sources (bad records to ``quarantine.jsonl``), hold out a share of problems by
id, score the initial policy's greedy exact match on them, train with the GRPO objective on a
:class:`~llmray.rl.stream.RolloutStream` through :func:`llmray.train.launch.launch` (in process or
on Ray Train, checkpointed and resumed like SFT/DPO: keyed by config, initial weights and the
problems), export ``output/model`` as a chat model, and score the held-out problems again.
The report holds exact match before and after (with 95% Wilson intervals) and the reward curve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

from llmray import runs
from llmray.align.records import split_sources
from llmray.align.stage import checkpoint_location, source_table
from llmray.config import param
from llmray.parallel import ParallelConfig
from llmray.rl.grpo import GrpoConfig
from llmray.rl.rewards import RewardConfig
from llmray.rl.rollout import SamplingSpec, WorkItem
from llmray.rl.stream import RolloutPoolConfig, RolloutSpec
from llmray.rl.tasks import Problem, PromptSource, read_problems
from llmray.train.launch import ExecutionConfig, TrainJob
from llmray.train.guards import GuardConfig
from llmray.train.trainer import TrainConfig


@dataclass
class RlGuardConfig(GuardConfig):
    spike_mode: Literal["off", "ratio", "sigma"] = param(
        "off", doc="must stay off in RL: the GRPO loss is a surrogate near 0 that changes sign every step, so "
                   "spike detection would skip most steps (non-finite values are still guarded)")


@dataclass
class RlTrainConfig(TrainConfig):
    guards: RlGuardConfig = param(default_factory=RlGuardConfig, doc="non-finite handling (no loss-spike checks)")


@dataclass
class RlConfig:
    """Reinforcement learning of a chat model with GRPO on problems with checkable answers."""

    model: str = param("{run_dir}/sft/output/model", doc="initial policy (HF layout): the SFT model")
    tokenizer: str = param("{run_dir}/tokenizer/output", doc="directory holding tokenizer.json")
    prompts: list[PromptSource] = param(default_factory=list, doc="problem sources")
    val_fraction: float = param(0.1, doc="share of problems held out (by id) for the exact-match check",
                                min=0.0, max=0.5)
    eval_problems: int = param(200, doc="held-out problems scored greedily before and after (0 = none)", min=0)
    seed: int = param(0, doc="seed of the split, the problem order and every completion's sampling", min=0)
    max_quarantine_fraction: float = param(0.5, doc="fail when more than this share of a source's records is "
                                                    "quarantined", min=0.0, max=1.0)
    prompts_per_step: int = param(8, doc="problems per optimizer step", min=1)
    group_size: int = param(4, doc="completions per problem (G); advantages are relative within the group",
                            min=2)
    micro_batch_size: int = param(8, doc="sequences per micro-batch on each data-parallel worker; "
                                         "train.grad_accum is derived from it", min=1)
    learner_row_tokens: int = param(512, doc="most tokens of a learner row, which holds one prompt once and as "
                                             "many of its completions as fit (the prompt is computed once; a "
                                             "row's attention grows with the square of its length)", min=1)
    max_staleness: int = param(0, doc="policy versions a rollout may lag the learner (0 = on-policy; k > 0 "
                                      "overlaps generation with k training steps)", min=0)
    sampling: SamplingSpec = param(default_factory=SamplingSpec, doc="rollout sampling")
    reward: RewardConfig = param(default_factory=RewardConfig, doc="what a completion scores")
    grpo: GrpoConfig = param(default_factory=GrpoConfig, doc="the policy loss")
    rollout: RolloutPoolConfig = param(default_factory=RolloutPoolConfig, doc="the rollout actors")
    train: RlTrainConfig = param(default_factory=RlTrainConfig, doc="the training loop (steps, optimizer, schedule)")
    parallel: ParallelConfig = param(default_factory=ParallelConfig, doc="how the learner is spread over workers")
    execution: ExecutionConfig = param(default_factory=ExecutionConfig, doc="where the learner runs")

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("rl needs at least one entry in prompts")
        if self.parallel.strategy == "deepspeed":
            raise ValueError("rl: the learner runs with parallel.strategy fsdp2 or none (its weight sync "
                             "gathers FSDP2/DTensor state; DeepSpeed is not wired for it)")
        if self.train.guards.spike_mode != "off":
            raise ValueError("rl: train.guards.spike_mode must be off: the GRPO loss is a surrogate whose mean is "
                             "near 0 and changes sign every step, so loss-spike detection would skip most steps "
                             "(non-finite losses and gradients are still guarded)")
        self.grad_accum()  # the step's sequences must split evenly: fail at load, not after start-up

    def inputs(self) -> dict[str, str]:
        return {"model": self.model, "tokenizer": self.tokenizer,
                **{f"prompts/{i}/{s.label}": s.path for i, s in enumerate(self.prompts) if s.path}}

    def grad_accum(self) -> int:
        """Micro-batches per step on each data-parallel worker, from the step's sequences."""
        dp = self.parallel.dims(self.execution.workers).dp
        per_rank, rest = divmod(self.prompts_per_step * self.group_size, dp * self.micro_batch_size)
        if rest or not per_rank:
            raise ValueError(f"prompts_per_step × group_size = {self.prompts_per_step * self.group_size} "
                             f"sequences must split into micro-batches of {self.micro_batch_size} on each of "
                             f"{dp} data-parallel workers")
        return per_rank


def render_prompts(template, problems: list[Problem]) -> list[tuple[int, ...]]:
    """Each problem's chat prompt, ending with the assistant header."""
    return [tuple(template.render(p.messages, add_generation_prompt=True).ids) for p in problems]


def problems_fingerprint(problems: list[Problem], prompts: list[tuple[int, ...]]) -> str:
    payload = json.dumps([[p.id, p.answer, list(ids)] for p, ids in zip(problems, prompts)])
    return hashlib.sha256(payload.encode()).hexdigest()


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def held_out_exact_match(model_dir: str | Path, cfg: RlConfig, problems: list[Problem],
                         prompts: list[tuple[int, ...]]) -> dict:
    """Greedy exact match of ``model_dir`` on ``problems``, scored on ``cfg.rollout.actors`` actors."""
    import ray

    from llmray.rl.rollout import RolloutWorker

    if not problems:
        return {"problems": 0, "exact_match": None, "ci95": None, "finished_rate": None}
    worker = ray.remote(num_cpus=cfg.rollout.actor_cpus, num_gpus=cfg.rollout.actor_gpus)(RolloutWorker)
    actors = [worker.remote(str(model_dir), cfg.tokenizer, cfg.sampling, cfg.reward, False, cfg.rollout.threads)
              for _ in range(min(cfg.rollout.actors, len(problems)))]
    items = [WorkItem(i, 0, 0, ids, problem) for i, (problem, ids) in enumerate(zip(problems, prompts))]
    try:
        chunks = [items[i::len(actors)] for i in range(len(actors))]
        samples = [s for chunk in ray.get([a.greedy.remote(c) for a, c in zip(actors, chunks)]) for s in chunk]
    finally:
        for actor in actors:
            ray.kill(actor)
    correct = sum(s["correct"] == 1.0 for s in samples)
    return {"problems": len(samples), "exact_match": correct / len(samples),
            "ci95": wilson_interval(correct, len(samples)),
            "finished_rate": sum(s["finished"] for s in samples) / len(samples),
            "examples": [{"problem": problems[s["problem"]].messages[-1]["content"],
                          "answer": problems[s["problem"]].answer, "completion": s["text"], "correct": s["correct"]}
                         for s in samples[:8]]}


def rl_job(cfg: RlConfig, problems: list[Problem], prompts: list[tuple[int, ...]], pad_id: int,
           checkpoint_dir: str | Path, export_dir: str | Path | None = None, metrics_path: str | Path | None = None,
           tags: dict[str, str] | None = None, hooks: tuple = ()) -> TrainJob:
    """The learner's training job: GRPO on a rollout stream over ``problems`` (rendered as ``prompts``)."""
    from llmray.rl.grpo import GRPO
    from llmray.rl.stream import RolloutStats
    from llmray.train.launch import PretrainedModel

    spec = RolloutSpec(problems=problems, prompts=prompts, model_dir=cfg.model, tokenizer_dir=cfg.tokenizer,
                       sampling=cfg.sampling, reward=cfg.reward, grpo=cfg.grpo, pool=cfg.rollout,
                       prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                       micro_batch_size=cfg.micro_batch_size, max_staleness=cfg.max_staleness, seed=cfg.seed,
                       learner_row_tokens=cfg.learner_row_tokens, pad_id=pad_id)
    return TrainJob(model=PretrainedModel(cfg.model), objective=GRPO(cfg.grpo, cfg.sampling.max_new_tokens),
                    train_data=spec, train=dataclasses.replace(cfg.train, grad_accum=cfg.grad_accum()),
                    parallel=cfg.parallel, execution=cfg.execution,
                    seq_len=max(map(len, prompts)) + cfg.sampling.max_new_tokens, checkpoint_dir=str(checkpoint_dir),
                    export_dir=str(export_dir) if export_dir else None, tokenizer_dir=cfg.tokenizer,
                    metrics_path=str(metrics_path) if metrics_path else None, hooks=[RolloutStats, *hooks],
                    chat=True, tags=dict(tags or {}))


def run_rl(cfg: RlConfig, ctx) -> dict:
    from llmray.tokenizer import load_tokenizer
    from llmray.tokenizer.chat import PAD, ChatTemplate
    from llmray.train.launch import launch

    tokenizer = load_tokenizer(cfg.tokenizer)
    template = ChatTemplate(tokenizer)
    train, val, quarantined, counts = split_sources(cfg.prompts, read_problems, cfg.val_fraction, cfg.seed,
                                                    cfg.max_quarantine_fraction)
    runs.write_text(runs.at(ctx.output, "quarantine.jsonl"),
                    "".join(json.dumps(q.to_dict()) + "\n" for q in quarantined))
    if not train:
        raise ValueError(f"rl: no training problems left after holding out val_fraction={cfg.val_fraction}")
    train_prompts = render_prompts(template, train)
    val = val[:cfg.eval_problems]
    val_prompts = render_prompts(template, val)
    data = {"counts": counts, "quarantined": len(quarantined), "train_problems": len(train),
            "held_out_problems": len(val)}
    runs.write_json(runs.at(ctx.output, "data.json"), data)
    ctx.logger.info("rl data: %s", json.dumps(data))

    ctx.connect_ray()
    before = held_out_exact_match(cfg.model, cfg, val, val_prompts)
    job = rl_job(cfg, train, train_prompts, tokenizer.token_to_id(PAD),
                 checkpoint_location(cfg, ctx.dir.work, problems_fingerprint(train, train_prompts)),
                 export_dir=runs.at(ctx.output, "model"), metrics_path=ctx.dir.metrics_file,
                 tags={"run": ctx.run_name, "stage": ctx.stage})
    result = launch(job, ctx.connect_ray)
    history = result.worker["hooks"][0] or []
    after = held_out_exact_match(runs.at(ctx.output, "model"), cfg, val, val_prompts)
    summary = {"steps": result.worker["steps"], "train_problems": len(train), "quarantined": len(quarantined),
               "exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
               "ci95_before": before["ci95"], "ci95_after": after["ci95"],
               "finished_rate_after": after["finished_rate"],
               "reward_first": history[0]["reward_mean"] if history else None,
               "reward_last": history[-1]["reward_mean"] if history else None,
               "reward_failures": sum(h["reward_failures"] for h in history),
               "skipped_steps": sum(result.worker["guard_counts"].get(k, 0) for k in ("skip_nonfinite", "skip_spike"))}
    ctx.log_metrics(**{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    runs.write_json(runs.at(ctx.output, "rollouts.json"), history)
    runs.write_json(runs.at(ctx.output, "held_out.json"), {"before": before, "after": after})
    runs.write_text(runs.at(ctx.output, "report.md"), "\n".join(_report(summary, counts, history)) + "\n")
    return summary


def _report(summary: dict, counts: dict, history: list[dict]) -> list[str]:
    def share(value, ci) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}% (95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f})"

    lines = ["# Reinforcement learning (GRPO)", "",
             f"{summary['train_problems']} training problems; {summary['quarantined']} records quarantined; "
             f"{summary['steps']} steps.", "", *source_table(counts), "",
             "| held-out greedy exact match | |", "|---|---|",
             f"| before RL | {share(summary['exact_match_before'], summary['ci95_before'])} |",
             f"| after RL | {share(summary['exact_match_after'], summary['ci95_after'])} |", ""]
    if history:
        stride = max(1, len(history) // 20)
        lines += ["Reward curve (mean over each step's rollouts):", "",
                  "| step | reward | correct | ended turn | tokens | oldest version |", "|---|---|---|---|---|---|"]
        lines += [f"| {h['step']} | {h['reward_mean']:.3f} | {h['correct_mean']:.3f} | {h['finished_rate']:.2f} | "
                  f"{h['completion_tokens_mean']:.1f} | {h['oldest_sample_version']} |" for h in history[::stride]]
    return lines
