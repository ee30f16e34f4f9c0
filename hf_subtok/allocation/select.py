"""Selection: which tokens a row keeps and how many fit its bytes, as pure functions of
scores, a storage format and a byte count (`row_bytes`: bytes per `(batch, KV head)` row)."""

from __future__ import annotations

import torch

from hf_subtok.formats import StorageFormat

# Each KV head keeps at least this share of an equal split of a shared row (per-head budgets)
HEAD_FLOOR = 0.25
FLOOR_BOOST = 1e6  # added to the scores of floor tokens: above any stored score (masses, PRIORITY)


def floor_heads(scores: torch.Tensor, heads: torch.Tensor, num_heads: int, keep: int) -> torch.Tensor:
    """Scores of tokens that share one row per sequence, raised so each head's best
    `HEAD_FLOOR * keep / num_heads` tokens rank above every other token; then the `keep` best
    (`select_tokens`) give each head at least its floor and spend the rest by score.

    Args:
        scores: `[B, 1, N]` token scores (-inf marks fillers).
        heads: `[B, 1, N]` uint8 the KV head of each token.
    """
    floor = int(HEAD_FLOOR * keep / num_heads)
    if floor == 0:
        return scores
    own = heads.long() == torch.arange(num_heads, device=heads.device).view(1, num_heads, 1)  # [B, Hkv, N]
    per_head = torch.where(own, scores, float("-inf"))  # [B, Hkv, N]
    top = per_head.topk(min(floor, scores.shape[-1]), dim=-1)
    first = torch.zeros_like(own).scatter_(2, top.indices, top.values.isfinite())  # [B, Hkv, N]
    return torch.where(first.any(1, keepdim=True), scores + FLOOR_BOOST, scores)


def select_tokens(token_scores: torch.Tensor, keep_tokens: int) -> torch.Tensor:
    """`[B, Hkv, T]` scores -> `[B, Hkv, keep_tokens]` indices of the best tokens, ascending
    (ties broken arbitrarily).

    A pack usually keeps all but a few tokens: then the `T - keep` worst are found (a small
    `topk`), and the survivors' ascending indices are written to their ranks among the
    survivors (a cumulative sum and one scatter, no sort and no sync). Measured on a CPU (2
    threads, 3 rows of 16k tokens, 8 dropped): 0.33 ms against 9.4 ms for `topk` of the kept
    then `sort`, which remains the path when most tokens go.
    """
    tokens = token_scores.shape[-1]
    drop = tokens - keep_tokens
    if drop > keep_tokens:
        return token_scores.topk(keep_tokens, dim=-1).indices.sort(dim=-1).values
    kept = torch.ones_like(token_scores, dtype=torch.bool)  # [B, Hkv, T]
    kept.scatter_(-1, token_scores.topk(drop, dim=-1, largest=False).indices, False)
    rank = torch.where(kept, kept.cumsum(-1) - 1, keep_tokens)  # [B, Hkv, T]: dropped ones to a spare column
    positions = torch.arange(tokens, device=token_scores.device).expand_as(token_scores)
    out = torch.empty(*token_scores.shape[:-1], keep_tokens + 1, dtype=torch.long, device=token_scores.device)
    return out.scatter_(-1, rank, positions)[..., :keep_tokens]


def wide_first(scores: torch.Tensor, worth: torch.Tensor, keep: int, wide: int) -> torch.Tensor:
    """Which tokens to keep, the `wide` worth widening most first.

    Args:
        scores: `[B, Hkv, T]` token scores (higher kept; -inf marks fillers).
        worth: `[B, Hkv, T]` what widening each token is worth (-inf: it cannot be wide).
        keep: tokens kept per row; `wide <= keep` and at most the finite `worth` of a row.

    Returns:
        `[B, Hkv, keep]` token indices: the wide ones, then the best-scored others, each part
        in ascending order.
    """
    wide_idx = worth.topk(wide, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, W]
    narrow_idx = _top_unpicked(scores, wide_idx, keep - wide)
    return torch.cat([wide_idx, narrow_idx], dim=-1)


def _top_unpicked(scores: torch.Tensor, picked: torch.Tensor, count: int) -> torch.Tensor:
    """`[B, Hkv, count]` ascending indices of the best-scored tokens not in `picked`."""
    taken = torch.zeros_like(scores, dtype=torch.bool).scatter(2, picked, True)
    # -inf fillers still rank above the picked tokens (pushed to the float minimum below it)
    ranked = scores.masked_fill(taken, float("-inf")).nan_to_num(neginf=torch.finfo(torch.float32).min)
    ranked = ranked.masked_fill(taken, float("-inf"))
    return select_tokens(ranked, count)


def tokens_within(
    storage: StorageFormat, keep_groups: int, row_bytes: float, tokens: int, tables: tuple[int, int, int], extra: float = 0.0
) -> int:
    """How many of `tokens` packed tokens of `storage` with `keep_groups` groups fit `row_bytes`
    bytes per row, with `tables` (blocks, runs, position runs) of per-channel keys (no blocks:
    count each token's share of full blocks), each token costing `extra` more bytes (its share
    of wide tokens' other groups)."""
    blocks, runs, position_runs = tables
    if blocks == 0:  # the row's fixed bytes: its value codebooks, if any
        per_token = storage.token_bytes(keep_groups, scored=True) + extra
        room = row_bytes - storage.codebook_bytes(keep_groups)
        return max(0, min(tokens, int(room // per_token)))
    if storage.row_bytes(tokens, blocks, keep_groups, True, runs, position_runs) + tokens * extra <= row_bytes:
        return tokens
    base = storage.row_bytes(0, blocks, keep_groups, True, runs, position_runs)  # tables, runs, codebooks
    per_token = storage.row_bytes(1, 0, keep_groups, scored=True) - storage.row_bytes(0, 0, keep_groups, scored=True) + extra
    # at least one token fewer, so that the tables shrink or the loop ends at 0
    return max(0, min(tokens - 1, int((row_bytes - base) // per_token)))


def fit_tokens(
    storage: StorageFormat,
    keep_groups: int,
    row_bytes: float,
    scores: torch.Tensor,
    tables: tuple[int, int, int],
    wide_worth: torch.Tensor | None = None,
    wide_fraction: float = 0.0,
) -> tuple[int, int]:
    """(tokens kept, of which wide) of the `[B, Hkv, T]`-scored candidates that fit `row_bytes`
    bytes per row, with `tables` (blocks, runs, position runs) of per-channel keys (see `tokens_within`).

    Args:
        wide_worth: `[B, Hkv, T]` what widening each candidate is worth (-inf: it cannot be
            wide), or None when the layer keeps no wide tokens.
        wide_fraction: share of the kept tokens the layer's plan widens.
    """
    count = scores.shape[-1]
    if wide_worth is None:
        return tokens_within(storage, keep_groups, row_bytes, count, tables), 0
    extra = storage.wide_bytes(keep_groups)
    keep = tokens_within(storage, keep_groups, row_bytes, count, tables, wide_fraction * extra)
    wanted = int(wide_fraction * keep)
    eligible = int(wide_worth.isfinite().sum(-1).min().item()) if scores.numel() else 0
    widened = min(wanted, eligible)
    if widened < wanted:  # too few tokens can be widened: spend the rest on tokens
        keep = tokens_within(storage, keep_groups, row_bytes - widened * extra, count, tables)
    return keep, min(widened, keep)


def choose_tokens(
    scores: torch.Tensor,
    keep: int,
    heads: torch.Tensor | None = None,
    num_heads: int = 1,
    wide_worth: torch.Tensor | None = None,
    widened: int = 0,
) -> torch.Tensor:
    """`[B, Hkv or 1, keep]` indices of the `[B, Hkv or 1, T]`-scored tokens to keep (the
    `widened` worth widening most first, see `wide_first`); with shared rows (`heads`: the
    `[B, 1, T]` head of each token) every one of `num_heads` heads keeps its floor."""
    ranked = scores if heads is None else floor_heads(scores, heads, num_heads, keep)
    if wide_worth is None:
        return select_tokens(ranked, keep)
    return wide_first(ranked, wide_worth, keep, widened)


def per_head_survivors(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens a shared row of `keep` would take from `[B, Hkv, T]` candidates, per head:
    `[B, Hkv, Cmax]` indices (each head's survivors ascending, then its last survivor
    repeated up to the longest head's count, so quantizing them per head sees no other
    values) and which entries are survivors rather than repeats."""
    batch, heads, tokens = scores.shape
    flat = scores.reshape(batch, 1, heads * tokens)  # [B, 1, Hkv*T], head-major
    owner = torch.arange(heads, dtype=torch.uint8, device=scores.device).repeat_interleave(tokens)
    chosen = choose_tokens(flat, keep, owner.expand(batch, 1, -1), heads)  # [B, 1, keep]
    kept = torch.zeros(batch, heads * tokens, dtype=torch.bool, device=scores.device)
    kept.scatter_(1, chosen[:, 0], True)
    kept = kept.view(batch, heads, tokens)  # [B, Hkv, T]
    counts = kept.sum(-1, keepdim=True)  # [B, Hkv, 1]
    position = torch.arange(tokens, device=scores.device)
    order = torch.where(kept, position, tokens + position).argsort(dim=-1)  # survivors first, ascending
    longest = max(int(counts.max()), 1)
    slots = torch.arange(longest, device=scores.device).view(1, 1, longest)
    last = (counts - 1).clamp_min(0)
    index = order.gather(2, torch.minimum(slots, last).expand(batch, heads, longest))  # [B, Hkv, Cmax]
    return index, slots < counts
