"""A `SubTokenCache` refuses to serve a model it was not built for, and `from_dense` works
with the default (query-needing) token scorer."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_subtok import SubTokenCache
from hf_subtok.presets import resolve_config
from tests.tiny_models import make_tiny_model, random_prompts


def _generate(model, prompt, cache, new_tokens=3):
    with torch.no_grad():
        return model.generate(prompt, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False)


@pytest.mark.parametrize(
    "shape",
    [{"num_key_value_heads": 4}, {"head_dim": 32}],
    ids=["kv-heads", "head-dim"],
)
def test_a_model_of_another_shape_is_refused(shape):
    cache = SubTokenCache(make_tiny_model("llama"), "balanced")
    other = make_tiny_model("llama", **shape)
    with pytest.raises(ValueError, match=r"built for LlamaForCausalLM \(2 layers, 2 KV heads of head_dim 16\).*one cache per model"):
        _generate(other, random_prompts(1, 40), cache)


def test_a_dense_cache_of_a_deeper_model_is_refused():
    dense = DynamicCache()
    with torch.no_grad():
        make_tiny_model("llama", num_hidden_layers=3)(input_ids=random_prompts(1, 20), past_key_values=dense)
    with pytest.raises(ValueError, match=r"\(2 layers, .*but layer 2 handed it 2 KV heads"):
        SubTokenCache.from_dense(make_tiny_model("llama"), "lossless", dense)


def test_another_model_of_the_same_shape_is_refused():
    first, second = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    cache = SubTokenCache(first, "balanced")
    SubTokenCache(second, "balanced")  # `second` runs hf-subtok's attention too
    with pytest.raises(ValueError, match="built for another model object.*one cache per model"):
        _generate(second, random_prompts(1, 40), cache)


def test_the_same_model_may_reuse_its_cache():
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, "balanced")
    first = _generate(model, random_prompts(1, 40), cache)
    SubTokenCache(model, "lossless")  # more caches for the same model change nothing
    again = _generate(model, first, cache)  # continues from the cached prefix
    assert torch.equal(again[:, : first.shape[1]], first) and again.shape[1] == first.shape[1] + 3


def test_from_dense_without_queries_scores_by_key_norm_and_decodes(caplog):
    model = make_tiny_model("llama")
    dense = DynamicCache()
    with torch.no_grad():
        logits = model(input_ids=random_prompts(1, 60), past_key_values=dense).logits
    with caplog.at_level(logging.WARNING, logger="hf_subtok.cache"):
        cache = SubTokenCache.from_dense(model, "balanced", dense)
    assert "'snapkv'" in caplog.text and "'key_norm'" in caplog.text
    assert cache.config.token_scorer == "key_norm"
    token = logits[:, -1:].argmax(-1)
    with torch.no_grad():
        for _ in range(5):
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    assert cache.memory_report()["tokens_seen"] == 65


def _queries_of(model, prompt) -> tuple[DynamicCache, list[torch.Tensor]]:
    """A dense prefill of `prompt`, and each layer's queries `[B, Hq, T, D]` (RoPE applied),
    recorded by an attention function that defers to sdpa."""
    queries = []

    def recording(module, query, *args, **kwargs):
        queries.append(query)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, *args, **kwargs)

    AttentionInterface.register("test_recording", recording)
    previous = model.config._attn_implementation
    model.set_attn_implementation("test_recording")
    dense = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=dense)
    finally:
        model.set_attn_implementation(previous)
    return dense, queries


@pytest.mark.parametrize("preset", ["balanced", "compact"])
def test_from_dense_with_queries_equals_a_prefill_through_the_cache(preset):
    preset = dataclasses.replace(resolve_config(preset), floor_tokens=0)  # the prompt gets compressed
    model, prompt = make_tiny_model("llama"), random_prompts(1, 200)
    dense, queries = _queries_of(model, prompt)
    oracle = SubTokenCache(model, preset)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=oracle)
    rebuilt = SubTokenCache.from_dense(model, preset, dense, queries=queries)
    assert rebuilt.config.token_scorer == "snapkv"
    by_key_norm = SubTokenCache.from_dense(model, preset, dense)  # another choice of tokens
    for ours, theirs in zip(oracle.layers, rebuilt.layers, strict=True):
        stored = ours.stored_tensors()
        assert stored and stored.keys() == theirs.stored_tensors().keys()
        for name, tensor in stored.items():
            assert torch.equal(tensor, theirs.stored_tensors()[name]), name
    token, gaps = torch.tensor([[5]]), []
    with torch.no_grad():
        for _ in range(5):
            want = model(input_ids=token, past_key_values=oracle).logits
            got = model(input_ids=token, past_key_values=rebuilt).logits
            torch.testing.assert_close(got, want)
            gaps.append((model(input_ids=token, past_key_values=by_key_norm).logits - want).abs().max())
            token = want[:, -1:].argmax(-1)
    assert max(gaps) > 1e-3  # the comparison tells the scorers apart


def test_from_dense_needs_one_query_tensor_per_layer():
    model = make_tiny_model("llama")
    dense, queries = _queries_of(model, random_prompts(1, 20))
    with pytest.raises(ValueError, match=r"one tensor per layer of dense_cache \(2\), got 1"):
        SubTokenCache.from_dense(model, "balanced", dense, queries=queries[:1])
