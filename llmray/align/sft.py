"""``llmray sft``: supervised instruction tuning of a pretrained model on a mixture of chat data.

Read the sources (bad records to ``quarantine.jsonl``), split train/validation by record group,
render with the chat template and pack by best fit into ``seq_len + 1``-token rows, then train
with the masked LM objective (loss on assistant tokens only, no attention across packed
conversations) through the SFT/DPO skeleton (:mod:`llmray.align.stage`). Outputs: ``model/``,
``quarantine.jsonl``, ``data.json`` (mixture counts, packing statistics), ``samples.jsonl``,
``report.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmray import runs
from llmray.align.conversations import Conversation, SftSource, build_mixture
from llmray.align.packing import RenderStats, pack, pack_conversations, render_all
from llmray.align import samples as samples_lib
from llmray.align.stage import AlignConfig, Prepared, run_alignment, source_table
from llmray.config import param


@dataclass
class SftConfig(AlignConfig):
    """Supervised fine-tuning on chat conversations."""

    sources: list[SftSource] = param(default_factory=list, doc="instruction datasets in the mixture")
    overlong: Literal["drop", "truncate"] = param(
        "drop", doc="conversations longer than seq_len + 1 tokens: drop them, or cut them to fit")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sft needs at least one entry in sources")

    def inputs(self) -> dict[str, str]:
        return {**self.base_inputs(), **{f"source/{i}/{s.label}": s.path for i, s in enumerate(self.sources)}}


def held_out_prompts(conversations: list[Conversation]) -> list[list[dict]]:
    """Each held-out conversation up to (not including) its last assistant turn."""
    return [c.messages[:-1] for c in conversations]


def _stats(stats: RenderStats) -> dict:
    return dict(vars(stats))


def prepare_sft(cfg: SftConfig, template, pad_id: int) -> Prepared:
    from llmray.train.objectives import MaskedLM

    mixture = build_mixture(cfg.sources, cfg.val_fraction, cfg.seed, cfg.max_quarantine_fraction)
    seq_len = cfg.batch.seq_len
    train_rows, train_stats = pack_conversations([c.messages for c in mixture.train], template, seq_len, pad_id,
                                                 cfg.overlong)
    val_examples, val_stats = render_all([c.messages for c in mixture.val], template, seq_len + 1, cfg.overlong)
    val_rows = pack(val_examples, seq_len + 1, pad_id) if val_examples else None
    data = {"counts": mixture.counts, "quarantined": len(mixture.quarantined), "train": _stats(train_stats),
            "val": _stats(val_stats), "train_rows": len(train_rows), "val_rows": len(val_rows or []),
            "row_fill": round(train_rows.fill(), 4)}
    return Prepared(train_rows, val_rows, MaskedLM(), data, mixture.quarantined, held_out_prompts(mixture.val))


def run_sft(cfg: SftConfig, ctx) -> dict:
    trained = run_alignment(cfg, ctx, lambda template, pad_id: prepare_sft(cfg, template, pad_id))
    data, replies = trained.prepared.data, trained.replies
    rate = samples_lib.end_of_turn_rate(replies)
    evals = trained.worker["evals"]
    final_val = evals[-1]["val_loss"] if evals else None
    ctx.log_metrics(end_of_turn_rate=rate, final_val_loss=final_val)
    summary = {**trained.loss_summary(), "final_val_loss": final_val, "end_of_turn_rate": rate,
               "samples": len(replies), "train_rows": data["train_rows"], "conversations": data["train"]["conversations"],
               "quarantined": data["quarantined"]}
    runs.write_text(runs.at(ctx.output, "report.md"), "\n".join(_report(summary, data, replies)) + "\n")
    return summary


def _report(summary: dict, data: dict, replies: list[dict]) -> list[str]:
    lines = ["# Supervised fine-tuning", "",
             f"{summary['conversations']} training conversations in {summary['train_rows']} packed rows "
             f"(fill {data['row_fill']:.1%}); {summary['quarantined']} records quarantined.", "",
             *source_table(data["counts"])]
    if summary["first_loss"] is None:  # an interrupted run resumed at its last checkpoint, the final step
        lines += ["", "No step ran in this process: training resumed from its final checkpoint.", ""]
    else:
        lines += ["", f"Loss {summary['first_loss']:.3f} → {summary['final_loss']:.3f} over {summary['steps']} steps"
                  + (f"; held-out loss {summary['final_val_loss']:.3f}." if summary["final_val_loss"] else "."), ""]
    if replies:
        lines += samples_lib.markdown(replies)
    return lines
