"""Attention over tokens held as coefficients in calibrated bases (PyTorch reference, CPU path).

A stored token keeps its first r coefficients in a per-KV-head orthonormal basis (`RankKV`):
`k = mu_k + Bk c_k`, `v = mu_v + Bv c_v`. Its keys are never rebuilt: the query is projected
once, `q' = q Bk` (`[R*Q, D] x [D, Rk]`), and scored against the coefficients, `q . k = q . mu_k
+ q' . c_k` (the mean term is one number per query row). The attention-weighted value
coefficients are summed first and projected back once, `sum_t p_t v_t = (sum_t p_t) mu_v + (p C_v)
Bv^T`. The dense tail is attended as it is. Everything is computed in float32; quantized
coefficients (`QuantizedTensor`) are dequantized `BLOCK_TOKENS` tokens at a time. Coefficients
past a token's rank are masked, whatever is stored there (ranks above the width count as the
width, below zero as zero).

The oracle of the Triton decode kernel (`rank_attention_triton.py`); the oracle of this file
is SDPA over the keys and values rebuilt from the truncated projections (tests).
"""

from __future__ import annotations

import torch

from hf_subtok.kernels.masks import blocked_parts
from hf_subtok.quant import QuantizedTensor
from hf_subtok.views import RankKV

BLOCK_TOKENS = 1024  # stored tokens dequantized at once (read at call time: tests lower it)


def coefficient_block(coeffs: torch.Tensor | QuantizedTensor, rank: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Tokens `start:end` of `[B, Hkv, Ts, R]` coefficients as float32 `[B, Hkv, t, R]`, those past
    each token's rank (`rank` `[B, Hkv, Ts]`) zero."""
    if isinstance(coeffs, QuantizedTensor):
        block = coeffs.apply(lambda t: t[:, :, start:end]).dequantize(torch.float32)  # [B, Hkv, t, R]
    else:
        block = coeffs[:, :, start:end].float()
    used = torch.arange(block.shape[-1], device=block.device) < rank[:, :, start:end, None].long()  # [B, Hkv, t, R]
    return torch.where(used, block, 0.0)


def rank_scores(
    query: torch.Tensor, kv: RankKV, attention_mask: torch.Tensor | None, scaling: float | None
) -> torch.Tensor:
    """Scaled float32 scores `[B, Hkv, R, Q, T]` of `query` `[B, Hq, Q, D]` against the stored
    tokens (through their key coefficients) then the tail keys, masked positions at the float32
    minimum."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, stored, total = kv.kv_heads, kv.num_stored, kv.num_tokens
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, group * q_len, head_dim).float() * scale  # [B, Hkv, R*Q, D]
    scores = torch.empty(batch, kv_heads, group * q_len, total, device=query.device)  # [B, Hkv, R*Q, T]
    projected = q @ kv.key_basis.float()  # [B, Hkv, R*Q, Rk]: the query in the key basis, once
    for start in range(0, stored, BLOCK_TOKENS):
        end = min(start + BLOCK_TOKENS, stored)
        coeffs = coefficient_block(kv.key_coeffs, kv.key_rank, start, end)  # [B, Hkv, t, Rk]
        scores[..., start:end] = projected @ coeffs.transpose(-1, -2)
    if kv.key_mean is not None and stored:
        scores[..., :stored] += q @ kv.key_mean.float().unsqueeze(-1)  # [B, Hkv, R*Q, 1]: q . mu_k
    scores[..., stored:] = q @ kv.tail_keys.float().transpose(-1, -2)
    scores = scores.view(batch, kv_heads, group, q_len, total)  # [B, Hkv, R, Q, T]
    lowest = torch.finfo(scores.dtype).min
    parts = blocked_parts(stored, kv.tail_keys.shape[-2], kv.stored_valid, attention_mask, q_len, query.device)
    for columns, blocked in parts:
        scores[..., columns].masked_fill_(blocked, lowest)
    return scores


def rank_value_matmul(probs: torch.Tensor, kv: RankKV) -> torch.Tensor:
    """`[B, Hkv, M, Ts]` weights of the stored tokens times their values, float32 `[B, Hkv, M,
    D]`: the weighted coefficients are summed, then projected back once."""
    batch, kv_heads, rows, stored = probs.shape
    probs = probs.float()
    acc = probs.new_zeros(batch, kv_heads, rows, kv.value_basis.shape[-1])  # [B, Hkv, M, Rv]
    for start in range(0, stored, BLOCK_TOKENS):
        end = min(start + BLOCK_TOKENS, stored)
        acc += probs[..., start:end] @ coefficient_block(kv.value_coeffs, kv.value_rank, start, end)
    out = acc @ kv.value_basis.float().transpose(-1, -2)  # [B, Hkv, M, D]
    if kv.value_mean is not None:
        out += probs.sum(-1, keepdim=True) * kv.value_mean.float().unsqueeze(1)  # [Hkv, 1, D]
    return out


def rank_attention_lse(
    query: torch.Tensor, kv: RankKV, attention_mask: torch.Tensor | None = None, scaling: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(out, lse, probs)`: float32 `[B, Hq, Q, D]` output, `[B, Hq, Q]` log-sum-exp of the
    scaled, masked scores and `[B, Hkv, R*Q, T]` attention weights."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, stored = kv.kv_heads, kv.num_stored
    group = q_heads // kv_heads
    scores = rank_scores(query, kv, attention_mask, scaling)  # [B, Hkv, R, Q, T]
    lse = scores.logsumexp(dim=-1).view(batch, q_heads, q_len)  # [B, Hq, Q]
    probs = scores.softmax(dim=-1).view(batch, kv_heads, group * q_len, kv.num_tokens)  # [B, Hkv, R*Q, T]
    out = probs[..., stored:] @ kv.tail_values.float()  # [B, Hkv, R*Q, D]
    if stored:
        out = out + rank_value_matmul(probs[..., :stored], kv)
    return out.view(batch, q_heads, q_len, head_dim), lse, probs  # [B, Hq, Q, D]


def rank_attention(
    query: torch.Tensor,
    kv: RankKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    return_mass: bool = False,
):
    """Softmax attention of `query` over a `RankKV` (inputs as `hf_subtok.kernels.rank_attention`).

    Args:
        query: `[B, Hq, Q, D]`, query head `h*R + r` reading KV head `h`.
        kv: stored tokens as coefficients, then the dense tail (`T = Ts + Tt`).
        attention_mask: `[B|1, 1, Q, T']` bool (True attends) or additive float, or None
            (causal for Q > 1); as in `packed_attention`.
        scaling: softmax scale, default `D ** -0.5`.
        return_mass: also return the `[B, Hkv, T]` attention each key got, averaged over the
            query heads and queries sharing its KV head.

    Returns:
        `[B, Hq, Q, D]` in the query's dtype (and the mass, if asked).
    """
    out, _, probs = rank_attention_lse(query, kv, attention_mask, scaling)
    out = out.to(query.dtype)
    if return_mass:
        return out, probs.mean(dim=2)  # [B, Hkv, T]
    return out
