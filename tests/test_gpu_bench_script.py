"""`benchmarks/gpu_decode_kernel.py` builds and times every storage it offers (run here on the CPU,
the Triton provider under the interpreter, with a counting timer instead of CUDA events), so
the script is ready for the first CUDA machine."""

from __future__ import annotations

import pytest
import torch

from tests.benchmark_scripts import load_benchmark

pytest.importorskip("triton")


def _script():
    return load_benchmark("gpu_decode_kernel")


def _args(script, *extra: str):
    small = ["--kv-heads", "2", "--q-per-kv", "2", "--head-dim", "64", "--window", "8", "--dtype", "fp32"]
    return script.parse_args([*small, *extra])


@pytest.mark.parametrize("bits", [None, 8, 4, 2], ids=["plain", "int8", "int4", "int2"])
@pytest.mark.parametrize("keep", [8, 3])
@pytest.mark.parametrize("mass", [False, True], ids=["out", "with-mass"])
def test_every_case_runs_and_counts_what_it_stores(bits, keep, mass):
    script = _script()
    args = _args(script, "--providers", "sdpa", "torch", "triton", *(["--mass"] if mass else []))
    calls = []

    def timer(fn):
        calls.append(fn())
        return 2.0

    rows = script.run_case(args, 200, keep, bits, None, torch.device("cpu"), timer=timer)
    assert [row["provider"] for row in rows] == ["sdpa", "torch", "triton"]
    if mass:  # packed providers return (out, mass), and both paths agree
        (torch_out, torch_mass), (triton_out, triton_mass) = calls[1], calls[2]
        torch.testing.assert_close(triton_mass, torch_mass, atol=1e-5, rtol=1e-4)
    else:
        torch_out, triton_out = calls[1], calls[2]
    torch.testing.assert_close(triton_out, torch_out, atol=1e-4, rtol=1e-4)

    _, _, _, kv = script.stored_case(args, 200, keep, bits, torch.device("cpu"))
    held = kv["torch"]
    parts = [held.keys, held.values, held.group_idx, held.tail_keys, held.tail_values]
    want = sum(
        t.numel() * t.element_size()
        for x in parts
        for t in ([x] if isinstance(x, torch.Tensor) else x.tensors().values())
    )
    dense = rows[0]["bytes_read"]
    assert dense == 2 * 200 * 2 * 64 * 4
    expanded = held.keys.token_blocks().numel() * 2 if bits == 2 else 0  # [B, Hkv, Ts] int16 from the key runs
    assert rows[1]["bytes_read"] == rows[2]["bytes_read"] == want + expanded
    assert rows[1]["budget"] == round(want / dense, 4)
    assert rows[1]["budget"] <= (1.02 if bits is None and keep == 8 else 0.75)  # plain K = G: + 8 index bytes
    assert rows[1]["bits"] == ("none" if bits is None else bits) and rows[1]["mass"] == mass
    assert rows[1]["gbps"] == round((want + expanded) / 2e-3 / 1e9, 1)
    if bits is not None:  # keys and value groups in `bits` bits; keys per channel at 2 bits, as the cache
        assert held.keys.bits == held.values.bits == bits
        assert ("run_block" in held.keys.tensors()) == (bits == 2)


def test_no_cuda_exits_cleanly(monkeypatch):
    script = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_decode_kernel.py"])
    assert script.main() == 0
