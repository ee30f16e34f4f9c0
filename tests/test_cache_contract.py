"""The rest of the Cache contract: crop, reset, batch selection, reorder."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.storage.rollback import _CROP_TAKES_LENGTH
from tests.tiny_models import make_tiny_model, random_prompts

# K < G: lossy, so `crop` is refused; no floor, so these short prompts are packed
LOSSY = SubTokenConfig(num_groups=8, keep_groups=3, window=8, pack_chunk=4, floor_tokens=0)
# every group of every token in the model's dtype: lossless, so `crop` rolls back exactly
LOSSLESS = SubTokenConfig(num_groups=8, keep_groups=8, window=8, pack_chunk=4, floor_tokens=0)


def _filled(tokens=40, batch=1, config=LOSSY):
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(batch, tokens), past_key_values=cache)
    return model, cache


def _crop_to(cache, length):
    seen = cache.get_seq_length()
    cache.crop(length if _CROP_TAKES_LENGTH else length - seen)


def test_crop_inside_window_and_inside_packed_tokens():
    _, cache = _filled(config=LOSSLESS)
    layer = cache.layers[0]
    assert layer.is_croppable
    prompt_keys = layer.packed_keys[..., :10, :].clone()
    packed = layer.packed_keys.shape[-2]
    assert 10 < packed < 38
    _crop_to(cache, 38)
    assert cache.get_seq_length() == 38
    assert layer.packed_keys.shape[-2] == packed and layer.window_keys.shape[-2] == 38 - packed
    _crop_to(cache, 10)
    assert cache.get_seq_length() == 10
    assert layer.packed_keys.shape[-2] == 10 and layer.window_keys.shape[-2] == 0
    assert layer.packed_values.shape[-2] == 10 and layer.group_idx is None  # K = G: indices implied
    assert torch.equal(layer.packed_keys, prompt_keys)
    assert cache.memory_report()["dense_bytes"] > 0


def test_crop_is_refused_by_a_lossy_cache():
    """K < G dropped value groups the cropped tokens' successors may need: no crop, anywhere."""
    _, cache = _filled()
    layer = cache.layers[0]
    assert not layer.is_croppable
    held = {name: t.clone() for name, t in layer.stored_tensors().items()}
    for length in (38, 10):
        with pytest.raises(ValueError, match="cannot roll back"):
            _crop_to(cache, length)
    assert cache.get_seq_length() == 40
    assert all(torch.equal(layer.stored_tensors()[name], tensor) for name, tensor in held.items())


def test_reset_empties_and_the_cache_can_be_refilled():
    model, cache = _filled()
    cache.reset()
    assert cache.get_seq_length() == 0
    assert cache.memory_report()["stored_bytes"] == 0
    with torch.no_grad():
        model(input_ids=random_prompts(1, 12), past_key_values=cache)
    assert cache.get_seq_length() == 12


def _row_tensors(layer) -> list[dict[str, torch.Tensor]]:
    """Copies of the tensors each batch row holds, by name."""
    return [{name: t.clone() for name, t in row.stored_tensors().items()} for row in layer.row_layers()]


def _assert_rows_equal(layer, expected: list[dict[str, torch.Tensor]]) -> None:
    assert len(layer.row_layers()) == len(expected)
    for r, (row, want) in enumerate(zip(layer.row_layers(), expected, strict=True)):
        got = row.stored_tensors()
        assert got.keys() == want.keys(), r
        for name, tensor in got.items():
            assert torch.equal(tensor, want[name]), (r, name)


def test_batch_select_and_reorder_follow_the_batch():
    model, cache = _filled(batch=3)
    layer = cache.layers[1]
    before = _row_tensors(layer)  # a batch is stored row by row, each row [1, Hkv, ...]
    assert all(row.packed_keys.shape[:2] == (1, 2) and row.packed_keys.shape[-2] > 0 for row in layer.row_layers())
    assert not torch.equal(layer.row_layers()[0].packed_keys, layer.row_layers()[1].packed_keys)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    _assert_rows_equal(layer, [before[2], before[0], before[1]])
    cache.batch_select_indices(torch.tensor([1]))
    _assert_rows_equal(layer, [before[0]])
    cache.batch_repeat_interleave(2)
    _assert_rows_equal(layer, [before[0], before[0]])
    # the copies then go their own ways: each row stores its own next token, the other untouched
    with torch.no_grad():
        model(input_ids=torch.tensor([[5], [6]]), past_key_values=cache)
    first, second = layer.row_layers()
    assert first.get_seq_length() == second.get_seq_length() == 41
    assert not torch.equal(first.window_keys[..., -1, :], second.window_keys[..., -1, :])
    held = before[0]["packed_keys"].shape[-2]
    for row in (first, second):  # what each held before goes on unchanged (keys are stored whole)
        assert torch.equal(row.packed_keys[..., :held, :], before[0]["packed_keys"])


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
