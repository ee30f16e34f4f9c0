"""Training signal of the query-aware selector: the attention future queries really pay.

During the teacher's forward, hooks record every layer's query projections and the rotary
embedding; with the teacher's keys, the attention that the last `E` positions pay each prefix
token is the target the selector learns to predict from the prefix's last `W` queries alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_subtok.routers.scorers import SINKS


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer (through a PEFT wrapper too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [layer.self_attn for layer in base.get_decoder().layers]


@contextlib.contextmanager
def capture_queries(model) -> Iterator[list[dict]]:
    """Record each layer's `[B, T, Hq*D]` query projections and `(cos, sin)` while in the block."""
    records: list[dict] = []
    hooks = []
    for module in attention_modules(model):
        record: dict = {}
        records.append(record)

        def pre_hook(mod, args, kwargs, record=record):
            record["rotary"] = kwargs.get("position_embeddings")

        def q_hook(mod, args, output, record=record):
            record["q"] = output.detach()

        hooks.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(module.q_proj.register_forward_hook(q_hook))
    try:
        yield records
    finally:
        for hook in hooks:
            hook.remove()


def roped_queries(module, record: dict) -> torch.Tensor:
    """A record's query projections as the attention function sees them: `[B, Hq, T, D]`."""
    projected = record["q"]
    batch, tokens, _ = projected.shape
    query = projected.view(batch, tokens, -1, module.head_dim)  # [B, T, Hq, D]
    if hasattr(module, "q_norm"):  # Qwen3
        query = module.q_norm(query)
    query = query.transpose(1, 2)  # [B, Hq, T, D]
    cos, sin = record["rotary"]
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    return query


def future_attention(
    queries: torch.Tensor, keys: torch.Tensor, prefix_len: int, scaling: float
) -> torch.Tensor:
    """Mean causal attention `[B, Hkv, P]` that positions `P..T-1` pay each prefix token.

    Args:
        queries: `[B, Hq, T, D]` (RoPE applied).
        keys: `[B, Hkv, T, D]` (RoPE applied).
    """
    batch, kv_heads, tokens, head_dim = keys.shape
    group = queries.shape[1] // kv_heads
    future = tokens - prefix_len
    q = queries[:, :, prefix_len:].reshape(
        batch, kv_heads, group * future, head_dim
    )  # [B, Hkv, R*E, D]
    logits = (q.float() @ keys.float().transpose(-1, -2)) * scaling  # [B, Hkv, R*E, T]
    q_pos = torch.arange(prefix_len, tokens, device=keys.device).repeat(group)
    causal = torch.arange(tokens, device=keys.device).view(1, tokens) <= q_pos.view(-1, 1)
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return probs[..., :prefix_len].mean(2)  # [B, Hkv, P]


def selector_loss(
    selector, keys, values, queries, scaling: float, prefix_len: int, obs_window: int
) -> torch.Tensor:
    """Cross-entropy between the true future attention over the unprotected prefix tokens and
    the selector's distribution over them (sinks and the observation window are kept anyway)."""
    target = future_attention(queries, keys, prefix_len, scaling)[
        ..., SINKS : prefix_len - obs_window
    ]
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)  # [B, Hkv, P']
    observed = queries[:, :, prefix_len - obs_window : prefix_len]  # [B, Hq, W, D]
    logits = selector(
        keys[:, :, :prefix_len], values[:, :, :prefix_len], observed, scaling
    )  # [B, Hkv, P]
    log_probs = logits[..., SINKS : prefix_len - obs_window].log_softmax(-1)
    return -(target * log_probs).sum(-1).mean()
