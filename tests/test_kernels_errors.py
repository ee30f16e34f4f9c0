"""Bad inputs to the public kernel functions raise, naming the argument and the value, before
any kernel is launched; the dispatcher picks the path the backend asks for."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_subtok import kernels
from hf_subtok.kernels import pack_value_groups, packed_attention
from hf_subtok.quant import QuantizedTensor, quantize, quantize_channels
from tests.kernel_cases import DEVICE, Shape, make_packed

SHAPE = Shape(stored=10, tail=3, head_dim=64, group=2, keep=3, groups=8)


@pytest.fixture
def no_launch(monkeypatch):
    """Make every Triton launcher fail loudly if called."""
    pytest.importorskip("triton")
    from hf_subtok.kernels import pack_triton, packed_attention_triton

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(packed_attention_triton, "packed_decode_attention_triton", refuse)
    monkeypatch.setattr(pack_triton, "pack_value_groups_triton", refuse)


def _replace(kv, **changes):
    return dataclasses.replace(kv, **changes)


def _bad_attention_inputs():
    query, kv, _, _ = make_packed(SHAPE, torch.float32)
    mask = torch.ones(2, 1, 1, 13, dtype=torch.bool, device=DEVICE)
    return {
        "group_idx-int64": ((query, _replace(kv, group_idx=kv.group_idx.long()), mask), "kv.group_idx must be torch.uint8, got torch.int64"),
        "group_idx-shape": ((query, _replace(kv, group_idx=kv.group_idx[..., :-1]), mask), r"kv.group_idx must be \[B=2, Hkv=2, K=3, Ts=10\], got \(2, 2, 3, 9\)"),
        "values-width": ((query, _replace(kv, values=kv.values[..., :4]), mask), r"kv.values must be .*C=8\], got \(2, 2, 3, 10, 4\)"),
        "values-tokens": ((query, _replace(kv, values=kv.values[..., :5, :]), mask), r"Ts=10, C=8\], got \(2, 2, 3, 5, 8\)"),
        "keep-above-groups": ((query, _replace(kv, num_groups=2, values=torch.zeros(2, 2, 3, 10, 32, device=DEVICE)), mask), r"K in 1..2"),
        "num_groups": ((query, _replace(kv, num_groups=7), mask), "kv.num_groups must be an int in 1..256 dividing D=64, got 7"),
        "query-heads": ((query[:, :3], kv, mask), r"query heads \(3\) must be a multiple of kv.tail_keys heads \(2\)"),
        "query-dim": ((query[..., :32], kv, mask), r"kv.keys must be \[B=2, Hkv, T, D=32\], got \(2, 2, 10, 64\)"),
        "tail-dtype": ((query, _replace(kv, tail_values=kv.tail_values.half()), mask), "kv.tail_values dtype must match query dtype torch.float32, got torch.float16"),
        "mask-length": ((query, kv, mask[..., :12]), r"attention_mask must be \[B or 1, 1, Q=1, T=13\], got \(2, 1, 1, 12\)"),
        "mask-dtype": ((query, kv, mask.long()), "attention_mask must be bool or float, got torch.int64"),
        "backend": ((query, _replace(kv, backend="cuda"), mask), "backend must be one of .*got 'cuda'"),
    }  # fmt: skip


BAD_ATTENTION = _bad_attention_inputs()


@pytest.mark.parametrize("case", BAD_ATTENTION, ids=list(BAD_ATTENTION))
def test_packed_attention_rejects(case, no_launch):
    args, message = BAD_ATTENTION[case]
    with pytest.raises(ValueError, match=message):
        packed_attention(*args)


def _with_bits(quantized: QuantizedTensor, bits: int) -> QuantizedTensor:
    """A `QuantizedTensor` whose bits were changed behind its back (it is frozen)."""
    broken = QuantizedTensor(quantized.payload, quantized.scale, quantized.zero, quantized.bits, quantized.group_size)
    object.__setattr__(broken, "bits", bits)
    return broken


def _bad_quantized_inputs():
    query, kv, _, _ = make_packed(SHAPE, torch.float32)
    keys, values = quantize(kv.keys, 4, 32), quantize(kv.values, 4, 8)
    return {
        "keys-bits-3": ((query, _replace(kv, keys=_with_bits(keys, 3))), r"kv.keys: bits must be one of \(2, 4, 8\), got 3"),
        "values-bits-8-on-4bit-payload": ((query, _replace(kv, values=_with_bits(values, 8))), r"kv.values: scale \(2, 2, 3, 10, 1\) must be \[..., N/group_size\] = \(2, 2, 3, 10, 0\)"),
        "keys-head-dim": ((query, _replace(kv, keys=quantize(kv.keys[..., :32], 4, 32))), r"kv.keys must be \[B=2, Hkv, T, D=64\], got \(2, 2, 10, 32\)"),
        "keys-tokens": ((query, _replace(kv, keys=quantize(kv.keys[:, :, :9], 4, 32))), r"kv.values must be .*Ts=9, C=8\], got \(2, 2, 3, 10, 8\)"),
        "values-width": ((query, _replace(kv, values=quantize(kv.values[..., :4], 4, 4))), r"kv.values must be .*C=8\], got \(2, 2, 3, 10, 4\)"),
        "values-device": ((query, _replace(kv, values=values.apply(lambda x: x.to("meta")))), r"kv.values is on meta, query on"),
    }  # fmt: skip


BAD_QUANTIZED = _bad_quantized_inputs()


@pytest.mark.parametrize("case", BAD_QUANTIZED, ids=list(BAD_QUANTIZED))
def test_packed_attention_rejects_quantized(case, no_launch):
    args, message = BAD_QUANTIZED[case]
    with pytest.raises(ValueError, match=message):
        packed_attention(*args)


def test_packed_attention_rejects_other_storage_types(no_launch):
    query, kv, _, _ = make_packed(SHAPE, torch.float32)
    with pytest.raises(TypeError, match="kv.keys must be a torch.Tensor, QuantizedTensor, ChannelQuantizedTensor or PreRopeKeys, got list"):
        packed_attention(query, _replace(kv, keys=[kv.keys]))
    with pytest.raises(TypeError, match="kv.group_idx must be a torch.Tensor, got QuantizedTensor"):
        packed_attention(query, _replace(kv, group_idx=quantize(kv.keys, 8, 64)))
    with pytest.raises(TypeError, match="kv.values must be a torch.Tensor, QuantizedTensor or CodedTensor, got ChannelQuantizedTensor"):
        channel = quantize_channels(kv.values.flatten(2, 3), 8, 32)  # [B, Hkv, K*Ts, C]
        packed_attention(query, _replace(kv, values=channel))


def test_quantized_strides_rejected_before_launch(no_launch):
    query, kv, _, _ = make_packed(SHAPE, torch.float32)
    keys = quantize(kv.keys, 4, 16)
    transposed = keys.zero.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    with pytest.raises(ValueError, match=r"kv.keys.scale and kv.keys.zero must have equal strides .*got \(80, 40, 4, 1\) and \(40, 80, 4, 1\)"):
        packed_attention(query, _replace(kv, keys=QuantizedTensor(keys.payload, keys.scale, transposed, 4, 16)))
    strided = keys.payload.transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match=r"kv.keys.payload must be contiguous in its last dim"):
        packed_attention(query, _replace(kv, keys=QuantizedTensor(strided, keys.scale, keys.zero, 4, 16)))


def test_non_contiguous_last_dim_rejected_before_launch(no_launch):
    query, kv, _, _ = make_packed(SHAPE, torch.float32)
    strided_keys = kv.keys.transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match=r"kv.keys must be contiguous in its last dim .*got strides \(1280, 640, 1, 10\)"):
        packed_attention(query, _replace(kv, keys=strided_keys))


BAD_PACK = {
    "keep-zero": ((4, 8, 0), "keep_groups must be an int in 1..8, got 0"),
    "keep-above": ((4, 8, 9), "keep_groups must be an int in 1..8, got 9"),
    "groups-not-dividing": ((4, 7, 2), "must be in 1..256 and divide D=64, got 7"),
    "scores-tokens": ((3, 8, 2), r"scores must be \[B, Hkv, T, G\] matching values \(1, 2, 4, 64\), got \(1, 2, 3, 8\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_PACK, ids=list(BAD_PACK))
def test_pack_rejects(case, no_launch):
    (score_tokens, groups, keep), message = BAD_PACK[case]
    values = torch.randn(1, 2, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        pack_value_groups(values, torch.rand(1, 2, score_tokens, groups, device=DEVICE), keep, backend="triton")


def test_pack_rejects_integer_scores(no_launch):
    values = torch.randn(1, 2, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="scores must be floating point, got torch.int64"):
        pack_value_groups(values, torch.ones(1, 2, 4, 8, dtype=torch.long, device=DEVICE), 2, backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    query, kv, _, _ = make_packed(SHAPE, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        packed_attention(query, kv)


def test_auto_on_cpu_uses_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels._attention_reference, "packed_attention", lambda *a, **k: calls.append(a) or "ref")
    query, kv, _, _ = make_packed(SHAPE, torch.float32, device="cpu")
    assert packed_attention(query, _replace(kv, backend="auto")) == "ref"
    assert packed_attention(query, _replace(kv, backend="torch")) == "ref"
    assert len(calls) == 2


def test_import_does_not_load_triton_kernels():
    """`import hf_subtok` and the CPU path never import the Triton modules."""
    code = (
        "import sys, torch, hf_subtok\n"
        "from hf_subtok.kernels import packed_attention, pack_value_groups\n"
        "from tests.kernel_cases import Shape, make_packed\n"
        "q, kv, _, _ = make_packed(Shape(5, 2, 64, 2, 3, 8), torch.float32, device='cpu')\n"
        "import dataclasses\n"
        "packed_attention(q, dataclasses.replace(kv, backend='auto'))\n"
        "pack_value_groups(torch.randn(1, 1, 3, 64), torch.rand(1, 1, 3, 8), 2)\n"
        "loaded = [m for m in sys.modules if m.startswith('hf_subtok.kernels.') and 'triton' in m]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
