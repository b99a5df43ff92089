"""Run one source through the curate reader in a fresh process and report its rows, peak RSS
and wall time, so a test can bound the memory a Ray worker would need for the same file.

``python -m tests.hostile.child '<json>'`` with ``{"source": {...SourceConfig}, "limits": {...}}``
prints one JSON object: ``rows`` (offset, error, message, text preview, meta per row),
``peak_rss_mb`` and ``seconds``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PREVIEW = 80


def read_source(source: dict, limits: dict | None = None, timeout: float = 300) -> dict:
    """The child's report for ``source`` (a SourceConfig as a dict)."""
    spec = json.dumps({"source": source, "limits": limits or {}})
    done = subprocess.run([sys.executable, "-m", "tests.hostile.child", spec], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"reader process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(spec: dict) -> dict:
    from llmray.data.readers import sources
    from llmray.process_memory import peak_resident_mb

    source = sources.SourceConfig(**spec["source"])
    limits = sources.ReadLimits(**spec["limits"])
    started = time.perf_counter()
    rows = [{"offset": row["offset"], "error": row["error"], "message": row["message"], "meta": row["meta"],
             "text": None if row["text"] is None else row["text"][:PREVIEW]}
            for unit in sources.plan([source]) for row in sources.read_unit(unit, source, limits)]
    return {"rows": rows, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_resident_mb()}


if __name__ == "__main__":
    print(json.dumps(_main(json.loads(sys.argv[1]))))
