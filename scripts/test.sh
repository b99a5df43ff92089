#!/usr/bin/env bash
# The README's test command: install what is needed, then run the test suite. Extra arguments go
# to pytest (e.g. tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
exec python -m pytest "${@:-tests}"
