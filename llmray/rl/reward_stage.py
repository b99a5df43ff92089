"""``llmray reward train``: a reward model from preference pairs, on the SFT/DPO stage skeleton.

The pairs are DPO's (same sources, split, encoding and quarantine); the model is the SFT model
with a scalar head (:class:`~llmray.rl.reward_model.ScalarHeadInit`), trained with the
Bradley-Terry objective through :func:`llmray.align.stage.run_alignment`, so it checkpoints,
resumes and runs on Ray Train like SFT and DPO. The export (``output/model``, HF
``LlamaForSequenceClassification``) is what ``llmray rl`` scores completions with
(``reward: {kind: reward_model, model: ...}``). The report gives held-out pair accuracy before
(the random head) and after, with its 95% Wilson interval.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmray import runs
from llmray.align.dpo import PreferenceMetricsFactory, subset
from llmray.align.pairs import encode_pairs
from llmray.align.preferences import PreferenceSource, read_source
from llmray.align.records import split_sources
from llmray.align.stage import AlignConfig, Prepared, SamplingSection, run_alignment, source_table
from llmray.config import param
from llmray.rl.reward_model import BradleyTerry, RewardPairs, ScalarHeadInit, reward_pair_metrics
from llmray.rl.stage import wilson_interval


@dataclass
class RewardModelConfig(AlignConfig):
    """A scalar-head reward model trained on preference pairs."""

    model: str = param("{run_dir}/sft/output/model", doc="the LM (HF layout) whose body the reward model starts from")
    sources: list[PreferenceSource] = param(default_factory=list, doc="preference datasets")
    metric_pairs: int = param(256, doc="training pairs the accuracy is also measured on", min=1)
    samples: SamplingSection = param(default_factory=lambda: SamplingSection(prompts=0),
                                     doc="must stay at prompts: 0 (a reward model does not generate)")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("reward needs at least one entry in sources")
        if self.samples.prompts:
            raise ValueError("a reward model does not generate: samples.prompts must be 0")

    def inputs(self) -> dict[str, str]:
        return {**self.base_inputs(), **{f"source/{i}/{s.label}": s.path for i, s in enumerate(self.sources)}}


def prepare_reward(cfg: RewardModelConfig, template, pad_id: int) -> Prepared:
    train_pairs, val_pairs, quarantined, counts = split_sources(cfg.sources, read_source, cfg.val_fraction, cfg.seed,
                                                                  cfg.max_quarantine_fraction)
    train_rows, _, train_stats = encode_pairs(train_pairs, template, cfg.batch.seq_len, pad_id)
    val_rows = encode_pairs(val_pairs, template, cfg.batch.seq_len, pad_id)[0] if val_pairs else None
    splits = {"train": RewardPairs(subset(train_rows, cfg.metric_pairs))}
    if val_rows is not None:
        splits["val"] = RewardPairs(val_rows)
    metrics = PreferenceMetricsFactory(splits, cfg.batch.micro_batch_size, cfg.train.eval_every or cfg.train.steps,
                                       measure=reward_pair_metrics)
    data = {"counts": counts, "quarantined": len(quarantined), "train": vars(train_stats),
            "val_pairs": len(val_rows) if val_rows is not None else 0}
    return Prepared(RewardPairs(train_rows), RewardPairs(val_rows) if val_rows is not None else None, BradleyTerry(),
                    data, quarantined, [], hooks=[metrics], model=ScalarHeadInit(cfg.model))


def run_reward_model(cfg: RewardModelConfig, ctx) -> dict:
    trained = run_alignment(cfg, ctx, lambda template, pad_id: prepare_reward(cfg, template, pad_id))
    history = trained.worker["hooks"][0] or []
    before, after = (history[0], history[-1]) if history else ({}, {})
    summary = {**trained.loss_summary(), "pairs": len(trained.prepared.train_rows),
               "quarantined": trained.prepared.data["quarantined"], "initial": before, "final": after}
    if "val_accuracy" in after:
        pairs = int(after["val_pairs"])
        summary["val_accuracy"] = after["val_accuracy"]
        summary["val_accuracy_ci95"] = wilson_interval(round(after["val_accuracy"] * pairs), pairs)
    ctx.log_metrics(**{f"final_{k}": v for k, v in after.items() if k != "step"})
    runs.write_json(runs.at(ctx.output, "reward_metrics.json"), history)
    report = _report(summary, trained.prepared.data["counts"])
    runs.write_text(runs.at(ctx.output, "report.md"), "\n".join(report) + "\n")
    return summary


def _report(summary: dict, counts: dict) -> list[str]:
    before, after = summary["initial"], summary["final"]
    lines = ["# Reward model (Bradley-Terry)", "",
             f"{summary['pairs']} training pairs; {summary['quarantined']} records quarantined.", "",
             *source_table(counts), ""]
    if "val_accuracy_ci95" in summary:
        low, high = summary["val_accuracy_ci95"]
        lines += [f"Held-out pair accuracy: **{summary['val_accuracy']:.3f}** (95% Wilson interval {low:.3f}–{high:.3f}, "
                  f"{int(after['val_pairs'])} pairs; 0.5 is chance).", ""]
    lines += ["| metric | initial (random head) | trained |", "|---|---|---|"]
    lines += [f"| {key} | {before[key]:.4f} | {after[key]:.4f} |" for key in sorted(after) if key != "step"]
    return lines
