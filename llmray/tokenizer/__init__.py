"""Tokenizer: byte-level BPE training (train.py), the chat format (chat.py), the report (report.py)."""
