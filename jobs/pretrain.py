"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/pretrain.py --config configs/train/tiny.yaml`."""

from _bootstrap import run_command

run_command("pretrain")
