"""Chat completions on held-out prompts after SFT/DPO: the qualitative check and the stop-rate figure.

The prompt is rendered with the chat template and the generation header
(``add_generation_prompt=True``); sampling stops at the template's stop ids. A reply *finishes*
when it ends with a stop token within ``max_new_tokens`` (and the model's context); the share
of finished replies is the ``end_of_turn_rate`` the SFT acceptance asks for (≥ 0.95 on the demo).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmray import report, runs
from llmray.align.stage import SamplingSection
from llmray.model import generate as generate_lib
from llmray.model import hf
from llmray.tokenizer import load_tokenizer
from llmray.tokenizer.chat import ChatTemplate

SAMPLES_FILE = "samples.jsonl"


def sample_replies(model_dir: str | Path, tokenizer_dir: str | Path, prompts: list[list[dict]],
                   cfg: SamplingSection) -> list[dict]:
    """One sampled reply for each of the first ``cfg.prompts`` prompts that leave room in the context.

    A prompt as long as the model's context cannot be answered at all; it is passed over (not
    counted as unfinished), and the next held-out prompt takes its place.
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    template = ChatTemplate(tokenizer)
    model = hf.load(model_dir).model
    out = []
    for index, messages in enumerate(prompts):
        if len(out) == cfg.prompts:
            break
        ids = template.render(messages, add_generation_prompt=True).ids
        room = model.cfg.max_seq_len - len(ids)
        if room <= 0:
            continue
        sampling = generate_lib.SamplingConfig(max_new_tokens=min(cfg.max_new_tokens, room),
                                               temperature=cfg.temperature, top_p=cfg.top_p,
                                               stop_tokens=list(template.stop_ids), seed=cfg.seed + index)
        tokens = [int(step[0]) for step in generate_lib.stream(model, [ids], sampling)]
        finished = bool(tokens) and tokens[-1] in template.stop_ids
        text = tokenizer.decode(tokens[:-1] if finished else tokens)
        out.append({"prompt": messages, "reply": text, "tokens": len(tokens), "finished": finished})
    return out


def end_of_turn_rate(samples: list[dict]) -> float | None:
    return sum(s["finished"] for s in samples) / len(samples) if samples else None


def write_samples(directory: str | Path, samples: list[dict]) -> None:
    runs.write_text(runs.at(directory, SAMPLES_FILE), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def markdown(samples: list[dict], limit: int = 8) -> list[str]:
    lines = [f"Sampled replies to held-out prompts: {sum(s['finished'] for s in samples)}/{len(samples)} "
             f"ended with the end-of-turn token.", ""]
    for s in samples[:limit]:
        lines += [f"**user:** {_quote(s['prompt'][-1]['content'])}", "",
                  f"**assistant:** {_quote(s['reply'])}{'' if s['finished'] else ' *(cut at the length limit)*'}",
                  ""]
    return lines


def _quote(text: str, chars: int = 400) -> str:
    """One line of at most ``chars`` characters of the text, escaped: prompts and replies are data."""
    text = " ".join(text.split())
    return report.escape_markdown(text if len(text) <= chars else text[:chars] + " …")
