"""Bad configurations and models fail early with a clear ValueError."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from hf_subtok import SubTokenCache, SubTokenConfig
from tests.tiny_models import make_tiny_model


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_groups": 0}, "num_groups"),
        ({"num_groups": 2.5}, "num_groups"),
        ({"keep_groups": 0}, "keep_groups"),
        ({"num_groups": 4, "keep_groups": 5}, "keep_groups"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": "half"}, "budget"),
        ({"window": -1}, "window"),
        ({"window": 8, "pack_chunk": 9}, "pack_chunk"),
        ({"router": "no-such-router"}, "router"),
        ({"backend": "cuda-magic"}, "backend"),
    ],
)
def test_bad_value_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        SubTokenConfig(**kwargs)
    assert str(list(kwargs.values())[-1]) in str(info.value)


def test_num_groups_must_divide_head_dim():
    model = make_tiny_model("llama")  # head_dim 16
    with pytest.raises(ValueError, match=r"num_groups must divide head_dim=16, got 3"):
        SubTokenCache(model, SubTokenConfig(num_groups=3, keep_groups=1))


def test_budget_picks_keep_groups_and_refuses_unreachable():
    model = make_tiny_model("llama")  # head_dim 16, fp32: dense 128 bytes per token and head
    cache = SubTokenCache(model, SubTokenConfig(num_groups=8, budget=0.75, axes="groups", recipe=None))
    # keep k costs (64 + 8k + k) bytes of 128: k=3 -> 0.7109, k=4 -> 0.78
    assert cache.keep_groups == 3
    with pytest.raises(ValueError, match="budget=0.3"):
        SubTokenCache(model, SubTokenConfig(num_groups=8, budget=0.3, axes="groups", recipe=None))
    with pytest.raises(ValueError, match="above budget"):
        SubTokenCache(model, SubTokenConfig(num_groups=8, keep_groups=8, budget=0.9, axes="groups", recipe=None))


def test_unknown_preset_and_wrong_type():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="'nope'"):
        SubTokenCache(model, "nope")
    with pytest.raises(TypeError, match="int"):
        SubTokenCache(model, 3)


def test_unsupported_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="gpt2.*llama, mistral, qwen2, qwen3"):
        SubTokenCache(model, SubTokenConfig())


def _without_triton(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))


def test_triton_backend_without_triton_is_refused(monkeypatch):
    _without_triton(monkeypatch)
    with pytest.raises(ValueError, match="backend='triton'.*triton package, which is not installed"):
        SubTokenConfig(backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        SubTokenCache(make_tiny_model("llama"), dataclasses.replace(SubTokenConfig(), backend="triton"))
    assert SubTokenConfig(backend="auto").backend == "auto"  # auto falls back to PyTorch


@pytest.mark.parametrize(
    "overrides",
    ["0-3", {"layers": "0-3", "budget": 0.5}, 3],
    ids=["string", "single-dict", "int"],
)
def test_overrides_must_be_a_list(overrides):
    with pytest.raises(ValueError, match="overrides must be a list of dicts") as info:
        SubTokenConfig(budget=0.3, overrides=overrides, recipe=None)
    assert repr(overrides) in str(info.value)
