#!/usr/bin/env bash
# The README's main command: install what is needed, then run the whole pipeline end to end on an
# embedded local Ray. Extra arguments go to `llmray pipeline` (e.g. --run NAME, key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
exec llmray pipeline --config configs/pipeline/tiny.yaml "$@"
