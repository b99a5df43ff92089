"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/classifier.py --config configs/data/classifiers.yaml`."""

from _bootstrap import run_command

run_command("classifier", "train")
