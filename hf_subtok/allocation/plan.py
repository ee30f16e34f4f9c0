"""Allocator: spend the byte budget jointly on tokens and value groups, within and across layers.

A kept token costs its whole key, its K kept groups, their K one-byte indices and its float32
score (`formats.StorageFormat`, quantized or not); keeping more groups per token leaves room for fewer tokens. A plan `(n tokens, K
groups)` of a layer is worth the attention weight its n best tokens cover (mean over the
`[B, Hkv]` rows, each row's weights summing to 1) times the value energy the K best groups
keep. `plan_layer` picks the best plan for one layer's bytes; `split_layer_budgets` shares
bytes among layers so that the sum of the layers' worth is largest (layers whose attention
is spread over many tokens get more than layers that attend to a few).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.formats import StorageFormat
from hf_subtok.scorers import PRIORITY


@dataclass(frozen=True)
class LayerPlan:
    """Per (batch, head) row of one layer: packed tokens kept and value groups per token."""

    keep_tokens: int
    keep_groups: int
    storage: StorageFormat
    wide_fraction: float = 0.0  # share of the kept tokens that keep every group (`storage.wide`)


@dataclass(frozen=True)
class StorageChoice:
    """A storage format a layer may use, with the share of its signal it keeps: 1 for the
    model's dtype, `1 - relative quantization error` measured on the layer's own keys and
    values when quantized (`storage.tensors.quantization_fidelity`)."""

    storage: StorageFormat
    fidelity: float = 1.0


def group_energy_kept(group_scores: torch.Tensor, keep_groups: int) -> torch.Tensor:
    """`[B, Hkv, T, G]` group norms -> `[B, Hkv, T]` share of each token's value energy in its best K groups."""
    scores = group_scores.float()
    energy = (scores / scores.amax(-1, keepdim=True).clamp_min(1e-30)).square()  # scale-free per token
    top = energy.topk(keep_groups, dim=-1).values.sum(-1)
    return top / energy.sum(-1).clamp_min(1e-12)


def plan_layer(
    token_scores: torch.Tensor,
    group_scores: torch.Tensor,
    row_budget_bytes: float,
    *,
    choices: list[StorageChoice],
    candidate_groups: list[int],
    min_tokens: int = 0,
    wide_fractions: tuple[float, ...] = (),
) -> LayerPlan:
    """Choose `(keep_tokens, keep_groups, storage, wide_fraction)` for one layer.

    Args:
        token_scores: `[B, Hkv, T]` (higher kept; +inf always kept, -inf never).
        group_scores: `[B, Hkv, T, G]`.
        row_budget_bytes: bytes one (batch, head) row may spend on packed tokens (and on
            their value codebooks, with codeword values).
        choices: the storage formats allowed (precision), each with its fidelity.
        candidate_groups: the K values allowed (one value fixes K).
        min_tokens: floor of tokens per row.
        wide_fractions: shares of the kept tokens that may also keep their other groups
            (adaptive span, for K < G); a wide share is worth the attention weight times the
            value energy those tokens' other groups hold (`_wide_worth`).

    Raises:
        ValueError: when even `min_tokens` tokens at the smallest K exceed the budget.
    """
    tokens = token_scores.shape[-1]
    weights = _token_weights(token_scores)  # [B, Hkv, T], rows sum to 1
    ranked = weights.sort(dim=-1, descending=True).values.cumsum(-1)  # kept weight of the top n
    # every candidate's byte arithmetic first (host ints), then its tensors read in one transfer
    candidates = []  # (keep_groups, choice, fraction, keep_tokens), in the order ties are broken
    for keep_groups in sorted(candidate_groups, reverse=True):  # on a tie keep more groups, then more precision
        fractions = (0.0,) if keep_groups == group_scores.shape[-1] else (0.0, *wide_fractions)
        for choice in choices:
            for fraction in fractions:
                cost = choice.storage.token_bytes(keep_groups, scored=True)
                cost += fraction * choice.storage.wide_bytes(keep_groups)
                room = row_budget_bytes - choice.storage.codebook_bytes(keep_groups)  # a row's codebooks
                keep_tokens = min(tokens, max(0, int(room // cost)))
                if keep_tokens >= min(min_tokens, tokens):
                    candidates.append((keep_groups, choice, fraction, keep_tokens))
    if not candidates:
        cheapest = min(c.storage.token_bytes(min(candidate_groups), scored=True) for c in choices)
        raise ValueError(
            f"budget leaves {row_budget_bytes:.0f} bytes per head, less than {min_tokens} token(s) "
            f"of {cheapest} bytes each"
        )
    read = _Reads()
    energies = {k: read(group_energy_kept(group_scores, k).mean()) if tokens else None for k in candidate_groups}
    kept_weight = {n: read(ranked[..., n - 1].mean()) for n in {c[3] for c in candidates} if n}
    terms = []
    for keep_groups, _, fraction, keep_tokens in candidates:
        kept = kept_weight.get(keep_tokens)
        wide = None
        if keep_tokens and fraction:
            wide = read(_wide_worth(weights, group_scores, keep_groups, keep_tokens, fraction))
        terms.append((kept, wide))
    values = read.values()  # one host transfer for every candidate
    best: tuple[float, LayerPlan] | None = None
    for (keep_groups, choice, fraction, keep_tokens), (kept, wide) in zip(candidates, terms, strict=True):
        value = 0.0
        if keep_tokens:
            value = values[kept] * values[energies[keep_groups]]
            if fraction:
                value += values[wide]
            value *= choice.fidelity
        if best is None or value > best[0]:
            best = (value, LayerPlan(keep_tokens, keep_groups, choice.storage, fraction))
    return best[1]


def _wide_worth(
    weights: torch.Tensor, group_scores: torch.Tensor, keep_groups: int, keep_tokens: int, fraction: float
) -> torch.Tensor:
    """Worth of widening `fraction` of the `keep_tokens` heaviest tokens of each row: the
    largest `weight x (1 - energy share of the K best groups)` among them, summed (mean over
    rows), i.e. the attention-weighted value energy the wide tokens' other groups add (a 0-dim
    tensor: read with the plan's other numbers)."""
    order = weights.argsort(dim=-1, descending=True)[..., :keep_tokens]  # [B, Hkv, n]
    dropped = 1 - group_energy_kept(group_scores, keep_groups)  # [B, Hkv, T]
    gain = (weights * dropped).gather(2, order)  # [B, Hkv, n]
    return gain.topk(int(fraction * keep_tokens), dim=-1).values.sum(-1).mean()


class _Reads:
    """0-dim tensors to read on the host together: `read(t)` files `t` and returns its slot;
    `values()` copies them all in one transfer (one host sync, not one per number)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def __call__(self, value: torch.Tensor) -> int:
        self.parts.append(value)
        return len(self.parts) - 1

    def values(self) -> list[float]:
        """The filed numbers as Python floats (as `.item()` would give each)."""
        if not self.parts:
            return []
        return torch.stack([p.double() for p in self.parts]).tolist()


# Share of a token's weight that does not come from the observed queries: future queries
# (a question asked after compression) may look elsewhere, so every candidate token keeps
# this much of a uniform weight and plans do not bet everything on the observed attention.
UNCERTAINTY = 0.5


def _token_weights(token_scores: torch.Tensor) -> torch.Tensor:
    """Turn scores into per-row weights summing to 1. Priority tokens (`PRIORITY` and above,
    +inf) weigh nothing because they are kept first whatever the plan; -inf (padding) weighs
    nothing. `UNCERTAINTY` of the weight is spread uniformly over the other tokens."""
    mass = token_scores.isfinite() & (token_scores < PRIORITY)
    scores = torch.where(mass, token_scores.float(), 0.0)
    uniform = mass.float() / mass.sum(-1, keepdim=True).clamp_min(1)
    weights = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
    weights = (1 - UNCERTAINTY) * weights + UNCERTAINTY * uniform
    # scores that are not masses (e.g. negative key norms; any in the batch): rank tokens
    # uniformly. Chosen on the device, no host sync (scores outside `mass` are 0 here).
    return torch.where((scores >= 0).all(), weights, uniform)
