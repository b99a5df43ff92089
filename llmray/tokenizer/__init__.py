"""Tokenizer: the files a trained tokenizer directory holds and how to load it; BPE training is
``train.py``, the chat format ``chat.py``, the compression report ``report.py``."""

from __future__ import annotations

import json
from pathlib import Path

from llmray import storage
from llmray.tokenizer import chat

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TRAINING_FILE = "training.json"


def special_ids(tokenizer) -> dict[str, int]:
    return {token: tokenizer.token_to_id(token) for token in chat.SPECIAL_TOKENS}


def load_tokenizer(directory_or_file: str | Path):
    """Load a tokenizer this project trained (a directory holding ``tokenizer.json``, or the file)."""
    from tokenizers import Tokenizer

    path = str(directory_or_file)
    file = storage.join(path, TOKENIZER_FILE) if storage.is_dir(path) else path
    if not storage.is_file(file):
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path}; run `llmray tokenizer train` first")
    tokenizer = Tokenizer.from_str(storage.read_text(file))
    missing = [t for t in chat.SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{file} lacks special tokens {missing}; it was not trained by llmray")
    return tokenizer


def read_training(directory: str | Path) -> dict:
    """The ``training.json`` a tokenizer directory holds (val fraction and special ids)."""
    return json.loads(storage.read_text(storage.join(directory, TRAINING_FILE)))
