"""``llmray sft``: supervised instruction tuning of a pretrained model on a mixture of chat data.

Steps: read the sources (bad records to ``quarantine.jsonl``), split train/validation by record
group, render with the chat template and pack by best fit into ``seq_len + 1``-token rows, train
with the masked LM objective (loss on assistant tokens only, no attention across packed
conversations) on the shared Trainer, export ``output/model`` in HF layout (tokenizer included),
then sample replies to held-out prompts (``samples.jsonl`` and ``report.md``).

Outputs: ``model/``, ``quarantine.jsonl``, ``data.json`` (mixture counts, packing statistics),
``samples.jsonl``, ``report.md``; metrics (loss, val_loss, lr, tokens/s, ...) in the stage's
``metrics.jsonl``. Checkpoints go to ``work/checkpoints/<data hash>``, so a re-run of the same
data resumes from the last one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from llmray import runs
from llmray.align import samples as samples_lib
from llmray.align.conversations import Conversation, SftSource, build_mixture
from llmray.align.loader import fingerprint_arrays
from llmray.align.packing import PackedRows, RenderStats, pack, pack_conversations, render_all
from llmray.align.training import AlignConfig, WorkerSpec, checkpoint_location, run_workers
from llmray.config import param
from llmray.tokenizer import chat
from llmray.tokenizer import load_tokenizer


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


def rows_fingerprint(rows: PackedRows) -> str:
    return fingerprint_arrays(rows.tokens, rows.loss_mask, rows.segment_ids)


def held_out_prompts(conversations: list[Conversation]) -> list[list[dict]]:
    """Each held-out conversation up to (not including) its last assistant turn."""
    return [c.messages[:-1] for c in conversations]


def _stats(stats: RenderStats) -> dict:
    return dict(vars(stats))


def run_sft(cfg: SftConfig, ctx) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer)
    template = chat.ChatTemplate(tokenizer)
    pad_id = tokenizer.token_to_id(chat.PAD)
    mixture = build_mixture(cfg.sources, cfg.val_fraction, cfg.seed)
    runs.write_text(ctx.output / "quarantine.jsonl",
                    "".join(json.dumps(q.to_dict()) + "\n" for q in mixture.quarantined))
    for q in mixture.quarantined[:5]:
        ctx.logger.warning("quarantined %s:%d (%s): %s", q.path, q.offset, q.error, q.message)
    train_rows, train_stats = pack_conversations([c.messages for c in mixture.train], template, cfg.seq_len,
                                                 pad_id, cfg.overlong)
    val_examples, val_stats = render_all([c.messages for c in mixture.val], template, cfg.seq_len + 1, cfg.overlong)
    val_rows = pack(val_examples, cfg.seq_len + 1, pad_id) if val_examples else None
    data = {"counts": mixture.counts, "quarantined": len(mixture.quarantined), "train": _stats(train_stats),
            "val": _stats(val_stats), "train_rows": len(train_rows), "val_rows": len(val_rows or []),
            "row_fill": round(train_rows.fill(), 4)}
    runs.write_json(ctx.output / "data.json", data)
    ctx.logger.info("sft data: %s", json.dumps(data))

    train_sha = rows_fingerprint(train_rows)
    spec = WorkerSpec(init_dir=cfg.model, tokenizer_dir=cfg.tokenizer, output_dir=str(ctx.output / "model"),
                      train=cfg.train, parallel=cfg.parallel, objective=_objective(), train_rows=train_rows,
                      train_sha256=train_sha, batch_size=cfg.batch_size, seed=cfg.seed, val_rows=val_rows,
                      val_sha256=rows_fingerprint(val_rows) if val_rows is not None else "",
                      metrics_path=str(ctx.dir.root / "metrics.jsonl"),
                      checkpoint_dir=checkpoint_location(ctx.dir.work, cfg, cfg.model, train_sha))
    if cfg.workers > 1 or cfg.use_gpu:
        ctx.connect_ray()
    result = run_workers(spec, cfg)

    replies = []
    if cfg.samples.prompts and mixture.val:
        replies = samples_lib.sample_replies(ctx.output / "model", cfg.tokenizer,
                                             held_out_prompts(mixture.val), cfg.samples)
        samples_lib.write_samples(ctx.output, replies)
    rate = samples_lib.end_of_turn_rate(replies)
    losses = result["losses"]
    final_val = result["evals"][-1]["val_loss"] if result["evals"] else None
    ctx.log_metrics(end_of_turn_rate=rate, final_val_loss=final_val)
    summary = {"steps": max(losses) if losses else 0, "first_loss": losses[min(losses)] if losses else None,
               "final_loss": losses[max(losses)] if losses else None, "final_val_loss": final_val,
               "end_of_turn_rate": rate, "samples": len(replies), "train_rows": len(train_rows),
               "conversations": train_stats.conversations, "quarantined": len(mixture.quarantined)}
    runs.write_text(ctx.output / "report.md", "\n".join(_report(summary, data, replies)) + "\n")
    return summary


def _objective():
    from llmray.train.objectives import MaskedLM

    return MaskedLM()


def _report(summary: dict, data: dict, replies: list[dict]) -> list[str]:
    lines = ["# Supervised fine-tuning", "",
             f"{summary['conversations']} training conversations in {summary['train_rows']} packed rows "
             f"(fill {data['row_fill']:.1%}); {summary['quarantined']} records quarantined.", "",
             "| source | read | train | val | quarantined |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {c['read']} | {c['train']} | {c['val']} | {c['quarantined']} |"
              for name, c in data["counts"].items()]
    if summary["first_loss"] is None:  # an interrupted run resumed at its last checkpoint, the final step
        lines += ["", "No step ran in this process: training resumed from its final checkpoint.", ""]
    else:
        lines += ["", f"Loss {summary['first_loss']:.3f} → {summary['final_loss']:.3f} over {summary['steps']} steps"
                  + (f"; held-out loss {summary['final_val_loss']:.3f}." if summary["final_val_loss"] else "."), ""]
    if replies:
        lines += samples_lib.markdown(replies)
    return lines
