"""Cross-layer split: share one cache's bytes among layers from what their prompts showed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.allocation.plan import StorageChoice, _token_weights, group_energy_kept


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
