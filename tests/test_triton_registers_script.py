"""`benchmarks/triton_registers.py`: every kernel variant, compiled offline for an H100 with the
launchers' configuration, keeps its registers (no spills); and the check does see spills (the
64-token tile at head_dim 256 spilled 13 KB per thread before the launch configuration was
chosen per head_dim).

The kernels must be compiled, not interpreted: this process has `TRITON_INTERPRET=1`, so both
checks run in a child process without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "triton_registers.py"

SPILLING_TILE = """
import sys
sys.path.insert(0, {benchmarks!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_registers as script
from hf_subtok.kernels.packed_attention_triton import _packed_decode_kernel

constants = dict(script.DECODE_BASE, HEAD_DIM=256, WIDTH=32, GROUP=2, BLOCK_R=16, BLOCK_D=256, BLOCK_T=64)
source = ASTSource(_packed_decode_kernel, script.decode_signature(_packed_decode_kernel), constants)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4}})
print(script.ptxas_usage(kernel.asm["ptx"], "sm_90a", script.find_ptxas(triton))[1])
"""


def _ptxas_or_skip():
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not any((folder / name).exists() for name in ("ptxas-blackwell", "ptxas")):
        pytest.skip("this triton build bundles no ptxas")


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_no_kernel_variant_spills_registers():
    _ptxas_or_skip()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--fail-on-spill"], capture_output=True, text=True, env=_compiled_env(), cwd=ROOT
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and not line.startswith("| kernel")]
    assert len(rows) == 16
    assert all(line.rstrip().endswith("| 0 |") for line in rows), run.stdout


def test_the_check_sees_a_spilling_tile():
    _ptxas_or_skip()
    code = SPILLING_TILE.format(benchmarks=str(ROOT / "benchmarks"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_compiled_env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip().splitlines()[-1]) > 1000


def test_refuses_to_run_interpreted():
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env={**_compiled_env(), "TRITON_INTERPRET": "1"}
    )
    assert run.returncode == 2 and "unset TRITON_INTERPRET" in run.stderr
