"""Tiny random models of each supported architecture, built in-process (no download)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "mistral_sliding": (MistralConfig, MistralForCausalLM, {"sliding_window": 24}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def make_tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A randomly initialised `arch` model in eval mode with sdpa attention."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval().to(dtype)
    # Random weights make near-uniform logits; sharpen them so greedy choices are stable.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = 0
    return model


def decode_within_budget(model, config, prompt_tokens: int, steps: int = 40):
    """Prefill a batch of 2 random prompts through a `SubTokenCache(model, config)`, decode
    `steps` random tokens, and check that `memory_report()` never exceeds `config.budget` (1%)
    and counts exactly the bytes the layers hold. Returns the cache."""
    from hf_subtok import SubTokenCache

    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(2, prompt_tokens), past_key_values=cache)
        ratios = [cache.memory_report()["ratio"]]
        for step in range(steps):
            model(input_ids=random_prompts(2, 1, seed=step), past_key_values=cache)
            ratios.append(cache.memory_report()["ratio"])
    assert max(ratios) <= config.budget * 1.01, ratios
    storages = {  # each storage once: the layers share their rotation matrices
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for layer in cache.layers
        for t in layer.stored_tensors().values()
    }
    held = sum(storages.values())
    assert cache.memory_report()["stored_bytes"] == held
    return cache


def greedy_per_backend(model, config, prompt: torch.Tensor, new_tokens: int) -> dict[str, torch.Tensor]:
    """Greedy `generate()` tokens of `prompt` through a `SubTokenCache(model, config)` with
    each attention backend (`config` with `backend` replaced): `{"torch": ..., "triton": ...}`.
    `model` and `prompt` are moved to `tests.kernel_cases.DEVICE` first (the Triton path needs a
    CUDA device, or the interpreter on a CPU)."""
    import dataclasses

    from hf_subtok import SubTokenCache
    from tests.kernel_cases import DEVICE

    model, prompt = model.to(DEVICE), prompt.to(DEVICE)
    tokens = {}
    for backend in ("torch", "triton"):
        cache = SubTokenCache(model, dataclasses.replace(config, backend=backend))
        with torch.no_grad():
            tokens[backend] = model.generate(
                prompt, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
    return tokens


def random_prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=generator)
