"""`needle` suite: pass-key retrieval at several context lengths and depths, two settings.

- `in_prompt`: the question is part of the prompt that gets compressed (a plain
  `generate()` call with a compressing cache).
- `after`: the context alone is compressed, then the question is fed (kvpress's pipeline).

Each setting gets one dense prefill of exactly the tokens that setting compresses (the whole
prompt, or the context alone), shared by every method. Slicing the prompt's prefill would
save one prefill, but its first positions differ from a context-only prefill by float
rounding (about 1e-5), which flips near-tied top-k choices of the presses; with a prefill of
the same tokens the presses' caches are bit-identical to kvpress's own pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hf_subtok.bench.decoding import eos_ids, greedy_continue
from hf_subtok.bench.evaluate import run_methods
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.tasks import as_input_ids, build_needle_case

logger = logging.getLogger(__name__)

SETTINGS = {
    "in_prompt": "question inside the compressed prompt (plain generate())",
    "after": "question withheld until after compression (kvpress pipeline)",
}


@dataclass(frozen=True)
class NeedleSpec:
    length: int
    depth: float
    seed: int

    @property
    def key(self) -> str:
        return f"needle|{self.length}|{self.depth:g}|{self.seed}"


def needle_specs(config) -> list[NeedleSpec]:
    return [
        NeedleSpec(length, depth, seed)
        for length in config.needle_lengths
        for depth in config.needle_depths
        for seed in config.needle_seeds
    ]


def units(config, n_methods: int) -> int:
    """Progress units of this suite: one per (case, setting, method)."""
    return len(needle_specs(config)) * len(SETTINGS) * n_methods


def run_needle(ctx) -> None:
    for spec in needle_specs(ctx.config):
        prefixes = {s: f"{spec.key}|{s}" for s in SETTINGS}
        if ctx.all_done(prefixes.values()):
            ctx.advance(len(SETTINGS) * len(ctx.methods))
            continue
        _run_case(ctx, spec, prefixes)


def _run_case(ctx, spec: NeedleSpec, prefixes: dict[str, str]) -> None:
    """One needle case: for each setting, one dense prefill shared by every method."""
    case = build_needle_case(ctx.tokenizer, spec.length, spec.depth, spec.seed)
    prompt = as_input_ids(case.prompt_ids)
    context = as_input_ids(case.context_ids)
    question = as_input_ids(case.question_ids)
    stop_ids = eos_ids(ctx.model)
    base = {
        "suite": "needle",
        "context_tokens": spec.length,
        "prompt_tokens": prompt.shape[1],
        "depth": spec.depth,
        "actual_depth": round(case.actual_depth, 4),
        "seed": spec.seed,
        "expected": case.answer,
    }

    def stop(tokens):
        return case.is_correct(ctx.tokenizer.decode(tokens, skip_special_tokens=True))

    def answer_of(gen) -> dict:
        answer = ctx.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        return {"answer": answer, "correct": case.is_correct(answer), "new_tokens": len(gen.token_ids),
                "decode_s": gen.seconds}

    for setting, ids in (("in_prompt", prompt), ("after", context)):
        if ctx.all_done([prefixes[setting]]):
            ctx.advance(len(ctx.methods))
            continue
        ctx.set_status(f"needle {spec.length} tok, depth {spec.depth:g}, {setting}: dense prefill")
        prefill = dense_prefill(ctx.model, ids, capture_hidden=ctx.needs_hidden)
        ctx.maybe_verify_presses(setting, ids, prefill)

        def evaluate(compressed, setting=setting, prefill=prefill):
            if setting == "in_prompt":
                gen = greedy_continue(
                    ctx.model, compressed.cache, prompt.shape[1], first_logits=compressed.logits_after(prefill),
                    max_new_tokens=ctx.config.max_new_tokens, stop_ids=stop_ids, stop=stop,
                )
            else:
                gen = greedy_continue(
                    ctx.model, compressed.cache, context.shape[1], input_ids=question,
                    max_new_tokens=ctx.config.max_new_tokens, stop_ids=stop_ids, stop=stop,
                )
            return answer_of(gen)

        ctx.set_status(f"needle {spec.length} tok, depth {spec.depth:g}, {setting}: methods")
        row_base = {**base, "setting": setting, "setting_description": SETTINGS[setting], "prefill_s": prefill.seconds}
        run_methods(ctx, prefill, row_base, prefixes[setting], evaluate, ids)
        del prefill
