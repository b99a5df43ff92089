"""The model: a Llama-style Transformer (llama.py), its config and presets (config.py),
KV-cache generation (generate.py) and Hugging Face export/import (hf.py)."""
