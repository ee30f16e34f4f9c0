"""Which keys a query may not attend, over packed-then-tail keys (the reference's masking)."""

from __future__ import annotations

import torch

from hf_subtok.views import PackedKV


def blocked_columns(
    kv: PackedKV, attention_mask: torch.Tensor | None, q_len: int, device
) -> list[tuple[slice, torch.Tensor]]:
    """The masked keys, part by part: `(columns, blocked)` with `blocked` a `[B|1, Hkv|1, 1,
    Q|1, n]` bool (True: not attended) over `n` columns of the packed-then-tail keys. Each part
    is masked where it lies, so no mask over every key is built or concatenated: a decode step
    of an evicting cache (`stored_valid` given, no attention mask) masks the packed tokens with
    `[B, Hkv, 1, 1, Ts]` and nothing else."""
    return blocked_parts(kv.keys.shape[-2], kv.tail_keys.shape[-2], kv.stored_valid, attention_mask, q_len, device)


def blocked_parts(
    stored: int,
    tail: int,
    stored_valid: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    q_len: int,
    device,
) -> list[tuple[slice, torch.Tensor]]:
    """`blocked_columns` of any stored-then-tail view: `stored` (Ts) tokens held in some compact
    form, then `tail` (Tt) dense ones, `stored_valid` `[B, Hkv, Ts]` bool or None."""
    total = stored + tail
    parts = []
    if attention_mask is not None:
        if attention_mask.shape[-2] != q_len or attention_mask.shape[-1] < tail:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match Q={q_len}, T={total}")
        allowed = attention_mask
        if allowed.dtype != torch.bool:
            allowed = allowed > torch.finfo(allowed.dtype).min / 2
        allowed = allowed.reshape(allowed.shape[0], 1, 1, q_len, allowed.shape[-1])  # [B|1, 1, 1, Q, T']
        if stored_valid is None:  # packed tokens in position order: the mask covers them
            if allowed.shape[-1] != total:
                raise ValueError(f"attention_mask covers {allowed.shape[-1]} keys, the cache holds {total}")
            return [(slice(0, total), allowed.logical_not())]
        if tail:
            parts.append((slice(stored, total), allowed[..., allowed.shape[-1] - tail :].logical_not()))
    else:
        causal = _causal_mask(q_len, tail, device)  # [1, 1, Q, Tt] or None
        if causal is not None:
            parts.append((slice(stored, total), causal.view(1, 1, 1, q_len, tail).logical_not()))
    if stored_valid is not None:
        batch, kv_heads = stored_valid.shape[:2]
        parts.append((slice(0, stored), stored_valid.view(batch, kv_heads, 1, 1, stored).logical_not()))
    return parts


def _causal_mask(q_len: int, total: int, device: torch.device) -> torch.Tensor | None:
    if q_len == 1:
        return None
    query_pos = torch.arange(total - q_len, total, device=device).view(q_len, 1)
    return (torch.arange(total, device=device).view(1, total) <= query_pos).view(1, 1, q_len, total)  # [1, 1, Q, T]


def causal_allowed(kv: PackedKV, q_len: int, device) -> torch.Tensor:
    """`[1, 1, Q, T]` bool: the keys (packed, then tail) each of the Q queries may attend when
    the queries are the last Q tail tokens and no mask is given (causal attention): every packed
    token, and the tail up to the query itself. Built so a block of the queries can be attended
    with its rows."""
    stored, tail = kv.keys.shape[-2], kv.tail_keys.shape[-2]
    query_pos = torch.arange(tail - q_len, tail, device=device).view(q_len, 1)
    allowed_tail = torch.arange(tail, device=device).view(1, tail) <= query_pos  # [Q, Tt]
    allowed = torch.cat([allowed_tail.new_ones(q_len, stored), allowed_tail], dim=-1)  # [Q, T]
    return allowed.view(1, 1, q_len, stored + tail)
