"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/tokenizer.py --config configs/tokenizer/tiny.yaml`."""

from _bootstrap import run_command

run_command("tokenizer", "train")
