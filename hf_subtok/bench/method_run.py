"""One method's own prefill and greedy decode on a batch of prompts, timed, with the bytes its
cache holds: the unit the `speed`, `memory` and `throughput` suites measure.

Every method runs its own prefill here (that cost is what is measured): dense with a
`DynamicCache`, subtok through `SubTokenCache`, quantized through transformers'
`QuantizedCache`, and a press under its own `with press(model)` hooks. Decoding then runs
exactly `new_tokens` greedy forwards (no stop at an end token), each giving one token per row.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache
from hf_subtok.bench import kvpress_methods as kvp
from hf_subtok.bench import quantized_methods as quantized
from hf_subtok.bench.apply import subtok_config
from hf_subtok.bench.decoding import chunked_prefill
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.bench.quantized_bytes import quantized_cache_bytes
from hf_subtok.generate_args import cache_kwargs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_cache(model, spec: MethodSpec, window: int | None):
    """An empty cache for `spec` (a `DynamicCache` for dense and for a press)."""
    if spec.family == "subtok":
        return SubTokenCache(model, subtok_config(spec.budget, window, spec.options))
    if spec.family == "quantized":
        return quantized.make_cache(model, spec.backend, spec.bits, dict(spec.options))
    return DynamicCache()


def press_ratio(spec: MethodSpec, match: float | None) -> float:
    """A press's compression ratio: 1 - the stored ratio it is matched to (else its budget)."""
    ratio = spec.budget if match is None else match
    return min(max(1.0 - ratio, 0.0), 0.99)


@torch.no_grad()
def prefill(model, spec: MethodSpec, ids: torch.Tensor, match: float | None, window: int | None):
    """Prefill `ids` `[B, T]` the method's own way (`spec.prefill_chunk` tokens per forward when
    set); returns (cache, logits `[B, V]`, seconds, info)."""
    cache = make_cache(model, spec, window)
    info = {}
    _synchronize(ids.device)
    start = time.perf_counter()
    if spec.family == "kvpress":
        compression_ratio = press_ratio(spec, match)
        info = {"compression_ratio": round(compression_ratio, 6), "prefill": "own (kvpress hooks)"}
        with kvp.make_press(spec.press, compression_ratio)(model):
            out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    elif spec.prefill_chunk is not None:
        logits = chunked_prefill(model, cache, ids, spec.prefill_chunk)
    else:
        logits = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    _synchronize(ids.device)
    return cache, logits, time.perf_counter() - start, info


def stored_bytes(model, spec: MethodSpec, cache) -> int:
    """Bytes the method's cache holds, measured from its tensors."""
    if spec.family == "subtok":
        return cache.memory_report()["stored_bytes"]
    if spec.family == "kvpress":
        return kvp.press_cache_bytes(model, cache)
    if spec.family == "quantized":
        return quantized_cache_bytes(cache)["total"]
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


def dense_bytes(model, tokens: int, batch: int = 1) -> int:
    """Bytes a DynamicCache holds for `batch` rows of `tokens` tokens (2 x layers x B x Hkv x T x D)."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * kv_heads * tokens * head_dim * model.dtype.itemsize


@torch.no_grad()
def greedy_steps(model, cache, start: int, first_logits: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """`steps` greedy forwards of one token per row after a cache that has seen `start` tokens.

    `first_logits` `[B, V]` (the prefill's last logits) give the first token. Positions are
    passed explicitly, so a cache holding fewer tokens than it has seen (eviction) gets the
    right rotary positions. Returns (tokens `[B, steps + 1]`, seconds of the `steps` forwards).
    """
    token = first_logits.argmax(-1, keepdim=True)  # [B, 1]
    tokens = [token]
    device = token.device
    _synchronize(device)
    begin = time.perf_counter()
    for step in range(steps):
        positions = torch.full_like(token, start + step)
        logits = model(input_ids=token, **cache_kwargs(cache), position_ids=positions, use_cache=True,
                       logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    _synchronize(device)
    return torch.cat(tokens, dim=1), time.perf_counter() - begin


@torch.no_grad()
def run_method(model, spec: MethodSpec, ids: torch.Tensor, match: float | None, window: int | None, new_tokens: int) -> dict:
    """Prefill `ids` `[B, T]` the method's own way, then `new_tokens` greedy decode steps.

    Returns prefill seconds, decode steps, seconds and tokens/s (tokens of every row: B per
    step), the bytes the cache holds after the prefill, the dense bytes and their ratio.
    """
    try:
        cache, logits, prefill_s, info = prefill(model, spec, ids, match, window)
        stored = stored_bytes(model, spec, cache)
        _, decode_s = greedy_steps(model, cache, ids.shape[1], logits, new_tokens)
    finally:
        if spec.family == "kvpress":
            kvp.clear_masks(model)
    batch, length = ids.shape
    dense = dense_bytes(model, length, batch)
    return dict(prefill_s=prefill_s, decode_tokens=batch * new_tokens, decode_s=decode_s,
                decode_tok_s=batch * new_tokens / decode_s if decode_s > 0 else float("nan"),
                stored_bytes=stored, dense_bytes=dense, ratio=stored / dense, **info)
