"""`select_tokens` keeps the best-scored tokens in ascending order, on both of its paths
(few dropped: the worst are found and the rest ranked by a cumulative sum; most dropped:
`topk` of the kept then `sort`)."""

import pytest
import torch

from hf_subtok.allocation import select_tokens


def expected_selection(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Row by row: the `keep` highest (distinct) scores' positions, ascending."""
    rows = scores.flatten(0, -2)
    picked = [sorted(row.argsort(descending=True)[:keep].tolist()) for row in rows]
    return torch.tensor(picked, dtype=torch.long).view(*scores.shape[:-1], keep)


@pytest.mark.parametrize("tokens, keep", [(40, 39), (40, 30), (40, 20), (40, 19), (40, 3), (40, 40), (40, 0), (1, 1), (0, 0)])
def test_select_tokens_keeps_the_best_in_ascending_order(tokens, keep):
    generator = torch.Generator().manual_seed(tokens * 100 + keep)
    scores = torch.randperm(2 * 3 * tokens, generator=generator).float().view(2, 3, tokens)  # distinct
    scores[0, 1, : min(tokens, 5)] = float("-inf")  # fillers rank last
    chosen = select_tokens(scores, keep)
    assert chosen.shape == (2, 3, keep) and chosen.dtype == torch.long
    expected = expected_selection(scores, keep)
    # rows of distinct scores: exactly the expected tokens
    assert torch.equal(chosen[1], expected[1]) and torch.equal(chosen[0, [0, 2]], expected[0, [0, 2]])
    # fillers tie at -inf: only how many of them are kept is fixed, not which
    kept_scores = scores[0, 1].gather(0, chosen[0, 1])
    assert torch.equal(kept_scores.sort().values, scores[0, 1].sort(descending=True).values[:keep].sort().values)
    assert bool((chosen[..., 1:] > chosen[..., :-1]).all()), "ascending, no repeats"
