"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline/tiny.yaml``."""

from _bootstrap import run_command

run_command("pipeline")
