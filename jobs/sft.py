"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/sft.py --config configs/sft/tiny.yaml`."""

from _bootstrap import run_command

run_command("sft")
