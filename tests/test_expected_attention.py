"""Expected-attention token scorer: RoPE bookkeeping and what it keeps."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import (
    LlamaConfig,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.scorers import Observation, RopeInfo, get_token_scorer
from hf_subtok.scorers.expected_attention import _mean_rotation, _unrotate
from tests.tiny_models import make_tiny_model, random_prompts


def _rotary(head_dim: int = 32):
    rotary = LlamaRotaryEmbedding(
        LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim)
    )
    return rotary, RopeInfo(tuple(rotary.inv_freq.float().tolist()), rotary.attention_scaling)


def test_unrotate_undoes_transformers_rope():
    rotary, rope = _rotary()
    raw = torch.randn(1, 2, 6, 32)
    positions = torch.arange(40, 46).view(1, -1)
    cos, sin = rotary(raw, positions)
    rotated, _ = apply_rotary_pos_emb(raw, raw, cos, sin)
    torch.testing.assert_close(
        _unrotate(rotated, positions[0].float(), rope), raw, atol=1e-5, rtol=0
    )


def test_mean_rotation_is_the_mean_of_rotated_vectors():
    rotary, rope = _rotary()
    vector = torch.randn(32)
    positions = torch.arange(100, 109).view(1, -1)
    cos, sin = rotary(vector.expand(1, 1, 9, 32), positions)
    rotated, _ = apply_rotary_pos_emb(
        vector.expand(1, 1, 9, 32), vector.expand(1, 1, 9, 32), cos, sin
    )
    torch.testing.assert_close(
        _mean_rotation(100, 9, rope, 32, "cpu") @ vector, rotated[0, 0].mean(0), atol=1e-5, rtol=0
    )


def test_key_aligned_with_the_future_queries_scores_highest():
    torch.manual_seed(0)
    _, rope = _rotary()
    tokens, window = 64, 8
    direction = torch.randn(32)
    raw_queries = direction + 0.05 * torch.randn(
        1, 2, window, 32
    )  # [B, Hq, W, D] all near `direction`
    positions = torch.arange(tokens - window, tokens).float()
    angles = positions.view(-1, 1) * rope.frequencies().view(1, -1)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    queries = (
        raw_queries * cos + torch.cat([-raw_queries[..., 16:], raw_queries[..., :16]], -1) * sin
    )
    keys = 0.1 * torch.randn(1, 1, tokens, 32)
    # a key the next queries will meet head-on: the mean future rotation applied to `direction`
    keys[0, 0, 20] = 3.0 * (_mean_rotation(tokens, 512, rope, 32, "cpu") @ direction)
    values = torch.randn(1, 1, tokens, 32)
    scorer = get_token_scorer("expected_attention")
    scores = scorer.score_tokens(keys, values, Observation(queries, None, 32**-0.5, rope))
    assert scores.shape == (1, 1, tokens)
    assert scores.argmax().item() == 20
    assert torch.allclose(scores.sum(-1), torch.ones(1, 1))


def test_cache_with_expected_attention_generates_within_budget():
    model = make_tiny_model("qwen2")
    cache = SubTokenCache(
        model,  # no floor: at 30% of 200 tokens it would set the bytes
        SubTokenConfig(budget=0.3, window=16, token_scorer="expected_attention", floor_tokens=0, recipe=None),
    )
    out = model.generate(
        random_prompts(2, 200), past_key_values=cache, max_new_tokens=20, do_sample=False
    )
    assert out.shape == (2, 220)
    assert cache.memory_report()["ratio"] <= 0.3 * 1.01
