"""Registers and spills of the Triton kernels on a CUDA target, compiled offline (no GPU needed).

Each variant of the decode kernel (plain, quantized, per-channel keys, codeword values, fp32
"ieee" dots, head_dim 64 to 256) and of the packing kernel is compiled for `--arch` with the
launch configuration the launchers use (`decode_launch_config`, `pack_block_tokens`), and the
ptxas bundled with triton reports its registers and spill bytes. A spill sends registers to
local memory: the decode kernel is memory bound, so spilling costs bandwidth on every tile.

    TRITON_INTERPRET= python benchmarks/triton_registers.py --fail-on-spill

Must run without `TRITON_INTERPRET=1` (the kernels must be JIT functions, not interpreted).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("triton_registers")

# pointer dtypes: qdt (query, tail, output), kdt/vdt (keys/values), ksdt/vsdt (their scales), vcdt (codebook)
PLAIN: dict = {}  # the query's dtype for every pointer
DECODE_VARIANTS = {  # name: (pointer dtypes, constexpr overrides)
    "bf16 D128 K<G": (PLAIN, {}),
    "fp16 D128": ({"qdt": "fp16"}, {}),
    "fp32 D128 ieee dots": ({"qdt": "fp32"}, {"LOW_PRECISION_DOT": False}),
    "bf16 D128 mask, valid, scores": (PLAIN, {"HAS_MASK": True, "HAS_STORED_VALID": True, "WRITE_SCORES": True}),
    "bf16 D128 4-bit keys and values": (
        {"kdt": "u8", "vdt": "u8", "ksdt": "bf16", "vsdt": "bf16"},
        {"KEY_BITS": 4, "KEY_GROUP_SIZE": 32, "VALUE_BITS": 4, "VALUE_GROUP_SIZE": 16},
    ),
    "bf16 D128 8-bit, log scales": (
        {"kdt": "u8", "vdt": "u8", "ksdt": "u8", "vsdt": "u8"},
        {"KEY_BITS": 8, "KEY_GROUP_SIZE": 32, "VALUE_BITS": 8, "VALUE_GROUP_SIZE": 16},
    ),
    "bf16 D128 2-bit per-channel keys, scores": (
        {"kdt": "u8", "vdt": "u8", "ksdt": "fp16", "vsdt": "fp16"},
        {"KEY_BITS": 2, "KEY_GROUP_SIZE": 1, "KEY_PER_CHANNEL": True, "VALUE_BITS": 2, "VALUE_GROUP_SIZE": 16,
         "WRITE_SCORES": True},
    ),  # fmt: skip
    "bf16 D128 codeword values": (
        {"vdt": "u8", "vsdt": "fp16", "vcdt": "fp16"},
        {"VALUE_CODED": True, "VALUE_BITS": 4, "VALUE_GROUP_SIZE": 4},
    ),
    "bf16 D64": (PLAIN, {"HEAD_DIM": 64, "WIDTH": 8, "GROUP": 3}),
    "fp32 D64 per-channel keys, codes (the 6% layout)": (
        {"qdt": "fp32", "kdt": "u8", "vdt": "u8", "ksdt": "u8", "vsdt": "fp16", "vcdt": "fp32"},
        {"LOW_PRECISION_DOT": False, "HEAD_DIM": 64, "WIDTH": 64, "KEY_BITS": 2, "KEY_GROUP_SIZE": 1,
         "KEY_PER_CHANNEL": True, "VALUE_CODED": True, "VALUE_BITS": 4, "VALUE_GROUP_SIZE": 4, "WRITE_SCORES": True},
    ),  # fmt: skip
    "bf16 D96": (PLAIN, {"HEAD_DIM": 96, "WIDTH": 12, "GROUP": 6}),
    "bf16 D256": (PLAIN, {"HEAD_DIM": 256, "WIDTH": 32, "GROUP": 2}),
    "fp32 D256 ieee dots": ({"qdt": "fp32"}, {"HEAD_DIM": 256, "WIDTH": 32, "GROUP": 2, "LOW_PRECISION_DOT": False}),
}
PACK_VARIANTS = {  # name: (values dtype, D, G, K)
    "pack bf16 D128 K3of8": ("bf16", 128, 8, 3),
    "pack fp32 D64 K1of1": ("fp32", 64, 1, 1),
    "pack bf16 D128 K8of64": ("bf16", 128, 64, 8),
}
DECODE_BASE = dict(
    GROUP=4, HEAD_DIM=128, WIDTH=16, HAS_MASK=False, HAS_STORED_VALID=False, WRITE_SCORES=False,
    IMPLIED_GROUPS=False, LOW_PRECISION_DOT=True, KEY_BITS=0, KEY_GROUP_SIZE=1, KEY_PER_CHANNEL=False,
    VALUE_BITS=0, VALUE_GROUP_SIZE=1, VALUE_CODED=False,
)  # fmt: skip


def decode_signature(kernel, qdt="bf16", kdt=None, vdt=None, ksdt="fp32", vsdt="fp32", vcdt="fp32") -> dict:
    """Triton's signature of the decode kernel for these pointer dtypes (ints as i32)."""
    pointers = dict(Q=qdt, K=kdt or qdt, V=vdt or qdt, IDX="u8", TK=qdt, TV=qdt, MASK="u8", VALID="u8", OUT=qdt,
                    LSE="fp32", SC="fp32", KS=ksdt, KZ="fp32", KB="i16", VS=vsdt, VZ="fp32", VC=vcdt)  # fmt: skip
    return {name: _kind(name, pointers) for name in kernel.arg_names}


def _kind(name: str, pointers: dict) -> str:
    if name in pointers:
        return "*" + pointers[name]
    if name == "scale_log2":
        return "fp32"
    return "constexpr" if name.isupper() else "i32"


def ptxas_usage(ptx: str, arch: str, ptxas: Path) -> tuple[int, int]:
    """`(registers, spill store bytes)` ptxas reports for one kernel's PTX."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run(
            [str(ptxas), "-v", f"-arch={arch}", str(source), "-o", str(Path(folder) / "kernel.o")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = spills = None
    for line in report.splitlines():
        if "Used" in line and "registers" in line:
            registers = int(line.split("Used")[1].split("registers")[0])
        if "spill stores" in line:
            spills = int(line.split("bytes spill stores")[0].split(",")[-1])
    if registers is None or spills is None:
        raise RuntimeError(f"could not read registers and spills from ptxas:\n{report}")
    return registers, spills


def find_ptxas(triton_module) -> Path:
    """The newest ptxas bundled with triton (the plain one may not read triton's PTX version)."""
    folder = Path(triton_module.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no ptxas in {folder}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="ptxas -arch (default sm_90a, an H100)")
    parser.add_argument("--capability", type=int, default=90, help="the CUDA target triton compiles for")
    parser.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any variant spills")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_subtok.kernels.pack_triton import _pack_kernel, pack_block_tokens
    from hf_subtok.kernels.packed_attention_triton import (
        _packed_decode_kernel,
        decode_launch_config,
    )

    target, ptxas = GPUTarget("cuda", args.capability, 32), find_ptxas(triton)
    rows = []
    for name, (pointers, overrides) in DECODE_VARIANTS.items():
        constants = {**DECODE_BASE, **overrides}
        block_d = max(16, triton.next_power_of_2(constants["HEAD_DIM"]))
        block_t, num_warps = decode_launch_config(block_d)
        constants.update(BLOCK_R=16, BLOCK_D=block_d, BLOCK_T=block_t)
        source = ASTSource(_packed_decode_kernel, decode_signature(_packed_decode_kernel, **pointers), constants)
        kernel = triton.compile(source, target=target, options={"num_warps": num_warps})
        rows.append((name, block_t, num_warps, *ptxas_usage(kernel.asm["ptx"], args.arch, ptxas)))
    for name, (dtype, head_dim, groups, keep) in PACK_VARIANTS.items():
        block_d, block_g = triton.next_power_of_2(head_dim), triton.next_power_of_2(groups)
        block_t = pack_block_tokens(block_d, block_g)
        pointers = {"V": "*" + dtype, "S": "*fp32", "OUT": "*" + dtype, "IDX": "*u8"}
        signature = {n: pointers.get(n, "constexpr" if n.isupper() else "i32") for n in _pack_kernel.arg_names}
        constants = dict(GROUPS=groups, KEEP=keep, WIDTH=head_dim // groups, HEAD_DIM=head_dim,
                         BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_D=block_d)  # fmt: skip
        kernel = triton.compile(ASTSource(_pack_kernel, signature, constants), target=target, options={"num_warps": 4})
        rows.append((name, block_t, 4, *ptxas_usage(kernel.asm["ptx"], args.arch, ptxas)))
    print(f"triton {triton.__version__}, {ptxas.name} -arch={args.arch}")
    print("| kernel variant | BLOCK_T | warps | registers | spill store bytes |")
    print("|---|---:|---:|---:|---:|")
    for name, block_t, warps, registers, spills in rows:
        print(f"| {name} | {block_t} | {warps} | {registers} | {spills} |")
    spilled = [row[0] for row in rows if row[4]]
    if spilled:
        logger.warning("variants that spill: %s", ", ".join(spilled))
    return 1 if spilled and args.fail_on_spill else 0


if __name__ == "__main__":
    sys.exit(main())
