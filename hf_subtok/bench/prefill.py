"""One dense prefill per case, shared by every method that can start from it.

Prefill attention is exact for every method benchmarked here: `SubTokenCache` packs the
prompt only after attending to it densely, and kvpress presses compress each layer's cache
in a forward hook after that layer's attention. So the dense keys and values of one prefill,
plus each attention layer's input hidden states (which press scorers read), are all any
method needs to build its compressed cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_subtok.generate_args import cache_kwargs

# last prompt queries kept per layer (at least SubTokenConfig.obs_window)
QUERY_WINDOW = 64


@dataclass
class DensePrefill:
    """What one dense prefill of `T` tokens leaves behind.

    Attributes:
        keys: per layer `[B, Hkv, T, D]`, RoPE applied (as a `DynamicCache` holds them).
        values: per layer `[B, Hkv, T, D]`.
        hidden: per layer `[B, T, hidden_size]`, the attention module's input, or None when
            not captured.
        position_embeddings: `(cos, sin)`, each `[B, T, D]`, or None when not captured.
        queries: per layer `[B, Hq, W, D]`, the last `W = QUERY_WINDOW` queries with RoPE
            applied, exactly as the attention function saw them (what `SubTokenCache`'s token
            scorers observe at the end of a prefill).
        last_logits: `[B, V]` logits after the last token, or None for a truncated view.
        seconds: wall time of the prefill.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: list[torch.Tensor] | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    queries: list[torch.Tensor]
    last_logits: torch.Tensor | None
    seconds: float

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def dense_bytes(self) -> int:
        """Bytes a `DynamicCache` holds for these tokens (keys and values of every layer)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values, strict=True))

    def to_dynamic_cache(self) -> DynamicCache:
        """A fresh `DynamicCache` holding a copy of the dense keys and values."""
        return dynamic_cache_from(self.keys, self.values)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in base.layers]


def dynamic_cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A `DynamicCache` owning copies of per-layer `[B, Hkv, T, D]` keys and values."""
    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k, v, layer_idx)
    return cache


@torch.no_grad()
def dense_prefill(model, input_ids: torch.Tensor, *, capture_hidden: bool) -> DensePrefill:
    """Run `input_ids` `[1, T]` through `model` with a `DynamicCache`.

    Forward hooks record each layer's last `QUERY_WINDOW` query projections (always) and,
    with `capture_hidden`, each attention module's input hidden states and the rotary
    `(cos, sin)`. The hooks are removed before returning.
    """
    modules = attention_modules(model)
    hidden: list[torch.Tensor | None] = [None] * len(modules)
    projected: list[torch.Tensor | None] = [None] * len(modules)
    rotary: dict[str, tuple] = {}
    hooks = []
    for i, module in enumerate(modules):

        def pre_hook(mod, args, kwargs, i=i):
            if capture_hidden:
                hidden[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rotary.setdefault("pe", kwargs.get("position_embeddings"))

        def q_hook(mod, args, output, i=i):
            projected[i] = output[:, -QUERY_WINDOW:].clone()  # [B, W, Hq * D]

        hooks.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(module.q_proj.register_forward_hook(q_hook))
    cache = DynamicCache()
    start = time.perf_counter()
    try:
        out = model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    seconds = time.perf_counter() - start
    cos, sin = rotary["pe"]
    return DensePrefill(
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        hidden=list(hidden) if capture_hidden else None,
        position_embeddings=(cos, sin) if capture_hidden else None,
        queries=[_roped_queries(m, q, cos, sin) for m, q in zip(modules, projected, strict=True)],
        last_logits=out.logits[:, -1].float(),
        seconds=seconds,
    )


def _roped_queries(module, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`[B, W, Hq * D]` query projections -> `[B, Hq, W, D]` as the attention function gets them.

    The same row-wise operations the attention module applies (view, optional q_norm, RoPE),
    so the values are bit-identical to the model's own.
    """
    batch, window, _ = projected.shape
    query = projected.view(batch, window, -1, module.head_dim)  # [B, W, Hq, D]
    if hasattr(module, "q_norm"):  # Qwen3
        query = module.q_norm(query)
    query = query.transpose(1, 2)  # [B, Hq, W, D]
    query, _ = apply_rotary_pos_emb(query, query, cos[:, -window:], sin[:, -window:])
    return query
