"""Attention over whole keys and packed value groups (PyTorch reference and CPU path).

Keys and values may be plain tensors or `QuantizedTensor`s. Quantized storage is read
`BLOCK_TOKENS` packed tokens at a time: each block is dequantized to the query's dtype, used,
and dropped, so no dense copy of all stored keys or values ever exists. The scores of every
token (D times smaller than the keys) are kept whole, as for plain storage: the softmax and
the `[B, Hkv, T]` attention mass need the global normaliser of each row. The result equals
attention over the dequantized tensors (`dequantize(query.dtype)`), up to summation order.
"""

from __future__ import annotations

import torch

from hf_subtok.packed import PackedKV
from hf_subtok.quant import QuantizedTensor

BLOCK_TOKENS = 1024  # packed tokens dequantized at once (read at call time: tests lower it)


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
        values: `[B, Hkv, K, T, C]` kept value groups, slot-major, plain or quantized.
        group_idx: `[B, Hkv, K, T]` uint8 group of each slot, ascending over slots.
        num_groups: G.
        dtype: what quantized values are dequantized to and computed in (default float32);
            plain values compute in their own dtype.

    Returns:
        `[B, Hkv, M, D]` with `D = G * C`, in the values' dtype (quantized: `dtype`); dropped
        groups contribute zero.
    """
    if not isinstance(values, QuantizedTensor):
        return _dense_value_matmul(probs, values, group_idx, num_groups)
    dtype = torch.float32 if dtype is None else dtype
    batch, heads, _, tokens, width = values.shape
    out = probs.new_zeros(batch, heads, probs.shape[2], num_groups * width, dtype=torch.float32)  # [B, Hkv, M, D]
    for start in range(0, tokens, BLOCK_TOKENS):
        end = min(start + BLOCK_TOKENS, tokens)
        block = token_slice(values, start, end).dequantize(dtype)  # [B, Hkv, K, t, C]
        out += _dense_value_matmul(probs[..., start:end], block, group_idx[..., start:end], num_groups)
    return out.to(dtype)


def token_slice(x: QuantizedTensor, start: int, end: int) -> QuantizedTensor:
    """Tokens `start:end` of a quantized `[..., T, N]` tensor."""
    return x.apply(lambda part: part[..., start:end, :])


def key_scores(query: torch.Tensor, keys: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    """`query @ keys^T`: `[B, Hkv, M, D]` x `[B, Hkv, T, D]` -> `[B, Hkv, M, T]` in the query's
    dtype; quantized keys are dequantized `BLOCK_TOKENS` at a time."""
    if not isinstance(keys, QuantizedTensor):
        return query @ keys.transpose(-1, -2)
    tokens = keys.shape[-2]
    blocks = [
        query @ token_slice(keys, start, min(start + BLOCK_TOKENS, tokens)).dequantize(query.dtype).transpose(-1, -2)
        for start in range(0, tokens, BLOCK_TOKENS)
    ]  # [B, Hkv, M, t] each
    return torch.cat(blocks, dim=-1) if blocks else query.new_zeros(*query.shape[:-1], 0)


def _dense_value_matmul(
    probs: torch.Tensor, values: torch.Tensor, group_idx: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """`packed_value_matmul` on plain values.

    One matmul per slot (K <= G iterations, never per token or head): slot k can only hold
    groups k..G-K+k since indices ascend, so its weights are spread over those G-K+1 groups.
    """
    batch, heads, keep, tokens, width = values.shape
    rows = probs.shape[2]
    probs = probs.to(values.dtype)
    if keep == num_groups:  # every group kept: slots are groups 0..G-1 in order
        dense = values.permute(0, 1, 3, 2, 4).reshape(batch, heads, tokens, keep * width)  # [B, Hkv, T, D]
        return probs @ dense
    span = num_groups - keep + 1
    out = probs.new_zeros(batch, heads, rows, num_groups, width)  # [B, Hkv, M, G, C]
    for slot in range(keep):
        groups = torch.arange(slot, slot + span, device=group_idx.device, dtype=group_idx.dtype)
        hit = group_idx[:, :, slot].unsqueeze(2) == groups.view(span, 1)  # [B, Hkv, span, T]
        weights = probs.unsqueeze(3) * hit.unsqueeze(2).to(probs.dtype)  # [B, Hkv, M, span, T]
        part = weights.view(batch, heads, rows * span, tokens) @ values[:, :, slot]  # [B, Hkv, M*span, C]
        out[:, :, :, slot : slot + span] += part.view(batch, heads, rows, span, width)
    return out.view(batch, heads, rows, num_groups * width)


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
    kv_heads = kv.keys.shape[1]
    group = q_heads // kv_heads
    stored, total = kv.keys.shape[-2], kv.num_tokens
    scores = masked_scores(query, kv, attention_mask, scaling)  # [B, Hkv, R, Q, T]
    probs = scores.softmax(dim=-1).view(batch, kv_heads, group * q_len, total)  # [B, Hkv, R*Q, T]

    out = probs[..., stored:].to(kv.tail_values.dtype) @ kv.tail_values  # [B, Hkv, R*Q, D]
    if stored:
        values = packed_value_matmul(probs[..., :stored], kv.values, kv.group_idx, kv.num_groups, query.dtype)
        out = out + values
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
    kv_heads = kv.keys.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, group * q_len, head_dim)  # [B, Hkv, R*Q, D]
    scores = torch.cat([key_scores(q, kv.keys), q @ kv.tail_keys.transpose(-1, -2)], dim=-1)  # [B, Hkv, R*Q, T]
    scores = scores.float() * scale
    scores = scores.view(batch, kv_heads, group, q_len, kv.num_tokens)  # [B, Hkv, R, Q, T]
    mask = _combined_mask(kv, attention_mask, q_len, query.device)  # [B|1, Hkv|1, 1, Q, T] bool
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores


def _combined_mask(kv: PackedKV, attention_mask: torch.Tensor | None, q_len: int, device) -> torch.Tensor | None:
    """Boolean `[B|1, Hkv|1, 1, Q, T]` mask over packed tokens then tail, or None (attend all)."""
    stored, tail = kv.keys.shape[-2], kv.tail_keys.shape[-2]
    total = stored + tail
    if attention_mask is not None:
        if attention_mask.shape[-2] != q_len or attention_mask.shape[-1] < tail:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match Q={q_len}, T={total}")
        allowed = attention_mask
        if allowed.dtype != torch.bool:
            allowed = allowed > torch.finfo(allowed.dtype).min / 2
        allowed = allowed.reshape(allowed.shape[0], 1, 1, q_len, allowed.shape[-1])  # [B|1, 1, 1, Q, T']
        if kv.stored_valid is None:
            if allowed.shape[-1] != total:
                raise ValueError(f"attention_mask covers {allowed.shape[-1]} keys, the cache holds {total}")
            return allowed
        tail_allowed = allowed[..., -tail:]
    else:
        tail_allowed = _causal_mask(q_len, tail, device)
        if tail_allowed is not None:
            tail_allowed = tail_allowed.view(1, 1, 1, q_len, tail)
    if kv.stored_valid is None:
        if tail_allowed is None:
            return None
        stored_allowed = torch.ones(1, 1, 1, q_len, stored, dtype=torch.bool, device=device)
    else:
        batch, kv_heads = kv.stored_valid.shape[:2]
        stored_allowed = kv.stored_valid.view(batch, kv_heads, 1, 1, stored).expand(-1, -1, 1, q_len, -1)
        if tail_allowed is None:
            tail_allowed = torch.ones(1, 1, 1, q_len, tail, dtype=torch.bool, device=device)
    shape = torch.broadcast_shapes(stored_allowed.shape[:3], tail_allowed.shape[:3])
    return torch.cat(
        [stored_allowed.expand(*shape, q_len, stored), tail_allowed.expand(*shape, q_len, tail)], dim=-1
    )


def _causal_mask(q_len: int, total: int, device: torch.device) -> torch.Tensor | None:
    if q_len == 1:
        return None
    query_pos = torch.arange(total - q_len, total, device=device).view(q_len, 1)
    return (torch.arange(total, device=device).view(1, total) <= query_pos).view(1, 1, q_len, total)  # [1, 1, Q, T]
