"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/curate.py --config configs/data/tiny.yaml`."""

from _bootstrap import run_command

run_command("curate")
