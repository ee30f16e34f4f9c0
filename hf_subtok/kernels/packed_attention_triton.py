"""Triton decode attention over whole keys, packed value groups and a dense tail.

Layering (as in Liger-Kernel): `_packed_decode_kernel` (private, `@triton.jit`) ->
`packed_decode_attention_triton` (launcher: strides, blocks, token splits) -> the public
dispatcher `hf_subtok.kernels.packed_attention`. The oracle is
`hf_subtok.kernels.merge.packed_attention_lse_reference`.

One program handles one (batch, KV head, token split): the R query heads that read this KV
head are the rows of one tile, so each key and value byte is read once for all of them. Values
are gathered inside the kernel: for each token the K stored slots are matched against the
group `d // C` of every output channel `d`, and a single masked load reads the kept channels
(dropped groups load nothing and count as zero). No dense value tensor is ever built.

Values may instead be codeword indices (`hf_subtok.quant.CodedTensor`, VALUE_CODED): each
channel's piece index is shifted out of its byte like a code, and the channel read from that
word of the row's codebook, times the token's one scale (`_look_up_codes`).

Keys and values may be quantized (`hf_subtok.quant.QuantizedTensor`, KEY_BITS / VALUE_BITS of
2, 4 or 8; 0 means plain): each block is dequantized in registers (`_dequantize`: the byte
holding a channel is loaded, its code shifted out and masked, then `code * scale + zero` in
float32) and rounded to the query's dtype, as the reference does, before the same
online-softmax step. Keys may instead be a `ChannelQuantizedTensor` (KEY_PER_CHANNEL): a scale
and zero per channel and block of tokens, each token's block given (int16, expanded from the
runs per call); for each tile the block indices are loaded and the `[BLOCK_T, D]` scale and
zero rows gathered by them, i.e. `_dequantize` with one channel per group and the table row
of the token's block. Scales held as 8-bit logarithms (uint8, `quant.logscale`) are decoded
as they are loaded (`_load_scale`).

Every load and store is masked; `tl.exp`/`tl.log` run on float32; under the interpreter every
`tl.dot` runs on float32 inputs (bf16 `tl.dot` is wrong there), on a GPU fp16/bf16 tiles go to
the tensor cores with float32 accumulation.

This module imports triton: import it only on the Triton path (see `hf_subtok.kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_subtok.kernels._dispatch import MAX_GRID_Y, on_device
from hf_subtok.kernels.triton_operands import allowed_bytes, block_index, storage_operands
from hf_subtok.quant import CodedTensor
from hf_subtok.quant.logscale import LOG_BIAS, LOG_STEPS
from hf_subtok.views import PackedKV

_LOG2E = 1.4426950408889634
_LOG_BIAS = tl.constexpr(float(LOG_BIAS))  # 8-bit logarithmic scales (`quant.logscale`)
_LOG_INV_STEPS = tl.constexpr(1.0 / LOG_STEPS)


@triton.jit
def _attend_block(q, k, v, valid, allowed, m_i, l_i, acc, LOW_PRECISION_DOT: tl.constexpr):
    """One online-softmax step: q `[R, D]` (scaled, log2 units), k/v `[T, D]`; `valid` `[T]`
    marks real tokens, `allowed` `[T]` the ones the mask lets attend (others get finfo.min,
    like the reference's `masked_fill`, so a fully masked row stays uniform). Also returns the
    block's scores `s` `[R, T]` (log2 units) for callers that write them out."""
    if LOW_PRECISION_DOT:
        s = tl.dot(q.to(k.dtype), tl.trans(k))  # [R, T] float32 accumulation
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    s = tl.where(allowed[None, :], s, -3.4028234663852886e38)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [R]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # [R, T]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if LOW_PRECISION_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return m_new, l_i, acc, s


@triton.jit
def _load_scale(S, offset, ok):
    """float32 scales at `offset`: as stored, or decoded from 8-bit logarithms (`S` uint8,
    `quant.logscale`: code 0 is 0)."""
    raw = tl.load(S + offset, mask=ok, other=0)
    if S.dtype.element_ty == tl.uint8:
        value = tl.exp2((raw.to(tl.float32) - _LOG_BIAS) * _LOG_INV_STEPS)
        return tl.where(raw == 0, 0.0, value)
    return raw.to(tl.float32)


@triton.jit
def _dequantize(P, S, Z, p_offset, s_offset, chan, ok, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """float32 values of channels `chan` of the quantized rows at `p_offset` (payload bytes) and
    `s_offset` (scale/zero elements); `ok` masks every load (masked lanes read as 0)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.load(P + p_offset + chan // PER_BYTE, mask=ok, other=0).to(tl.int32)
    code = (byte >> ((chan % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
    scale = _load_scale(S, s_offset + chan // GROUP_SIZE, ok)
    zero = tl.load(Z + s_offset + chan // GROUP_SIZE, mask=ok, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def _look_up_codes(P, S, CB, p_offset, s_offset, cb_offset, chan, ok, stride_w, BITS: tl.constexpr, PIECE: tl.constexpr):
    """float32 values of channels `chan` of rows stored as codeword indices (`CodedTensor`):
    the index of the channel's piece is shifted out of its byte at `p_offset`, the channel is
    read from that word of the codebook at `cb_offset` (`stride_w` apart), and scaled by the
    row's one scale at `s_offset`; `ok` masks every load (masked lanes read as 0)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    piece = chan // PIECE
    byte = tl.load(P + p_offset + piece // PER_BYTE, mask=ok, other=0).to(tl.int32)
    code = (byte >> ((piece % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
    word = tl.load(CB + cb_offset + code * stride_w + chan % PIECE, mask=ok, other=0.0).to(tl.float32)
    return word * _load_scale(S, s_offset, ok)


# ints that change from step to step: not specialised (value 1, multiples of 16), so generation
# does not compile a new variant as the tail grows
@triton.jit(do_not_specialize=["mask_tail_offset", "n_stored", "n_tail", "n_keep", "split_tokens"])
def _packed_decode_kernel(
    Q, K, V, IDX, TK, TV, MASK, VALID, OUT, LSE, SC,
    KS, KZ, KB, VS, VZ, VC,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vk, stride_vt,
    stride_ksb, stride_ksh, stride_kst,
    stride_kbb, stride_kbh, stride_kbt,
    stride_vsb, stride_vsh, stride_vsk, stride_vst,
    stride_vcb, stride_vch, stride_vck, stride_vcw,
    stride_ib, stride_ih, stride_ik,
    stride_tkb, stride_tkh, stride_tkt,
    stride_tvb, stride_tvh, stride_tvt,
    stride_mb, mask_tail_offset,
    stride_sb, stride_sh,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_scb, stride_sch,
    n_kv_heads, n_stored, n_tail, n_keep, split_tokens,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    WIDTH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_STORED_VALID: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
    IMPLIED_GROUPS: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr,
    KEY_BITS: tl.constexpr,
    KEY_GROUP_SIZE: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_GROUP_SIZE: tl.constexpr,
    VALUE_CODED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // n_kv_heads).to(tl.int64)  # 64-bit offsets: caches past 2**31 elements
    h = (pid % n_kv_heads).to(tl.int64)
    lo = split * split_tokens  # this program's positions: [lo, hi) of [0, Ts + Tt)
    hi = tl.minimum(lo + split_tokens, n_stored + n_tail)

    rows = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    d_ok = d < HEAD_DIM
    d_group = d // WIDTH  # [D] the group of each output channel
    d_chan = d % WIDTH  # [D] its channel inside the group
    heads = h * GROUP + rows  # [R] query heads reading KV head h

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * scale_log2  # [R, D], scores come out in log2 units

    sc_base = SC + b * stride_scb + heads[:, None] * stride_sch  # [R, 1] score rows (WRITE_SCORES)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)

    # packed tokens: whole keys, values gathered from the K kept slots (K, V: payloads if quantized)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    i_base = IDX + b * stride_ib + h * stride_ih
    ks_offset = b * stride_ksb + h * stride_ksh
    kb_base = KB + b * stride_kbb + h * stride_kbh
    vs_offset = b * stride_vsb + h * stride_vsh
    vc_offset = b * stride_vcb + h * stride_vch
    for start in range(lo, tl.minimum(hi, n_stored), BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        t_ok = t < tl.minimum(hi, n_stored)
        td_ok = t_ok[:, None] & d_ok[None, :]
        if KEY_BITS == 0:
            k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=td_ok, other=0.0)  # [T, D]
        else:
            if KEY_PER_CHANNEL:  # scale rows of the tokens' blocks (KEY_GROUP_SIZE is 1)
                key_row = tl.load(kb_base + t * stride_kbt, mask=t_ok, other=0).to(tl.int64)  # [T]
            else:  # a scale row per token
                key_row = t
            k = _dequantize(
                k_base, KS, KZ, t[:, None] * stride_kt, ks_offset + key_row[:, None] * stride_kst, d[None, :], td_ok,
                KEY_BITS, KEY_GROUP_SIZE,
            ).to(Q.dtype.element_ty)  # [T, D], rounded like the reference's dequantize(query.dtype)
        if IMPLIED_GROUPS:  # every group kept, none indexed: slot k holds group k
            slot = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32) + d_group[None, :]
            hit = tl.full([BLOCK_T, BLOCK_D], 1, dtype=tl.int32)
        else:
            slot = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)  # slot holding channel d of token t
            hit = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)  # 1 where that group is kept
            for kk in range(0, n_keep):
                g = tl.load(i_base + kk * stride_ik + t, mask=t_ok, other=255).to(tl.int32)  # [T]
                hit += (g[:, None] == d_group[None, :]).to(tl.int32)
                slot += (g[:, None] < d_group[None, :]).to(tl.int32)
        if VALUE_CODED:  # VALUE_GROUP_SIZE: channels per codeword
            v = _look_up_codes(
                v_base, VS, VC,
                slot * stride_vk + t[:, None] * stride_vt,
                vs_offset + slot * stride_vsk + t[:, None] * stride_vst,
                vc_offset + slot * stride_vck,
                d_chan[None, :], td_ok & (hit > 0), stride_vcw,
                VALUE_BITS, VALUE_GROUP_SIZE,
            ).to(Q.dtype.element_ty)  # [T, D], dropped groups zero
        elif VALUE_BITS == 0:
            v = tl.load(
                v_base + slot * stride_vk + t[:, None] * stride_vt + d_chan[None, :],
                mask=td_ok & (hit > 0),
                other=0.0,
            )  # [T, D], dropped groups zero
        else:
            v = _dequantize(
                v_base, VS, VZ,
                slot * stride_vk + t[:, None] * stride_vt,
                vs_offset + slot * stride_vsk + t[:, None] * stride_vst,
                d_chan[None, :], td_ok & (hit > 0),
                VALUE_BITS, VALUE_GROUP_SIZE,
            ).to(Q.dtype.element_ty)  # [T, D], dropped groups zero
        allowed = t_ok
        if HAS_STORED_VALID:  # tokens selected per head: their own validity, not the mask's
            allowed = allowed & (tl.load(VALID + b * stride_sb + h * stride_sh + t, mask=t_ok, other=0) != 0)
        elif HAS_MASK:
            allowed = allowed & (tl.load(MASK + b * stride_mb + t, mask=t_ok, other=0) != 0)
        m_i, l_i, acc, s = _attend_block(q, k, v, t_ok, allowed, m_i, l_i, acc, LOW_PRECISION_DOT)
        if WRITE_SCORES:  # natural-log scores of position t, for the attention mass
            tl.store(sc_base + t[None, :], s * 0.6931471805599453, mask=row_ok[:, None] & t_ok[None, :])

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
            tl.store(sc_base + pos[None, :], s * 0.6931471805599453, mask=row_ok[:, None] & pos_ok[None, :])

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # natural log
    tl.store(
        OUT + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b * stride_lb + heads * stride_lh + split, lse, mask=row_ok)


def is_interpreted() -> bool:
    """True when this module's kernels run under Triton's interpreter (`TRITON_INTERPRET=1`)."""
    return not isinstance(_packed_decode_kernel, triton.runtime.JITFunction)


def _default_split_tokens(batch_heads: int, total: int, block_t: int, device: torch.device) -> int:
    """Tokens per program: one split unless the (batch, KV head) grid would leave the GPU idle."""
    if device.type != "cuda" or is_interpreted():
        return total
    programs = torch.cuda.get_device_properties(device).multi_processor_count * 2
    splits = max(1, min(triton.cdiv(programs, batch_heads), triton.cdiv(total, 1024)))
    return triton.cdiv(triton.cdiv(total, splits), block_t) * block_t


def decode_launch_config(block_d: int) -> tuple[int, int]:
    """`(BLOCK_T, num_warps)` of the decode kernel for `BLOCK_D` channels: the sizes at which
    ptxas (sm_90a, triton 3.9) spills no register in any variant (plain, quantized, per-channel
    keys, codes, fp32 ieee dots; `benchmarks/triton_registers.py`). 64-token tiles spilled from
    D = 128 on (13 KB per thread at D = 256), and 32-token tiles with 4 warps still did for fp32."""
    return (64, 4) if block_d <= 64 else (32, 8)


def packed_decode_attention_triton(
    query: torch.Tensor,
    kv: PackedKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    out_dtype: torch.dtype | None = None,
    split_tokens: int | None = None,
    low_precision_dot: bool | None = None,
    return_scores: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the decode kernel; inputs are assumed checked (see `hf_subtok.kernels`).

    Args:
        query: `[B, Hq, 1, D]`.
        kv: keys `[B, Hkv, Ts, D]`, values `[B, Hkv, K, Ts, C]` (each plain or a
            `QuantizedTensor`, keys also a `ChannelQuantizedTensor`, values also a `CodedTensor`), uint8 group_idx `[B, Hkv, K, Ts]`, tail keys/values
            `[B, Hkv, Tt, D]` (last dims contiguous), and optionally `stored_valid`
            `[B, Hkv, Ts]` bool (tokens selected per head).
        attention_mask: `[B|1, 1, 1, T']` bool or additive float, or None. Its last Tt
            columns cover the tail; its first Ts cover the packed tokens unless
            `kv.stored_valid` is given (then `T'` may differ from `T = Ts + Tt`).
        scaling: softmax scale, default `D ** -0.5`.
        out_dtype: dtype of the returned output (default: the query's).
        split_tokens: tokens per program along the sequence (flash-decoding); partial results
            are merged with `merge_attention_states`. Default: one split on CPU, enough splits
            to fill the GPU otherwise.
        low_precision_dot: feed fp16/bf16 tiles to `tl.dot` as they are (default: on a GPU).
        return_scores: also return the scaled, masked scores `[B, Hq, T]` float32 (packed
            tokens then tail; masked positions at float32's minimum), from which the caller
            computes the attention mass each token got (`exp(scores - lse)`).

    Returns:
        `(out, lse)`: `[B, Hq, 1, D]` normalised output and `[B, Hq, 1]` float32 log-sum-exp;
        with `return_scores`, `(out, lse, scores)`.
    """
    batch, q_heads, _, head_dim = query.shape
    kv_heads, stored = kv.keys.shape[1], kv.keys.shape[2]
    keep, tail = kv.values.shape[2], kv.tail_keys.shape[2]
    total, group = stored + tail, q_heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    out_dtype = query.dtype if out_dtype is None else out_dtype
    if low_precision_dot is None:
        low_precision_dot = query.dtype != torch.float32 and not is_interpreted()

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_t, num_warps = decode_launch_config(block_d)
    block_r = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
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
    # one row per split; with a single split the kernel writes the final tensors directly
    part_dtype = out_dtype if splits == 1 else torch.float32
    out = torch.empty(batch, q_heads, splits, head_dim, dtype=part_dtype, device=query.device)
    lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=query.device)
    scores = torch.empty(batch, q_heads, total, dtype=torch.float32, device=query.device) if return_scores else lse
    # empty packed or tail parts: any valid pointer does, the loops never read it
    keys, key_scale, key_zero, key_bits, key_group_size = storage_operands(kv.keys)
    values, value_scale, value_zero, value_bits, value_group_size = storage_operands(kv.values)
    key_block = block_index(kv.keys)  # [B, Hkv, Ts] int16 or None
    block_strides = (0, 0, 0) if key_block is None else key_block.stride()
    codebook = kv.values.codebook if isinstance(kv.values, CodedTensor) else None  # [B, Hkv, K, W, d]
    codebook_strides = (0, 0, 0, 0) if codebook is None else codebook.stride()[:4]
    group_idx = kv.group_idx
    with on_device(query.device):
        _packed_decode_kernel[(batch * kv_heads, splits)](
            query, keys, values, group_idx, kv.tail_keys, kv.tail_values,
            query if mask is None else mask,  # never read without HAS_MASK
            query if valid is None else valid,  # never read without HAS_STORED_VALID
            out, lse, scores,  # scores: never written without WRITE_SCORES
            key_scale, key_zero,  # never read without KEY_BITS
            keys if key_block is None else key_block,  # never read without KEY_PER_CHANNEL
            value_scale, value_zero,  # never read without VALUE_BITS (zero: nor with VALUE_CODED)
            values if codebook is None else codebook,  # never read without VALUE_CODED
            scale * _LOG2E,
            query.stride(0), query.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), values.stride(3),
            key_scale.stride(0), key_scale.stride(1), key_scale.stride(2),
            *block_strides,
            value_scale.stride(0), value_scale.stride(1), value_scale.stride(2), value_scale.stride(3),
            *codebook_strides,
            group_idx.stride(0), group_idx.stride(1), group_idx.stride(2),
            kv.tail_keys.stride(0), kv.tail_keys.stride(1), kv.tail_keys.stride(2),
            kv.tail_values.stride(0), kv.tail_values.stride(1), kv.tail_values.stride(2),
            stride_mb, tail_offset,
            0 if valid is None else valid.stride(0), 0 if valid is None else valid.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            scores.stride(0), scores.stride(1),
            kv_heads, stored, tail, keep, split_tokens,
            GROUP=group,
            HEAD_DIM=head_dim,
            WIDTH=head_dim // kv.num_groups,
            HAS_MASK=mask is not None,
            HAS_STORED_VALID=valid is not None,
            WRITE_SCORES=return_scores,
            IMPLIED_GROUPS=kv.implied_groups,
            LOW_PRECISION_DOT=low_precision_dot,
            KEY_BITS=key_bits,
            KEY_GROUP_SIZE=key_group_size,
            KEY_PER_CHANNEL=key_block is not None,
            VALUE_BITS=value_bits,
            VALUE_GROUP_SIZE=value_group_size,
            VALUE_CODED=codebook is not None,
            BLOCK_R=block_r,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    extra = (scores,) if return_scores else ()
    if splits == 1:
        return (out, lse, *extra)  # [B, Hq, 1, D], [B, Hq, 1], [B, Hq, T]
    from hf_subtok.kernels.merge import merge_splits

    merged, merged_lse = merge_splits(out, lse)  # [B, Hq, 1, D], [B, Hq, 1]: a few ops, whatever the splits
    return (merged.to(out_dtype), merged_lse, *extra)
