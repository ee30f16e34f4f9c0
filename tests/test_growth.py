"""A packed store that grows by capacity (`storage.growth`): appends write into spare room and
copy the store only when it runs out; what a layer holds equals the concatenation of what it
was given, and the room is counted as held."""

from __future__ import annotations

import torch

from hf_subtok import SubTokenCache, SubTokenConfig, cache_kwargs
from hf_subtok.quant import quantize
from hf_subtok.storage.growth import SLACK_RATIO, append_tokens
from tests.tiny_models import make_tiny_model, random_prompts


def _parts(n: int, tokens: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [torch.randn(1, 2, tokens, 8, generator=generator) for _ in range(n)]


def test_appends_equal_the_concatenation_and_copy_only_when_the_room_runs_out():
    parts = _parts(40)
    held, buffer, reallocations = parts[0], None, 0
    for count, part in enumerate(parts[1:], start=2):
        before = None if buffer is None else buffer.data_ptr()
        held, buffer = append_tokens(held, part, buffer)
        reallocations += buffer.data_ptr() != before
        assert torch.equal(held, torch.cat(parts[:count], dim=-2))
    # the room is 1/32 of the tokens held (or one append's): copies get rarer as the store grows
    assert reallocations <= len(parts) // 2 and buffer.shape[-2] <= held.shape[-2] * (1 + 1 / SLACK_RATIO) + 5


def test_quantized_tokens_and_indices_along_the_last_dim_grow_the_same_way():
    parts = _parts(12)
    codes = [quantize(p, 4, 4) for p in parts]
    held, buffer = codes[0], None
    indices = [torch.randint(0, 4, (1, 2, 3, 5), dtype=torch.uint8) for _ in parts]
    held_idx, idx_buffer = indices[0], None
    for code, index in zip(codes[1:], indices[1:], strict=True):
        held, buffer = append_tokens(held, code, buffer)
        held_idx, idx_buffer = append_tokens(held_idx, index, idx_buffer, dim=-1)
    expected = torch.cat([c.dequantize(torch.float32) for c in codes], dim=-2)
    assert torch.equal(held.dequantize(torch.float32), expected)
    assert torch.equal(held_idx, torch.cat(indices, dim=-1))


# 4-bit groups-only storage with no budget: a never-evicting layer that preallocates its store
GROWING = SubTokenConfig(bits=4, keep_groups=2, num_groups=4, window=8, pack_chunk=8, recipe=None)


def test_a_decoding_cache_appends_in_place_and_answers_as_a_concatenating_one(monkeypatch):
    model = make_tiny_model("llama")
    prompt = random_prompts(1, 300)
    growing = SubTokenCache(model, GROWING)
    with torch.no_grad():
        tokens = model.generate(prompt, **cache_kwargs(growing), max_new_tokens=64, do_sample=False)
    layer = growing.layers[0]
    assert layer.room, "the layer grew into spare room"
    room = layer.room["packed_values"]
    assert layer.packed_values.payload.data_ptr() == room.payload.data_ptr()
    assert room.shape[-2] > layer.packed_values.shape[-2]
    # the room is held: the report counts each buffer whole, spare tokens included
    spare = 0
    for each in growing.layers:
        for name, buffer in each.room.items():
            view = getattr(each, name)
            parts = [buffer] if torch.is_tensor(buffer) else list(buffer.tensors().values())
            held = [view] if torch.is_tensor(view) else list(view.tensors().values())
            spare += sum(b.numel() * b.element_size() for b in parts) - sum(h.numel() * h.element_size() for h in held)
    viewed = sum(t.numel() * t.element_size() for each in growing.layers for t in each.stored_tensors().values())
    assert spare > 0 and growing.memory_report()["stored_bytes"] == viewed + spare
    # the oracle: the same cache concatenating at every pack gives the same tokens
    from hf_subtok.storage.packing import Packing

    monkeypatch.setattr(Packing, "_preallocates_window", lambda self: False)
    concatenating = SubTokenCache(model, GROWING)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **cache_kwargs(concatenating), max_new_tokens=64, do_sample=False), tokens)
    assert not concatenating.layers[0].room
