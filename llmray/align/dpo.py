"""``llmray dpo``: direct preference optimisation of the SFT model on preference pairs.

Read the pair sources (bad records to ``quarantine.jsonl``), split train/validation by record
group, encode both replies of each pair with the chat template, get the reference log-probs from
the cache or a Ray actor-pool pass (``reference.py``; training then holds only the policy), then
train with the DPO objective through the SFT/DPO skeleton (:mod:`llmray.align.stage`).

Preference metrics (:class:`PreferenceMetrics`, a Trainer hook on every worker, all-reduced) at
step 0 (the initial = reference model), every ``train.eval_every`` steps and at the end, on a
fixed subset of training pairs and on the held-out pairs: DPO loss, implicit reward accuracy
(share of pairs with r(chosen) > r(rejected), r = β·log π/π_ref), mean chosen / rejected rewards,
reward margin, and log-prob accuracy (share with log π(chosen) > log π(rejected), which is
what the reference model itself "prefers": the SFT baseline in the report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist

from llmray import runs
from llmray.align import samples as samples_lib
from llmray.align.loader import RowLoader
from llmray.align.pairs import PairRows, encode_pairs
from llmray.align.preferences import PreferenceSource, read_source
from llmray.align.records import split_sources
from llmray.align.reference import ReferenceConfig, reference_logps
from llmray.align.stage import AlignConfig, Prepared, run_alignment, source_table
from llmray.config import param


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
def pair_sums(model: torch.nn.Module, rows, batch_size: int, rank: int, world_size: int,
              terms: Callable[[dict, torch.Tensor], list[torch.Tensor]]) -> tuple[list[float], float]:
    """Sums over every pair of ``rows`` (all ranks) of ``terms(batch, valid)`` (scalars per batch), and
    the number of real pairs: the one loop of the DPO and reward-model metrics."""
    device = next(model.parameters()).device
    sums = None
    for batch in RowLoader(rows, batch_size=batch_size, rank=rank, world_size=world_size, shuffle=False, epochs=1):
        batch = {k: v.to(device) for k, v in batch.items()}
        valid = batch["valid"].bool()
        values = torch.stack([*terms(batch, valid), valid.sum()]).double()
        sums = values if sums is None else sums + values
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums[:-1].tolist(), float(sums[-1])


def preference_metrics(objective, model: torch.nn.Module, rows: PairRows, batch_size: int, rank: int,
                       world_size: int) -> dict:
    """Mean DPO loss, reward accuracy, rewards, margin, log-prob accuracy over all pairs (all ranks)."""
    def terms(batch: dict, valid: torch.Tensor) -> list[torch.Tensor]:
        t = objective.pair_terms(model, batch)
        return [t["loss"].sum(), ((t["chosen_reward"] > t["rejected_reward"]) & valid).sum(),
                t["chosen_reward"].sum(), t["rejected_reward"].sum(), (t["chosen_reward"] - t["rejected_reward"]).sum(),
                ((t["chosen_logp"] > t["rejected_logp"]) & valid).sum()]

    sums, pairs = pair_sums(model, rows, batch_size, rank, world_size, terms)
    return {name: value / pairs for name, value in zip(METRIC_NAMES, sums)}


class PreferenceMetrics:
    """Hook: preference metrics on each split at step 0, every ``every`` steps and at the last step.

    ``measure(objective, model, rows, batch_size, rank, world_size) -> {name: value}`` computes them
    (DPO's :func:`preference_metrics`; the reward model's pair accuracy)."""

    def __init__(self, trainer, splits: dict[str, Any], batch_size: int, every: int,
                 measure: Callable[..., dict] = preference_metrics):
        self.trainer, self.splits, self.batch_size, self.every = trainer, splits, batch_size, every
        self.measure = measure
        self.history: list[dict] = []

    def __call__(self, step: int, metrics: dict) -> None:
        if step and step % self.every and step != self.trainer.cfg.steps:
            return
        record = {}
        for split, rows in self.splits.items():
            values = self.measure(self.trainer.objective, self.trainer.engine.model, rows, self.batch_size,
                                  self.trainer.rank, self.trainer.world_size)
            record.update({f"{split}_{name}": value for name, value in values.items()})
        self.history.append({"step": step, **record})
        if self.trainer.rank == 0 and self.trainer.writer is not None:
            self.trainer.writer.write(step, record, console=False)


@dataclass
class PreferenceMetricsFactory:
    """Makes each worker's :class:`PreferenceMetrics` hook (a :data:`~llmray.train.launch.HookFactory`)."""

    splits: dict[str, Any]
    batch_size: int
    every: int
    measure: Callable[..., dict] = preference_metrics

    def __call__(self, trainer) -> PreferenceMetrics:
        return PreferenceMetrics(trainer, self.splits, self.batch_size, self.every, self.measure)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

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


def prepare_dpo(cfg: DpoConfig, ctx, template, pad_id: int) -> Prepared:
    """Encode the pairs, attach reference log-probs (cached, or an actor-pool pass on Ray) and the metrics hook."""
    train_pairs, val_pairs, quarantined, counts = split_sources(cfg.sources, read_source, cfg.val_fraction, cfg.seed,
                                                                  cfg.max_quarantine_fraction)
    train_rows, _, train_stats = encode_pairs(train_pairs, template, cfg.batch.seq_len, pad_id)
    val_rows, kept_val, val_stats = (encode_pairs(val_pairs, template, cfg.batch.seq_len, pad_id) if val_pairs
                                     else (None, [], None))
    data = {"counts": counts, "quarantined": len(quarantined), "train": vars(train_stats),
            "val": vars(val_stats) if val_stats else None}
    ctx.connect_ray()
    reference = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        if rows is not None:
            cached = reference_logps(cfg.reference_dir, rows, cfg.reference)
            rows.reference_logps = cached.logps
            reference[split] = {"cache_hit": cached.hit, "directory": str(cached.directory)}
    ctx.log_metrics(**{f"reference_{s}_cache_hit": float(r["cache_hit"]) for s, r in reference.items()})
    measured = {"train": subset(train_rows, cfg.metric_pairs), "val": val_rows}
    metrics = PreferenceMetricsFactory({name: rows for name, rows in measured.items() if rows is not None},
                                       cfg.batch.micro_batch_size, cfg.train.eval_every or cfg.train.steps)
    return Prepared(train_rows, val_rows, make_objective(cfg), {**data, "reference": reference}, quarantined,
                    [p.prompt for p in kept_val], hooks=[metrics])


def run_dpo(cfg: DpoConfig, ctx) -> dict:
    trained = run_alignment(cfg, ctx, lambda template, pad_id: prepare_dpo(cfg, ctx, template, pad_id))
    data, replies = trained.prepared.data, trained.replies
    history = trained.worker["hooks"][0]
    before, after = history[0], history[-1]
    summary = {**trained.loss_summary(), "pairs": len(trained.prepared.train_rows),
               "val_pairs": len(trained.prepared.val_rows or []), "quarantined": data["quarantined"],
               "reference": data["reference"], "initial": before, "final": after,
               "end_of_turn_rate": samples_lib.end_of_turn_rate(replies)}
    ctx.log_metrics(**{f"final_{k}": v for k, v in after.items() if k != "step"})
    runs.write_json(runs.at(ctx.output, "preference_metrics.json"), history)
    runs.write_text(runs.at(ctx.output, "report.md"), "\n".join(_report(summary, data["counts"], replies)) + "\n")
    return summary


def _report(summary: dict, counts: dict, replies: list[dict]) -> list[str]:
    before, after = summary["initial"], summary["final"]
    lines = ["# Direct preference optimisation", "",
             f"{summary['pairs']} training pairs, {summary['val_pairs']} held-out; "
             f"{summary['quarantined']} records quarantined.", "", *source_table(counts)]
    lines += ["", "| metric | initial (reference) model | after DPO |", "|---|---|---|"]
    for key in sorted(k for k in after if k != "step"):
        lines.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    lines += ["", "reward_accuracy: share of pairs with β·log π/π_ref higher for the chosen reply; "
              "logp_accuracy: share where the model gives the chosen reply the higher log-probability "
              "(the initial model's preference, as it has no implicit reward of its own).", ""]
    if replies:
        lines += samples_lib.markdown(replies)
    return lines
