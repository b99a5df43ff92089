"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/tune.py --config configs/tune/lr_tiny.yaml`."""

from _bootstrap import run_command

run_command("tune")
