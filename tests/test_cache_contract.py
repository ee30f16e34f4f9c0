"""The rest of the Cache contract: crop, reset, batch selection, reorder."""

from __future__ import annotations

import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.storage.layer import _CROP_TAKES_LENGTH
from tests.tiny_models import make_tiny_model, random_prompts


def _filled(tokens=40, batch=1):
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, SubTokenConfig(num_groups=8, keep_groups=3, window=8, pack_chunk=4))
    with torch.no_grad():
        model(input_ids=random_prompts(batch, tokens), past_key_values=cache)
    return model, cache


def _crop_to(cache, length):
    seen = cache.get_seq_length()
    cache.crop(length if _CROP_TAKES_LENGTH else length - seen)


def test_crop_inside_window_and_inside_packed_tokens():
    _, cache = _filled()
    layer = cache.layers[0]
    packed = layer.packed_keys.shape[-2]
    _crop_to(cache, 38)
    assert cache.get_seq_length() == 38
    assert layer.packed_keys.shape[-2] == packed and layer.window_keys.shape[-2] == 38 - packed
    _crop_to(cache, 10)
    assert cache.get_seq_length() == 10
    assert layer.packed_keys.shape[-2] == 10 and layer.window_keys.shape[-2] == 0
    assert layer.packed_values.shape[-2] == 10 and layer.group_idx.shape[-1] == 10
    assert cache.memory_report()["dense_bytes"] > 0


def test_reset_empties_and_the_cache_can_be_refilled():
    model, cache = _filled()
    cache.reset()
    assert cache.get_seq_length() == 0
    assert cache.memory_report()["stored_bytes"] == 0
    with torch.no_grad():
        model(input_ids=random_prompts(1, 12), past_key_values=cache)
    assert cache.get_seq_length() == 12


def test_batch_select_and_reorder_follow_the_batch():
    _, cache = _filled(batch=3)
    layer = cache.layers[1]
    before = {name: t.clone() for name, t in layer.stored_tensors().items()}
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    for name, tensor in layer.stored_tensors().items():
        assert torch.equal(tensor, before[name][[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1]))
    for name, tensor in layer.stored_tensors().items():
        assert torch.equal(tensor, before[name][[0]])
    cache.batch_repeat_interleave(2)
    assert layer.packed_keys.shape[0] == 2


def test_from_dense_equals_prefill_through_the_cache():
    model, ours = _filled()
    from transformers import DynamicCache

    dense = DynamicCache()
    with torch.no_grad():
        model(input_ids=random_prompts(1, 40), past_key_values=dense)
    rebuilt = SubTokenCache.from_dense(model, ours.config, dense)
    for a, b in zip(ours.layers, rebuilt.layers, strict=True):
        for name, tensor in a.stored_tensors().items():
            assert torch.equal(tensor, b.stored_tensors()[name]), name
