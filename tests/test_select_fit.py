"""The allocator's pure selection: how many tokens fit a row's bytes (`tokens_within`,
`fit_tokens`), which ones (`choose_tokens`, `per_head_survivors`), from scores, a storage
format and a byte count alone (no layer, no stored tensor)."""

import torch

from hf_subtok.allocation.select import choose_tokens, fit_tokens, per_head_survivors, tokens_within
from hf_subtok.formats import StorageFormat

PLAIN = StorageFormat(head_dim=16, num_groups=4, elem_bytes=4)


def test_tokens_within_divides_the_row_bytes_by_a_token_s_bytes():
    per_token = PLAIN.token_bytes(2, scored=True)
    assert tokens_within(PLAIN, 2, 10 * per_token + 1, 50, (0, 0, 0)) == 10
    assert tokens_within(PLAIN, 2, 10 * per_token, 5, (0, 0, 0)) == 5  # never more than the candidates
    assert tokens_within(PLAIN, 2, per_token - 1, 50, (0, 0, 0)) == 0
    assert tokens_within(PLAIN, 2, 10 * per_token, 50, (0, 0, 0), extra=per_token) == 5


def test_fit_tokens_spends_on_tokens_when_too_few_can_be_wide():
    scores = torch.rand(1, 2, 40)
    row_bytes = 20 * PLAIN.token_bytes(2, scored=True)
    assert fit_tokens(PLAIN, 2, row_bytes, scores, (0, 0, 0)) == (20, 0)
    none_wide = torch.full_like(scores, float("-inf"))
    assert fit_tokens(PLAIN, 2, row_bytes, scores, (0, 0, 0), none_wide, 0.5) == (20, 0)
    keep, wide = fit_tokens(PLAIN, 2, row_bytes, scores, (0, 0, 0), scores.clone(), 0.5)
    assert wide == int(0.5 * keep) and 0 < keep < 20


def test_choose_tokens_keeps_the_best_ascending_and_per_head_survivors_pad_with_repeats():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 2.0], [0.0, 9.0, 8.0, 7.0]]])  # [B=1, Hkv=2, T=4]
    assert choose_tokens(scores, 2).tolist() == [[[0, 2], [1, 2]]]
    index, real = per_head_survivors(scores, 4)  # one shared row of 4: the 4 best of all 8
    assert index.tolist() == [[[0, 0, 0], [1, 2, 3]]] and real.tolist() == [[[True, False, False], [True, True, True]]]
