"""Eviction policies: what a `SubTokenLayer` asks about what to keep, built by the cache.

A layer holds one policy and calls it by duck typing (storage imports no scorer and no
allocator): `KeepAll` keeps every token and asks only which value groups to keep;
`TokenPolicy` also scores tokens, plans the layer's bytes and picks the tokens that fit.
Scores and plans come back; the layer does every tensor take and cat itself.
"""

from __future__ import annotations

import dataclasses

import torch

from hf_subtok.allocation.plan import LayerPlan, StorageChoice, plan_layer
from hf_subtok.allocation.select import choose_tokens, fit_tokens, per_head_survivors
from hf_subtok.allocation.split import LayerEvidence
from hf_subtok.formats import StorageFormat


class KeepAll:
    """Keep every token; the group scorer picks each token's value groups.

    Args:
        group_scorer: a registered group scorer (`hf_subtok.scorers`) or a learned router's.
        num_groups: G, the value groups per head.
    """

    evicts = False

    def __init__(self, group_scorer, num_groups: int):
        self.group_scorer = group_scorer
        self.num_groups = num_groups

    def score_groups(
        self, keys: torch.Tensor, values: torch.Tensor, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, Hkv, T, G]` group scores of `[B, Hkv, T, D]` keys/values (`token_weights`
        `[B, Hkv, T]`: attention evidence for query-aware scorers)."""
        if token_weights is None:
            return self.group_scorer.score_groups(keys, values, self.num_groups)
        return self.group_scorer.score_groups(keys, values, self.num_groups, token_weights=token_weights)


class TokenPolicy(KeepAll):
    """Evict tokens under a byte budget: the token scorer ranks tokens, `plan_layer` picks a
    layer's tokens x groups x precision for its bytes, `fit_tokens`/`choose_tokens` keep what fits.

    Args:
        token_scorer: a registered token scorer (`hf_subtok.scorers`) or a learned router's.
        rope: the model's RoPE (`scorers.RopeInfo`), for scorers that need it.
    """

    evicts = True
    fit = staticmethod(fit_tokens)
    choose = staticmethod(choose_tokens)
    per_head_survivors = staticmethod(per_head_survivors)

    def __init__(self, group_scorer, num_groups: int, token_scorer, rope=None):
        super().__init__(group_scorer, num_groups)
        self.token_scorer = token_scorer
        self.rope = rope

    def score_tokens(self, keys: torch.Tensor, values: torch.Tensor, observation) -> torch.Tensor:
        """`[B, Hkv, T]` scores of the prompt's `[B, Hkv, T, D]` tokens from the `Observation`
        of its attention (None: none reported); padding (`key_valid` False) scores -inf."""
        if self.token_scorer.needs_queries and observation is None:
            raise ValueError(
                f"token_scorer {self.token_scorer.name!r} needs the prompt's queries; "
                "run the prompt through the model with the hf_subtok attention installed"
            )
        if observation is not None and observation.rope is None:
            observation = dataclasses.replace(observation, rope=self.rope)
        scores = self.token_scorer.score_tokens(keys, values, observation)  # [B, Hkv, T]
        if observation is not None and observation.key_valid is not None:
            invalid = ~observation.key_valid.view(keys.shape[0], 1, -1)
            scores = scores.masked_fill(invalid, float("-inf"))
        return scores

    def plan(
        self,
        scores: torch.Tensor,
        group_scores: torch.Tensor,
        row_bytes: float,
        choices: list[tuple[StorageFormat, float]],
        candidate_groups: list[int],
        wide_fractions: tuple[float, ...] = (),
    ) -> LayerPlan:
        """The layer's plan for `row_bytes` bytes per row, from its candidates' `[B, Hkv, T]`
        scores and `[B, Hkv, T, G]` group scores; `choices` are (format, fidelity) pairs."""
        return plan_layer(
            scores,
            group_scores,
            row_bytes,
            choices=[StorageChoice(f, fidelity) for f, fidelity in choices],
            candidate_groups=candidate_groups,
            wide_fractions=wide_fractions,
        )

    def evidence(
        self,
        scores: torch.Tensor,
        group_scores: torch.Tensor,
        choices: list[tuple[StorageFormat, float]],
        candidate_groups: list[int],
    ) -> LayerEvidence:
        """What a layer's scored prompt tells the cross-layer split (`split_layer_budgets`)."""
        return LayerEvidence(scores, group_scores, [StorageChoice(f, fidelity) for f, fidelity in choices], candidate_groups)
