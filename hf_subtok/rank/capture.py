"""Keys (before and after RoPE) and values of every decoder layer, captured from a model's forward.

`capture_kv(model, sink)` installs forward hooks on each layer's attention module and removes
them on exit: while it is active, every forward calls `sink(layer_idx, keys_pre, keys_post,
values)` with `[B, Hkv, T, D]` tensors. `keys_pre` is what the model's key projection gives
(after Qwen3's `k_norm`), `keys_post` the same keys after the model's own `apply_rotary_pos_emb`
(what a cache receives), `values` the value projection. No forward is copied or patched.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch

Sink = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's attention module (`layer.self_attn`), after checking the model is supported."""
    from hf_subtok.attention import check_supported

    check_supported(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return [layer.self_attn for layer in decoder.layers]


@contextlib.contextmanager
def capture_kv(model, sink: Sink) -> Iterator[None]:
    """While active, each forward of `model` hands every layer's keys and values to `sink`."""
    handles = []
    try:
        for index, attention in enumerate(attention_modules(model)):
            handles += _hook_layer(index, attention, sink)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook_layer(index: int, attention: torch.nn.Module, sink: Sink) -> list:
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb  # the model's own RoPE
    head_dim = attention.head_dim
    state: dict[str, object] = {}

    def before(module, args, kwargs):
        position = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if position is None:
            raise ValueError(f"layer {index}: the attention module received no position_embeddings (cos, sin)")
        state["position"] = position

    def keys(module, args, out):
        state["keys"] = out

    def values(module, args, out):
        state["values"] = out

    def after(module, args, kwargs, out):
        k, v, (cos, sin) = state.pop("keys"), state.pop("values"), state.pop("position")
        batch, tokens = k.shape[0], k.shape[1]
        keys_pre = k.reshape(batch, tokens, -1, head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        values_ = v.reshape(batch, tokens, -1, head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        _, keys_post = rope(keys_pre, keys_pre, cos, sin)
        sink(index, keys_pre, keys_post, values_)

    key_source = attention.k_norm if hasattr(attention, "k_norm") else attention.k_proj  # Qwen3 normalises keys first
    return [
        attention.register_forward_pre_hook(before, with_kwargs=True),
        key_source.register_forward_hook(keys),
        attention.v_proj.register_forward_hook(values),
        attention.register_forward_hook(after, with_kwargs=True),
    ]
