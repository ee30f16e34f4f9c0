"""The fidelity a layer's plan weighs each precision by: with the prompt's queries, the share of
the attention output quantized keys and values reproduce (checked against
`scaled_dot_product_attention` over the dequantized, un-rotated tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_subtok.formats import StorageFormat
from hf_subtok.storage.tensors import (
    ObservedQueries,
    key_rotation,
    quantization_fidelity,
    store_keys,
    store_values,
    value_rotation,
)

HEAD_DIM, KV_HEADS, QUERY_HEADS = 64, 2, 6


def _tensors(tokens: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen)
    keys[..., 3] *= 8  # an outlier channel, as real keys have
    values = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen)
    queries = torch.randn(1, QUERY_HEADS, 8, HEAD_DIM, generator=gen)
    return keys, values, queries


def _unrotated(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    if rotation is None:
        return x
    width = rotation.shape[0]
    return (x.reshape(*x.shape[:-1], -1, width) @ rotation.T).reshape(x.shape)


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("bits", [4, 2])
def test_fidelity_is_the_attention_output_the_quantized_tensors_reproduce(bits, rotated):
    keys, values, queries = _tensors()
    storage = StorageFormat(HEAD_DIM, 2, 4, bits, rotated=rotated)
    scaling = HEAD_DIM**-0.5
    restored_keys = _unrotated(store_keys(keys, storage).dequantize(torch.float32), key_rotation(storage))
    restored_values = _unrotated(store_values(values, storage).dequantize(torch.float32), value_rotation(storage))
    exact = F.scaled_dot_product_attention(queries, keys, values, scale=scaling, enable_gqa=True)
    quantized = F.scaled_dot_product_attention(queries, restored_keys, restored_values, scale=scaling, enable_gqa=True)
    expected = 1 - (quantized - exact).norm() / exact.norm()

    fidelity = quantization_fidelity(keys, values, storage, observed=ObservedQueries(queries, scaling))

    assert fidelity == pytest.approx(expected.item(), abs=1e-4)


def test_without_attention_to_keys_only_the_values_error_counts():
    """Zero queries attend uniformly: what the keys hold, and so their error, cannot matter."""
    keys, values, queries = _tensors()
    other_keys = torch.randn_like(keys) * 5
    storage = StorageFormat(HEAD_DIM, 2, 4, 2)
    flat = ObservedQueries(torch.zeros_like(queries), HEAD_DIM**-0.5)
    assert quantization_fidelity(keys, values, storage, observed=flat) == pytest.approx(
        quantization_fidelity(other_keys, values, storage, observed=flat), abs=1e-6
    )


def test_sharp_attention_makes_key_errors_cost_more_than_their_norm_says():
    """Queries that pick out single tokens (a retrieval head) read a 2-bit key's error in the
    logits; the tensor-norm fidelity cannot tell them from queries that read broadly."""
    keys, values, _ = _tensors()
    storage = StorageFormat(HEAD_DIM, 2, 4, 2)
    sharp = keys[:, :, [5, 50, 100, 150]].repeat_interleave(QUERY_HEADS // KV_HEADS, dim=1)  # [1, Hq, 4, D]
    broad = 0.02 * sharp
    by_norm = quantization_fidelity(keys, values, storage)
    fidelity_sharp = quantization_fidelity(keys, values, storage, observed=ObservedQueries(sharp, 1.0))
    fidelity_broad = quantization_fidelity(keys, values, storage, observed=ObservedQueries(broad, 1.0))
    assert fidelity_sharp < fidelity_broad
    assert fidelity_sharp < by_norm


def test_left_padding_is_left_out_of_the_output():
    """Keys marked invalid (left padding) take no attention: their content cannot change the fidelity."""
    keys, values, queries = _tensors()
    valid = torch.ones(1, keys.shape[-2], dtype=torch.bool)
    valid[:, :150] = False  # sampled tokens are the last 256: these 150 lie inside the sample
    noisy_keys, noisy_values = keys.clone(), values.clone()
    noisy_keys[..., :150, :] = 100 * torch.randn_like(keys[..., :150, :])
    noisy_values[..., :150, :] = 100 * torch.randn_like(values[..., :150, :])
    storage = StorageFormat(HEAD_DIM, 2, 4, 4, key_layout="token")  # per token: padding cannot share scales
    observed = ObservedQueries(queries, HEAD_DIM**-0.5, valid)
    assert quantization_fidelity(keys, values, storage, observed=observed) == pytest.approx(
        quantization_fidelity(noisy_keys, noisy_values, storage, observed=observed), abs=1e-5
    )


def test_more_bits_keep_more_of_the_output():
    keys, values, queries = _tensors()
    observed = ObservedQueries(queries, HEAD_DIM**-0.5)
    fidelity = {
        bits: quantization_fidelity(keys, values, StorageFormat(HEAD_DIM, 2, 4, bits), observed=observed)
        for bits in (None, 8, 4, 2)
    }
    assert fidelity[None] == 1.0
    assert 1.0 > fidelity[8] > fidelity[4] > fidelity[2] > 0.0


@pytest.mark.parametrize("layer_budgets", ["adaptive", "uniform"])
def test_a_layer_weighs_precisions_by_its_prompts_queries(monkeypatch, layer_budgets):
    """With `bits="auto"`, every precision trial of a prefill reads the queries the layer's
    attention observed (the last `obs_window`, all query heads)."""
    from hf_subtok import SubTokenCache, SubTokenConfig
    from hf_subtok.storage import eviction
    from tests.tiny_models import make_tiny_model, random_prompts

    seen = []

    def recording(keys, values, storage, sample=256, observed=None, **key_space):
        seen.append(observed)
        return real(keys, values, storage, sample, observed, **key_space)

    real = eviction.quantization_norms
    monkeypatch.setattr(eviction, "quantization_norms", recording)
    model = make_tiny_model("llama", num_hidden_layers=2, head_dim=64, num_attention_heads=4,
                            num_key_value_heads=2, hidden_size=256)
    config = SubTokenConfig(budget=0.15, bits="auto", num_groups=2, window=8, floor_tokens=0,
                            obs_window=16, layer_budgets=layer_budgets, recipe=None)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 300), past_key_values=SubTokenCache(model, config))
    assert seen and all(o is not None for o in seen)
    assert {tuple(o.queries.shape) for o in seen} == {(1, 4, 16, 64)}
