"""Short contexts kept exactly (`floor_tokens`), budgets at the ends of their range, and `crop`
only where it restores exactly what a cache that never saw the cropped tokens holds."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_subtok import PRESETS, SubTokenCache, SubTokenConfig
from tests.tiny_models import make_tiny_model, random_prompts

CONFIGS = [*PRESETS, 0.25, 0.1]


def _config(name, **fields):
    if isinstance(name, str):
        return SubTokenConfig(**{**PRESETS[name], **fields})
    return SubTokenConfig(budget=name, **fields, recipe=None)


def _greedy(model, cache, ids, new_tokens, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
            max_new_tokens=new_tokens, do_sample=False, **kwargs,
        )


@pytest.mark.parametrize("name", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_short_context_is_kept_exactly(name, dtype):
    """Below the floor a cache holds the dense tokens and nothing else: the tokens and logits of
    `DynamicCache`, a ratio of exactly 1."""
    model = make_tiny_model("llama", dtype=dtype)
    ids = random_prompts(1, 40)
    with torch.no_grad():
        dense = model.generate(input_ids=ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=20,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
        cache = SubTokenCache(model, name if isinstance(name, str) else SubTokenConfig(budget=name, recipe=None))
        ours = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=20, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, dense.sequences)
    for got, expected in zip(ours.logits, dense.logits, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    report = cache.memory_report()
    assert report["ratio"] == 1.0
    assert all(row["below_floor"] for row in report["per_layer"])


@pytest.mark.parametrize("name", ["balanced", "compact", "groups-only", 0.1])
def test_context_growing_past_the_floor_is_compressed(name):
    """A prompt under the floor that decodes past it is packed then, within its budget."""
    model = make_tiny_model("llama")
    config = _config(name, floor_tokens=64)
    cache = SubTokenCache(model, config)
    _greedy(model, cache, random_prompts(1, 40), 60)
    report = cache.memory_report()
    assert not any(row["below_floor"] for row in report["per_layer"])
    assert report["ratio"] < 1.0
    assert report["stored_bytes"] <= report["target_bytes"] * 1.01


def test_floor_sets_the_bytes_of_a_small_budget():
    """Just above the floor a budget of 1% holds `floor_tokens` dense tokens' bytes, not 1%."""
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, SubTokenConfig(budget=0.01, floor_tokens=64, window=8, recipe=None))
    _greedy(model, cache, random_prompts(1, 100), 1)
    report = cache.memory_report()
    assert report["target_bytes"] == pytest.approx(report["dense_bytes"] * 64 / 100)
    assert 0.01 < report["ratio"] <= 0.64 * 1.01


def test_budget_one_keeps_every_token():
    """`budget=1.0` is lossless: the tokens and logits of `DynamicCache`."""
    model = make_tiny_model("llama")
    ids = random_prompts(1, 300)
    expected = _greedy(model, DynamicCache(config=model.config), ids, 12)
    cache = SubTokenCache(model, SubTokenConfig(budget=1.0, recipe=None))
    assert torch.equal(_greedy(model, cache, ids, 12), expected)
    assert cache.memory_report()["ratio"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("floor_tokens", [0, 128])
def test_budget_below_one_token_is_refused(floor_tokens):
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, SubTokenConfig(budget=1e-6, floor_tokens=floor_tokens, recipe=None))
    with pytest.raises(ValueError, match="budget=1e-06 leaves"):
        _greedy(model, cache, random_prompts(1, 300), 2)


def test_lossy_cache_is_not_croppable():
    model = make_tiny_model("llama")
    assert SubTokenCache(model, "lossless").is_croppable
    for name in ("balanced", "compact", "groups-only"):
        cache = SubTokenCache(model, name)
        assert not cache.is_croppable
        with pytest.raises(ValueError, match="cannot roll back"):
            cache.layers[0].crop(-1)


@pytest.mark.parametrize("name", ["balanced", "groups-only"])
def test_assisted_decoding_with_a_lossy_cache_is_refused(name):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="crop|roll back"):
        _greedy(model, SubTokenCache(model, name), random_prompts(1, 200), 12, prompt_lookup_num_tokens=3)


def test_crop_restores_the_cache_that_never_saw_the_tokens():
    """After `crop(-3)` the next logits equal those of a cache that only saw the kept tokens."""
    model = make_tiny_model("llama")
    ids = random_prompts(1, 200)
    cropped = SubTokenCache(model, "lossless")
    reference = SubTokenCache(model, "lossless")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cropped)
        model(input_ids=ids[:, :-3], past_key_values=reference)
        cropped.crop(-3) if cropped.get_seq_length() else None
        assert cropped.get_seq_length() == reference.get_seq_length() == 197
        nxt = ids[:, -3:-2]
        got = model(input_ids=nxt, past_key_values=cropped).logits
        expected = model(input_ids=nxt, past_key_values=reference).logits
    torch.testing.assert_close(got, expected)


def test_prompt_lookup_with_lossless_gives_greedy_tokens():
    model = make_tiny_model("llama")
    ids = torch.cat([random_prompts(1, 60), random_prompts(1, 60)], dim=1)  # repeats to look up
    expected = _greedy(model, SubTokenCache(model, "lossless"), ids, 16)
    got = _greedy(model, SubTokenCache(model, "lossless"), ids, 16, prompt_lookup_num_tokens=3)
    assert torch.equal(got, expected)


def test_layer_tensors_read_as_dense_or_explain():
    """`layers[i].keys` is the dense keys while nothing is packed, a clear error after."""
    model = make_tiny_model("llama")
    ids = random_prompts(1, 200)
    short = SubTokenCache(model, "balanced")
    with torch.no_grad():
        model(input_ids=ids[:, :30], past_key_values=short)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :30], past_key_values=dense)
    torch.testing.assert_close(short.layers[0].keys, dense.layers[0].keys)
    torch.testing.assert_close(short.layers[0].values, dense.layers[0].values)
    long = SubTokenCache(model, "balanced")
    _greedy(model, long, ids, 3)
    with pytest.raises(AttributeError, match="packed sub-token storage"):
        long.layers[0].keys  # noqa: B018
