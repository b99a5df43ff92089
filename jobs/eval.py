"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/eval.py --config configs/eval/tiny.yaml`."""

from _bootstrap import run_command

run_command("eval")
