"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/dpo.py --config configs/dpo/tiny.yaml`."""

from _bootstrap import run_command

run_command("dpo")
