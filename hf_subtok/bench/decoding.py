"""Greedy decoding and teacher-forced log-likelihood over an already filled cache.

Positions are passed explicitly (`position_ids`), as kvpress's pipeline does, so a cache that
holds fewer tokens than it has seen (token eviction) still gets the right rotary positions.
With a full cache this is exactly what `generate(do_sample=False)` computes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_subtok.generate_args import cache_kwargs


@dataclass
class Generation:
    """Greedy output: token ids, seconds spent in the model, tokens produced."""

    token_ids: list[int]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")


def eos_ids(model) -> set[int]:
    """End-of-sequence ids from the generation config (the tokenizer's may be wrong)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.no_grad()
def _forward(model, cache, ids: torch.Tensor, start: int, keep: int = 1) -> torch.Tensor:
    """Logits `[1, keep, V]` of `ids` `[1, Q]` placed at positions `start..start+Q-1`."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    out = model(input_ids=ids, **cache_kwargs(cache), position_ids=positions, use_cache=True, logits_to_keep=keep)
    return out.logits


@torch.no_grad()
def chunked_prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed `ids` `[B, T]` (unpadded rows) through `cache` `chunk` tokens per forward, as
    `generate(prefill_chunk_size=chunk)` does; returns the last token's logits `[B, V]`."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if ids.shape[1] == 0:
        raise ValueError(f"ids must hold at least one token, got shape {list(ids.shape)}")
    for start in range(0, ids.shape[1], chunk):
        logits = _forward(model, cache, ids[:, start : start + chunk], start)
    return logits[:, -1]


@torch.no_grad()
def greedy_continue(
    model,
    cache,
    start: int,
    *,
    input_ids: torch.Tensor | None = None,
    first_logits: torch.Tensor | None = None,
    max_new_tokens: int,
    stop_ids: set[int] | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> Generation:
    """Greedy tokens after a cache that has seen `start` tokens.

    Either `input_ids` `[1, Q]` are fed first (a question after a compressed context), or
    `first_logits` `[1, V]` (the prefill's last logits) give the first token directly.
    Stops at `max_new_tokens`, at a token in `stop_ids`, or when `stop(tokens)` is true.
    """
    if (input_ids is None) == (first_logits is None):
        raise ValueError("give exactly one of input_ids and first_logits")
    begin = time.perf_counter()
    if input_ids is not None:
        first_logits = _forward(model, cache, input_ids, start)[:, -1]
        start += input_ids.shape[1]
    device = first_logits.device
    token = int(first_logits.argmax(-1)[0])
    tokens = [token]
    stop_ids = stop_ids or set()
    while len(tokens) < max_new_tokens and token not in stop_ids and not (stop and stop(tokens)):
        logits = _forward(model, cache, torch.tensor([[token]], device=device), start)
        start += 1
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    return Generation(tokens, time.perf_counter() - begin)


@torch.no_grad()
def continuation_nll(model, cache, start: int, eval_ids: torch.Tensor, first_logits: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of `eval_ids` `[1, E]` after a cache of `start` tokens.

    `first_logits` `[1, V]` (the prefill's last logits) score the first token; the cache then
    scores the rest in one forward. Returns `(nll_sum, E)`.
    """
    nll = F.cross_entropy(first_logits.float(), eval_ids[:, 0], reduction="sum")
    if eval_ids.shape[1] > 1:
        logits = _forward(model, cache, eval_ids[:, :-1], start, keep=0)  # [1, E-1, V]
        nll = nll + F.cross_entropy(logits[0].float(), eval_ids[0, 1:], reduction="sum")
    return float(nll), int(eval_ids.shape[1])
