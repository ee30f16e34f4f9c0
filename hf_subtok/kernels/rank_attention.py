"""`rank_attention`: decode attention over tokens held as coefficients in calibrated bases
(`RankKV`), dispatched to the Triton kernel or the PyTorch reference like `packed_attention`."""

from __future__ import annotations

import torch

from hf_subtok.kernels import rank_attention_reference as _reference
from hf_subtok.kernels._dispatch import check_strides_for_triton, records_grad, use_triton
from hf_subtok.kernels.rank_checks import check_rank_attention_inputs
from hf_subtok.views import RankKV


def rank_attention(
    query: torch.Tensor,
    kv: RankKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    backend: str | None = None,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `query` over stored tokens held as basis coefficients and a dense tail.

    Args:
        query: `[B, Hq, Q, D]`, `Hq = R * Hkv` (query head `h*R + r` reads KV head `h`).
        kv: a `RankKV`: coefficients `[B, Hkv, Ts, Rk]` / `[B, Hkv, Ts, Rv]` (plain or
            `QuantizedTensor`), integer ranks `[B, Hkv, Ts]`, bases `[Hkv, D, Rk]` / `[Hkv, D, Rv]`,
            means `[Hkv, D]` or None, tail keys/values `[B, Hkv, Tt, D]` in the query's dtype.
        attention_mask: `[B|1, 1, Q, T]` bool (True attends) or additive float, `T = Ts + Tt`
            (with `kv.stored_valid`: its last Tt columns cover the tail), or None (causal for Q > 1).
        scaling: softmax scale, default `D ** -0.5`.
        backend: "auto", "torch" or "triton"; default `kv.backend`. Triton computes decode
            steps (Q = 1) not recorded by autograd; other calls use the reference.
        return_mass: also return the `[B, Hkv, T]` attention each key got, averaged over the
            query heads and queries sharing its KV head.

    Returns:
        `[B, Hq, Q, D]` in the query's dtype (and the mass, if asked).
    """
    check_rank_attention_inputs(query, kv, attention_mask)
    if not _triton_decodes(query, kv, backend):
        return _reference.rank_attention(query, kv, attention_mask, scaling, return_mass=return_mass)
    if not return_mass:
        return _decode_triton(query, kv, attention_mask, scaling, query.dtype)[0]
    out, lse, scores = _decode_triton(query, kv, attention_mask, scaling, query.dtype, with_scores=True)
    batch, q_heads, total = scores.shape
    probs = torch.exp(scores - lse).nan_to_num(0.0)  # [B, Hq, T]; rows without tokens: 0
    return out, probs.view(batch, kv.kv_heads, q_heads // kv.kv_heads, total).mean(2)  # [B, Hkv, T]


def rank_attention_lse(
    query: torch.Tensor,
    kv: RankKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rank_attention` plus the log-sum-exp of each row (for `merge_attention_states`).

    Returns:
        `(out, lse)`: `[B, Hq, Q, D]` float32 normalised output and `[B, Hq, Q]` float32.
    """
    check_rank_attention_inputs(query, kv, attention_mask)
    if _triton_decodes(query, kv, backend):
        return _decode_triton(query, kv, attention_mask, scaling, torch.float32)
    out, lse, _ = _reference.rank_attention_lse(query, kv, attention_mask, scaling)
    return out, lse


def _triton_decodes(query: torch.Tensor, kv: RankKV, backend: str | None) -> bool:
    return (
        use_triton(kv.backend if backend is None else backend, query.device)
        and query.shape[2] == 1
        and not records_grad(query, kv.key_coeffs, kv.value_coeffs, kv.key_basis, kv.value_basis,
                             kv.key_mean, kv.value_mean, kv.tail_keys, kv.tail_values)
    )


def _decode_triton(query, kv, attention_mask, scaling, out_dtype, with_scores=False):
    check_strides_for_triton(
        {
            "query": query,
            "kv.key_coeffs": kv.key_coeffs,
            "kv.value_coeffs": kv.value_coeffs,
            "kv.tail_keys": kv.tail_keys,
            "kv.tail_values": kv.tail_values,
        }  # bases and means: read with their own strides
    )
    from hf_subtok.kernels.rank_attention_triton import rank_decode_attention_triton

    return rank_decode_attention_triton(query, kv, attention_mask, scaling, out_dtype=out_dtype, return_scores=with_scores)
