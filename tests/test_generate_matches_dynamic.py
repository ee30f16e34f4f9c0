"""With every value group kept, SubTokenCache must generate exactly what DynamicCache does."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache, SubTokenConfig
from tests.tiny_models import ARCHITECTURES, make_tiny_model, random_prompts

LOSSLESS = SubTokenConfig(num_groups=8, keep_groups=8, window=8, pack_chunk=4, floor_tokens=0)  # packs from the start
NEW_TOKENS = 64


def _generate(model, cache, inputs, **kwargs):
    kwargs.setdefault("do_sample", False)
    if "assistant_model" not in kwargs:  # assisted generation refuses min_new_tokens
        kwargs["min_new_tokens"] = NEW_TOKENS
    with torch.no_grad():
        return model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW_TOKENS, **kwargs)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_greedy_matches_dynamic_cache(arch):
    model = make_tiny_model(arch)
    inputs = {"input_ids": random_prompts(1, 40), "attention_mask": torch.ones(1, 40, dtype=torch.long)}
    expected = _generate(model, DynamicCache(config=model.config), inputs)
    cache = SubTokenCache(model, LOSSLESS)
    got = _generate(model, cache, inputs)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == 40 + NEW_TOKENS - 1
    assert cache.layers[0].packed_keys.shape[-2] > 0, "decoding must have packed window chunks"


def test_left_padded_batch_matches_dynamic_cache():
    model = make_tiny_model("llama")
    lengths = [40, 25, 33]
    ids = torch.zeros(3, 40, dtype=torch.long)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 40 - n :] = random_prompts(1, n, seed=row)[0]
        mask[row, 40 - n :] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    expected = _generate(model, DynamicCache(), inputs)
    got = _generate(model, SubTokenCache(model, LOSSLESS), inputs)
    assert torch.equal(got, expected)


def test_seeded_sampling_matches_dynamic_cache():
    model = make_tiny_model("qwen2")
    inputs = {"input_ids": random_prompts(2, 30), "attention_mask": torch.ones(2, 30, dtype=torch.long)}
    torch.manual_seed(123)
    expected = _generate(model, DynamicCache(), inputs, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    got = _generate(model, SubTokenCache(model, LOSSLESS), inputs, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(got, expected)


def test_beam_search_matches_dynamic_cache():
    model = make_tiny_model("llama")
    inputs = {"input_ids": random_prompts(1, 30), "attention_mask": torch.ones(1, 30, dtype=torch.long)}
    expected = _generate(model, DynamicCache(), inputs, num_beams=3)
    got = _generate(model, SubTokenCache(model, LOSSLESS), inputs, num_beams=3)
    assert torch.equal(got, expected)


def test_num_return_sequences_matches_dynamic_cache():
    model = make_tiny_model("qwen3")
    inputs = {"input_ids": random_prompts(1, 30), "attention_mask": torch.ones(1, 30, dtype=torch.long)}
    torch.manual_seed(7)
    expected = _generate(model, DynamicCache(), inputs, do_sample=True, num_return_sequences=3)
    torch.manual_seed(7)
    got = _generate(model, SubTokenCache(model, LOSSLESS), inputs, do_sample=True, num_return_sequences=3)
    assert torch.equal(got, expected)


def test_second_generate_continues_the_cache():
    model = make_tiny_model("mistral")
    first = random_prompts(1, 30)
    dense, ours = DynamicCache(), SubTokenCache(model, LOSSLESS)
    ones = torch.ones_like
    out_dense = _generate(model, dense, {"input_ids": first, "attention_mask": ones(first)})
    out_ours = _generate(model, ours, {"input_ids": first, "attention_mask": ones(first)})
    assert torch.equal(out_ours, out_dense)
    turn = torch.cat([out_dense, random_prompts(1, 12, seed=5)], dim=-1)
    again_dense = _generate(model, dense, {"input_ids": turn, "attention_mask": ones(turn)})
    again_ours = _generate(model, ours, {"input_ids": turn, "attention_mask": ones(turn)})
    assert torch.equal(again_ours, again_dense)
    assert ours.get_seq_length() == dense.get_seq_length()


def test_assisted_decoding_crops_the_cache():
    model = make_tiny_model("llama")
    assistant = make_tiny_model("llama", seed=1)
    inputs = {"input_ids": random_prompts(1, 30), "attention_mask": torch.ones(1, 30, dtype=torch.long)}
    expected = _generate(model, DynamicCache(), inputs)
    got = _generate(model, SubTokenCache(model, LOSSLESS), inputs, assistant_model=assistant)
    assert torch.equal(got, expected)


def test_bf16_logits_within_tolerance():
    """bf16: the decode logits of both caches agree within 0.05 (bf16 has ~3 significant digits)."""
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    ids = random_prompts(1, 40)
    dense, ours = DynamicCache(), SubTokenCache(model, SubTokenConfig(num_groups=8, keep_groups=8, window=0))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=dense)
        model(input_ids=ids, past_key_values=ours)
        step = random_prompts(1, 1, seed=9)
        want = model(input_ids=step, past_key_values=dense).logits.float()
        got = model(input_ids=step, past_key_values=ours).logits.float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
