"""`ppl` suite: perplexity of the last part of a long text given a compressed cache of its start.

The prefix is prefilled once (dense, exact); each method compresses it; the evaluation tokens
are then scored in one teacher-forced forward over that method's cache. The first evaluation
token is scored from the prefill's own logits (exact for every method).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from hf_subtok.bench.decoding import continuation_nll
from hf_subtok.bench.evaluate import run_methods
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.tasks import as_input_ids, build_ppl_case


@dataclass(frozen=True)
class PplSpec:
    prefix: int
    eval: int
    text: str = "ppl"

    @property
    def key(self) -> str:
        return f"ppl|{self.prefix}|{self.eval}" + ("" if self.text == "ppl" else f"|{self.text}")


def ppl_specs(config) -> list[PplSpec]:
    return [PplSpec(prefix, config.ppl_eval_tokens, config.ppl_text) for prefix in config.ppl_prefix_lengths]


def units(config, n_methods: int) -> int:
    return len(ppl_specs(config)) * n_methods


def run_ppl(ctx) -> None:
    for spec in ppl_specs(ctx.config):
        if ctx.all_done([spec.key]):
            ctx.advance(len(ctx.methods))
            continue
        case = build_ppl_case(ctx.tokenizer, spec.prefix, spec.eval, spec.text)
        prefix = as_input_ids(case.prefix_ids)
        eval_ids = as_input_ids(case.eval_ids)
        ctx.set_status(f"ppl prefix {spec.prefix} tok: dense prefill")
        prefill = dense_prefill(ctx.model, prefix, capture_hidden=ctx.needs_hidden)
        ctx.maybe_verify_presses("ppl", prefix, prefill, unless_checked=True)
        base = {"suite": "ppl", "prefix_tokens": spec.prefix, "eval_tokens": spec.eval, "text": spec.text,
                "prefill_s": prefill.seconds}

        def evaluate(compressed, prefill=prefill, eval_ids=eval_ids, start=prefix.shape[1]):
            begin = time.perf_counter()
            nll, count = continuation_nll(ctx.model, compressed.cache, start, eval_ids, compressed.logits_after(prefill))
            return {"nll": nll / count, "ppl": math.exp(nll / count), "eval_s": time.perf_counter() - begin}

        ctx.set_status(f"ppl prefix {spec.prefix} tok")
        run_methods(ctx, prefill, base, spec.key, evaluate, prefix)
        del prefill
