"""Held-out evaluation of a trained router against the training-free ones, at the same budget.

Rows (each a model and a cache configuration):

- `dense`: the base model with a `DynamicCache`.
- `value_norm@K`: the base model, K of G value groups per token chosen by value norm.
- `learned@K`: the base model with the router's LoRA merged, groups chosen by the router.
- `value_norm+lora@K`: the LoRA-merged model with the training-free router.
- with `evict_budget`: `snapkv+value_norm@B` against `learned_selector+router@B`, a cache
  that evicts tokens too (the learned selector ranks tokens, the learned router groups), both
  on the base model.

Perplexity is measured on the shipped `ppl` text, which the router never trains on by
default; the needle (pass-key) cases use the `haystack` text.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.bench.apply import fill_from_prefill
from hf_subtok.bench.decoding import continuation_nll, eos_ids, greedy_continue
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.tasks import as_input_ids, build_needle_case, build_ppl_case

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What the held-out evaluation measures."""

    ppl_prefix: int = field(
        default=2048, metadata={"help": "tokens of the ppl text compressed before scoring"}
    )
    ppl_eval: int = field(
        default=512, metadata={"help": "tokens of the ppl text scored after the prefix"}
    )
    needle_lengths: tuple[int, ...] = field(
        default=(1024, 2048), metadata={"help": "needle prompt lengths"}
    )
    needle_depths: tuple[float, ...] = field(
        default=(0.1, 0.5, 0.9), metadata={"help": "needle depths in [0, 1]"}
    )
    needle_seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "pass-key seeds"})
    window: int = field(default=64, metadata={"help": "dense window of the compressed caches"})
    evict_budget: float | None = field(
        default=None, metadata={"help": "extra rows that also evict tokens"}
    )
    max_new_tokens: int = 12


@dataclass(frozen=True)
class Row:
    """One evaluated method: its name, the model it runs and the cache it builds (None: dense)."""

    method: str
    model: object
    make_cache: object


def evaluation_rows(base_model, adapter, config: EvalConfig) -> list[Row]:
    """The rows compared: dense, training-free and learned at the trained budget (and evicting).

    `value_norm+lora@K` separates the two learned parts: the LoRA with the training-free
    router. The evicting rows run on the base model: the LoRA is trained for the router's own
    group budget, and it hurts a cache that keeps whole values.
    """
    student = adapter.apply_lora(copy.deepcopy(base_model))
    groups, keep = adapter.config.num_groups, adapter.config.keep_groups
    trained = adapter.subtok_config(window=config.window)
    free = SubTokenConfig(
        num_groups=groups,
        keep_groups=keep,
        budget=adapter.config.budget,
        axes="groups",
        window=config.window,
    )
    at = f"K={keep}/{groups}"
    rows = [
        Row("dense", base_model, None),
        Row(f"value_norm@{at}", base_model, lambda: SubTokenCache(base_model, free)),
        Row(f"learned@{at}", student, lambda: SubTokenCache(student, trained, router=adapter)),
    ]
    if adapter.lora is not None:
        rows.append(Row(f"value_norm+lora@{at}", student, lambda: SubTokenCache(student, free)))
    if config.evict_budget is not None:
        evict = SubTokenConfig(num_groups=groups, budget=config.evict_budget, window=config.window, recipe=None)
        budget = f"{config.evict_budget:g}"
        rows.append(
            Row(f"snapkv+value_norm@{budget}", base_model, lambda: SubTokenCache(base_model, evict))
        )
        if adapter.config.selector:
            rows.append(
                Row(
                    f"learned_selector+router@{budget}",
                    base_model,
                    lambda: SubTokenCache(base_model, evict, router=adapter),
                )
            )
    return rows


def _filled(row: Row, prefills: dict, ids: torch.Tensor):
    """`(prefill, cache, ratio)` of `row` over `ids`: one dense prefill per model, shared."""
    key = id(row.model)
    if key not in prefills:
        prefills[key] = dense_prefill(row.model, ids, capture_hidden=False)
    prefill = prefills[key]
    if row.make_cache is None:
        return prefill, prefill.to_dynamic_cache(), 1.0
    cache = fill_from_prefill(row.make_cache(), row.model, prefill)
    return prefill, cache, cache.memory_report()["ratio"]


@torch.no_grad()
def evaluate(base_model, tokenizer, adapter, config: EvalConfig, progress=None) -> dict:
    """Held-out perplexity and needle accuracy of every row; `{"rows": [...], "settings": {...}}`.

    `progress` (a tqdm bar or None) is advanced once per case.
    """
    rows = evaluation_rows(base_model, adapter, config)
    results = {
        row.method: {"method": row.method, "needle_correct": 0, "needle_total": 0} for row in rows
    }

    case = build_ppl_case(tokenizer, config.ppl_prefix, config.ppl_eval)
    prefix, eval_ids = as_input_ids(case.prefix_ids), as_input_ids(case.eval_ids)
    prefills: dict = {}
    for row in rows:
        prefill, cache, ratio = _filled(row, prefills, prefix)
        nll, count = continuation_nll(
            row.model, cache, prefix.shape[1], eval_ids, prefill.last_logits
        )
        results[row.method].update(ppl=round(math.exp(nll / count), 4), ratio=round(ratio, 4))
        logger.info(
            "held-out ppl %s: %.3f (stored/dense %.3f)", row.method, math.exp(nll / count), ratio
        )
    if progress is not None:
        progress.update()

    for length in config.needle_lengths:
        for depth in config.needle_depths:
            for seed in config.needle_seeds:
                needle = build_needle_case(tokenizer, length, depth, seed)
                prompt = as_input_ids(needle.prompt_ids)
                prefills = {}
                for row in rows:
                    prefill, cache, _ = _filled(row, prefills, prompt)
                    gen = greedy_continue(
                        row.model,
                        cache,
                        prompt.shape[1],
                        first_logits=prefill.last_logits,
                        max_new_tokens=config.max_new_tokens,
                        stop_ids=eos_ids(row.model),
                        stop=lambda tokens, needle=needle: needle.is_correct(
                            tokenizer.decode(tokens)
                        ),
                    )
                    correct = needle.is_correct(
                        tokenizer.decode(gen.token_ids, skip_special_tokens=True)
                    )
                    results[row.method]["needle_correct"] += int(correct)
                    results[row.method]["needle_total"] += 1
                if progress is not None:
                    progress.update()
    for result in results.values():
        result["needle_accuracy"] = round(
            result["needle_correct"] / max(result["needle_total"], 1), 4
        )
    settings = {
        "ppl_text": "shipped 'ppl' text (held out)",
        "ppl_prefix": config.ppl_prefix,
        "ppl_eval": config.ppl_eval,
        "needle_cases": [
            list(config.needle_lengths),
            list(config.needle_depths),
            list(config.needle_seeds),
        ],
        "window": config.window,
    }
    return {"rows": list(results.values()), "settings": settings}


def eval_cases(config: EvalConfig) -> int:
    """Progress units of `evaluate`: the ppl case plus each needle case."""
    return 1 + len(config.needle_lengths) * len(config.needle_depths) * len(config.needle_seeds)
