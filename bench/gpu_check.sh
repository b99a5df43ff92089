#!/usr/bin/env bash
# The one-command GPU check (bench/gpu_check.py): run it on a machine with CUDA GPUs and a CUDA
# build of torch. Uses .venv/bin/python when present, else python3. Without CUDA it says so and
# exits 0. Extra arguments go to the script (--quick, --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec "$PYTHON" bench/gpu_check.py "$@"
