"""Helpers shared by the SFT/DPO tests: a real BPE tokenizer trained on the instruction data, tiny models.

The tokenizer is trained once per test process (``tokenizer_dir``) with the production trainer on
~300 KB of real text from shared/data (OASST replies, GSM8K solutions, HH-RLHF dialogues), with
the tiny model's vocabulary size, so SFT/DPO tests run on real tokens of real conversations.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch

from llmray.model import hf, llama
from llmray.model.config import preset
from llmray.tokenizer import chat
from llmray.tokenizer import train as tokenizer_train
from llmray.tokenizer import TOKENIZER_FILE

VOCAB = 1024  # the tiny preset's vocabulary
_CACHE: dict[str, Path] = {}


def corpus_texts(shared_data: Path, chars: int = 300_000) -> list[str]:
    texts = []
    for line in (shared_data / "oasst1_en_100" / "en_100_tree.jsonl").read_text().splitlines():
        stack = [json.loads(line)["prompt"]]
        while stack:
            node = stack.pop()
            texts.append(node["text"])
            stack.extend(node.get("replies") or [])
    with gzip.open(shared_data / "gsm8k" / "train.jsonl.gz", "rt") as handle:
        texts += [json.loads(next(handle))["answer"] for _ in range(300)]
    with gzip.open(shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rt") as handle:
        texts += [json.loads(next(handle))["chosen"] for _ in range(200)]
    out, total = [], 0
    for text in texts:
        out.append(text)
        total += len(text)
        if total >= chars:
            break
    return out


def tokenizer_dir(shared_data: Path) -> Path:
    """A directory with tokenizer.json + tokenizer_config.json (trained once per process)."""
    if "tokenizer" not in _CACHE:
        directory = Path(tempfile.mkdtemp(prefix="llmray-align-tokenizer-"))
        texts = corpus_texts(shared_data)
        tokenizer = tokenizer_train.train_tokenizer(iter([texts]), VOCAB)
        tokenizer_train.save(tokenizer, directory)
        _CACHE["tokenizer"] = directory
    return _CACHE["tokenizer"]


def template(shared_data: Path) -> chat.ChatTemplate:
    return chat.ChatTemplate.from_file(tokenizer_dir(shared_data) / TOKENIZER_FILE)


def tiny_model(seed: int = 0, **overrides) -> llama.Transformer:
    torch.manual_seed(seed)
    return llama.build(preset("tiny", **{"vocab_size": VOCAB, "max_seq_len": 256, **overrides}))


def export_tiny_model(directory: Path, shared_data: Path, seed: int = 0, **overrides) -> Path:
    """A tiny model in HF layout (model.safetensors + config.json + tokenizer), as a stage would find it."""
    model = tiny_model(seed, **overrides)
    return hf.export(directory, model.cfg, model.state_dict(), tokenizer_dir=tokenizer_dir(shared_data))
