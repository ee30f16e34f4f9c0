"""Attention over whole keys and packed value groups (PyTorch reference and CPU path).

Keys and values may be plain tensors or `QuantizedTensor`s (keys also `ChannelQuantizedTensor`s,
scaled a block of tokens at a time by `channel_key_scores`, or `PreRopeKeys`, rebuilt a block at a
time by `quant.pre_rope_keys.pre_rope_key_scores`). Quantized storage is read a block of packed tokens
at a time (`block_tokens`) and never dequantized: each block's codes are unpacked to the compute dtype (no scale applied) and the per-token scales and zeros are folded into the
small operand of each matmul (`quantized_key_scores`, `packed_value_matmul`), so the only `[t, D]`
work per block is one cast and one matmul. The scores of every token (D times smaller than the
keys) are kept whole, as for plain storage: the softmax and the `[B, Hkv, T]` attention mass
need the global normaliser of each row. The result equals attention over the dequantized
tensors (`dequantize(query.dtype)`), up to rounding and summation order.

Under autograd (grad mode on and an input that requires grad, `records_grad`) every function
here builds fresh tensors where it otherwise writes into reused buffers and `out=` arguments
(autograd refuses `out=` and saves operands a reused buffer would overwrite): same result.
"""

from __future__ import annotations

import functools

import torch

from hf_subtok.kernels._dispatch import records_grad
from hf_subtok.kernels.masks import blocked_columns
from hf_subtok.kernels.unpack import unpack_codes
from hf_subtok.quant import ChannelQuantizedTensor, CodedTensor, QuantizedTensor
from hf_subtok.quant.channel import rows_by_block
from hf_subtok.quant.logscale import scale_values
from hf_subtok.quant.pre_rope_keys import PreRopeKeys, pre_rope_key_scores
from hf_subtok.views import PackedKV

StoredKeys = torch.Tensor | QuantizedTensor | ChannelQuantizedTensor | PreRopeKeys
BLOCK_TOKENS = 1 << 16  # most packed tokens read at once (read at call time: tests lower it)
BLOCK_BYTES = 8 << 20  # most float32 bytes a block unpacks (its codes, or its weights where larger)
MIN_BLOCK_TOKENS = 1024  # a block holds at least this many tokens (unless BLOCK_TOKENS is lower)


def block_tokens(per_token: int) -> int:
    """Packed tokens read at once when a block costs `per_token` float32 elements a token
    (its unpacked codes, or its weights where they are larger): as many as fit `BLOCK_BYTES`,
    at least `MIN_BLOCK_TOKENS`, at most `BLOCK_TOKENS`.

    On a CPU a decode step's attention is bound by its number of ops as much as by bytes: on
    a shared 2-core machine every op that opens a parallel region waits for both threads. A
    layer of SmolLM2-135M's shape (3 KV heads x 64 channels) reads 10.9k tokens per 8 MiB
    block, so at 2k-8k tokens every quantized read is one block and the op count does not grow
    with T. Measured (`benchmarks/cpu_decode_attention.py --compare-blocks`, busy machine): at
    4k tokens, 4-bit, G = K = 2, 125 ops against 270 for 1024-token blocks, 4.6 against 5.3
    ms of thread time at 1 thread, 384 against 956 ms wall at 2 contended threads; at 16k,
    174 ops against 846, time equal. Tried and slower: `torch.compile` of the whole decode
    step (inductor materializes the dequantized block, then an extern matmul: 7.0 against
    4.5 ms with static shapes, 200 ms with `dynamic=True`, and 7-135 s to compile), and codes
    unpacked plane by plane (3x faster to unpack, but the planes' extra matmul and sum ops
    cost it back: equal or slower over the whole call).
    """
    fit = BLOCK_BYTES // (4 * max(1, per_token))
    return max(1, min(BLOCK_TOKENS, max(MIN_BLOCK_TOKENS, fit)))


def _code_block(payload: torch.Tensor, bits: int, per_token: int = 0) -> int:
    """`block_tokens` for a `[..., T, n]` payload whose block also costs `per_token` float32
    elements of weights a token."""
    return block_tokens(max(payload[..., :1, :].numel() * 8 // bits, per_token))


def _block_buffer(payload: torch.Tensor, bits: int, dtype: torch.dtype, block: int) -> torch.Tensor:
    """A flat buffer for the codes of one block of `block` tokens of a `[..., T, n]` payload."""
    return torch.empty(payload[..., :block, :].numel() * 8 // bits, dtype=dtype, device=payload.device)


def packed_value_matmul(
    probs: torch.Tensor,
    values: torch.Tensor | QuantizedTensor,
    group_idx: torch.Tensor,
    num_groups: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`probs @ V` where V holds only the kept groups of each token.

    Args:
        probs: `[B, Hkv, M, T]` attention weights (M = query heads per KV head x queries).
        values: `[B, Hkv, K, T, C]` kept value groups, slot-major, plain, quantized or coded.
        group_idx: `[B, Hkv, K, T]` uint8 group of each slot, ascending over slots.
        num_groups: G.
        dtype: the dtype quantized values are returned in (default float32); they are
            computed in float32. Plain values compute in their own dtype.

    Returns:
        `[B, Hkv, M, D]` with `D = G * C`, in the values' dtype (quantized: `dtype`); dropped
        groups contribute zero.
    """
    if isinstance(values, CodedTensor):
        return _coded_value_matmul(probs, values, group_idx, num_groups, torch.float32 if dtype is None else dtype)
    if not isinstance(values, QuantizedTensor):
        return _dense_value_matmul(probs, values, group_idx, num_groups)
    return _quantized_value_matmul(probs, values, group_idx, num_groups, torch.float32 if dtype is None else dtype)


def _quantized_value_matmul(
    probs: torch.Tensor, values: QuantizedTensor, group_idx: torch.Tensor, num_groups: int, dtype: torch.dtype
) -> torch.Tensor:
    """`packed_value_matmul` on quantized values, the scales folded into the probabilities.

    With `v = code * scale + zero` per token and quantization group, `sum_t p_t v_t =
    (p * scale) @ codes + p @ zero`: per block, the codes are unpacked and cast (no scale
    multiply over `[t, C]`), the `[M, t]` weights are scaled per slot, and one batched matmul
    (over every slot and head) does the rest. As in `_dense_value_matmul`, slot
    k can only hold groups k..G-K+k, so (for K < G) its weights are spread over those
    `span = G-K+1` groups. Quantization groups narrower than C (`ngv = C / group_size > 1`)
    get a weight row each.
    """
    batch, heads, keep, tokens, width = values.shape
    rows, size = probs.shape[2], values.group_size
    quant_groups, span = width // size, num_groups - keep + 1
    device = probs.device
    in_place = not records_grad(probs, values)  # reuse buffers and write with out=
    step = _code_block(values.payload, values.bits, batch * heads * keep * rows * quant_groups * span)
    acc = torch.zeros(batch, heads, keep, rows * quant_groups * span, width, device=device)  # [B, Hkv, K, M*ngv*span, C]
    flat_acc = acc.view(batch * heads * keep, rows * quant_groups * span, width)  # blocks add in place
    if span == 1:  # the zero term per (slot, quantization group) is one [K*ngv, t] x [t, M] matmul per head
        zero_acc = torch.zeros(batch * heads, keep * quant_groups, rows, device=device)  # [B*Hkv, K*ngv, M]
    else:  # per block: a one-hot of each slot's group, the scaled and the zero weights spread over it
        zero_acc = torch.zeros(batch * heads * keep, rows * quant_groups, span, device=device)  # [B*Hkv*K, M*ngv, span]
        slot_groups = _slot_groups(keep, span, group_idx)  # [K, span, 1]
        all_groups = group_idx.unsqueeze(3)  # [B, Hkv, K, 1, T]
        block = max(1, min(tokens, step))
        if in_place:
            hit_buffer = torch.empty(batch * heads * keep * span * block, device=device)
            weight_buffer = torch.empty(batch * heads * keep * rows * quant_groups * span * block, device=device)
    buffer = _block_buffer(values.payload, values.bits, torch.float32, step) if in_place else None
    for start in range(0, tokens, step):
        end = min(start + step, tokens)
        t = end - start
        p = probs[..., start:end].float()  # [B, Hkv, M, t]
        scales = values.scale[..., start:end, :].float().transpose(-1, -2).unsqueeze(3)  # [B, Hkv, K, 1, ngv, t]
        scaled = p.view(batch, heads, 1, rows, 1, t) * scales  # [B, Hkv, K, M, ngv, t]
        zeros = values.zero[..., start:end, :].transpose(-1, -2)  # [B, Hkv, K, ngv, t]
        if span == 1:  # every group kept: slot k holds group k
            weights = scaled
            zeros = zeros.to(torch.float32, memory_format=torch.contiguous_format)
            zero_acc.baddbmm_(zeros.view(batch * heads, keep * quant_groups, t), p.transpose(-1, -2).reshape(batch * heads, t, rows))
        else:
            zeroed = p.view(batch, heads, 1, rows, 1, t) * zeros.float().unsqueeze(3)  # [B, Hkv, K, M, ngv, t]
            if in_place:
                hit = hit_buffer[: batch * heads * keep * span * t].view(batch, heads, keep, span, t)
                torch.eq(all_groups[..., start:end], slot_groups, out=hit)
            else:
                hit = (all_groups[..., start:end] == slot_groups).float()  # [B, Hkv, K, span, t]
            zero_acc.baddbmm_(zeroed.reshape(batch * heads * keep, rows * quant_groups, t), hit.view(-1, span, t).transpose(1, 2))
            hit = hit.view(batch, heads, keep, 1, 1, span, t)
            if in_place:
                weights = weight_buffer[: batch * heads * keep * rows * quant_groups * span * t]
                weights = weights.view(batch, heads, keep, rows, quant_groups, span, t)
                torch.mul(scaled.unsqueeze(5), hit, out=weights)
            else:
                weights = scaled.unsqueeze(5) * hit  # [B, Hkv, K, M, ngv, span, t]
        codes = unpack_codes(values.payload[..., start:end, :], values.bits, torch.float32, buffer)  # [B, Hkv, K, t, C]
        flat_acc.baddbmm_(weights.reshape(batch * heads * keep, -1, t), codes.view(batch * heads * keep, t, width))
    if span == 1:
        zero_term = zero_acc.view(batch, heads, keep, quant_groups, rows).transpose(-1, -2)  # [B, Hkv, K, M, ngv]
    else:
        zero_term = zero_acc.view(batch, heads, keep, rows, quant_groups, span)
    out = acc.view(batch, heads, keep, rows, quant_groups, span, width)
    out = out + zero_term.reshape(batch, heads, keep, rows, quant_groups, span, 1)
    if quant_groups > 1:  # keep, for each channel, the row of its quantization group
        own = _group_members(width, size, device)  # [ngv, C]
        out = (out * own.view(quant_groups, 1, width)).sum(4)
    else:
        out = out.squeeze(4)  # [B, Hkv, K, M, span, C]
    if span == 1:
        return out.squeeze(4).transpose(2, 3).reshape(batch, heads, rows, num_groups * width).to(dtype)
    return _spread_slots(out, num_groups).to(dtype)


def _coded_value_matmul(
    probs: torch.Tensor, values: CodedTensor, group_idx: torch.Tensor, num_groups: int, dtype: torch.dtype
) -> torch.Tensor:
    """`packed_value_matmul` on values stored as codeword indices: a block of tokens at a
    time (`block_tokens`), the block's codewords are looked up and scaled into float32 `[B, Hkv, K, t, C]`
    values (a block, never all of them) and met by the plain path, summed over the blocks."""
    batch, heads, _, tokens, _ = values.shape
    out = probs.new_zeros(batch, heads, probs.shape[2], num_groups * values.shape[-1], dtype=torch.float32)
    step = block_tokens(batch * heads * values.shape[2] * max(values.shape[-1], probs.shape[2] * num_groups))
    for start in range(0, tokens, step):
        end = min(start + step, tokens)
        block = values.slice_tokens(start, end).dequantize(torch.float32)  # [B, Hkv, K, t, C]
        out += _dense_value_matmul(probs[..., start:end].float(), block, group_idx[..., start:end], num_groups)
    return out.to(dtype)


def stored_value_matmul(probs: torch.Tensor, kv: PackedKV, dtype: torch.dtype) -> torch.Tensor:
    """`[B, Hkv, M, Ts]` weights of the packed tokens times their stored value groups: the K
    groups of every token, plus the other groups of the first W (wide) tokens if any
    (adaptive span). `[B, Hkv, M, D]`, as `packed_value_matmul` returns it."""
    batch, heads, rows, tokens = probs.shape
    if kv.shares_rows:  # every head's rows against the one shared row of tokens
        probs = probs.reshape(batch, 1, heads * rows, tokens)  # [B, 1, Hkv*M, Ts]
    out = packed_value_matmul(probs, kv.values, kv.group_idx, kv.num_groups, dtype)
    wide = 0 if kv.wide_values is None else kv.wide_values.shape[-2]
    if wide:
        out = out + packed_value_matmul(probs[..., :wide], kv.wide_values, kv.wide_group_idx, kv.num_groups, dtype)
    return out.view(batch, heads, rows, out.shape[-1])  # [B, Hkv, M, D]


def stored_key_scores(q: torch.Tensor, kv: PackedKV) -> torch.Tensor:
    """`[B, Hkv, M, D]` queries against the packed keys: `[B, Hkv, M, Ts]` (with shared rows,
    every head's queries against the one row of keys, each key read once)."""
    if not kv.shares_rows:
        return key_scores(q, kv.keys)
    batch, heads, rows, dim = q.shape
    scores = key_scores(q.reshape(batch, 1, heads * rows, dim), kv.keys)  # [B, 1, Hkv*M, Ts]
    return scores.view(batch, heads, rows, scores.shape[-1])


def key_scores(query: torch.Tensor, keys: StoredKeys) -> torch.Tensor:
    """`query @ keys^T`: `[B, Hkv, M, D]` x `[B, Hkv, T, D]` -> `[B, Hkv, M, T]`, in the query's
    dtype for plain keys, float32 for quantized ones (`quantized_key_scores`,
    `channel_key_scores`)."""
    if isinstance(keys, QuantizedTensor):
        return quantized_key_scores(query, keys)
    if isinstance(keys, ChannelQuantizedTensor):
        return channel_key_scores(query, keys)
    if isinstance(keys, PreRopeKeys):  # a block's codes, coefficients, cos, sin and keys in float32
        return pre_rope_key_scores(query, keys, block_tokens(5 * keys.payload[..., :1, :].numel() * 8 // keys.bits))
    return query @ keys.transpose(-1, -2)


def channel_key_scores(query: torch.Tensor, keys: ChannelQuantizedTensor) -> torch.Tensor:
    """`query @ keys^T` in float32 for keys quantized per channel (`quant.channel`), read
    a block of tokens at a time (`block_tokens`).

    With `k[t, d] = code[t, d] * scale[b(t), d] + zero[b(t), d]`, `q . k_t = q . (code_t *
    scale_b) + q . zero_b`: each block of tokens' codes are scaled in place by their table
    rows (`rows_by_block`) and met by one matmul; the zero term is one `[M, NB]` matmul over
    the tables, looked up per token (M numbers, not D).

    Args:
        query: `[B, Hkv, M, D]`.
        keys: `[B, Hkv, T, D]` per-channel quantized.

    Returns:
        `[B, Hkv, M, T]` float32.
    """
    batch, heads, rows, dim = query.shape
    tokens = keys.shape[-2]
    q = query.float()
    scales = scale_values(keys.scale)  # [B, Hkv, NB, D]
    block = keys.token_blocks()  # [B, Hkv, T]
    zero_dots = (keys.zero.float() @ q.transpose(-1, -2)).contiguous()  # [B, Hkv, NB, M]
    scores = rows_by_block(zero_dots, block).transpose(-1, -2).contiguous()  # [B, Hkv, M, T]: the zero terms
    in_place = not records_grad(query, keys)
    step = _code_block(keys.payload, keys.bits)
    buffer = _block_buffer(keys.payload, keys.bits, torch.float32, step) if in_place else None
    for start in range(0, tokens, step):
        end = min(start + step, tokens)
        codes = unpack_codes(keys.payload[..., start:end, :], keys.bits, torch.float32, buffer)  # [B, Hkv, t, D]
        block_scales = rows_by_block(scales, block[..., start:end])  # [B, Hkv, t, D]
        codes = codes.mul_(block_scales) if in_place else codes * block_scales
        scores[..., start:end] += q @ codes.transpose(-1, -2)
    return scores


def quantized_key_scores(query: torch.Tensor, keys: QuantizedTensor) -> torch.Tensor:
    """`query @ keys^T` in float32, read from the codes a block of tokens at a time.

    Per quantization group g of the channels, `q . k = scale_g * (q_g . codes_g) + zero_g *
    sum(q_g)`: one matmul of the codes (cast, never scaled) against a block-diagonal
    `[M * ngk, D]` copy of the query gives every `q_g . codes_g`, and the scales and zeros
    act on those `[M * ngk, t]` partial dots only.

    Args:
        query: `[B, Hkv, M, D]`.
        keys: `[B, Hkv, T, D]` quantized along D in groups of `keys.group_size`.

    Returns:
        `[B, Hkv, M, T]` float32.
    """
    batch, heads, rows, dim = query.shape
    tokens, size, device = keys.shape[-2], keys.group_size, query.device
    key_groups = dim // size
    q = query.float()
    own = _group_members(dim, size, device)  # [ngk, D]
    weights = (q.unsqueeze(2) * own.unsqueeze(1)).view(batch, heads, key_groups * rows, dim)  # [B, Hkv, ngk*M, D]
    dots = torch.empty(batch, heads, key_groups, rows, tokens, device=device)  # [B, Hkv, ngk, M, T]
    flat_dots = dots.view(batch, heads, key_groups * rows, tokens)
    step = _code_block(keys.payload, keys.bits)
    buffer = _block_buffer(keys.payload, keys.bits, torch.float32, step) if not records_grad(query, keys) else None
    for start in range(0, tokens, step):
        end = min(start + step, tokens)
        codes = unpack_codes(keys.payload[..., start:end, :], keys.bits, torch.float32, buffer)  # [B, Hkv, t, D]
        flat_dots[..., start:end] = weights @ codes.transpose(-1, -2)
    q_sums = q.view(batch, heads, rows, key_groups, size).sum(-1)  # [B, Hkv, M, ngk]
    scores = q_sums @ keys.zero.transpose(-1, -2).float()  # [B, Hkv, M, T]
    scale = keys.scale.transpose(-1, -2).float()  # [B, Hkv, ngk, T]
    for group in range(key_groups):  # ngk = D / group_size, 2 by default: one pass over [M, T] each
        scores.addcmul_(dots[:, :, group], scale[:, :, group : group + 1])
    return scores


def _dense_value_matmul(
    probs: torch.Tensor, values: torch.Tensor, group_idx: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """`packed_value_matmul` on plain values, never copying them.

    K = G: slot k holds group k, so one matmul per slot (K <= G of them) gives every group; a
    single matmul broadcasting the probabilities over the slots would copy them K times, which
    for a long multi-token query costs more than the values.
    K < G: slot k can only hold groups k..G-K+k since indices ascend, so its weights are spread
    over those `span = G-K+1` groups: per block of tokens (`block_tokens`), the one-hot of each
    slot's group is written straight into a reused float buffer (`torch.eq(out=)`), scaled by
    the probabilities into a second one, and one batched matmul over every slot and head does
    the rest, summed over the blocks in float32 (bfloat16 and float16 values lose no precision
    to the number of blocks; float32 blocks are added in place by `baddbmm_`). Measured on a
    CPU (1 thread, 2.6k tokens x 3 heads, K = 4 of 8, 3 query heads per KV head): 0.34 ms,
    against 0.56 ms for a boolean one-hot cast and multiplied per slot and 1.05 ms for
    `torch.where(hit, p, 0)`.
    """
    batch, heads, keep, tokens, width = values.shape
    rows = probs.shape[2]
    probs = probs.to(values.dtype)
    if keep == num_groups:  # every group kept: slot k is group k, one [M, T] x [T, C] matmul each
        return torch.cat([probs @ values[:, :, slot] for slot in range(keep)], dim=-1)  # [B, Hkv, M, D]
    span = num_groups - keep + 1
    slot_groups = _slot_groups(keep, span, group_idx).unsqueeze(1)  # [K, 1, span, 1]
    block = max(1, min(tokens, block_tokens(batch * heads * keep * rows * span)))  # no tokens: no block, sum zero
    in_place = not records_grad(probs, values)  # reuse buffers and write with out=
    if in_place:
        hit_buffer = values.new_empty(batch * heads * keep * span * block)
        weight_buffer = values.new_empty(batch * heads * keep * rows * span * block)
    acc = values.new_zeros(batch * heads * keep, rows * span, width, dtype=torch.float32)  # [B*Hkv*K, M*span, C]
    all_probs = probs.unsqueeze(2).unsqueeze(4)  # [B, Hkv, 1, M, 1, T]
    all_groups = group_idx.view(batch, heads, keep, 1, 1, tokens)
    for start in range(0, tokens, block):
        end = min(start + block, tokens)
        size = end - start
        if in_place:
            hit = hit_buffer[: batch * heads * keep * span * size].view(batch, heads, keep, 1, span, size)
            torch.eq(all_groups[..., start:end], slot_groups, out=hit)
            weights = weight_buffer[: batch * heads * keep * rows * span * size]
            weights = weights.view(batch, heads, keep, rows, span, size)
            torch.mul(all_probs[..., start:end], hit, out=weights)
        else:
            hit = (all_groups[..., start:end] == slot_groups).to(values.dtype)  # [B, Hkv, K, 1, span, t]
            weights = all_probs[..., start:end] * hit  # [B, Hkv, K, M, span, t]
        weights = weights.reshape(batch * heads * keep, rows * span, size)
        block_values = values[:, :, :, start:end].reshape(batch * heads * keep, size, width)  # [B*Hkv*K, t, C]: a view
        if acc.dtype == values.dtype:  # float32: accumulate in place, no product tensor
            acc.baddbmm_(weights, block_values)
        else:
            acc += torch.bmm(weights, block_values)
    return _spread_slots(acc.view(batch, heads, keep, rows, span, width), num_groups).to(values.dtype)


@functools.lru_cache(maxsize=64)
def _group_members(channels: int, size: int, device: torch.device) -> torch.Tensor:
    """`[channels / size, channels]` bool: row g marks the channels of quantization group g.
    Built once per shape and device, outside inference mode (as `_slot_table`): every decode
    step of every layer reads the same table."""
    with torch.inference_mode(False):
        groups = torch.arange(channels // size, device=device).view(-1, 1)
        return torch.arange(channels, device=device).view(1, channels) // size == groups


@functools.lru_cache(maxsize=64)
def _slot_table(keep: int, span: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[K, span, 1]`: the groups slot k can hold (k..k+span-1). A few bytes per (K, span, dtype,
    device), built once: every decode step of every layer reads the same table. Built outside
    inference mode, so a table first built under `torch.inference_mode()` may still be saved
    for a backward pass later."""
    with torch.inference_mode(False):
        slots = torch.arange(keep, device=device).view(keep, 1) + torch.arange(span, device=device).view(1, span)
        return slots.to(dtype).view(keep, span, 1)


def _slot_groups(keep: int, span: int, group_idx: torch.Tensor) -> torch.Tensor:
    """`[K, span, 1]`: the groups slot k can hold (k..k+span-1), in the indices' dtype (read only)."""
    return _slot_table(keep, span, group_idx.dtype, group_idx.device)


def _spread_slots(out: torch.Tensor, num_groups: int) -> torch.Tensor:
    """`[B, Hkv, K, M, span, C]` per-slot results (slot k over groups k..k+span-1) summed into
    `[B, Hkv, M, G*C]`: one `index_add_` of the K*span rows onto their groups (a few small ops
    on the output, never on the tokens)."""
    batch, heads, keep, rows, span, width = out.shape
    by_slot = out.transpose(2, 3).reshape(batch, heads, rows, keep * span, width)  # [B, Hkv, M, K*span, C]
    spread = out.new_zeros(batch, heads, rows, num_groups, width)  # [B, Hkv, M, G, C]
    spread.index_add_(3, _slot_table(keep, span, torch.long, out.device).view(-1), by_slot)
    return spread.view(batch, heads, rows, num_groups * width)


def packed_attention(
    query: torch.Tensor,
    kv: PackedKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    return_mass: bool = False,
):
    """Softmax attention of `query` over a `PackedKV`.

    Args:
        query: `[B, Hq, Q, D]`, `Hq` a multiple of the KV heads (query head `h*R + r` reads KV
            head `h`, as transformers' `repeat_kv` does).
        kv: packed tokens then the dense tail (`T = Ts + Tt` keys).
        attention_mask: `[B, 1, Q, T']` boolean (True attends) or additive float mask, or None
            for causal attention of the Q queries as the last Q positions. Its last Tt columns
            cover the tail; its first Ts columns cover the packed tokens only when they are
            stored in position order (`kv.stored_valid is None`, then `T' = T`).
        scaling: softmax scale, default `D ** -0.5`.
        return_mass: also return the `[B, Hkv, T]` attention each key got, averaged over the
            query heads and queries sharing its KV head.

    Returns:
        `[B, Hq, Q, D]` in the query's dtype (and the mass, if asked).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = kv.kv_heads
    group = q_heads // kv_heads
    stored, total = kv.keys.shape[-2], kv.num_tokens
    scores = masked_scores(query, kv, attention_mask, scaling)  # [B, Hkv, R, Q, T]
    probs = scores.softmax(dim=-1).view(batch, kv_heads, group * q_len, total)  # [B, Hkv, R*Q, T]

    out = probs[..., stored:].to(kv.tail_values.dtype) @ kv.tail_values  # [B, Hkv, R*Q, D]
    if stored:
        out = out + stored_value_matmul(probs[..., :stored], kv, query.dtype)
    out = out.view(batch, q_heads, q_len, head_dim).to(query.dtype)  # [B, Hq, Q, D]
    if return_mass:
        return out, probs.mean(dim=2)  # [B, Hkv, T]
    return out


def masked_scores(
    query: torch.Tensor, kv: PackedKV, attention_mask: torch.Tensor | None, scaling: float | None
) -> torch.Tensor:
    """Scaled float32 scores `[B, Hkv, R, Q, T]` of `query` `[B, Hq, Q, D]` against the packed
    keys then the tail keys, masked positions set to the float32 minimum."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = kv.kv_heads
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, group * q_len, head_dim)  # [B, Hkv, R*Q, D]
    scores = torch.cat([stored_key_scores(q, kv), q @ kv.tail_keys.transpose(-1, -2)], dim=-1)  # [B, Hkv, R*Q, T]
    scores = scores.float().mul_(scale)  # the concatenation is a fresh tensor: scaled in place
    scores = scores.view(batch, kv_heads, group, q_len, kv.num_tokens)  # [B, Hkv, R, Q, T]
    lowest = torch.finfo(scores.dtype).min
    for columns, blocked in blocked_columns(kv, attention_mask, q_len, query.device):
        scores[..., columns].masked_fill_(blocked, lowest)
    return scores
