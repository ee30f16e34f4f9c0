"""The attention hookup is installed by the cache, idempotently and reversibly."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache, SubTokenConfig, uninstall_attention
from hf_subtok.attention import ATTENTION_NAME
from tests.tiny_models import make_tiny_model, random_prompts


def test_install_is_idempotent_and_reversible():
    model = make_tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    SubTokenCache(model, SubTokenConfig())
    SubTokenCache(model, SubTokenConfig())
    assert model.config._attn_implementation == ATTENTION_NAME
    uninstall_attention(model)
    assert model.config._attn_implementation == "sdpa"
    uninstall_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_installed_function_leaves_other_caches_unchanged():
    model = make_tiny_model("qwen2")
    ids = random_prompts(1, 20)
    with torch.no_grad():
        before = model(input_ids=ids, past_key_values=DynamicCache()).logits
        SubTokenCache(model, SubTokenConfig())
        after = model(input_ids=ids, past_key_values=DynamicCache()).logits
    assert torch.equal(before, after)


def _eager_model(arch: str = "llama"):
    model = make_tiny_model(arch)
    model.set_attn_implementation("eager")
    return model


def _padded_prompts():
    ids = random_prompts(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: eager needs its own (additive) mask to get it right
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_eager_model_keeps_eager_for_dense_calls(arch):
    """A model loaded with eager attention: dense calls through the hf-subtok function (a
    DynamicCache, padded prompt then a decode step) give an untouched eager model's exact
    logits and attention weights, and uninstalling gives eager back."""
    untouched, model = _eager_model(arch), _eager_model(arch)
    SubTokenCache(model, SubTokenConfig())
    assert model.config._attn_implementation == ATTENTION_NAME
    ids, mask = _padded_prompts()
    step = random_prompts(2, 1, seed=7)
    step_mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
    with torch.no_grad():
        runs = []
        for m in (untouched, model):
            cache = DynamicCache()
            prompt = m(input_ids=ids, attention_mask=mask, past_key_values=cache, output_attentions=True)
            decode = m(input_ids=step, attention_mask=step_mask, past_key_values=cache, output_attentions=True)
            runs.append((prompt, decode))
    for expected, got in zip(*runs, strict=True):
        assert torch.equal(got.logits, expected.logits)
        assert len(got.attentions) == len(expected.attentions) == model.config.num_hidden_layers
        for a, b in zip(got.attentions, expected.attentions, strict=True):
            assert torch.equal(a, b)
    uninstall_attention(model)
    assert model.config._attn_implementation == "eager"


def test_implementation_with_unreadable_masks_is_replaced_with_a_warning(caplog):
    """An implementation whose masks the packed path cannot read (here one registered without a
    mask function) is replaced by sdpa for dense calls, said at warning level; uninstalling
    gives it back."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    name = "hf_subtok_test_no_mask"
    AttentionInterface.register(name, counting)
    try:
        model = make_tiny_model("llama")
        model.set_attn_implementation(name)
        with caplog.at_level(logging.WARNING, logger="hf_subtok.attention"):
            SubTokenCache(model, SubTokenConfig())
        assert any(name in r.getMessage() and "'sdpa'" in r.getMessage() for r in caplog.records)
        reference = make_tiny_model("llama")
        ids, mask = _padded_prompts()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).logits
            expected = reference(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).logits
        assert not calls
        torch.testing.assert_close(got, expected)
        uninstall_attention(model)
        assert model.config._attn_implementation == name
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
