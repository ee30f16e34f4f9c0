"""A trained router seen by the cache: one layer's `GroupScorer` and `TokenScorer`.

Not registered by name: they need trained weights. `RouterAdapter.group_scorer(i)` and
`RouterAdapter.token_scorer(i)` build them.
"""

from __future__ import annotations

import torch

from hf_subtok.routers.modules import GroupRouter, TokenSelector
from hf_subtok.scorers import GroupScorer, Observation, TokenScorer

SINKS = 4  # first tokens kept whatever the scores (as SnapKV)


def _on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module on `device` (moved once; later calls find it there)."""
    param = next(module.parameters())
    return module if param.device == device else module.to(device)


class LearnedGroupScorer(GroupScorer):
    """Score of group g = `||v_g|| * exp(f(v)_g)`: the value norm, re-weighted by a trained MLP.

    Scores stay positive norms (the allocator reads their squares as energy); exact top-k on
    them is the inference-time twin of the straight-through top-k used in training.
    """

    name = "learned"

    def __init__(self, router: GroupRouter):
        self.router = router

    @torch.no_grad()
    def score_groups(
        self, keys: torch.Tensor, values: torch.Tensor, num_groups: int, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if num_groups != self.router.num_groups:
            raise ValueError(
                f"num_groups must be {self.router.num_groups} for this learned router, got {num_groups}"
            )
        router = _on(self.router, values.device)
        return router(values).exp()  # [B, Hkv, T, G] float32


class LearnedTokenScorer(TokenScorer):
    """Predicted share of future attention each token gets, from the prompt's last queries.

    Like SnapKV, the first `SINKS` tokens and the observation window rank above every other
    token (window newest first); the trained selector orders the rest.
    """

    name = "learned_selector"
    needs_queries = True

    def __init__(self, selector: TokenSelector):
        self.selector = selector

    @torch.no_grad()
    def score_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, observation: Observation | None
    ) -> torch.Tensor:
        if observation is None:
            raise ValueError(
                "token_scorer 'learned_selector' needs the prompt's queries (observation=None)"
            )
        tokens = keys.shape[-2]
        window = observation.queries.shape[2]
        selector = _on(self.selector, keys.device)
        logits = selector(
            keys, values, observation.queries, observation.scaling, observation.key_valid
        )
        if observation.key_valid is not None:
            logits = logits.masked_fill(
                ~observation.key_valid.view(keys.shape[0], 1, tokens), float("-inf")
            )
        scores = logits.softmax(-1).nan_to_num(0.0)  # [B, Hkv, T], a mass per row
        scores[..., tokens - window :] = (
            2.0 + torch.arange(1, window + 1, device=keys.device) / window
        )
        scores[..., :SINKS] = 3.0
        return scores
