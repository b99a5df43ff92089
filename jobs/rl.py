"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/rl.py --config configs/rl/tiny.yaml`."""

from _bootstrap import run_command

run_command("rl")
