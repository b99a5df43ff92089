"""``llmray dpo``: direct preference optimisation of the SFT model on preference pairs.

Steps: read the pair sources (bad records to ``quarantine.jsonl``), split train/validation by
record group, encode both replies of each pair with the chat template, get the reference
log-probs from the cache or a Ray actor-pool pass (``reference.py``; training then holds only the
policy), train with the DPO objective on the shared Trainer, export ``output/model``, sample
replies to held-out prompts.

Preference metrics (:class:`PreferenceMetrics`, a Trainer hook on every worker, all-reduced) at
step 0 (the initial = reference model), every ``train.eval_every`` steps and at the end, on a
fixed subset of training pairs and on the held-out pairs: DPO loss, implicit reward accuracy
(share of pairs with r(chosen) > r(rejected), r = β·log π/π_ref), mean chosen / rejected rewards,
reward margin, and log-prob accuracy (share with log π(chosen) > log π(rejected), which is
what the reference model itself "prefers": the SFT baseline in the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from llmray import runs
from llmray.align import samples as samples_lib
from llmray.align.loader import RowLoader
from llmray.align.pairs import PairRows, encode_pairs
from llmray.align.preferences import Pair, PreferenceSource, read_source
from llmray.align.records import Quarantined, split_sources
from llmray.align.reference import ReferenceConfig, data_fingerprint, reference_logps
from llmray.align.training import AlignConfig, WorkerSpec, checkpoint_location, rank_and_world, run_workers
from llmray.config import param
from llmray.tokenizer import chat
from llmray.tokenizer import load_tokenizer


@dataclass
class DpoConfig(AlignConfig):
    """Direct preference optimisation against a frozen reference model."""

    model: str = param("{run_dir}/sft/output/model", doc="initial policy weights (HF layout): the SFT model")
    reference_model: str | None = param(None, doc="reference weights (HF layout); null = the initial policy")
    sources: list[PreferenceSource] = param(default_factory=list, doc="preference datasets")
    beta: float = param(0.1, doc="DPO β: strength of the KL anchor to the reference", min=0.0)
    label_smoothing: float = param(0.0, doc="conservative DPO: assumed share of flipped labels", min=0.0,
                                   max=0.5)
    loss: Literal["sigmoid", "ipo"] = param("sigmoid", doc="sigmoid (DPO) or ipo")
    reference: ReferenceConfig = param(default_factory=ReferenceConfig, doc="the reference log-prob pass")
    metric_pairs: int = param(256, doc="training pairs the preference metrics are measured on", min=1)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("dpo needs at least one entry in sources")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss, not ipo")

    @property
    def reference_dir(self) -> str:
        return self.reference_model or self.model

    def inputs(self) -> dict[str, str]:
        return {**self.base_inputs(), "reference_model": self.reference_dir,
                **{f"source/{i}/{s.label}": s.path for i, s in enumerate(self.sources)}}


# ---------------------------------------------------------------------------------------------
# Preference metrics (a Trainer hook)
# ---------------------------------------------------------------------------------------------

METRIC_NAMES = ("dpo_loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "logp_accuracy")


@torch.no_grad()
def preference_metrics(objective, model: torch.nn.Module, rows: PairRows, sha: str, batch_size: int) -> dict:
    """Mean DPO loss, reward accuracy, rewards, margin, log-prob accuracy over all pairs (all ranks)."""
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64, device=device)
    for batch in RowLoader(rows, batch_size=batch_size, rank=rank, world_size=world, data_sha256=sha,
                           shuffle=False, epochs=1):
        batch = {k: v.to(device) for k, v in batch.items()}
        t = objective.pair_terms(model, batch)
        valid = batch["valid"].bool()
        sums += torch.stack([t["loss"].sum(), ((t["chosen_reward"] > t["rejected_reward"]) & valid).sum(),
                             t["chosen_reward"].sum(), t["rejected_reward"].sum(),
                             (t["chosen_reward"] - t["rejected_reward"]).sum(),
                             ((t["chosen_logp"] > t["rejected_logp"]) & valid).sum(), valid.sum()]).double()
    if dist.is_initialized():
        dist.all_reduce(sums)
    pairs = float(sums[-1])
    return {name: float(sums[i]) / pairs for i, name in enumerate(METRIC_NAMES)}


class PreferenceMetrics:
    """Hook: preference metrics on each split at step 0, every ``every`` steps and at the last step."""

    def __init__(self, trainer, splits: dict[str, tuple[PairRows, str]], batch_size: int, every: int):
        self.trainer, self.splits, self.batch_size, self.every = trainer, splits, batch_size, every
        self.history: list[dict] = []

    def __call__(self, step: int, metrics: dict) -> None:
        if step and step % self.every and step != self.trainer.cfg.steps:
            return
        record = {}
        for split, (rows, sha) in self.splits.items():
            values = preference_metrics(self.trainer.objective, self.trainer.engine.model, rows, sha,
                                        self.batch_size)
            record.update({f"{split}_{name}": value for name, value in values.items()})
        self.history.append({"step": step, **record})
        if self.trainer.rank == 0 and self.trainer.writer is not None:
            self.trainer.writer.write(step, record)


@dataclass
class PreferenceMetricsFactory:
    splits: dict[str, tuple[PairRows, str]]
    every: int

    def __call__(self, spec: WorkerSpec, trainer) -> PreferenceMetrics:
        return PreferenceMetrics(trainer, self.splits, spec.batch_size, self.every)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def read_pairs(sources: list[PreferenceSource], val_fraction: float, seed: int
               ) -> tuple[list[Pair], list[Pair], list[Quarantined], dict]:
    return split_sources(sources, read_source, val_fraction, seed)


def subset(rows: PairRows, count: int) -> PairRows:
    """The first ``count`` pairs of ``rows`` (chosen and rejected rows kept aligned)."""
    n = len(rows)
    if count >= n:
        return rows
    keep = np.concatenate([np.arange(count), n + np.arange(count)])
    return PairRows(rows.tokens[keep], rows.completion[keep], rows.lengths[keep], rows.pair_ids[:count],
                    None if rows.reference_logps is None else rows.reference_logps[keep])


def make_objective(cfg: DpoConfig):
    from llmray.train.objectives import DPO

    return DPO(beta=cfg.beta, label_smoothing=cfg.label_smoothing, ipo=cfg.loss == "ipo")


def run_dpo(cfg: DpoConfig, ctx) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer)
    template = chat.ChatTemplate(tokenizer)
    pad_id = tokenizer.token_to_id(chat.PAD)
    train_pairs, val_pairs, quarantined, counts = read_pairs(cfg.sources, cfg.val_fraction, cfg.seed)
    runs.write_text(ctx.output / "quarantine.jsonl", "".join(json.dumps(q.to_dict()) + "\n" for q in quarantined))
    train_rows, _, train_stats = encode_pairs(train_pairs, template, cfg.seq_len, pad_id)
    val_rows, kept_val, val_stats = (encode_pairs(val_pairs, template, cfg.seq_len, pad_id) if val_pairs
                                     else (None, [], None))
    data = {"counts": counts, "quarantined": len(quarantined), "train": vars(train_stats),
            "val": vars(val_stats) if val_stats else None}
    runs.write_json(ctx.output / "data.json", data)
    ctx.logger.info("dpo data: %s", json.dumps(data))

    ctx.connect_ray()
    reference = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        if rows is not None:
            cached = reference_logps(cfg.reference_dir, rows, cfg.reference)
            rows.reference_logps = cached.logps
            reference[split] = {"cache_hit": cached.hit, "directory": str(cached.directory)}
    ctx.log_metrics(**{f"reference_{s}_cache_hit": float(r["cache_hit"]) for s, r in reference.items()})

    measured = {"train": subset(train_rows, cfg.metric_pairs), "val": val_rows}
    splits = {name: (rows, data_fingerprint(rows)) for name, rows in measured.items() if rows is not None}
    every = cfg.train.eval_every or cfg.train.steps
    train_sha = data_fingerprint(train_rows)
    spec = WorkerSpec(init_dir=cfg.model, tokenizer_dir=cfg.tokenizer, output_dir=str(ctx.output / "model"),
                      train=cfg.train, parallel=cfg.parallel, objective=make_objective(cfg), train_rows=train_rows,
                      train_sha256=train_sha, batch_size=cfg.batch_size, seed=cfg.seed, val_rows=val_rows,
                      val_sha256=splits["val"][1] if val_rows is not None else "",
                      metrics_path=str(ctx.dir.root / "metrics.jsonl"),
                      checkpoint_dir=checkpoint_location(ctx.dir.work, cfg, cfg.model, train_sha),
                      hook_factories=[PreferenceMetricsFactory(splits, every)])
    result = run_workers(spec, cfg)
    history = result["hooks"][0]
    before, after = history[0], history[-1]

    replies = []
    if cfg.samples.prompts and kept_val:
        replies = samples_lib.sample_replies(ctx.output / "model", cfg.tokenizer,
                                             [p.prompt for p in kept_val], cfg.samples)
        samples_lib.write_samples(ctx.output, replies)
    losses = result["losses"]
    summary = {"steps": max(losses) if losses else 0, "first_loss": losses[min(losses)] if losses else None,
               "final_loss": losses[max(losses)] if losses else None, "pairs": len(train_rows),
               "val_pairs": len(val_rows) if val_rows is not None else 0, "quarantined": len(quarantined),
               "reference": reference, "initial": before, "final": after,
               "end_of_turn_rate": samples_lib.end_of_turn_rate(replies)}
    ctx.log_metrics(**{f"final_{k}": v for k, v in after.items() if k != "step"})
    runs.write_json(ctx.output / "preference_metrics.json", history)
    runs.write_text(ctx.output / "report.md", "\n".join(_report(summary, counts, replies)) + "\n")
    return summary


def _report(summary: dict, counts: dict, replies: list[dict]) -> list[str]:
    before, after = summary["initial"], summary["final"]
    lines = ["# Direct preference optimisation", "",
             f"{summary['pairs']} training pairs, {summary['val_pairs']} held-out; "
             f"{summary['quarantined']} records quarantined.", "",
             "| source | read | train | val | quarantined |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {c['read']} | {c['train']} | {c['val']} | {c['quarantined']} |" for name, c in counts.items()]
    lines += ["", "| metric | initial (reference) model | after DPO |", "|---|---|---|"]
    for key in sorted(k for k in after if k != "step"):
        lines.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    lines += ["", "reward_accuracy: share of pairs with β·log π/π_ref higher for the chosen reply; "
              "logp_accuracy: share where the model gives the chosen reply the higher log-probability "
              "(the initial model's preference, as it has no implicit reward of its own).", ""]
    if replies:
        lines += samples_lib.markdown(replies)
    return lines
