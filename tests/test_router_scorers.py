"""The learned routers as scorers: untrained they equal the training-free ones; top-k is differentiable."""

from __future__ import annotations

import pytest
import torch

from hf_subtok.routers import GroupRouter, LearnedGroupScorer, LearnedTokenScorer, TokenSelector
from hf_subtok.scorers import GroupScorer, Observation, SnapKVScorer, TokenScorer, ValueNormScorer
from hf_subtok.training import straight_through_topk


def _kv(batch=2, heads=2, tokens=63, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, head_dim, generator=g), torch.randn(
        batch, heads, tokens, head_dim, generator=g
    )


def test_untrained_group_router_is_the_value_norm_router():
    keys, values = _kv()
    scorer = LearnedGroupScorer(GroupRouter(num_kv_heads=2, head_dim=16, num_groups=4, hidden=8))
    assert isinstance(scorer, GroupScorer)
    learned = scorer.score_groups(keys, values, 4)
    assert learned.shape == (2, 2, 63, 4) and learned.dtype == torch.float32
    torch.testing.assert_close(
        learned, ValueNormScorer().score_groups(keys, values, 4), rtol=1e-5, atol=1e-6
    )


def test_group_router_rejects_another_group_count():
    keys, values = _kv()
    scorer = LearnedGroupScorer(GroupRouter(2, 16, 4, 8))
    with pytest.raises(ValueError, match="num_groups must be 4 for this learned router, got 8"):
        scorer.score_groups(keys, values, 8)


def test_untrained_selector_ranks_tokens_as_snapkv():
    keys, values = _kv(tokens=80)
    queries = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    observation = Observation(queries, None, 0.25)
    scorer = LearnedTokenScorer(TokenSelector(hidden=8))
    assert isinstance(scorer, TokenScorer) and scorer.needs_queries
    learned = scorer.score_tokens(keys, values, observation)
    snap = SnapKVScorer().score_tokens(keys, values, observation)
    assert learned.shape == (2, 2, 80) and learned.dtype == torch.float32
    top_learned = learned.topk(30, dim=-1).indices.sort(-1).values
    top_snap = snap.topk(30, dim=-1).indices.sort(-1).values
    assert torch.equal(top_learned, top_snap)
    with pytest.raises(ValueError, match="needs the prompt's queries"):
        scorer.score_tokens(keys, values, None)


def test_selector_masks_invalid_keys():
    keys, values = _kv(batch=1, tokens=40)
    valid = torch.ones(1, 40, dtype=torch.bool)
    valid[0, 4:10] = False  # left padding-like hole between the sinks and the rest
    scores = LearnedTokenScorer(TokenSelector(8)).score_tokens(
        keys, values, Observation(torch.randn(1, 4, 8, 16), valid, 0.25)
    )
    assert (scores[..., 4:10] == 0).all() and (scores[..., 10:32] > 0).all()


def test_straight_through_topk_is_exact_forward_and_differentiable():
    scores = torch.randn(3, 5, 8, requires_grad=True)
    mask = straight_through_topk(scores, 3, temperature=0.5)
    expected = torch.zeros(3, 5, 8).scatter_(-1, scores.topk(3, dim=-1).indices, 1.0)
    assert torch.equal(mask.detach(), expected)
    (mask * torch.arange(8.0)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "k, temperature, match",
    [
        (0, 1.0, "k must be in 1..8, got 0"),
        (9, 1.0, "got 9"),
        (2, 0.0, "temperature must be > 0, got 0.0"),
    ],
)
def test_straight_through_topk_rejects_bad_arguments(k, temperature, match):
    with pytest.raises(ValueError, match=match):
        straight_through_topk(torch.randn(2, 8), k, temperature)
