"""Triton decode attention over packed storage against the PyTorch reference.

Runs under Triton's interpreter on a CPU (the root conftest sets `TRITON_INTERPRET=1`) and
compiled on a GPU. `torch.empty` is NaN-filled so reads of unwritten memory fail.
"""

from __future__ import annotations

import pytest
import torch

from hf_subtok.kernels import (
    merge_attention_states,
    pack_value_groups,
    packed_attention,
    packed_attention_lse,
)
from hf_subtok.kernels.merge import merge_splits, packed_attention_lse_reference
from hf_subtok.kernels.pack_reference import unpack_value_groups
from hf_subtok.kernels.packed_attention_reference import packed_attention as reference_attention
from hf_subtok.views import PackedKV
from tests.kernel_cases import DEVICE, DTYPES, TOLERANCE, Shape, make_packed

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("nan_empty")

SHAPES = [
    Shape(stored=130, tail=9, head_dim=64, group=3, keep=3, groups=8),
    Shape(stored=63, tail=0, head_dim=128, group=8, keep=1, groups=8),  # empty tail
    Shape(stored=0, tail=5, head_dim=64, group=1, keep=8, groups=8),  # empty packed part
    Shape(stored=1, tail=1, head_dim=64, group=2, keep=4, groups=4, batch=1),
    Shape(stored=70, tail=64, head_dim=128, group=1, keep=8, groups=8, kv_heads=1),  # full window
    Shape(stored=64, tail=1, head_dim=64, group=5, keep=7, groups=8, batch=1),
    Shape(stored=129, tail=3, head_dim=64, group=4, keep=2, groups=16, kv_heads=3),  # C = 4
    Shape(stored=33, tail=8, head_dim=96, group=6, keep=5, groups=8, batch=1),  # D not a power of 2
    Shape(stored=257, tail=2, head_dim=128, group=7, keep=4, groups=4, batch=1, kv_heads=1),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_decode_matches_reference(shape, dtype):
    query, kv, _, _ = make_packed(shape, dtype)
    got = packed_attention(query, kv)
    want = reference_attention(query, kv)
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES[:4], ids=[s.id for s in SHAPES[:4]])
def test_lse_matches_reference(shape, dtype):
    query, kv, _, _ = make_packed(shape, dtype, seed=1)
    out, lse = packed_attention_lse(query, kv, scaling=0.3)
    want_out, want_lse = packed_attention_lse_reference(query, kv, scaling=0.3)
    assert out.dtype == lse.dtype == torch.float32
    assert lse.shape == query.shape[:3]
    torch.testing.assert_close(out, want_out, **TOLERANCE[dtype])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])


def _left_padding_mask(batch, total, kind, device):
    """Decode-time mask `[B, 1, 1, T]`: row b ignores its first 3*b positions."""
    attend = torch.arange(total, device=device).view(1, total) >= 3 * torch.arange(batch, device=device).view(batch, 1)
    attend = attend.view(batch, 1, 1, total)
    if kind == "bool":
        return attend
    if kind == "additive":
        return torch.zeros(attend.shape, device=device).masked_fill(~attend, torch.finfo(torch.float32).min)
    return attend[:1]  # "broadcast": one row for the whole batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["bool", "additive", "broadcast"])
def test_padding_mask(kind, dtype):
    shape = Shape(stored=70, tail=6, head_dim=64, group=2, keep=3, groups=8, batch=3)
    query, kv, _, _ = make_packed(shape, dtype, seed=2)
    mask = _left_padding_mask(3, 76, kind, DEVICE)
    got = packed_attention(query, kv, mask)
    want = reference_attention(query, kv, mask)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask_columns", [None, 90, 7], ids=["no_mask", "mask90", "mask7"])
def test_tokens_selected_per_head(mask_columns, dtype):
    """`stored_valid` `[B, Hkv, Ts]` masks packed tokens per head; the attention mask then
    covers only the tail (its last Tt columns), whatever its length."""
    shape = Shape(stored=70, tail=6, head_dim=64, group=3, keep=3, groups=8, batch=2)
    query, kv, _, _ = make_packed(shape, dtype, seed=10)
    generator = torch.Generator().manual_seed(10)
    valid = (torch.rand(2, 2, 70, generator=generator) > 0.4).to(DEVICE)
    valid[1, 0] = False  # one head with no valid packed token
    kv = PackedKV(kv.keys, kv.values, kv.group_idx, 8, kv.tail_keys, kv.tail_values, "triton", valid)
    mask = None
    if mask_columns is not None:
        mask = torch.ones(2, 1, 1, mask_columns, dtype=torch.bool, device=DEVICE)
        mask[0, ..., -2] = False  # a tail column
        mask[1, ..., 0] = False  # ignored unless it is a tail column
    got = packed_attention(query, kv, mask)
    torch.testing.assert_close(got.float(), reference_attention(query, kv, mask).float(), **TOLERANCE[dtype])
    out, lse = packed_attention_lse(query, kv, mask)
    want_out, want_lse = packed_attention_lse_reference(query, kv, mask)
    torch.testing.assert_close(out, want_out, **TOLERANCE[dtype])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])


def test_fully_masked_row_is_uniform_like_the_reference():
    shape = Shape(stored=20, tail=4, head_dim=64, group=2, keep=3, groups=8, batch=1)
    query, kv, _, _ = make_packed(shape, torch.float32, seed=3)
    mask = torch.zeros(1, 1, 1, 24, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(packed_attention(query, kv, mask), reference_attention(query, kv, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split_tokens", [48, 64, 128], ids=lambda n: f"split{n}")
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")  # 64- and 32-token blocks
def test_token_splits_merge_exactly(head_dim, split_tokens, dtype):
    """Flash-decoding splits (used on GPUs with few (batch, head) pairs) give the same result,
    whether or not a split ends on a block of tokens."""
    from hf_subtok.kernels.packed_attention_triton import packed_decode_attention_triton

    shape = Shape(stored=200, tail=30, head_dim=head_dim, group=3, keep=3, groups=8)
    query, kv, _, _ = make_packed(shape, dtype, seed=4)
    mask = _left_padding_mask(2, 230, "bool", DEVICE)
    out, lse = packed_decode_attention_triton(query, kv, mask, out_dtype=torch.float32, split_tokens=split_tokens)
    want_out, want_lse = packed_attention_lse_reference(query, kv, mask)
    torch.testing.assert_close(out, want_out, **TOLERANCE[dtype])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])


def test_merged_splits_equal_attention_over_their_union():
    """`merge_splits` over stacked sets (one of them empty) equals one softmax over every token,
    and the list form `merge_attention_states` agrees with it."""
    generator = torch.Generator().manual_seed(12)
    scores = torch.randn(2, 3, 40, generator=generator)  # [B, Hq, T]
    values = torch.randn(2, 3, 40, 16, generator=generator)  # [B, Hq, T, D]
    bounds = [(0, 7), (7, 7), (7, 31), (31, 40)]  # the second set is empty
    outs, lses = [], []
    for lo, hi in bounds:
        part = scores[..., lo:hi]
        outs.append((part.softmax(-1).unsqueeze(-2) @ values[:, :, lo:hi]).squeeze(-2) if hi > lo else torch.full((2, 3, 16), 7.0))
        lses.append(part.logsumexp(-1) if hi > lo else torch.full((2, 3), float("-inf")))
    out, lse = merge_splits(torch.stack(outs, dim=-2), torch.stack(lses, dim=-1))
    torch.testing.assert_close(out.squeeze(-2), scores.softmax(-1).unsqueeze(-2).matmul(values).squeeze(-2))
    torch.testing.assert_close(lse.squeeze(-1), scores.logsumexp(-1))
    listed_out, listed_lse = merge_attention_states([o.half() for o in outs], lses)  # mixed dtypes merge in float32
    torch.testing.assert_close(listed_out, out.squeeze(-2), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(listed_lse, lse.squeeze(-1))
    empty_out, empty_lse = merge_splits(torch.zeros(1, 2, 4), torch.full((1, 2), float("-inf")))
    assert torch.equal(empty_out, torch.zeros(1, 1, 4)) and empty_lse.item() == float("-inf")


def test_grids_past_cuda_limits_are_refused_before_launch():
    """A CUDA grid's second axis holds at most 65535 programs: more token splits, or more
    (batch, head) pairs to pack, raise a ValueError instead of failing in the launch."""
    from hf_subtok.kernels.packed_attention_triton import packed_decode_attention_triton

    shape = Shape(stored=0, tail=65540, head_dim=16, group=1, keep=1, groups=1, batch=1, kv_heads=1)
    query, kv, _, _ = make_packed(shape, torch.float32, seed=13)
    with pytest.raises(ValueError, match="split_tokens=1 gives 65540 splits"):
        packed_decode_attention_triton(query, kv, split_tokens=1)
    values = torch.zeros(1, 65536, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="batch \\* heads must be at most 65535"):
        pack_value_groups(values, torch.zeros(1, 65536, 1, 2, device=DEVICE), 1, backend="triton")


def test_fp16_tensor_core_path():
    """The GPU path feeds fp16 tiles to `tl.dot`; the interpreter computes fp16 dots right."""
    from hf_subtok.kernels.packed_attention_triton import packed_decode_attention_triton

    shape = SHAPES[0]
    query, kv, _, _ = make_packed(shape, torch.float16, seed=5)
    out, _ = packed_decode_attention_triton(query, kv, low_precision_dot=True)
    torch.testing.assert_close(out.float(), reference_attention(query, kv).float(), **TOLERANCE[torch.float16])


def test_strided_inputs():
    """Any batch/head/token strides (e.g. views into a larger buffer) are read correctly."""
    shape = Shape(stored=40, tail=7, head_dim=64, group=2, keep=3, groups=8)
    query, kv, _, _ = make_packed(shape, torch.float32, seed=6)
    big_keys = torch.randn(2, 2, 90, 64, device=DEVICE)
    big_keys[:, :, 10:50] = kv.keys
    big_query = torch.randn(2, 4, 3, 64, device=DEVICE)
    big_query[:, :, 1:2] = query
    strided = PackedKV(
        big_keys[:, :, 10:50], kv.values, kv.group_idx, 8,
        kv.tail_keys.transpose(0, 1).contiguous().transpose(0, 1), kv.tail_values, "triton",
    )  # fmt: skip
    assert not strided.keys.is_contiguous() and not strided.tail_keys.is_contiguous()
    got = packed_attention(big_query[:, :, 1:2], strided)
    torch.testing.assert_close(got, reference_attention(query, kv), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_blocks_with_different_keep_merge_to_full_attention(dtype):
    """Several packed blocks (each its own K) plus the tail, merged by log-sum-exp, equal
    attention over all their tokens (dropped groups zero)."""
    generator = torch.Generator().manual_seed(7)
    batch, heads, group, dim, groups = 2, 2, 4, 64, 8

    def randn(*size):
        return torch.randn(*size, generator=generator).to(dtype=dtype, device=DEVICE)

    query = randn(batch, heads * group, 1, dim)
    empty = randn(batch, heads, 0, dim)
    blocks, dense_keys, dense_values = [], [], []
    for tokens, keep in [(50, 2), (31, 6)]:
        keys, values = randn(batch, heads, tokens, dim), randn(batch, heads, tokens, dim)
        scores = torch.rand(batch, heads, tokens, groups, generator=generator).to(DEVICE)
        packed, idx = pack_value_groups(values, scores, keep, backend="torch")
        blocks.append(PackedKV(keys, packed, idx, groups, empty, empty, "triton"))
        dense_keys.append(keys)
        dense_values.append(unpack_value_groups(packed, idx, groups))
    tail_keys, tail_values = randn(batch, heads, 5, dim), randn(batch, heads, 5, dim)
    no_packed = PackedKV(
        empty, randn(batch, heads, 1, 0, dim // groups),
        torch.zeros(batch, heads, 1, 0, dtype=torch.uint8, device=DEVICE), groups,
        tail_keys, tail_values, "triton",
    )  # fmt: skip
    parts = [packed_attention_lse(query, kv) for kv in [*blocks, no_packed]]
    out, lse = merge_attention_states([p[0] for p in parts], [p[1] for p in parts])

    keys = torch.cat([*dense_keys, tail_keys], dim=2).float().repeat_interleave(group, dim=1)
    values = torch.cat([*dense_values, tail_values], dim=2).float().repeat_interleave(group, dim=1)
    scores = query.float() @ keys.transpose(-1, -2) * dim**-0.5  # [B, Hq, 1, T]
    torch.testing.assert_close(out, scores.softmax(-1) @ values, **TOLERANCE[dtype])
    torch.testing.assert_close(lse, scores.logsumexp(-1), **TOLERANCE[dtype])


def test_prefill_chunk_falls_back_to_reference():
    """Q > 1 is not a decode step: the dispatcher uses the reference even with backend triton."""
    shape = Shape(stored=20, tail=6, head_dim=64, group=2, keep=3, groups=8)
    _, kv, _, _ = make_packed(shape, torch.float32, seed=8)
    query = torch.randn(2, 4, 6, 64, device=DEVICE)
    torch.testing.assert_close(packed_attention(query, kv), reference_attention(query, kv))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_long_context_on_gpu(dtype, monkeypatch):
    """Long sequences take the split (flash-decoding) path on a GPU; auto picks Triton."""
    from hf_subtok.kernels import packed_attention_triton

    launches = []
    launcher = packed_attention_triton.packed_decode_attention_triton

    def counting_launcher(*args, **kwargs):
        launches.append(1)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(packed_attention_triton, "packed_decode_attention_triton", counting_launcher)
    shape = Shape(stored=8192 + 17, tail=64, head_dim=128, group=4, keep=3, groups=8, batch=1, kv_heads=2)
    query, kv, _, _ = make_packed(shape, dtype, seed=9)
    auto = PackedKV(kv.keys, kv.values, kv.group_idx, kv.num_groups, kv.tail_keys, kv.tail_values, "auto")
    got = packed_attention(query, auto)
    assert launches == [1], "backend auto must run the Triton kernel on CUDA tensors"
    torch.testing.assert_close(got.float(), reference_attention(query, kv).float(), **TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pack_past_65535_token_blocks_on_gpu():
    """64 groups of head_dim 128 pack one token per program: 70k tokens need more programs than
    a CUDA grid's second axis holds, so the token blocks run on the first."""
    generator = torch.Generator().manual_seed(14)
    values = torch.randn(1, 1, 70_000, 128, generator=generator).to(dtype=torch.bfloat16, device=DEVICE)
    scores = torch.rand(1, 1, 70_000, 64, generator=generator).to(DEVICE)
    packed, idx = pack_value_groups(values, scores, 8, backend="triton")
    want_packed, want_idx = pack_value_groups(values, scores, 8, backend="torch")
    assert torch.equal(idx, want_idx) and torch.equal(packed, want_packed)
