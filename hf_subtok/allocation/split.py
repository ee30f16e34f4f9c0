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

    The bisection runs on the evidence's device with every layer and candidate at once (a
    step is a `searchsorted` and a few tensor operations, never a host sync): the host reads
    two numbers (whether the layers can keep all they want) and the split itself.

    Returns:
        the bytes per row each layer may spend on packed tokens.
    """
    if len(floor_bytes) != len(evidence):
        raise ValueError(f"floor_bytes must give one floor per layer ({len(evidence)}), got {len(floor_bytes)}")
    if sum(floor_bytes) > total_bytes * (1 + 1e-9):
        raise ValueError(
            f"layer floors need {sum(floor_bytes):.0f} bytes per row, above the total {total_bytes:.0f}"
        )
    if not evidence:
        return []
    curves = _Curves(evidence, floor_bytes)
    low, high = curves.least.new_zeros(()), 2 * curves.peak()
    chosen = curves.spend(low)
    spent = chosen.sum()
    if spent.item() <= total_bytes:  # every layer can keep all it wants: share the rest
        return (chosen + (total_bytes - spent) * chosen / torch.where(spent > 0, spent, 1.0)).tolist()
    for _ in range(steps):
        mid = 0.5 * (low + high)
        over_total = curves.spend(mid).sum() > total_bytes
        low, high = torch.where(over_total, mid, low), torch.where(over_total, high, mid)
    # tokens of equal worth sit at the final price: under it (high) the layers spend at most
    # the total, over it (low) more; take the same fraction of each layer's difference
    under, over = curves.spend(high), curves.spend(low)
    extra = over.sum() - under.sum()
    fraction = torch.where(extra > 0, (total_bytes - under.sum()) / torch.where(extra > 0, extra, 1.0), 0.0)
    return (under + fraction * (over - under)).tolist()


class _Curves:
    """Every layer's candidates (K, storage) stacked for the bisection: `[L, C]` cost of a
    token, share of the signal kept (value energy of the K groups times the storage's
    fidelity) and fewest tokens (the layer's floor), the marginal weights by rank of each
    layer (descending) as `[L, C, T]` worths sorted ascending and `[L, T + 1]` prefix sums.

    Candidates are ordered as a layer prefers them on a tie (more bytes first, then as given:
    fewer groups, more precision); layers with fewer candidates, or fewer tokens, are padded
    with candidates and tokens that are never worth anything.
    """

    def __init__(self, evidence: list[LayerEvidence], floor_bytes: list[float]):
        device = evidence[0].token_scores.device
        rows = []  # per layer: [(cost, energy index, fidelity)], most expensive first
        energies = []  # 0-dim float32 tensors: K's share of the value energy in a layer
        marginals = []
        for e in evidence:
            weights = _token_weights(e.token_scores)  # [B, Hkv, T]
            marginals.append(weights.sort(dim=-1, descending=True).values.flatten(0, -2).mean(0))  # [T]
            layer = []
            for keep_groups in e.candidate_groups:
                energies.append(
                    group_energy_kept(e.group_scores, keep_groups).mean()
                    if e.group_scores.numel()
                    else torch.ones((), device=device)
                )
                for choice in e.choices:
                    cost = choice.storage.token_bytes(keep_groups, scored=True)
                    layer.append((cost, len(energies) - 1, choice.fidelity))
            rows.append(sorted(layer, key=lambda c: -c[0]))  # stable: ties keep the given order
        layers, width = len(rows), max(len(r) for r in rows)
        tokens = max(1, *(m.numel() for m in marginals))  # a padded token when no layer has one
        pad = (1, 0, 0.0)  # a candidate worth nothing (a layer's own ones always win over it)
        padded = [r + [pad] * (width - len(r)) for r in rows]
        real = torch.tensor([[i < len(r) for i in range(width)] for r in rows], device=device)
        cost = torch.tensor([[c for c, _, _ in r] for r in padded], dtype=torch.float64, device=device)
        fidelity = torch.tensor([[f for _, _, f in r] for r in padded], dtype=torch.float64, device=device)
        which = torch.tensor([[i for _, i, _ in r] for r in padded], device=device)
        energy = torch.stack([t.float() for t in energies]).double()[which] * fidelity  # [L, C]
        energy = torch.where(real, energy, 0.0)
        marginal = torch.stack([torch.cat([m.float(), m.new_zeros(tokens - m.numel())]) for m in marginals])  # [L, T]
        counts = torch.tensor([m.numel() for m in marginals], device=device)
        # a token's worth at a price: float32 products, as the layer's own arithmetic gives them
        worth = marginal.unsqueeze(1) * energy.float().unsqueeze(-1)  # [L, C, T]
        valid = torch.arange(tokens, device=device) < counts.view(-1, 1, 1)
        self.worth = torch.where(valid, worth, float("-inf")).sort(dim=-1).values  # [L, C, T] ascending
        self.cost, self.energy, self.real = cost, energy, real
        self.prefix = torch.cat([marginal.new_zeros(layers, 1), marginal.double().cumsum(-1)], dim=-1)  # [L, T + 1]
        floors = torch.tensor(floor_bytes, dtype=torch.float64, device=device)
        self.floor = floors
        self.least = torch.minimum(torch.div(floors.view(-1, 1), cost, rounding_mode="floor"), counts.view(-1, 1).double())
        self.peak_worth = marginal[:, 0].double()  # [L] the first token's marginal weight
        self.tokens = tokens

    def peak(self) -> torch.Tensor:
        """Above twice the best ratio of first-token worth to cost, no layer wants any token."""
        ratio = self.peak_worth.view(-1, 1) * self.energy / self.cost  # [L, C]
        return torch.where(self.real, ratio, 0.0).amax().clamp_min(1e-12)

    def spend(self, lam: torch.Tensor) -> torch.Tensor:
        """`[L]` bytes each layer spends at price `lam` (0-dim): the candidate maximising worth
        minus `lam` times bytes (ties, within 1e-15, keep the first), never under the floor."""
        threshold = (lam * self.cost).float().unsqueeze(-1)  # [L, C, 1]: compared in float32
        wanted = self.tokens - torch.searchsorted(self.worth, threshold, right=False).squeeze(-1)  # [L, C]
        tokens = torch.maximum(wanted.double(), self.least)  # [L, C]
        value = self.energy * self.prefix.gather(1, tokens.long()) - lam * tokens * self.cost
        value = torch.where(self.real, value, float("-inf"))
        best = (value >= value.amax(-1, keepdim=True) - 1e-15).int().argmax(-1, keepdim=True)  # first of the best
        spent = (tokens * self.cost).gather(1, best).squeeze(1)  # [L]
        return torch.maximum(self.floor, spent)
