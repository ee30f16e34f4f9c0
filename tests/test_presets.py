"""Every named preset builds a cache that runs a prompt and decoding within its budget."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.presets import PRESETS, resolve_config
from tests.tiny_models import make_tiny_model, random_prompts

_WIDE = dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs_within_its_budget(name):
    model = make_tiny_model("llama", **_WIDE)
    assert resolve_config(name) == SubTokenConfig(**PRESETS[name])
    # the budget, not the short-context floor, sets the bytes of this 300-token context
    cache = SubTokenCache(model, SubTokenConfig(**PRESETS[name], floor_tokens=0))
    with torch.no_grad():
        out = model(input_ids=random_prompts(1, 300), past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(20):
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    budget = PRESETS[name].get("budget")
    ratio = cache.memory_report()["ratio"]
    assert ratio <= (budget * 1.01 if budget is not None else 1.0 + 1e-9)
    assert ratio > 0
