"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/tokens.py --config configs/tokens/tiny.yaml`."""

from _bootstrap import run_command

run_command("tokens")
