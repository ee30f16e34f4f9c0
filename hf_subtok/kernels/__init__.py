"""Compute kernels over packed value groups.

Each kernel has a pure PyTorch reference (the CPU path and the test oracle) beside it:

| public function | Triton | PyTorch reference |
|---|---|---|
| `packed_attention`, `packed_attention_lse` | `packed_attention_triton.py` (decode, Q = 1) | `packed_attention_reference.py`, `merge.py` |
| `pack_value_groups` | `pack_triton.py` | `pack_reference.py` |
| `merge_attention_states` | (PyTorch on every device) | `merge.py` |
| `rank_attention`, `rank_attention_lse` | `rank_attention_triton.py` (decode, Q = 1) | `rank_attention_reference.py` |

Packed keys and values may be `hf_subtok.quant.QuantizedTensor`s (8, 4 or 2 bits): both paths
read the quantized storage directly, dequantizing one block of tokens at a time.

The public functions check their inputs (raising `ValueError` with the argument and the
value) before any launch, then dispatch: backend "auto" takes Triton for CUDA tensors and the
reference otherwise, "torch" always the reference, "triton" always Triton (CPU tensors need
`TRITON_INTERPRET=1`). Triton is imported only when a call takes the Triton path. The
Triton kernels have no backward pass: a call that autograd records (grad mode on and an input
that requires grad) takes the reference, whose result it can differentiate.
"""

from __future__ import annotations

import dataclasses

import torch

from hf_subtok.kernels import pack_reference as _pack_reference
from hf_subtok.kernels import packed_attention_reference as _attention_reference
from hf_subtok.kernels._dispatch import (
    check_pack_inputs,
    check_packed_attention_inputs,
    check_strides_for_triton,
    records_grad,
    triton_available,
    use_triton,
)
from hf_subtok.kernels.merge import merge_attention_states, packed_attention_lse_reference
from hf_subtok.kernels.packed_attention_reference import packed_value_matmul
from hf_subtok.kernels.rank_attention import rank_attention, rank_attention_lse
from hf_subtok.quant.pre_rope_keys import PreRopeKeys
from hf_subtok.quant.stored import map_stored, token_prefix
from hf_subtok.views import PackedKV

__all__ = [
    "merge_attention_states",
    "pack_value_groups",
    "packed_attention",
    "packed_attention_lse",
    "packed_value_matmul",
    "rank_attention",
    "rank_attention_lse",
    "triton_available",
]


def packed_attention(
    query: torch.Tensor,
    kv: PackedKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    backend: str | None = None,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `query` over whole keys, packed value groups and the dense tail.

    Args:
        query: `[B, Hq, Q, D]`, `Hq = R * Hkv` (query head `h*R + r` reads KV head `h`).
        kv: keys `[B, Hkv, Ts, D]`, values `[B, Hkv, K, Ts, C]`, uint8 group_idx `[B, Hkv, K, Ts]`,
            tail keys/values `[B, Hkv, Tt, D]`, all on the query's device and in its dtype;
            keys and values may instead be `QuantizedTensor`s of those logical shapes (then
            dequantized to the query's dtype, a block of tokens at a time).
        attention_mask: `[B|1, 1, Q, T]` bool (True attends) or additive float, `T = Ts + Tt`,
            or None (causal for Q > 1).
        scaling: softmax scale, default `D ** -0.5`.
        backend: "auto", "torch" or "triton"; default `kv.backend`. Triton computes decode
            steps (Q = 1); longer queries (prefill chunks) use the reference.
        return_mass: also return the `[B, Hkv, T]` attention each key got, averaged over the
            query heads and queries sharing its KV head (what an evicting cache re-selects by);
            the Triton kernel then also writes its scores, and the mass is `exp(scores - lse)`.

    Returns:
        `[B, Hq, Q, D]` in the query's dtype (and the mass, if asked).
    """
    check_packed_attention_inputs(query, kv, attention_mask)
    if _triton_decodes(query, kv, backend):
        if not return_mass:
            return _decode_triton(query, kv, attention_mask, scaling, query.dtype)[0]
        out, lse, scores = _decode_triton(query, kv, attention_mask, scaling, query.dtype, with_scores=True)
        batch, q_heads, total = scores.shape
        probs = torch.exp(scores - lse).nan_to_num(0.0)  # [B, Hq, T]; rows without tokens: 0
        return out, probs.view(batch, kv.kv_heads, q_heads // kv.kv_heads, total).mean(2)
    return _attention_reference.packed_attention(query, kv, attention_mask, scaling, return_mass=return_mass)


def packed_attention_lse(
    query: torch.Tensor,
    kv: PackedKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`packed_attention` plus the log-sum-exp of each row, for merging several blocks.

    Same arguments as `packed_attention`. Outputs over disjoint token sets (several packed
    blocks with different K, the tail) combine exactly with `merge_attention_states`.

    Returns:
        `(out, lse)`: `[B, Hq, Q, D]` float32 normalised output and `[B, Hq, Q]` float32
        log-sum-exp of the scaled, masked scores.
    """
    check_packed_attention_inputs(query, kv, attention_mask)
    if _triton_decodes(query, kv, backend):
        return _decode_triton(query, kv, attention_mask, scaling, torch.float32)
    return packed_attention_lse_reference(query, kv, attention_mask, scaling)


def pack_value_groups(
    values: torch.Tensor, scores: torch.Tensor, keep_groups: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep_groups` best-scored groups of every token, slot-major.

    Args:
        values: `[B, Hkv, T, D]` dense values.
        scores: `[B, Hkv, T, G]` group scores, higher is kept (G <= 256, G divides D).
        keep_groups: K, groups kept per token (1..G).
        backend: "auto", "torch" or "triton".

    Returns:
        `(packed, group_idx)`: `[B, Hkv, K, T, C]` kept channels (`C = D / G`) in the values'
        dtype and `[B, Hkv, K, T]` uint8 group indices, ascending over the K slots.
    """
    check_pack_inputs(values, scores, keep_groups)
    if use_triton(backend, values.device):
        check_strides_for_triton({"values": values, "scores": scores})
        from hf_subtok.kernels.pack_triton import pack_value_groups_triton

        return pack_value_groups_triton(values, scores, keep_groups)
    return _pack_reference.pack_value_groups(values, scores, keep_groups)


def _triton_decodes(query: torch.Tensor, kv: PackedKV, backend: str | None) -> bool:
    """Whether the Triton kernel computes this call: a decode step (Q = 1) on the Triton path,
    not recorded by autograd (the kernel has no backward), over keys the kernel reads (not keys
    stored before RoPE, which the PyTorch path rebuilds)."""
    return (
        use_triton(kv.backend if backend is None else backend, query.device)
        and query.shape[2] == 1
        and not isinstance(kv.keys, PreRopeKeys)
        and not records_grad(query, kv.keys, kv.values, kv.tail_keys, kv.tail_values, kv.wide_values)
    )


def _per_head_view(kv: PackedKV) -> PackedKV:
    """A shared row of packed tokens (`[B, 1, Ts, ...]`, per-head budgets) seen by every KV head
    (a stride-0 head dim, no copy): each head's program reads the whole row and masks the
    tokens of other heads with `stored_valid`, so the row is read once per KV head."""
    heads = kv.kv_heads

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.expand(t.shape[0], heads, *t.shape[2:])

    return dataclasses.replace(
        kv,
        keys=map_stored(kv.keys, expand),
        values=map_stored(kv.values, expand),
        group_idx=expand(kv.group_idx),
        wide_values=None if kv.wide_values is None else map_stored(kv.wide_values, expand),
        wide_group_idx=None if kv.wide_group_idx is None else expand(kv.wide_group_idx),
    )


def _decode_triton(query, kv, attention_mask, scaling, out_dtype, with_scores=False):
    """One decode kernel launch, or two for wide tokens (adaptive span): every packed token
    over its K groups (with the tail), then the wide tokens alone over their other groups.
    The second output is normalised over the wide tokens only, so it is rescaled by
    `exp(lse_wide - lse)` before it is added. `with_scores`: the first launch also returns its
    `[B, Hq, T]` scores."""
    if kv.shares_rows:
        kv = _per_head_view(kv)
    wide = 0 if kv.wide_values is None else kv.wide_values.shape[-2]
    if not wide:
        return _decode_triton_launch(query, kv, attention_mask, scaling, out_dtype, with_scores)
    plain = dataclasses.replace(kv, wide_values=None, wide_group_idx=None)
    out, lse, *scores = _decode_triton_launch(
        query, plain, attention_mask, scaling, torch.float32, with_scores
    )  # [B, Hq, 1, D], [B, Hq, 1] (, [B, Hq, T])
    widened = dataclasses.replace(
        plain,
        keys=token_prefix(kv.keys, wide),  # [B, Hkv, W, D] (a view)
        values=kv.wide_values,  # [B, Hkv, G-K, W, C]
        group_idx=kv.wide_group_idx,
        tail_keys=kv.tail_keys[..., :0, :],
        tail_values=kv.tail_values[..., :0, :],
        stored_valid=None if kv.stored_valid is None else kv.stored_valid[..., :wide],
    )
    # per-head selection: the mask covers only the (now empty) tail; else its first W columns
    mask = None if attention_mask is None or kv.stored_valid is not None else attention_mask[..., :wide]
    wide_out, wide_lse = _decode_triton_launch(query, widened, mask, scaling, torch.float32)
    share = torch.where(wide_lse.isfinite(), torch.exp(wide_lse - lse), 0.0)  # [B, Hq, 1]
    out = out + share.unsqueeze(-1) * wide_out.nan_to_num()
    return (out.to(out_dtype), lse, *scores)


def _decode_triton_launch(query, kv, attention_mask, scaling, out_dtype, with_scores=False):
    check_strides_for_triton(
        {
            "query": query,
            "kv.keys": kv.keys,
            "kv.values": kv.values,
            **({} if kv.implied_groups else {"kv.group_idx": kv.group_idx}),  # implied: never read
            "kv.tail_keys": kv.tail_keys,
            "kv.tail_values": kv.tail_values,
        }
    )
    from hf_subtok.kernels.packed_attention_triton import packed_decode_attention_triton

    return packed_decode_attention_triton(
        query, kv, attention_mask, scaling, out_dtype=out_dtype, return_scores=with_scores
    )
