"""Triton decode attention over tokens held as coefficients in calibrated bases, and a dense tail.

Layering (as in Liger-Kernel): `_rank_decode_kernel` (private, `@triton.jit`) ->
`rank_decode_attention_triton` (launcher: strides, blocks, token splits) -> the public
dispatcher `hf_subtok.kernels.rank_attention`. The oracle is
`hf_subtok.kernels.rank_attention_reference.rank_attention_lse`.

One program handles one (batch, KV head, token split); the R query heads reading this KV head
are the rows of one tile. The query is projected once onto the key basis (`q' = q Bk`, `[R, D]
x [D, Rk]`) and scored against each block of key coefficients, plus `q . mu_k` per row; the
online softmax accumulates the attention-weighted value coefficients `[R, Rv]` and the stored
tokens' mass, which are projected back once (`acc Bv^T + mass mu_v`, `[R, Rv] x [Rv, D]`) before
the dense tail is attended with the packed kernel's step (`_attend_block`). Coefficients past
a token's rank are masked out of the loads, so they read as zero whatever is stored. No dense
key or value of a stored token is ever built.

Coefficients may be `QuantizedTensor`s (KEY_BITS / VALUE_BITS of 2, 4 or 8; 0 means plain):
each block is dequantized in registers (`_dequantize` of the packed kernel), in float32 as the
reference. Every load and store is masked; under the interpreter every `tl.dot` runs on
float32 inputs, on a GPU fp16/bf16 coefficient tiles go to the tensor cores.

This module imports triton: import it only on the Triton path (see `hf_subtok.kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_subtok.kernels._dispatch import MAX_GRID_Y, on_device
from hf_subtok.kernels.packed_attention_triton import (
    _attend_block,
    _default_split_tokens,
    _dequantize,
    decode_launch_config,
    is_interpreted,
)
from hf_subtok.kernels.triton_operands import allowed_bytes, storage_operands
from hf_subtok.views import RankKV

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _load_coefficients(C, S, Z, t, j, rank, t_ok, stride_t, s_offset, stride_st, WIDTH: tl.constexpr,
                       BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """`[T, J]` coefficients `j` of tokens `t` (the first `rank` of each, others 0), plain or
    dequantized to float32; `C`, `S`, `Z`: this head's coefficients (payload), scales, zeros."""
    use = t_ok[:, None] & (j[None, :] < rank[:, None]) & (j[None, :] < WIDTH)
    if BITS == 0:
        return tl.load(C + t[:, None] * stride_t + j[None, :], mask=use, other=0.0)
    return _dequantize(C, S, Z, t[:, None] * stride_t, s_offset + t[:, None] * stride_st, j[None, :], use, BITS, GROUP_SIZE)


@triton.jit
def _attend_coefficients(q, c, bias, v, valid, allowed, m_i, l_i, mass, acc, LOW_PRECISION_DOT: tl.constexpr):
    """One online-softmax step over stored tokens: projected query `q` `[R, Rk]` (log2 units),
    key coefficients `c` `[T, Rk]`, `bias` `[R]` (`q . mu_k`), value coefficients `v` `[T, Rv]`.
    `mass` `[R]` sums the weights of stored tokens (for the value mean). Returns the block's
    scores `s` `[R, T]` too (log2 units)."""
    if LOW_PRECISION_DOT:
        s = tl.dot(q.to(c.dtype), tl.trans(c))
    else:
        s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
    s = s + bias[:, None]
    s = tl.where(allowed[None, :], s, -3.4028234663852886e38)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # [R, T]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    mass = mass * alpha + tl.sum(p, axis=1)
    if LOW_PRECISION_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return m_new, l_i, mass, acc, s


# ints that change from step to step: not specialised, so generation does not recompile
@triton.jit(do_not_specialize=["mask_tail_offset", "n_stored", "n_tail", "split_tokens"])
def _rank_decode_kernel(
    Q, KC, VC, KR, VR, BK, BV, KM, VM, TK, TV, MASK, VALID, OUT, LSE, SC,
    KS, KZ, VS, VZ,
    scale_log2,
    stride_qb, stride_qh,
    stride_kcb, stride_kch, stride_kct,
    stride_vcb, stride_vch, stride_vct,
    stride_ksb, stride_ksh, stride_kst,
    stride_vsb, stride_vsh, stride_vst,
    stride_krb, stride_krh, stride_krt,
    stride_vrb, stride_vrh, stride_vrt,
    stride_bkh, stride_bkd, stride_bkr, stride_bvh, stride_bvd, stride_bvr,
    stride_kmh, stride_kmd, stride_vmh, stride_vmd,
    stride_tkb, stride_tkh, stride_tkt,
    stride_tvb, stride_tvh, stride_tvt,
    stride_mb, mask_tail_offset,
    stride_sb, stride_sh,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_scb, stride_sch,
    n_kv_heads, n_stored, n_tail, split_tokens,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KEY_WIDTH: tl.constexpr,
    VALUE_WIDTH: tl.constexpr,
    HAS_KEY_MEAN: tl.constexpr,
    HAS_VALUE_MEAN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_STORED_VALID: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr,
    KEY_BITS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_GROUP_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // n_kv_heads).to(tl.int64)  # 64-bit offsets: caches past 2**31 elements
    h = (pid % n_kv_heads).to(tl.int64)
    lo = split * split_tokens  # this program's positions: [lo, hi) of [0, Ts + Tt)
    hi = tl.minimum(lo + split_tokens, n_stored + n_tail)

    rows = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    jk = tl.arange(0, BLOCK_K)
    jv = tl.arange(0, BLOCK_V)
    row_ok = rows < GROUP
    d_ok = d < HEAD_DIM
    heads = h * GROUP + rows  # [R] query heads reading KV head h

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)
    q = q * scale_log2  # [R, D], scores come out in log2 units
    basis_k = tl.load(
        BK + h * stride_bkh + d[:, None] * stride_bkd + jk[None, :] * stride_bkr, mask=d_ok[:, None] & (jk[None, :] < KEY_WIDTH), other=0.0
    ).to(tl.float32)  # [D, Rk]
    q_proj = tl.dot(q, basis_k, input_precision="ieee")  # [R, Rk]: the query in the key basis, once
    if HAS_KEY_MEAN:
        key_mean = tl.load(KM + h * stride_kmh + d * stride_kmd, mask=d_ok, other=0.0).to(tl.float32)  # [D]
        bias = tl.sum(q * key_mean[None, :], axis=1)  # [R]: q . mu_k
    else:
        bias = tl.zeros([BLOCK_R], dtype=tl.float32)

    sc_base = SC + b * stride_scb + heads[:, None] * stride_sch  # [R, 1] score rows (WRITE_SCORES)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    mass = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)  # weighted value coefficients

    kc_base = KC + b * stride_kcb + h * stride_kch
    vc_base = VC + b * stride_vcb + h * stride_vch
    kr_base = KR + b * stride_krb + h * stride_krh
    vr_base = VR + b * stride_vrb + h * stride_vrh
    ks_offset = b * stride_ksb + h * stride_ksh
    vs_offset = b * stride_vsb + h * stride_vsh
    for start in range(lo, tl.minimum(hi, n_stored), BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        t_ok = t < tl.minimum(hi, n_stored)
        key_rank = tl.load(kr_base + t * stride_krt, mask=t_ok, other=0).to(tl.int32)  # [T]
        value_rank = tl.load(vr_base + t * stride_vrt, mask=t_ok, other=0).to(tl.int32)
        ck = _load_coefficients(kc_base, KS, KZ, t, jk, key_rank, t_ok, stride_kct, ks_offset, stride_kst,
                                KEY_WIDTH, KEY_BITS, KEY_GROUP_SIZE)  # [T, Rk]
        cv = _load_coefficients(vc_base, VS, VZ, t, jv, value_rank, t_ok, stride_vct, vs_offset, stride_vst,
                                VALUE_WIDTH, VALUE_BITS, VALUE_GROUP_SIZE)  # [T, Rv]
        allowed = t_ok
        if HAS_STORED_VALID:  # tokens selected per head: their own validity, not the mask's
            allowed = allowed & (tl.load(VALID + b * stride_sb + h * stride_sh + t, mask=t_ok, other=0) != 0)
        elif HAS_MASK:
            allowed = allowed & (tl.load(MASK + b * stride_mb + t, mask=t_ok, other=0) != 0)
        m_i, l_i, mass, acc_v, s = _attend_coefficients(
            q_proj, ck, bias, cv, t_ok, allowed, m_i, l_i, mass, acc_v, LOW_PRECISION_DOT
        )
        if WRITE_SCORES:  # natural-log scores of position t, for the attention mass
            tl.store(sc_base + t[None, :], s * _LN2, mask=row_ok[:, None] & t_ok[None, :])

    # back to the model's space once: acc = (p C_v) Bv^T + mass mu_v, [R, D]
    basis_v_t = tl.load(
        BV + h * stride_bvh + d[None, :] * stride_bvd + jv[:, None] * stride_bvr, mask=(jv[:, None] < VALUE_WIDTH) & d_ok[None, :], other=0.0
    ).to(tl.float32)  # [Rv, D] = Bv^T
    acc = tl.dot(acc_v, basis_v_t, input_precision="ieee")
    if HAS_VALUE_MEAN:
        value_mean = tl.load(VM + h * stride_vmh + d * stride_vmd, mask=d_ok, other=0.0).to(tl.float32)
        acc += mass[:, None] * value_mean[None, :]

    # dense tail
    tk_base = TK + b * stride_tkb + h * stride_tkh
    tv_base = TV + b * stride_tvb + h * stride_tvh
    for start in range(tl.maximum(lo, n_stored), hi, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        pos_ok = pos < hi
        t = pos - n_stored
        td_ok = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(tk_base + t[:, None] * stride_tkt + d[None, :], mask=td_ok, other=0.0)
        v = tl.load(tv_base + t[:, None] * stride_tvt + d[None, :], mask=td_ok, other=0.0)
        allowed = pos_ok
        if HAS_MASK:
            allowed = allowed & (tl.load(MASK + b * stride_mb + mask_tail_offset + t, mask=pos_ok, other=0) != 0)
        m_i, l_i, acc, s = _attend_block(q, k, v, pos_ok, allowed, m_i, l_i, acc, LOW_PRECISION_DOT)
        if WRITE_SCORES:
            tl.store(sc_base + pos[None, :], s * _LN2, mask=row_ok[:, None] & pos_ok[None, :])

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)  # natural log
    tl.store(
        OUT + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b * stride_lb + heads * stride_lh + split, lse, mask=row_ok)


def rank_decode_attention_triton(
    query: torch.Tensor,
    kv: RankKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    out_dtype: torch.dtype | None = None,
    split_tokens: int | None = None,
    low_precision_dot: bool | None = None,
    return_scores: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the decode kernel; inputs are assumed checked (`kernels.rank_checks`).

    Args:
        query: `[B, Hq, 1, D]`.
        kv: a `RankKV` (coefficients' and tail's last dims contiguous; bases and means any strides).
        attention_mask: `[B|1, 1, 1, T']` bool or additive float, or None (as `packed_attention`).
        scaling: softmax scale, default `D ** -0.5`.
        out_dtype: dtype of the returned output (default: the query's).
        split_tokens: tokens per program (flash-decoding), merged with `merge_splits`.
        low_precision_dot: feed fp16/bf16 coefficient tiles to `tl.dot` as they are (default: on a GPU).
        return_scores: also return the scaled, masked scores `[B, Hq, T]` float32.

    Returns:
        `(out, lse)`: `[B, Hq, 1, D]` and `[B, Hq, 1]` float32; with `return_scores`, `(out, lse, scores)`.
    """
    batch, q_heads, _, head_dim = query.shape
    kv_heads, stored, tail = kv.kv_heads, kv.num_stored, kv.tail_keys.shape[2]
    total, group = stored + tail, q_heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    out_dtype = query.dtype if out_dtype is None else out_dtype
    if low_precision_dot is None:
        low_precision_dot = query.dtype != torch.float32 and not is_interpreted()

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_t, num_warps = decode_launch_config(block_d)
    block_r = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    key_width, value_width = kv.key_coeffs.shape[-1], kv.value_coeffs.shape[-1]
    if split_tokens is None:
        split_tokens = _default_split_tokens(batch * kv_heads, total, block_t, query.device)
    splits = triton.cdiv(total, split_tokens)
    if splits > MAX_GRID_Y:
        raise ValueError(f"split_tokens={split_tokens} gives {splits} splits of {total} tokens; at most {MAX_GRID_Y}")

    mask = allowed_bytes(attention_mask)
    stride_mb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    tail_offset = 0 if mask is None else mask.shape[-1] - tail  # mask columns of the tail
    valid = kv.stored_valid  # [B, Hkv, Ts] bool or None
    if valid is not None:
        valid = (valid if valid.stride(-1) == 1 else valid.contiguous()).view(torch.uint8)
    part_dtype = out_dtype if splits == 1 else torch.float32
    out = torch.empty(batch, q_heads, splits, head_dim, dtype=part_dtype, device=query.device)
    lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=query.device)
    scores = torch.empty(batch, q_heads, total, dtype=torch.float32, device=query.device) if return_scores else lse
    key_c, key_scale, key_zero, key_bits, key_group_size = storage_operands(kv.key_coeffs)
    value_c, value_scale, value_zero, value_bits, value_group_size = storage_operands(kv.value_coeffs)
    key_mean, value_mean = kv.key_mean, kv.value_mean
    with on_device(query.device):
        _rank_decode_kernel[(batch * kv_heads, splits)](
            query, key_c, value_c, kv.key_rank, kv.value_rank, kv.key_basis, kv.value_basis,
            query if key_mean is None else key_mean,  # never read without HAS_KEY_MEAN
            query if value_mean is None else value_mean,  # never read without HAS_VALUE_MEAN
            kv.tail_keys, kv.tail_values,
            query if mask is None else mask,  # never read without HAS_MASK
            query if valid is None else valid,  # never read without HAS_STORED_VALID
            out, lse, scores,  # scores: never written without WRITE_SCORES
            key_scale, key_zero, value_scale, value_zero,  # never read without KEY_BITS / VALUE_BITS
            scale * _LOG2E,
            query.stride(0), query.stride(1),
            key_c.stride(0), key_c.stride(1), key_c.stride(2),
            value_c.stride(0), value_c.stride(1), value_c.stride(2),
            key_scale.stride(0), key_scale.stride(1), key_scale.stride(2),
            value_scale.stride(0), value_scale.stride(1), value_scale.stride(2),
            kv.key_rank.stride(0), kv.key_rank.stride(1), kv.key_rank.stride(2),
            kv.value_rank.stride(0), kv.value_rank.stride(1), kv.value_rank.stride(2),
            *kv.key_basis.stride(), *kv.value_basis.stride(),
            *((0, 0) if key_mean is None else key_mean.stride()), *((0, 0) if value_mean is None else value_mean.stride()),
            kv.tail_keys.stride(0), kv.tail_keys.stride(1), kv.tail_keys.stride(2),
            kv.tail_values.stride(0), kv.tail_values.stride(1), kv.tail_values.stride(2),
            stride_mb, tail_offset,
            0 if valid is None else valid.stride(0), 0 if valid is None else valid.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            scores.stride(0), scores.stride(1),
            kv_heads, stored, tail, split_tokens,
            GROUP=group,
            HEAD_DIM=head_dim,
            KEY_WIDTH=key_width,
            VALUE_WIDTH=value_width,
            HAS_KEY_MEAN=key_mean is not None,
            HAS_VALUE_MEAN=value_mean is not None,
            HAS_MASK=mask is not None,
            HAS_STORED_VALID=valid is not None,
            WRITE_SCORES=return_scores,
            LOW_PRECISION_DOT=low_precision_dot,
            KEY_BITS=key_bits,
            KEY_GROUP_SIZE=key_group_size,
            VALUE_BITS=value_bits,
            VALUE_GROUP_SIZE=value_group_size,
            BLOCK_R=block_r,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            BLOCK_K=max(16, triton.next_power_of_2(key_width)),
            BLOCK_V=max(16, triton.next_power_of_2(value_width)),
            num_warps=num_warps,
        )
    extra = (scores,) if return_scores else ()
    if splits == 1:
        return (out, lse, *extra)  # [B, Hq, 1, D], [B, Hq, 1], [B, Hq, T]
    from hf_subtok.kernels.merge import merge_splits

    merged, merged_lse = merge_splits(out, lse)  # [B, Hq, 1, D], [B, Hq, 1]
    return (merged.to(out_dtype), merged_lse, *extra)
