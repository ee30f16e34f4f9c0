"""The attention hookup is installed by the cache, idempotently and reversibly."""

from __future__ import annotations

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
