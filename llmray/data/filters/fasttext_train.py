"""Train a supervised fastText model in a child process whose large allocations are zeroed.

Why a child process: fastText 0.9.3 allocates the input embedding matrix with
``intgemm::AlignedVector`` (not zero-initialised) and, with ``thread < 10``, its ``uniform()``
initialises only ``thread / 10`` of the rows (``uniformThread`` fills blocks of ``m*n/10``).
The remaining rows hold whatever the allocator returns. A fresh ``mmap`` gives zero pages, but
glibc raises its mmap threshold after large frees, so later trainings in the same process get
recycled heap memory and fail with ``RuntimeError: Encountered NaN.`` (measured here: 4 of 6
seeds in one process failed; 0 of 6 with the fix). The child runs with
``MALLOC_MMAP_THRESHOLD_`` pinned, so every large block comes from ``mmap`` and is zero: the
uninitialised rows start at zero, as they did in fastText 0.9.2, and training is deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Pinning the threshold (any value) disables glibc's dynamic adjustment; 128 KiB is its default.
_ZEROED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class FastTextTrainingError(RuntimeError):
    """fastText training failed; the message carries fastText's own error output."""


def train_supervised(train_file: Path, model_file: Path, **options) -> None:
    """Train on ``train_file`` (fastText's ``__label__x text`` lines) and save to ``model_file``."""
    request = json.dumps({"input": str(train_file), "output": str(model_file), "options": options})
    env = {**os.environ, **_ZEROED_ALLOCATOR}
    done = subprocess.run([sys.executable, "-m", __name__], input=request, text=True, env=env,
                          capture_output=True)
    if done.returncode != 0:
        raise FastTextTrainingError(f"fastText training on {train_file} with {options} failed "
                                    f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def _main() -> None:
    import fasttext

    request = json.loads(sys.stdin.read())
    model = fasttext.train_supervised(request["input"], **request["options"])
    model.save_model(request["output"])


if __name__ == "__main__":
    _main()
