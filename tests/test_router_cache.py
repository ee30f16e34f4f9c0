"""A loaded router inside `SubTokenCache`: generation uses its scorers; a wrong model is refused."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.routers import RouterAdapter
from hf_subtok.training import train_router
from tests.test_router_fixtures import tiny_model, tiny_train_config
from tests.tiny_models import random_prompts


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory, smollm_tokenizer):
    out = tmp_path_factory.mktemp("cache-router")
    return train_router(
        tiny_train_config(out), model=tiny_model(smollm_tokenizer), tokenizer=smollm_tokenizer
    )["router_dir"]


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_generate_with_the_loaded_router(router_dir, smollm_tokenizer):
    router = RouterAdapter.from_pretrained(router_dir)
    model = router.apply_lora(tiny_model(smollm_tokenizer))
    calls = _count_calls(router.modules.groups[1])
    # floor_tokens=0: the short prompt is compressed (by default it would be kept exactly)
    cache = SubTokenCache(model, router.subtok_config(window=8, floor_tokens=0), router=router)
    prompt = random_prompts(1, 60)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 72) and calls[0] > 0
    report = cache.memory_report()
    assert report["tokens_packed"] > 0 and report["ratio"] <= router.config.budget
    assert report["keep_groups"] == [router.config.keep_groups] * 2


def test_evicting_cache_uses_the_learned_selector(router_dir, smollm_tokenizer):
    router = RouterAdapter.from_pretrained(router_dir)
    model = router.apply_lora(tiny_model(smollm_tokenizer))
    calls = _count_calls(router.modules.selectors[0])
    config = SubTokenConfig(num_groups=4, budget=0.4, window=8, floor_tokens=0, recipe=None)
    cache = SubTokenCache(model, config, router=router)
    model.generate(random_prompts(1, 80), past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert calls[0] == 1  # the prompt's tokens ranked once, at the end of the prefill
    assert cache.memory_report()["ratio"] <= 0.4 + 1e-6


def test_cache_refuses_a_router_for_another_model(router_dir, smollm_tokenizer):
    router = RouterAdapter.from_pretrained(router_dir)
    with pytest.raises(ValueError, match="does not fit this model: num_layers: router 2, model 3"):
        SubTokenCache(
            tiny_model(smollm_tokenizer, num_hidden_layers=3), router.subtok_config(), router=router
        )
