"""TOVA token scorer: the last query's attention averaged over the layer's heads (oracle written
out here), padding hidden, the newest token kept, end to end by name, and kvpress's TOVAPress."""

from __future__ import annotations

import math

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.scorers import PRIORITY, Observation, TOVAScorer, get_token_scorer
from tests.tiny_models import make_tiny_model, random_prompts

B, HQ, HKV, T, W, D = 2, 4, 2, 11, 3, 6


def _oracle(keys, queries, scaling, key_valid=None, per_kv_head=False):
    """`[B, Hkv, T]` by loops: softmax over valid keys of the last query's logits, per query head
    (query head h reads KV head h // (Hq / Hkv)), then averaged over the heads of the layer (or
    of each KV head's group); the newest token is set to PRIORITY."""
    batch, kv_heads, tokens, _ = keys.shape
    q_heads = queries.shape[1]
    group = q_heads // kv_heads
    out = torch.zeros(batch, kv_heads, tokens, dtype=torch.float64)
    for b in range(batch):
        probs = []
        for h in range(q_heads):
            q = queries[b, h, -1].double()
            logits = [float(q @ keys[b, h // group, t].double()) * scaling for t in range(tokens)]
            valid = [key_valid is None or bool(key_valid[b, t]) for t in range(tokens)]
            top = max(x for x, ok in zip(logits, valid, strict=True) if ok)
            e = [math.exp(x - top) if ok else 0.0 for x, ok in zip(logits, valid, strict=True)]
            probs.append([x / sum(e) for x in e])
        for kv in range(kv_heads):
            heads = range(kv * group, (kv + 1) * group) if per_kv_head else range(q_heads)
            for t in range(tokens):
                out[b, kv, t] = sum(probs[h][t] for h in heads) / len(heads)
    out[..., -1] = PRIORITY
    return out.float()


def _tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, T, D, generator=generator)
    queries = torch.randn(B, HQ, W, D, generator=generator)
    return keys, queries


@pytest.mark.parametrize("per_kv_head", [False, True], ids=["layer-average", "per-kv-head"])
def test_scores_match_the_hand_computed_softmax(per_kv_head):
    keys, queries = _tensors()
    scorer = get_token_scorer("tova")
    scorer.per_kv_head = per_kv_head
    scores = scorer.score_tokens(keys, keys, Observation(queries, None, D**-0.5))
    assert scores.shape == (B, HKV, T) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, _oracle(keys, queries, D**-0.5, per_kv_head=per_kv_head))
    if not per_kv_head:  # TOVA's policy: every head of the layer keeps the same tokens
        assert torch.equal(scores[:, 0], scores[:, 1])
    # with the newest token's own share, the masses of each query head sum to one
    assert (scores[..., :-1].sum(-1) < 1.0).all()


def test_only_the_last_query_counts():
    keys, queries = _tensors()
    other = queries.clone()
    other[:, :, :-1] = torch.randn_like(other[:, :, :-1])
    scorer = TOVAScorer()
    a = scorer.score_tokens(keys, keys, Observation(queries, None, 0.3))
    b = scorer.score_tokens(keys, keys, Observation(other, None, 0.3))
    assert torch.equal(a, b)


def test_padding_gets_no_mass_and_rows_score_as_alone():
    keys, queries = _tensors(1)
    pad = 4
    key_valid = torch.ones(B, T, dtype=torch.bool)
    key_valid[1, :pad] = False  # row 1 is left-padded
    keys[1, :, :pad] = 50.0  # keys no query may attend, large enough to win if not masked
    scores = TOVAScorer().score_tokens(keys, keys, Observation(queries, key_valid, D**-0.5))
    torch.testing.assert_close(scores, _oracle(keys, queries, D**-0.5, key_valid))
    assert (scores[1, :, :pad] == 0).all()
    alone = TOVAScorer().score_tokens(
        keys[1:, :, pad:], keys[1:, :, pad:], Observation(queries[1:], None, D**-0.5)
    )
    torch.testing.assert_close(scores[1:, :, pad:], alone)


def test_newest_token_ranks_first_and_no_sinks():
    keys, queries = _tensors(2)
    queries[:, :, -1] = queries[:, :1, -1]  # one last query for all heads
    keys[:, :, 0] = -10 * queries[:, :2, -1]  # which gives the first token almost no attention
    scores = TOVAScorer().score_tokens(keys, keys, Observation(queries, None, D**-0.5))
    assert (scores[..., -1] == PRIORITY).all()
    assert (scores[..., :-1] < 1.0).all(), "TOVA keeps no sinks or observation window"
    assert (scores[..., 0] < 1e-3).all()


def test_without_queries_is_refused():
    keys, _ = _tensors()
    with pytest.raises(ValueError, match="'tova' needs the prompt's queries"):
        TOVAScorer().score_tokens(keys, keys, None)


def test_registered_name_generates_within_budget():
    assert TOVAScorer.needs_queries and get_token_scorer("tova").name == "tova"
    model = make_tiny_model("llama")
    config = SubTokenConfig(budget=0.25, token_scorer="tova", recipe=None)
    cache = SubTokenCache(model, config)
    prompt = random_prompts(1, 600)  # long enough that the short-prompt floor does not bind
    with torch.no_grad():
        out = model.generate(
            prompt, past_key_values=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False
        )
    assert out.shape == (1, 608)
    assert 0.2 <= cache.memory_report()["ratio"] <= 0.25 * 1.01


def test_left_padded_row_generates_as_its_prompt_alone():
    model = make_tiny_model("llama")
    config = SubTokenConfig(budget=0.25, token_scorer="tova", recipe=None)
    long, short = random_prompts(1, 300, seed=3)[0], random_prompts(1, 200, seed=4)[0]
    ids = torch.zeros(2, 300, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = long, 1
    ids[1, 100:], mask[1, 100:] = short, 1
    with torch.no_grad():
        batch = model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=SubTokenCache(model, config),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
        )[:, 300:]
        alone = model.generate(
            short[None],
            past_key_values=SubTokenCache(model, config),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
        )[:, 200:]
    assert torch.equal(batch[1], alone[0])


@pytest.mark.kvpress
def test_matches_kvpress_tova_press():
    """Same layer, same prompt: kvpress computes the last query from the hidden states itself;
    we get it the way the attention function sees it (q_proj, RoPE)."""
    pytest.importorskip("kvpress")
    from kvpress import TOVAPress
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make_tiny_model("llama", num_hidden_layers=1)
    attn = model.model.layers[0].self_attn
    ids = random_prompts(2, 40)
    dense = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=dense)
        hidden = model.model.layers[0].input_layernorm(
            model.model.embed_tokens(ids)
        )  # [B, T, hidden]
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        cos, sin = model.model.rotary_emb(hidden, positions)
        keys, values = dense.layers[0].keys, dense.layers[0].values  # [B, Hkv, T, D]
        expected = TOVAPress().score(
            attn, hidden, keys, values, None, {"position_embeddings": (cos, sin)}
        )
        q = attn.q_proj(hidden).view(*ids.shape, -1, attn.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        ours = TOVAScorer().score_tokens(
            keys, values, Observation(q[:, :, -8:], None, attn.scaling)
        )
    assert ours.shape == expected.shape == keys.shape[:3]
    torch.testing.assert_close(ours[..., :-1], expected[..., :-1].float(), rtol=1e-4, atol=1e-6)
    assert (ours.argmax(-1) == expected.argmax(-1)).all(), "both keep the newest token first"
