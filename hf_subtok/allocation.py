"""Allocator: spend the byte budget jointly on tokens and value groups, within and across layers.

A kept token costs its whole key, its K kept groups, their K one-byte indices and its float32
score (`accounting.StorageFormat`, quantized or not); keeping more groups per token leaves room for fewer tokens. A plan `(n tokens, K
groups)` of a layer is worth the attention weight its n best tokens cover (mean over the
`[B, Hkv]` rows, each row's weights summing to 1) times the value energy the K best groups
keep. `plan_layer` picks the best plan for one layer's bytes; `split_layer_budgets` shares
bytes among layers so that the sum of the layers' worth is largest (layers whose attention
is spread over many tokens get more than layers that attend to a few).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.accounting import StorageFormat
from hf_subtok.scorers import PRIORITY
from hf_subtok.stored import keys_as_stored, store_keys, store_values, values_as_stored


@dataclass(frozen=True)
class LayerPlan:
    """Per (batch, head) row of one layer: packed tokens kept and value groups per token."""

    keep_tokens: int
    keep_groups: int
    storage: StorageFormat
    wide_fraction: float = 0.0  # share of the kept tokens that keep every group (`span`)


@dataclass(frozen=True)
class StorageChoice:
    """A storage format a layer may use, with the share of its signal it keeps: 1 for the
    model's dtype, `1 - relative quantization error` measured on the layer's own keys and
    values when quantized (see `quantization_fidelity`)."""

    storage: StorageFormat
    fidelity: float = 1.0


def quantization_fidelity(
    keys: torch.Tensor, values: torch.Tensor, storage: StorageFormat, sample: int = 1024
) -> float:
    """`1 - mean(|x - Q(x)| / |x|)` over `[B, Hkv, T, D]` keys and values (at most `sample`
    tokens), quantized as `storage` would; 1.0 for unquantized storage.

    The relative error itself, not its square: an error in a key moves every attention logit
    it enters, so 2-bit storage (about 0.4 relative error) must keep far more tokens than 4-bit
    (about 0.08) to be worth it, as measured on SmolLM2 (BENCHMARKS.md)."""
    if storage.bits is None or keys.shape[-2] == 0:
        return 1.0
    keys, values = keys[..., -sample:, :].float(), values[..., -sample:, :].float()
    errors = []
    for x, restored in (  # compared where they are stored (a rotation keeps every norm)
        (keys_as_stored(keys, storage), store_keys(keys, storage).dequantize(torch.float32)),
        (values_as_stored(values, storage), store_values(values, storage).dequantize(torch.float32)),
    ):
        errors.append(
            torch.linalg.vector_norm(restored - x).item()
            / max(torch.linalg.vector_norm(x).item(), 1e-12)
        )
    return max(0.0, 1.0 - sum(errors) / len(errors))


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
    best: tuple[float, LayerPlan] | None = None
    energies = {
        k: group_energy_kept(group_scores, k).mean().item() if tokens else 1.0
        for k in candidate_groups
    }
    # on a tie (no evidence) keep more groups, then more precision
    for keep_groups in sorted(candidate_groups, reverse=True):
        fractions = (0.0,) if keep_groups == group_scores.shape[-1] else (0.0, *wide_fractions)
        for choice in choices:
            for fraction in fractions:
                cost = choice.storage.token_bytes(keep_groups, scored=True)
                cost += fraction * choice.storage.wide_bytes(keep_groups)
                room = row_budget_bytes - choice.storage.codebook_bytes(keep_groups)  # a row's codebooks
                keep_tokens = min(tokens, max(0, int(room // cost)))
                if keep_tokens < min(min_tokens, tokens):
                    continue
                value = 0.0
                if keep_tokens:
                    value = ranked[..., keep_tokens - 1].mean().item() * energies[keep_groups]
                    if fraction:
                        value += _wide_worth(weights, group_scores, keep_groups, keep_tokens, fraction)
                    value *= choice.fidelity
                if best is None or value > best[0]:
                    best = (value, LayerPlan(keep_tokens, keep_groups, choice.storage, fraction))
    if best is None:
        cheapest = min(c.storage.token_bytes(min(candidate_groups), scored=True) for c in choices)
        raise ValueError(
            f"budget leaves {row_budget_bytes:.0f} bytes per head, less than {min_tokens} token(s) "
            f"of {cheapest} bytes each"
        )
    return best[1]


def _wide_worth(
    weights: torch.Tensor, group_scores: torch.Tensor, keep_groups: int, keep_tokens: int, fraction: float
) -> float:
    """Worth of widening `fraction` of the `keep_tokens` heaviest tokens of each row: the
    largest `weight x (1 - energy share of the K best groups)` among them, summed (mean over
    rows), i.e. the attention-weighted value energy the wide tokens' other groups add."""
    order = weights.argsort(dim=-1, descending=True)[..., :keep_tokens]  # [B, Hkv, n]
    dropped = 1 - group_energy_kept(group_scores, keep_groups)  # [B, Hkv, T]
    gain = (weights * dropped).gather(2, order)  # [B, Hkv, n]
    return gain.topk(int(fraction * keep_tokens), dim=-1).values.sum(-1).mean().item()


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
    if (scores[mass] >= 0).all():
        weights = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
        weights = (1 - UNCERTAINTY) * weights + UNCERTAINTY * uniform
    else:  # scores that are not masses (e.g. negative key norms): rank tokens uniformly
        weights = uniform
    return weights


@dataclass(frozen=True)
class LayerEvidence:
    """What one layer's prompt tells the cross-layer split: its scores and packed-token costs."""

    token_scores: torch.Tensor  # [B, Hkv, T]
    group_scores: torch.Tensor  # [B, Hkv, T, G]
    choices: list[StorageChoice]
    candidate_groups: list[int]


def split_layer_budgets(
    evidence: list[LayerEvidence], total_bytes: float, floor_bytes: list[float], *, steps: int = 60
) -> list[float]:
    """Share `total_bytes` (per `[B, Hkv]` row, summed over layers) among layers.

    Each layer gets at least its `floor_bytes`; above that, bytes go where they buy the most
    worth: for a price `lam` per byte every layer takes, for each K, the tokens whose marginal
    weight times K's energy is at least `lam` times their cost; `lam` is bisected so the
    layers spend `total_bytes`.

    Returns:
        the bytes per row each layer may spend on packed tokens.
    """
    if sum(floor_bytes) > total_bytes * (1 + 1e-9):
        raise ValueError(
            f"layer floors need {sum(floor_bytes):.0f} bytes per row, above the total {total_bytes:.0f}"
        )
    curves = [_layer_curves(e) for e in evidence]

    def spend(lam: float) -> list[float]:
        return [
            max(floor, _best_bytes(curve, lam, floor))
            for curve, floor in zip(curves, floor_bytes, strict=True)
        ]

    # above the best ratio of first-token worth to cost, no layer wants any token
    peaks = [
        m[0].item() * energy / cost for curve in curves for cost, m, energy in curve if m.numel()
    ]
    low, high = 0.0, 2 * max(peaks + [1e-12])
    if sum(spend(0.0)) <= total_bytes:  # every layer can keep all it wants: share the rest
        chosen = spend(0.0)
        spare = total_bytes - sum(chosen)
        return [c + spare * c / (sum(chosen) or 1.0) for c in chosen]
    for _ in range(steps):
        mid = 0.5 * (low + high)
        if sum(spend(mid)) > total_bytes:
            low = mid
        else:
            high = mid
    # tokens of equal worth sit at the final price: under it (high) the layers spend at most
    # the total, over it (low) more; take the same fraction of each layer's difference
    under, over = spend(high), spend(low)
    extra = sum(over) - sum(under)
    fraction = (total_bytes - sum(under)) / extra if extra > 0 else 0.0
    return [u + fraction * (o - u) for u, o in zip(under, over, strict=True)]


def _layer_curves(e: LayerEvidence) -> list[tuple[int, torch.Tensor, float]]:
    """Per candidate (K, storage): (cost of a token, marginal weights by rank `[T]` descending,
    share of the signal kept: value energy of the K groups times the storage's fidelity)."""
    weights = _token_weights(e.token_scores)  # [B, Hkv, T]
    marginal = weights.sort(dim=-1, descending=True).values.flatten(0, -2).mean(0)  # [T]
    curves = []
    for keep_groups in e.candidate_groups:
        energy = (
            group_energy_kept(e.group_scores, keep_groups).mean().item()
            if e.group_scores.numel()
            else 1.0
        )
        for choice in e.choices:
            curves.append(
                (
                    choice.storage.token_bytes(keep_groups, scored=True),
                    marginal,
                    energy * choice.fidelity,
                )
            )
    return curves


def _best_bytes(curves: list[tuple[int, torch.Tensor, float]], lam: float, floor: float) -> float:
    """Bytes of the plan maximising worth - lam * bytes (ties keep more groups)."""
    best_value, best_bytes = None, 0.0
    for cost, marginal, energy in sorted(curves, key=lambda c: -c[0]):
        wanted = int((marginal * energy >= lam * cost).sum().item())
        tokens = max(wanted, min(int(floor // cost), marginal.numel()))
        value = energy * marginal[:tokens].sum().item() - lam * tokens * cost
        if best_value is None or value > best_value + 1e-15:
            best_value, best_bytes = value, float(tokens * cost)
    return best_bytes


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
