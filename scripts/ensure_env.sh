#!/usr/bin/env bash
# Sourced by demo.sh and test.sh (which run with set -e): makes sure .venv holds an up-to-date
# install (re-running scripts/install.sh only when pyproject.toml or the installer changed), then
# puts .venv/bin first on PATH.
VENV="${VENV:-.venv}"
STAMP="$VENV/.llmray-installed"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  bash scripts/install.sh "$VENV" dev
  echo "$want" > "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"
