"""`output_attentions=True` once hf-subtok's attention is installed on a model.

Dense calls (any other cache, a SubTokenCache's prompt) return what the model's own
implementation returns: eager's attention weights, nothing from sdpa. Decoding over packed
storage computes no weights and refuses with a `ValueError` naming `output_attentions`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache, SubTokenConfig
from tests.tiny_models import make_tiny_model, random_prompts

CONFIGS = {"budget-0.25": SubTokenConfig(budget=0.25, recipe=None), "groups-only": "groups-only"}


def _model(implementation: str):
    model = make_tiny_model("llama")
    model.set_attn_implementation(implementation)
    return model


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_forward_attentions_match_an_untouched_model(implementation):
    """After a SubTokenCache is built on the model, a DynamicCache forward with
    `output_attentions=True` gives the attentions of a model hf-subtok never touched."""
    untouched, model = _model(implementation), _model(implementation)
    SubTokenCache(model, SubTokenConfig())
    ids = random_prompts(1, 20)
    with torch.no_grad():
        expected = untouched(input_ids=ids, past_key_values=DynamicCache(), output_attentions=True)
        got = model(input_ids=ids, past_key_values=DynamicCache(), output_attentions=True)
    assert len(got.attentions) == len(expected.attentions)
    assert len(got.attentions) == (2 if implementation == "eager" else 0)  # sdpa returns none
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got.logits, expected.logits)


def test_generate_with_attentions_and_a_dynamic_cache():
    """`generate(output_attentions=True, return_dict_in_generate=True)` with a DynamicCache on a
    model with hf-subtok installed returns the untouched model's tokens and attentions."""
    untouched, model = _model("eager"), _model("eager")
    SubTokenCache(model, SubTokenConfig())
    ids = random_prompts(1, 16)
    runs = []
    for m in (untouched, model):
        with torch.no_grad():
            runs.append(
                m.generate(
                    ids, past_key_values=DynamicCache(), max_new_tokens=4, do_sample=False,
                    output_attentions=True, return_dict_in_generate=True,
                )
            )
    expected, got = runs
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.attentions) == len(expected.attentions) == 4
    for step_got, step_expected in zip(got.attentions, expected.attentions, strict=True):
        assert len(step_got) == len(step_expected) == 2
        for a, b in zip(step_got, step_expected, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_subtok_cache_prompt_gives_attentions_decode_refuses(name):
    """With a SubTokenCache the prompt's forward returns the weights a DynamicCache prompt does
    (exact dense attention by the model's own eager); a decode step over packed storage raises
    a ValueError naming output_attentions, in a forward as in `generate`."""
    model = _model("eager")
    ids = random_prompts(1, 300)
    cache = SubTokenCache(model, CONFIGS[name])
    with torch.no_grad():
        expected = model(input_ids=ids, past_key_values=DynamicCache(), output_attentions=True)
        got = model(input_ids=ids, past_key_values=cache, output_attentions=True)
        assert len(got.attentions) == 2
        for a, b in zip(got.attentions, expected.attentions, strict=True):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="output_attentions.*packed cache"):
            model(input_ids=random_prompts(1, 1, seed=3), past_key_values=cache, output_attentions=True)
        with pytest.raises(ValueError, match="output_attentions.*packed cache"):
            model.generate(
                ids, past_key_values=SubTokenCache(model, CONFIGS[name]), max_new_tokens=3, do_sample=False,
                output_attentions=True, return_dict_in_generate=True,
            )
