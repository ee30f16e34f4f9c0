"""Chunked prefill compresses as it goes: the prompt is fed a chunk at a time (transformers'
`prefill_chunk_size`, or a forward per chunk written by hand), each chunk is packed within the
budget before the next one arrives, so the prompt's dense keys and values never exist whole."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

from hf_subtok import PRESETS, SubTokenCache, SubTokenConfig, cache_kwargs
from hf_subtok.bench.memory import AllocatorPeak
from hf_subtok.storage.layer import SubTokenLayer
from tests.chunked_generate import skip_unless_chunk_positions_right
from tests.tiny_models import make_tiny_model, random_prompts

PROMPT_TOKENS = 600
CHUNK = 128


def _greedy(model, cache, ids, new_tokens, chunk=None):
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=chunk, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             **cache_kwargs(cache))
    return out[:, ids.shape[1]:]


def _chunked_forward(model, cache, ids, chunk):
    """The prompt a chunk at a time, as a user writes it: yields the cache's report after each chunk."""
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start : start + chunk]
            positions = torch.arange(start, start + piece.shape[1]).unsqueeze(0)
            model(input_ids=piece, position_ids=positions, logits_to_keep=1, **cache_kwargs(cache))
            yield start + piece.shape[1], cache.memory_report()


@pytest.mark.parametrize("name", ["lossless", "groups-only"])
def test_lossless_storage_gives_the_dense_tokens_chunked(name):
    """Storage that drops no token gives `DynamicCache`'s one-shot tokens whatever the chunking
    (groups-only keeps half the groups of every token: its tokens are those it gives one-shot)."""
    skip_unless_chunk_positions_right()
    model = make_tiny_model("llama")
    ids = random_prompts(1, PROMPT_TOKENS)
    one_shot = _greedy(model, SubTokenCache(model, name), ids, 12)
    if name == "lossless":
        assert torch.equal(one_shot, _greedy(model, DynamicCache(config=model.config), ids, 12))
    for chunk in (CHUNK, 250):
        assert torch.equal(_greedy(model, SubTokenCache(model, name), ids, 12, chunk=chunk), one_shot), chunk


@pytest.mark.parametrize("name", ["balanced", "compact", 0.25])
def test_each_chunk_is_packed_within_the_budget(name):
    """After every chunk past the floor the cache holds at most its budget of the dense bytes of
    the tokens seen so far: no chunk's dense keys and values outlive its forward."""
    model = make_tiny_model("llama", num_hidden_layers=3)
    config = SubTokenConfig(**PRESETS[name]) if isinstance(name, str) else SubTokenConfig(budget=name, recipe=None)
    cache = SubTokenCache(model, config)
    seen = []
    for tokens, report in _chunked_forward(model, cache, random_prompts(1, PROMPT_TOKENS), CHUNK):
        seen.append(tokens)
        assert report["dense_bytes"] == tokens * model.config.num_hidden_layers * 2 * 2 * 16 * 4
        if tokens > config.floor_tokens:
            assert report["stored_bytes"] <= report["target_bytes"] * 1.01, (tokens, report["ratio"])
            assert report["ratio"] <= max(config.budget, config.floor_tokens / tokens) * 1.01, (tokens, report["ratio"])
    assert seen == [128, 256, 384, 512, 600]
    for layer in cache.layers:  # what the layer holds dense: its window, never a chunk
        assert layer.window.length <= config.window


def test_generate_feeds_the_cache_one_chunk_at_a_time():
    """`generate(prefill_chunk_size=...)` hands each layer the prompt in chunks (transformers
    5.2 and 5.25), and the cache ends within its budget."""
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, "balanced")
    sizes = []
    original = SubTokenLayer.update

    def recording(self, key_states, value_states, *args, **kwargs):
        if self is cache.layers[0]:
            sizes.append(key_states.shape[-2])
        return original(self, key_states, value_states, *args, **kwargs)

    SubTokenLayer.update = recording
    try:
        tokens = _greedy(model, cache, random_prompts(1, PROMPT_TOKENS), 4, chunk=CHUNK)
    finally:
        SubTokenLayer.update = original
    assert sizes == [128, 128, 128, 128, 88, 1, 1, 1], sizes
    assert tokens.shape == (1, 4)
    assert cache.memory_report()["ratio"] <= 0.25 * 1.01


def _greedy_by_hand(model, cache, ids, pieces, new_tokens):
    """Greedy tokens of `ids` prefilled in chunks of the given sizes, then decoded a token at a time."""
    tokens, start = [], 0
    with torch.no_grad():
        for size in pieces:
            positions = torch.arange(start, start + size).unsqueeze(0)
            logits = model(input_ids=ids[:, start : start + size], position_ids=positions, **cache_kwargs(cache)).logits
            start += size
        for _ in range(new_tokens):
            tokens.append(logits[:, -1].argmax(-1))
            positions = torch.tensor([[start]])
            logits = model(input_ids=tokens[-1].unsqueeze(1), position_ids=positions, **cache_kwargs(cache)).logits
            start += 1
    return torch.stack(tokens, dim=1)


def test_chunked_prefill_of_a_padded_batch_matches_each_prompt_alone():
    """Rows of a left-padded batch, prefilled in chunks, answer as their prompts alone fed in the
    same chunks (the padding is never stored: a row's first chunk holds only its real tokens)."""
    skip_unless_chunk_positions_right()
    model = make_tiny_model("llama")
    long, short = random_prompts(1, 500, seed=1), random_prompts(1, 380, seed=2)
    batch = torch.zeros(2, 500, dtype=torch.long)
    batch[0], batch[1, 120:] = long[0], short[0]
    mask = (torch.arange(500) >= torch.tensor([[0], [120]])).long()
    config = GenerationConfig(max_new_tokens=6, do_sample=False, prefill_chunk_size=CHUNK, pad_token_id=0)
    with torch.no_grad():
        cache = SubTokenCache(model, "balanced")
        out = model.generate(input_ids=batch, attention_mask=mask, generation_config=config, **cache_kwargs(cache))
    alone = _greedy_by_hand(model, SubTokenCache(model, "balanced"), long, [128, 128, 128, 116], 6)
    assert torch.equal(out[0:1, 500:], alone)
    alone = _greedy_by_hand(model, SubTokenCache(model, "balanced"), short, [8, 128, 128, 116], 6)
    assert torch.equal(out[1:2, 500:], alone)


def test_chunked_prefill_peak_is_the_compressed_cache_plus_one_chunk():
    """At the allocator, a chunked prefill into a SubTokenCache peaks below the same chunked
    prefill into a DynamicCache by most of the KV bytes it saves: the prompt's dense keys and
    values never exist whole, only the compressed cache and one chunk's transients (attention
    runs a block of queries at a time, so those do not grow with the chunk). On this small model
    the transients are a larger share of the KV than on a real one; the 90% of issue 21 is
    measured on SmolLM2 by `hf-subtok bench --suite memory`."""
    model = make_tiny_model("llama", num_hidden_layers=16, hidden_size=256, num_attention_heads=4)
    ids = random_prompts(1, 2048)
    chunk = 64
    peaks, held = {}, {}
    for name in ("dense", "balanced"):
        cache = DynamicCache(config=model.config) if name == "dense" else SubTokenCache(model, name)
        with AllocatorPeak() as peak, torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                positions = torch.arange(start, start + chunk).unsqueeze(0)
                model(input_ids=ids[:, start : start + chunk], position_ids=positions, logits_to_keep=1,
                      **cache_kwargs(cache))
        peaks[name], held[name] = peak.peak_bytes, peak.end_bytes
    dense_kv = 2048 * 16 * 2 * 2 * 64 * 4
    saved = dense_kv - held["balanced"]
    assert saved > 0.7 * dense_kv, (held, dense_kv)
    assert peaks["dense"] - peaks["balanced"] >= 0.6 * saved, (peaks, held, saved)
