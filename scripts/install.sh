#!/usr/bin/env bash
# Install llmray into a virtual environment (default .venv), choosing the right torch first.
#
# Why torch first: an unpinned `torch` from PyPI is a multi-GB CUDA build. Without a GPU we
# install the CPU build (a local wheel when pip can see one, else PyTorch's CPU index), then pin
# the installed version with a constraint so neither the project nor any package's isolated
# build environment (deepspeed builds from source) can pull another torch.
set -euo pipefail

VENV="${1:-.venv}"
EXTRAS="${2:-dev}"
TORCH_VERSION="${LLMRAY_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       [ "$("$candidate" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
      PYTHON="$candidate"; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "install: no Python 3.11 found (tried python3.11, python3, python); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

installed_torch() { "$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true; }

current="$(installed_torch)"
if [ -z "$current" ]; then
  if has_gpu; then
    echo "install: GPU found; installing torch==$TORCH_VERSION (CUDA build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    echo "install: no GPU; installing the CPU build of torch==$TORCH_VERSION"
    # A local +cpu wheel (pip's find-links) installs in seconds; otherwise PyTorch's CPU index.
    "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
  current="$(installed_torch)"
fi
echo "install: torch $current"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$current" > "$constraints"
PIP_CONSTRAINT="$constraints" "${PIP[@]}" install -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import llmray, torch, ray; print(f'install: llmray {llmray.__version__} ready (torch {torch.__version__}, ray {ray.__version__})')"
