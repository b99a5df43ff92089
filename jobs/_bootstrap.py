"""Shared entry for ``jobs/<stage>.py``: run one llmray command inside a Ray job.

``ray job submit --working-dir . -- python jobs/<stage>.py --config ...`` starts the script with
``jobs/`` as ``sys.path[0]``; the uploaded working directory (the repository root) is put on the
path so ``llmray`` imports from the submitted code even where it is not pip-installed. Inside a
job ``RAY_ADDRESS`` is set, so the stage joins the cluster instead of starting a local Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_command(*command: str) -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from llmray.cli import main

    sys.exit(main([*command, *sys.argv[1:]]))
