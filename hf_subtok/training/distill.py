"""One distillation step of the value-group router and the LoRA: the cache, emulated exactly.

What the student sees is what a `SubTokenCache` holds when the last `E` tokens of a window
are scored after its first `P` tokens (as `hf-subtok bench`'s perplexity suite does): the
prefix runs densely (prefill attention is exact), then every prefix token older than the
dense window keeps only `K` of its `G` value groups, chosen by the router from its value
vector; the `E` tokens then attend to that cache. The teacher is the base model (LoRA
disabled) on the whole window; the loss is KL(teacher || student) on the `E` next-token
distributions.

By default gradients stop at the prefix's cache (truncated backpropagation): the router and
the LoRA learn from the `E` tokens' forward over the routed cache, and a step costs about
0.6x of a full backward through the prefix (`grad_through_prefix=True`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hf_subtok.training.topk import straight_through_topk


@dataclass(frozen=True)
class MaskSpec:
    """Which prefix tokens lose value groups, and how many groups they keep."""

    prefix_len: int  # P
    dense_window: int  # newest prefix tokens kept whole
    num_groups: int  # G
    keep_groups: int  # K
    temperature: float  # straight-through relaxation
    grad_through_prefix: bool = (
        False  # backpropagate into the prefix's own forward (about 1.6x slower)
    )


def teacher_mode(model):
    """Context in which `model` runs as the base model (its LoRA disabled, when it has one)."""
    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


def mask_values(values: torch.Tensor, router: torch.nn.Module, spec: MaskSpec) -> torch.Tensor:
    """`[B, Hkv, P, D]` prefix values -> the same with the dropped groups of old tokens zeroed."""
    batch, heads, tokens, head_dim = values.shape
    old = max(tokens - spec.dense_window, 0)
    if old == 0:
        return values
    old_values = values[:, :, :old]
    mask = straight_through_topk(
        router(old_values), spec.keep_groups, spec.temperature
    )  # [B, Hkv, n, G]
    grouped = old_values.reshape(
        batch, heads, old, spec.num_groups, head_dim // spec.num_groups
    )  # [B, Hkv, n, G, C]
    kept = (grouped * mask.unsqueeze(-1).to(values.dtype)).reshape(
        batch, heads, old, head_dim
    )  # [B, Hkv, n, D]
    return torch.cat([kept, values[:, :, old:]], dim=2)


def student_logits(model, routers, input_ids: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """`[B, T]` tokens -> `[B, E, V]` logits of the last `E = T - P` positions over the routed cache."""
    prefix = spec.prefix_len
    cache = DynamicCache()
    with torch.set_grad_enabled(torch.is_grad_enabled() and spec.grad_through_prefix):
        model(
            input_ids=input_ids[:, :prefix], past_key_values=cache, use_cache=True, logits_to_keep=1
        )
    for layer, router in zip(cache.layers, routers, strict=True):
        layer.values = mask_values(layer.values, router, spec)
    positions = torch.arange(prefix, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    out = model(
        input_ids=input_ids[:, prefix:],
        past_key_values=cache,
        position_ids=positions,
        use_cache=True,
    )
    return out.logits


def kl_to_teacher(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), both `[B, E, V]`, in float32."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()
