"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/serve.py --model runs/demo/sft/output/export`.

The job runs for as long as the application serves; `ray job stop` removes the application.
"""

from _bootstrap import run_command

run_command("serve")
